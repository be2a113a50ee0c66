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
  ``out += alpha T f`` and ``T *= 1 - alpha``; ``exp(-sigma)`` is not called per pixel but stepped along the
  row by forward differences (:func:`run_start`: sigma is a quadratic in x, so two products per pixel); the
  inference loop (``draw``) steps each row's start from the row above too (:func:`walk`), so a row costs no
  ``exp`` either (float64; relative error ~1e-13 after a 512^2 footprint's rows);
* backward: the same pairs back to front, recovering each pair's ``T`` from the pixel's final transmittance
  by division (as 3DGS's CUDA backward does), with the running sum of the weighted feature gradients behind
  it; gradients go straight to the Gaussian's centre, conic, opacity and features (sigma is a quadratic in the
  pixel offset, so they are closed-form sums).

For inference (nothing needs a gradient) :func:`render_numba` also runs the projection
(:func:`.projection.project`'s EWA splatting, culling and extents), the depth sort and the SH colours
(:func:`.sh.eval_sh`) in compiled loops, and its compositing loop writes the final image (background
composited), alpha and depth itself, so a frame makes no per-Gaussian or per-pixel tensor operations at all.

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
from .sh import C0, C1, C2, C3
from .raster_torch import _EDGE as EDGE
from .raster_torch import ALPHA_MAX, T_MIN


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
    def run_start(u, a, b, c, dy, log_o, x0):  # pragma: no cover - compiled
        """(alpha before clamping at pixel x0 of a row, its ratio to the next pixel's).

        Along a row the exponent q = sigma - log(o) is a quadratic in x, so exp(-q) at x + 1 is exp(-q) at x
        times a ratio that itself shrinks by exp(-a) per pixel (forward differences): two products per pixel
        instead of an exp (half of the compositing's time). In float64 over a run of k pixels the relative
        error is ~k^2 1e-16, far below the float32 the images are."""
        dx = x0 + 0.5 - u
        q = (0.5 * a * dx + b * dy) * dx + 0.5 * c * dy * dy - log_o
        return math.exp(-q), math.exp(-(a * dx + b * dy + 0.5 * a))

    @numba.njit(cache=True, nogil=True)
    def walk(E, R, V, xa, x0, ea, eb, ec):  # pragma: no cover - compiled
        """(exp(-q), its ratio along the row, its ratio down the column) one row down from the previous row's
        start column xa and along the row to its start x0: q is a quadratic in (x, y), so each step is products
        (ratio x exp(-a) per pixel along a row, x exp(-b) along the other axis, x exp(-c) per row down)."""
        E *= V
        R *= eb
        V *= ec
        while xa < x0:
            E *= R
            R *= ea
            V *= eb
            xa += 1
        while xa > x0:
            R /= ea
            E /= R
            V /= eb
            xa -= 1
        return E, R, V

    @numba.njit(cache=True, nogil=True)
    def forward(means2d, conics, opac, feats, width, height):  # pragma: no cover - compiled
        n, F = feats.shape
        out = np.zeros((width * height, F))
        T = np.ones(width * height)  # negated once the pixel stopped (T > 0 until then)
        last = np.full(width * height, -1, np.int64)  # the last Gaussian that contributed to the pixel
        for g in range(n):
            u, v = means2d[g, 0], means2d[g, 1]
            a, b, c, o = conics[g, 0], conics[g, 1], conics[g, 2], opac[g]
            y0, y1, det, thr = rows(u, v, a, b, c, o, height)
            log_o = math.log(o)
            step = math.exp(-a)
            for y in range(y0, y1):
                x0, x1, dy = span(u, v, a, b, det, thr, y, width)
                raw, ratio = run_start(u, a, b, c, dy, log_o, x0)
                base = y * width
                for x in range(x0, x1):
                    p = base + x
                    alpha = raw
                    raw *= ratio
                    ratio *= step
                    t = T[p]
                    if t < 0.0 or alpha < ALPHA_MIN:
                        continue
                    alpha = min(alpha, ALPHA_MAX)
                    t_after = t * (1.0 - alpha)
                    if t_after < T_MIN:
                        T[p] = -t
                        continue
                    w = alpha * t
                    for f in range(F):
                        out[p, f] += w * feats[g, f]
                    T[p] = t_after
                    last[p] = g
        return out, np.abs(T), last

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
            step = math.exp(-a)
            for y in range(y0, y1):
                x0, x1, dy = span(u, v, a, b, det, thr, y, width)
                nxt, ratio = run_start(u, a, b, c, dy, log_o, x0)
                base = y * width
                for x in range(x0, x1):
                    p = base + x
                    raw = nxt
                    nxt *= ratio
                    ratio *= step
                    if g > last[p] or raw < ALPHA_MIN:
                        continue  # behind where the pixel stopped (or it never started), or too faint
                    dx = x + 0.5 - u
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

    @numba.njit(cache=True, nogil=True)
    def project(means, quats, scales, opac, viewmat, K, width, height, near, far, eps2d):  # pragma: no cover
        """projection.project, Gaussian by Gaussian: (means2d, conics, depths, radii, visible)."""
        n = means.shape[0]
        means2d = np.zeros((n, 2))
        conics = np.zeros((n, 3))
        depths = np.zeros(n)
        radii = np.zeros((n, 2), np.int32)
        visible = np.zeros(n, np.bool_)
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        lim_x = 0.3 * 0.5 * width / fx
        lim_y = 0.3 * 0.5 * height / fy
        R = np.empty((3, 3))
        W = np.empty((3, 3))
        p = np.empty(3)
        for i in range(n):
            for r in range(3):
                p[r] = (viewmat[r, 0] * means[i, 0] + viewmat[r, 1] * means[i, 1] + viewmat[r, 2] * means[i, 2]
                        + viewmat[r, 3])
            x, y, z = p[0], p[1], p[2]
            depths[i] = z
            in_depth = near < z < far
            zs = z if in_depth else 1.0
            tx = zs * min(max(x / zs, -(cx / fx + lim_x)), (width - cx) / fx + lim_x)
            ty = zs * min(max(y / zs, -(cy / fy + lim_y)), (height - cy) / fy + lim_y)
            qw, qx, qy, qz = quats[i, 0], quats[i, 1], quats[i, 2], quats[i, 3]
            norm = max(math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)  # F.normalize's eps
            qw, qx, qy, qz = qw / norm, qx / norm, qy / norm, qz / norm
            R[0, 0], R[0, 1], R[0, 2] = 1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)
            R[1, 0], R[1, 1], R[1, 2] = 2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)
            R[2, 0], R[2, 1], R[2, 2] = 2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)
            for r in range(3):  # W = R_view R_q S
                for c in range(3):
                    W[r, c] = (viewmat[r, 0] * R[0, c] + viewmat[r, 1] * R[1, c] + viewmat[r, 2] * R[2, c]) * scales[i, c]
            j00, j02 = fx / zs, -fx * tx / (zs * zs)
            j11, j12 = fy / zs, -fy * ty / (zs * zs)
            a = eps2d
            b = 0.0
            c = eps2d
            for k in range(3):
                r0 = j00 * W[0, k] + j02 * W[2, k]
                r1 = j11 * W[1, k] + j12 * W[2, k]
                a += r0 * r0
                b += r0 * r1
                c += r1 * r1
            det = a * c - b * b
            ok = in_depth and det > 0 and opac[i] >= ALPHA_MIN
            inv_det = 1.0 / det if ok else 1.0
            conics[i, 0], conics[i, 1], conics[i, 2] = c * inv_det, -b * inv_det, a * inv_det
            u, v = fx * x / zs + cx, fy * y / zs + cy
            means2d[i, 0], means2d[i, 1] = u, v
            n_sigma = math.sqrt(2.0 * math.log(min(max(opac[i], ALPHA_MIN), 1.0) * 255.0))
            ext_x = n_sigma * math.sqrt(max(a, 0.0))
            ext_y = n_sigma * math.sqrt(max(c, 0.0))
            if not (math.isfinite(u) and math.isfinite(v) and math.isfinite(ext_x) and math.isfinite(ext_y)):
                continue
            x0 = min(max(math.ceil(u - ext_x - 0.5), 0), width)
            x1 = min(max(math.floor(u + ext_x - 0.5) + 1, 0), width)
            y0 = min(max(math.ceil(v - ext_y - 0.5), 0), height)
            y1 = min(max(math.floor(v + ext_y - 0.5) + 1, 0), height)
            if ok and x1 > x0 and y1 > y0:
                visible[i] = True
                radii[i, 0], radii[i, 1] = math.ceil(ext_x), math.ceil(ext_y)
        return means2d, conics, depths, radii, visible

    @numba.njit(cache=True, nogil=True)
    def draw(order, means2d, conics, opac, colors, depths, width, height, background, image, alpha,
             depth):  # pragma: no cover - compiled
        """Inference's compositing: :func:`forward` over the Gaussians ``order`` (front to back) of the
        projected arrays, features = (colors [N, D], depth), written straight into the outputs image [P, D]
        (+ T x background [1 or P, D]), alpha [P] = 1 - T and depth [P] = the weighted depth over alpha (the
        weights telescope: sum_i alpha_i T_i = 1 - T_final, so no column of ones is summed and no gather of the
        visible rows is made). Sums and T are float64; the outputs take their arrays' dtype."""
        D = colors.shape[1]
        rgb = D == 3  # the usual case, its feature loop unrolled (the loop's overhead was ~1/5 of the time)
        out = np.zeros((width * height, D + 1))
        T = np.ones(width * height)  # negated once the pixel stopped
        for k in range(order.shape[0]):
            g = order[k]
            u, v = means2d[g, 0], means2d[g, 1]
            a, b, c, o = conics[g, 0], conics[g, 1], conics[g, 2], opac[g]
            y0, y1, det, thr = rows(u, v, a, b, c, o, height)
            log_o = math.log(o)
            step, eb, ec = math.exp(-a), math.exp(-b), math.exp(-c)
            z = depths[g]
            c0 = c1 = c2 = 0.0
            if rgb:
                c0, c1, c2 = colors[g, 0], colors[g, 1], colors[g, 2]
            start = -1  # the previous row's first pixel (-1: none), where E, R, V hold
            E = R = V = 0.0
            for y in range(y0, y1):
                x0, x1, dy = span(u, v, a, b, det, thr, y, width)
                if x0 >= x1:
                    start = -1
                    continue
                if start >= 0 and abs(x0 - start) <= 3:  # stepped from the row above (2 exps per row saved)
                    E, R, V = walk(E, R, V, start, x0, step, eb, ec)
                else:
                    E, R = run_start(u, a, b, c, dy, log_o, x0)
                    V = math.exp(-(b * (x0 + 0.5 - u) + c * dy + 0.5 * c))
                start = x0
                raw, ratio = E, R
                base = y * width
                for x in range(x0, x1):
                    p = base + x
                    al = raw
                    raw *= ratio
                    ratio *= step
                    t = T[p]
                    if t < 0.0 or al < ALPHA_MIN:
                        continue
                    al = min(al, ALPHA_MAX)
                    t_after = t * (1.0 - al)
                    if t_after < T_MIN:
                        T[p] = -t
                        continue
                    w = al * t
                    if rgb:
                        out[p, 0] += w * c0
                        out[p, 1] += w * c1
                        out[p, 2] += w * c2
                    else:
                        for f in range(D):
                            out[p, f] += w * colors[g, f]
                    out[p, D] += w * z
                    T[p] = t_after
        per_pixel = background.shape[0] > 1
        for p in range(width * height):
            t = abs(T[p])
            q = p if per_pixel else 0
            for f in range(D):
                image[p, f] = out[p, f] + t * background[q, f]
            alpha[p] = 1.0 - t
            depth[p] = out[p, D] / max(1.0 - t, 1e-10)

    @numba.njit(cache=True, nogil=True)
    def project_backward(means, quats, scales, opac, viewmat, K, width, height, near, far, eps2d, g_m2d, g_con,
                         g_dep):  # pragma: no cover - compiled
        """Gradients of project's (means2d, conics, depths) w.r.t. means, quats, scales and viewmat [4, 4]:
        projection.project's autograd graph by hand, Gaussian by Gaussian (recomputing its forward)."""
        n = means.shape[0]
        g_means = np.zeros((n, 3))
        g_quats = np.zeros((n, 4))
        g_scales = np.zeros((n, 3))
        g_view = np.zeros((4, 4))
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        lim_x = 0.3 * 0.5 * width / fx
        lim_y = 0.3 * 0.5 * height / fy
        lo_x, hi_x = -(cx / fx + lim_x), (width - cx) / fx + lim_x
        lo_y, hi_y = -(cy / fy + lim_y), (height - cy) / fy + lim_y
        Rq = np.empty((3, 3))
        RS = np.empty((3, 3))
        W = np.empty((3, 3))
        gW = np.empty((3, 3))
        r0 = np.empty(3)
        r1 = np.empty(3)
        p = np.empty(3)
        gp = np.empty(3)
        for i in range(n):
            gu, gv = g_m2d[i, 0], g_m2d[i, 1]
            gA, gB, gC = g_con[i, 0], g_con[i, 1], g_con[i, 2]
            if gu == 0.0 and gv == 0.0 and gA == 0.0 and gB == 0.0 and gC == 0.0 and g_dep[i] == 0.0:
                continue  # culled or not drawn: nothing flows back
            for r in range(3):
                p[r] = (viewmat[r, 0] * means[i, 0] + viewmat[r, 1] * means[i, 1] + viewmat[r, 2] * means[i, 2]
                        + viewmat[r, 3])
            x, y, z = p[0], p[1], p[2]
            in_depth = near < z < far
            zs = z if in_depth else 1.0
            qx_ = x / zs
            qy_ = y / zs
            kx = min(max(qx_, lo_x), hi_x)
            ky = min(max(qy_, lo_y), hi_y)
            tx, ty = zs * kx, zs * ky
            qw, qx, qy, qz = quats[i, 0], quats[i, 1], quats[i, 2], quats[i, 3]
            norm = max(math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)
            qw, qx, qy, qz = qw / norm, qx / norm, qy / norm, qz / norm
            Rq[0, 0], Rq[0, 1], Rq[0, 2] = 1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)
            Rq[1, 0], Rq[1, 1], Rq[1, 2] = 2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)
            Rq[2, 0], Rq[2, 1], Rq[2, 2] = 2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)
            for k in range(3):
                for c in range(3):
                    RS[k, c] = Rq[k, c] * scales[i, c]
            for r in range(3):
                for c in range(3):
                    W[r, c] = viewmat[r, 0] * RS[0, c] + viewmat[r, 1] * RS[1, c] + viewmat[r, 2] * RS[2, c]
            j00, j02 = fx / zs, -fx * tx / (zs * zs)
            j11, j12 = fy / zs, -fy * ty / (zs * zs)
            for k in range(3):
                r0[k] = j00 * W[0, k] + j02 * W[2, k]
                r1[k] = j11 * W[1, k] + j12 * W[2, k]
            a = eps2d + r0[0] * r0[0] + r0[1] * r0[1] + r0[2] * r0[2]
            b = r0[0] * r1[0] + r0[1] * r1[1] + r0[2] * r1[2]
            c_ = eps2d + r1[0] * r1[0] + r1[1] * r1[1] + r1[2] * r1[2]
            det = a * c_ - b * b
            if in_depth and det > 0 and opac[i] >= ALPHA_MIN:  # conics = (c, -b, a) / det
                inv = 1.0 / det
                inv2 = inv * inv
                ga = -gA * c_ * c_ * inv2 + gB * b * c_ * inv2 + gC * (inv - a * c_ * inv2)
                gb = 2.0 * gA * b * c_ * inv2 - gB * (inv + 2.0 * b * b * inv2) + 2.0 * gC * a * b * inv2
                gc = gA * (inv - a * c_ * inv2) + gB * a * b * inv2 - gC * a * a * inv2
            else:  # conics = (c, -b, a)
                ga, gb, gc = gC, -gB, gA
            g_j00 = g_j02 = g_j11 = g_j12 = 0.0
            for k in range(3):
                g0 = 2.0 * ga * r0[k] + gb * r1[k]  # d/d r0[k]
                g1 = 2.0 * gc * r1[k] + gb * r0[k]
                gW[0, k] = j00 * g0
                gW[1, k] = j11 * g1
                gW[2, k] = j02 * g0 + j12 * g1
                g_j00 += g0 * W[0, k]
                g_j02 += g0 * W[2, k]
                g_j11 += g1 * W[1, k]
                g_j12 += g1 * W[2, k]
            z2 = zs * zs
            g_zs = (-fx / z2 * g_j00 + 2.0 * fx * tx / (z2 * zs) * g_j02 - fy / z2 * g_j11
                    + 2.0 * fy * ty / (z2 * zs) * g_j12)
            g_tx = -fx / z2 * g_j02
            g_ty = -fy / z2 * g_j12
            # means2d = (fx x / zs + cx, fy y / zs + cy)
            g_x = fx / zs * gu
            g_y = fy / zs * gv
            g_zs += -fx * x / z2 * gu - fy * y / z2 * gv
            # t = zs * clamp(p / zs): p itself inside the limits, zs times a constant outside
            if lo_x < qx_ < hi_x:
                g_x += g_tx
            else:
                g_zs += kx * g_tx
            if lo_y < qy_ < hi_y:
                g_y += g_ty
            else:
                g_zs += ky * g_ty
            gp[0], gp[1], gp[2] = g_x, g_y, g_dep[i] + (g_zs if in_depth else 0.0)
            for r in range(3):  # p = R m + t
                for c in range(3):
                    g_means[i, c] += viewmat[r, c] * gp[r]
                    g_view[r, c] += gp[r] * means[i, c]
                g_view[r, 3] += gp[r]
            for r in range(3):  # W = R RS
                for k in range(3):
                    g_view[r, k] += gW[r, 0] * RS[k, 0] + gW[r, 1] * RS[k, 1] + gW[r, 2] * RS[k, 2]
            G00 = G01 = G02 = G10 = G11 = G12 = G20 = G21 = G22 = 0.0
            for c in range(3):
                m0 = viewmat[0, 0] * gW[0, c] + viewmat[1, 0] * gW[1, c] + viewmat[2, 0] * gW[2, c]  # (R^T gW)[k, c]
                m1 = viewmat[0, 1] * gW[0, c] + viewmat[1, 1] * gW[1, c] + viewmat[2, 1] * gW[2, c]
                m2 = viewmat[0, 2] * gW[0, c] + viewmat[1, 2] * gW[1, c] + viewmat[2, 2] * gW[2, c]
                g_scales[i, c] = m0 * Rq[0, c] + m1 * Rq[1, c] + m2 * Rq[2, c]
                s_c = scales[i, c]
                if c == 0:
                    G00, G10, G20 = m0 * s_c, m1 * s_c, m2 * s_c
                elif c == 1:
                    G01, G11, G21 = m0 * s_c, m1 * s_c, m2 * s_c
                else:
                    G02, G12, G22 = m0 * s_c, m1 * s_c, m2 * s_c
            gw = 2.0 * (-qz * G01 + qy * G02 + qz * G10 - qx * G12 - qy * G20 + qx * G21)
            gx = 2.0 * (qy * G01 + qz * G02 + qy * G10 - 2.0 * qx * G11 - qw * G12 + qz * G20 + qw * G21
                        - 2.0 * qx * G22)
            gy = 2.0 * (-2.0 * qy * G00 + qx * G01 + qw * G02 + qx * G10 + qz * G12 - qw * G20 + qz * G21
                        - 2.0 * qy * G22)
            gz = 2.0 * (-2.0 * qz * G00 - qw * G01 + qx * G02 + qw * G10 - 2.0 * qz * G11 + qy * G12 + qx * G20
                        + qy * G21)
            dot = qw * gw + qx * gx + qy * gy + qz * gz  # through q / |q|
            g_quats[i, 0] = (gw - qw * dot) / norm
            g_quats[i, 1] = (gx - qx * dot) / norm
            g_quats[i, 2] = (gy - qy * dot) / norm
            g_quats[i, 3] = (gz - qz * dot) / norm
        return g_means, g_quats, g_scales, g_view

    @numba.njit(cache=True, nogil=True)
    def sh_colors(coeffs, dirs, degree):  # pragma: no cover - compiled
        """max(eval_sh(degree, coeffs, dirs) + 0.5, 0): [n, 3] from coeffs [n, K, 3], dirs [n, 3]."""
        n = coeffs.shape[0]
        out = np.empty((n, 3))
        for i in range(n):
            norm = max(math.sqrt(dirs[i, 0] ** 2 + dirs[i, 1] ** 2 + dirs[i, 2] ** 2), 1e-12)
            x, y, z = dirs[i, 0] / norm, dirs[i, 1] / norm, dirs[i, 2] / norm
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            for ch in range(3):
                s = C0 * coeffs[i, 0, ch]
                if degree >= 1:
                    s += -C1 * y * coeffs[i, 1, ch] + C1 * z * coeffs[i, 2, ch] - C1 * x * coeffs[i, 3, ch]
                if degree >= 2:
                    s += (C2[0] * xy * coeffs[i, 4, ch] + C2[1] * yz * coeffs[i, 5, ch]
                          + C2[2] * (2.0 * zz - xx - yy) * coeffs[i, 6, ch] + C2[3] * xz * coeffs[i, 7, ch]
                          + C2[4] * (xx - yy) * coeffs[i, 8, ch])
                if degree >= 3:
                    s += (C3[0] * y * (3.0 * xx - yy) * coeffs[i, 9, ch] + C3[1] * xy * z * coeffs[i, 10, ch]
                          + C3[2] * y * (4.0 * zz - xx - yy) * coeffs[i, 11, ch]
                          + C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * coeffs[i, 12, ch]
                          + C3[4] * x * (4.0 * zz - xx - yy) * coeffs[i, 13, ch]
                          + C3[5] * z * (xx - yy) * coeffs[i, 14, ch] + C3[6] * x * (xx - 3.0 * yy) * coeffs[i, 15, ch])
                out[i, ch] = max(s + 0.5, 0.0)
        return out

    _kernels = (forward, backward, project, sh_colors, project_backward, draw)
    return _kernels


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)


class _CompositeNumba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, width, height):
        fwd = _compile()[0]
        inputs = tuple(_np(t) for t in (means2d, conics, opacities, feats))
        out, T, last = fwd(*inputs, width, height)
        ctx.state = (inputs, width, height, T, last)
        return torch.from_numpy(out).to(feats.dtype).to(feats.device)

    @staticmethod
    def backward(ctx, grad_out):
        bwd = _compile()[1]
        inputs, width, height, T, last = ctx.state
        grads = bwd(*inputs, width, height, T, last, _np(grad_out))
        like = grad_out
        return tuple(torch.from_numpy(g).to(like.dtype).to(like.device) for g in grads) + (None, None)


class _ProjectNumba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, viewmat, opacities, K, width, height, near, far, eps2d):
        proj = _compile()[2]
        inputs = (_np(means), _np(quats), _np(scales), _np(opacities), _np(viewmat), _np(K))
        means2d, conics, depths, radii, visible = proj(*inputs, width, height, near, far, eps2d)
        ctx.state = (inputs, width, height, near, far, eps2d)
        radii, visible = torch.from_numpy(radii), torch.from_numpy(visible)
        ctx.mark_non_differentiable(radii, visible)
        like = means
        return (torch.from_numpy(means2d).to(like), torch.from_numpy(conics).to(like),
                torch.from_numpy(depths).to(like), radii, visible)

    @staticmethod
    def backward(ctx, g_means2d, g_conics, g_depths, _radii, _visible):
        bwd = _compile()[4]
        inputs, width, height, near, far, eps2d = ctx.state
        grads = bwd(*inputs, width, height, near, far, eps2d, _np(g_means2d), _np(g_conics), _np(g_depths))
        g_means, g_quats, g_scales, g_view = (torch.from_numpy(g).to(g_means2d) for g in grads)
        return (g_means, g_quats, g_scales, g_view if ctx.needs_input_grad[3] else None) + (None,) * 7


def project_numba(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmat: Tensor, K: Tensor,
                  width: int, height: int, near: float, far: float, eps2d: float):
    """:func:`.projection.project` (same outputs, as a :class:`.projection.Projected`) with its forward and
    backward compiled: differentiable in means, quats, scales and viewmat; K and opacities are constants here
    (opacity only culls). One launch each way instead of ~60 tensor operations and their autograd nodes."""
    from .projection import Projected

    means2d, conics, depths, radii, visible = _ProjectNumba.apply(
        means, quats, scales, viewmat, opacities.detach(), K.detach(), width, height, near, far, eps2d)
    return Projected(means2d, conics, depths, radii, visible)


def composite_numba(means2d: Tensor, conics: Tensor, opacities: Tensor, feats: Tensor, width: int,
                    height: int) -> Tensor:
    """[height * width, F] composited features of Gaussians sorted front to back (see
    :func:`.raster_torch.composite`, whose contract this shares)."""
    return _CompositeNumba.apply(means2d, conics, opacities, feats, width, height)


def render_numba(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmat: Tensor,
                 K: Tensor, width: int, height: int, sh_degree: int | None, near: float, far: float,
                 eps2d: float = 0.3,
                 background: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """One camera without autograd, every step compiled: what ``rasterize`` computes for it.

    Returns image [H, W, D] (+ ``(1 - alpha) background`` when one is given: [D] or [H, W, D]), alpha [H, W, 1],
    depth [H, W, 1] and info (means2d [N, 2], radii [N, 2], depths [N]), as tensors of the inputs' dtype: the
    kernel writes the outputs, no per-pixel tensor operation follows."""
    _, _, proj, sh, _, draw = _compile()
    m = _np(means)
    means2d, conics, depths, radii, visible = proj(m, _np(quats), _np(scales), _np(opacities), _np(viewmat), _np(K),
                                                   width, height, near, far, eps2d)
    idx = np.nonzero(visible)[0]
    idx = idx[np.argsort(depths[idx], kind="stable")]  # front to back, ties in index order (as torch's stable sort)
    c = _np(colors)
    if sh_degree is not None:
        vm = _np(viewmat)
        campos = -vm[:3, :3].T @ vm[:3, 3]
        c = sh(c, m - campos, sh_degree)  # every Gaussian's: a gather of the visible ones costs more than the few
    D = c.shape[1]
    dtype = means.dtype
    if background is None:
        bg = np.zeros((1, D))
    else:
        bg = np.ascontiguousarray(background.detach().cpu().numpy()).reshape(-1, D)
        if bg.shape[0] not in (1, width * height):
            raise ValueError(f"background {tuple(background.shape)} is neither [{D}] nor [{height}, {width}, {D}]")
    image = torch.empty(height, width, D, dtype=dtype)
    alpha = torch.empty(height, width, 1, dtype=dtype)
    depth = torch.empty(height, width, 1, dtype=dtype)
    draw(idx, means2d, conics, _np(opacities), np.ascontiguousarray(c), depths, width, height, bg,
         image.numpy().reshape(-1, D), alpha.numpy().reshape(-1), depth.numpy().reshape(-1))
    info = {"means2d": torch.from_numpy(means2d).to(dtype), "radii": torch.from_numpy(radii),
            "depths": torch.from_numpy(depths).to(dtype)}
    return image, alpha, depth, info
