"""GaussianTalker's configuration, its presets (cpu-small, gpu) and variants (fast = GaussianTalker*).

cpu-small's iteration count follows the length of the training clip (:attr:`Schedule.clip_seconds`): 2000
iterations up to 10 s of training frames, 4000 from 60 s (the count the 71 s cnn clip was tuned with), linear
between. Measured (bench/RESULTS.md, "Speed", issue 16): trained on the first 10 s of cnn_anchor_en_71s and
tested on its usual test split, 1000 iterations gave face PSNR 26.83 dB / mouth r 0.46, 2000 gave 27.17 /
0.43 (one seed) -- 1000 loses a third of a dB, 2000 is half the 71 s clip's time. ``--iterations`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from talkinghead.errors import UserError
from talkinghead.methods.base import DataConfig, Schedule


@dataclass
class GaussianTalkerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    schedule: Schedule = field(default_factory=Schedule)

    # Canonical Gaussians (sec. 4.2): positions from the face model's neutral mesh + the head volume.
    num_gaussians: int = 5000
    face_fraction: float = 0.5  # share sampled on the face mesh (the rest fills the head: hair, ears, back)
    lip_weight: float = 4.0  # lips and mouth triangles get this many times their area's share of face points
    mouth_fraction: float = 0.04  # share placed inside the mouth cavity (teeth, tongue, dark inner mouth)
    sh_degree: int = 1

    # Multi-resolution triplane (eq. 7) and MLPs.
    triplane_resolutions: tuple[int, ...] = (32, 64, 128)
    triplane_channels: int = 16  # H of the paper, per resolution; f(mu) has channels * len(resolutions) dims
    hidden: int = 64  # width of F_can, F_deform and the small encoders

    # Spatial-audio cross-attention (eqs. 10-13).
    attention_layers: int = 2  # L = 2: GaussianTalker; L = 1: GaussianTalker*
    attention_heads: int = 4

    # Training (sec. 4.4).
    canonical_fraction: float = 0.2  # share of the iterations spent in the canonical stage
    lambda_dssim: float = 0.2
    lambda_lpips: float = 0.1  # used only where LPIPS weights exist locally
    lambda_lip: float = 2.0
    # With lip_prior 0: lip/chin mesh Gaussians follow the tracked expression (model.py; not in the paper) ...
    lambda_geo: float = 0.5
    geo_replay: int = 8  # ... averaged over this many earlier training frames too (model.py; not in the paper)
    tracked_lips: bool = True  # training renders put those Gaussians at their tracked place (model.py; not in the paper)
    # Those Gaussians' positions from a closed-form ridge map audio window -> the face model's ``lip_prior``
    # leading expression components, fitted on the training frames (0: from F_deform; model.py; not in the paper).
    lip_prior: int = 6
    prior_lambdas: tuple[float, ...] = (1e2, 3e2, 1e3, 3e3, 1e4, 3e4, 1e5)  # ridge strengths tried by blocked CV
    prior_full_variance: bool = True  # scale the prior's audio part to the tracked coefficients' spread (model.py)
    lpips_weights: str | None = None  # folder with alex.pth + alexnet-owt-*.pth (else env / torch hub cache)
    lr_means: float = 1.6e-4  # times the head radius (3DGS's spatial_lr_scale), decayed 100x over training
    lr_triplane: float = 5e-3
    lr_mlp: float = 2e-3
    backend: str = "auto"  # rasterizer backend: auto, torch, gsplat

    @property
    def feature_dim(self) -> int:
        return self.triplane_channels * len(self.triplane_resolutions)


def make_config(preset: str, variant: str | None) -> GaussianTalkerConfig:
    """The config of ``preset`` ("cpu-small" or "gpu") and ``variant`` (None or "fast")."""
    if preset == "cpu-small":
        cfg = GaussianTalkerConfig(
            data=DataConfig(size=128, audio_radius=3, mouth_crop=64),
            schedule=Schedule(iterations=4000, val_every=500, checkpoint_every=500,
                              clip_seconds=(10.0, 60.0), clip_iterations=(2000, 4000)),
        )
    elif preset == "gpu":
        # The paper's setting: 512^2 frames, degree-3 SH, a finer triplane, tens of thousands of iterations.
        cfg = GaussianTalkerConfig(
            data=DataConfig(size=512, audio_radius=8, mouth_crop=128),
            schedule=Schedule(iterations=50000, val_every=5000, checkpoint_every=5000),
            num_gaussians=40000, sh_degree=3, triplane_resolutions=(64, 128, 256, 512), triplane_channels=16,
            hidden=128,  # backend "auto": gsplat's CUDA rasterizer when installed
        )
    else:
        raise UserError(f"gaussiantalker has no preset {preset!r} (cpu-small, gpu)")
    if variant == "fast":
        cfg.attention_layers = 1
    elif variant is not None:
        raise UserError(f"gaussiantalker has no variant {variant!r} (fast)")
    return cfg
