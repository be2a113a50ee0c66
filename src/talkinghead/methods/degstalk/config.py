"""DEGSTalk's configuration, presets (cpu-small, gpu) and the ablation variants of its Table II."""

from __future__ import annotations

from dataclasses import dataclass, field

from talkinghead.errors import UserError
from talkinghead.methods.base import DataConfig, Schedule

# --variant: the paper's ablations (sec. III-D, Table II), each switching one component off.
VARIANTS = {
    "no-embedding": "w/o E: no per-Gaussian embedding z",
    "no-expression": "w/o F: no implicit expression coefficients f_e",
    "direct-fusion": "w/o R: face, mouth and hair fused directly (no dilated masks, plate fill or fused fine-tuning)",
    "no-hair": "w/o H: no hair-preserving rendering (the face field renders the hair, over the torso)",
    # Not the paper's: our lip-geometry guidance (a deviation, model.py) off, to measure what it buys.
    "no-lip-geometry": "without our lip-geometry guidance (lambda_geo 0; the opacity term lambda_clear stays)",
}


@dataclass
class DEGSTalkConfig:
    # The hair plate is cut from the replayed video frame: every Condition carries its SourceFrame.
    data: DataConfig = field(default_factory=lambda: DataConfig(source_frames=True))
    schedule: Schedule = field(default_factory=Schedule)

    # Canonical Gaussians (static initialization from the face model's mesh, methods/surface.py).
    num_face: int = 3000  # face field: mesh vertices + points on its triangles
    num_mouth: int = 400  # inner-mouth field: points behind the inner-lip ring
    num_hair: int = 0  # head-shell points added to the face field (used by w/o H, where no plate gives the hair)
    lip_weight: float = 4.0  # lip triangles get this many times their area's share of face points
    max_face: int = 6000  # densification stops growing a field at this many Gaussians
    max_mouth: int = 800
    sh_degree: int = 1

    # Deformation networks (eq. 5): MLP(H(mu) + z + f_a + f_e).
    triplane_resolutions: tuple[int, ...] = (32, 64, 128)  # dense multi-resolution triplane (H)
    triplane_channels: int = 16
    embedding_dim: int = 32  # d of the per-Gaussian embedding z (paper: 32); 0 = w/o E
    expression: bool = True  # f_e on; False = w/o F
    expression_components: int = 8  # upper-face expression coefficients fed to the f_e MLP
    feature_dim: int = 32  # width of f_a and f_e
    hidden: int = 64

    # Dynamic hair-preserving portrait rendering (eq. 7).
    hair_plate: bool = True  # C_hair from the frame's own plate; False = w/o H
    train_dilate: float = 0.016  # face / mouth target masks dilated by this fraction of the image side (2 px at 128)
    plate_erode: float = 0.008  # the plate keeps the face's border band this wide (1 px at 128), see plate.py
    plate_fill: float = 0.03  # the cut-out's outer band this wide is filled from around it (4 px at 128); 0: off
    fine_tune: bool = True  # stage 3 on the fused image; False = w/o R (with no dilation)
    lambda_clear: float = 1.0  # face field's opacity on the inner mouth, per frame pixel (model.py); 0: off

    # Lip-geometry guidance (deviation, model.py): the face field's Gaussians on the lip/chin mesh follow the
    # tracked mesh displacement in motion learning; squared error in units of offset_scale (1% head radius).
    lambda_geo: float = 0.5  # 0: off
    geo_replay: int = 8  # earlier training frames added to each step's geometry loss

    # Training (sec. II-D): static init | motion learning | colour fine-tuning.
    static_fraction: float = 0.25
    finetune_fraction: float = 0.125
    lambda_dssim: float = 0.5  # lambda of eqs. 8-9
    beta_jaw: float = 0.001  # beta of eq. 8 (L_jaw in mm^2)
    gamma_lpips: float = 0.2  # gamma of eq. 9, only with local LPIPS weights
    lpips_weights: str | None = None  # folder with alex.pth + alexnet-owt-*.pth (else env / torch hub cache)
    densify_every: int = 100  # 3DGS adaptive density control during the static stage
    densify_grad: float = 0.0002
    lr_means: float = 1.6e-4  # times the head radius, decayed 100x over training (3DGS)
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_colors: float = 2.5e-3
    lr_embedding: float = 5e-3
    lr_triplane: float = 5e-3
    lr_mlp: float = 2e-3
    backend: str = "auto"  # rasterizer backend: auto, torch, gsplat

    def __post_init__(self):
        if not self.data.source_frames:  # the hair plate and f_e are read from the source frame
            raise UserError("degstalk needs data.source_frames = true")
        if not (self.static_fraction >= 0 and self.finetune_fraction >= 0
                and self.static_fraction + self.finetune_fraction < 1):
            raise UserError("degstalk: static_fraction + finetune_fraction must be below 1")


def make_config(preset: str, variant: str | None) -> DEGSTalkConfig:
    """The config of ``preset`` ("cpu-small" or "gpu") and ``variant`` (None or one of :data:`VARIANTS`)."""
    if preset == "cpu-small":
        cfg = DEGSTalkConfig(
            data=DataConfig(size=128, audio_radius=3, source_frames=True),
            schedule=Schedule(iterations=4000, val_every=500, checkpoint_every=500),
        )
    elif preset == "gpu":
        # The paper: 50k iterations of face and mouth, then 10k of fine-tuning, at 512^2.
        cfg = DEGSTalkConfig(
            data=DataConfig(size=512, audio_radius=8, source_frames=True),
            schedule=Schedule(iterations=60000, val_every=5000, checkpoint_every=5000),
            num_face=20000, num_mouth=2000, max_face=60000, max_mouth=6000, sh_degree=3,
            triplane_resolutions=(64, 128, 256, 512), hidden=128, finetune_fraction=10000 / 60000,
            static_fraction=0.1,
        )
    else:
        raise UserError(f"degstalk has no preset {preset!r} (cpu-small, gpu)")
    if variant == "no-embedding":
        cfg.embedding_dim = 0
    elif variant == "no-expression":
        cfg.expression = False
    elif variant == "direct-fusion":
        cfg.train_dilate, cfg.plate_erode, cfg.plate_fill, cfg.fine_tune = 0.0, 0.0, 0.0, False
    elif variant == "no-hair":
        cfg.hair_plate = False
        cfg.num_hair = cfg.num_face * 5 // 6  # as many head-shell points as GaussianTalker gives the hair
        cfg.max_face += cfg.num_hair
    elif variant == "no-lip-geometry":
        cfg.lambda_geo = 0.0
    elif variant is not None:
        raise UserError(f"degstalk has no variant {variant!r} ({', '.join(VARIANTS)})")
    return cfg
