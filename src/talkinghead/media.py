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

import itertools
import os
import queue
import threading
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


def _on_clock(frames: Iterator[tuple[float, object]], fps: float, index: int,
              end: float | None) -> Iterator[tuple[int, object]]:
    """(output index, source frame) on the constant ``fps`` clock, from (time since the stream's first frame,
    frame) pairs in presentation order. ``index`` is the first output index to emit: 0 from the stream's
    start; after a seek, any index whose time is at or after the first pair's. ``end``: stream duration.

    Frame ``i`` is the last source frame whose time is <= ``i / fps`` (1 us of tolerance); the last source
    frame stays on screen for one source frame duration."""
    held = None
    for t, frame in frames:
        # Emit every output tick that falls before this frame's time, showing the previous frame.
        while held is not None and index / fps < t - 1e-6:
            yield index, held
            index += 1
        held = frame
    if held is None:
        return
    while index == 0 or (end is not None and index / fps < end - 0.5 / fps):
        yield index, held
        index += 1
        if end is None:
            break


def _stream_end(stream) -> float | None:
    return float(stream.duration * stream.time_base) if stream.duration else None


def _timed(container, stream, start: float) -> Iterator[tuple[float, object]]:
    """(time since ``start`` in seconds, PyAV frame) of every decoded frame that has a timestamp."""
    for frame in container.decode(stream):
        if frame.pts is not None:
            yield float(frame.pts * frame.time_base) - start, frame


def iter_frames(path: str | os.PathLike, fps: float) -> Iterator[np.ndarray]:
    """Frames of ``path`` resampled to a constant ``fps``: uint8 RGB [H, W, 3] each.

    Frame ``i`` is the last source frame whose presentation time is <= ``i / fps`` (:func:`_on_clock`), so
    variable-frame-rate input comes out evenly spaced and in sync with audio.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise UserError(f"{path}: no video stream (is this a video file?)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = [0]

        def timed():
            start = None
            try:
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    t = float(frame.pts * frame.time_base)
                    start = t if start is None else start
                    decoded[0] += 1
                    yield t - start, frame.to_ndarray(format="rgb24")
            except Exception as exc:
                if decoded[0] == 0:
                    raise UserError(f"cannot decode video frames of {path} ({type(exc).__name__})") from None
                # A truncated tail: keep what decoded.

        count = 0
        for _, image in _on_clock(timed(), fps, 0, _stream_end(stream)):
            count += 1
            yield image
        if count == 0:
            raise UserError(f"{path}: the video stream has no frames")


class FrameReader:
    """Frames of a video on :func:`iter_frames`' constant-``fps`` clock, in any order, decoded on demand.

    ``frames(indices)`` yields frame ``indices[k]`` for each k -- exactly what ``iter_frames`` yields at that
    position -- holding at most ``max_bytes`` of decoded frames whatever the order (never the whole video): a
    non-decreasing run of indices streams from one seek; a decreasing run (a pose loop playing backwards) is
    decoded forward in chunks of at most ``max_bytes`` and played out of each chunk backwards.
    """

    def __init__(self, path: str | os.PathLike, fps: float, max_bytes: int = 256 << 20):
        info = probe(path)
        self.path, self.fps = Path(path), float(fps)
        self.width, self.height = info.width, info.height
        self.chunk = max(1, int(max_bytes) // max(1, info.width * info.height * 3))  # frames per backward chunk
        with _open(path) as container:
            stream = container.streams.video[0]
            self._end = _stream_end(stream)
            first = next(_timed(container, stream, 0.0), None)
        if first is None:
            raise UserError(f"{path}: the video stream has no frames")
        self._start = first[0]  # the clock's zero: the first decoded frame's time, as iter_frames

    def _from(self, first: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) for index = ``first``, ``first`` + 1, ... to the end of the video."""
        target = first / self.fps
        # Seek to the keyframe before the target; a container that lands after it gets a longer run-up.
        for back in ((0.0, 2.0, 30.0) if first > 0 else ()) + (None,):
            with _open(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                if back is not None:
                    when = max(0.0, target - back) + self._start
                    container.seek(int(when / stream.time_base), stream=stream, backward=True)
                pairs = _timed(container, stream, self._start)
                head = next(pairs, None)
                if back is not None and (head is None or head[0] > target + 1e-6):
                    continue
                if head is None:
                    return
                # Frames before the target only move the clock: only what is emitted is converted to RGB.
                clock = _on_clock(itertools.chain([head], pairs), self.fps, 0 if back is None else first, self._end)
                for i, frame in clock:
                    if i >= first:
                        yield i, frame.to_ndarray(format="rgb24")
                return

    def _forward(self, indices: list[int]) -> Iterator[np.ndarray]:
        """Frames of non-decreasing ``indices`` (repeats and gaps allowed) from one seek."""
        source = self._from(indices[0])
        current: tuple[int, np.ndarray] | None = None
        for i in indices:
            while current is None or current[0] < i:
                current = next(source, None)
                if current is None:
                    raise UserError(f"{self.path} has no frame {i} at {self.fps:g} fps (shorter than expected)")
            yield current[1]

    def frames(self, indices) -> Iterator[np.ndarray]:
        """uint8 RGB [H, W, 3] of frame ``indices[k]``, for k = 0, 1, ..."""
        idx = [int(i) for i in indices]
        if any(i < 0 for i in idx):
            raise ValueError("frame indices must be >= 0")
        k = 0
        while k < len(idx):
            e = k + 1
            if e < len(idx) and idx[e] < idx[k]:  # a decreasing run
                while e < len(idx) and idx[e] < idx[e - 1]:
                    e += 1
                while k < e:  # chunks spanning at most self.chunk source frames, each decoded forward
                    c = k + 1
                    while c < e and idx[k] - idx[c] < self.chunk:
                        c += 1
                    wanted = idx[k:c]
                    decoded = dict(zip(wanted[::-1], self._forward(wanted[::-1])))
                    for i in wanted:
                        yield decoded.pop(i)
                    k = c
            else:
                while e < len(idx) and idx[e] >= idx[e - 1]:
                    e += 1
                yield from self._forward(idx[k:e])
                k = e


def prefetch(it: Iterator, depth: int = 16) -> Iterator:
    """Run iterator ``it`` in a background thread (PyAV and Pillow decode without the GIL) while the caller
    computes.

    A consumer that stops early (``break``, an exception) stops the thread too, and the items it holds go.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()
    error: list[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for item in it:
                if not put(item):
                    break
        except BaseException as exc:  # re-raised in the consumer
            error.append(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            put(done)

    threading.Thread(target=worker, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            yield item
    finally:
        stop.set()
    if error:
        raise error[0]


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
