"""Front-to-back alpha compositing of screen-space Gaussians in plain PyTorch (CPU or any device).

It computes what 3DGS's CUDA tile rasterizer computes (Kerbl et al. 2023, sec. 6), organised for a CPU:

* **Exact footprints instead of tiles.** A Gaussian's alpha ``o * exp(-sigma)`` reaches 1/255 on an ellipse;
  each image row cuts it in one run of pixels ("span"), found in closed form. Only pixels inside are
  evaluated: a CPU gains nothing from evaluating whole 16x16 tiles (as GPU thread blocks do), which on
  ``bench/bench_raster.py``'s head scene means 33x (128^2, 20k) and 15x (512^2, 50k) more alpha
  evaluations. The (pixel, Gaussian) pairs are then sorted by pixel; the sort is stable and pairs are
  generated front to back, so each pixel's list is in depth order -- 3DGS's per-tile lists with 1-pixel tiles.
* **Transmittance as a segmented scan.** ``T_i = prod_{j<i} (1 - alpha_j)`` is a cumulative sum of
  ``log(1 - alpha)`` over each pixel's list (in float64, since one scan runs across many lists); early
  termination (3DGS stops a pixel before T drops below 1e-4) and the 1/255 skip become masks, not loops.
* **Blending as a sparse matrix product.** The weights ``w_i = alpha_i T_i`` form a [pixels x Gaussians]
  matrix that the pixel-sorted pairs already lay out in CSR form; ``W @ feats`` (and ``W^T @ grad`` in the
  backward pass, from the pairs in generation order) is ~10x faster than gathering and scatter-adding rows.
* **Chunks of rows.** The image is processed in bands of rows holding at most ``max_pairs`` pairs, so memory
  is bounded by the pairs of one chunk plus what the backward pass keeps (28 bytes a pair), never N x H x W.
* **A hand-written backward** (the 3DGS gradient of compositing) over the pairs saved by the forward pass.
  Per span, ``sigma - log(o)`` is a quadratic ``A dx^2 + B dx + C`` in the pixel offset ``dx`` along the
  row; the backward pass returns gradients of the per-span (A, B, C, dx0), and autograd carries them to
  means2d, conics and opacities through cheap span-sized ops.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .projection import ALPHA_MIN

ALPHA_MAX = 0.99  # 3DGS clamps alpha so that one Gaussian never makes a pixel fully opaque.
T_MIN = 1e-4  # a pixel stops accumulating before its transmittance would drop below this.
BAND = 16  # rows per band: the unit in which the image is cut into chunks.
_EDGE = 1e-3  # px of slack on span ends; pixels it lets in are dropped by the exact alpha test.


def _spans(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int):
    """Row runs of pixels where each Gaussian's alpha can reach 1/255 (no gradient).

    Returns (gid [S], y [S], x0 [S], length [S]) ordered by Gaussian then row; empty runs are dropped.
    """
    u, v = means2d.unbind(-1)
    a, b, c = conics.unbind(-1)
    det = a * c - b * b
    thr = torch.log(opacities * 255.0).clamp(min=0)  # alpha >= 1/255  <=>  sigma <= thr
    ext_y = torch.sqrt(2 * thr * a / det)  # half-height of the ellipse sigma = thr
    y0 = torch.ceil(v - ext_y - 0.5).clamp(0, height).long()
    y1 = (torch.floor(v + ext_y - 0.5) + 1).clamp(0, height).long()
    rows = (y1 - y0).clamp(min=0)
    gid = torch.repeat_interleave(torch.arange(len(u), device=u.device), rows)
    y = torch.arange(len(gid), device=u.device) + (y0 - torch.cumsum(rows, 0) + rows).index_select(0, gid)
    # On row y: a dx^2 + 2 b dy dx + c dy^2 <= 2 thr, whose discriminant / 4 is 2 a thr - det dy^2.
    per_g = torch.stack([v, u, b / a, 2 * a * thr, det, 1 / a], 1).index_select(0, gid)
    v_, u_, b_a, two_a_thr, det_, inv_a = per_g.unbind(1)
    dy = y.to(u.dtype) + 0.5 - v_
    half = torch.sqrt((two_a_thr - det_ * dy * dy).clamp(min=0)) * inv_a
    centre = u_ - b_a * dy - 0.5
    x0 = torch.ceil(centre - half - _EDGE).clamp(0, width).long()
    x1 = (torch.floor(centre + half + _EDGE) + 1).clamp(0, width).long()
    keep = torch.nonzero(x1 > x0).squeeze(1)
    return gid.index_select(0, keep), y.index_select(0, keep), x0.index_select(0, keep), (x1 - x0).index_select(0, keep)


def _chunks(y: Tensor, length: Tensor, height: int, max_pairs: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of whole bands, each holding at most ``max_pairs`` pairs (or a single band)."""
    per_row = torch.bincount(y, weights=length.double(), minlength=height)
    per_band = per_row.view(-1).split(BAND)
    out, start, acc = [], 0, 0.0
    for i, n in enumerate(t.sum().item() for t in per_band):
        if acc and acc + n > max_pairs:
            out.append((start * BAND, i * BAND))
            start, acc = i, 0.0
        acc += n
    out.append((start * BAND, height))
    return out


def _segment_cumsum(x: Tensor, crow: Tensor, counts: Tensor, suffix: bool = False) -> Tensor:
    """Per pair, the sum of ``x`` over its pixel's list up to and including it -- or, with ``suffix``, over
    the pairs after it. In float64: the running sum crosses many lists."""
    cs = torch.cumsum(x.double(), 0)
    csz = torch.cat([cs.new_zeros(1), cs])
    if suffix:
        return torch.repeat_interleave(csz.index_select(0, crow[1:]), counts) - cs
    return cs - torch.repeat_interleave(csz.index_select(0, crow[:-1]), counts)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix. Its matmul with a dense matrix is the fastest weighted scatter-sum on CPU
    (~10x index_add_ of gathered rows). Built from sorted, duplicate-free indices, so checks are skipped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, C, dx0, feats, span_gid, span_pix0, chunks, n_pixels, keep_for_backward):
        out = feats.new_zeros(n_pixels, feats.shape[1])
        n = feats.shape[0]
        saved = []
        for sidx, length, p0, n_chunk in chunks:
            # Per-span constants of this chunk, expanded to one entry per pair in generation order: span by
            # span, i.e. Gaussian by Gaussian (front to back), then row, then column.
            sA, sB, sC, sdx0 = (t.index_select(0, sidx) for t in (A, B, C, dx0))
            s_gid, s_pix = span_gid.index_select(0, sidx), span_pix0.index_select(0, sidx) - p0
            span = torch.repeat_interleave(torch.arange(len(sidx), device=feats.device), length)
            first = torch.cumsum(length, 0) - length
            col = torch.arange(len(span), device=feats.device) - first.index_select(0, span)
            pix = (s_pix.index_select(0, span) + col).int()  # pixel index within the chunk
            dx = sdx0.index_select(0, span) + col.to(feats.dtype)
            q = (sA.index_select(0, span) * dx + sB.index_select(0, span)) * dx + sC.index_select(0, span)
            # Stable sort by pixel: each pixel's list stays in generation, i.e. depth, order.
            pix, order = torch.sort(pix, stable=True)
            span, dx, q = (t.index_select(0, order) for t in (span, dx, q))
            pix = pix.long()
            raw = torch.exp(-q)  # o * exp(-sigma)
            alpha = torch.where(raw >= ALPHA_MIN, raw.clamp(max=ALPHA_MAX), torch.zeros_like(raw))
            counts = torch.bincount(pix, minlength=n_chunk)
            crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # each pixel's first pair
            log1m = torch.log1p(-alpha)
            log_after = _segment_cumsum(log1m, crow, counts)
            T = torch.exp(log_after - log1m).to(alpha.dtype)
            # T only decreases along a list, so "not yet terminated" is a prefix of it. Later pairs get
            # alpha = 0, which leaves them inert in both passes.
            alpha = torch.where(log_after >= math.log(T_MIN), alpha, torch.zeros_like(alpha))
            gid = s_gid.index_select(0, span)
            # [pixels x Gaussians] blending weights, rows sorted by pixel, columns by depth.
            out[p0 : p0 + n_chunk] = _csr(crow, gid, alpha * T, (n_chunk, n)) @ feats
            if keep_for_backward:
                pairs = (order.int(), span.int(), gid.int(), pix.int(), alpha, T, dx)
                saved.append((sidx, p0, n_chunk, s_gid, length, crow, counts, pairs))
        ctx.chunks = saved
        ctx.save_for_backward(A, B, feats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        A, B, feats = ctx.saved_tensors
        n = feats.shape[0]
        grad_out = grad_out.contiguous()
        g_feats = torch.zeros_like(feats)
        g_span = feats.new_zeros(3, A.shape[0])  # sums over each span of g_q dx^2, g_q dx, g_q
        for sidx, p0, n_chunk, s_gid, length, crow, counts, pairs in ctx.chunks:
            order, span, gid, pix, alpha, T, dx = pairs
            order, span, pix = order.long(), span.long(), pix.long()
            g_chunk = grad_out[p0 : p0 + n_chunk]
            w = alpha * T
            # d feats = W^T grad: W^T in CSR needs the pairs by Gaussian, which generation order is.
            per_gauss = torch.bincount(s_gid, weights=length.to(w.dtype), minlength=n).long()
            crow_g = torch.cat([per_gauss.new_zeros(1), torch.cumsum(per_gauss, 0)])
            w_gen = torch.empty_like(w).index_copy_(0, order, w)
            pix_gen = torch.empty_like(pix).index_copy_(0, order, pix)
            g_feats += _csr(crow_g, pix_gen, w_gen, (n, n_chunk)) @ g_chunk
            # dL/dw_i = grad(pixel) . feats(Gaussian); a matrix-vector product sums the few columns ~3x
            # faster than .sum(1).
            g_w = (g_chunk.index_select(0, pix) * feats.index_select(0, gid)) @ feats.new_ones(feats.shape[1])
            # d out / d alpha_i = T_i f_i - (sum of w_j f_j over the pairs behind i) / (1 - alpha_i)
            behind = _segment_cumsum(w * g_w, crow, counts, suffix=True).to(alpha.dtype)
            g_alpha = T * g_w - behind / (1.0 - alpha)
            # alpha = exp(-q) where it is neither skipped (0) nor clamped; d alpha / d q = -alpha.
            g_q = torch.where((alpha > 0) & (alpha < ALPHA_MAX), -g_alpha * alpha, torch.zeros_like(alpha))
            g_q_dx = g_q * dx
            per_span = alpha.new_zeros(3, len(sidx))
            for row, values in zip(per_span, (g_q_dx * dx, g_q_dx, g_q)):
                row.index_add_(0, span, values)  # 1-D index_add: ~3x faster than one on [M, 3] rows
            g_span.index_add_(1, sidx, per_span)
        g_A, g_B, g_C = g_span
        g_dx0 = 2 * A * g_B + B * g_C  # d q / d dx0 = 2 A dx + B, summed over the span's pixels
        return g_A, g_B, g_C, g_dx0, g_feats, None, None, None, None, None


def composite(
    means2d: Tensor,  # [n, 2] pixel coordinates
    conics: Tensor,  # [n, 3] inverse 2D covariance (a, b, c)
    opacities: Tensor,  # [n]
    feats: Tensor,  # [n, F]
    width: int,
    height: int,
    max_pairs: int = 1 << 22,
    kernel: str = "torch",
) -> Tensor:
    """Alpha-composite Gaussians **given sorted front to back** into [height * width, F]: sum_i w_i f_i.

    ``w_i = alpha_i T_i`` are the 3DGS blending weights; append a column of ones to ``feats`` to get the
    pixel alpha. Differentiable in means2d, conics, opacities and feats. Opacities must be >= 1/255 and
    conics positive definite (what :func:`projection.project` keeps as visible). ``kernel="numba"`` runs the
    loops of :mod:`.raster_numba` instead of this module's sorted pairs (same footprints, same result).
    """
    if kernel == "numba":
        from .raster_numba import composite_numba

        return composite_numba(means2d, conics, opacities, feats, width, height)
    with torch.no_grad():
        gid, y, x0, length = _spans(means2d.detach(), conics.detach(), opacities.detach(), width, height)
    # Per span: sigma - log(o) = A dx^2 + B dx + C with dx = dx0 + k at the span's k-th pixel.
    per_span = torch.cat([means2d, conics, torch.log(opacities)[:, None]], 1).index_select(0, gid)
    u, v, a, b, c, log_o = per_span.unbind(1)
    dy = y.to(means2d.dtype) + 0.5 - v
    A = 0.5 * a
    B = b * dy
    C = 0.5 * c * dy * dy - log_o
    dx0 = x0.to(means2d.dtype) + 0.5 - u
    with torch.no_grad():
        chunks = []
        for r0, r1 in _chunks(y, length, height, max_pairs):
            sidx = torch.nonzero((y >= r0) & (y < r1)).squeeze(1)
            chunks.append((sidx, length[sidx], r0 * width, (r1 - r0) * width))
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opacities, feats))
    return _Composite.apply(A, B, C, dx0, feats, gid, y * width + x0, chunks, height * width, keep)
