"""Front-to-back alpha compositing of screen-space Gaussians in plain PyTorch (CPU or any device).

What 3DGS's CUDA tile rasterizer computes, organised for a CPU:

* Every Gaussian lists the pixels it can touch (its box, see :func:`projection.project`); the
  (pixel, Gaussian) pairs where alpha >= 1/255 are kept and ordered by pixel, then depth. These per-pixel
  lists are 3DGS's per-tile lists with 1-pixel tiles: a CPU gains nothing from evaluating a whole 16x16
  tile per Gaussian (as the GPU's thread blocks do) and would pay ~10x more exp() calls for it.
* Transmittance is a segmented cumulative sum of log(1 - alpha) (in float64: it runs across the lists of
  many pixels), so a pixel's early termination (T < 1e-4) is a mask, not a loop.
* The image is processed in row bands grouped so that a chunk holds at most ``max_pairs`` candidate pairs:
  memory stays O(pairs of a chunk), never O(N * H * W).
* The backward pass is written by hand (as in the 3DGS paper's supplement) instead of left to autograd:
  it needs only the pair lists from the forward pass, recomputes alpha, and is ~2x faster than autograd
  through the same graph while keeping no [pairs]-sized float tensors alive between the passes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .projection import ALPHA_MIN

ALPHA_MAX = 0.99  # 3DGS clamps alpha so that one Gaussian never makes a pixel fully opaque.
T_MIN = 1e-4  # a pixel stops accumulating once its transmittance would drop below this.
BAND = 16  # rows per band: the unit in which the image is cut into chunks.


def _chunks(boxes: Tensor, height: int, max_pairs: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1), whole bands each, holding at most ``max_pairs`` box pixels (one band may hold more)."""
    n_bands = (height + BAND - 1) // BAND
    if n_bands == 1 or boxes.shape[0] == 0:
        return [(0, height)]
    lo = torch.arange(n_bands, device=boxes.device) * BAND
    rows = (torch.minimum(boxes[:, 3:4], lo + BAND) - torch.maximum(boxes[:, 1:2], lo)).clamp(min=0)
    per_band = ((boxes[:, 2:3] - boxes[:, 0:1]) * rows).sum(0).tolist()
    out, start, acc = [], 0, 0
    for b, n in enumerate(per_band):
        if acc and acc + n > max_pairs:
            out.append((start * BAND, b * BAND))
            start, acc = b, 0
        acc += n
    out.append((start * BAND, height))
    return out


def _pairs(boxes: Tensor, r0: int, r1: int, width: int) -> tuple[Tensor, Tensor]:
    """All (Gaussian, pixel) candidates in rows [r0, r1), Gaussian-major in input (depth) order.

    Returns gid [M] (index into the Gaussians) and pix [M] (flat pixel index y * width + x).
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    ya, yb = y0.clamp(min=r0), y1.clamp(max=r1)
    bw, bh = x1 - x0, (yb - ya).clamp(min=0)
    g = torch.nonzero(bh > 0).squeeze(1)
    bw, counts = bw[g], bw[g] * bh[g]
    gid = torch.repeat_interleave(g, counts)
    first = torch.cumsum(counts, 0) - counts
    off = torch.arange(gid.shape[0], device=boxes.device) - torch.repeat_interleave(first, counts)
    w = torch.repeat_interleave(bw, counts)
    row = off // w
    pix = (torch.repeat_interleave(ya[g], counts) + row) * width + torch.repeat_interleave(x0[g], counts) + (off - row * w)
    return gid, pix


def _alpha(gid: Tensor, pix: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, width: int):
    """alpha (clamped), the unclamped opacity * exp(-sigma), and the offsets dx, dy of each pair."""
    px = (pix % width).to(means2d.dtype) + 0.5
    py = torch.div(pix, width, rounding_mode="floor").to(means2d.dtype) + 0.5
    dx = px - means2d[:, 0].index_select(0, gid)
    dy = py - means2d[:, 1].index_select(0, gid)
    a, b, c = (conics[:, i].index_select(0, gid) for i in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    raw = opacities.index_select(0, gid) * torch.exp(-sigma)
    # sigma < 0 only happens through round-off on a degenerate conic; 3DGS skips those pairs too.
    raw = torch.where(sigma >= 0, raw, torch.zeros_like(raw))
    return raw.clamp(max=ALPHA_MAX), raw, dx, dy, (a, b, c)


def _segments(pix: Tensor, r0: int, r1: int, width: int) -> tuple[Tensor, Tensor]:
    """For pairs sorted by pixel: index of the first and of the last pair of each pair's pixel."""
    counts = torch.bincount(pix - r0 * width, minlength=(r1 - r0) * width)
    first = torch.cumsum(counts, 0) - counts
    start = torch.repeat_interleave(first, counts)
    end = torch.repeat_interleave(first + counts - 1, counts)
    return start, end


def _transmittance(alpha: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair: T before it and log T after it, within its pixel's depth-ordered list."""
    cs = torch.cumsum(torch.log1p(-alpha).double(), 0)
    base = torch.cat([cs.new_zeros(1), cs])[start]
    log_after = cs - base
    log_before = log_after - torch.log1p(-alpha).double()
    return torch.exp(log_before).to(alpha.dtype), log_after


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, boxes, width, height, max_pairs):
        out = feats.new_zeros(height * width, feats.shape[1])
        saved = []
        for r0, r1 in _chunks(boxes, height, max_pairs):
            gid, pix = _pairs(boxes, r0, r1, width)
            alpha, *_ = _alpha(gid, pix, means2d, conics, opacities, width)
            keep = torch.nonzero(alpha >= ALPHA_MIN).squeeze(1)
            # Stable sort by pixel keeps each pixel's list in depth order (pairs were made depth-major).
            order = keep[torch.argsort(pix[keep], stable=True)]
            gid, pix, alpha = gid[order], pix[order], alpha[order]
            start, _ = _segments(pix, r0, r1, width)
            T, log_after = _transmittance(alpha, start)
            # T only decreases along a list, so "not terminated" is a prefix of each list; pairs past it
            # contribute nothing and are dropped for good.
            live = torch.nonzero(log_after >= math.log(T_MIN)).squeeze(1)
            if live.shape[0] < gid.shape[0]:
                gid, pix, alpha, T = gid[live], pix[live], alpha[live], T[live]
            out.index_add_(0, pix, (alpha * T)[:, None] * feats.index_select(0, gid))
            saved.append((r0, r1, gid.int(), pix.int()))
        ctx.chunks = saved
        ctx.width = width
        ctx.save_for_backward(means2d, conics, opacities, feats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        means2d, conics, opacities, feats = ctx.saved_tensors
        width = ctx.width
        grad_out = grad_out.contiguous()
        g_feats = torch.zeros_like(feats)
        g_geo = means2d.new_zeros(means2d.shape[0], 6)  # u, v, a, b, c, opacity
        for r0, r1, gid, pix in ctx.chunks:
            gid, pix = gid.long(), pix.long()
            alpha, raw, dx, dy, (a, b, c) = _alpha(gid, pix, means2d, conics, opacities, width)
            start, end = _segments(pix, r0, r1, width)
            T, _ = _transmittance(alpha, start)
            w = alpha * T
            gp = grad_out.index_select(0, pix)  # dL/d(pixel value), per pair
            g_feats.index_add_(0, gid, w[:, None] * gp)
            g_w = (gp * feats.index_select(0, gid)).sum(1)  # dL/dw of this pair
            # d out / d alpha_i = T_i f_i - (sum_{j behind i} w_j f_j) / (1 - alpha_i)
            contrib = w * g_w
            cs = torch.cumsum(contrib.double(), 0)
            behind = (cs[end] - cs).to(alpha.dtype)
            g_alpha = T * g_w - behind / (1.0 - alpha)
            g_alpha = torch.where(raw < ALPHA_MAX, g_alpha, torch.zeros_like(g_alpha))
            g_sigma = -g_alpha * raw
            gs_dx, gs_dy = g_sigma * dx, g_sigma * dy
            g_geo.index_add_(
                0,
                gid,
                torch.stack(
                    [
                        -(a * gs_dx + b * gs_dy),
                        -(b * gs_dx + c * gs_dy),
                        0.5 * gs_dx * dx,
                        gs_dx * dy,
                        0.5 * gs_dy * dy,
                        g_alpha * raw / opacities.index_select(0, gid),
                    ],
                    1,
                ),
            )
        return g_geo[:, :2], g_geo[:, 2:5], g_geo[:, 5], g_feats, None, None, None, None


def composite(
    means2d: Tensor,  # [n, 2]
    conics: Tensor,  # [n, 3]
    opacities: Tensor,  # [n]
    feats: Tensor,  # [n, F]
    boxes: Tensor,  # [n, 4] int64 (x0, y0, x1, y1), end-exclusive
    width: int,
    height: int,
    max_pairs: int = 1 << 22,
) -> Tensor:
    """Alpha-composite Gaussians, **given sorted front to back**, into [height * width, F] (sum of w_i f_i).

    Append a column of ones to ``feats`` to get the pixel alpha. Differentiable in means2d, conics,
    opacities and feats.
    """
    return _Composite.apply(means2d, conics, opacities, feats, boxes, width, height, max_pairs)
