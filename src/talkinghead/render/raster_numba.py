"""The compositing of :mod:`talkinghead.render.raster_torch` as two Numba loops: same footprints, same math, no sort.

:mod:`.raster_torch` makes every (pixel, Gaussian) pair a tensor element and sorts the pairs by pixel to form
each pixel's front-to-back list. A compiled loop needs neither: visiting the Gaussians front to back (the
order they are given in) and updating each pixel's transmittance in place composites every pixel's list in
depth order -- 3DGS's per-pixel loop with the two loops swapped. Per pixel it keeps only the transmittance and
the last Gaussian that contributed, so memory is O(pixels + Gaussians): no pair is stored.

* footprint: the rows and, per row, the run of pixels where ``alpha >= 1/255`` can hold, in closed form, as
  :func:`.raster_torch._spans` computes them;
* forward: per pixel of the footprint, ``alpha = min(o exp(-sigma), 0.99)``, skipped below 1/255; the pixel
  stops (3DGS's early termination) at the first Gaussian that would bring its transmittance below 1e-4; else
  ``out += alpha T f`` and ``T *= 1 - alpha``;
* backward: the same pairs back to front, recovering each pair's ``T`` from the pixel's final transmittance
  by division (as 3DGS's CUDA backward does), with the running sum of the weighted feature gradients behind
  it; gradients go straight to the Gaussian's centre, conic, opacity and features (sigma is a quadratic in the
  pixel offset, so they are closed-form sums).

Transmittance and sums are float64 inside (the torch path's scan is float64 too), so the two compositors agree
to float rounding (``tests/test_render_raster.py``). Numba compiles the two loops on first use (a few seconds,
cached on disk); without Numba installed, :func:`available` is False and the torch compositor is used.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
from torch import Tensor

from .projection import ALPHA_MIN
from .raster_torch import _EDGE as EDGE
from .raster_torch import ALPHA_MAX, T_MIN

Q_MAX = -math.log(ALPHA_MIN)  # exp(-q) < 1/255 beyond this: no exp needed to skip a pair

_kernels = None


def available() -> bool:
    """True when numba is installed (nothing is imported or compiled)."""
    return importlib.util.find_spec("numba") is not None


def _compile():
    """The two kernels, compiled on first call (numba imported lazily: it is an optional dependency)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import numba

    @numba.njit(cache=True, nogil=True)
    def rows(u, v, a, b, c, o, height):  # pragma: no cover - compiled
        """First row, end row and the footprint constants of one Gaussian (as raster_torch._spans)."""
        det = a * c - b * b
        thr = max(math.log(o * 255.0), 0.0)  # alpha >= 1/255  <=>  sigma <= thr
        ext_y = math.sqrt(2.0 * thr * a / det)
        y0 = min(max(math.ceil(v - ext_y - 0.5), 0), height)
        y1 = min(max(math.floor(v + ext_y - 0.5) + 1, 0), height)
        return int(y0), int(y1), det, thr

    @numba.njit(cache=True, nogil=True)
    def span(u, v, a, b, det, thr, y, width):  # pragma: no cover - compiled
        """Pixels [x0, x1) of row y where the Gaussian's alpha can reach 1/255, and dy."""
        dy = y + 0.5 - v
        half = math.sqrt(max(2.0 * a * thr - det * dy * dy, 0.0)) / a
        centre = u - b / a * dy - 0.5
        x0 = min(max(math.ceil(centre - half - EDGE), 0), width)
        x1 = min(max(math.floor(centre + half + EDGE) + 1, 0), width)
        return int(x0), int(x1), dy

    @numba.njit(cache=True, nogil=True)
    def forward(means2d, conics, opac, feats, width, height):  # pragma: no cover - compiled
        n, F = feats.shape
        out = np.zeros((width * height, F))
        T = np.ones(width * height)
        done = np.zeros(width * height, np.bool_)
        last = np.full(width * height, -1, np.int64)  # the last Gaussian that contributed to the pixel
        for g in range(n):
            u, v = means2d[g, 0], means2d[g, 1]
            a, b, c, o = conics[g, 0], conics[g, 1], conics[g, 2], opac[g]
            y0, y1, det, thr = rows(u, v, a, b, c, o, height)
            log_o = math.log(o)
            for y in range(y0, y1):
                x0, x1, dy = span(u, v, a, b, det, thr, y, width)
                B = b * dy
                C = 0.5 * c * dy * dy - log_o
                for x in range(x0, x1):
                    p = y * width + x
                    if done[p]:
                        continue
                    dx = x + 0.5 - u
                    q = (0.5 * a * dx + B) * dx + C  # sigma - log(o)
                    if q > Q_MAX:
                        continue
                    raw = math.exp(-q)
                    if raw < ALPHA_MIN:
                        continue
                    alpha = min(raw, ALPHA_MAX)
                    t_after = T[p] * (1.0 - alpha)
                    if t_after < T_MIN:
                        done[p] = True
                        continue
                    w = alpha * T[p]
                    for f in range(F):
                        out[p, f] += w * feats[g, f]
                    T[p] = t_after
                    last[p] = g
        return out, T, last

    @numba.njit(cache=True, nogil=True)
    def backward(means2d, conics, opac, feats, width, height, T_final, last, grad_out):  # pragma: no cover
        n, F = feats.shape
        T = T_final.copy()
        behind = np.zeros(width * height)  # sum of w_j dL/dw_j over the Gaussians behind, per pixel
        g_feats = np.zeros((n, F))
        g_means2d = np.zeros((n, 2))
        g_conics = np.zeros((n, 3))
        g_opac = np.zeros(n)
        for g in range(n - 1, -1, -1):
            u, v = means2d[g, 0], means2d[g, 1]
            a, b, c, o = conics[g, 0], conics[g, 1], conics[g, 2], opac[g]
            y0, y1, det, thr = rows(u, v, a, b, c, o, height)
            log_o = math.log(o)
            gu = gv = ga = gb = gc = go = 0.0
            for y in range(y0, y1):
                x0, x1, dy = span(u, v, a, b, det, thr, y, width)
                B = b * dy
                C = 0.5 * c * dy * dy - log_o
                for x in range(x0, x1):
                    p = y * width + x
                    if g > last[p]:
                        continue  # behind where the pixel stopped (or it never started)
                    dx = x + 0.5 - u
                    q = (0.5 * a * dx + B) * dx + C
                    if q > Q_MAX:
                        continue
                    raw = math.exp(-q)
                    if raw < ALPHA_MIN:
                        continue
                    alpha = min(raw, ALPHA_MAX)
                    t = T[p] / (1.0 - alpha)  # transmittance in front of this Gaussian
                    w = alpha * t
                    g_w = 0.0
                    for f in range(F):
                        g_feats[g, f] += w * grad_out[p, f]
                        g_w += grad_out[p, f] * feats[g, f]
                    if raw < ALPHA_MAX:  # alpha = o exp(-sigma) unclamped: d alpha / d q = -alpha
                        g_q = -(t * g_w - behind[p] / (1.0 - alpha)) * alpha
                        # q = a dx^2 / 2 + b dx dy + c dy^2 / 2 - log o, dx = x + 0.5 - u, dy = y + 0.5 - v
                        gu -= g_q * (a * dx + b * dy)
                        gv -= g_q * (b * dx + c * dy)
                        ga += g_q * 0.5 * dx * dx
                        gb += g_q * dx * dy
                        gc += g_q * 0.5 * dy * dy
                        go -= g_q
                    behind[p] += w * g_w
                    T[p] = t
            g_means2d[g, 0], g_means2d[g, 1] = gu, gv
            g_conics[g, 0], g_conics[g, 1], g_conics[g, 2] = ga, gb, gc
            g_opac[g] = go / o
        return g_means2d, g_conics, g_opac, g_feats

    _kernels = (forward, backward)
    return _kernels


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)


class _CompositeNumba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, width, height):
        fwd, _ = _compile()
        inputs = tuple(_np(t) for t in (means2d, conics, opacities, feats))
        out, T, last = fwd(*inputs, width, height)
        ctx.state = (inputs, width, height, T, last)
        return torch.from_numpy(out).to(feats.dtype).to(feats.device)

    @staticmethod
    def backward(ctx, grad_out):
        _, bwd = _compile()
        inputs, width, height, T, last = ctx.state
        grads = bwd(*inputs, width, height, T, last, _np(grad_out))
        like = grad_out
        return tuple(torch.from_numpy(g).to(like.dtype).to(like.device) for g in grads) + (None, None)


def composite_numba(means2d: Tensor, conics: Tensor, opacities: Tensor, feats: Tensor, width: int,
                    height: int) -> Tensor:
    """[height * width, F] composited features of Gaussians sorted front to back (see
    :func:`.raster_torch.composite`, whose contract this shares)."""
    return _CompositeNumba.apply(means2d, conics, opacities, feats, width, height)
