"""GaussianFlameTalk (``../shared/papers/000_f37e518be7d9cc94.txt``): FlameTalk drives a mesh-rigged Gaussian avatar.

Two stages (sec. 3), both run by one ``talkinghead train DATA --method gaussianflametalk`` (``--stage
avatar`` or ``--stage flametalk`` trains one of them; ``--stage flametalk`` on a trained avatar retrains
FlameTalk in place):

1. **Avatar** (sec. 3.1, :mod:`.avatar`): rigged Gaussians + per-frame pose/expression corrections, trained
   by the shared trainer frame by frame with 3DGS's L1 + 0.2 D-SSIM on the frame composited over its
   background + torso image (as GaussianTalker), an L1 on a finer mouth crop (as our GaussianTalker), an
   alpha-vs-head-mask L1 (our addition: the shell has no mesh to hold it), and GaussianAvatars' position and
   scale regularisers.
2. **FlameTalk** (sec. 3.2, :mod:`.flametalk`): trained once, when the model is built, on the training split's
   audio features and tracked expressions (it needs no images), before the avatar iterations start.
   :func:`retrain_flametalk` re-runs this stage inside an existing avatar (the shared ``train`` command has
   no ``--stage`` flag to do that).

Rendering a frame (``render(cond)``): the speech-related expression coefficients come from FlameTalk on the
driving audio; the eye components (:func:`.flametalk.eye_components`) and the head pose come from the source
frame ``cond.index`` of the video (its tracked values plus the learned corrections when it is a training
frame, averaged over neighbouring frames: ``smooth_corrections``); every other coefficient stays at the
template, as FlameTalk's M_gt' and the paper's reenactment (pose and eyes from the reference video) do.
``source_expression="all"`` takes every non-speech coefficient from the source frame instead: measured on
cnn_anchor_en_71s it wobbles more (tracking noise) and, self-driven, leaks the true mouth. The
renderer calls ``render`` frame by frame with an audio window; FlameTalk runs *streaming* over those calls
(:class:`_Stream`): consecutive windows overlap, so each call appends one audio row and one prediction to a
causal history; a window that does not continue the previous one (a jump) restarts the history from the
window's past rows (continuity is judged on the rows FlameTalk reads: up to ``audio_lookahead`` past the
frame). ``render`` keeps that history in the model (the offline renderer's); :meth:`open_stream` gives each live
session its own. ``drive = "tracked"`` renders the tracked expression instead (the avatar alone).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from talkinghead.errors import UserError
from talkinghead.methods.base import Batch, Condition, DatasetInfo, RenderCache, adam, decay_learning_rates
from talkinghead.methods.losses import dssim
from talkinghead.render import EPS2D, rasterize

from .avatar import RiggedAvatar
from .config import GaussianFlameTalkConfig
from .flametalk import FlameTalk, FlameTalkConfig, build_flametalk, evaluate_flametalk, eye_components, train_flametalk


class GaussianFlameTalk(nn.Module):
    """The method's model; satisfies :class:`talkinghead.methods.base.Method`."""

    def __init__(self, cfg: GaussianFlameTalkConfig, info: DatasetInfo, avatar: RiggedAvatar,
                 flametalk: FlameTalk):
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.avatar = avatar
        self.flametalk = flametalk
        self.register_buffer("flametalk_trained", torch.zeros((), dtype=torch.bool))
        self.drive = "audio"  # or "tracked": render the tracked expression (evaluates the avatar alone)
        self._opt: torch.optim.Optimizer | None = None
        self._stream = _Stream()
        self._extras: dict[str, Any] = {}
        self._eyes: Tensor | None = None  # eye components, from the face model on first use
        self._smoothed: tuple[Tensor, Tensor] | None = None  # render-time corrections, see _corrections
        self._frozen = RenderCache(lambda: self.avatar.static())  # the expression-independent Gaussians, for rendering

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg: GaussianFlameTalkConfig, info: DatasetInfo, dataset=None) -> "GaussianFlameTalk":
        """A fresh model from ``dataset`` (FlameTalk trained here when its stage is on), or an empty one
        whose tensors ``load_state_dict`` resizes to the saved ones."""
        if cfg.source_expression not in ("eyes", "all"):
            raise UserError(f"source_expression must be 'eyes' or 'all', got {cfg.source_expression!r}")
        if dataset is None:
            avatar = RiggedAvatar(info.num_frames, 1, 1, cfg.sh_degree)
            ft = FlameTalk(cfg.flametalk, info.audio_dim, torch.zeros(1, 3), torch.zeros(1, 1, 3), torch.zeros(1),
                           torch.zeros(1, dtype=torch.long))
            return cls(cfg, info, avatar, ft)
        fm, tracks = dataset.face_model, dataset.tracks
        train = dataset.split_indices("train")
        audio = np.asarray(dataset.audio_matrix, np.float32)
        avatar = RiggedAvatar.initial(dataset, cfg.per_triangle, cfg.lip_per_triangle, cfg.num_shell,
                                      cfg.sh_degree, seed=cfg.schedule.seed)
        ft = build_flametalk(cfg.flametalk, audio[train], tracks.expression[train], fm.neutral, fm.basis)
        model = cls(cfg, info, avatar, ft)
        if "flametalk" in cfg.stages:
            model.fit_flametalk(dataset)
        return model

    def fit_flametalk(self, dataset, progress: bool = True) -> dict[str, float]:
        """Stage 2 (sec. 3.2): train FlameTalk on the training split, measure it on the test split."""
        audio = np.asarray(dataset.audio_matrix, np.float32)
        X = dataset.tracks.expression
        train, test = dataset.split_indices("train"), dataset.split_indices("test")
        log: list = []
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: more threads only add contention
        try:
            train_flametalk(self.flametalk, audio[train], X[train], progress=progress, log=log)
        finally:
            torch.set_num_threads(threads)
        self.flametalk_trained.fill_(True)
        metrics = evaluate_flametalk(self.flametalk, audio[test], X[test]) if len(test) > 1 else {}
        self._extras["flametalk"] = {"train_time_s": round(time.perf_counter() - t0, 2),
                                     "iterations": self.flametalk.cfg.iterations,
                                     "best_val_vertex_mm": min((r["val_mm"] for r in log if "val_mm" in r), default=None),
                                     "test": metrics}
        return metrics

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        self.avatar.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("avatar.")})
        ft = {k[10:]: v for k, v in state.items() if k.startswith("flametalk.")}
        if "prior_weight" not in ft:  # saved before the linear prior existed: the model had none
            self.cfg.flametalk = dataclasses.replace(self.cfg.flametalk, prior_taps=0)
        if "basis" in ft:  # rebuild FlameTalk at the saved sizes
            self.flametalk = FlameTalk(self.cfg.flametalk, self.info.audio_dim, ft["neutral"], ft["basis"],
                                       ft["template_expression"], ft["speech_idx"])
        self.flametalk.load_state_dict(ft)
        self.flametalk_trained.copy_(state["flametalk_trained"])
        self._stream = _Stream()
        self._eyes = None
        self._smoothed = None
        return None

    # ------------------------------------------------------------------------------------------ frames

    def _expression(self, cond: Condition, speech: Tensor | None) -> Tensor:
        """Expression [E] of the frame. Without ``speech`` (training, ``drive="tracked"``): the source frame's
        (optimised) values. With it: the template, the source frame's eye components (``source_expression=
        "eyes"``, or all of them with "all"), then FlameTalk's speech components. No source frame: template."""
        template = self.flametalk.template_expression
        if not 0 <= cond.index < self.avatar.tracked_expression.shape[0]:
            e = template.clone()
        else:
            e = self.avatar.frame_expression(cond.index, optimized=self._is_train_frame(cond.index),
                                             delta=self._corrections()[1])
        if speech is None:
            return e
        if self.cfg.source_expression == "eyes":
            eyes = self._eye_idx()
            e, e_src = template.clone(), e
            e[eyes] = e_src[eyes]
        else:
            e = e.clone()
        e[self.flametalk.speech_idx] = speech
        return e

    def _corrections(self) -> tuple[Tensor | None, Tensor | None]:
        """(pose [T, 6], expression [T, E]) corrections used when rendering: smoothed (cached) unless
        ``smooth_corrections`` is 0, then None (the raw ones)."""
        if self.cfg.smooth_corrections <= 0:
            return None, None
        if self._smoothed is None:
            with torch.no_grad():
                self._smoothed = self.avatar.smoothed_corrections(self.cfg.smooth_corrections)
        return self._smoothed

    def _eye_idx(self) -> Tensor:
        if self._eyes is None:
            idx = eye_components(self.avatar.neutral.numpy(), self.avatar.basis.numpy())
            speech = set(self.flametalk.speech_idx.tolist())
            self._eyes = torch.tensor([i for i in idx.tolist() if i not in speech], dtype=torch.long)
        return self._eyes

    def _is_train_frame(self, index: int) -> bool:
        return 0 <= index < self.avatar.trained_frames.shape[0] and bool(self.avatar.trained_frames[index])

    def _raster(self, g: dict[str, Tensor], viewmat: Tensor, K: Tensor, backdrop: Tensor,
                eps2d: float = EPS2D) -> tuple[Tensor, Tensor]:
        img, alpha, _, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmat, K,
                                     backdrop.shape[1], backdrop.shape[0], background=backdrop,
                                     sh_degree=self.cfg.sh_degree, backend=self.cfg.backend, eps2d=eps2d)
        return img, alpha

    def speech_for(self, cond: Condition, stream: "_Stream | None" = None) -> Tensor:
        """FlameTalk's speech coefficients [S] for the frame of ``cond`` (streaming, see module docstring);
        ``stream`` holds the causal history (default: the model's own, the offline renderer's)."""
        R = (cond.audio.shape[0] - 1) // 2
        return (stream or self._stream).step(self.flametalk, cond.audio, R)

    def render(self, cond: Condition) -> Tensor:
        return self.render_with(cond, self._stream)

    def open_stream(self) -> "_SessionStream":
        """Per-session render state for :mod:`talkinghead.methods.streaming`: its own FlameTalk history, so
        live sessions share this model's weights but not each other's past frames."""
        return _SessionStream(self)

    @property
    def stream_lookahead(self) -> int:
        """Audio rows past the rendered frame that FlameTalk reads (``audio_lookahead``, capped by R)."""
        return min(self.flametalk.cfg.audio_lookahead, self.cfg.data.audio_radius)

    def render_with(self, cond: Condition, stream: "_Stream") -> Tensor:
        speech = None
        if self.drive == "audio" and bool(self.flametalk_trained):
            speech = self.speech_for(cond, stream)
        expr = self._expression(cond, speech)
        viewmat = cond.viewmat
        if self._is_train_frame(cond.index):
            viewmat = self.avatar.frame_viewmat(cond.index, viewmat, delta=self._corrections()[0])
        img, _ = self._raster(self.avatar.gaussians(expr, self._frozen.get(self)), viewmat, cond.K, cond.backdrop,
                              cond.eps2d)
        return img.clamp(0, 1)

    # ------------------------------------------------------------------------------------------ training

    def optimizers(self) -> list[torch.optim.Optimizer]:
        a, c = self.avatar, self.cfg
        self._opt = adam([
            {"params": [a.local_means], "lr": c.lr_local_means, "name": "local_means"},
            {"params": [a.shell_means], "lr": c.lr_shell_means, "name": "shell_means"},
            {"params": [a.local_log_scales, a.shell_log_scales], "lr": c.lr_scales, "name": "scales"},
            {"params": [a.local_quats, a.shell_quats], "lr": c.lr_quats, "name": "quats"},
            {"params": [a.sh], "lr": c.lr_colors, "name": "colors"},
            {"params": [a.opacity_logits], "lr": c.lr_opacities, "name": "opacities"},
            {"params": [a.pose_delta], "lr": c.lr_pose, "name": "pose"},
            {"params": [a.expression_delta], "lr": c.lr_expression, "name": "expression"},
        ])
        return [self._opt]

    def train_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        c, a = self.cfg, self.avatar
        cond = batch.cond
        if "avatar" not in c.stages:
            zero = sum(p.sum() for p in a.parameters()) * 0.0
            return zero, {"loss": 0.0}
        i = cond.index
        a.trained_frames[i] = True
        expr = a.frame_expression(i)
        viewmat = a.frame_viewmat(i, cond.viewmat)
        g = a.gaussians(expr)
        pred, alpha = self._raster(g, viewmat, cond.K, cond.backdrop, cond.eps2d)
        l1 = (pred - batch.image).abs().mean()
        ds = dssim(pred, batch.image)
        alpha_l1 = (alpha[..., 0] - batch.head_mask).abs().mean()
        pos, scale = a.binding_regularisers(c.eps_position, c.eps_scale)
        frame = (a.pose_delta[i] ** 2).sum() * 100.0 + (a.expression_delta[i] ** 2).sum()
        loss = (l1 + c.lambda_dssim * ds + c.lambda_alpha * alpha_l1 + c.lambda_position * pos
                + c.lambda_scale * scale + c.lambda_frame * frame)
        logs = {"l1": l1.item(), "dssim": ds.item(), "alpha": alpha_l1.item()}
        if batch.mouth is not None and c.lambda_lip > 0:
            m = batch.mouth
            crop, _ = self._raster(g, viewmat, m.K, m.backdrop, cond.eps2d)
            lip = (crop - m.image).abs().mean()
            loss = loss + c.lambda_lip * lip
            logs["lip"] = lip.item()
        logs["loss"] = loss.item()
        return loss, logs

    def after_step(self, step: int) -> None:
        """Exponential learning-rate decay (3DGS): positions to 1%, the rest to 10% at the last iteration."""
        if self._opt is not None:
            decay_learning_rates(self._opt, step, self.cfg.schedule.iterations,
                                 lambda name: 0.01 if name in ("local_means", "shell_means") else 0.1)

    def train(self, mode: bool = True):
        self._stream = _Stream()
        self._smoothed = None  # the corrections change while training
        return super().train(mode)

    def log_extras(self) -> dict[str, Any]:
        a = self.avatar
        trained = a.trained_frames
        out = {"num_bound": a.num_bound, "num_shell": int(a.shell_means.shape[0]), "stages": list(self.cfg.stages),
               "speech_components": [int(i) for i in self.flametalk.speech_idx],
               "eye_components": [int(i) for i in self._eye_idx()],
               "frames_with_corrections": int(trained.sum())}
        if trained.any():
            out["mean_pose_correction_deg"] = float(a.pose_delta.detach()[trained, :3].norm(dim=-1).mean() * 180 / math.pi)
            out["mean_pose_correction_mm"] = float(a.pose_delta.detach()[trained, 3:].norm(dim=-1).mean() * 1000)
        out.update(self._extras)
        return out


class _Stream:
    """FlameTalk run causally across successive ``render`` calls (see the module docstring): per frame, one
    decoder step over the kept audio history (:meth:`.FlameTalk.next_frame_of`: only the encoder rows and the
    decoder row that the frame's output reads)."""

    def __init__(self):
        self.audio: Tensor | None = None  # [n, D] raw features up to the current frame + the lookahead rows
        self.preds: Tensor | None = None  # [m, S] predictions up to the previous call's frame
        self.last_window: Tensor | None = None

    def step(self, ft: FlameTalk, window: Tensor, R: int) -> Tensor:
        """Speech coefficients [S] of the window's centre frame. window: [2R+1, D] raw features."""
        look = min(ft.cfg.audio_lookahead, R)
        ctx = ft.cfg.context
        used = R + look + 1  # rows this step reads: a stream may leave later rows unknown (filled)
        continues = (self.last_window is not None and self.last_window.shape == window.shape
                     and torch.equal(self.last_window[1:used], window[:used - 1]))
        if continues:  # encoder outputs of the window's frames need their own context: keep 2x
            self.audio = torch.cat([self.audio, window[R + look : R + look + 1]])[-(2 * ctx + look):]
        else:  # a jump: restart from the window's past rows, predicting them first
            self.audio = window[: R + look + 1].clone()
            self.preds = None
        self.last_window = window
        with torch.no_grad():
            if self.preds is None:  # warm-up over the restarted history
                n = self.audio.shape[0] - look
                self.preds = ft(self.audio[None])[0, :n]
                return self.preds[-max(1, ft.cfg.output_average):].mean(0)
            n = self.audio.shape[0] - look  # frames up to the current
            L = min(ctx, n, self.preds.shape[0] + 1)
            prev = self.preds[self.preds.shape[0] - (L - 1):][None] if L > 1 else None
            out = ft.next_frame_of(self.audio[None], n, prev)[0, 0]
        self.preds = torch.cat([self.preds, out[None]])[-ctx:]
        return self.preds[-max(1, ft.cfg.output_average):].mean(0)  # as FlameTalk.predict: causal_average


class _SessionStream:
    """One live session's view of a shared model (:meth:`GaussianFlameTalk.open_stream`)."""

    def __init__(self, model: GaussianFlameTalk):
        self.model = model
        self.state = _Stream()
        self.lookahead = model.stream_lookahead

    def render(self, cond: Condition) -> Tensor:
        return self.model.render_with(cond, self.state)

    def reset(self) -> None:
        self.state = _Stream()


def retrain_flametalk(avatar, data=None, flametalk_config: dict | None = None, progress: bool = True) -> dict:
    """Re-run the FlameTalk stage (sec. 3.2) of a trained avatar in place, keeping its Gaussians.

    ``talkinghead train DATA --method gaussianflametalk --stage flametalk --out AVATAR`` on a trained AVATAR
    calls this: load AVATAR, train a fresh FlameTalk (``flametalk_config`` overrides fields of the saved
    one) on DATA (default: the avatar's dataset), then replace ``model.safetensors`` and the ``flametalk``
    entries of ``config.json`` / ``train_log.json`` atomically. Returns FlameTalk's test-split metrics.
    DATA may be the same clip prepared again with other audio features (``prepare --audio-encoder``): only
    FlameTalk reads audio, so the avatar then records DATA and its audio columns, and render drives it with
    DATA's encoder.
    """
    import json
    from pathlib import Path

    from talkinghead.methods.base import config_to_dict
    from talkinghead.methods.data import open_dataset
    from talkinghead.methods.trainer import CONFIG, LOG, MODEL, load_model, save_tensors_atomic, write_json_atomic

    avatar = Path(avatar)
    _, cfg, info, model, meta = load_model(avatar, expect_method="gaussianflametalk")
    ds = open_dataset(Path(data) if data is not None else Path(meta["data"]))
    if ds.num_frames != info.num_frames:
        raise UserError(f"{data} has {ds.num_frames} frames, the avatar was trained on {info.num_frames}: "
                        f"not the same clip")
    fresh = {}  # fields the avatar's config predates take today's defaults (loading set them to the old model's)
    saved = meta["config"].get("flametalk", {})
    if "prior_taps" not in saved:
        fresh["prior_taps"] = FlameTalkConfig().prior_taps
    cfg.flametalk = dataclasses.replace(cfg.flametalk, **{**fresh, **(flametalk_config or {})})
    fm, tracks = ds.face_model, ds.tracks
    train = ds.split_indices("train")
    audio = np.asarray(ds.audio_matrix, np.float32)
    model.cfg = cfg
    model.flametalk = build_flametalk(cfg.flametalk, audio[train], tracks.expression[train], fm.neutral, fm.basis)
    metrics = model.fit_flametalk(ds, progress=progress)
    save_tensors_atomic(avatar / MODEL, {f"model.{k}": v for k, v in model.state_dict().items()},
                        metadata={"method": "gaussianflametalk"})
    meta["config"] = config_to_dict(cfg)
    if data is not None:
        meta["data"] = str(Path(data).resolve())
        meta["info"]["audio_dim"] = int(audio.shape[1])
        meta["info"]["audio_names"] = list(ds.audio_features.names)
    write_json_atomic(avatar / CONFIG, meta)
    log_path = avatar / LOG
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log["flametalk"] = model._extras["flametalk"]
    log["speech_components"] = [int(i) for i in model.flametalk.speech_idx]
    write_json_atomic(log_path, log)
    return metrics


__all__ = ["GaussianFlameTalk", "retrain_flametalk"]
