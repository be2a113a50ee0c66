"""GaussianTalker (ACM MM 2024): audio-driven deformation of triplane-encoded 3D Gaussians.

Pieces and where they follow the paper (``../shared/papers/001_e7f8775f0c6545fb.txt``):

* canonical Gaussians G_can = {mu_c, r_c, s_c, SH_c, alpha_c} (eq. 6): explicit positions mu_c (initialised
  from the face model, :mod:`talkinghead.methods.surface`), every other attribute from F_can(f(mu_c)) (eq. 8, :mod:`.deformation`)
  with f the multi-resolution triplane (eq. 7, :mod:`talkinghead.nn.triplane`);
* spatial-audio cross-attention over the tokens {audio, eye, viewpoint, null} (eqs. 10-13, :mod:`.attention`),
  L = 2 (GaussianTalker) or L = 1 (``--variant fast``, GaussianTalker*);
* F_deform: offsets of every attribute (eqs. 9, 14). Offsets of scale and opacity are added before their
  activations (log-scale, logit), of rotation before normalising the quaternion; position offsets are
  predicted in units of 1% of the head radius (:attr:`GaussianTalker.offset_scale`);
* rendering (eqs. 15, 16): the head's Gaussians splatted directly onto the frame's background + torso image
  (sec. 4.4.2, as ER-NeRF), with :func:`talkinghead.render.rasterize`;
* two stages (sec. 4.4.1): canonical (G_can only, L1 + lambda D-SSIM (+ LPIPS)), then deformation (the whole
  network, + lambda_lip x L1 of a mouth crop). The crop is rendered as its own camera at ``mouth_crop`` pixels
  wide from the full-size frame: at 128^2 the lips span ~25 pixels, so the lip loss sees them 2-3x finer.

Deviation that makes the audio learnable in the CPU budget: in the deformation stage the position offsets of
the Gaussians that started on the face model's mesh around the mouth -- its lip and chin vertices
(:data:`MOUTH_VERTICES`) and the points sampled on triangles touching one of them -- and the inner-mouth
Gaussians, bound between their nearest upper and lower inner-lip vertices (:func:`initial_points`) -- are also
pulled (squared error, weight ``lambda_geo``) towards their tracked displacement in that frame: the dataset's
per-frame expression through the person's linear face model, at a triangle point the barycentric mix of its
three vertices' displacements (training only -- rendering is driven by audio alone). Measured on the CNN clip:
without it, after 2250 deformation iterations at 128^2 the offsets varied by < 0.2 mm between frames and the
mouth did not follow the audio (mouth-opening correlation 0.12 with audio, 0.12 with silence); supervising all
478 vertices instead of the mouth's drowned the lips' few millimetres in the rest of the face (held-out
lower-lip correlation 0.17 vs 0.68 for the mouth set). Each step's geometry loss also averages in
``geo_replay`` earlier training frames (their audio window, blink, pose and tracked expression, remembered as
the trainer passes them; only the supervised Gaussians are deformed for them, nothing is rendered): with one
frame a step the audio -> lip mapping saw each frame ~2 times and underfit (predicted inner-lip gap std 0.8 mm
vs 3.1 mm tracked on training frames, 0.6 vs 2.6 mm held out).
With the lips alone supervised, the cavity stayed a closed slit behind them: lips placed at their *tracked*
positions still rendered no opening; with the bound cavity it shows (bench/RESULTS.md, issue 10, session 8:
landmark-sync confidence up in 4 of 4 seed/size pairs, mouth-opening r within the seed noise).
The training renders (frame and mouth crop) also place these Gaussians at their *tracked* displacement
(``tracked_lips``; straight-through, so the photometric gradient still reaches the offsets): trained on the
network's own, noisier positions, the colours and the cavity learned an average mouth that did not open where the
geometry did (lips moved to their tracked place rendered mouth-opening r 0.35 against the real frames, the
network's own 0.56); trained at the tracked place, the same oracle renders 0.87, and what remains between the
audio and the rendered opening is the audio -> lip-geometry mapping (bench/RESULTS.md, issue 10, session 9).
**Lip prior** (``lip_prior``, default 6): that mapping is a closed-form linear one. At build time a ridge map
from the standardised audio window (the 2R+1 rows the audio token reads) to the tracked expression's 6 leading
components (the face model's PCA order; the rest at their training mean) is fitted on the training frames,
its strength by blocked cross-validation (:func:`~talkinghead.methods.prior.fit_linear_prior`), and its audio
part scaled by one gain so that the bound Gaussians' out-of-fold displacement spreads as far as the tracked one
(``prior_full_variance``: ridge shrinks towards the mean, and a mouth opened half as wide rendered as barely
open). These Gaussians' positions then come from the prior alone, at render time; F_deform still gives their
scale, rotation, colour and opacity offsets, and every other Gaussian's position. Training is unchanged but for
the geometry loss, which has nothing left to train (the training renders put them at their tracked place).
Why: on the cnn test split the lip gap of the attention network, trained by the geometry loss, followed the
tracked gap at r 0.67-0.72 over seeds; a ridge on the same rows reaches 0.757 for the 6 leading components
(0.69 for all 24, 0.725 for 8, 0.760 for 4); the network trained as a residual on the prior brought it back
to 0.70. With the prior, seeds 0 / 1 / 2, ``eval --size 512`` mouth-opening r 0.640 / 0.729 / 0.671 against
0.576 / 0.448 / 0.634 with the network's lips; silence-driven 0.03 / 0.02 / -0.05 (bench/RESULTS.md, issue 10,
session 11).
``lip_prior = 0`` restores the network-placed lips with the geometry loss.

Other deviations: no adaptive density control (the point count stays ``num_gaussians``: the cpu-small budget has
no room for it, and mu_c starts on the face surface instead of from SfM); pre-norm attention blocks; the
canonical scale has a fixed per-point base (see :mod:`.deformation`); the eye token encodes prepare's blink
value (eye aspect ratio based) instead of AU45; LPIPS is used only when its weights are present locally.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talkinghead.face.landmarks import MOUTH_VERTICES, NUM_LANDMARKS
from talkinghead.methods.base import Batch, Condition, DatasetInfo, RenderCache, adam, decay_learning_rates
from talkinghead.methods.data import audio_windows
from talkinghead.methods.losses import PerceptualLoss, dssim
from talkinghead.methods.prior import fit_linear_prior
from talkinghead.methods.replay import FrameBank
from talkinghead.methods.surface import base_log_scales, initial_points, mesh_displacement
from talkinghead.nn.audio import AudioEncoder
from talkinghead.nn.triplane import Triplane
from talkinghead.render import EPS2D, num_sh_bases, rasterize

from talkinghead.nn.encoding import blink_encoding

from .attention import SpatialAudioAttention, ViewpointEncoder
from .config import GaussianTalkerConfig
from .deformation import CanonicalMLP, DeformMLP


class GaussianTalker(nn.Module):
    """The method's model; satisfies :class:`talkinghead.methods.base.Method`."""

    def __init__(self, cfg: GaussianTalkerConfig, info: DatasetInfo, points: Tensor | None = None,
                 expression_basis: Tensor | None = None, binding: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        n = cfg.num_gaussians
        if points is None:  # shapes only: the weights come from load_state_dict
            points = torch.zeros(n, 3)
            base, bounds = torch.zeros(n, 1), torch.tensor([[-1.0] * 3, [1.0] * 3])
        else:
            base = base_log_scales(points)
            lo, hi = points.min(0).values, points.max(0).values
            pad = 0.1 * (hi - lo)
            bounds = torch.stack([lo - pad, hi + pad])
        d = cfg.feature_dim
        self.num_sh = num_sh_bases(cfg.sh_degree)
        self.means = nn.Parameter(points.clone())  # mu_c [N, 3]
        self.register_buffer("base_log_scale", base)  # [N, 1]
        self.register_buffer("deform_on", torch.zeros((), dtype=torch.bool))  # deformation stage reached
        # The face model's expression basis [E, V, 3]: Gaussians 0..V-1 start on its V mesh vertices.
        if expression_basis is None:
            expression_basis = torch.zeros(info.expression_dim, NUM_LANDMARKS, 3)
        self.register_buffer("expression_basis", expression_basis.float())
        self.mouth_vertices = torch.tensor(MOUTH_VERTICES)
        # Gaussians on the mesh around the mouth (vertex points of MOUTH_VERTICES and points sampled on
        # triangles touching one) and their place there: the geometry loss's targets interpolate the tracked
        # vertex displacements. Saved with the avatar, so that a resumed run keeps its geometry supervision
        # (sizes from the saved tensors, :meth:`load_state_dict`).
        ids = torch.zeros(n, 3, dtype=torch.long)
        bary = torch.zeros(n, 3)
        if binding is not None:
            ids, bary = binding[0].long(), binding[1].float()
        on_mouth = torch.zeros(NUM_LANDMARKS + 1, dtype=torch.bool)
        on_mouth[list(MOUTH_VERTICES)] = True
        sel = (bary.sum(1) > 0) & on_mouth[ids.clamp(max=NUM_LANDMARKS)].any(1)
        self.register_buffer("geo_points", sel.nonzero()[:, 0])  # [M]
        self.register_buffer("geo_vertices", ids[sel])  # [M, 3]
        self.register_buffer("geo_weights", bary[sel])  # [M, 3]
        # The lip prior (cfg.lip_prior): those Gaussians' expression [E] = z @ prior_weight, z the audio window
        # [(2R+1) D] standardised by prior_mean / prior_std, then a constant 1 (fitted in build).
        A = (2 * cfg.data.audio_radius + 1) * info.audio_dim
        on = cfg.lip_prior > 0
        self.register_buffer("prior_weight", torch.zeros(A + 1, info.expression_dim) if on else None)
        self.register_buffer("prior_mean", torch.zeros(A) if on else None)
        self.register_buffer("prior_std", torch.ones(A) if on else None)
        self._prior_note = "off" if not on else "loaded"
        self.triplane = Triplane(cfg.triplane_resolutions, cfg.triplane_channels, bounds)
        self.f_can = CanonicalMLP(d, cfg.hidden, self.num_sh)
        self.audio_encoder = AudioEncoder(info.audio_dim, d, cfg.hidden)
        self.eye_proj = nn.Linear(blink_encoding(torch.zeros(2)).shape[-1], d)
        self.view_encoder = ViewpointEncoder(d, cfg.hidden)
        self.null = nn.Parameter(torch.randn(d) * 0.1)
        self.attention = SpatialAudioAttention(d, cfg.attention_layers, cfg.attention_heads)
        self.f_deform = DeformMLP(d, cfg.hidden, self.num_sh)
        self._opt: torch.optim.Optimizer | None = None
        self._lpips: PerceptualLoss | None = None
        self._lpips_note = "off: not loaded"
        self._frozen = RenderCache(self._render_state)  # frame-independent render state (_render_state)
        # Training frames seen so far (audio window, blink, viewmat, expression), replayed by the geometry loss.
        self._geo_bank = FrameBank(cfg.schedule.seed)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg: GaussianTalkerConfig, info: DatasetInfo, dataset=None) -> "GaussianTalker":
        """A fresh model initialised from ``dataset``'s face model, or an empty one to load weights into."""
        points = basis = binding = None
        if dataset is not None:
            fm = dataset.face_model
            pts, ids, bary = initial_points(
                fm.neutral, fm.triangles, cfg.num_gaussians, cfg.face_fraction, cfg.mouth_fraction,
                cfg.lip_weight, seed=cfg.schedule.seed, binding=True)
            points, binding = torch.from_numpy(pts), (torch.from_numpy(ids), torch.from_numpy(bary))
            basis = torch.from_numpy(np.asarray(fm.basis, np.float32))
        model = cls(cfg, info, points, basis, binding)
        if dataset is not None:
            model._setup_lpips()
            if cfg.lip_prior:
                model._fit_lip_prior(dataset)
        return model

    def _fit_lip_prior(self, ds) -> None:
        """The lip prior from ``ds``'s training frames, in closed form: a ridge map (strength by blocked CV,
        :func:`~talkinghead.methods.prior.fit_linear_prior`) from the standardised audio window to the tracked
        expression's ``cfg.lip_prior`` leading components; the others stay at their training mean."""
        train = ds.split_indices("train")
        win = audio_windows(ds.audio_matrix, self.cfg.data.audio_radius)[train].flatten(1).double().numpy()
        mean, std = win.mean(0), np.maximum(win.std(0), 1e-3)
        expr = np.asarray(ds.tracks.expression, np.float64)[train]
        k = min(self.cfg.lip_prior, expr.shape[1])
        z = np.c_[(win - mean) / std, np.ones(len(win))]
        w, lam, held_out = fit_linear_prior(z, expr[:, :k], self.cfg.prior_lambdas)
        if self.cfg.prior_full_variance and len(self.geo_points):
            # Ridge shrinks towards the mean: held out, the bound Gaussians moved about half as far as tracked,
            # and a mouth opened half as wide renders as barely open. One gain on the map's audio part (z is
            # centred on the training frames, so the mean stays) makes their out-of-fold displacement spread as
            # far as the tracked one; one gain for all components keeps the mouth's shapes (and correlation).
            unit = torch.eye(expr.shape[1], dtype=torch.float64)[:k]  # each component alone: [k, E]
            B = mesh_displacement(unit, self.expression_basis.double(), self.geo_vertices,
                                  self.geo_weights.double()).flatten(1).numpy()  # [k, M*3]
            spread = lambda c: ((c - c.mean(0)) @ B).var(0).sum()  # noqa: E731
            w[:-1] *= np.sqrt(spread(expr[:, :k]) / max(spread(held_out), 1e-30))
        weight = np.zeros((z.shape[1], expr.shape[1]))
        weight[:, :k] = w
        weight[-1, k:] = expr[:, k:].mean(0)
        for name, value in (("prior_weight", weight), ("prior_mean", mean), ("prior_std", std)):
            getattr(self, name).copy_(torch.from_numpy(value))
        self._prior_note = f"{k} expression components, ridge lambda {lam:g}, {len(train)} frames"

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """The mouth Gaussians' binding at its saved size (an avatar saved before it was saved loads without)."""
        state = dict(state)
        for name in ("geo_points", "geo_vertices", "geo_weights"):
            state.setdefault(name, getattr(self, name)[:0])
            setattr(self, name, torch.empty_like(state[name]))
        if "prior_weight" not in state and self.prior_weight is not None:  # saved before the lip prior existed
            self.cfg.lip_prior = 0
            self.prior_weight = self.prior_mean = self.prior_std = None
            self._prior_note = "off"
        return super().load_state_dict(state, strict, assign)

    def _setup_lpips(self) -> None:
        self._lpips, self._lpips_note = PerceptualLoss.optional(self.cfg.lambda_lpips, self.cfg.lpips_weights,
                                                                "lambda_lpips")

    @property
    def offset_scale(self) -> float:
        """Metres per unit of F_deform's position output: 1% of the head radius (~1.5 mm).

        Adam moves each weight by ~lr per step whatever the output's unit; in raw metres a 2e-3 step of a
        64-wide layer moves points by centimetres and the deformation stage starts by shaking the head.
        In these units a lip moves a few units, like every other offset (log-scale, logit, SH)."""
        return 0.01 * self.head_radius

    @property
    def _lip_prior_on(self) -> bool:
        return self.prior_weight is not None and len(self.geo_points) > 0

    def _prior_offsets(self, audio: Tensor) -> Tensor:
        """[..., M, 3] the lip prior's displacement (metres) of the geometry-bound Gaussians for audio windows
        [..., 2R+1, D]."""
        z = (audio.flatten(-2) - self.prior_mean) / self.prior_std
        expression = z @ self.prior_weight[:-1] + self.prior_weight[-1]
        return mesh_displacement(expression, self.expression_basis, self.geo_vertices, self.geo_weights)

    @property
    def head_radius(self) -> float:
        lo, hi = self.triplane.bounds
        return float((hi - lo).max()) / 2

    # ------------------------------------------------------------------------------------------ Gaussians

    def _canonical(self) -> tuple[Tensor, dict[str, Tensor]]:
        """(f(mu_c) [N, d], F_can's raw attributes): once per avatar when rendering (:class:`RenderCache`)."""
        frozen = self._frozen.get(self)
        return frozen["canonical"] if frozen is not None else self._canonical_live()

    def _canonical_live(self) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.triplane(self.means)  # f(mu_c): [N, d]
        return f, self.f_can(f)

    def _render_state(self) -> dict[str, Any]:
        """What rendering a frame needs that does not depend on the frame (built once per avatar, no grad):

        * ``canonical``: f(mu_c) [N, d] and F_can's raw attributes;
        * ``query``: the first attention block's LN(f(mu_c)) [N, d] (its queries are the canonical features);
        * ``base`` [N, A] and ``heads`` [hidden, A]: eq. 9's sums folded into F_deform's heads. Every deformed
          raw attribute is canonical + head(h), so ``base + h @ heads`` gives them all in one product: base =
          (mu_c, base log-scale + s_c, r_c, SH_c, alpha_c) + the heads' biases, with the position head's weights
          and bias times :attr:`offset_scale`. The same sums as :meth:`gaussians`, in another order (float
          rounding)."""
        f, can = self._canonical_live()
        heads = self.f_deform.heads
        s = self.offset_scale
        canonical = {"means": self.means, "scale": self.base_log_scale + can["scale"], "rotation": can["rotation"],
                     "sh": can["sh"].flatten(1), "opacity": can["opacity"]}
        scale = {"means": s}
        base = torch.cat([canonical[k] + heads[k].bias * scale.get(k, 1.0) for k in heads], 1)
        w = torch.cat([heads[k].weight * scale.get(k, 1.0) for k in heads]).T.contiguous()
        return {"canonical": (f, can), "query": self.attention.blocks[0].norm_q(f), "base": base, "heads": w,
                "sizes": [heads[k].out_features for k in heads]}

    def _render_gaussians(self, cond: Condition, state: dict[str, Any]) -> dict[str, Tensor]:
        """:meth:`gaussians` (deformed) from the kept render state: attributes only, no attention weights."""
        f, _ = state["canonical"]
        z, _ = self.attention(f, self.tokens(cond), first_query=state["query"], weights=False)
        raw = torch.addmm(state["base"], self.f_deform.trunk(z), state["heads"])
        means, log_s, rot, sh, logit = raw.split(state["sizes"], dim=1)
        if self._lip_prior_on:
            pts = self.geo_points
            means = means.index_copy(0, pts, self.means[pts] + self._prior_offsets(cond.audio))
        return {"means": means, "quats": F.normalize(rot, dim=-1), "scales": torch.exp(log_s.clamp(max=0.0)),
                "opacities": torch.sigmoid(logit[:, 0]), "sh": sh.unflatten(1, (self.num_sh, 3))}

    def tokens(self, cond: Condition) -> Tensor:
        """[4, d] condition tokens {audio, eye, viewpoint, null} of eq. 13."""
        return self._tokens(cond.audio, cond.blink, cond.pose)  # the tracked pose, also under a novel view

    def _tokens(self, audio: Tensor, blink: Tensor, viewmat: Tensor) -> Tensor:
        """Tokens [4, d] of one frame (audio [2R+1, D], blink [2], viewmat [4, 4]), or [B, 4, d] of B frames."""
        a = self.audio_encoder(audio)
        e = self.eye_proj(blink_encoding(blink))
        v = self.view_encoder(viewmat)
        return torch.stack([a, e, v, self.null.expand_as(a)], -2)

    def gaussians(self, cond: Condition | None, deform: bool) -> dict[str, Tensor]:
        """Activated Gaussian attributes for a frame: means [N, 3], quats [N, 4], scales [N, 3],
        opacities [N], sh [N, K, 3], and the triplane features f(mu_c) [N, d]; ``attention`` [N, 4] and
        ``offsets`` [N, 3] too when deformed."""
        f, can = self._canonical()
        means = self.means
        log_s = self.base_log_scale + can["scale"]
        rot, sh, logit = can["rotation"], can["sh"], can["opacity"][:, 0]
        out: dict[str, Tensor] = {}
        if deform:
            z, attn = self.attention(f, self.tokens(cond))
            dlt = self.f_deform(z)
            offsets = dlt["means"] * self.offset_scale
            if self._lip_prior_on:
                offsets = offsets.index_copy(0, self.geo_points, self._prior_offsets(cond.audio))
            means = means + offsets
            log_s = log_s + dlt["scale"]
            rot = rot + dlt["rotation"]
            sh = sh + dlt["sh"]
            logit = logit + dlt["opacity"][:, 0]
            out["attention"] = attn
            out["offsets"] = offsets
        out.update(means=means, quats=F.normalize(rot, dim=-1), scales=torch.exp(log_s.clamp(max=0.0)),
                   opacities=torch.sigmoid(logit), sh=sh, features=f)
        return out

    def _raster(self, g: dict[str, Tensor], viewmat: Tensor, K: Tensor, backdrop: Tensor,
                eps2d: float = EPS2D) -> Tensor:
        img, _, _, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmat, K,
                                 backdrop.shape[1], backdrop.shape[0], background=backdrop,
                                 sh_degree=self.cfg.sh_degree, backend=self.cfg.backend, eps2d=eps2d)
        return img

    # ------------------------------------------------------------------------------------------ Method

    def render(self, cond: Condition) -> Tensor:
        state = self._frozen.get(self)
        if state is not None and bool(self.deform_on):
            g = self._render_gaussians(cond, state)
        else:
            g = self.gaussians(cond, deform=bool(self.deform_on))
        return self._raster(g, cond.viewmat, cond.K, cond.backdrop, cond.eps2d).clamp(0, 1)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        mlp = [p for name, p in self.named_parameters() if not name.startswith(("means", "triplane."))]
        self._opt = adam([
            {"params": [self.means], "lr": self.cfg.lr_means * self.head_radius, "name": "means"},
            {"params": list(self.triplane.parameters()), "lr": self.cfg.lr_triplane, "name": "triplane"},
            {"params": mlp, "lr": self.cfg.lr_mlp, "name": "mlp"},
        ])
        return [self._opt]

    def canonical_steps(self) -> int:
        return int(round(self.cfg.canonical_fraction * self.cfg.schedule.iterations))

    def train_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        deform = step >= self.canonical_steps()
        if deform and not bool(self.deform_on):
            self.deform_on.fill_(True)
        # With the lip prior the bound Gaussians' positions come from it: F_deform's are not used, nor trained.
        learned = cfg.lambda_geo > 0 and not self._lip_prior_on
        if learned and cfg.geo_replay > 0:
            self._geo_bank.add(batch.cond.index, batch.cond.audio, batch.cond.blink, batch.cond.viewmat,
                               batch.expression)
        g = self.gaussians(batch.cond, deform)
        bound = deform and self.expression_basis.shape[0] > 0 and len(self.geo_points) > 0
        geo_on = bound and learned
        if bound and cfg.tracked_lips and (cfg.lambda_geo > 0 or self._lip_prior_on):
            g = self._at_tracked_place(g, batch.expression)
        pred = self._raster(g, batch.cond.viewmat, batch.cond.K, batch.cond.backdrop, batch.cond.eps2d)
        l1 = (pred - batch.image).abs().mean()
        ds = dssim(pred, batch.image)
        loss = l1 + cfg.lambda_dssim * ds
        logs = {"l1": l1.item(), "dssim": ds.item()}
        if self._lpips is not None:
            lp = self._lpips(pred, batch.image)
            loss = loss + cfg.lambda_lpips * lp
            logs["lpips"] = lp.item()
        if geo_on:
            # Gaussians on the lips and jaw follow the tracked expression through their place on the mesh:
            # the barycentric mix of their triangle's tracked vertex displacements (squared error in
            # offset_scale units).
            geo = self._geo_error(g["offsets"][self.geo_points], batch.expression)
            if cfg.geo_replay > 0 and self._geo_bank:
                # + the same loss on ``geo_replay`` earlier training frames, deforming only these Gaussians.
                replay = self.replay_geometry_loss(g["features"][self.geo_points])
                geo = (geo + replay) / (1 + cfg.geo_replay)
            loss = loss + cfg.lambda_geo * geo
            logs["geo"] = geo.item()
        if deform and batch.mouth is not None and cfg.lambda_lip > 0:
            m = batch.mouth
            crop = self._raster(g, batch.cond.viewmat, m.K, m.backdrop, batch.cond.eps2d)
            lip = (crop - m.image).abs().mean()
            loss = loss + cfg.lambda_lip * lip
            logs["lip"] = lip.item()
        logs["loss"] = loss.item()
        return loss, logs

    def _at_tracked_place(self, g: dict[str, Tensor], expression: Tensor) -> dict[str, Tensor]:
        """``g`` with the geometry-supervised Gaussians moved to their tracked place (canonical + tracked
        displacement, expression [E]) for the training render. Straight-through: the value is the tracked
        place, the gradient of the photometric losses still reaches the network's offsets (and mu_c) as if
        they had put the points there, so appearance is learned for the lips where the frame has them."""
        off = g["offsets"][self.geo_points]
        target = mesh_displacement(expression, self.expression_basis, self.geo_vertices, self.geo_weights)
        means = g["means"].index_add(0, self.geo_points, target - off.detach())
        return dict(g, means=means)

    def replay_geometry_loss(self, f_geo: Tensor | None = None) -> Tensor:
        """Sum over ``geo_replay`` frames drawn from the bank of their geometry loss, all frames in one batched
        pass (tokens [B, 4, d], attention over [B, M, d]). ``f_geo`` [M, d]: the supervised Gaussians' f(mu_c),
        the rows of the frame's own triplane pass (default: computed here)."""
        if f_geo is None:
            f_geo = self.triplane(self.means[self.geo_points])
        n = self.cfg.geo_replay
        audio, blink, viewmat, expr = self._geo_bank.sample(n)
        z, _ = self.attention(f_geo, self._tokens(audio, blink, viewmat))  # [B, M, d]
        offsets = self.f_deform(z.flatten(0, 1))["means"].view(n, -1, 3) * self.offset_scale
        return self._geo_error(offsets, expr) * n  # each frame's mean, summed

    def _geo_error(self, offsets: Tensor, expression: Tensor) -> Tensor:
        """Mean squared error (offset_scale units) of the geometry-supervised Gaussians' offsets [..., M, 3]
        against their tracked displacement (expression [..., E]): the barycentric mix of their triangle's
        vertex displacements."""
        target = mesh_displacement(expression, self.expression_basis, self.geo_vertices, self.geo_weights)
        return ((offsets - target) / self.offset_scale).square().mean()

    def after_step(self, step: int) -> None:
        """Exponential learning-rate decay: positions to 1% (as 3DGS), networks to 30% at the last iteration."""
        if self._opt is not None:
            decay_learning_rates(self._opt, step, self.cfg.schedule.iterations,
                                 lambda name: 0.01 if name == "means" else 0.3)

    def log_extras(self) -> dict[str, Any]:
        return {"lpips": self._lpips_note, "lip_prior": self._prior_note, "num_gaussians": self.cfg.num_gaussians,
                "attention_layers": self.cfg.attention_layers, "canonical_iterations": self.canonical_steps()}

    def attention_summary(self, cond: Condition) -> np.ndarray:
        """Mean attention [4] of all Gaussians on the tokens (audio, eye, viewpoint, null), cf. the paper's Fig. 4."""
        with torch.no_grad():
            g = self.gaussians(cond, deform=True)
        return g["attention"].mean(0).numpy()
