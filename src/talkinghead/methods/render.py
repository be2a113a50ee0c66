"""``talkinghead render``: an avatar + audio (or a dataset split) -> mp4 with the audio muxed in.

Driving (:func:`render_audio`): features of the new audio come from the same extractor prepare used
(:func:`talkinghead.audio.features.compute_audio_features`) and are normalised with the avatar's training
statistics; head pose, background and torso replay the training sequence, back and forth when the audio
is longer (a ping-pong loop never jumps), or hold its first frame with ``pose="static"``.

Self-driven (:func:`render_split`): the split's own audio features, poses and backdrops, frame for frame
comparable with the ground truth. This is the function evaluation calls.

The reported ``fps`` counts only the method's ``render`` calls (deformation + rasterization), as the papers'
FPS columns do; ``fps_end_to_end`` includes encoding the mp4.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from talkinghead.errors import UserError

from .data import FrameStore, audio_windows, open_dataset
from .trainer import device_of, load_model, read_avatar_config


def pingpong(j: int, n: int) -> int:
    """Index into n frames played forward, then backward, then forward... (0 1 .. n-1 n-2 .. 1 0 1 ..)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    j %= period
    return j if j < n else period - j


def _check_out(out: Path) -> None:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name like out.mp4")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def _data_path(meta: dict, data: Path | None) -> Path:
    path = Path(data) if data is not None else Path(meta["data"])
    open_dataset(path)  # a one-line error when the training data moved
    return path


def _run(model, conds, out: Path, fps: float, audio: np.ndarray, desc: str) -> dict:
    render_s = [0.0]
    device = device_of(model)

    def frames():
        with torch.no_grad():
            for cond in conds:
                t = time.perf_counter()
                img = model.render(cond.to(device))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                render_s[0] += time.perf_counter() - t
                yield (img.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy()

    from tqdm import tqdm

    from talkinghead.media import write_video

    t0 = time.perf_counter()
    count = write_video(out, tqdm(frames(), total=len(conds), desc=desc, unit="frame"), fps, audio=audio)
    wall = time.perf_counter() - t0
    return {"frames": count, "fps": count / max(render_s[0], 1e-9), "fps_end_to_end": count / max(wall, 1e-9),
            "render_s": round(render_s[0], 3), "wall_s": round(wall, 3), "out": str(out)}


class _Conds:
    """A lazy sequence of Conditions (len + iteration) so frames are built as they are rendered."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.make(j) for j in range(self.n))


def check_view(yaw: float, pitch: float) -> None:
    """A novel view beyond +-90 degrees would look at the back or the top of a head no video showed."""
    for name, deg in (("yaw", yaw), ("pitch", pitch)):
        if not np.isfinite(deg) or abs(deg) > 90:
            raise UserError(f"--{name} {deg:g} is outside [-90, 90] degrees")


def novel_view(make, data: Path, yaw: float, pitch: float):
    """``make`` (j -> Condition) with each camera orbited by (yaw, pitch) degrees about the head's pivot
    (:func:`talkinghead.camera.orbit`); the tracked pose stays in ``Condition.tracked_viewmat``."""
    if yaw == 0 and pitch == 0:
        return make
    from talkinghead import camera

    pivot = camera.head_pivot(open_dataset(data).face_model.neutral)

    def moved(j: int):
        cond = make(j)
        vm = torch.from_numpy(camera.orbit(cond.viewmat.numpy(), yaw, pitch, pivot))
        return dataclasses.replace(cond, viewmat=vm, tracked_viewmat=cond.viewmat)

    return moved


def render_split(avatar: Path, data: Path | None, split: str, out_mp4: Path, yaw: float = 0.0,
                 pitch: float = 0.0) -> dict:
    """Self-driven render of ``split`` (its audio, poses, backdrops) to ``out_mp4``; returns fps, frames, ...
    ``yaw``/``pitch`` (degrees): the camera orbited about the head (a novel view, the torso plate stays)."""
    check_view(yaw, pitch)
    _check_out(out_mp4)
    spec, cfg, info, model, meta = load_model(avatar)
    data = _data_path(meta, data)
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split=split,
                       with_targets=False, progress=False)
    if store.windows.shape[-1] != info.audio_dim:
        raise UserError(f"{data} has {store.windows.shape[-1]} audio feature dims but the avatar was trained on "
                        f"{info.audio_dim}: it is not the avatar's dataset (pass the right --data)")
    audio = open_dataset(data).split_audio(split)
    make = novel_view(store.condition, data, yaw, pitch)
    res = _run(model, _Conds(len(store), make), Path(out_mp4), store.fps, audio, f"render {split}")
    res.update(split=split, first_frame=int(store.indices[0]), method=meta["method"], yaw=yaw, pitch=pitch)
    return res


def driving_features(wave: np.ndarray, fps: float, wav2vec_model: str | Path | None = None) -> np.ndarray:
    """Per-frame features [T, D] of a 16 kHz wave [S] for T = ceil(duration * fps) frames: prepare's extractor,
    with the same local wav2vec model when the training dataset was prepared with one (:func:`dataset_wav2vec`)."""
    from talkinghead.audio.features import compute_audio_features

    num_frames = max(1, int(np.ceil(len(wave) / 16000 * fps)))
    return np.asarray(compute_audio_features(wave, fps, num_frames, wav2vec_model=wav2vec_model).stack(), np.float32)


def dataset_wav2vec(data: Path) -> str | None:
    """The local wav2vec / HuBERT folder the dataset's audio features were computed with (``prepare --wav2vec``)."""
    return (open_dataset(data).meta.get("options") or {}).get("wav2vec_model")


def render_audio(avatar: Path, audio: Path, out_mp4: Path, pose: str = "train", data: Path | None = None,
                 yaw: float = 0.0, pitch: float = 0.0) -> dict:
    """Drive the avatar with ``audio``: poses/backdrops from the training sequence (ping-pong or static),
    seen from a camera orbited by ``yaw``/``pitch`` degrees about the head."""
    from talkinghead.audio.features import load_driving_audio

    check_view(yaw, pitch)
    _check_out(out_mp4)
    fps = float(read_avatar_config(avatar)["info"]["fps"])
    wave = load_driving_audio(audio)  # unreadable or silent audio fails here, before any heavy work
    spec, cfg, info, model, meta = load_model(avatar)
    data = _data_path(meta, data)
    feats = driving_features(wave, fps, dataset_wav2vec(data))
    if feats.shape[1] != info.audio_dim:
        raise UserError(f"driving features have {feats.shape[1]} dims but the avatar was trained on {info.audio_dim}")
    windows = audio_windows(feats, cfg.data.audio_radius)
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="train",
                       with_targets=False, progress=True)
    n = len(store)

    def make(j: int):
        k = 0 if pose == "static" else pingpong(j, n)
        return store.condition(k, audio=windows[j])

    res = _run(model, _Conds(len(windows), novel_view(make, data, yaw, pitch)), Path(out_mp4), info.fps, wave,
               "render")
    res.update(pose=pose, method=meta["method"], yaw=yaw, pitch=pitch)
    return res
