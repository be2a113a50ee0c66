"""Multi-resolution triplane feature field f(mu) (GaussianTalker sec. 4.2.1, eq. 7; DEGSTalk's position encoder H).

Three orthogonal feature planes P^xy, P^yz, P^zx of shape [H, R, R] per resolution R. A point is
normalised into the head's bounding box, projected onto each plane, and bilinearly interpolated; the three
plane features are multiplied elementwise (Hadamard product), and the products of all resolutions are
concatenated: f(mu) has H * len(resolutions) dimensions.

As in K-Planes (which the paper builds on), planes start uniform in [0.1, 0.5] so that the product of three
planes neither vanishes nor explodes at initialisation.

On a CPU with Numba installed the lookups run in :mod:`.triplane_numba` (the same interpolation, a much
cheaper backward than grid_sample's); ``fast=False`` keeps ``F.grid_sample``, the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import triplane_numba

# Coordinate pairs of the three planes, in the paper's order xy, yz, zx.
PLANES = ((0, 1), (1, 2), (2, 0))
_PAIRS = np.array(PLANES, dtype=np.int64)


class Triplane(nn.Module):
    """f: [N, 3] world points -> [N, channels * len(resolutions)] features."""

    def __init__(self, resolutions: tuple[int, ...], channels: int, bounds: Tensor | None = None,
                 fast: bool = True):
        super().__init__()
        self.fast = fast  # Numba lookups where usable (triplane_numba), else grid_sample
        self.planes = nn.ParameterList(
            nn.Parameter(torch.empty(3, channels, r, r).uniform_(0.1, 0.5)) for r in resolutions
        )
        # Axis-aligned box [2, 3] (min, max) mapped to [-1, 1]^3; points outside are clamped to its faces.
        self.register_buffer("bounds", bounds if bounds is not None else torch.tensor([[-1.0] * 3, [1.0] * 3]))

    @property
    def out_dim(self) -> int:
        return sum(p.shape[1] for p in self.planes)

    def normalize(self, xyz: Tensor) -> Tensor:
        """[N, 3] world -> [N, 3] in [-1, 1] (grid_sample's coordinates, corners aligned)."""
        lo, hi = self.bounds[0], self.bounds[1]
        return ((xyz - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)

    def forward(self, xyz: Tensor) -> Tensor:
        u = self.normalize(xyz)
        if self.fast and triplane_numba.usable(u, self.planes[0]):
            return torch.cat([triplane_numba.sample(u, planes, _PAIRS) for planes in self.planes], dim=-1)
        feats = []
        for planes in self.planes:
            prod = None
            for p, (i, j) in enumerate(PLANES):
                grid = u[:, (i, j)].view(1, -1, 1, 2)  # grid_sample wants (x = column, y = row)
                f = F.grid_sample(planes[p : p + 1], grid, mode="bilinear", align_corners=True)  # [1, C, N, 1]
                f = f[0, :, :, 0].t()  # [N, C]
                prod = f if prod is None else prod * f
            feats.append(prod)
        return torch.cat(feats, dim=-1)
