"""Gaussian splatting core shared by every Gaussian method: one rasterizer API, two backends.

* :func:`rasterize` renders 3D Gaussians with gsplat's conventions (``backend="torch"`` runs anywhere and is
  the reference, ``"numba"`` is the same on CPU with compiled loops -- the default there when numba is
  installed --, ``"gsplat"`` on CUDA);
* :func:`eval_sh` evaluates spherical-harmonic colours;
* :class:`GaussianModel` holds learnable parameters, saves/loads safetensors and exports 3DGS ``.ply``;
* :class:`DensityStrategy` is 3DGS's adaptive density control (clone, split, prune, opacity reset).

The triplane NeRF core lives beside it (import the modules directly): :mod:`talkinghead.render.volume` (rays,
stratified + importance sampling, EG3D triplane sampling, OSG decoder, compositing) and
:mod:`talkinghead.render.superres` (EG3D-style super-resolution of the rendered feature image).
"""

from .model import GaussianModel
from .projection import quat_to_rotmat
from .rasterize import EPS2D, gsplat_available, low_pass, rasterize
from .sh import eval_sh, num_sh_bases, rgb_to_sh, sh_to_rgb
from .strategy import DensityStrategy

__all__ = [
    "rasterize",
    "low_pass",
    "EPS2D",
    "gsplat_available",
    "eval_sh",
    "num_sh_bases",
    "rgb_to_sh",
    "sh_to_rgb",
    "quat_to_rotmat",
    "GaussianModel",
    "DensityStrategy",
]
