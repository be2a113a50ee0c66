"""Initial Gaussians on and around the face model: where every Gaussian method places its starting points.

* :func:`points_on_triangles` -- one uniform point per listed triangle (with its barycentric weights);
* :func:`initial_points` -- positions mu_c from the dataset's face model (GaussianTalker sec. 4.4.1: 3DMM
  vertices instead of SfM points; DEGSTalk takes its face and inner-mouth parts), in three parts, in order:

  - face: the mesh vertices plus points sampled uniformly on its triangles by area, lips and mouth-corner
    triangles weighted ``lip_weight`` times (the mouth is what the audio moves; it needs many Gaussians);
  - inner mouth: points in the slab just behind the inner-lip ring (teeth, tongue, dark cavity); bound
    between the inner lips: a point a fraction t down the slab (0 at its top edge, 1 at its bottom) moves
    as (1 - t) x the nearest upper inner-lip vertex + t x the nearest lower one, so under an opening
    expression the cavity stretches with the lips (upper teeth with the upper lip, lower teeth and tongue
    with the jaw) instead of staying a closed slit behind them;
  - head volume (hair, ears, sides and top of the head): a thick ellipsoidal shell sized from the face's
    extent, without the part in front of the face surface and without the far back, which a talking-head
    video (near-frontal by construction) never shows;
* :func:`base_log_scales` -- starting footprints from the points' spacing;
* :func:`project_colors` -- starting colours: the pixel of a frame each point projects to;
* :func:`mesh_displacement` -- where a point bound to the mesh moves under a tracked expression (the
  barycentric mix of its triangle's vertex displacements): the target of a method's lip-geometry guidance.

The face model is the person's neutral mediapipe mesh in head coordinates (metres). Everything is drawn from
a seeded generator, so the same dataset and config give the same points.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from talkinghead.face.landmarks import (FACE_OVAL, LIPS_INNER, LIPS_INNER_LOWER, LIPS_INNER_UPPER, LIPS_OUTER,
                                        NOSE_TIP)


def points_on_triangles(verts: np.ndarray, tris: np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One uniform random point on each listed triangle: (points [n, 3], barycentric weights [n, 3]).

    verts: [V, 3]; tris: [n, 3] vertex ids (a triangle listed k times gets k points). Draws 2n numbers
    from ``rng`` (first coordinates, then second), folding the unit square onto the triangle."""
    a, b = rng.random((2, len(tris), 1))
    flip = (a + b) > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    v0, v1, v2 = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    return v0 + a * (v1 - v0) + b * (v2 - v0), np.concatenate([1 - a - b, a, b], 1)

def initial_points(neutral: np.ndarray, triangles: np.ndarray, num: int, face_fraction: float,
                   mouth_fraction: float, lip_weight: float, seed: int = 0, binding: bool = False):
    """[num, 3] float32 canonical positions from the neutral mesh [V, 3] and its triangles [F, 3].

    With ``binding``, also each point's place on the mesh: vertex ids [num, 3] (int64) and barycentric
    weights [num, 3] (float32; a vertex point is (v, v, v) with weights (1, 0, 0), an inner-mouth point
    (upper, lower, lower) with (1 - t, t, 0) between its nearest inner-lip vertices; head points, which
    follow no vertex, have weights 0)."""
    rng = np.random.default_rng(seed)
    v = np.asarray(neutral, np.float64)
    tri = np.asarray(triangles, np.int64)
    # "Forward" (towards the camera) is where the nose tip sticks out of the face.
    front = np.sign(v[NOSE_TIP, 2] - v[list(FACE_OVAL), 2].mean()) or -1.0
    n_face = max(len(v), int(num * face_fraction))
    n_mouth = int(num * mouth_fraction)
    n_head = num - n_face - n_mouth

    e0, e1 = v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]]
    area = 0.5 * np.linalg.norm(np.cross(e0, e1), axis=1)
    lips = np.zeros(len(v), bool)
    lips[list(LIPS_OUTER) + list(LIPS_INNER)] = True
    w = area * np.where(lips[tri].any(1), lip_weight, 1.0)
    s_tri = tri[rng.choice(len(tri), size=n_face - len(v), p=w / w.sum())]  # area x lip weight
    sampled, s_bary = points_on_triangles(v, s_tri, rng)
    face = np.concatenate([v, sampled])

    ring = v[list(LIPS_INNER)]
    centre = ring.mean(0)
    half = np.maximum((ring.max(0) - ring.min(0)) / 2, 1e-3)
    width = float(v[:, 0].max() - v[:, 0].min())
    r = np.sqrt(rng.random(n_mouth))
    ang = rng.random(n_mouth) * 2 * np.pi
    mouth = np.stack([centre[0] + half[0] * r * np.cos(ang),
                      centre[1] + max(half[1], 0.08 * half[0]) * r * np.sin(ang),
                      centre[2] - front * rng.random(n_mouth) * 0.12 * width], 1)
    upper, lower = np.array(LIPS_INNER_UPPER), np.array(LIPS_INNER_LOWER)
    down = np.sign(v[lower, 1].mean() - v[upper, 1].mean()) or 1.0  # +y is down the face when lower lip y > upper
    t = 0.5 + 0.5 * down * r * np.sin(ang)  # 0 at the slab's upper edge, 1 at its lower edge

    head = _head_shell(v, front, n_head, rng)
    points = np.concatenate([face, mouth, head]).astype(np.float32)
    if not binding:
        return points
    ids = np.zeros((num, 3), np.int64)
    bary = np.zeros((num, 3), np.float32)
    ids[:len(v)] = np.arange(len(v))[:, None]
    bary[:len(v), 0] = 1.0
    ids[len(v):n_face] = s_tri
    bary[len(v):n_face] = s_bary
    near_up = upper[np.abs(mouth[:, None, 0] - v[upper][None, :, 0]).argmin(1)]
    near_lo = lower[np.abs(mouth[:, None, 0] - v[lower][None, :, 0]).argmin(1)]
    ids[n_face:n_face + n_mouth] = np.stack([near_up, near_lo, near_lo], 1)
    bary[n_face:n_face + n_mouth] = np.stack([1 - t, t, np.zeros_like(t)], 1)
    return points, ids, bary


def _head_shell(v: np.ndarray, front: float, n: int, rng) -> np.ndarray:
    lo, hi = v.min(0), v.max(0)
    width, height = hi[0] - lo[0], hi[1] - lo[1]
    radii = np.array([0.62 * width, 0.62 * height, 0.75 * width])
    oval = v[list(FACE_OVAL)]
    centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2 - 0.12 * height,
                       oval[:, 2].mean() - front * 0.5 * radii[2]])
    out = np.zeros((0, 3))
    while len(out) < n:
        d = rng.normal(size=(2 * n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        # The far back of the head never faces a frontal camera: keep the front and the sides.
        d = d[d[:, 2] * front > -0.35]
        p = centre + d * radii * rng.uniform(0.8, 1.0, size=(len(d), 1))
        # Drop points in front of the face surface (they would hide it): nearest vertex in the image plane.
        dxy = np.linalg.norm(p[:, None, :2] - v[None, :, :2], axis=-1)
        near = dxy.argmin(1)
        covered = dxy[np.arange(len(p)), near] < 0.08 * width
        ahead = (p[:, 2] - v[near, 2]) * front > -0.01 * width
        out = np.concatenate([out, p[~(covered & ahead)]])
    return out[:n]


def base_log_scales(points: Tensor, k: int = 3, factor: float = 0.6, chunk: int = 2048) -> Tensor:
    """[N, 1] log of ``factor`` x the RMS distance to the k nearest neighbours.

    3DGS starts at factor 1; smaller starting footprints (still overlapping) keep the number of
    (Gaussian, pixel) pairs, hence the CPU rasterizer's time, down from the first iteration."""
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], points)
        nn_d = d.topk(k + 1, largest=False).values[:, 1:]
        out.append(torch.log(factor * nn_d.pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-5)))
    return torch.cat(out)


def project_colors(points: np.ndarray, viewmat: np.ndarray, K: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Colour [N, 3] of the pixel each head-frame point projects to (mid-grey when outside the image)."""
    from talkinghead.camera import project

    uv = project(points, viewmat, K)
    H, W = image.shape[:2]
    u = np.floor(uv[:, 0]).astype(np.int64)
    v = np.floor(uv[:, 1]).astype(np.int64)
    ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    out = np.full((len(points), 3), 0.5, np.float32)
    out[ok] = image[v[ok], u[ok]]
    return np.clip(out, 0.02, 0.98)


def mesh_displacement(expression: Tensor, basis: Tensor, ids: Tensor, bary: Tensor) -> Tensor:
    """[..., M, 3] displacement (metres, head frame) of M mesh-bound points under ``expression`` [..., E].

    basis: [E, V, 3] the face model's expression basis; ids [M, 3] vertex ids and bary [M, 3] barycentric
    weights of each point (:func:`initial_points` with ``binding``; a vertex point is (v, v, v), (1, 0, 0))."""
    disp = torch.einsum("...e,evc->...vc", expression, basis)  # [..., V, 3]
    return (disp[..., ids, :] * bary[..., None]).sum(-2)
