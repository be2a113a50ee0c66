"""``talkinghead oneshot render``: one portrait + audio (+ emotion, + view) -> mp4 (paper 003, inference).

1. The portrait (:mod:`.portrait`): crop, camera, shared-space coefficients m^s, backdrop.
2. Audio -> G_m -> coefficients m_1:T (+ the emotion's FACS offset, :mod:`.emotion`) -> E_m -> z_m per frame.
3. Identity: w_id = E_id(I) + w̄_id, then the inversion of sec. III-B: ``code_steps`` Adam steps on w_id so
   that R(G(w_id, E_m(m^s)), c^s) reproduces the portrait (pixel L1 on the output and the raw render), then
   ``tune_steps`` on the weights of G and R with w_id fixed (pivotal tuning, PTI; the paper says "several
   inversion steps" without more detail). Progress bars for both.
4. w_id^e = M_e(w_id | e) when the model has a trained mapper; every frame G(w_id^e, z_m,t) is rendered from
   the portrait's camera moved by ``--yaw`` / ``--pitch`` on a sphere about the head's pivot
   (:func:`talkinghead.camera.orbit`, the project's one novel-view camera), over the portrait's backdrop.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from talkinghead.errors import UserError

from .emotion import check_emotion, emotion_weights
from .model import load_model
from .motion import coefficient_windows

MAX_ANGLE_DEG = 90.0


def _check_args(out: Path, emotion: str, yaw: float, pitch: float) -> None:
    from talkinghead.methods.render import _check_out

    check_emotion(emotion)
    for name, v in (("yaw", yaw), ("pitch", pitch)):
        if not -MAX_ANGLE_DEG <= v <= MAX_ANGLE_DEG:
            raise UserError(f"--{name} {v:g} is outside -{MAX_ANGLE_DEG:g}..{MAX_ANGLE_DEG:g} degrees")
    _check_out(out)


def driving_motion(model, wave: np.ndarray, fps: float, wav2vec: str | None = None) -> np.ndarray:
    """Coefficients [T, K] G_m predicts for a 16 kHz wave."""
    from talkinghead.methods.render import driving_features

    feats = driving_features(wave, fps, wav2vec)
    if feats.shape[1] != model.motion_generator.inp.in_features // (2 * model.motion_generator.window + 1):
        raise UserError("the driving audio's features do not match the model's (was it trained with wav2vec?)")
    with torch.no_grad():
        return model.motion_generator(torch.from_numpy(feats)[None])[0].numpy()


def invert(model, portrait, code_steps: int, tune_steps: int, code_lr: float, tune_lr: float,
           progress: bool = True) -> tuple[torch.Tensor, torch.nn.Module, torch.nn.Module, dict]:
    """(w_id [1, 3, W], tuned synthesis, tuned renderer, figures) for the portrait (module docstring, step 3)."""
    from tqdm import tqdm

    img = torch.from_numpy(portrait.image).permute(2, 0, 1)[None]
    back = torch.from_numpy(portrait.backdrop).permute(2, 0, 1)[None]
    vm = torch.from_numpy(portrait.viewmat)[None]
    K = torch.from_numpy(portrait.K)[None]
    win = coefficient_windows(torch.from_numpy(portrait.coefficients)[None].expand(model.cfg.motion.motion_window, -1)
                              .contiguous(), model.cfg.motion.motion_window)[:1]
    with torch.no_grad():
        w = model.identity_encoder.code(img)
        z = model.motion_encoder(win)
    synthesis, renderer = copy.deepcopy(model.synthesis), copy.deepcopy(model.renderer)

    def loss_of(w_):
        planes = synthesis(w_, z)
        out = renderer.render(planes[0], vm[0], K[0], back[0])
        low_t = F.interpolate(img, size=out["lowres"].shape[-2:], mode="area")[0]
        return (out["image"] - img[0]).abs().mean() + (out["lowres"] - low_t).abs().mean()

    figures = {}
    with torch.no_grad():
        figures["loss_encoder"] = float(loss_of(w))
    w = w.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=code_lr)
    for _ in tqdm(range(code_steps), desc="inversion: w_id", unit="step", disable=not progress or not code_steps):
        opt.zero_grad()
        loss = loss_of(w)
        loss.backward()
        opt.step()
    w = w.detach()
    params = list(synthesis.parameters()) + list(renderer.parameters())
    opt = torch.optim.Adam(params, lr=tune_lr)
    for _ in tqdm(range(tune_steps), desc="inversion: tuning G", unit="step", disable=not progress or not tune_steps):
        opt.zero_grad()
        loss = loss_of(w)
        loss.backward()
        opt.step()
    with torch.no_grad():
        figures["loss_inverted"] = float(loss_of(w))
    return w, synthesis.eval(), renderer.eval(), figures


@dataclass
class Identity:
    """A portrait inverted into a model: what every frame of its videos is rendered from."""

    portrait: object  # .portrait.Portrait
    w: torch.Tensor  # [1, 3, W] w_id after inversion
    synthesis: torch.nn.Module  # G, tuned on the portrait
    renderer: torch.nn.Module  # R, tuned on the portrait
    figures: dict


def load_identity(model, image: Path, code_steps: int | None = None, tune_steps: int | None = None,
                  progress: bool = True, crop: bool = True) -> Identity:
    """Steps 1 and 3 of the module docstring for ``image`` (``crop``: see :func:`.portrait.load_portrait`)."""
    from .portrait import load_portrait

    portrait = load_portrait(Path(image), model.space, model.cfg.generator.image_size, crop=crop)
    inv = model.cfg.inversion
    t0 = time.perf_counter()
    w, synthesis, renderer, figures = invert(model, portrait, inv.code_steps if code_steps is None else code_steps,
                                             inv.tune_steps if tune_steps is None else tune_steps, inv.code_lr,
                                             inv.tune_lr, progress)
    figures["inversion_s"] = round(time.perf_counter() - t0, 2)
    return Identity(portrait, w, synthesis, renderer, figures)


def render_frames(model, ident: Identity, coefs: np.ndarray, emotion: str = "neutral", intensity: float = 1.0,
                  yaw: float = 0.0, pitch: float = 0.0) -> Iterator[np.ndarray]:
    """uint8 frames [S, S, 3] of the coefficient sequence [T, K] (step 2's emotion offset and step 4)."""
    from talkinghead.camera import head_pivot, orbit

    check_emotion(emotion)
    coefs = coefs + intensity * model.emotion_offsets()[emotion][None]
    weights = torch.from_numpy(emotion_weights(emotion))[None]
    with torch.no_grad():
        w = model.emotion_mapper(ident.w, weights) if bool(model.mapper_trained) else ident.w
        z = model.motion_encoder(coefficient_windows(torch.from_numpy(coefs.astype(np.float32)),
                                                     model.cfg.motion.motion_window))
    vm = torch.from_numpy(orbit(ident.portrait.viewmat, yaw, pitch, head_pivot(model.space.mean_neutral)))
    K = torch.from_numpy(ident.portrait.K)
    back = torch.from_numpy(ident.portrait.backdrop).permute(2, 0, 1)
    with torch.no_grad():
        for t in range(len(z)):
            planes = ident.synthesis(w, z[t:t + 1])[0]
            img = ident.renderer.render(planes, vm, K, back)["image"].clamp(0, 1)
            yield (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def render(model_dir: Path, image: Path, audio: Path, out: Path, emotion: str = "neutral", intensity: float = 1.0,
           yaw: float = 0.0, pitch: float = 0.0, code_steps: int | None = None, tune_steps: int | None = None,
           progress: bool = True) -> dict:
    """Write ``out`` (mp4 with the driving audio); returns figures (frames, fps, timings, inversion losses)."""
    from tqdm import tqdm

    from talkinghead.audio.features import load_driving_audio
    from talkinghead.media import write_video

    out = Path(out)
    _check_args(out, emotion, yaw, pitch)
    model, meta = load_model(model_dir)
    wave = load_driving_audio(audio)
    fps = float(meta.get("fps", 25.0))
    ident = load_identity(model, image, code_steps, tune_steps, progress)
    coefs = driving_motion(model, wave, fps)
    t1 = time.perf_counter()
    frames = render_frames(model, ident, coefs, emotion, intensity, yaw, pitch)
    count = write_video(out, tqdm(frames, total=len(coefs), desc="oneshot render", unit="frame", disable=not progress),
                        fps, audio=wave)
    t_render = time.perf_counter() - t1
    figures = dict(ident.figures)
    figures.update(frames=count, fps=fps, render_s=round(t_render, 2), render_fps=count / max(t_render, 1e-9),
                   emotion=emotion, emotion_control="FACS offset + M_e" if bool(model.mapper_trained) else "FACS offset",
                   yaw=yaw, pitch=pitch)
    return figures
