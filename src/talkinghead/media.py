"""Reading and writing video and audio: the one place that talks to ffmpeg (through PyAV).

Videos are decoded to a *constant* frame rate whatever the container holds (variable frame rate,
29.97 fps, ...): output frame ``i`` shows the source frame on screen at time ``i / fps``. Audio is
decoded to mono float32 at a fixed sample rate. Failures surface as :class:`UserError` lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from talkinghead.errors import UserError
from talkinghead.fileio import publish, temp_file

AUDIO_RATE = 16000  # Hz: every audio feature of the project is computed at this rate.


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    duration_s: float  # of the video stream
    avg_fps: float  # container's average rate (informative only; decoding resamples)
    has_audio: bool
    # Start of the first audio stream minus start of the video stream (s): frame 0 of ``iter_frames`` is
    # the video's start, sample 0 of ``read_audio`` the audio's, so audio sample s belongs at time
    # s / rate + audio_delay_s on the frame clock.
    audio_delay_s: float = 0.0


def _open(path: str | os.PathLike):
    import av

    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if path.is_dir():
        raise UserError(f"expected a file, got a folder: {path}")
    try:
        return av.open(str(path))
    except Exception as exc:  # PyAV raises many types (InvalidDataError, OSError...)
        raise UserError(f"cannot read {path}: not a media file ffmpeg understands ({type(exc).__name__})") from None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, duration and streams of a video file."""
    with _open(path) as container:
        if not container.streams.video:
            raise UserError(f"{path}: no video stream (is this a video file?)")
        vs = container.streams.video[0]
        if vs.duration is not None and vs.time_base is not None:
            duration = float(vs.duration * vs.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        fps = float(vs.average_rate) if vs.average_rate else 0.0
        delay = 0.0
        if container.streams.audio:
            a = container.streams.audio[0]
            if a.start_time is not None and vs.start_time is not None:
                delay = float(a.start_time * a.time_base) - float(vs.start_time * vs.time_base)
        return VideoInfo(Path(path), vs.codec_context.width, vs.codec_context.height, duration, fps,
                         bool(container.streams.audio), delay)


def iter_frames(path: str | os.PathLike, fps: float) -> Iterator[np.ndarray]:
    """Frames of ``path`` resampled to a constant ``fps``: uint8 RGB [H, W, 3] each.

    Frame ``i`` is the last source frame whose presentation time is <= ``i / fps`` (half a source
    frame of tolerance), so variable-frame-rate input comes out evenly spaced and in sync with audio.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise UserError(f"{path}: no video stream (is this a video file?)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = None
        held: np.ndarray | None = None
        index = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base)
                if start is None:
                    start = t
                t -= start
                image = frame.to_ndarray(format="rgb24")
                # Emit every output tick that falls before this frame's time, showing the previous frame.
                while held is not None and index / fps < t - 1e-6:
                    yield held
                    index += 1
                held = image
        except Exception as exc:
            if index == 0 and held is None:
                raise UserError(f"cannot decode video frames of {path} ({type(exc).__name__})") from None
            # A truncated tail: keep what decoded.
        if held is None:
            raise UserError(f"{path}: the video stream has no frames")
        # The last source frame stays on screen for one source frame duration.
        end = (float(stream.duration * stream.time_base) if stream.duration else None)
        while index == 0 or (end is not None and index / fps < end - 0.5 / fps):
            yield held
            index += 1
            if end is None:
                break


def read_frames(path: str | os.PathLike, fps: float) -> np.ndarray:
    """All frames at constant ``fps``: uint8 [T, H, W, 3]."""
    return np.stack(list(iter_frames(path, fps)))


def read_audio(path: str | os.PathLike, rate: int = AUDIO_RATE) -> np.ndarray:
    """The first audio stream of any media file, mono float32 [S] in [-1, 1] at ``rate`` Hz."""
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise UserError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except Exception as exc:
            if not chunks:
                raise UserError(f"cannot decode audio of {path} ({type(exc).__name__})") from None
    if not chunks:
        raise UserError(f"{path}: the audio stream is empty")
    return np.concatenate(chunks).astype(np.float32)


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float,
                audio: np.ndarray | None = None, audio_rate: int = AUDIO_RATE, crf: int = 18) -> int:
    """Encode uint8 RGB frames [H, W, 3] as H.264 mp4, with mono float audio muxed as AAC.

    Writes to a temporary file beside ``path`` and renames it at the end, so an interrupted run
    never leaves a playable-looking partial file. Returns the number of frames written.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path, ".mp4")
    count = 0
    try:
        with av.open(str(tmp), mode="w") as out:
            rate = Fraction(fps).limit_denominator(1001)
            vs = out.add_stream("libx264", rate=rate)
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(crf), "preset": "veryfast"}
            as_ = None
            if audio is not None:
                as_ = out.add_stream("aac", rate=audio_rate)
                as_.layout = "mono"
            for image in frames:
                if count == 0:
                    # yuv420p needs even sizes.
                    vs.width, vs.height = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2
                image = np.ascontiguousarray(image[: vs.height, : vs.width])
                for packet in vs.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
                count += 1
            for packet in vs.encode():
                out.mux(packet)
            if as_ is not None:
                samples = np.clip(audio, -1, 1).astype(np.float32)[: int(round(count / fps * audio_rate))]
                step = 1024
                for i in range(0, len(samples), step):
                    frame = av.AudioFrame.from_ndarray(samples[None, i:i + step], format="flt", layout="mono")
                    frame.sample_rate = audio_rate
                    # Explicit timestamps let the muxer write an edit list that hides the AAC encoder's
                    # priming samples; without them the audio plays 1024 samples (64 ms at 16 kHz) late.
                    frame.pts, frame.time_base = i, Fraction(1, audio_rate)
                    for packet in as_.encode(frame):
                        out.mux(packet)
                for packet in as_.encode():
                    out.mux(packet)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
