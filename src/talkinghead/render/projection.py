"""EWA projection of 3D Gaussians to screen-space 2D Gaussians (Zwicker et al. 2001; Kerbl et al. 2023, eq. 5).

Conventions are the project's (``talkinghead.camera``): OpenCV camera, world-to-camera ``viewmat``,
pixel centres at +0.5, quaternions (w, x, y, z). Everything here is plain differentiable PyTorch on
[N]-sized tensors; the per-pixel work lives in :mod:`talkinghead.render.raster_torch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # 3DGS skips a Gaussian at a pixel where its alpha falls below this.


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[N, 4] (w, x, y, z), any norm -> [N, 3, 3] rotation matrices."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


@dataclass
class Projected:
    """Screen-space Gaussians of one camera. All tensors have N rows (culled ones included)."""

    means2d: Tensor  # [N, 2] pixel coordinates of the centres
    conics: Tensor  # [N, 3] inverse 2D covariance (a, b, c) of [[a, b], [b, c]], low-pass included
    depths: Tensor  # [N] camera-space z
    radii: Tensor  # [N, 2] int32 half-extent in pixels (x, y); 0 where culled (gsplat's ``radii``)
    visible: Tensor  # [N] bool: in front of the near plane, finite footprint, overlapping the image


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmat: Tensor,  # [4, 4]
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projected:
    """Project 3D Gaussians with the local affine (EWA) approximation of the perspective map.

    ``eps2d`` is the 3DGS low-pass: 0.3 px^2 added to the 2D covariance so that every Gaussian covers at
    least about one pixel. The screen extent of a Gaussian is where its alpha stays >= 1/255, i.e.
    ``sqrt(2 ln(255 * opacity))`` standard deviations along each image axis (<= 3.33 sigma): the 3-sigma
    rule of 3DGS made exact, so no pixel that the compositor would keep is left out.
    """
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    p = means @ R.T + t  # camera space
    x, y, z = p.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    in_depth = (z > near_plane) & (z < far_plane)
    zs = torch.where(in_depth, z, torch.ones_like(z))  # keeps culled rows finite (and their gradients zero)

    # The Jacobian is evaluated with x/z, y/z clamped to 1.3x the field of view, as 3DGS does: far outside
    # the image the affine approximation explodes and would make huge, wrong footprints.
    lim_x = 0.3 * 0.5 * width / fx
    lim_y = 0.3 * 0.5 * height / fy
    tx = zs * torch.minimum(torch.maximum(x / zs, -(cx / fx + lim_x)), (width - cx) / fx + lim_x)
    ty = zs * torch.minimum(torch.maximum(y / zs, -(cy / fy + lim_y)), (height - cy) / fy + lim_y)
    # cov2d = (J W)(J W)^T with W = R_view R_q S: the 3D covariance never needs forming. The shared
    # rotation goes through one [3, 3] x [3, 3N] matmul; J has only four non-zeros, so J W is elementwise
    # (batched 3x3 matmuls are slow on CPU).
    Wm = torch.einsum("ik,nkj->nij", R, quat_to_rotmat(quats) * scales[:, None, :])  # [N, 3, 3]
    j00, j02 = fx / zs, -fx * tx / zs**2
    j11, j12 = fy / zs, -fy * ty / zs**2
    r0 = j00[:, None] * Wm[:, 0] + j02[:, None] * Wm[:, 2]  # first row of J W, [N, 3]
    r1 = j11[:, None] * Wm[:, 1] + j12[:, None] * Wm[:, 2]
    a = (r0 * r0).sum(-1) + eps2d
    b = (r0 * r1).sum(-1)
    c = (r1 * r1).sum(-1) + eps2d
    det = a * c - b * b
    ok = in_depth & (det > 0) & (opacities >= ALPHA_MIN)
    inv_det = 1.0 / torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c * inv_det, -b * inv_det, a * inv_det], -1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)

    with torch.no_grad():
        # Beyond this many sigmas, opacity * exp(-d^2 / 2) < 1/255.
        n_sigma = torch.sqrt(2.0 * torch.log(opacities.clamp(min=ALPHA_MIN, max=1.0) * 255.0))
        ext_x = n_sigma * a.clamp(min=0).sqrt()
        ext_y = n_sigma * c.clamp(min=0).sqrt()
        u, v = means2d.unbind(-1)
        # Pixel i is inside when its centre i + 0.5 lies within [u - ext, u + ext].
        x0 = torch.ceil(u - ext_x - 0.5).clamp(0, width)
        x1 = (torch.floor(u + ext_x - 0.5) + 1).clamp(0, width)
        y0 = torch.ceil(v - ext_y - 0.5).clamp(0, height)
        y1 = (torch.floor(v + ext_y - 0.5) + 1).clamp(0, height)
        ok = ok & (x1 > x0) & (y1 > y0) & torch.isfinite(u) & torch.isfinite(v)
        radii = torch.stack([torch.ceil(ext_x), torch.ceil(ext_y)], -1).nan_to_num(0).int() * ok[:, None]
    return Projected(means2d, conics, z, radii, ok)
