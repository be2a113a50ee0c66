"""Reading and writing video and audio: the one place that talks to ffmpeg (through PyAV).

Videos are decoded to a *constant* frame rate whatever the container holds (variable frame rate,
29.97 fps, ...): output frame ``i`` shows the source frame on screen at time ``i / fps``. Audio is
decoded to mono float32 at a fixed sample rate.

The one audio clock: :func:`read_audio` returns a file's sound with sample 0 at the instant of its first
video frame (frame 0 of :func:`iter_frames`), so sample ``s`` belongs at ``s / rate`` on the frame clock. The
placement uses the *decoded* presentation timestamps of the first audio and the first video frame, i.e.
after the demuxer applied the streams' start times and edit lists and the decoder dropped the AAC priming
samples the container marks for skipping; audio that starts late is preceded by silence, audio that starts
early loses the samples before the first frame. A file without video keeps its audio's own start.
prepare, render and eval all read audio through it. Failures surface as :class:`UserError` lines.
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
        return VideoInfo(Path(path), vs.codec_context.width, vs.codec_context.height, duration, fps,
                         bool(container.streams.audio))


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


def _first_video_time(container) -> float | None:
    """Presentation time (s) of the first decoded video frame, the instant of frame 0 (None: no video)."""
    if not container.streams.video:
        return None
    try:
        for frame in container.decode(container.streams.video[0]):
            if frame.pts is not None:
                return float(frame.pts * frame.time_base)
    except Exception:  # an undecodable video: iter_frames reports it; the audio keeps its own start
        return None
    return None


def read_audio(path: str | os.PathLike, rate: int = AUDIO_RATE) -> np.ndarray:
    """The first audio stream of any media file, mono float32 [S] in [-1, 1] at ``rate`` Hz, on the file's
    video clock: sample 0 at its first video frame (the module docstring; a file without video: the audio's
    own start)."""
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise UserError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        first_audio = None
        try:
            for frame in container.decode(container.streams.audio[0]):
                if first_audio is None and frame.pts is not None:
                    first_audio = float(frame.pts * frame.time_base)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except Exception as exc:
            if not chunks:
                raise UserError(f"cannot decode audio of {path} ({type(exc).__name__})") from None
    if not chunks:
        raise UserError(f"{path}: the audio stream is empty")
    wave = np.concatenate(chunks).astype(np.float32)
    with _open(path) as container:
        first_video = _first_video_time(container)
    if first_video is None or first_audio is None:
        return wave
    return shift_audio(wave, first_audio - first_video, rate)


def shift_audio(wave: np.ndarray, delay_s: float, rate: int = AUDIO_RATE) -> np.ndarray:
    """``wave`` [S] moved ``delay_s`` later (> 0: silence first) or earlier (< 0: the first samples dropped)."""
    shift = int(round(delay_s * rate))
    if shift > 0:
        return np.concatenate([np.zeros(shift, wave.dtype), wave])
    return wave[-shift:]


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
