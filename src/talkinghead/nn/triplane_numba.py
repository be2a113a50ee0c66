"""The triplane lookup of :mod:`talkinghead.nn.triplane` as Numba loops, forward and backward.

``F.grid_sample`` is the reference (:meth:`Triplane.forward` with ``fast=False``). On a CPU its backward
scatters every (point, corner, channel) gradient with atomic adds through a general N-d kernel: ~30 ms of a
GaussianTalker iteration for 5000 points on three resolutions (bench/bench_speed.py, issue 16), ~4x its
forward. The same bilinear interpolation written as one loop per resolution (three planes, the Hadamard
product of their features, the gradients of the planes and of the coordinates) costs ~1 ms each way.

Semantics are grid_sample's with ``mode="bilinear", align_corners=True, padding_mode="zeros"``: a coordinate
u in [-1, 1] maps to the pixel position (u + 1) / 2 (R - 1); the four neighbouring texels are weighted
bilinearly, and a neighbour outside the plane contributes zero (it only happens at u = 1 exactly, with weight
0). Interpolation and the coordinates' gradient sums run in float64 (the planes' gradients sum in float32, as
grid_sample's), results come in the planes' dtype: the two paths agree to float rounding (``tests/test_speed.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from talkinghead.render.raster_numba import available

_kernels = None


def _compile():
    """(forward, backward, channels_last, channels_first), compiled on first use (numba imported lazily: an
    optional dependency)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import numba

    @numba.njit(cache=True, nogil=True)
    def corners(u, R):  # pragma: no cover - compiled
        """Along one axis for coordinate u (align_corners=True): texel indices (lo, hi), the weight of hi, and
        whether each texel is on the plane (1.0 / 0.0). An off-plane texel (hi = R, only at u = 1) gets an
        index clamped into range and counts as 0: grid_sample's zero padding."""
        x = (u + 1.0) * 0.5 * (R - 1)
        x0 = int(math.floor(x))
        x1 = x0 + 1
        m0 = 1.0 if 0 <= x0 < R else 0.0
        m1 = 1.0 if 0 <= x1 < R else 0.0
        return min(max(x0, 0), R - 1), min(max(x1, 0), R - 1), x - math.floor(x), m0, m1

    @numba.njit(cache=True, nogil=True)
    def forward(u, planes, pairs):  # pragma: no cover - compiled
        """u [N, 3] in [-1, 1], planes [3, R, R, C] (channels last) -> (product [N, C], features [3, N, C])."""
        n = u.shape[0]
        P, R, C = planes.shape[0], planes.shape[1], planes.shape[3]
        feats = np.empty((P, n, C))
        prod = np.ones((n, C))
        for p in range(P):
            for i in range(n):
                x0, x1, wx, mx0, mx1 = corners(u[i, pairs[p, 0]], R)  # plane column <- first coordinate
                y0, y1, wy, my0, my1 = corners(u[i, pairs[p, 1]], R)
                w00, w01 = (1 - wx) * (1 - wy) * mx0 * my0, wx * (1 - wy) * mx1 * my0
                w10, w11 = (1 - wx) * wy * mx0 * my1, wx * wy * mx1 * my1
                for c in range(C):
                    f = (w00 * planes[p, y0, x0, c] + w01 * planes[p, y0, x1, c]
                         + w10 * planes[p, y1, x0, c] + w11 * planes[p, y1, x1, c])
                    feats[p, i, c] = f
                    prod[i, c] *= f
        return prod, feats

    @numba.njit(cache=True, nogil=True)
    def backward(u, planes, pairs, feats, grad):  # pragma: no cover - compiled
        """Gradients of sum(grad * product) w.r.t. the planes [3, R, R, C] (float32 sums, as grid_sample's) and
        u [N, 3]. Point by point: the three planes' d product / d feature (the other two planes' features) for
        all channels first, then each plane's four texels as rows of C channels."""
        n = u.shape[0]
        R, C = planes.shape[1], planes.shape[3]
        g_planes = np.zeros(planes.shape, np.float32)
        g_u = np.zeros((n, 3))
        half = 0.5 * (R - 1)  # d(pixel position) / du
        g_feat = np.empty((3, C))
        for i in range(n):
            for c in range(C):
                g, f0, f1, f2 = grad[i, c], feats[0, i, c], feats[1, i, c], feats[2, i, c]
                g_feat[0, c] = g * f1 * f2
                g_feat[1, c] = g * f0 * f2
                g_feat[2, c] = g * f0 * f1
            for p in range(3):
                x0, x1, wx, mx0, mx1 = corners(u[i, pairs[p, 0]], R)
                y0, y1, wy, my0, my1 = corners(u[i, pairs[p, 1]], R)
                m00, m01, m10, m11 = mx0 * my0, mx1 * my0, mx0 * my1, mx1 * my1
                w00, w01 = (1 - wx) * (1 - wy) * m00, wx * (1 - wy) * m01
                w10, w11 = (1 - wx) * wy * m10, wx * wy * m11
                t00, t01, t10, t11 = planes[p, y0, x0], planes[p, y0, x1], planes[p, y1, x0], planes[p, y1, x1]
                g00, g01 = g_planes[p, y0, x0], g_planes[p, y0, x1]
                g10, g11 = g_planes[p, y1, x0], g_planes[p, y1, x1]
                gx = gy = 0.0
                for c in range(C):
                    g = g_feat[p, c]
                    v00, v01, v10, v11 = t00[c] * m00, t01[c] * m01, t10[c] * m10, t11[c] * m11
                    gx += g * ((1 - wy) * (v01 - v00) + wy * (v11 - v10))  # d f / d (pixel x)
                    gy += g * ((1 - wx) * (v10 - v00) + wx * (v11 - v01))
                    g00[c] += g * w00
                    g01[c] += g * w01
                    g10[c] += g * w10
                    g11[c] += g * w11
                g_u[i, pairs[p, 0]] += gx * half
                g_u[i, pairs[p, 1]] += gy * half
        return g_planes, g_u

    @numba.njit(cache=True, nogil=True)
    def channels_last(planes):  # pragma: no cover - compiled
        """[P, C, R, R] -> a [P, R, R, C] copy, one image row at a time (its R x C block stays in L1): torch's
        permute-copy of the 128^2 planes (a stride-R^2 gather per channel) took ~4 ms, this ~0.3 ms."""
        P, C, H, W = planes.shape
        out = np.empty((P, H, W, C), planes.dtype)
        for p in range(P):
            for y in range(H):
                for c in range(C):
                    for x in range(W):
                        out[p, y, x, c] = planes[p, c, y, x]
        return out

    @numba.njit(cache=True, nogil=True)
    def channels_first(planes):  # pragma: no cover - compiled
        """[P, R, R, C] -> a [P, C, R, R] copy (the inverse of :func:`channels_last`): the planes' gradient in
        the parameter's own layout, which autograd then keeps without another copy."""
        P, H, W, C = planes.shape
        out = np.empty((P, C, H, W), planes.dtype)
        for p in range(P):
            for y in range(H):
                for c in range(C):
                    for x in range(W):
                        out[p, c, y, x] = planes[p, y, x, c]
        return out

    _kernels = (forward, backward, channels_last, channels_first)
    return _kernels


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)


class _Sample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, planes, pairs):
        fwd, _, channels_last, _ = _compile()
        u_np = _np(u)
        # Channels last: a texel's C features are one cache line, not C lines R^2 apart.
        planes_np = channels_last(planes.detach().cpu().numpy())
        prod, feats = fwd(u_np, planes_np, pairs)
        ctx.state = (u_np, planes_np, pairs, feats)
        return torch.from_numpy(prod).to(planes.dtype)

    @staticmethod
    def backward(ctx, grad):
        _, bwd, _, channels_first = _compile()
        u_np, planes_np, pairs, feats = ctx.state
        g_planes, g_u = bwd(u_np, planes_np, pairs, feats, _np(grad))
        g_planes = torch.from_numpy(channels_first(g_planes)).to(grad.dtype)  # back to [3, C, R, R]
        return torch.from_numpy(g_u).to(grad.dtype), g_planes, None


def usable(u: Tensor, planes: Tensor) -> bool:
    """Whether :func:`sample` applies: numba installed, CPU tensors, no double backward needed."""
    return available() and u.device.type == "cpu" and planes.device.type == "cpu"


def sample(u: Tensor, planes: Tensor, pairs: np.ndarray) -> Tensor:
    """Hadamard product [N, C] of the bilinear lookups of u [N, 3] (in [-1, 1]) in planes [3, C, R, R], plane p
    indexed (column, row) by the coordinates ``pairs[p]`` ([P, 2] int64); differentiable in u and planes."""
    return _Sample.apply(u, planes, pairs)
