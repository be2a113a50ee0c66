"""Talk3D (Ko et al.): a triplane NeRF head edited per frame by an audio-guided attention U-Net.

Paper: ``../shared/papers/002_ffd699ecb6e7bf46.txt``. Rendering of frame n (eq. 3): ``I_n = R(P_ID + Delta P_n,
pi_n)`` where ``Delta P_n = F(P_ID, t_n)`` (sec. 3.3, eqs. 4-5, :mod:`.unet`) and R is EG3D's renderer (sec. 2.1)
-- triplane volume rendering to a low-resolution feature image and a super-resolution CNN
(:mod:`talkinghead.render.volume`, :mod:`talkinghead.render.superres`).

Where each part follows the paper:

* P_ID (eq. 2-3): a learned triplane [3, C, R, R], fixed (detached) once the audio stage starts, as the
  personalised generator's output is fixed while the paper trains the U-Net.
* F (sec. 3.3): split convolutions + roll-out, N_A self/cross-attention layers at the bottleneck over
  ``flatten(E + E_pos)`` (eq. 4), tokens t_n = {a_n, t_eye, t_rot, t_ldm, t_null} (eq. 5, :meth:`Talk3D.tokens`),
  decoder with skips to Delta P_n, added to P_ID (eq. 3); its last convolution starts at zero.
* R (sec. 2.1): the OSG decoder (64 hidden, softplus) -> density + F features, stratified + importance
  samples, alpha compositing, super-resolution x4 (the paper's 128 -> 512 ratio).
* Losses (sec. 3.4): L_rec = L1 (+ lambda_lpips LPIPS), the extra reconstruction loss on the lip region, and
  the final super-resolution-only stage ("a few epochs to update the super-resolution module").

What we have to do differently (no pretrained weights exist offline, and a 2-core CPU):

* **No EG3D generator, no VIVE3D personalisation (sec. 3.2).** The paper gets P_ID by inverting frames into an
  FFHQ-trained EG3D and fine-tuning it (pivotal tuning). We have neither EG3D's weights nor an inversion target,
  so a *static stage* optimises P_ID (3 x C x R^2), the OSG decoder and the super-resolution directly on the
  person's frames -- a person-specific NeRF with no generative 3-D prior. This is exactly what the paper argues
  against: unseen views are not constrained by a prior; the novel-view figures measure what that costs. Nor is
  there a discriminator: EG3D's dual discrimination of the raw and the super-resolved image becomes an L1 of
  the raw volume RGB at the low resolution (``lambda_raw``).
* **Sizes** (cpu-small; the gpu preset has the paper's): a 32^2 volume render (paper 128^2) with 24 + 24
  samples per ray (48 + 48), 3 x 16 x 64^2 planes (EG3D: 3 x 32 x 256^2), a 16 -> 32 -> 64 U-Net with a 16^2
  bottleneck (public code: 32 -> 256, 32^2) and N_A = 1, 16 feature channels (32), SR channels 64, 32
  (EG3D 256, 128), no style modulation in the SR (no latent w). At 128^2 the lips are ~19 x 7 pixels, i.e.
  ~5 x 2 pixels of the volume render; the mouth's detail is the super-resolution's job, from the rendered
  features, as in EG3D.
* **Camera**: EG3D's pose comes from its own cropping and a fixed-radius camera; ours is the dataset's tracked
  head pose in the project's convention. The head box (EG3D's ``box_warp``) is built from the face mesh
  (:func:`head_box`), and the scene is rendered in box units (centre at 0, largest half-side 1) so that
  densities have EG3D's scale whatever the metric size of the head. The ray range is the box, not EG3D's fixed
  [ray_start, ray_end].
* **Head over our backdrop.** EG3D (and Talk3D) render the whole crop -- background and torso included --
  which is why the paper needs the t_rot / t_ldm tokens to explain torso and background motion. Our datasets
  separate them: a background plate + a per-frame torso image (the backdrop, as the other methods use), so the
  NeRF renders only the head, with an alpha (``alpha`` of the volume, refined by the super-resolution's fourth
  channel), and the frame is ``rgb + (1 - alpha) * backdrop``. It keeps the comparison with the Gaussian
  methods fair and lets a novel view move the head without tearing the background. We still feed t_rot and
  t_ldm as the paper does (they carry pose-correlated appearance); an alpha loss against the head mask
  (``lambda_mask``) is ours, needed because the paper never composites.
* **Losses (sec. 3.4)**: LPIPS only with local weights (else logged off). The paper's extra reconstruction
  loss on the lip segment is two L1 terms here (we have the tracked lip landmarks, not BiSeNet): on the lips'
  landmark box of the frame, grown by a quarter each side (``lambda_mouth``), and on a *mouth crop*
  (``lambda_lip``, ``data.mouth_crop`` pixels wide, cut from the full-size frame as GaussianTalker's lip loss):
  the crop is a camera of its own (same viewmat, the crop's intrinsics), volume-rendered on the frame's own
  rays at 1/4 of the crop's size (16 x 12 rays for a 64 x 48 crop, ~20 % of the frame's 32^2) and
  super-resolved by the same SR, so the mouth is supervised 2-3x finer than in the 128^2 frame and with the
  full weight of a loss of its own. The ID loss (ArcFace/CurricularFace) is off: no face-recognition loading code or weights exist in
  :mod:`talkinghead.eval`. The SyncNet loss is off too (no SyncNet weights, and it needs 5 consecutive
  rendered frames per step while the trainer renders one); both are reported as off in ``train_log.json``.
* **Lip code, our stand-in for L_sync.** L_sync is the paper's only loss that ties the audio to the lips.
  Without it the audio path did not learn: on the cnn clip (1200 iterations, the earlier schedule) the
  deltaplane varied by 0.7 % of its rms between test frames, the bottleneck's cross-attention stayed uniform
  (0.20 on each of the five tokens), swapping a closed-mouth frame's audio for a wide-open one's changed its
  mouth by < 1e-4, and the rendered mouth-opening r was -0.04: one rendered frame per step gives the U-Net a
  weak, noisy audio -> lips signal (GaussianTalker here had the same problem, see its module). So a linear
  head on the audio token predicts the frame's tracked lip/jaw displacement (the face model's
  :data:`~talkinghead.face.landmarks.MOUTH_VERTICES`, ``expression @ basis``, in 1 % of the head box,
  :meth:`Talk3D.lip_code`) with a squared error (``lambda_lipcode``) on the frame and ``lipcode_replay``
  training frames remembered so far (:class:`~talkinghead.methods.replay.FrameBank`; no rendering, ~1 ms).
  It trains only the audio encoder and the head, from the first step (the static stage does not use a_n), so
  the audio stage starts with an a_n that already encodes the lips (held-out inner-lip gap r ~0.6 from the
  Whisper features after 250 steps alone) and the U-Net only has to map it to the deltaplane.
* **Lip token (ours).** The lip code trained the audio token, but the U-Net was not made to use it: after the
  full cpu-small schedule (session 4 avatar, cnn Whisper) only a_n changed the rendered mouth (swapping the
  eye, rotation or landmark token for a closed-mouth frame's changed the lips' box by <= 2e-4), and a_n by
  0.003-0.005 (mean abs, test / train frames) where the real frames differ by 0.09; the audio-dependent part of
  the deltaplane sat on the lips' cells of the xy plane (2x its size elsewhere) but showed in the image as the
  chin's outline moving, not the lips parting; the photometric losses' gradient on the audio net was 1/56 of the
  lip code's. So a_n is the audio net's output *plus* a linear projection of a lip code (``lip_proj``): at
  render the code the audio predicts (:meth:`lip_code`), while training optionally, with a probability that
  falls from ``lip_teacher`` to 0 over the audio stage (scheduled sampling, :meth:`teacher_probability`), the
  frame's tracked one -- meant to let the U-Net learn the mouth from a clean lip signal first (sessions 5-6:
  lip_teacher 1; it taught the U-Net the tracked code's edit but not the prediction's, see "Mouth replay" for
  why the default is now 0). Training only: rendering is driven by the audio alone; the
  tracked expression is never a render input. An avatar from before the lip token loads with a zero
  projection, which is exactly that model.
* **Audio region (ours; the paper lets every bottleneck cell attend to every token).** With the lip token
  (and the mouth crop) the full cpu-small run did worse: the U-Net learned to ignore a_n -- its mean
  cross-attention fell to 0.15, the deltaplane's variation between test frames to 1.9 % of its rms (0.37 before),
  and even the tracked lip code fed as a teacher changed the lips' box by <= 2e-4; a_n's large, at first
  meaningless variation hit every cell, and shutting it out was the photometric loss's cheapest way down. So
  only the bottleneck cells within ``audio_region`` cells of the neutral face's lip and jaw vertices (projected on
  each plane, :func:`~.unet.region_cells`; 102 of 768 cells on the cnn clip) may attend to a_n (a cross-attention
  mask, :attr:`audio_cells`); the other tokens reach every cell, and the decoder's convolutions carry the edit
  around the mouth. In fine-tune probes (300 audio-stage steps, 400 cnn frames) it raised the audio's effect on
  the lips' box 3.5x over the same losses without it and 5.7x on the failed run's avatar (bench/RESULTS.md,
  session 5). Its full cpu-small run (session 6) made the U-Net use the lip token -- the tracked lip code of an
  open frame now moves a closed test frame's lips' box by 0.017 (session 5's run: 0.0007; the real frames
  differ by 0.09) -- but not the audio: the code the audio predicts for the same frames moves it by 0.003, and
  driven by silence the mouth moves as with the audio (bench/RESULTS.md). Avatars from before the region load
  with every cell selected.
* **Mouth replay, and no teacher forcing (ours; session 7).** What did not converge was the many-frame
  regression lip code -> deltaplane with one rendered frame per step: from a trained static head with the U-Net
  re-initialised, 2 training frames taught it in 120 steps, 32 frames not in 280 (session 6). So each
  audio-stage step also renders the mouth crops of ``mouth_replay`` remembered training frames
  (:class:`~talkinghead.methods.replay.FrameBank`: camera, audio window, blink, crop and its backdrop), the U-Net
  batched over them and the frame in one call (its encoder, on P_ID alone, runs once; :meth:`_edit`), each
  crop's L1 weighted as the frame's (``lambda_lip``, their mean): every step sees the lip code -> mouth relation
  on several frames. The crop is cheap to render (16 x 12 rays), the U-Net's decoder is not (~0.05 CPU s of
  the ~0.07 s a replayed crop costs at cpu-small on session 8's machine, after the roll-out convolution's fast
  path, :func:`~.unet.rollout_conv`), so the preset replays one crop per step and runs 3000 iterations instead
  of 3600; at equal CPU (session 8, from the same static head) 600 audio steps with one crop moved the mouth
  with the audio more than 340 with four (mouth-opening r audio / silence 0.20 / 0.16 vs 0.14 / 0.14). The replayed frames, and now the frame too, are driven by the lip code their
  audio *predicts* (``lip_teacher`` 0, ``replay_teacher`` 0): the photometric loss then trains the whole
  audio -> lip code -> deltaplane chain end to end on what rendering feeds it. Probes (32 train frames, 160
  steps from session 6's static head, U-Net re-initialised; bench/RESULTS.md): predicted codes + 4 replayed
  crops moved the 5 most open test frames' lips by 0.0039 when given the closed frame's audio (session 6's full
  run: 0.0032) and brought the audio render closer to the real lips than the silence render; the same replay
  teacher-forced moved them by 0.0003, predicted codes without the replay by 0.00003 (120 steps).
* **Audio**: a window of the dataset's per-frame features (Whisper encoder states + energy by default, or
  phone posteriors + log-mel + energy, or wav2vec where prepared with it; the paper: wav2vec) through an audio
  net + attention over the window (the AD-NeRF / ER-NeRF audio attention net the public code reuses),
  :class:`~talkinghead.nn.audio.AudioEncoder`.
* **Stages**: static (P_ID + decoder + SR; stands in for sec. 3.2), audio (U-Net + tokens; decoder and SR
  keep training at a quarter of their rate, P_ID frozen as the paper's generator output is), and the paper's
  short final super-resolution stage.

Tokens t_n (eq. 5): audio a_n; eye t_eye (sinusoidal encoding of the tracked blink, the paper: AU45); head
rotation t_rot (the tracked rotation, :attr:`Condition.pose`, so a novel view keeps the frame's tokens); non-lip
landmarks t_ldm (brows, eyes, nose, upper face outline of the source frame, looked up by ``cond.index`` in a
buffer stored with the avatar -- the lips and jaw are left out as the paper does); and a learned null token.

Measured (bench/RESULTS.md "## Talk3D"): the earlier schedule (1200 iterations, no lip code) gave face PSNR 25.5
against 29.0 for a half-trained GaussianTalker and mouth-opening r -0.04, with a deltaplane that did not vary
between frames (above); at (yaw, pitch) = (+30, +20) mediapipe found no face -- without EG3D's prior the unseen
sides of the head are not constrained, the opposite of the paper's Table 1. With the lip code (3600 iterations,
session 4): face PSNR 26.5, mouth-opening r 0.01; with the lip token and the mouth crop (session 5, no audio
region): face PSNR 26.4, r 0.20, but driven by silence its mouth moved as with the audio (first 40 test frames:
r -0.64 vs -0.63) -- the mouth does not follow the audio yet. With the audio region (session 6, same schedule):
face PSNR 26.5, mouth r 0.08, silence-driven mouth r as with the audio (first 40 test frames -0.55 vs -0.56):
still not from the audio (the lip token now moves the mouth, the audio's prediction of it barely; see above).
With the mouth replay and no teacher forcing (session 7, 3000 iterations): face PSNR 26.1, mouth r 0.18; now
*from the audio*: on all 162 test frames mediapipe's mouth-opening r is 0.23 with the audio against -0.07 with
silence (session 6's avatar: see bench/RESULTS.md), the audio and silence renders differ by 0.025 on the lips'
box (session 6: 0.005) and the audio render is the closer to the real lips (L1 0.0468 vs 0.0482). The edit is
still small: the gap between the lips darkens and thickens with the audio, it does not open with teeth.
Session 8 (same schedule, the fast roll-out convolution; a clean run of 16 min on a 2-core Xeon): face PSNR
25.9, eval's mouth r 0.18, mouth-opening r 0.29 with the audio against -0.02 with silence on all 162 test frames.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talkinghead.face.landmarks import FACE_OVAL, LEFT_EYE, MOUTH_VERTICES, NOSE, RIGHT_EYE
from talkinghead.methods.base import Batch, Condition, DatasetInfo, MouthCrop, adam, decay_learning_rates
from talkinghead.nn.audio import AudioEncoder
from talkinghead.nn.encoding import blink_encoding
from talkinghead.methods.losses import PerceptualLoss
from talkinghead.methods.replay import FrameBank
from talkinghead.render.superres import SuperResolution
from talkinghead.render.volume import OSGDecoder, VolumeConfig, normalize_points, render_triplane, scene_viewmat

from .config import Talk3DConfig
from .unet import AttentionUNet, region_cells

# Landmarks of t_ldm: brows, eyes, nose and the upper half of the face outline (forehead to temples).
BROWS = (70, 63, 105, 66, 107, 300, 293, 334, 296, 336)
LDM_POINTS = tuple(dict.fromkeys(BROWS + RIGHT_EYE + LEFT_EYE + NOSE + FACE_OVAL[:9] + FACE_OVAL[-9:]))


def head_box(vertices: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[2, 3] (min, max) box around the whole head from the face mesh [V, 3]: the face's width each side in x,
    up to the top of the hair, and from in front of the nose to the back of the head (away from the nose)."""
    v = np.asarray(vertices, np.float64)
    lo, hi = v.min(0), v.max(0)
    w, h = hi[0] - lo[0], hi[1] - lo[1]
    c = (lo + hi) / 2
    front = np.sign(v[1, 2] - c[2]) or -1.0  # vertex 1: nose tip
    half = np.array([0.75 * w, 0.8 * h, 0.7 * w]) * scale
    centre = np.array([c[0], c[1] - 0.12 * h, c[2] - front * 0.35 * w])  # up (hair) and back (skull)
    return np.stack([centre - half, centre + half]).astype(np.float32)


def _downsample(img: Tensor, size: int) -> Tensor:
    """[H, W, C] -> [size, size, C], area averaging."""
    return F.interpolate(img.permute(2, 0, 1)[None], size=(size, size), mode="area")[0].permute(1, 2, 0)


class Talk3D(nn.Module):
    """The Method (see :mod:`talkinghead.methods.base`)."""

    def __init__(self, cfg: Talk3DConfig, info: DatasetInfo, box: Tensor | None = None,
                 landmarks: Tensor | None = None, mouth_basis: Tensor | None = None,
                 audio_cells: Tensor | None = None):
        super().__init__()
        self.cfg, self.info = cfg, info
        if cfg.data.size != cfg.render_size * 2 ** len(cfg.sr_channels):
            raise ValueError("render_size * 2^len(sr_channels) must equal data.size")
        C, R, Fc = cfg.plane_channels, cfg.plane_resolution, cfg.feature_channels
        box = box if box is not None else torch.tensor([[-0.1] * 3, [0.1] * 3])
        centre, half = (box[0] + box[1]) / 2, (box[1] - box[0]) / 2
        self.register_buffer("centre", centre)  # [3] head-frame metres
        self.register_buffer("scale", half.max())  # metres per box unit
        self.register_buffer("box", (box - centre) / half.max())  # [2, 3] in box units
        n_ldm = len(LDM_POINTS)
        self.register_buffer("landmarks", landmarks if landmarks is not None else torch.zeros(info.num_frames, n_ldm, 2))
        self.p_id = nn.Parameter(torch.randn(3, C, R, R) * 0.1)  # P_ID: [3, C, R, R]
        self.decoder = OSGDecoder(C, cfg.decoder_hidden, Fc)
        self.sr = SuperResolution(Fc + 1, 4, cfg.sr_channels)  # in: rgb, alpha, other features; out: rgb, alpha
        d = cfg.unet_channels[-1]
        self.unet = AttentionUNet(C, R, cfg.unet_channels, cfg.attention_layers, cfg.attention_heads)
        self.audio_encoder = AudioEncoder(info.audio_dim, d)
        self.eye_proj = nn.Linear(blink_encoding(torch.zeros(2)).shape[-1], d)
        self.rot_proj = nn.Sequential(nn.Linear(9, 64), nn.LeakyReLU(0.02), nn.Linear(64, d))
        self.ldm_proj = nn.Sequential(nn.Linear(2 * n_ldm, 64), nn.LeakyReLU(0.02), nn.Linear(64, d))
        self.null = nn.Parameter(torch.randn(d) * 0.1)
        # Lip code: a_n -> the tracked displacement of the lip/jaw vertices [Vm, 3], in lip_unit (1 % of the
        # box's half-side). The face model's basis rows of those vertices [E, Vm, 3] only train it, but are
        # saved so that ``--resume`` (which builds without the dataset) keeps the right targets.
        n_mouth = len(MOUTH_VERTICES)
        self.lip_head = nn.Linear(d, 3 * n_mouth)
        self.lip_proj = nn.Linear(3 * n_mouth, d)  # lip code -> its part of the audio token a_n
        # The bottleneck cells that may attend to a_n [3 R_b^2] (bool): those near the lips and jaw (cfg.audio_region).
        n_cells = 3 * self.unet.side ** 2
        self.register_buffer("audio_cells", torch.ones(n_cells, dtype=torch.bool) if audio_cells is None else audio_cells)
        # The cross-attention mask [3 R_b^2, 5] those cells make (True: may not attend), built once from
        # audio_cells (and again when a state is loaded); not saved, audio_cells is.
        self.register_buffer("token_mask", self._token_mask(self.audio_cells), persistent=False)
        if mouth_basis is None:
            mouth_basis = torch.zeros(info.expression_dim, n_mouth, 3)
        self.register_buffer("mouth_basis", mouth_basis.float())
        self._bank = FrameBank(cfg.schedule.seed)  # (audio window, expression) of the frames seen
        # (viewmat, audio, blink, index, crop K, crop image, crop backdrop, expression) for the mouth replay
        self._crops = FrameBank(cfg.schedule.seed + 1)
        self.register_buffer("audio_on", torch.tensor(False))  # the U-Net is applied (audio stage reached)
        self.volume_cfg = VolumeConfig(num_coarse=cfg.num_coarse, num_fine=cfg.num_fine, chunk=cfg.chunk)
        self._opt: torch.optim.Optimizer | None = None
        self._lpips: PerceptualLoss | None = None
        self._lpips_note = "off: not loaded"
        self._skips: list[Tensor] | None = None  # the U-Net encoder on P_ID, cached while not training
        self._gen = torch.Generator().manual_seed(cfg.schedule.seed)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg: Talk3DConfig, info: DatasetInfo, dataset=None) -> "Talk3D":
        if dataset is None:  # --resume / render: every buffer comes from the saved state
            return cls(cfg, info)
        box = torch.from_numpy(head_box(dataset.face_model.neutral, cfg.box_scale))
        lm = np.asarray(dataset.tracks.landmarks, np.float32)[:, list(LDM_POINTS), :2]
        lm = np.nan_to_num(lm / float(dataset.size) * 2 - 1)  # [T, L, 2] in [-1, 1] of the crop
        landmarks = torch.from_numpy(np.ascontiguousarray(lm))
        basis = np.asarray(dataset.face_model.basis, np.float32)[:, list(MOUTH_VERTICES)]
        mouth_basis = torch.from_numpy(np.ascontiguousarray(basis))
        cells = None
        if cfg.audio_region > 0:
            # the lips and jaw of the neutral face, in the normalised box coordinates the planes span
            mouth = torch.from_numpy(np.asarray(dataset.face_model.neutral, np.float32)[list(MOUTH_VERTICES)])
            centre, half = (box[0] + box[1]) / 2, ((box[1] - box[0]) / 2).max()
            xyz = normalize_points((mouth - centre) / half, (box - centre) / half)
            side = cfg.plane_resolution // 2 ** (len(cfg.unet_channels) - 1)
            cells = region_cells(side, xyz, cfg.audio_region)
        model = cls(cfg, info, box, landmarks, mouth_basis, cells)
        model._setup_lpips()
        return model

    def _setup_lpips(self) -> None:
        self._lpips, self._lpips_note = PerceptualLoss.optional(self.cfg.lambda_lpips, self.cfg.lpips_weights,
                                                                "lambda_lpips")

    def train(self, mode: bool = True):
        self._skips = None
        return super().train(mode)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        self._skips = None
        if "lip_proj.weight" not in state:  # an avatar from before the lip token: a zero projection is that model
            state = {**state, "lip_proj.weight": torch.zeros_like(self.lip_proj.weight),
                     "lip_proj.bias": torch.zeros_like(self.lip_proj.bias)}
        if "audio_cells" not in state:  # ... and from before the audio region: every cell sees a_n
            state = {**state, "audio_cells": torch.ones_like(self.audio_cells)}
        result = super().load_state_dict(state, strict=strict, assign=assign)
        self.token_mask = self._token_mask(self.audio_cells)
        return result

    @staticmethod
    def _token_mask(audio_cells: Tensor) -> Tensor:
        """[3 R_b^2] cells that may attend to a_n -> the cross-attention mask [3 R_b^2, 5] (True: may not)."""
        mask = torch.zeros(audio_cells.shape[0], 5, dtype=torch.bool, device=audio_cells.device)
        mask[:, 0] = ~audio_cells
        return mask

    # ------------------------------------------------------------------------------------------ pieces

    def tokens(self, cond: Condition, lip: Tensor | None = None) -> Tensor:
        """[5, d] t_n = {audio, eye, rotation, non-lip landmarks, null} (eq. 5).

        a_n = the audio net's output + a projection of the lip code: ``lip`` [Vm, 3] (a tracked lip code, only
        while training, teacher forcing) or, by default, the lip code the audio net predicts."""
        a = self.audio_encoder(cond.audio)
        code = self.lip_head(a) if lip is None else lip.reshape(-1)
        a = a + self.lip_proj(code)
        e = self.eye_proj(blink_encoding(cond.blink))
        r = self.rot_proj(cond.pose[:3, :3].reshape(9))
        i = min(max(cond.index, 0), self.landmarks.shape[0] - 1)
        lm = self.landmarks[i] if cond.index >= 0 else torch.zeros_like(self.landmarks[0])
        l = self.ldm_proj(lm.reshape(-1))
        return torch.stack([a, e, r, l, self.null])

    def planes(self, cond: Condition, audio: bool, freeze_id: bool = False,
               lip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """P_ID (+ Delta P_n when ``audio``): [3, C, R, R], and the bottleneck's attention [3 R_b^2, 5].

        ``lip`` [Vm, 3]: a tracked lip code for the audio token (:meth:`tokens`), training only."""
        p_id = self.p_id.detach() if freeze_id else self.p_id
        if not audio:
            return p_id, None
        planes, attn = self._edit(p_id, self.tokens(cond, lip)[None])
        return planes[0], attn[0]

    def _edit(self, p_id: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """P_ID [3, C, R, R] + the tokens of B frames [B, 5, d] -> P_ID + Delta P [B, 3, C, R, R] and the
        bottleneck's attention [B, 3 R_b^2, 5]: one U-Net call, its encoder (on P_ID alone) run once."""
        if self._skips is not None:
            skips = self._skips
        else:
            skips = self.unet.encode(p_id)
            if not self.training:
                self._skips = skips
        delta, attn = self.unet(skips, tokens, self.token_mask)
        return p_id + delta, attn

    @property
    def lip_unit(self) -> Tensor:
        """The lip code's unit: 1 % of the head box's largest half-side, in head-frame metres."""
        return 0.01 * self.scale

    def lip_code(self, audio: Tensor) -> Tensor:
        """[B, 2R+1, D] audio windows -> [B, Vm, 3] predicted lip/jaw displacement (lip_unit) from a_n."""
        return self.lip_head(self.audio_encoder(audio)).view(audio.shape[0], len(MOUTH_VERTICES), 3)

    def lip_target(self, expression: Tensor) -> Tensor:
        """[B, E] tracked expressions -> [B, Vm, 3] their lip/jaw vertex displacement (lip_unit)."""
        return torch.einsum("be,evc->bvc", expression, self.mouth_basis) / self.lip_unit

    def lipcode_loss(self, batch: Batch) -> Tensor:
        """Mean squared lip-code error of this frame and ``lipcode_replay`` remembered ones (equal weights)."""
        self._bank.add(batch.cond.index, batch.cond.audio, batch.expression)
        audio, expr = batch.cond.audio[None], batch.expression[None]
        if self.cfg.lipcode_replay > 0:
            ra, re = self._bank.sample(self.cfg.lipcode_replay)
            audio, expr = torch.cat([audio, ra]), torch.cat([expr, re])
        return (self.lip_code(audio) - self.lip_target(expr)).square().mean()

    def volume(self, planes: Tensor, cond: Condition, perturb: bool, crop: MouthCrop | None = None) -> dict[str, Tensor]:
        """The low-resolution render: features [r, r, F], alpha [r, r] (r = render_size); with ``crop``, the
        crop camera's [h / s, w / s] (s = the super-resolution factor), so that the SR makes the crop's size."""
        if crop is None:
            w = h = self.cfg.render_size
            K = cond.K.clone()
            K[:2] *= w / cond.width  # continuous pixel coordinates scale exactly (centres at +0.5)
        else:
            s = self.sr.factor
            h, w = crop.image.shape[0] // s, crop.image.shape[1] // s
            if (h * s, w * s) != tuple(crop.image.shape[:2]):
                raise ValueError(f"the mouth crop {tuple(crop.image.shape[:2])} is not a multiple of the SR factor {s}")
            K = crop.K.clone()
            K[:2] /= s
        vm = scene_viewmat(cond.viewmat, self.centre, self.scale)
        return render_triplane(planes, self.decoder, self.box, vm, K, w, h, self.volume_cfg, perturb=perturb,
                               generator=self._gen if perturb else None)

    def upsample(self, vol: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Super-resolution of the feature image -> (premultiplied rgb [H, W, 3], alpha [H, W, 1]) in [0, 1]."""
        f = vol["features"]
        x = torch.cat([f[..., :3], vol["alpha"][..., None], f[..., 3:]], -1).permute(2, 0, 1)[None]
        y = self.sr(x)[0].permute(1, 2, 0)
        alpha = y[..., 3:4].clamp(0, 1)
        return torch.minimum(y[..., :3].clamp(min=0), alpha), alpha

    @staticmethod
    def over(rgb: Tensor, alpha: Tensor, backdrop: Tensor) -> Tensor:
        return (rgb + (1 - alpha) * backdrop).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ Method

    def render(self, cond: Condition) -> Tensor:
        """The frame at the Condition's size: the super-resolution's fixed output (data.size) is resized
        (bilinear, antialiased) when the renderer asks for another size, before compositing."""
        planes, _ = self.planes(cond, audio=bool(self.audio_on))
        rgb, alpha = self.upsample(self.volume(planes, cond, perturb=False))
        if rgb.shape[:2] != (cond.height, cond.width):
            x = F.interpolate(torch.cat([rgb, alpha], -1).permute(2, 0, 1)[None], size=(cond.height, cond.width),
                              mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0)
            alpha = x[..., 3:].clamp(0, 1)
            rgb = torch.minimum(x[..., :3].clamp(min=0), alpha)
        return self.over(rgb, alpha, cond.backdrop)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        render = list(self.decoder.parameters()) + list(self.sr.parameters())
        ids = {id(p) for p in render} | {id(self.p_id)}
        rest = [p for p in self.parameters() if id(p) not in ids]
        self._opt = adam([
            {"params": [self.p_id], "lr": self.cfg.lr_planes, "name": "planes"},
            {"params": render, "lr": self.cfg.lr_render, "name": "render"},
            {"params": rest, "lr": self.cfg.lr_unet, "name": "unet"},
        ])
        for g in self._opt.param_groups:
            g["eps"] = 1e-8  # not 3DGS's 1e-15: these are ordinary network weights
        return [self._opt]

    def stage_bounds(self) -> tuple[int, int]:
        """(first audio-stage iteration, first super-resolution-stage iteration)."""
        n = self.cfg.schedule.iterations
        return int(round(self.cfg.static_fraction * n)), n - int(round(self.cfg.sr_fraction * n))

    def teacher_probability(self, step: int) -> float:
        """Scheduled sampling of the lip token: ``lip_teacher`` at the start of the audio stage, falling linearly
        to 0 at its end, so that the U-Net first learns the mouth from the tracked lip code and ends trained on
        the audio's prediction, which is what rendering feeds it."""
        a, s = self.stage_bounds()
        if not a <= step < s:
            return 0.0
        return self.cfg.lip_teacher * (s - step) / max(1, s - a)

    def stage(self, step: int) -> str:
        a, s = self.stage_bounds()
        return "static" if step < a else ("audio" if step < s else "sr")

    def train_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, cond = self.cfg, batch.cond
        stage = self.stage(step)
        audio = stage != "static"
        if audio and not bool(self.audio_on):
            self.audio_on.fill_(True)
        lip = None
        if stage == "audio" and self.mouth_basis.shape[0] > 0 and cfg.lip_teacher > 0:
            if float(torch.rand((), generator=self._gen)) < self.teacher_probability(step):
                lip = self.lip_target(batch.expression[None])[0]  # teacher forcing (see the module docstring)
        crop = batch.mouth if cfg.lambda_lip > 0 else None
        replay = self._replay(batch, step) if stage == "audio" and crop is not None and cfg.mouth_replay > 0 else None
        with torch.no_grad() if stage == "sr" else contextlib.nullcontext():
            if replay is None:
                planes, _ = self.planes(cond, audio=audio, freeze_id=audio, lip=lip)
            else:  # the frame and the replayed ones through one batched U-Net call
                tokens = torch.cat([self.tokens(cond, lip)[None], torch.stack([self.tokens(c, l) for c, _, l in replay])])
                all_planes, _ = self._edit(self.p_id.detach(), tokens)
                planes = all_planes[0]
            vol = self.volume(planes, cond, perturb=True)
            vol_crop = self.volume(planes, cond, perturb=True, crop=crop) if crop is not None else None
        rgb, alpha = self.upsample(vol)
        pred = self.over(rgb, alpha, cond.backdrop)
        l1 = (pred - batch.image).abs().mean()
        loss, logs = l1, {"l1": l1.item()}
        if vol_crop is not None:
            c_rgb, c_alpha = self.upsample(vol_crop)
            lp = (self.over(c_rgb, c_alpha, crop.backdrop) - crop.image).abs().mean()
            loss = loss + cfg.lambda_lip * lp
            logs["lip"] = lp.item()
        if replay is not None:
            errs = []
            for k, (c, mc, _) in enumerate(replay):
                r_rgb, r_alpha = self.upsample(self.volume(all_planes[k + 1], c, perturb=True, crop=mc))
                errs.append((self.over(r_rgb, r_alpha, mc.backdrop) - mc.image).abs().mean())
            rp = torch.stack(errs).mean()
            loss = loss + cfg.lambda_lip * rp
            logs["replay"] = rp.item()
        x0, y0, x1, y1 = batch.mouth_box.tolist()
        gw, gh = 0.25 * (x1 - x0), 0.25 * (y1 - y0)  # the lips' box grown by a quarter each side
        xs = slice(max(0, int(x0 - gw)), int(np.ceil(x1 + gw)))
        ys = slice(max(0, int(y0 - gh)), int(np.ceil(y1 + gh)))
        if cfg.lambda_mouth > 0 and pred[ys, xs].numel():
            lm = (pred[ys, xs] - batch.image[ys, xs]).abs().mean()
            loss = loss + cfg.lambda_mouth * lm
            logs["mouth"] = lm.item()
        if stage != "sr":
            r = cfg.render_size
            raw = self.over(vol["features"][..., :3], vol["alpha"][..., None], _downsample(cond.backdrop, r))
            lr = (raw - _downsample(batch.image, r)).abs().mean()
            mask = (vol["alpha"] - _downsample(batch.head_mask[..., None], r)[..., 0]).abs().mean()
            loss = loss + cfg.lambda_raw * lr + cfg.lambda_mask * mask
            logs.update(raw=lr.item(), mask=mask.item())
        if self._lpips is not None:
            lp = self._lpips(pred, batch.image)
            loss = loss + cfg.lambda_lpips * lp
            logs["lpips"] = lp.item()
        if stage != "sr" and cfg.lambda_lipcode > 0 and self.mouth_basis.shape[0] > 0:
            lc = self.lipcode_loss(batch)
            loss = loss + cfg.lambda_lipcode * lc
            logs["lipcode"] = lc.item()
        logs["loss"] = loss.item()
        return loss, logs

    def _replay(self, batch: Batch, step: int) -> list[tuple[Condition, MouthCrop, Tensor | None]]:
        """``mouth_replay`` remembered training frames for this audio-stage step (the frame itself is remembered
        first): each as (a Condition for its tokens and camera, its mouth crop, a tracked lip code [Vm, 3] with
        probability ``replay_teacher`` x :meth:`teacher_probability`, else None: the audio's prediction)."""
        c, m = batch.cond, batch.mouth
        self._crops.add(c.index, c.viewmat, c.audio, c.blink, torch.tensor(c.index), m.K, m.image, m.backdrop,
                        batch.expression)
        p = self.cfg.replay_teacher * self.teacher_probability(step)
        out = []
        for vm, au, bl, idx, K, img, bd, ex in zip(*self._crops.sample(self.cfg.mouth_replay)):
            cond = Condition(viewmat=vm, K=K, backdrop=bd, audio=au, blink=bl, index=int(idx))
            teach = p > 0 and float(torch.rand((), generator=self._gen)) < p
            out.append((cond, MouthCrop(K, img, bd), self.lip_target(ex[None])[0] if teach else None))
        return out

    def after_step(self, step: int) -> None:
        """Networks decay to 30 % of their rate over training; the audio stage starts the render group at 1/4."""
        if self._opt is None:
            return
        decay_learning_rates(self._opt, step, self.cfg.schedule.iterations, lambda name: 0.3)
        if self.stage(step + 1) != "static":
            for g in self._opt.param_groups:
                if g["name"] == "render":
                    g["lr"] *= 0.25

    def log_extras(self) -> dict[str, Any]:
        a, s = self.stage_bounds()
        return {"lpips": self._lpips_note,
                "id_loss": "off: no face-recognition (ArcFace/CurricularFace) loading code or weights offline",
                "sync_loss": "off: SyncNet needs 5 consecutive rendered frames per step (the trainer renders one) "
                             "and local syncnet weights",
                "identity_triplane": "optimised by the static stage (no EG3D / VIVE3D weights offline)",
                "stages": {"static": [0, a], "audio": [a, s], "sr": [s, self.cfg.schedule.iterations]}}

    def attention_summary(self, cond: Condition) -> np.ndarray:
        """Mean cross-attention [5] of the bottleneck cells on (audio, eye, rotation, landmarks, null)."""
        with torch.no_grad():
            _, attn = self.planes(cond, audio=True)
        return attn.mean(0).cpu().numpy()
