"""Real spherical harmonics up to degree 3, in the basis and sign convention of 3D Gaussian Splatting.

The constants are the normalisation factors of the real SH basis functions Y_l^m (standard math; see
Sloan, "Stupid Spherical Harmonics Tricks", 2008, appendix A2). Coefficients are laid out as
``[N, K, 3]`` with ``K >= (degree + 1) ** 2``, band by band, which is the layout of gsplat and of the
3DGS ``.ply`` files (``f_dc`` is k = 0, ``f_rest`` the rest).
"""

from __future__ import annotations

import torch
from torch import Tensor

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for ``degree`` (0..3)."""
    return (degree + 1) ** 2


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """DC coefficient that renders as ``rgb`` (inverse of ``C0 * dc + 0.5``)."""
    return (rgb - 0.5) / C0


def sh_to_rgb(dc: Tensor) -> Tensor:
    """Colour of a DC-only SH coefficient, before the clamp at 0."""
    return dc * C0 + 0.5


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Evaluate SH colours.

    Args:
        degree: 0..3; only the first ``(degree + 1) ** 2`` coefficients are used.
        coeffs: [N, K, 3] SH coefficients.
        dirs: [N, 3] viewing directions (camera centre -> Gaussian); need not be normalised.

    Returns:
        [N, 3] raw SH value. 3DGS (and gsplat's ``rasterization``) render ``clamp_min(value + 0.5, 0)``.
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    if coeffs.shape[-2] < num_sh_bases(degree):
        raise ValueError(f"degree {degree} needs {num_sh_bases(degree)} coefficients, got {coeffs.shape[-2]}")
    out = C0 * coeffs[..., 0, :]
    if degree == 0:
        return out
    d = torch.nn.functional.normalize(dirs, dim=-1)
    x, y, z = (d[..., i : i + 1] for i in range(3))
    out = out - C1 * y * coeffs[..., 1, :] + C1 * z * coeffs[..., 2, :] - C1 * x * coeffs[..., 3, :]
    if degree == 1:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (
        out
        + C2[0] * xy * coeffs[..., 4, :]
        + C2[1] * yz * coeffs[..., 5, :]
        + C2[2] * (2.0 * zz - xx - yy) * coeffs[..., 6, :]
        + C2[3] * xz * coeffs[..., 7, :]
        + C2[4] * (xx - yy) * coeffs[..., 8, :]
    )
    if degree == 2:
        return out
    return (
        out
        + C3[0] * y * (3.0 * xx - yy) * coeffs[..., 9, :]
        + C3[1] * xy * z * coeffs[..., 10, :]
        + C3[2] * y * (4.0 * zz - xx - yy) * coeffs[..., 11, :]
        + C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * coeffs[..., 12, :]
        + C3[4] * x * (4.0 * zz - xx - yy) * coeffs[..., 13, :]
        + C3[5] * z * (xx - yy) * coeffs[..., 14, :]
        + C3[6] * x * (xx - 3.0 * yy) * coeffs[..., 15, :]
    )
