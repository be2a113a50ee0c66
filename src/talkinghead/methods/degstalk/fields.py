"""A deformable pre-embedding Gaussian field (DEGSTalk sec. II-B, eqs. 4-6): the face field or the mouth field.

* canonical Gaussians theta_C = {mu, s, q, alpha, f}: explicit 3DGS parameters in a
  :class:`talkinghead.render.GaussianModel`, with the learnable per-Gaussian embedding z in R^d as an extra
  per-Gaussian parameter (``extras={"embedding"}``), zero-initialised; 3DGS density control
  (:class:`talkinghead.render.DensityStrategy`) copies z when it clones or splits a Gaussian;
* H: the dense multi-resolution triplane (:class:`talkinghead.nn.triplane.Triplane`, three [C, R, R] planes
  per resolution; TalkingGaussian uses three 2-D multi-resolution hash grids, which a CPU budget does not
  need at 128^2);
* the deformation MLP: delta = MLP(H(mu) + z + c) = {d_mu, d_s, d_q} (eq. 5) where c is the frame's
  condition vector (f_a, f_e, ...: model.py), applied as theta_D = theta_C + delta (eq. 6): d_s on the
  log-scale, d_q on the quaternion before normalising, d_mu in units of ``offset_scale`` metres. The heads
  start at zero, so motion learning starts from the static field exactly. The mouth field predicts d_mu only.

Deviation: the paper writes H(mu + z), a tri-plane encoding of the concatenation; a tri-plane encodes 3-D
points only, so z is concatenated to H(mu) before the MLP (the same inputs reach the MLP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talkinghead.nn.triplane import Triplane
from talkinghead.render import GaussianModel

HEADS = {"means": 3, "scale": 3, "rotation": 4}


class DeformableField(nn.Module):
    """Canonical Gaussians + triplane + deformation MLP; ``attrs`` the attributes the MLP deforms."""

    def __init__(self, gaussians: GaussianModel, bounds: Tensor, resolutions: tuple[int, ...], channels: int,
                 cond_dim: int, hidden: int, offset_scale: float, attrs: tuple[str, ...] = tuple(HEADS)):
        super().__init__()
        self.gaussians = gaussians
        self.triplane = Triplane(resolutions, channels, bounds)
        self.embedding_dim = int(gaussians.embedding.shape[1]) if "embedding" in gaussians.extra_names else 0
        self.offset_scale = offset_scale
        in_dim = self.triplane.out_dim + self.embedding_dim + cond_dim
        # Leaky: GaussianTalker's deformation MLP lost most ReLU units within a few hundred steps.
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                                   nn.LeakyReLU(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, HEADS[k]) for k in attrs})
        for h in self.heads.values():
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        self._encoding: Tensor | None = None  # H(mu) + z while not training (render-time cache)

    def __len__(self) -> int:
        return len(self.gaussians)

    def encoding(self) -> Tensor:
        """[N, triplane + d] H(mu) concatenated with z (cached in eval mode: the canonical field is fixed)."""
        if not self.training and self._encoding is not None:
            return self._encoding
        g = self.gaussians
        parts = [self.triplane(g.means)]
        if self.embedding_dim:
            parts.append(g.embedding)
        enc = torch.cat(parts, -1)
        if not self.training:
            self._encoding = enc
        return enc

    def train(self, mode: bool = True):
        self._encoding = None
        return super().train(mode)

    def clear_cache(self) -> None:
        self._encoding = None

    def canonical(self) -> dict[str, Tensor]:
        """theta_C activated for the rasterizer: means [N, 3], quats [N, 4], scales [N, 3], opacities [N],
        sh [N, K, 3]."""
        g = self.gaussians
        return {"means": g.means, "quats": F.normalize(g.quats, dim=-1), "scales": g.scales,
                "opacities": g.opacities, "sh": g.sh}

    def deformation(self, cond: Tensor) -> dict[str, Tensor]:
        """Raw delta of eq. 5 for the condition vector ``cond`` [C]: {"means" [N, 3] metres, "scale" [N, 3]
        log, "rotation" [N, 4]} (the attributes this field deforms)."""
        enc = self.encoding()
        x = torch.cat([enc, cond[None].expand(enc.shape[0], -1)], -1)
        h = self.trunk(x)
        out = {k: head(h) for k, head in self.heads.items()}
        out["means"] = out["means"] * self.offset_scale
        return out

    def offsets_at(self, index: Tensor, cond: Tensor) -> Tensor:
        """d_mu [B, M, 3] (metres) of the Gaussians ``index`` [M] under B condition vectors ``cond`` [B, C]:
        the same MLP as :meth:`deformation`, for a few Gaussians and many frames at once."""
        g = self.gaussians
        parts = [self.triplane(g.means[index])]
        if self.embedding_dim:
            parts.append(g.embedding[index])
        enc = torch.cat(parts, -1)  # [M, F]
        B, M = cond.shape[0], enc.shape[0]
        x = torch.cat([enc[None].expand(B, -1, -1), cond[:, None].expand(-1, M, -1)], -1)
        return self.heads["means"](self.trunk(x)) * self.offset_scale

    def deformed(self, cond: Tensor | None) -> dict[str, Tensor]:
        """theta_D = theta_C + delta (eq. 6), activated; canonical when ``cond`` is None. With a condition
        the dict also holds ``offsets`` [N, 3] (d_mu in metres)."""
        if cond is None:
            return self.canonical()
        g = self.gaussians
        d = self.deformation(cond)
        log_s = g.log_scales + d["scale"] if "scale" in d else g.log_scales
        quats = g.quats + d["rotation"] if "rotation" in d else g.quats
        return {"means": g.means + d["means"], "quats": F.normalize(quats, dim=-1), "scales": torch.exp(log_s),
                "opacities": g.opacities, "sh": g.sh, "offsets": d["means"]}
