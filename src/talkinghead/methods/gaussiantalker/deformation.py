"""Attribute MLPs: F_can (eq. 8) -> canonical scale, rotation, SH, opacity; F_deform (eq. 14) -> their offsets.

Both are an MLP trunk with one linear head per attribute. F_deform's heads start at zero, so training the
deformation stage starts from the canonical head exactly (eq. 9 with all offsets 0).

Deviation from "every attribute from the triplane": the canonical log-scale is a fixed per-Gaussian base
(from the spacing of the initial points) plus F_can's output, so that initial Gaussians neither overlap
massively nor leave holes; F_can still predicts every attribute. Opacity and SH DC heads start biased to
3DGS's initial opacity 0.1 and to grey.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTRS = ("scale", "rotation", "sh", "opacity")


class AttributeMLP(nn.Module):
    """[N, in_dim] -> dict of [N, k] raw attributes (``means`` too when ``with_means``)."""

    def __init__(self, in_dim: int, hidden: int, num_sh: int, with_means: bool, zero_init: bool):
        super().__init__()
        # Leaky: with ReLU, most of F_deform's second layer died within a few hundred deformation steps on
        # real data (measured: 0 of 64 units alive at lr 1e-2, 35 of 64 at 2e-3), freezing the offsets.
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                                   nn.LeakyReLU(0.1))
        sizes = {"scale": 3, "rotation": 4, "sh": num_sh * 3, "opacity": 1}
        if with_means:
            sizes = {"means": 3, **sizes}
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in sizes.items()})
        if zero_init:
            for h in self.heads.values():
                nn.init.zeros_(h.weight)
                nn.init.zeros_(h.bias)
        self.num_sh = num_sh

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        # The heads as one matrix product (their weights stacked), split per attribute: same values, one launch.
        heads = list(self.heads.values())
        w = torch.cat([head.weight for head in heads])
        b = torch.cat([head.bias for head in heads])
        parts = F.linear(h, w, b).split([head.out_features for head in heads], dim=-1)
        out = dict(zip(self.heads.keys(), parts))
        out["sh"] = out["sh"].unflatten(-1, (self.num_sh, 3))
        return out


class CanonicalMLP(AttributeMLP):
    """F_can (eq. 8): f(mu_c) -> s_c (log, added to a base), r_c (quaternion), SH_c, alpha_c (logit)."""

    def __init__(self, in_dim: int, hidden: int, num_sh: int):
        super().__init__(in_dim, hidden, num_sh, with_means=False, zero_init=False)
        with torch.no_grad():
            for k in ATTRS:  # small outputs at start: attributes = their biases below
                self.heads[k].weight.mul_(0.1)
                self.heads[k].bias.zero_()
            self.heads["rotation"].bias[0] = 1.0  # identity quaternion (w, x, y, z)
            self.heads["opacity"].bias.fill_(math.log(0.1 / 0.9))


class DeformMLP(AttributeMLP):
    """F_deform (eq. 14): z_n^L -> offsets of mu, s, r, SH, alpha (zero at start)."""

    def __init__(self, in_dim: int, hidden: int, num_sh: int):
        super().__init__(in_dim, hidden, num_sh, with_means=True, zero_init=True)
