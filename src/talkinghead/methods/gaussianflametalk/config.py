"""GaussianFlameTalk's configuration, presets (cpu-small, gpu) and variants (which stage a run trains)."""

from __future__ import annotations

from dataclasses import dataclass, field

from talkinghead.errors import UserError
from talkinghead.methods.base import DataConfig, Schedule

from .flametalk import FlameTalkConfig

# --variant picks the stage(s) a run trains: both (default), only the avatar, only FlameTalk.
STAGES = ("avatar", "flametalk")


@dataclass
class GaussianFlameTalkConfig:
    data: DataConfig = field(default_factory=DataConfig)
    schedule: Schedule = field(default_factory=Schedule)  # iterations of the avatar stage
    flametalk: FlameTalkConfig = field(default_factory=FlameTalkConfig)
    stages: tuple[str, ...] = STAGES  # stages this run trains

    # Rigged Gaussians (sec. 3.1, rigging.py).
    per_triangle: int = 3  # bound Gaussians per face triangle
    lip_per_triangle: int = 6  # ... per lip triangle and per mouth/eye curtain triangle
    num_shell: int = 2500  # rigid-shell Gaussians (hair, ears, back of the head)
    sh_degree: int = 0

    # Driving (sec. 3.2 inference): FlameTalk gives the speech coefficients; from the source video frame come
    # the pose and "eyes" (the eye components only, the rest stays at the template: tracking noise in the
    # other coefficients would wobble the face) or "all" its non-speech coefficients.
    source_expression: str = "eyes"
    # Replays average each frame's learned pose/expression corrections over +-this many trained frames
    # (0: raw per-frame corrections; see RiggedAvatar.smoothed_corrections).
    smooth_corrections: int = 6

    # Losses (3DGS: L1 + lambda D-SSIM; GaussianAvatars' binding regularisers).
    lambda_dssim: float = 0.2
    lambda_lip: float = 1.0  # L1 on the mouth crop rendered as its own camera (as GaussianTalker)
    lambda_alpha: float = 0.1  # L1 between the head's alpha and the hair+face+mouth mask (our addition)
    lambda_position: float = 0.01  # GaussianAvatars: || max(|mu_local| - eps_position, 0) ||
    eps_position: float = 1.0
    lambda_scale: float = 1.0  # GaussianAvatars: || max(exp(s_local) - eps_scale, 0) ||
    eps_scale: float = 0.6
    lambda_frame: float = 1.0  # L2 keeping the per-frame pose/expression corrections small

    # Learning rates (Adam). Local quantities are in units of the parent triangle's size.
    lr_local_means: float = 5e-3
    lr_shell_means: float = 3e-4  # metres
    lr_scales: float = 1e-2
    lr_quats: float = 2e-3
    lr_colors: float = 1e-2
    lr_opacities: float = 5e-2
    lr_pose: float = 1e-4  # per-frame head pose correction (radians, metres)
    lr_expression: float = 2e-4  # per-frame expression correction (coefficients)
    backend: str = "auto"  # rasterizer backend: auto, torch, gsplat


def make_config(preset: str, variant: str | None) -> GaussianFlameTalkConfig:
    """The config of ``preset`` ("cpu-small" or "gpu"); ``variant`` "avatar" / "flametalk" trains one stage."""
    if preset == "cpu-small":
        cfg = GaussianFlameTalkConfig(
            data=DataConfig(size=128, audio_radius=8, mouth_crop=64),
            schedule=Schedule(iterations=3000, val_every=500, checkpoint_every=500),
        )
    elif preset == "gpu":
        cfg = GaussianFlameTalkConfig(
            data=DataConfig(size=512, audio_radius=8, mouth_crop=128),
            schedule=Schedule(iterations=30000, val_every=5000, checkpoint_every=5000),
            # FlameTalk keeps its defaults: the clip's minute of audio, not the device, limits it (at d_model 64
            # twice the iterations already overfit on cnn_anchor_en_71s: flametalk.py).
            per_triangle=12, lip_per_triangle=24, num_shell=20000, sh_degree=3, backend="gsplat",
        )
    else:
        raise UserError(f"gaussianflametalk has no preset {preset!r} (cpu-small, gpu)")
    if variant is not None:
        if variant not in STAGES:
            raise UserError(f"gaussianflametalk has no variant {variant!r} ({', '.join(STAGES)})")
        cfg.stages = (variant,)
        if variant == "flametalk":
            cfg.schedule.iterations = 0
    return cfg
