"""``talkinghead render``: an avatar + audio (or a dataset split) -> mp4 with the audio muxed in.

Driving (:func:`render_audio`): features of the new audio come from the same extractor prepare used
(:func:`talkinghead.audio.features.compute_audio_features`, with the dataset's Whisper encoder and layers,
checked by the sha256 of its weights: :func:`driving_features`); head pose, background and torso replay the
training sequence, back and forth when the audio is longer (a ping-pong loop never jumps), or hold its first
frame with ``pose="static"``.

Self-driven (:func:`render_split`): the split's own audio features, poses and backdrops, frame for frame
comparable with the ground truth. This is the function evaluation calls (with the square crop output).

What comes out (:class:`Output`, decided once by :func:`resolve_output` for every method): every method
renders the crop at ``size`` x ``size`` -- any size, whatever it trained at: the Conditions carry the size
(backdrop read at N, ``K`` in pixels of N; see :class:`talkinghead.methods.base.Condition`) and a method
returns an image of the Condition's size (Gaussian methods rasterize at it, and above the training size
:func:`render_condition` widens the rasterizer's screen-space low-pass so the Gaussians keep their trained
footprint; a method with a fixed-size core upsamples with its own super-resolution). Then either

* **full frame** (the default when the source video is at hand: ``meta.json`` ``source.path``, same sha256,
  or ``--source VIDEO``): each render is pasted into the source frame its pose and backdrop came from --
  the pose loop's frame for new audio, the split's own frame for a split -- at the source's resolution on
  the dataset's frame clock, with a feathered band inside the crop border
  (:class:`talkinghead.render.composite.PasteBack`); outside the crop box the frames are the source's.
  The source is decoded as it is needed (:class:`talkinghead.media.FrameReader`: bounded memory, the loop's
  backward runs included), never preloaded; or
* **the square crop** (``--crop``, or no source video): the renders as they are.

The reported ``fps`` counts only the method's ``render`` calls (deformation + rasterization), as the papers'
FPS columns do (``render_cpu_s``: the CPU seconds of those calls on this thread, a figure that shared cores
distort less); ``paste_ms`` the paste-back per frame; ``fps_end_to_end`` includes decoding the backdrops
and the source, pasting and encoding the mp4.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from talkinghead.errors import UserError
from talkinghead.render.composite import PasteBack, to_uint8

from .base import Condition
from .data import Conditions, audio_windows, open_dataset
from .trainer import device_of, load_model, read_avatar_config

MAX_SIZE = 4096  # --size limit: a 4096^2 backdrop is 200 MB of float32 per frame
MIN_SIZE = 16


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


@dataclass(frozen=True)
class Output:
    """What the renderer writes: renders of the crop at ``size`` x ``size``, pasted into the frames of the
    ``source`` video (full frame, ``paste`` given) or as they are (the square crop)."""

    size: int
    paste: PasteBack | None = None
    source: Path | None = None
    note: str = ""  # why the output is what it is, when it is not what was asked for or the default

    @property
    def full_frame(self) -> bool:
        return self.paste is not None

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames before encoding."""
        return (self.paste.width, self.paste.height) if self.paste is not None else (self.size, self.size)


def check_size(size: int | None) -> None:
    if size is not None and not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")


def _source_video(meta: dict, source: Path | None) -> tuple[Path | None, str]:
    """The dataset's source video if it is at hand (``source`` overrides the recorded path; the file must be
    the one prepared: same sha256), else None and why not."""
    from talkinghead.fileio import sha256

    rec = meta.get("source") or {}
    if "crop" not in meta or not rec.get("path"):
        return None, "the dataset records no source video and crop"
    path = Path(source) if source is not None else Path(rec["path"])
    if not path.is_file():
        return None, f"the source video {path} is gone" + ("" if source is not None else " (give --source VIDEO)")
    if rec.get("sha256") and sha256(path) != rec["sha256"]:
        return None, f"{path} is not the video this dataset was prepared from (its sha256 differs)"
    return path, ""


def resolve_output(data: Path, size: int | None = None, full_frame: bool | None = None,
                   source: Path | None = None) -> Output:
    """The output for a render of dataset ``data``: ``full_frame`` True / False / None (full frame when the
    source video is at hand, else the crop). ``size`` None: the dataset's size for the crop; for the full
    frame the crop's side in source pixels, at most the dataset's size (rendering more only to shrink it is
    wasted)."""
    from talkinghead.media import probe

    check_size(size)
    meta = open_dataset(data).meta
    dataset_size = int(meta["size"][0])
    if full_frame is False:
        if source is not None:
            raise UserError("--source is the video to paste into; it makes no sense with --crop")
        return Output(size=int(size or dataset_size))
    path, why = _source_video(meta, source)
    if path is None:
        if full_frame:
            raise UserError(f"--full-frame needs the source video: {why}")
        return Output(size=int(size or dataset_size), note=f"square crop: {why}")
    info = probe(path)
    try:
        paste = PasteBack.from_meta(meta["crop"], info.width, info.height)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    n = int(size) if size else min(dataset_size, paste.side)
    return Output(size=n, paste=paste, source=path)


class _Frames:
    """The frames to render: ``indices`` [T] the dataset frame each output frame takes its pose, backdrop and
    (full frame) source frame from; ``make(j)`` the Condition of output frame j. A camera change at render
    time is a map over ``make``."""

    def __init__(self, indices: np.ndarray, make: Callable[[int], Condition]):
        self.indices, self.make = np.asarray(indices, np.int64), make

    def __len__(self) -> int:
        return len(self.indices)


def render_condition(model, cond: Condition, train_size: int) -> torch.Tensor:
    """``model.render(cond)`` at the Condition's size for a model trained at ``train_size``: above it, the Gaussian
    rasterizer's screen-space low-pass (``cond.eps2d``) grows with the square of the scale so every Gaussian keeps
    its trained footprint (:func:`talkinghead.render.rasterize.low_pass`; methods that rasterize nothing ignore
    it)."""
    from talkinghead.render import low_pass

    return model.render(dataclasses.replace(cond, eps2d=low_pass(cond.width / max(1, int(train_size)))))


def _run(model, frames: _Frames, out: Path, fps: float, audio: np.ndarray, desc: str, output: Output,
         train_size: int) -> dict:
    """Render ``frames`` through ``output`` into ``out``: the one output path of every method."""
    from tqdm import tqdm

    from talkinghead.media import FrameReader, prefetch, write_video

    timing = {"render": 0.0, "render_cpu": 0.0, "paste": 0.0}
    device = device_of(model)
    # Backdrops (JPEG) and source frames (video) are decoded in background threads while the model renders.
    conds = prefetch((frames.make(j) for j in range(len(frames))), depth=4)
    sources = None
    if output.paste is not None:
        sources = prefetch(FrameReader(output.source, fps).frames(frames.indices), depth=4)

    def images():
        with torch.no_grad():
            for cond in conds:
                t, c = time.perf_counter(), time.thread_time()
                img = render_condition(model, cond.to(device), train_size)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timing["render"] += time.perf_counter() - t
                timing["render_cpu"] += time.thread_time() - c
                if tuple(img.shape) != (cond.height, cond.width, 3):
                    raise RuntimeError(f"the method rendered {tuple(img.shape)} for a {cond.width}x{cond.height} "
                                       "Condition (Method.render must return the Condition's size)")
                if sources is None:
                    yield to_uint8(img)
                    continue
                frame = next(sources)
                t = time.perf_counter()
                pasted = output.paste(frame, img)
                timing["paste"] += time.perf_counter() - t
                yield pasted

    t0 = time.perf_counter()
    count = write_video(out, tqdm(images(), total=len(frames), desc=desc, unit="frame"), fps, audio=audio)
    wall = time.perf_counter() - t0
    w, h = output.frame_size
    res = {"frames": count, "fps": count / max(timing["render"], 1e-9), "fps_end_to_end": count / max(wall, 1e-9),
           "render_s": round(timing["render"], 3), "render_cpu_s": round(timing["render_cpu"], 3),
           "wall_s": round(wall, 3), "out": str(out),
           "render_size": [output.size, output.size], "full_frame": output.full_frame,
           "frame_size": [w, h], "video_size": [w // 2 * 2, h // 2 * 2]}
    if output.full_frame:
        res.update(source=str(output.source), paste_ms=round(1000 * timing["paste"] / max(count, 1), 3),
                   crop={"x0": output.paste.x0, "y0": output.paste.y0, "side": output.paste.side})
    if output.note:
        res["note"] = output.note
    return res


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


def render_split(avatar: Path, data: Path | None, split: str, out_mp4: Path, size: int | None = None,
                 full_frame: bool | None = None, source: Path | None = None, yaw: float = 0.0,
                 pitch: float = 0.0) -> dict:
    """Self-driven render of ``split`` (its audio, poses, backdrops) to ``out_mp4``; returns fps, frames, ...
    ``size``, ``full_frame``, ``source``: see :func:`resolve_output`; ``yaw``/``pitch`` (degrees): the camera
    orbited about the head (a novel view, the torso plate stays)."""
    check_view(yaw, pitch)
    _check_out(out_mp4)
    data = _data_path(read_avatar_config(avatar), data)
    output = resolve_output(data, size, full_frame, source)  # a missing source video fails before heavy work
    spec, cfg, info, model, meta = load_model(avatar)
    conds = Conditions(data, output.size, cfg.data.audio_radius, source_frames=cfg.data.source_frames)
    if conds.windows.shape[-1] != info.audio_dim:
        raise UserError(f"{data} has {conds.windows.shape[-1]} audio feature dims but the avatar was trained on "
                        f"{info.audio_dim}: it is not the avatar's dataset (pass the right --data)")
    indices = conds.ds.split_indices(split)
    if indices.size == 0:
        raise UserError(f"the dataset's {split!r} split is empty")
    audio = conds.ds.split_audio(split)
    make = novel_view(lambda j: conds(indices[j]), data, yaw, pitch)
    res = _run(model, _Frames(indices, make), Path(out_mp4), conds.ds.fps, audio, f"render {split}", output,
               info.size)
    res.update(split=split, first_frame=int(indices[0]), method=meta["method"], yaw=yaw, pitch=pitch)
    return res


def driving_features(wave: np.ndarray, fps: float, data: Path | None = None,
                     audio_encoder: str | None = None) -> np.ndarray:
    """Per-frame features [T, D] of a 16 kHz wave [S] for T = ceil(duration * fps) frames, computed as the
    dataset ``data``'s were (prepare's extractor with its wav2vec model and its Whisper encoder and layers;
    ``data`` None: the plain phone + log-mel + energy features). ``audio_encoder`` is render's
    ``--audio-encoder``: another path to the *same* Whisper weights (a different encoder is a UserError)."""
    from talkinghead.audio.features import compute_audio_features

    wav2vec, whisper = dataset_audio(data, audio_encoder) if data is not None else (None, None)
    num_frames = max(1, int(np.ceil(len(wave) / 16000 * fps)))
    return np.asarray(compute_audio_features(wave, fps, num_frames, wav2vec_model=wav2vec, whisper=whisper).stack(),
                      np.float32)


def dataset_audio(data: Path, audio_encoder: str | None = None):
    """How the dataset's audio features were computed: (its local wav2vec / HuBERT folder or None, its
    :class:`~talkinghead.audio.whisper.WhisperChoice` or None). With ``audio_encoder`` (a checkpoint path or
    ``none``), checks that it is the encoder the dataset recorded (sha256 of the weights): one UserError if not."""
    from talkinghead.audio.whisper import WhisperChoice, checkpoint_identity, parse_audio_encoder

    meta = open_dataset(data).meta
    wav2vec = (meta.get("options") or {}).get("wav2vec_model")
    recorded = (meta.get("audio_features") or {}).get("encoder")
    asked = parse_audio_encoder(audio_encoder) if audio_encoder is not None else None
    if recorded is None:
        if asked is not None:
            raise UserError(f"audio encoder mismatch: the avatar's dataset {data} has no Whisper features (prepared "
                            f"with --audio-encoder none); drive it without --audio-encoder")
        return wav2vec, None
    if audio_encoder is not None and asked is None:
        raise UserError(f"audio encoder mismatch: the avatar learned from {recorded['name']} features; "
                        f"--audio-encoder none cannot drive it")
    checkpoint = asked.checkpoint if asked is not None else recorded.get("checkpoint")
    try:
        name, sha, _, _ = checkpoint_identity(checkpoint)
    except UserError as exc:
        raise UserError(f"{exc} (the avatar's dataset was prepared with {recorded['name']}; give its checkpoint "
                        f"with --audio-encoder PATH)") from None
    if sha != recorded["sha256"]:
        raise UserError(f"audio encoder mismatch: the avatar learned from {recorded['name']} (sha256 "
                        f"{recorded['sha256'][:12]}), the driving audio would be encoded with {name} (sha256 "
                        f"{sha[:12]}); give --audio-encoder the checkpoint its dataset was prepared with")
    return wav2vec, WhisperChoice(checkpoint=checkpoint, layers=tuple(recorded["layers"]))


def render_audio(avatar: Path, audio: Path, out_mp4: Path, pose: str = "train", data: Path | None = None,
                 size: int | None = None, full_frame: bool | None = None, source: Path | None = None,
                 yaw: float = 0.0, pitch: float = 0.0, audio_encoder: str | None = None) -> dict:
    """Drive the avatar with ``audio``: poses/backdrops (and, full frame, the source frames) from the training
    sequence (ping-pong or static), seen from a camera orbited by ``yaw``/``pitch`` degrees about the head.
    ``size``, ``full_frame``, ``source``: see :func:`resolve_output`; ``audio_encoder``: where the dataset's
    Whisper checkpoint is now, when it moved (see :func:`dataset_audio`)."""
    from talkinghead.audio.features import load_driving_audio

    check_view(yaw, pitch)
    _check_out(out_mp4)
    config = read_avatar_config(avatar)
    fps = float(config["info"]["fps"])
    wave = load_driving_audio(audio)  # unreadable or silent audio fails here, before any heavy work
    data = _data_path(config, data)
    output = resolve_output(data, size, full_frame, source)
    feats = driving_features(wave, fps, data, audio_encoder)  # so does another audio encoder than the dataset's
    spec, cfg, info, model, meta = load_model(avatar)
    if feats.shape[1] != info.audio_dim:
        raise UserError(f"driving features have {feats.shape[1]} dims but the avatar was trained on {info.audio_dim}")
    windows = audio_windows(feats, cfg.data.audio_radius)
    conds = Conditions(data, output.size, cfg.data.audio_radius, source_frames=cfg.data.source_frames)
    train = conds.ds.split_indices("train")
    if train.size == 0:
        raise UserError("the dataset's 'train' split is empty")
    loop = [0 if pose == "static" else pingpong(j, len(train)) for j in range(len(windows))]
    indices = train[loop]
    make = novel_view(lambda j: conds(indices[j], audio=windows[j]), data, yaw, pitch)
    res = _run(model, _Frames(indices, make), Path(out_mp4), info.fps, wave, "render", output, info.size)
    res.update(pose=pose, method=meta["method"], yaw=yaw, pitch=pitch)
    return res
