"""The one-shot model's configuration: sizes, stages and loss weights per preset (saved in MODEL/config.json)."""

from __future__ import annotations

from dataclasses import dataclass, field

from talkinghead.errors import UserError

PRESETS = ("cpu-small", "gpu")


@dataclass
class MotionConfig:
    """Expression space, G_m + lip reader (sec. III-A, eq. 1) and E_m (sec. III-B1)."""

    num_coefficients: int = 16  # K of the shared expression space
    audio_window: int = 2  # δa
    d_model: int = 128
    layers: int = 3
    heads: int = 4
    sequence: int = 64  # frames per training stretch
    motion_window: int = 11  # δm
    motion_code: int = 64  # Z
    w_mse: float = 10.0  # λ_MSE (the paper's λ_rec)
    w_ctc: float = 0.1  # λ_ctc
    w_lat: float = 1.0  # L_lat's weight (1 in eq. 1)
    # Optional regularisation of G_m (not in the paper): per-stretch augmentation drawn from the item's seed (so
    # it is identical under torchrun): feature columns dropped, one span of frames blanked; AdamW weight decay.
    # Off by default: measured on the leave-one-identity-out split (bench/RESULTS.md) it lowered the mouth r of
    # G_m's meshes on a training clip (0.81 -> 0.63) without raising it on the left-out person (0.058 -> 0.054).
    feature_dropout: float = 0.0
    time_mask: int = 0  # longest blanked span, frames
    weight_decay: float = 0.0


@dataclass
class GeneratorConfig:
    """E_id, M_e, the triplane synthesis G, volume rendering and super-resolution."""

    image_size: int = 128  # E_id input and final output side
    code_dim: int = 128  # W: one W-vector per pyramid level
    plane_size: int = 32  # R
    plane_channels: int = 16  # C
    synthesis_channels: int = 64
    render_size: int = 32  # neural rendering side (volume); super-resolution brings it to image_size
    num_coarse: int = 24
    num_fine: int = 24
    feature_channels: int = 16  # F, the decoder's feature output (first 3 = RGB)
    superres_channels: tuple[int, ...] = (32, 16)  # one block per x2: render_size * 2^len == image_size
    # head box in head coordinates (metres): [x0, y0, z0, x1, y1, z1]; y is down, z into the head
    box: tuple[float, ...] = (-0.13, -0.18, -0.10, 0.13, 0.14, 0.16)
    w_pixel: float = 1.0  # λ_pixel on the output image
    w_lowres: float = 1.0  # L1 of the raw neural render (deviation: EG3D's dual image, without its discriminator)
    w_perceptual: float = 0.8  # λ_VGG: only with local LPIPS weights
    w_reg: float = 0.1  # λ_reg on the identity offset and motion codes
    w_id: float = 0.2  # λ_ID: only with local face-recognition weights (none loadable here: off)


@dataclass
class TrainConfig:
    """Stages (sec. III-C) and the loop."""

    motion_steps: int = 800
    motion_batch: int = 8
    motion_lr: float = 1e-3
    generator_steps: int = 500
    generator_batch: int = 2  # global batch (split across torchrun ranks)
    generator_lr: float = 5e-4
    mapper_steps: int = 300
    mapper_lr: float = 1e-4
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0


@dataclass
class InversionConfig:
    """Inversion on the portrait at inference (sec. III-B): steps on w_id, then on G's weights (PTI)."""

    code_steps: int = 60
    code_lr: float = 0.01
    tune_steps: int = 40
    tune_lr: float = 1e-4


@dataclass
class OneShotConfig:
    motion: MotionConfig = field(default_factory=MotionConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)


def make_config(preset: str) -> OneShotConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    cfg = OneShotConfig()
    if preset == "gpu":
        # The paper's sizes where they are known: 3 x 32-channel planes, 64^2 neural rendering, 48 + 48 samples,
        # 512^2 output (EG3D); ours at 256 to stay within one GPU's memory for the generator's batch.
        g = cfg.generator
        g.image_size, g.code_dim, g.plane_size, g.plane_channels = 256, 256, 128, 32
        g.synthesis_channels, g.render_size, g.num_coarse, g.num_fine = 256, 64, 48, 48
        g.feature_channels, g.superres_channels = 32, (128, 64)
        m = cfg.motion
        m.d_model, m.layers, m.num_coefficients, m.motion_code = 256, 6, 32, 128
        t = cfg.train
        t.motion_steps, t.motion_batch, t.generator_steps, t.generator_batch = 20000, 32, 100000, 16
        t.mapper_steps, t.checkpoint_every = 5000, 1000
        cfg.inversion.code_steps, cfg.inversion.tune_steps = 200, 200
    return cfg
