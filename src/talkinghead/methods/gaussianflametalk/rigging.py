"""Gaussians rigged to a face mesh (GaussianFlameTalk sec. 3.1, following GaussianAvatars' binding).

Binding (GaussianAvatars sec. 3.2). Every *bound* Gaussian keeps a parent triangle ``f`` and a position
``mu``, rotation ``r`` and log-scale ``s`` expressed in that triangle's local frame. For a deformed mesh
the frame of triangle f is

    origin  T_f = centroid of its three vertices,
    axes    R_f = [e, n x e, n] with e the unit first edge (v1 - v0) and n the unit normal,
    scale   k_f = sqrt(2 * area) (GaussianAvatars' k likewise follows the triangle's size),

and the Gaussian lives in the head frame (our world, ``talkinghead.camera``) at

    mean     = k_f * R_f @ mu + T_f
    rotation = R_f * r                  (quaternion product)
    scale    = k_f * exp(s).

Because (R_f, T_f, k_f) are equivariant to any similarity transform of the mesh (rotation, translation,
uniform scaling), a bound Gaussian follows such a change *exactly*; under an expression it follows its own
triangle, which is what makes the avatar consistent whatever the expression (tested in
``tests/test_rigging.py``).

What the face mesh does not cover. The mediapipe mesh is the face only, with holes at the eyes and the
mouth. We add two things, both our design (GaussianAvatars relies on FLAME's full head and teeth instead):

* **Hole curtains** (:func:`fill_holes`): every boundary loop of the mesh except the outer one (the eyes,
  the mouth) is closed with a zigzag strip of extra triangles between its two arcs, starting at the loop's
  left-most vertex (a mouth or eye corner). The strip stretches as the lips part, so the Gaussians bound to
  it open the inner mouth (teeth, tongue, dark cavity) and collapse to nothing when the lips close; the same
  for the eyeballs under the eyelids. Without curtains one would see through the face into the shell.
* **Rigid shell** (:func:`shell_points`): hair, ears, the back of the head and the top of the neck are
  Gaussians whose means/rotations/scales are given directly in the head frame. World = head frame and the
  per-frame head pose is the viewmat, so these Gaussians move rigidly with the head pose and ignore the
  expression — correct for the skull and hair, an approximation for the jaw line and neck (the torso layer
  of ``prepare`` carries the neck below the head). They are initialised on an ellipsoid around and behind
  the face mesh (the skull), leaving out the part in front of the face, and their colours/opacities are
  learned like any 3DGS splat.

Shapes follow gsplat's habit: ``verts: [..., V, 3]``, ``faces: [F, 3]``.

Rendering (no autograd) binds with :func:`bind_numba`: the same frames, quaternions and products as
:func:`bind_activated`, one compiled loop over the triangles and one over the Gaussians instead of ~60 tensor
operations (~1.2 -> ~0.2 ms a frame; ``tests/test_speed.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def triangle_frames(verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Local frame of every triangle of a (batch of) mesh(es).

    verts: [..., V, 3], faces: [F, 3] long. Returns ``(R, T, k)``: rotations [..., F, 3, 3] whose columns are
    the local x, y, z axes (x along the first edge, z = normal), origins [..., F, 3] (centroids) and scales
    [..., F] = sqrt(2 * area). The area-based scale makes a curtain triangle, and everything bound to it,
    shrink to nothing as a mouth or eye closes.
    """
    v0, v1, v2 = verts[..., faces[:, 0], :], verts[..., faces[:, 1], :], verts[..., faces[:, 2], :]
    e0, e2 = v1 - v0, v2 - v0
    normal = torch.linalg.cross(e0, e2)
    area2 = (normal * normal).sum(-1)
    k = area2.clamp_min(1e-30) ** 0.25
    # The direction of a near-degenerate triangle's normal has unbounded gradients (1 / area): there the
    # frame still moves with the mesh but passes no gradient back through its orientation.
    flat = area2 < 1e-6 * ((e0 * e0).sum(-1) + (e2 * e2).sum(-1)) ** 2
    normal = torch.where(flat[..., None], normal.detach(), normal)
    z = F.normalize(normal, dim=-1, eps=1e-20)
    x = F.normalize(e0 - (e0 * z).sum(-1, keepdim=True) * z, dim=-1, eps=1e-20)
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z], dim=-1)
    T = (v0 + v1 + v2) / 3.0
    return R, T, k


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (w, x, y, z), numerically safe everywhere."""
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    # Shepperd's method: take the largest of the four squared components as the pivot to avoid cancellation.
    cand = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    pivot = cand.argmax(dim=-1, keepdim=True)
    s = torch.sqrt(cand.gather(-1, pivot).clamp_min(1e-12)).squeeze(-1) * 2.0  # 4 * |q_pivot|
    w_ = torch.stack([s / 4, (R[..., 2, 1] - R[..., 1, 2]) / s, (R[..., 0, 2] - R[..., 2, 0]) / s,
                      (R[..., 1, 0] - R[..., 0, 1]) / s], -1)  # fmt: skip
    x_ = torch.stack([(R[..., 2, 1] - R[..., 1, 2]) / s, s / 4, (R[..., 0, 1] + R[..., 1, 0]) / s,
                      (R[..., 0, 2] + R[..., 2, 0]) / s], -1)  # fmt: skip
    y_ = torch.stack([(R[..., 0, 2] - R[..., 2, 0]) / s, (R[..., 0, 1] + R[..., 1, 0]) / s, s / 4,
                      (R[..., 1, 2] + R[..., 2, 1]) / s], -1)  # fmt: skip
    z_ = torch.stack([(R[..., 1, 0] - R[..., 0, 1]) / s, (R[..., 0, 2] + R[..., 2, 0]) / s,
                      (R[..., 1, 2] + R[..., 2, 1]) / s, s / 4], -1)  # fmt: skip
    q = torch.stack([w_, x_, y_, z_], dim=-2).gather(-2, pivot[..., None].expand(*pivot.shape[:-1], 1, 4))
    return F.normalize(q.squeeze(-2), dim=-1)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b of quaternions [..., 4] (w, x, y, z): rotate by b, then by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)  # fmt: skip


def bind_to_world(
    verts: Tensor,  # [..., V, 3] deformed mesh in the head frame
    faces: Tensor,  # [F, 3] long
    parent: Tensor,  # [N] long, parent triangle of each bound Gaussian
    local_means: Tensor,  # [N, 3] in the parent triangle's frame, in units of k
    local_quats: Tensor,  # [N, 4] (w, x, y, z), any norm
    local_log_scales: Tensor,  # [N, 3] log of the scale in units of k
) -> tuple[Tensor, Tensor, Tensor]:
    """World (head-frame) means [..., N, 3], unit quats [..., N, 4] and linear scales [..., N, 3] of bound
    Gaussians for the given mesh (GaussianAvatars' binding, see module docstring)."""
    return bind_activated(verts, faces, parent, local_means, F.normalize(local_quats, dim=-1),
                          torch.exp(local_log_scales))


def bind_activated(
    verts: Tensor,  # [..., V, 3]
    faces: Tensor,  # [F, 3] long
    parent: Tensor,  # [N] long
    local_means: Tensor,  # [N, 3]
    local_unit_quats: Tensor,  # [N, 4] unit (w, x, y, z)
    local_scales: Tensor,  # [N, 3] linear, in units of k
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bind_to_world` with the local rotations and scales already activated (a renderer computes them
    once per avatar: they do not depend on the mesh)."""
    # Frames once per triangle ([..., F, ...]; several Gaussians share a parent), then gathered per Gaussian.
    R, T, k = triangle_frames(verts, faces)
    q = rotmat_to_quat(R)
    R, T, k, q = R[..., parent, :, :], T[..., parent, :], k[..., parent], q[..., parent, :]
    means = k[..., None] * (R @ local_means[..., None]).squeeze(-1) + T
    quats = quat_multiply(q, local_unit_quats)
    scales = k[..., None] * local_scales
    return means, quats, scales


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Boundary loops of a triangle mesh: a list of vertex-index arrays, each one closed loop in order.

    faces: [F, 3]. An edge used by exactly one triangle is on the boundary; a manifold boundary vertex has
    exactly one outgoing boundary edge, which is followed until the loop closes.
    """
    count: dict[tuple[int, int], int] = {}
    directed: dict[int, int] = {}
    for a, b, c in np.asarray(faces, dtype=np.int64):
        for u, v in ((a, b), (b, c), (c, a)):
            key = (min(u, v), max(u, v))
            count[key] = count.get(key, 0) + 1
    for a, b, c in np.asarray(faces, dtype=np.int64):
        for u, v in ((a, b), (b, c), (c, a)):
            if count[(min(u, v), max(u, v))] == 1:
                directed[int(u)] = int(v)
    loops, seen = [], set()
    for start in sorted(directed):
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen and v in directed:
            seen.add(v)
            loop.append(v)
            v = directed[v]
        if len(loop) >= 3:
            loops.append(np.array(loop, dtype=np.int64))
    return loops


def fill_holes(faces: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Curtain triangles [H, 3] closing every boundary loop of the mesh except the longest (outer) one.

    verts: [V, 3] a reference (neutral) mesh, used to start each zigzag at the loop's left-most vertex
    (smallest x: a mouth or eye corner), so that the strip runs between the upper and lower arcs. The
    winding follows the loop's, so curtain normals point the same way as the surrounding face.
    """
    loops = boundary_loops(faces)
    if len(loops) < 2:
        return np.zeros((0, 3), np.int32)
    loops.sort(key=len)
    tris = []
    for loop in loops[:-1]:
        loop = np.roll(loop, -int(np.argmin(verts[loop, 0])))
        i, j = 0, len(loop) - 1  # walk the two arcs from the corner towards the other end
        forward = True
        while j - i > 1:
            if forward:
                tris.append((loop[i], loop[j], loop[i + 1]))  # reversed boundary edge: same orientation
                i += 1
            else:
                tris.append((loop[j], loop[j - 1], loop[i]))
                j -= 1
            forward = not forward
    return np.asarray(tris, dtype=np.int32).reshape(-1, 3)


def face_forward(verts: np.ndarray, viewmat: np.ndarray) -> np.ndarray:
    """Unit direction [3] from the face mesh towards the camera of ``viewmat`` (in the head frame)."""
    cam = -viewmat[:3, :3].T @ viewmat[:3, 3]
    d = cam - verts.mean(0)
    return d / np.linalg.norm(d)


def shell_points(
    verts: np.ndarray,  # [V, 3] neutral face mesh in the head frame
    forward: np.ndarray,  # [3] unit direction the face looks at
    n: int,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Initial means [M, 3] (M <= n) of the rigid shell and a typical spacing between them.

    The skull is modelled as an ellipsoid centred behind the face: its half-width is the face mesh's
    (the mesh spans cheek to cheek), its depth ~1.1x that and it extends above the mesh for the hair.
    Points in front of the face plane and inside the face's outline are left out (the bound Gaussians are
    there). The sampling is a Fibonacci sphere, deterministic for a given ``seed``.
    """
    centre = verts.mean(0)
    up = np.array([0.0, -1.0, 0.0])  # image y points down, and the head frame follows the camera convention
    up = up - up @ forward * forward
    up /= np.linalg.norm(up)
    right = np.cross(up, forward)
    rel = verts - centre
    half_w = 0.5 * np.ptp(rel @ right)
    half_h = 0.5 * np.ptp(rel @ up)
    head_c = centre - forward * 0.9 * half_w + up * 0.15 * half_h
    axes = np.array([1.15 * half_w, 1.25 * half_h, 1.15 * half_w])  # right, up, forward radii
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i + seed
    unit = np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)
    local = unit * axes
    pts = head_c + local[:, :1] * right + local[:, 1:2] * up + local[:, 2:] * forward
    # leave out what lies in front of the face's back plane and within its outline (the face covers it)
    depth_face = (rel @ forward).min()
    in_front = (pts - centre) @ forward > depth_face
    inside = (np.abs((pts - centre) @ right) < 0.9 * half_w) & (np.abs((pts - centre) @ up) < 0.9 * half_h)
    pts = pts[~(in_front & inside)]
    spacing = float(np.sqrt(4 * math.pi * axes.mean() ** 2 / n))
    return pts.astype(np.float32), spacing


_bind_kernel = None


def _compile_bind():
    """:func:`bind_activated` for inference as one Numba loop (numba imported lazily: an optional dependency)."""
    global _bind_kernel
    if _bind_kernel is not None:
        return _bind_kernel
    import numba

    @numba.njit(cache=True, nogil=True)
    def bind(verts, faces, parent, local_means, local_quats, local_scales, means, quats, scales):  # pragma: no cover
        nf = faces.shape[0]
        R = np.empty((nf, 3, 3))
        T = np.empty((nf, 3))
        k = np.empty(nf)
        q = np.empty((nf, 4))
        e0, e2, nrm, x = np.empty(3), np.empty(3), np.empty(3), np.empty(3)
        cand = np.empty(4)
        for f in range(nf):  # triangle_frames + rotmat_to_quat, triangle by triangle
            i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
            for c in range(3):
                e0[c] = verts[i1, c] - verts[i0, c]
                e2[c] = verts[i2, c] - verts[i0, c]
                T[f, c] = (verts[i0, c] + verts[i1, c] + verts[i2, c]) / 3.0
            nrm[0] = e0[1] * e2[2] - e0[2] * e2[1]
            nrm[1] = e0[2] * e2[0] - e0[0] * e2[2]
            nrm[2] = e0[0] * e2[1] - e0[1] * e2[0]
            area2 = nrm[0] * nrm[0] + nrm[1] * nrm[1] + nrm[2] * nrm[2]
            k[f] = max(area2, 1e-30) ** 0.25
            inv = 1.0 / max(math.sqrt(area2), 1e-20)  # F.normalize's eps
            for c in range(3):
                R[f, c, 2] = nrm[c] * inv  # z: the unit normal
            d = e0[0] * R[f, 0, 2] + e0[1] * R[f, 1, 2] + e0[2] * R[f, 2, 2]
            for c in range(3):
                x[c] = e0[c] - d * R[f, c, 2]
            inv = 1.0 / max(math.sqrt(x[0] * x[0] + x[1] * x[1] + x[2] * x[2]), 1e-20)
            for c in range(3):
                R[f, c, 0] = x[c] * inv
            R[f, 0, 1] = R[f, 1, 2] * R[f, 2, 0] - R[f, 2, 2] * R[f, 1, 0]  # y = z x x
            R[f, 1, 1] = R[f, 2, 2] * R[f, 0, 0] - R[f, 0, 2] * R[f, 2, 0]
            R[f, 2, 1] = R[f, 0, 2] * R[f, 1, 0] - R[f, 1, 2] * R[f, 0, 0]
            m = R[f]
            cand[0] = 1 + m[0, 0] + m[1, 1] + m[2, 2]
            cand[1] = 1 + m[0, 0] - m[1, 1] - m[2, 2]
            cand[2] = 1 - m[0, 0] + m[1, 1] - m[2, 2]
            cand[3] = 1 - m[0, 0] - m[1, 1] + m[2, 2]
            p = 0
            for j in range(1, 4):
                if cand[j] > cand[p]:
                    p = j
            s = math.sqrt(max(cand[p], 1e-12)) * 2.0
            if p == 0:
                qw, qx, qy, qz = s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s
            elif p == 1:
                qw, qx, qy, qz = (m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s
            elif p == 2:
                qw, qx, qy, qz = (m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s
            else:
                qw, qx, qy, qz = (m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4
            inv = 1.0 / max(math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)
            q[f, 0], q[f, 1], q[f, 2], q[f, 3] = qw * inv, qx * inv, qy * inv, qz * inv
        for i in range(parent.shape[0]):  # each bound Gaussian in its parent's frame
            f = parent[i]
            for r in range(3):
                means[i, r] = k[f] * (R[f, r, 0] * local_means[i, 0] + R[f, r, 1] * local_means[i, 1]
                                      + R[f, r, 2] * local_means[i, 2]) + T[f, r]
                scales[i, r] = k[f] * local_scales[i, r]
            aw, ax, ay, az = q[f, 0], q[f, 1], q[f, 2], q[f, 3]
            bw, bx, by, bz = local_quats[i, 0], local_quats[i, 1], local_quats[i, 2], local_quats[i, 3]
            quats[i, 0] = aw * bw - ax * bx - ay * by - az * bz
            quats[i, 1] = aw * bx + ax * bw + ay * bz - az * by
            quats[i, 2] = aw * by - ax * bz + ay * bw + az * bx
            quats[i, 3] = aw * bz + ax * by - ay * bx + az * bw

    _bind_kernel = bind
    return bind


def bind_numba(verts: Tensor, faces: Tensor, parent: Tensor, local_means: Tensor, local_unit_quats: Tensor,
               local_scales: Tensor, out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bind_activated` of one mesh [V, 3] without autograd, as one compiled loop (float64 inside, results
    in ``local_means``' dtype; a near-degenerate triangle's frame may come out as the other sign of its
    quaternion, the same rotation). ``out``: (means, quats, scales) tensors to write into (e.g. the first rows
    of the frame's full arrays, so no concatenation follows); they are returned."""
    n, dtype = parent.shape[0], local_means.dtype
    if out is None:
        out = (torch.empty(n, 3, dtype=dtype), torch.empty(n, 4, dtype=dtype), torch.empty(n, 3, dtype=dtype))
    f64 = lambda t: np.ascontiguousarray(t.detach().numpy(), dtype=np.float64)  # noqa: E731
    _compile_bind()(f64(verts), faces.numpy(), parent.numpy(), f64(local_means), f64(local_unit_quats),
                    f64(local_scales), *(t.numpy() for t in out))
    return out
