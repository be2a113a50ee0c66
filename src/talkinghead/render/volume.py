"""Triplane volume rendering (EG3D, Chan et al. 2022, sec. 4): rays -> samples -> triplane -> decoder -> pixels.

The NeRF core shared by every triplane method (Talk3D, the one-shot 3-D talking face). Plain differentiable
PyTorch; the camera convention is the project's (:mod:`talkinghead.camera`: OpenCV axes, world-to-camera
``viewmat``, pixel centres at +0.5), the same as the Gaussian rasterizer's, so a volume head and a Gaussian head
rendered with one ``(viewmat, K)`` land on the same pixels.

API (shapes: N rays, S samples per ray, C plane channels, R plane side, F decoder feature channels)::

    cfg = VolumeConfig(num_coarse=48, num_fine=48, chunk=8192)
    decoder = OSGDecoder(in_channels=C, hidden=64, out_channels=32)
    out = render_triplane(planes, decoder, box, viewmat, K, width, height, cfg)   # planes: [3, C, R, R]
    out["features"]  # [H, W, F] alpha-weighted features; channels 0..2 are the low-resolution RGB image
    out["alpha"]     # [H, W] accumulated opacity (1 - transmittance through the box)
    out["depth"]     # [H, W] expected ray distance of the weights (0 where alpha is 0)

    # the pieces, for methods that need them one by one:
    origins, dirs = camera_rays(viewmat, K, width, height)    # [H*W, 3] each, row-major, unit dirs
    viewmat_box = scene_viewmat(viewmat, centre, scale)       # the camera for a scene in box units
    near, far = ray_box(origins, dirs, box)                   # [N] each; near == far where a ray misses
    feats = sample_triplane(planes, normalize_points(xyz, box))  # xyz [M, 3] -> [M, 3, C] (one row per plane)
    field = TriplaneField(planes, decoder, box)               # xyz [M, 3] -> (sigma_raw [M], features [M, F])
    out = render_rays(field, origins, dirs, near, far, cfg)   # {"features": [N, F], "alpha": [N], "depth": [N]}

* Triplane (EG3D sec. 4.1): three axis-aligned feature planes ``planes[0]`` = xy, ``planes[1]`` = xz,
  ``planes[2]`` = zy (:data:`PLANE_AXES`); in plane p with axes (a, b), the point's coordinate a picks the column
  and b the row (``grid_sample``'s x and y). ``box`` [2, 3] (min, max corner, world units) maps onto [-1, 1]^3
  like EG3D's ``box_warp``; features are bilinear with ``align_corners=False`` and zero outside the box, and the
  three planes' features are aggregated by their mean (EG3D's decoder input is ``sampled_features.mean(1)``).
* Decoder (EG3D's OSGDecoder): one hidden layer of 64 with softplus, then 1 + F outputs: a raw density and F
  features squashed as EG3D does, ``sigmoid(x) * (1 + 2e-3) - 1e-3``.
* Sampling (EG3D's ImportanceRenderer): ``num_coarse`` stratified samples in [near, far] (jittered within
  their bins when ``perturb``, bin centres otherwise), then ``num_fine`` importance samples drawn by inverse CDF
  from the coarse weights (max-pooled, average-pooled and floored by 0.01 as EG3D), all samples sorted and
  composited together; the coarse decoder outputs are reused, as EG3D's ``unify_samples`` does. Sample
  positions carry no gradient (they never do in NeRF); everything the field returns does.
* Compositing (EG3D's MipRayMarcher2): S samples make S - 1 intervals; each interval takes the mean density and
  features of its two ends, density ``softplus(sigma_raw + density_offset)`` (EG3D's offset is -1),
  ``alpha_i = 1 - exp(-density_i * delta_i)``, weight ``w_i = alpha_i * prod_{j<i} (1 - alpha_j)``.
  ``features = sum_i w_i f_i``; ``alpha = sum_i w_i``. No white background: the caller composites over its own.
* Rays: the ray range is the ray's intersection with ``box`` (grown by ``cfg.margin``) -- the head, not a fixed
  [ray_start, ray_end] as EG3D's fixed-radius FFHQ cameras allow; rays that miss have zero length and render
  alpha 0. :func:`render_triplane` processes ``cfg.chunk`` rays at a time, so a 512^2 image fits a GPU and a
  128^2 one two CPU cores; with gradients on, every chunk's graph is kept until backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (first, second) world axis of each plane: xy, xz, zy as EG3D's generate_planes + project_onto_planes.
PLANE_AXES = ((0, 1), (0, 2), (2, 1))

Field = Callable[[Tensor], tuple[Tensor, Tensor]]  # xyz [M, 3] -> (sigma_raw [M], features [M, F])


@dataclass
class VolumeConfig:
    """How rays are sampled and composited (EG3D's rendering_kwargs, with our ray range)."""

    num_coarse: int = 48  # stratified samples per ray (EG3D / Talk3D: depth_resolution 48)
    num_fine: int = 48  # importance samples per ray (depth_resolution_importance 48); 0: coarse only
    density_offset: float = -1.0  # density = softplus(sigma_raw + offset), EG3D's "softplus" clamp mode
    margin: float = 0.0  # grow the box by this fraction of its size on every side for the ray range
    chunk: int = 8192  # rays per batch in render_triplane (memory ~ chunk * samples * channels)

    def __post_init__(self) -> None:
        if self.num_coarse < 2:
            raise ValueError("num_coarse must be >= 2 (compositing works on intervals between samples)")
        if self.num_fine < 0 or self.chunk < 1:
            raise ValueError("num_fine must be >= 0 and chunk >= 1")


# ------------------------------------------------------------------------------------------------ rays


def camera_rays(viewmat: Tensor, K: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """World-space rays through the pixel centres of a (width x height) image, row-major (ray v * W + u).

    viewmat: [4, 4] world-to-camera, K: [3, 3] -> origins [H*W, 3], unit directions [H*W, 3]."""
    dev, dt = viewmat.device, viewmat.dtype
    v, u = torch.meshgrid(torch.arange(height, device=dev, dtype=dt) + 0.5,
                          torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij")
    d_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1).reshape(-1, 3)
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    dirs = F.normalize(d_cam @ R, dim=-1)  # R^T d for each row
    origin = -(R.T @ t)
    return origin.expand_as(dirs), dirs


def scene_viewmat(viewmat: Tensor, centre: Tensor, scale: Tensor | float) -> Tensor:
    """[4, 4] the same camera for the scene moved by -``centre`` [3] and shrunk by ``scale``: X' = (X - c) / s.

    A method can thus render in box units (EG3D's heads are about 1 unit across) whatever its world's metric
    size; the image is unchanged (same rotation, camera centre (C - c) / s, and K is scale-invariant), only ray
    distances -- hence densities -- are measured in box units."""
    vm = viewmat.clone()
    vm[:3, 3] = (viewmat[:3, :3] @ centre + viewmat[:3, 3]) / scale
    return vm


def ray_box(origins: Tensor, dirs: Tensor, box: Tensor, margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """Entry and exit distances [N] of rays [N, 3] through the axis-aligned ``box`` [2, 3] (slab method).

    Rays that miss (or start beyond the box) get ``near == far``; a ray starting inside starts at 0."""
    lo, hi = box[0], box[1]
    grow = margin * (hi - lo)
    lo, hi = lo - grow, hi + grow
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (lo - origins) * inv, (hi - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    far = torch.maximum(far, near)
    return near, far


# ------------------------------------------------------------------------------------------------ samples


def stratified_samples(near: Tensor, far: Tensor, n: int, perturb: bool,
                       generator: torch.Generator | None = None) -> Tensor:
    """[N, n] distances: n equal bins over [near, far] per ray, one sample per bin (jittered or the centre)."""
    edges = torch.linspace(0.0, 1.0, n + 1, device=near.device, dtype=near.dtype)
    lo, width = edges[:-1], edges[1] - edges[0]
    if perturb:
        jitter = torch.rand((near.shape[0], n), device=near.device, dtype=near.dtype, generator=generator)
    else:
        jitter = torch.full((near.shape[0], n), 0.5, device=near.device, dtype=near.dtype)
    s = lo + jitter * width
    return near[:, None] + (far - near)[:, None] * s


def importance_samples(t: Tensor, weights: Tensor, n: int, perturb: bool,
                       generator: torch.Generator | None = None) -> Tensor:
    """[N, n] distances drawn from the piecewise-constant pdf of the coarse ``weights`` [N, S-1], one per
    interval [t_i, t_i+1] of the sorted coarse samples ``t`` [N, S] (EG3D's ``sample_importance``): the weights
    are max-pooled then average-pooled over neighbours (kernel 2) and floored by 0.01 so that every interval
    keeps some samples; then inverse-CDF sampling (NeRF's ``sample_pdf``), ``u`` uniform or, without
    ``perturb``, at the n quantile centres."""
    with torch.no_grad():
        w = F.max_pool1d(F.pad(weights[:, None], (1, 1), mode="replicate"), 2, 1)  # [N, 1, S]
        pdf_w = F.avg_pool1d(w, 2, 1)[:, 0] + 0.01  # [N, S-1]
        edges = t
        pdf = pdf_w / pdf_w.sum(-1, keepdim=True)
        cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # [N, B+1]
        cdf[:, -1] = 1.0
        if perturb:
            u = torch.rand((t.shape[0], n), device=t.device, dtype=t.dtype, generator=generator)
        else:
            u = (torch.arange(n, device=t.device, dtype=t.dtype) + 0.5).div(n).expand(t.shape[0], n)
        u = u.contiguous()
        idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[1] - 1)
        c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
        e0, e1 = edges.gather(1, idx - 1), edges.gather(1, idx)
        frac = (u - c0) / torch.where(c1 - c0 < 1e-8, torch.ones_like(c0), c1 - c0)
        return e0 + frac * (e1 - e0)


# ------------------------------------------------------------------------------------------------ triplane


def normalize_points(xyz: Tensor, box: Tensor) -> Tensor:
    """World points [M, 3] -> [M, 3] with ``box`` [2, 3] mapped onto [-1, 1]^3 (not clamped)."""
    return (xyz - box[0]) / (box[1] - box[0]) * 2.0 - 1.0


def sample_triplane(planes: Tensor, coords: Tensor) -> Tensor:
    """Bilinear features [M, 3, C] of normalised points ``coords`` [M, 3] on ``planes`` [3, C, R, R].

    Row p holds plane p's feature (axes :data:`PLANE_AXES`); zero outside [-1, 1] (EG3D: padding zeros,
    align_corners False)."""
    grid = torch.stack([coords[:, list(ax)] for ax in PLANE_AXES])  # [3, M, 2] (x = column, y = row)
    out = F.grid_sample(planes, grid[:, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[..., 0].permute(2, 0, 1)  # [3, C, M, 1] -> [M, 3, C]


class OSGDecoder(nn.Module):
    """EG3D's decoder: aggregated triplane feature [M, C] -> (sigma_raw [M], features [M, out_channels])."""

    def __init__(self, in_channels: int = 32, hidden: int = 64, out_channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.Softplus(), nn.Linear(hidden, 1 + out_channels))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.net(x)
        return y[:, 0], torch.sigmoid(y[:, 1:]) * (1 + 2 * 0.001) - 0.001


class TriplaneField:
    """A field function for :func:`render_rays`: world xyz [M, 3] -> decoder(mean over planes of the features)."""

    def __init__(self, planes: Tensor, decoder: Callable[[Tensor], tuple[Tensor, Tensor]], box: Tensor):
        self.planes, self.decoder, self.box = planes, decoder, box

    def __call__(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(sample_triplane(self.planes, normalize_points(xyz, self.box)).mean(1))


# ------------------------------------------------------------------------------------------------ compositing


def composite(sigma_raw: Tensor, features: Tensor, t: Tensor, density_offset: float = -1.0) -> dict[str, Tensor]:
    """Alpha compositing of S sorted samples per ray (EG3D's MipRayMarcher2).

    sigma_raw [N, S], features [N, S, F], t [N, S] -> features [N, F], alpha [N], depth [N], weights [N, S-1]."""
    delta = t[:, 1:] - t[:, :-1]  # [N, S-1]
    sig = 0.5 * (sigma_raw[:, 1:] + sigma_raw[:, :-1])
    feat = 0.5 * (features[:, 1:] + features[:, :-1])
    mid = 0.5 * (t[:, 1:] + t[:, :-1])
    alpha_i = 1.0 - torch.exp(-F.softplus(sig + density_offset) * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha_i[:, :1]), 1.0 - alpha_i + 1e-10], -1), -1)[:, :-1]
    w = alpha_i * trans
    alpha = w.sum(-1)
    depth = (w * mid).sum(-1) / alpha.clamp(min=1e-10)
    return {"features": (w[..., None] * feat).sum(1), "alpha": alpha, "depth": depth, "weights": w}


def render_rays(field: Field, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor, cfg: VolumeConfig,
                perturb: bool = False, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Render N rays (origins, dirs [N, 3], ray range near, far [N]) through ``field``; see the module docstring.

    Returns features [N, F], alpha [N], depth [N]."""
    n = origins.shape[0]
    t_c = stratified_samples(near, far, cfg.num_coarse, perturb, generator)  # [N, Sc]
    pts = origins[:, None] + dirs[:, None] * t_c[..., None]
    sig_c, feat_c = field(pts.reshape(-1, 3))
    sig_c, feat_c = sig_c.reshape(n, -1), feat_c.reshape(n, cfg.num_coarse, -1)
    if cfg.num_fine == 0:
        out = composite(sig_c, feat_c, t_c, cfg.density_offset)
    else:
        coarse = composite(sig_c.detach(), feat_c.detach(), t_c, cfg.density_offset)
        t_f = importance_samples(t_c, coarse["weights"], cfg.num_fine, perturb, generator)  # [N, Sf]
        pts = origins[:, None] + dirs[:, None] * t_f[..., None]
        sig_f, feat_f = field(pts.reshape(-1, 3))
        t_all = torch.cat([t_c, t_f], 1)
        t_all, order = t_all.sort(1)
        sig = torch.cat([sig_c, sig_f.reshape(n, -1)], 1).gather(1, order)
        feat = torch.cat([feat_c, feat_f.reshape(n, cfg.num_fine, -1)], 1)
        feat = feat.gather(1, order[..., None].expand(-1, -1, feat.shape[-1]))
        out = composite(sig, feat, t_all, cfg.density_offset)
    out.pop("weights")
    return out


def render_triplane(planes: Tensor, decoder: Callable[[Tensor], tuple[Tensor, Tensor]], box: Tensor,
                    viewmat: Tensor, K: Tensor, width: int, height: int, cfg: VolumeConfig,
                    perturb: bool = False, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The image of the triplane ``planes`` [3, C, R, R] inside ``box`` [2, 3] seen by (viewmat [4, 4], K [3, 3]).

    Returns features [H, W, F] (channels 0..2: RGB), alpha [H, W], depth [H, W]; ``cfg.chunk`` rays at a time.
    Rays that miss the box skip the field entirely (alpha 0, features 0)."""
    origins, dirs = camera_rays(viewmat, K, width, height)
    near, far = ray_box(origins, dirs, box, cfg.margin)
    hit = (far > near).nonzero()[:, 0]
    field = TriplaneField(planes, decoder, box)
    parts: dict[str, list[Tensor]] = {"features": [], "alpha": [], "depth": []}
    for i in range(0, hit.shape[0], cfg.chunk):
        idx = hit[i:i + cfg.chunk]
        res = render_rays(field, origins[idx], dirs[idx], near[idx], far[idx], cfg, perturb, generator)
        for k in parts:
            parts[k].append(res[k])
    n = width * height
    num_f = getattr(decoder, "out_channels", None)
    if parts["features"]:
        num_f = parts["features"][0].shape[-1]
    feats = planes.new_zeros(n, num_f)
    alpha, depth = planes.new_zeros(n), planes.new_zeros(n)
    if hit.numel():
        # index_put (not in-place on a view) keeps the scatter differentiable.
        feats = feats.index_put((hit,), torch.cat(parts["features"]))
        alpha = alpha.index_put((hit,), torch.cat(parts["alpha"]))
        depth = depth.index_put((hit,), torch.cat(parts["depth"]))
    return {"features": feats.reshape(height, width, -1), "alpha": alpha.reshape(height, width),
            "depth": depth.reshape(height, width)}
