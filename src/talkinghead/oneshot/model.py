"""The whole one-shot system as one module, with one loss per training stage (paper 003 sec. III-C).

``OneShotModel`` holds the shared expression space (buffers), G_m + lip reader, E_m, E_id (+ w̄_id), M_e,
G and R. ``forward(stage, batch)`` returns (loss, figures) for ``"motion"`` (G_m alone, eq. 1),
``"generator"`` (E_id, E_m, G and R jointly on source/driving pairs of one clip, eq. 2 with L_s + L_d) and
``"mapper"`` (M_e alone); it is the one entry point, so ``DistributedDataParallel`` wraps the model once
for all stages. Deviation: the super-resolution module trains with G (the paper keeps a pre-trained one
frozen; there is none here).

MODEL folder: ``config.json`` (``format`` = :data:`FORMAT`, the config, dataset list, audio columns),
``model.safetensors``, ``checkpoint.safetensors`` while training, ``train_log.json``, ``loss.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talkinghead.errors import UserError

from .config import OneShotConfig
from .emotion import EMOTIONS, emotion_offsets
from .expression import LIP_VERTICES, ExpressionSpace
from .identity import EmotionMapper, IdentityEncoder
from .motion import LipReader, MotionEncoder, MotionGenerator, motion_loss
from .synthesis import PortraitRenderer, TriplaneSynthesis

FORMAT = "talkinghead-oneshot/1"
CONFIG, MODEL, CHECKPOINT, LOG = "config.json", "model.safetensors", "checkpoint.safetensors", "train_log.json"


class OneShotModel(nn.Module):
    def __init__(self, cfg: OneShotConfig, space: ExpressionSpace, audio_dim: int, num_phones: int):
        super().__init__()
        self.cfg = cfg
        m, g = cfg.motion, cfg.generator
        for k, v in space.to_tensors().items():
            self.register_buffer(f"space_{k}", v)
        self.register_buffer("mapper_trained", torch.zeros((), dtype=torch.bool))
        K = space.num_components
        self.motion_generator = MotionGenerator(audio_dim, K, m.d_model, m.layers, m.heads, m.audio_window)
        self.lip_reader = LipReader(len(LIP_VERTICES), audio_dim, num_phones + 1)
        self.motion_encoder = MotionEncoder(K, m.motion_code, m.motion_window)
        self.identity_encoder = IdentityEncoder(g.image_size, g.code_dim)
        self.emotion_mapper = EmotionMapper(g.code_dim, len(EMOTIONS) - 1)
        self.synthesis = TriplaneSynthesis(g.code_dim, m.motion_code, g.plane_size, g.plane_channels,
                                           g.synthesis_channels)
        self.renderer = PortraitRenderer(g.plane_channels, g.feature_channels, g.render_size, g.image_size,
                                         g.superres_channels, g.box, g.num_coarse, g.num_fine)
        self.perceptual = None  # set by the trainer when local LPIPS weights are found

    # --- pieces --------------------------------------------------------------------------------------
    @property
    def space(self) -> ExpressionSpace:
        return ExpressionSpace.from_tensors({k[len("space_"):]: v for k, v in self.named_buffers()
                                             if k.startswith("space_")})

    def emotion_offsets(self) -> dict[str, np.ndarray]:
        return emotion_offsets(self.space)

    def lips(self, coefs: Tensor) -> Tensor:
        """Lip-vertex displacements [..., L, 3] of coefficients [..., K]."""
        b = (self.space_basis * self.space_std[:, None, None])[:, list(LIP_VERTICES)]
        return torch.einsum("...k,kvc->...vc", coefs, b)

    def render_codes(self, w: Tensor, z: Tensor, viewmats: Tensor, K: Tensor, backdrops: Tensor,
                     perturb: bool = False, generators: list | None = None) -> tuple[Tensor, Tensor]:
        """Images [B, 3, S, S] and low-res renders [B, 3, s, s] of codes w [B, 3, W], z [B, Z]."""
        planes = self.synthesis(w, z)
        images, lows = [], []
        for i in range(planes.shape[0]):
            out = self.renderer.render(planes[i], viewmats[i], K[i], backdrops[i], perturb,
                                       None if generators is None else generators[i])
            images.append(out["image"])
            lows.append(out["lowres"])
        return torch.stack(images), torch.stack(lows)

    def _image_loss(self, pred: Tensor, low: Tensor, target: Tensor) -> tuple[Tensor, dict]:
        g = self.cfg.generator
        l1 = (pred - target).abs().mean()
        low_t = F.interpolate(target, size=low.shape[-2:], mode="area")
        l1_low = (low - low_t).abs().mean()
        loss = g.w_pixel * l1 + g.w_lowres * l1_low
        logs = {"pixel": l1.item(), "lowres": l1_low.item()}
        if self.perceptual is not None:
            p = self.perceptual.net(pred * 2 - 1, target * 2 - 1).mean()
            loss = loss + g.w_perceptual * p
            logs["perceptual"] = p.item()
        return loss, logs

    # --- stages --------------------------------------------------------------------------------------
    def forward(self, stage: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        if stage == "motion":
            return self.motion_stage(batch)
        if stage == "generator":
            return self.generator_stage(batch)
        if stage == "mapper":
            return self.mapper_stage(batch)
        raise ValueError(stage)

    def motion_stage(self, b: dict) -> tuple[Tensor, dict]:
        m = self.cfg.motion
        pred = self.motion_generator(b["audio"])
        return motion_loss(pred, b["coefs"], self.lips(pred), self.lips(b["coefs"]), b["target_audio"], self.lip_reader,
                           b["ctc"], {"mse": m.w_mse, "ctc": m.w_ctc, "lat": m.w_lat})

    def generator_stage(self, b: dict) -> tuple[Tensor, dict]:
        """L_s + L_d (eq. 2) for source/driving pairs: w from the source image, z from each frame's window."""
        B = b["src_image"].shape[0]
        w = self.identity_encoder.code(b["src_image"])
        z = self.motion_encoder(torch.cat([b["src_window"], b["drv_window"]]))
        images, lows = self.render_codes(torch.cat([w, w]), z, torch.cat([b["src_viewmat"], b["drv_viewmat"]]),
                                         torch.cat([b["K"], b["K"]]), torch.cat([b["backdrop"], b["backdrop"]]),
                                         perturb=True, generators=b.get("generators"))
        target = torch.cat([b["src_image"], b["drv_image"]])
        loss, logs = self._image_loss(images, lows, target)
        reg = (w - self.identity_encoder.mean_code).pow(2).mean() + z.pow(2).mean()
        loss = loss + self.cfg.generator.w_reg * reg
        logs["reg"] = reg.item()
        logs["src_pixel"] = (images[:B] - target[:B]).abs().mean().item()
        logs["drv_pixel"] = (images[B:] - target[B:]).abs().mean().item()
        logs["generator_loss"] = loss.item()
        return loss, logs

    def mapper_stage(self, b: dict) -> tuple[Tensor, dict]:
        """M_e alone. Emotion-labelled clips: render the emotional driving frame from a neutral source code
        adjusted by M_e (pixel L1 + histogram L_sim + reg). With a CLIP loss (``b["clip"]``): eq. 3's CLIP + L_sim
        + reg between the render with and without M_e."""
        from .clip_loss import histogram_loss

        with torch.no_grad():
            w = self.identity_encoder.code(b["src_image"])
            z = self.motion_encoder(b["drv_window"])
        we = self.emotion_mapper(w, b["weights"])
        images, lows = self.render_codes(we, z, b["drv_viewmat"], b["K"], b["backdrop"])
        reg = (we - w).pow(2).mean()
        logs = {"mapper_reg": reg.item()}
        if b.get("clip") is not None:
            with torch.no_grad():
                origin, _ = self.render_codes(w, z, b["drv_viewmat"], b["K"], b["backdrop"])
            clip = b["clip"](images, b["labels"])
            sim = histogram_loss(images, origin)
            loss = clip + sim + 0.7 * reg
            logs.update(clip=clip.item(), sim=sim.item())
        else:
            loss, img_logs = self._image_loss(images, lows, b["drv_image"])
            sim = histogram_loss(images, b["drv_image"])
            loss = loss + sim + self.cfg.generator.w_reg * reg
            logs.update(img_logs, sim=sim.item())
        logs["mapper_loss"] = loss.item()
        return loss, logs


def write_json_atomic(path: Path, data: Any) -> None:
    from talkinghead.methods.trainer import write_json_atomic as _w

    _w(path, data)


def read_model_config(folder: Path) -> dict:
    """MODEL/config.json, or a one-line UserError when ``folder`` is not a one-shot model."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} is not a one-shot model folder (no {CONFIG}; make one with "
                        "`talkinghead oneshot train`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        kind = meta.get("method") or meta.get("format") or "unknown"
        raise UserError(f"{folder} is a {kind!r} model, not a one-shot model (talkinghead oneshot train)")
    return meta


def build_from_meta(meta: dict, space: ExpressionSpace | None = None) -> OneShotModel:
    from talkinghead.methods.base import config_from_dict

    cfg = config_from_dict(OneShotConfig, meta["config"])
    if space is None:  # the real space comes with the weights; shapes are what matter here
        K = cfg.motion.num_coefficients
        J = int(meta["identity_components"])
        z = np.zeros
        space = ExpressionSpace(z((478, 3), np.float32), z((J, 478, 3), np.float32), np.ones(J, np.float32),
                                z((K, 478, 3), np.float32), np.ones(K, np.float32))
    return OneShotModel(cfg, space, int(meta["audio_dim"]), int(meta["num_phones"]))


def load_model(folder: Path, device: torch.device | None = None) -> tuple[OneShotModel, dict]:
    """(model in eval mode, config.json) of a trained one-shot model folder."""
    from safetensors.torch import load_file

    meta = read_model_config(folder)
    weights = Path(folder) / MODEL
    if not weights.is_file():
        weights = Path(folder) / CHECKPOINT
        if not weights.is_file():
            raise UserError(f"{folder} has no trained weights ({MODEL}); did training finish?")
    state = {k[len("model."):]: v for k, v in load_file(str(weights)).items() if k.startswith("model.")}
    model = build_from_meta(meta)
    model.load_state_dict(state)
    return model.to(device or torch.device("cpu")).eval(), meta
