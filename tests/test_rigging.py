"""Gaussians bound to mesh triangles follow the mesh exactly (GaussianAvatars binding, rigging.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from talkinghead.methods.gaussianflametalk.rigging import (
    bind_to_world, boundary_loops, fill_holes, quat_multiply, rotmat_to_quat, shell_points, triangle_frames)
from talkinghead.render.projection import quat_to_rotmat


def _grid_mesh(n: int = 6, hole: bool = True):
    """A bumpy n x n vertex sheet (z towards -camera) with one interior quad removed (a 'mouth' hole)."""
    ys, xs = np.meshgrid(np.linspace(-0.05, 0.05, n), np.linspace(-0.05, 0.05, n), indexing="ij")
    zs = 0.01 * np.sin(xs * 40) * np.cos(ys * 30)
    verts = np.stack([xs, ys, zs], -1).reshape(-1, 3).astype(np.float64)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            if hole and (r, c) in ((2, 2), (2, 3)):
                continue
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [(a, b, e), (a, e, d)]
    return torch.tensor(verts), torch.tensor(faces, dtype=torch.long)


def _random_rotation(gen: torch.Generator) -> torch.Tensor:
    q = torch.randn(4, generator=gen, dtype=torch.float64)
    return quat_to_rotmat((q / q.norm())[None])[0]


def _random_gaussians(num_faces: int, n: int, gen: torch.Generator):
    parent = torch.randint(0, num_faces, (n,), generator=gen)
    return (parent, torch.randn(n, 3, generator=gen, dtype=torch.float64) * 0.3,
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64) * 0.5 - 1.0)


@pytest.mark.parametrize("scale", [1.0, 0.37, 2.5])
def test_similarity_change_of_mesh_moves_bound_gaussians_exactly(scale):
    gen = torch.Generator().manual_seed(1)
    verts, faces = _grid_mesh()
    parent, mu, q, s = _random_gaussians(faces.shape[0], 200, gen)
    means, quats, scales = bind_to_world(verts, faces, parent, mu, q, s)

    R, t = _random_rotation(gen), torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    moved = scale * verts @ R.T + t
    means2, quats2, scales2 = bind_to_world(moved, faces, parent, mu, q, s)

    torch.testing.assert_close(means2, scale * means @ R.T + t, rtol=0, atol=1e-10)
    torch.testing.assert_close(scales2, scale * scales, rtol=1e-10, atol=0)
    # orientation: rotation matrices compose (quaternion sign is irrelevant)
    torch.testing.assert_close(quat_to_rotmat(quats2), R @ quat_to_rotmat(quats), rtol=0, atol=1e-10)


def test_non_similarity_deformation_moves_each_gaussian_with_its_own_triangle():
    gen = torch.Generator().manual_seed(2)
    verts, faces = _grid_mesh()
    parent, mu, q, s = _random_gaussians(faces.shape[0], 300, gen)
    # Open the 'jaw': rotate and shift only the bottom rows of the sheet (an expression, not a rigid move).
    lower = verts[:, 1] > 0.02
    R = _random_rotation(gen)
    deformed = verts.clone()
    deformed[lower] = verts[lower] @ R.T + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)
    means, _, _ = bind_to_world(verts, faces, parent, mu, q, s)
    means2, _, _ = bind_to_world(deformed, faces, parent, mu, q, s)
    # Gaussians whose triangle lies wholly in the moved part follow the rigid motion of that part exactly;
    # the others do not (the change is not a global similarity).
    inside = lower[faces[parent]].all(1)
    assert inside.any() and (~inside).any()
    expect = means[inside] @ R.T + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)
    torch.testing.assert_close(means2[inside], expect, rtol=0, atol=1e-10)
    untouched = (~lower[faces[parent]]).all(1)
    torch.testing.assert_close(means2[untouched], means[untouched], rtol=0, atol=0)
    moved_partly = ~inside & ~untouched
    assert (means2[moved_partly] - means[moved_partly]).norm(dim=-1).max() > 1e-3


def test_triangle_frame_is_orthonormal_right_handed_with_z_normal():
    verts, faces = _grid_mesh()
    R, T, k = triangle_frames(verts, faces)
    eye = torch.eye(3, dtype=torch.float64).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, rtol=0, atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[0], dtype=torch.float64))
    v = verts[faces]
    normal = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    torch.testing.assert_close(R[..., 2], normal / normal.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(k, normal.norm(dim=-1).sqrt())
    torch.testing.assert_close(T, v.mean(1))


def test_degenerate_triangle_is_finite_and_collapses():
    verts = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]], requires_grad=True)  # collinear (closed lips)
    faces = torch.tensor([[0, 1, 2]])
    means, quats, scales = bind_to_world(verts, faces, torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.5]]),
                                         torch.tensor([[1.0, 0, 0, 0]]), torch.zeros(1, 3))
    assert torch.isfinite(means).all() and torch.isfinite(quats).all()
    assert scales.abs().max() < 1e-6
    (means.sum() + scales.sum()).backward()
    assert torch.isfinite(verts.grad).all()


def test_rotmat_to_quat_roundtrip_including_180_degree_turns():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(500, 4, generator=gen, dtype=torch.float64)
    specials = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 1, 0]],
                            dtype=torch.float64)
    q = torch.cat([q, specials])
    R = quat_to_rotmat(q / q.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(quat_to_rotmat(rotmat_to_quat(R)), R, rtol=0, atol=1e-9)


def test_quat_multiply_composes_rotations():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(quat_to_rotmat(quat_multiply(a, b)), quat_to_rotmat(a) @ quat_to_rotmat(b))


def test_fill_holes_closes_inner_loops_only_with_consistent_winding():
    verts, faces = _grid_mesh()
    loops = boundary_loops(faces.numpy())
    assert sorted(len(lp) for lp in loops) == [6, 20]  # the hole (2 quads) and the sheet's outline
    curtain = fill_holes(faces.numpy(), verts.numpy())
    assert curtain.shape == (4, 3)  # a 6-vertex loop -> 4 triangles
    closed = np.concatenate([faces.numpy(), curtain])
    loops_after = boundary_loops(closed)
    assert [len(lp) for lp in loops_after] == [20]
    # consistent orientation: every interior edge is used once in each direction
    directed = {}
    for a, b, c in closed:
        for u, v in ((a, b), (b, c), (c, a)):
            directed[(u, v)] = directed.get((u, v), 0) + 1
    assert max(directed.values()) == 1


def test_shell_points_surround_the_back_of_the_head_not_the_face():
    verts, faces = _grid_mesh(8, hole=False)
    v = verts.numpy().astype(np.float32)
    forward = np.array([0.0, 0.0, -1.0])  # the sheet faces -z (the camera of an OpenCV frame at z < 0)
    pts, spacing = shell_points(v, forward, 400)
    assert 100 < len(pts) < 400 and spacing > 0
    depth = (pts - v.mean(0)) @ forward
    assert (depth < -0.02).mean() > 0.4  # most of the shell is behind the face
    # nothing inside the face's outline in front of its back plane: the bound Gaussians cover that part
    rel = pts - v.mean(0)
    in_front = depth > ((v - v.mean(0)) @ forward).min()
    inside = (np.abs(rel[:, 0]) < 0.04) & (np.abs(rel[:, 1]) < 0.04)
    assert not (in_front & inside).any()
    assert math.isfinite(float(pts.sum()))
