"""Talk3D's configuration and presets (cpu-small, gpu)."""

from __future__ import annotations

from dataclasses import dataclass, field

from talkinghead.errors import UserError
from talkinghead.methods.base import DataConfig, Schedule


@dataclass
class Talk3DConfig:
    data: DataConfig = field(default_factory=DataConfig)
    schedule: Schedule = field(default_factory=Schedule)

    # Identity triplane P_ID [3, plane_channels, plane_resolution, plane_resolution] (EG3D: 3 x 32 x 256^2).
    plane_resolution: int = 64
    plane_channels: int = 16
    # Volume rendering (EG3D / Talk3D: 128^2 feature image, 48 + 48 samples per ray, decoder 64 hidden).
    render_size: int = 32  # side of the volume-rendered feature image; super-resolution makes data.size
    num_coarse: int = 24
    num_fine: int = 24
    decoder_hidden: int = 64
    feature_channels: int = 16  # F of the rendered feature image (channels 0..2: RGB); EG3D: 32
    sr_channels: tuple[int, ...] = (64, 32)  # one block per doubling: render_size * 2^len == data.size
    chunk: int = 8192  # rays per chunk
    box_scale: float = 1.0  # the head box (from the face mesh, see model.head_box) grown by this factor

    # Audio-guided attention U-Net (sec. 3.3). The public code: 32 -> 64 -> 128 -> 256 channels, 256^2 -> 32^2.
    unet_channels: tuple[int, ...] = (16, 32, 64)  # one level per entry; the bottleneck is plane_res / 2^(n-1)
    attention_layers: int = 1  # N_A (SA + CA per layer)
    attention_heads: int = 4
    # Only the bottleneck cells within this many cells of the lips and jaw (neutral face, projected on each plane)
    # attend to the audio token a_n; 0: every cell does (the paper). See model.py ("Audio region").
    audio_region: float = 1.5

    # Training (sec. 3.4) and its stages.
    static_fraction: float = 0.45  # P_ID + decoder + super-resolution on the frames (stands in for EG3D + VIVE3D)
    sr_fraction: float = 0.1  # final stage: super-resolution only ("a few epochs to update the SR module")
    lambda_mouth: float = 1.0  # L1 on the lips' box (the paper: BiSeNet lip segment)
    # L1 of the mouth crop (data.mouth_crop pixels wide, from the full-size frame), volume-rendered as its own
    # camera at 1/sr-factor of the crop's size and super-resolved like the frame: the lips seen 2-3x finer.
    lambda_lip: float = 2.0
    lambda_raw: float = 0.5  # L1 of the raw volume RGB at render_size (EG3D's dual discrimination, as a loss)
    lambda_mask: float = 0.1  # accumulated alpha vs the head mask (our compositing needs a clean alpha)
    lambda_lpips: float = 0.1  # only where LPIPS weights exist locally
    # The audio token a_n predicts the tracked lip/jaw displacement (our stand-in for L_sync, see model.py),
    # on the frame and ``lipcode_replay`` remembered training frames per step; 0 turns it off.
    lambda_lipcode: float = 1.0
    lipcode_replay: int = 32
    # The lip code also drives the U-Net: a_n = audio net + a projection of the lip code (model.py, "Lip token").
    # While training, a step may project the frame's tracked lip code instead of the audio's prediction (teacher
    # forcing) with probability lip_teacher at the start of the audio stage, falling linearly to 0 at its end
    # (model.teacher_probability); rendering always uses the prediction from the audio. Off by default since
    # session 7: trained on the prediction (with the mouth replay) the U-Net learnt the mouth, teacher-forced not.
    lip_teacher: float = 0.0
    # Mouth replay (ours, model.py): each audio-stage step also renders the mouth crops of this many remembered
    # training frames, the U-Net batched over them and the frame, each driven by the lip code its audio predicts
    # (teacher-forced with probability replay_teacher x the frame's); 0: off. ~0.07 CPU s per crop at cpu-small
    # (session 8's Xeon; ~0.05 of it the U-Net's decoder on one more frame).
    mouth_replay: int = 1
    replay_teacher: float = 0.0
    lpips_weights: str | None = None
    lr_planes: float = 1e-2
    lr_render: float = 2e-3  # decoder + super-resolution
    lr_unet: float = 1e-3  # U-Net, audio net, token encoders


def make_config(preset: str, variant: str | None) -> Talk3DConfig:
    """The config of ``preset`` ("cpu-small" or "gpu"); Talk3D has no variants."""
    if variant is not None:
        raise UserError(f"talk3d has no variant {variant!r}")
    if preset == "cpu-small":
        # Sized for a shared 2-core CPU (session 8, Intel Xeon: 16 min wall, 15.6 CPU-min for the whole
        # command on the cnn clip; ~0.15 CPU s per static step, ~0.3-0.4 per audio step; session 7's AMD EPYC
        # was 2.5-3x slower): 32^2 volume render (24 + 24 samples) + SR x4 to 128^2 (the paper's ratio, 128 ->
        # 512), 3 x 16 x 64^2 planes, a three-level U-Net (16 -> 32 -> 64, bottleneck 16^2), one attention
        # layer. Most of the schedule is the audio stage: the mouth is what it has to learn, one frame per step
        # (1600 training frames on the cnn clip) plus one replayed mouth crop (3000 iterations, not 3600, to pay
        # for the replay). Session 8 (bench/RESULTS.md): at equal CPU one crop per step beat four (more steps
        # matter more than more crops), and 2400 iterations kept the mouth r with the audio but not its gap to
        # silence (+0.12 against +0.31).
        return Talk3DConfig(data=DataConfig(size=128, audio_radius=4, mouth_crop=64),
                            schedule=Schedule(iterations=3000, val_every=900, checkpoint_every=300),
                            render_size=32, num_coarse=24, num_fine=24, sr_channels=(64, 32),
                            static_fraction=0.3, sr_fraction=0.05)
    if preset == "gpu":
        # The paper's sizes: 128^2 volume render with 48 + 48 samples, SR x4 to 512^2 (EG3D's 256 / 128 channels),
        # 3 x 32 x 256^2 planes, the public code's U-Net 32 -> 64 -> 128 -> 256 (bottleneck 32^2).
        return Talk3DConfig(data=DataConfig(size=512, audio_radius=8, mouth_crop=128),
                            schedule=Schedule(iterations=60000, val_every=5000, checkpoint_every=5000),
                            plane_resolution=256, plane_channels=32, render_size=128, num_coarse=48, num_fine=48,
                            feature_channels=32, sr_channels=(256, 128), chunk=65536,
                            unet_channels=(32, 64, 128, 256), attention_layers=2, attention_heads=8)
    raise UserError(f"talk3d has no preset {preset!r} (cpu-small, gpu)")
