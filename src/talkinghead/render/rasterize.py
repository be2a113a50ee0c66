"""One differentiable rasterizer entry point with gsplat's semantics and two backends.

``backend="torch"`` is our own implementation (:mod:`projection` + :mod:`raster_torch`), running anywhere
PyTorch does; it is the reference. ``backend="numba"`` is the same projection with the compositing loops of
:mod:`raster_numba` (CPU tensors, needs the optional ``numba`` wheel; same result to float rounding, several
times faster). ``backend="gsplat"`` calls ``gsplat.rasterization`` (CUDA only), imported lazily so that this
module imports on machines without it. ``"auto"`` picks gsplat for CUDA tensors when gsplat is installed,
numba for CPU tensors when numba is installed, else torch.

Why Numba and not ``torch.compile``: Numba installs from wheels (llvmlite bundles its LLVM) and needs no C
compiler at run time, while torch.compile's CPU backend calls one each time it compiles; a user's machine
need not have one.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Literal

import torch
from torch import Tensor

from .projection import project
from .raster_numba import available as numba_available
from .raster_torch import composite
from .sh import eval_sh

Backend = Literal["auto", "torch", "numba", "gsplat"]

# The screen-space low-pass: px^2 added to every projected 2D covariance (3DGS and gsplat: 0.3).
EPS2D = 0.3


def low_pass(scale: float) -> float:
    """The ``eps2d`` for rendering at ``scale`` times the training size: 0.3 * scale^2 px^2 (at least 0.3).

    It keeps each Gaussian's footprint what it was trained with. With the fixed 0.3 px^2 the Gaussians of a
    128^2 avatar rendered at 512^2 are thinner than trained and the face degrades (the effect Mip-Splatting,
    Yu et al. 2024, describes; we only rescale the existing dilation, without its 3D filter). Measured in
    bench/RESULTS.md (issue 13)."""
    scale = max(1.0, float(scale))
    return EPS2D * scale * scale


def gsplat_available() -> bool:
    """True when CUDA is usable and the gsplat package is installed (nothing is imported)."""
    return torch.cuda.is_available() and importlib.util.find_spec("gsplat") is not None


def rasterize(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] (w, x, y, z), any norm
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    colors: Tensor,  # [N, D] features, or [N, K, 3] SH coefficients when sh_degree is given
    viewmat: Tensor,  # [4, 4] or [C, 4, 4] world-to-camera (OpenCV)
    K: Tensor,  # [3, 3] or [C, 3, 3]
    width: int,
    height: int,
    background: Tensor | None = None,  # [D] or [H, W, D]; batched: also [C, D] or [C, H, W, D]
    sh_degree: int | None = None,
    backend: Backend = "auto",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = EPS2D,  # px^2 screen-space low-pass (:func:`low_pass` for renders above the training size)
) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Render 3D Gaussians from one camera, or from C cameras at once.

    Returns ``(image, alpha, depth, info)``:
        image: [H, W, D] composited colours, plus ``(1 - alpha) * background`` when one is given;
        alpha: [H, W, 1] accumulated opacity;
        depth: [H, W, 1] expected camera-space depth ``sum(w_i z_i) / alpha`` (gsplat's "ED"), 0 where empty;
        info: as gsplat's ``meta``, always with a camera axis: ``means2d`` [C, N, 2] screen-space centres --
        call ``.retain_grad()`` on it before ``backward()`` to read the positional gradient densification
        uses; ``radii`` [C, N, 2] int pixel half-extents (0 = culled); ``depths`` [C, N] camera z; ``width``,
        ``height``, ``n_cameras``, ``backend``.
    With batched cameras (``viewmat`` [C, 4, 4]) image, alpha and depth gain a leading [C] axis too.

    With ``sh_degree`` the colour is ``max(SH(view direction) + 0.5, 0)`` as in 3DGS and gsplat.
    Differentiable in means, quats, scales, opacities, colors and background.
    """
    batched = viewmat.dim() == 3
    viewmats = viewmat if batched else viewmat[None]
    Ks = K if batched else K[None]
    if Ks.shape[0] != viewmats.shape[0]:
        raise ValueError(f"{viewmats.shape[0]} viewmats but {Ks.shape[0]} intrinsics")
    if (colors.dim() == 3) != (sh_degree is not None):
        raise ValueError("colors must be [N, K, 3] SH coefficients with sh_degree, [N, D] features without")
    if backend == "auto":
        if means.is_cuda:
            backend = "gsplat" if gsplat_available() else "torch"
        else:
            backend = "numba" if numba_available() else "torch"
    if backend == "gsplat":
        run = _rasterize_gsplat
    elif backend in ("torch", "numba"):
        run = functools.partial(_rasterize_torch, kernel=backend)
    else:
        raise ValueError(f"unknown backend {backend!r} (auto, torch, numba or gsplat)")
    args = (means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, near_plane, far_plane,
            float(eps2d))
    if backend == "numba" and not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (means, quats, scales, opacities, colors, background) if t is not None)):
        # inference: projection, sort, colours and the background composite compiled too
        image, alpha, depth, info = _render_numba(*args, background=background, batched=batched)
        background = None  # composited by the kernel
    else:
        image, alpha, depth, info = run(*args)
    if background is not None:
        bg = background.to(image)
        if bg.dim() == 1 or (batched and bg.dim() == 2):  # one colour (per camera)
            bg = bg[..., None, None, :]
        image = image + (1.0 - alpha) * bg
    info.update(width=width, height=height, n_cameras=viewmats.shape[0], backend=backend)
    if not batched:
        image, alpha, depth = image[0], alpha[0], depth[0]
    return image, alpha, depth, info


def _colors(colors: Tensor, means: Tensor, viewmat: Tensor, sh_degree: int | None) -> Tensor:
    if sh_degree is None:
        return colors
    campos = -viewmat[:3, :3].T @ viewmat[:3, 3]
    return torch.clamp_min(eval_sh(sh_degree, colors, means - campos) + 0.5, 0.0)


def _rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, near, far,
                     eps2d, kernel="torch"):
    if kernel == "numba" and not Ks.requires_grad:
        from .raster_numba import project_numba  # the same projection, compiled forward and backward

        projs = [project_numba(means, quats, scales, opacities, v, k, width, height, near, far, eps2d)
                 for v, k in zip(viewmats, Ks)]
    else:
        projs = [project(means, quats, scales, opacities, v, k, width, height, near, far, eps2d)
                 for v, k in zip(viewmats, Ks)]
    # retain_grad() only sees gradients on a tensor the loss was computed from, so the compositor reads
    # slices of the very [C, N, 2] tensor that info returns.
    means2d = torch.stack([p.means2d for p in projs])
    images, alphas, depths = [], [], []
    for c, (proj, viewmat) in enumerate(zip(projs, viewmats)):
        idx = torch.nonzero(proj.visible).squeeze(1)
        idx = idx[torch.argsort(proj.depths.detach()[idx], stable=True)]  # front to back
        pick = lambda t: t.index_select(0, idx)  # noqa: E731 (index_select: much faster than t[idx] on CPU)
        rgb = _colors(pick(colors), pick(means), viewmat, sh_degree)  # only for the Gaussians drawn
        D = rgb.shape[-1]
        feats = torch.cat([rgb, pick(proj.depths)[:, None], rgb.new_ones(idx.shape[0], 1)], 1)
        out = composite(pick(means2d[c]), pick(proj.conics), pick(opacities), feats, width, height, kernel=kernel)
        out = out.view(height, width, D + 2)
        images.append(out[..., :D])
        alphas.append(out[..., D + 1 :])
        depths.append(out[..., D : D + 1] / out[..., D + 1 :].clamp(min=1e-10))
    info = {
        "means2d": means2d,
        "radii": torch.stack([p.radii for p in projs]),
        "depths": torch.stack([p.depths for p in projs]),
    }
    return torch.stack(images), torch.stack(alphas), torch.stack(depths), info


def _render_numba(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, near, far,
                  eps2d, background, batched):
    """Every camera through :func:`.raster_numba.render_numba` (no autograd), the background composited there."""
    from .raster_numba import render_numba

    per_camera = background is not None and batched and background.dim() in (2, 4)  # [C, D] or [C, H, W, D]
    outs = [render_numba(means, quats, scales, opacities, colors, v, k, width, height, sh_degree, near, far, eps2d,
                         background[c] if per_camera else background) for c, (v, k) in enumerate(zip(viewmats, Ks))]
    if len(outs) == 1:  # one camera: views, no copies
        return (*(t[None] for t in outs[0][:3]), {key: t[None] for key, t in outs[0][3].items()})
    info = {key: torch.stack([o[3][key] for o in outs]) for key in ("means2d", "radii", "depths")}
    return (*(torch.stack([o[i] for o in outs]) for i in range(3)), info)


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, near, far,
                      eps2d):
    from gsplat import rasterization  # CUDA-only dependency, imported on use

    render, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near, far_plane=far, eps2d=eps2d, sh_degree=sh_degree,
        packed=False, rasterize_mode="classic", render_mode="RGB+ED",
    )  # fmt: skip
    radii = meta["radii"]
    if radii.dim() == 2:  # gsplat < 1.5 returns one radius per Gaussian
        radii = radii[..., None].expand(-1, -1, 2)
    info = {"means2d": meta["means2d"], "radii": radii, "depths": meta["depths"]}
    return render[..., :-1], alpha, render[..., -1:], info
