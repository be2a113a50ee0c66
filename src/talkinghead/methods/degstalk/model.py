"""DEGSTalk (``../shared/papers/004_e17bdb68577f3f2e.txt``; TalkingGaussian is its base): decomposed
per-embedding Gaussian fields with hair-preserving portrait rendering.

Pieces and where they follow the paper:

* two deformable Gaussian fields (sec. II-B, :mod:`.fields`): the **face** field (face skin and lips; the
  whole head with w/o H) and the **inner-mouth** field (teeth, tongue, cavity), each with canonical Gaussians
  statically initialised from the face model's mesh (:mod:`talkinghead.methods.surface`: mesh vertices +
  points on its triangles; points behind the inner lips), 3DGS density control during the static stage, a
  learnable per-Gaussian embedding z (R^32, zero-init, copied on clone/split) and the deformation
  MLP(H(mu) + z + f_a + f_e) -> {d_mu, d_s, d_q} (eqs. 3, 5, 6); the mouth field moves positions only;
* f_a: the audio window [2R+1, D] of the frame through :class:`talkinghead.nn.audio.AudioEncoder` (per-frame
  MLP, temporal convolutions, attention over the neighbouring frames), one encoder per field as in
  TalkingGaussian;
* f_e: the implicit expression coefficients, a small MLP of the source frame's upper-face expression
  coefficients + blinks (:mod:`.expression`: why not the mouth part);
* the jaw head (eq. 8): a small MLP on the mouth field's f_a predicts the inner-lip gap (mm), supervised by
  the tracked one, L_jaw = (j_hat - j)^2, beta 0.001. Deviation: its (normalised) prediction is also an input
  of both deformation MLPs. The paper leaves psi_jaw out of f_e and does not say where the jaw head's output
  goes; at our budget a photometric loss alone barely moves the lips from audio (GaussianTalker's notes
  measured mouth r 0.12 without geometric guidance), and the jaw value is the cheapest such guidance;
* lip-geometry guidance (deviation, ``lambda_geo``; the paper has none, its SMIRK/FLAME prior and 50k
  iterations are what we lack): in motion learning the position offsets of the face field's Gaussians bound to
  the lip and chin mesh (:data:`talkinghead.face.landmarks.MOUTH_VERTICES`: the vertex points and the points
  sampled on triangles touching one; each Gaussian carries its place on the mesh as a frozen per-Gaussian row
  ``binding`` = (3 vertex ids, 3 barycentric weights), copied on clone/split like z) are pulled, squared
  error in units of ``offset_scale``, towards the tracked mesh displacement of the frame
  (:func:`talkinghead.methods.surface.mesh_displacement`), averaged with ``geo_replay`` earlier training
  frames drawn from a :class:`talkinghead.methods.replay.FrameBank` (only those Gaussians deformed, nothing
  rendered), as GaussianTalker's notes found one frame a step
  underfits the audio -> lips mapping. Measured why on cnn (Whisper, 4000 iterations, without it): the lip
  vertices' d_mu varied by 0.4 mm std over the test frames against a 2.7 mm tracked gap std, uncorrelated
  with it (r 0.02): the face field did not move the lips;
* dynamic hair-preserving portrait rendering (sec. II-C, eq. 7, :mod:`.plate`):
  C = C_face + (1 - O_face) (C_mouth + (1 - O_mouth) C_hair): the face field splatted over the mouth field
  splatted over the hair plate (rasterizer colours are premultiplied by their opacity, so this is eq. 7 with
  C_face x O_face the face layer and the mouth layer seen through (1 - O_face)). C_hair is the source frame's
  own hair (ears and earrings included) over its torso backdrop, the face cut-out's outer band filled from
  around it (deviation, see :mod:`.plate`: the paper's plate is empty there): at render time with new audio the source
  frames replay the training sequence as the torso does (:class:`talkinghead.methods.base.SourceFrame`);
* three stages (sec. II-D): static initialization (canonical fields only, L1 + lambda D-SSIM on each region's
  masked ground truth, densification on), motion learning (deformation on, + beta L_jaw, eq. 8), colour
  fine-tuning on the fused image (L1 + lambda D-SSIM + gamma LPIPS, eq. 9; only SH colours are updated;
  LPIPS only with local AlexNet weights, logged as off otherwise).

Region targets of stages 1-2 (the paper's "masked ground truth for each region", TalkingGaussian's face / mouth
branches): the face field is splatted over the hair plate with the frame's inner mouth pasted in, against the
frame inside the dilated face + mouth mask and the plate outside (:func:`.plate.face_field_target`); the mouth
field is splatted over the frame with the plate in the dilated inner-mouth region (what is behind it at render
time, :func:`.plate.mouth_field_background`; with black there the plate's backdrop showed through its edges: a
blue lip line on cnn), against the frame, through a camera cropped to the lips' box (the region is ~1% of a 128^2
frame: a full-frame mean would hardly see it). The face field must let the open mouth through to the mouth field
(eq. 7 fuses the mouth behind the face): TalkingGaussian sets its face branch's target on the inner mouth to its
background colour (and prunes Gaussians of that colour). We ask for the transparency directly, ``lambda_clear`` x
the face field's opacity on the inner-mouth pixels (a per-pixel mean over the frame, as the L1): with the frame's
own mouth as the background, transparency there has no photometric cost. Measured why, on cnn (Whisper, 4000
iterations): with the mouth pasted in and nothing else the face field painted the open mouth itself (opacity 0.88
there, its colour the mouth's to 0.01) and hid the mouth field: rendered mouth-opening r -0.06; with
TalkingGaussian's background-colour target instead (green), the lip Gaussians took the key colour (green lips in
the validation renders at 2500 iterations) rather than moving away.

Other deviations: a dense multi-resolution triplane instead of hash grids; no opacity reset (the static
stage is a few hundred iterations on a CPU, too short to re-earn opacities); the person-specific linear face
model instead of SMIRK/FLAME; LPIPS only with local weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from talkinghead.errors import UserError
from talkinghead.face.landmarks import MOUTH_VERTICES, NUM_LANDMARKS
from talkinghead.methods.base import Batch, Condition, DatasetInfo, adam, decay_learning_rates
from talkinghead.methods.losses import PerceptualLoss, dssim
from talkinghead.methods.replay import FrameBank
from talkinghead.methods.surface import base_log_scales, initial_points, mesh_displacement, project_colors
from talkinghead.nn.audio import AudioEncoder
from talkinghead.render import DensityStrategy, GaussianModel, rasterize

from .config import DEGSTalkConfig
from .expression import jaw_functional, upper_face_projection
from .fields import DeformableField
from .plate import face_field_target, hair_plate, mouth_field_background, mouth_opacity, pixels, region_masks

COLOR_PARAMS = ("sh0", "shN")


def _gaussians(points: Tensor, colors: Tensor, sh_degree: int, embedding_dim: int,
               binding: Tensor | None = None) -> GaussianModel:
    """3DGS Gaussians on ``points`` [N, 3] with ``colors`` [N, 3], footprints from their spacing, a zero
    embedding [N, d] when ``embedding_dim``, and the frozen mesh ``binding`` [N, 6] (vertex ids as floats,
    barycentric weights; all-zero weights = not bound) when given."""
    extras = {"embedding": torch.zeros(points.shape[0], embedding_dim)} if embedding_dim else {}
    if binding is not None:
        extras["binding"] = binding
    scales = torch.exp(base_log_scales(points))[:, 0] if len(points) > 3 else torch.full((len(points),), 0.01)
    m = GaussianModel.from_points(points, colors, sh_degree=sh_degree, scales=scales)
    if not extras:
        return m
    m = GaussianModel(m.means, m.log_scales, m.quats, m.logit_opacities, m.sh0, m.shN, extras=extras)
    if binding is not None:
        m.binding.requires_grad_(False)  # a record of where the Gaussian sits on the mesh, never optimised
    return m


def _lip_binding(ids: np.ndarray, bary: np.ndarray) -> Tensor:
    """[N, 6] binding rows (ids, weights) of points with mesh ``ids`` / ``bary`` [N, 3]; the weights are kept
    only for points on the lip and chin mesh (a vertex of MOUTH_VERTICES, or a triangle touching one)."""
    on_mouth = np.zeros(NUM_LANDMARKS, bool)
    on_mouth[list(MOUTH_VERTICES)] = True
    keep = (bary.sum(1) > 0) & on_mouth[np.clip(ids, 0, NUM_LANDMARKS - 1)].any(1)
    return torch.from_numpy(np.concatenate([ids.astype(np.float32), bary * keep[:, None]], 1).astype(np.float32))


def _bounds(points: Tensor, pad: float) -> Tensor:
    """[2, 3] box around ``points`` grown by ``pad`` metres on each side."""
    return torch.stack([points.min(0).values - pad, points.max(0).values + pad])


def _mouth_window(box: Tensor, cond: Condition, grow: float = 0.5, min_side: int = 16
                  ) -> tuple[slice, slice, Tensor]:
    """(rows, cols, K of a camera seeing exactly those pixels) around the lips' box [4] (x0, y0, x1, y1),
    grown by ``grow`` of its width on each side, at least ``min_side`` pixels, inside the frame."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pad = grow * max(x1 - x0, 1.0)
    W, H = cond.width, cond.height
    side_x, side_y = max(min_side, int(x1 - x0 + 2 * pad)), max(min_side, int(y1 - y0 + 2 * pad))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c0 = int(min(max(0, round(cx - side_x / 2)), max(0, W - side_x)))
    r0 = int(min(max(0, round(cy - side_y / 2)), max(0, H - side_y)))
    K = cond.K.clone()
    K[0, 2] -= c0
    K[1, 2] -= r0
    return slice(r0, min(H, r0 + side_y)), slice(c0, min(W, c0 + side_x)), K


class DEGSTalk(nn.Module):
    """The method's model; satisfies :class:`talkinghead.methods.base.Method`."""

    def __init__(self, cfg: DEGSTalkConfig, info: DatasetInfo, face: GaussianModel, mouth: GaussianModel,
                 face_bounds: Tensor, mouth_bounds: Tensor, head_radius: float):
        super().__init__()
        self.cfg = cfg
        self.info = info
        E, k, d = info.expression_dim, min(cfg.expression_components, max(1, info.expression_dim)), cfg.feature_dim
        offset = 0.01 * head_radius  # metres per unit of d_mu (as GaussianTalker: Adam steps ~lr per unit)
        face_cond = d + (d if cfg.expression else 0) + 1
        self.face = DeformableField(face, face_bounds, cfg.triplane_resolutions, cfg.triplane_channels, face_cond,
                                    cfg.hidden, offset)
        self.mouth = DeformableField(mouth, mouth_bounds, cfg.triplane_resolutions, cfg.triplane_channels, d + 1,
                                     cfg.hidden, offset, attrs=("means",))
        self.face_audio = AudioEncoder(info.audio_dim, d, cfg.hidden)
        self.mouth_audio = AudioEncoder(info.audio_dim, d, cfg.hidden)
        self.jaw_head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.LeakyReLU(0.1), nn.Linear(cfg.hidden, 1))
        self.expression_mlp = (nn.Sequential(nn.Linear(k + 2, cfg.hidden), nn.LeakyReLU(0.1), nn.Linear(cfg.hidden, d))
                               if cfg.expression else None)
        self.register_buffer("head_radius", torch.tensor(float(head_radius)))
        self.register_buffer("expression_mean", torch.zeros(E))  # [E]
        self.register_buffer("expression_projection", torch.zeros(E, k))  # [E, k] upper-face coefficients
        self.register_buffer("jaw_weights", torch.zeros(E))  # [E]: gap_mm = jaw_offset + e @ jaw_weights
        self.register_buffer("jaw_stats", torch.tensor([0.0, 0.0, 1.0]))  # offset, mean, std of the gap (mm)
        self.register_buffer("stage", torch.ones((), dtype=torch.long))  # furthest stage reached (1, 2, 3)
        # [E, V, 3] the face model's expression basis: the lip-geometry guidance's targets (saved, for --resume).
        self.register_buffer("expression_basis", torch.zeros(E, NUM_LANDMARKS, 3))
        # Training frames seen (audio window, blink, source expression, tracked expression), for geo_replay.
        self._geo_bank = FrameBank(seed=cfg.schedule.seed)
        self._opt: torch.optim.Optimizer | None = None
        self._strategies: dict[str, DensityStrategy] = {}
        self._pending: dict[str, dict] = {}  # raster info of this step's static renders, for densification
        self._densified = {"face": {"cloned": 0, "split": 0, "pruned": 0},
                           "mouth": {"cloned": 0, "split": 0, "pruned": 0}}
        self._lpips: PerceptualLoss | None = None
        self._lpips_note = "off: not loaded"

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg: DEGSTalkConfig, info: DatasetInfo, dataset=None) -> "DEGSTalk":
        """A fresh model from ``dataset`` (its face model, first training frame, tracked expressions), or an
        empty one (one Gaussian a field) whose tensors ``load_state_dict`` resizes to the saved ones."""
        if cfg.backend not in ("auto", "torch", "gsplat"):
            raise UserError(f"unknown rasterizer backend {cfg.backend!r} (auto, torch, gsplat)")
        if dataset is None:
            one = torch.zeros(1, 3)
            box = torch.tensor([[-1.0] * 3, [1.0] * 3])
            return cls(cfg, info, _gaussians(one, torch.full((1, 3), 0.5), cfg.sh_degree, cfg.embedding_dim,
                                             torch.zeros(1, 6)),
                       _gaussians(one, torch.full((1, 3), 0.5), cfg.sh_degree, cfg.embedding_dim), box, box.clone(), 0.1)
        fm, tracks = dataset.face_model, dataset.tracks
        train = dataset.split_indices("train")
        num = cfg.num_face + cfg.num_mouth + cfg.num_hair
        pts, ids, bary = initial_points(fm.neutral, fm.triangles, num, cfg.num_face / num, cfg.num_mouth / num,
                                        cfg.lip_weight, seed=cfg.schedule.seed, binding=True)
        # initial_points' own split: face (>= the V mesh vertices), inner mouth, head shell.
        n_face = max(NUM_LANDMARKS, int(num * (cfg.num_face / num)))
        n_mouth = int(num * (cfg.num_mouth / num))
        face_rows = np.r_[0:n_face] if cfg.num_hair == 0 else np.r_[0:n_face, n_face + n_mouth:num]
        face_pts = pts[face_rows]
        mouth_pts = pts[n_face:n_face + n_mouth]
        first = int(train[0])
        image = dataset.frame(first).image
        colors = [torch.from_numpy(project_colors(p.astype(np.float64), tracks.viewmats[first], tracks.K, image))
                  for p in (face_pts, mouth_pts)]
        face_t, mouth_t = torch.from_numpy(face_pts), torch.from_numpy(mouth_pts)
        extent = float((face_t.max(0).values - face_t.min(0).values).max())
        model = cls(cfg, info, _gaussians(face_t, colors[0], cfg.sh_degree, cfg.embedding_dim,
                                          _lip_binding(ids[face_rows], bary[face_rows])),
                    _gaussians(mouth_t, colors[1], cfg.sh_degree, cfg.embedding_dim),
                    _bounds(face_t, 0.1 * extent), _bounds(mouth_t, 0.1 * extent), extent / 2)
        model.expression_basis.copy_(torch.from_numpy(np.asarray(fm.basis, np.float32)))
        X = np.asarray(tracks.expression[train], np.float32)
        mean, proj = upper_face_projection(fm.neutral, fm.basis, X, model.expression_projection.shape[1])
        j0, jw = jaw_functional(fm.neutral, fm.basis)
        gap = j0 + X @ jw
        model.expression_mean.copy_(torch.from_numpy(mean))
        model.expression_projection.copy_(torch.from_numpy(proj))
        model.jaw_weights.copy_(torch.from_numpy(jw))
        model.jaw_stats.copy_(torch.tensor([j0, float(gap.mean()), max(float(gap.std()), 1e-3)]))
        model._setup_lpips()
        return model

    def _setup_lpips(self) -> None:
        if not self.cfg.fine_tune:
            self._lpips_note = "off: no fine-tuning stage"
        else:
            self._lpips, self._lpips_note = PerceptualLoss.optional(self.cfg.gamma_lpips, self.cfg.lpips_weights,
                                                                    "gamma_lpips")

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Resize the fields' per-Gaussian parameters to the saved counts first (densification changed them).
        Avatars from before the lip-geometry guidance have no binding / basis: they load with none (zeros)."""
        state = dict(state)
        n_face = state["face.gaussians.means"].shape[0] if "face.gaussians.means" in state else len(self.face)
        state.setdefault("face.gaussians.binding", torch.zeros(n_face, 6))
        state.setdefault("expression_basis", torch.zeros_like(self.expression_basis))
        for field in (self.face, self.mouth):
            prefix = "face.gaussians." if field is self.face else "mouth.gaussians."
            for name in field.gaussians.param_names:
                saved = state.get(prefix + name)
                p = getattr(field.gaussians, name)
                if saved is not None and saved.shape != p.shape:
                    p.data = torch.zeros(saved.shape, dtype=p.dtype, device=p.device)  # same Parameter object
            field.clear_cache()
        return super().load_state_dict(state, strict=strict, assign=assign)

    # ------------------------------------------------------------------------------------------ stages

    def stage_bounds(self) -> tuple[int, int]:
        """(first motion-learning iteration, first fine-tuning iteration)."""
        n = self.cfg.schedule.iterations
        motion = int(round(self.cfg.static_fraction * n))
        fine = n - int(round(self.cfg.finetune_fraction * n)) if self.cfg.fine_tune else n
        return motion, max(motion, fine)

    def stage_of(self, step: int) -> int:
        motion, fine = self.stage_bounds()
        return 1 if step < motion else 2 if step < fine else 3

    # ------------------------------------------------------------------------------------------ conditions

    def _source(self, cond: Condition):
        if cond.source is None:
            raise UserError("degstalk renders need the source frame (data.source_frames) in every Condition")
        return cond.source

    def plate(self, cond: Condition) -> Tensor:
        """C_hair [H, W, 3] of the frame (the backdrop alone with w/o H)."""
        if not self.cfg.hair_plate:
            return cond.backdrop
        src = self._source(cond)
        return hair_plate(src.image, src.labels, cond.backdrop, pixels(self.cfg.plate_erode, cond.width),
                          pixels(self.cfg.plate_fill, cond.width))

    def conditions(self, cond: Condition) -> tuple[Tensor, Tensor, Tensor]:
        """(face condition [C_f], mouth condition [C_m], predicted inner-lip gap in mm []) of a frame:
        face = f_a + f_e + jaw, mouth = f_a + jaw (jaw normalised by the training frames' gap statistics)."""
        expr = self._source(cond).expression[None] if self.expression_mlp is not None else None
        face, mouth, jaw_n = self.condition_vectors(cond.audio[None], cond.blink[None], expr)
        _, mean, std = self.jaw_stats
        return face[0], mouth[0], jaw_n[0, 0] * std + mean

    def condition_vectors(self, audio: Tensor, blink: Tensor, source_expression: Tensor | None
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """B frames at once: audio windows [B, 2R+1, D], blinks [B, 2], source expressions [B, E] (None
        without f_e) -> (face conditions [B, C_f], mouth conditions [B, C_m], normalised jaw [B, 1])."""
        f_mouth = self.mouth_audio(audio)  # [B, d]
        jaw_n = self.jaw_head(f_mouth)  # [B, 1]
        face = [self.face_audio(audio)]
        if self.expression_mlp is not None:
            coeffs = (source_expression - self.expression_mean) @ self.expression_projection  # [B, k]
            face.append(self.expression_mlp(torch.cat([coeffs, blink], -1)))
        face.append(jaw_n)
        return torch.cat(face, -1), torch.cat([f_mouth, jaw_n], -1), jaw_n

    def jaw_target(self, expression: Tensor) -> Tensor:
        """Tracked inner-lip gap (mm) of an expression [E]."""
        return self.jaw_stats[0] + expression @ self.jaw_weights

    # ------------------------------------------------------------------------------------------ rendering

    def _raster(self, g: dict[str, Tensor], cond: Condition, background: Tensor):
        return rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], cond.viewmat, cond.K,
                         cond.width, cond.height, background=background, sh_degree=self.cfg.sh_degree,
                         backend=self.cfg.backend, eps2d=cond.eps2d)

    def fields(self, cond: Condition, deform: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
        """(face Gaussians, mouth Gaussians, predicted gap in mm or None) for a frame."""
        if not deform:
            return self.face.deformed(None), self.mouth.deformed(None), None
        c_face, c_mouth, jaw = self.conditions(cond)
        return self.face.deformed(c_face), self.mouth.deformed(c_mouth), jaw

    def fuse(self, face: dict[str, Tensor], mouth: dict[str, Tensor], cond: Condition, plate: Tensor) -> Tensor:
        """Eq. 7: the face layer over the mouth layer over C_hair, [H, W, 3]."""
        behind, _, _, _ = self._raster(mouth, cond, plate)
        img, _, _, _ = self._raster(face, cond, behind)
        return img

    def render(self, cond: Condition) -> Tensor:
        face, mouth, _ = self.fields(cond, deform=int(self.stage) >= 2)
        return self.fuse(face, mouth, cond, self.plate(cond)).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ training

    def optimizers(self) -> list[torch.optim.Optimizer]:
        c = self.cfg
        per: dict[str, list] = {"means": [], "scales": [], "quats": [], "opacities": [], "colors": [],
                                "embedding": []}
        for f in (self.face, self.mouth):
            g = f.gaussians
            per["means"].append(g.means)
            per["scales"].append(g.log_scales)
            per["quats"].append(g.quats)
            per["opacities"].append(g.logit_opacities)
            per["colors"] += [g.sh0, g.shN]
            if f.embedding_dim:
                per["embedding"].append(g.embedding)
        lr = {"means": c.lr_means * float(self.head_radius), "scales": c.lr_scales, "quats": c.lr_quats,
              "opacities": c.lr_opacities, "colors": c.lr_colors, "embedding": c.lr_embedding}
        groups = [{"params": ps, "lr": lr[name], "name": name} for name, ps in per.items() if ps]
        groups.append({"params": [p for f in (self.face, self.mouth) for p in f.triplane.parameters()],
                       "lr": c.lr_triplane, "name": "triplane"})
        taken = {id(p) for grp in groups for p in grp["params"]}
        groups.append({"params": [p for p in self.parameters() if id(p) not in taken and p.requires_grad],
                       "lr": c.lr_mlp, "name": "mlp"})
        self._opt = adam(groups)
        motion, _ = self.stage_bounds()
        self._strategies = {
            name: DensityStrategy(scene_scale=float(self.head_radius), grow_grad2d=c.densify_grad,
                                  refine_start_iter=c.densify_every, refine_every=c.densify_every,
                                  refine_stop_iter=motion, reset_every=10**9, max_gaussians=cap)
            for name, cap in (("face", c.max_face), ("mouth", c.max_mouth))}
        return [self._opt]

    def train_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        c, cond = self.cfg, batch.cond
        stage = self.stage_of(step)
        if stage > int(self.stage):
            self.stage.fill_(stage)
        plate = self.plate(cond)
        if stage == 3:
            return self._fine_tune_loss(batch, plate)
        labels = self._source(cond).labels
        face, mouth, jaw = self.fields(cond, deform=stage == 2)
        img = batch.image
        m_face, m_mouth = region_masks(labels, pixels(c.train_dilate, cond.width), with_hair=not c.hair_plate)
        bg_f, target_f = face_field_target(img, plate, m_face, labels)
        pred_f, alpha_f, _, info_f = self._raster(face, cond, bg_f)
        # The mouth field is seen through a camera cropped to the lips' box (its region is ~1% of the frame).
        ys, xs, Kc = _mouth_window(batch.mouth_box, cond)
        bg_m = mouth_field_background(img, plate, m_mouth)[ys, xs]
        pred_m, _, _, info_m = rasterize(mouth["means"], mouth["quats"], mouth["scales"], mouth["opacities"],
                                         mouth["sh"], cond.viewmat, Kc, bg_m.shape[1], bg_m.shape[0],
                                         background=bg_m, sh_degree=c.sh_degree, backend=c.backend,
                                         eps2d=cond.eps2d)
        l1_f, ds_f = (pred_f - target_f).abs().mean(), dssim(pred_f, target_f)
        l1_m, ds_m = (pred_m - img[ys, xs]).abs().mean(), dssim(pred_m, img[ys, xs])
        loss = l1_f + c.lambda_dssim * ds_f + l1_m + c.lambda_dssim * ds_m
        logs = {"l1_face": l1_f.item(), "dssim_face": ds_f.item(), "l1_mouth": l1_m.item()}
        if c.lambda_clear > 0:  # the face field lets the open mouth through (see the module docstring)
            clear = mouth_opacity(alpha_f, labels)
            loss = loss + c.lambda_clear * clear
            logs["face_alpha_mouth"] = clear.item()
        if jaw is not None:
            l_jaw = (jaw - self.jaw_target(batch.expression)).square()
            loss = loss + c.beta_jaw * l_jaw
            logs["jaw_mm2"] = l_jaw.item()
        if c.lambda_geo > 0:
            self._remember(batch)
            if jaw is not None:
                geo = self.geometry_loss(face["offsets"], batch.expression)
                if geo is not None:
                    loss = loss + c.lambda_geo * geo
                    logs["geo"] = geo.item()
        self._pending = {}
        if stage == 1:  # the screen-space gradients 3DGS density control reads after backward
            for name, info in (("face", info_f), ("mouth", info_m)):
                info["means2d"].retain_grad()
                self._pending[name] = info
        logs["loss"] = loss.item()
        return loss, logs

    def _remember(self, batch: Batch) -> None:
        """Add a training frame's conditions and tracked expression to the replay bank (once per frame)."""
        cond = batch.cond
        if self.cfg.geo_replay > 0:
            self._geo_bank.add(cond.index, cond.audio, cond.blink, self._source(cond).expression, batch.expression)

    def _geo_binding(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows [M] of the bound face Gaussians, their vertex ids [M, 3], barycentric weights [M, 3])."""
        b = self.face.gaussians.binding
        rows = (b[:, 3:].sum(1) > 0).nonzero()[:, 0]
        return rows, b[rows, :3].round().long(), b[rows, 3:]

    def geometry_loss(self, offsets: Tensor, expression: Tensor) -> Tensor | None:
        """Lip-geometry guidance: mean squared error (offset_scale units) of the bound face Gaussians' d_mu
        (``offsets`` [N, 3] of this frame, tracked ``expression`` [E]) against their tracked mesh displacement,
        averaged with ``geo_replay`` frames drawn from the bank (all in one batched pass); None if none bound."""
        rows, ids, bary = self._geo_binding()
        if len(rows) == 0:
            return None
        scale = self.face.offset_scale
        target = mesh_displacement(expression, self.expression_basis, ids, bary)  # [M, 3]
        err = ((offsets[rows] - target) / scale).square().mean()
        k = self.cfg.geo_replay
        if k <= 0 or not len(self._geo_bank):
            return err
        audio, blink, src, expr = self._geo_bank.sample(k)
        c_face, _, _ = self.condition_vectors(audio, blink, src if self.expression_mlp is not None else None)
        off = self.face.offsets_at(rows, c_face)  # [k, M, 3]
        target = mesh_displacement(expr, self.expression_basis, ids, bary)  # [k, M, 3]
        replay = ((off - target) / scale).square().mean((1, 2)).sum()
        return (err + replay) / (1 + k)

    def _fine_tune_loss(self, batch: Batch, plate: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Stage 3 (eq. 9): the fused image against the frame; only SH colours get gradients."""
        c = self.cfg
        with torch.no_grad():
            face, mouth, _ = self.fields(batch.cond, deform=True)
        face = {**face, "sh": self.face.gaussians.sh}
        mouth = {**mouth, "sh": self.mouth.gaussians.sh}
        pred = self.fuse(face, mouth, batch.cond, plate)
        l1, ds = (pred - batch.image).abs().mean(), dssim(pred, batch.image)
        loss = l1 + c.lambda_dssim * ds
        logs = {"l1_fused": l1.item(), "dssim_fused": ds.item()}
        if self._lpips is not None:
            lp = self._lpips(pred, batch.image)
            loss = loss + c.gamma_lpips * lp
            logs["lpips"] = lp.item()
        logs["loss"] = loss.item()
        self._pending = {}
        return loss, logs

    def after_step(self, step: int) -> None:
        """Density control of both fields during the static stage, then 3DGS's exponential learning-rate decay:
        positions to 1%, the rest to 30% at the last iteration."""
        if self._opt is None:
            return
        for name, info in self._pending.items():
            field = self.face if name == "face" else self.mouth
            changes = self._strategies[name].step_post_backward(field.gaussians, self._opt, step, info)
            for k in ("cloned", "split", "pruned"):
                self._densified[name][k] += changes[k]
        self._pending = {}
        decay_learning_rates(self._opt, step, self.cfg.schedule.iterations,
                             lambda name: 0.01 if name == "means" else 0.3)

    def log_extras(self) -> dict[str, Any]:
        motion, fine = self.stage_bounds()
        return {"lpips": self._lpips_note, "num_face_gaussians": len(self.face),
                "num_mouth_gaussians": len(self.mouth), "densification": self._densified,
                "motion_from_iteration": motion, "fine_tune_from_iteration": fine,
                "embedding_dim": self.face.embedding_dim, "expression": self.cfg.expression,
                "hair_plate": self.cfg.hair_plate}
