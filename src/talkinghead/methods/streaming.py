"""Streaming inference: audio arrives in chunks, frames are rendered as soon as the audio they show is in.

One interface, the same for every method; the live server (:mod:`talkinghead.serve`) uses nothing else:

* **live features** (:meth:`DrivenAvatar.live_features`): driving features computed incrementally from
  20-40 ms chunks of a live stream (the microphone); ``push(samples)`` returns the rows that became final,
  ``flush()`` the rest, ``delay_frames`` says how many frames after a frame's instant its row is out at most.
  For a dataset with Whisper features (the default): :class:`talkinghead.audio.whisper_stream.
  LiveWhisperFeatures`, each encoder row computed once with a look-ahead of ``WHISPER_LIVE`` (the encoder
  loaded once per process, :func:`~talkinghead.audio.whisper.shared_whisper`; the server runs each mic's
  stream in a process forked from the one that loaded it). Otherwise :class:`FeatureStream`, extractor-agnostic: every ``hop``
  frames it re-runs the dataset's own extractor (:func:`~talkinghead.audio.features.compute_audio_features`)
  over a short window (``context`` frames already emitted + the new frames + ``lookahead`` frames of audio
  after them) and emits the new rows; the per-utterance normalisation of ``AudioFeatures.stack()`` is
  applied to the rows emitted so far plus the new ones (causal: a row never sees statistics of audio after
  its look-ahead). Rows are final once emitted. For audio known in full (an upload, a TTS utterance)
  :func:`utterance_features` is the offline extractor itself: those features *equal* the offline ones
  (tested); :func:`utterance_parts` / :func:`utterance_rows` give the same rows part by part (Whisper's
  30 s windows, the encoder run only as deep as the avatar reads), so the server starts an utterance after
  its first window instead of after all of them; the live rows differ, measured in ``bench/bench_serve.py`` and bounded by the tests
  (``tests/test_streaming.py``, ``tests/test_whisper_stream.py``).
* :func:`open_frame_stream` -- a method's per-session render state: ``model.open_stream()`` when the method
  keeps state across frames (GaussianFlameTalk's causal FlameTalk history), otherwise a stateless wrapper
  of ``model.render`` (GaussianTalker). Each stream states its ``lookahead``: audio rows past the rendered
  frame the method reads (GaussianTalker: the window radius R; GaussianFlameTalk: FlameTalk's
  ``audio_lookahead``, 0 = causal). A later method plugs in by providing ``open_stream()`` or nothing.
* :class:`DrivenAvatar` -- an avatar loaded once and shared by sessions: its model, the training poses /
  backdrops / blinks the frames replay (ping-pong, as ``render``), the pause row that drives idle frames
  (:func:`pause_row`),
  and :meth:`DrivenAvatar.condition` building frame n's Condition from the rows known so far (rows past the
  known ones, which the method's look-ahead never reads, repeat the last known row).

Back-pressure is the caller's: a FeatureStream holds at most ``context + hop + lookahead`` frames of audio plus
the pending chunk (LiveWhisperFeatures: at most one 30 s window), and the server renders one frame at a time
into a bounded queue.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from talkinghead.audio.features import AudioFeatures
from talkinghead.media import AUDIO_RATE

from .base import Condition

CHUNK_MS = (20, 40)  # chunk lengths the live path is designed for (any length works)
# Live look-ahead and hop in frames. Whisper (bench/RESULTS.md, "talkinghead serve"): at 25 fps a row is out at
# most 7 frames (280 ms) after its instant, median relative error of hidden state 2 vs offline 0.105 (0.128 at
# look-ahead 3, 0.087 at 12); pocketsphinx windows: as measured last session.
WHISPER_LIVE = dict(lookahead=5, hop=2)
PHONE_LIVE = dict(lookahead=3, hop=5, context=20)


class FrameStream(Protocol):
    """Per-session render state of a method (see the module docstring)."""

    lookahead: int  # audio rows past the rendered frame that render() reads

    def render(self, cond: Condition) -> Tensor:
        """The frame [H, W, 3] in [0, 1] of ``cond``; successive calls are successive frames."""

    def reset(self) -> None:
        """Forget the past (a new utterance that does not continue the previous frames)."""


class _Stateless:
    """A method whose frames depend only on their Condition: the shared model serves every session."""

    def __init__(self, model, lookahead: int):
        self.model, self.lookahead = model, lookahead

    def render(self, cond: Condition) -> Tensor:
        return self.model.render(cond)

    def reset(self) -> None:
        pass


def open_frame_stream(model, radius: int) -> FrameStream:
    """``model.open_stream()`` when the method keeps per-stream state, else a wrapper of ``model.render``
    reading the whole audio window (look-ahead = ``radius`` rows)."""
    opener = getattr(model, "open_stream", None)
    return opener() if opener is not None else _Stateless(model, radius)


Extractor = Callable[[np.ndarray, float, int], AudioFeatures]  # (wave [S], fps, num_frames) -> raw features


def dataset_extractor(data: Path | None, keep_decoder: bool = False) -> Extractor:
    """The extractor the avatar's dataset recorded (prepare's, with its local wav2vec model and its Whisper
    encoder if any); ``keep_decoder`` for live windows (see :class:`talkinghead.audio.extractor.DatasetExtractor`)."""
    from talkinghead.audio.extractor import DatasetExtractor

    from .render import dataset_audio

    # the same (wav2vec folder, Whisper choice) render's driving features use, checked the same way
    wav2vec, whisper = dataset_audio(data) if data is not None else (None, None)
    return DatasetExtractor(wav2vec, keep_decoder, whisper)


def num_frames_of(samples: int, fps: float) -> int:
    """Frames an utterance of ``samples`` at 16 kHz covers: ceil(duration * fps), as ``render``."""
    return max(1, int(np.ceil(samples / AUDIO_RATE * fps)))


def utterance_features(wave: np.ndarray, fps: float, extract: Extractor) -> np.ndarray:
    """Rows [T, D] of an utterance known in full: exactly :func:`talkinghead.methods.render.driving_features`."""
    return np.asarray(extract(wave, fps, num_frames_of(len(wave), fps)).stack(), np.float32)


def utterance_parts(wave: np.ndarray, fps: float, extract: Extractor) -> list[tuple[int, int]]:
    """Frame ranges [a, b) of an utterance known in full whose rows :func:`utterance_rows` gives one at a time
    (``extract.parts``: Whisper's windows; one part for an extractor without it)."""
    n = num_frames_of(len(wave), fps)
    parts = getattr(extract, "parts", None)
    return parts(wave, fps, n) if parts is not None else [(0, n)]


def utterance_rows(wave: np.ndarray, fps: float, extract: Extractor, part: int) -> np.ndarray:
    """Rows [b - a, D] of part ``part`` of :func:`utterance_parts`: exactly ``utterance_features(...)[a:b]``
    (tested), sooner: only that part's Whisper window, only as deep as the rows read."""
    rows = getattr(extract, "rows", None)
    if rows is None:
        return utterance_features(wave, fps, extract)
    return rows(wave, fps, num_frames_of(len(wave), fps), part)


_PER_FRAME = ("mel", "energy", "phone_ids", "phone_posteriors", "wav2vec", "whisper")  # AudioFeatures' [T, ...]


def _concat(parts: list[AudioFeatures]) -> AudioFeatures:
    """Rows of several AudioFeatures of one stream, in order (per-frame arrays joined, the rest from the first)."""
    joined = {k: None if getattr(parts[0], k) is None else np.concatenate([getattr(p, k) for p in parts])
              for k in _PER_FRAME}
    return dataclasses.replace(parts[0], **joined)


def _rows(f: AudioFeatures, a: int, b: int) -> AudioFeatures:
    """Rows a..b-1 of ``f``."""
    return dataclasses.replace(f, **{k: None if getattr(f, k) is None else getattr(f, k)[a:b] for k in _PER_FRAME})


class FeatureStream:
    """Incremental driving features of a live 16 kHz stream by windows of an extractor (module docstring).

    ``push(samples)`` returns the rows [k, D] that became final (k >= 0); ``flush()`` the rest at the end of
    the stream (the audio after the last sample counts as silence, as offline). Row i describes the instant
    i / fps with sample 0 at row 0. ``history_s`` bounds the rows whose statistics normalise new rows.
    """

    def __init__(self, fps: float, extract: Extractor, lookahead: int = 3, hop: int = 5, context: int = 20,
                 history_s: float = 60.0):
        if lookahead < 0 or hop < 1 or context < 0:
            raise ValueError("need lookahead >= 0, hop >= 1, context >= 0")
        self.fps, self.extract = float(fps), extract
        self.lookahead, self.hop, self.context = lookahead, hop, context
        self.history = max(1, int(history_s * fps))
        self.wave = np.zeros(0, np.float32)  # samples from self.offset on
        self.offset = 0  # stream sample index of self.wave[0]
        self.total = 0  # samples pushed
        self.emitted = 0  # rows emitted
        self.raw: list[AudioFeatures] = []  # raw rows emitted (last `history`), for the normalisation
        self.raw_rows = 0
        self.compute_s = 0.0  # time spent in the extractor (for the stats)
        self.lock = threading.Lock()

    @property
    def delay_frames(self) -> int:
        """Frames past a frame's instant until its row is out, at most."""
        return self.lookahead + self.hop

    def _window_start(self, first: int) -> int:
        """First frame of the window that computes rows from ``first`` on."""
        return max(0, first - self.context)

    def _sample(self, frame: int) -> int:
        return int(round(frame * AUDIO_RATE / self.fps))

    def push(self, samples: np.ndarray) -> np.ndarray:
        with self.lock:
            x = np.asarray(samples, np.float32).reshape(-1)
            self.wave = np.concatenate([self.wave, x])
            self.total += len(x)
            covered = int(np.floor(self.total * self.fps / AUDIO_RATE + 1e-9))  # frames whose instant is in
            ready = covered - self.lookahead  # rows 0..ready-1 have their look-ahead of audio
            if ready - self.emitted < self.hop:
                return np.zeros((0, 0), np.float32)
            return self._emit(ready, ready + self.lookahead)

    def flush(self) -> np.ndarray:
        with self.lock:
            end = num_frames_of(self.total, self.fps)
            if end <= self.emitted:
                return np.zeros((0, 0), np.float32)
            return self._emit(end, end)

    def _emit(self, ready: int, last: int) -> np.ndarray:
        """Rows emitted..ready-1 from a window of frames a..last (a = emitted - context)."""
        import time

        a = self._window_start(self.emitted)
        s0, s1 = self._sample(a), self._sample(last)
        wave = self.wave[s0 - self.offset: s1 - self.offset]
        t = time.perf_counter()
        feats = self.extract(wave, self.fps, last - a)
        self.compute_s += time.perf_counter() - t
        new = _rows(feats, self.emitted - a, ready - a)
        self.raw.append(new)
        self.raw_rows += ready - self.emitted
        while self.raw_rows - self.raw[0].num_frames >= self.history:
            self.raw_rows -= self.raw.pop(0).num_frames
        rows = _concat(self.raw).stack()[-(ready - self.emitted):]
        self.emitted = ready
        keep = self._sample(self._window_start(ready))  # the next window starts here
        self.wave = self.wave[keep - self.offset:]
        self.offset = keep
        return rows.astype(np.float32)


PAUSE_SHARE = 0.05  # the idle row: the quietest 5 % of the training frames (at least 10)


def pause_row(data: Path) -> np.ndarray:
    """The idle row [D]: the median driving row of the training clip's pauses (its quietest ``PAUSE_SHARE`` of
    the training frames by energy, at least 10), i.e. what the avatar saw between words. Not the features of
    an utterance of digital silence: ``AudioFeatures.stack()`` normalises energy (and log-mel) against the
    utterance's own speech, which silence lacks, so its rows read as speech level (energy column 0 instead of
    -1.2 in the cnn clip's pauses) and both cnn avatars idled with the mouth half open."""
    from .data import open_dataset

    ds = open_dataset(data)
    idx = ds.split_indices("train")
    quiet = idx[np.argsort(ds.audio_features.energy[idx], kind="stable")[: max(10, int(PAUSE_SHARE * len(idx)))]]
    return np.median(ds.audio_matrix[quiet], axis=0).astype(np.float32)


def live_feature_stream(fps: float, whisper, wav2vec_model, extract: Extractor, **params):
    """LiveWhisperFeatures for a ``whisper`` (WhisperChoice) dataset without wav2vec columns, else a
    FeatureStream over ``extract``; ``params`` override the defaults WHISPER_LIVE / PHONE_LIVE."""
    if whisper is not None and wav2vec_model is None:
        from talkinghead.audio.whisper import shared_whisper
        from talkinghead.audio.whisper_stream import LiveWhisperFeatures

        encoder = shared_whisper(whisper.checkpoint)
        return LiveWhisperFeatures(encoder, whisper.check_layers(encoder.num_layers), fps, **{**WHISPER_LIVE, **params})
    return FeatureStream(fps, extract, **{**PHONE_LIVE, **params})


class DrivenAvatar:
    """An avatar loaded once for streaming (shared by sessions; see the module docstring)."""

    def __init__(self, avatar: Path, device: torch.device | None = None, progress: bool = False):
        from .data import FrameStore
        from .render import _data_path
        from .trainer import load_model

        self.path = Path(avatar)
        self.spec, self.cfg, self.info, self.model, self.meta = load_model(self.path, device=device)
        self.data = _data_path(self.meta, None)
        self.store = FrameStore(self.data, dataclasses.replace(self.cfg.data, mouth_crop=0), info=self.info,
                                split="train", with_targets=False, progress=progress)
        self.fps = float(self.info.fps)
        self.radius = int(self.cfg.data.audio_radius)
        self.name = self.path.name
        self.extract = dataset_extractor(self.data)  # utterances known in full: offline-equal
        self.live_extract = dataset_extractor(self.data, keep_decoder=True)  # live windows (not Whisper datasets)
        # the extractor gives the avatar's columns (and the Whisper encoder is loaded before sessions start)
        probe = utterance_features(np.zeros(AUDIO_RATE, np.float32), self.fps, self.extract)
        if probe.shape[1] != self.info.audio_dim:
            from talkinghead.errors import UserError

            raise UserError(f"{avatar}: driving features have {probe.shape[1]} dims but the avatar was "
                            f"trained on {self.info.audio_dim}")
        self.silence = pause_row(self.data)  # drives idle frames
        self.device = next(iter(self.model.parameters())).device if hasattr(self.model, "parameters") else "cpu"
        with torch.no_grad():  # first render builds the method's lazy caches before sessions share it
            self.open_stream().render(self.condition(0, np.repeat(self.silence[None], 1, 0), 0))

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def size(self) -> int:
        return int(self.info.size)

    def open_stream(self) -> FrameStream:
        return open_frame_stream(self.model, self.radius)

    def live_features(self, extract: Extractor | None = None, **params):
        """A new live feature stream (module docstring): Whisper rows computed incrementally when the dataset's
        features are Whisper's alone, else windows of ``extract`` (default: :attr:`live_extract`; the server
        runs the whole stream in a process of its own). ``params`` override WHISPER_LIVE / PHONE_LIVE."""
        return live_feature_stream(self.fps, self.extract.whisper, self.extract.wav2vec_model,
                                   extract or self.live_extract, **params)

    def condition(self, n: int, rows: np.ndarray, pose_step: int) -> Condition:
        """Condition of the frame whose audio row is ``rows[n]`` (rows [N, D], normalised, N > n; rows past
        the end repeat the last one), with pose/backdrop/blink of training frame pingpong(pose_step)."""
        from .render import pingpong

        R = self.radius
        idx = np.clip(np.arange(n - R, n + R + 1), 0, len(rows) - 1)
        window = torch.from_numpy(np.ascontiguousarray(rows[idx], np.float32))
        cond = self.store.condition(pingpong(pose_step, len(self.store)), audio=window)
        return cond.to(self.device)


__all__ = ["CHUNK_MS", "WHISPER_LIVE", "PHONE_LIVE", "FrameStream", "open_frame_stream", "FeatureStream",
           "live_feature_stream", "pause_row", "DrivenAvatar", "utterance_features", "utterance_parts",
           "utterance_rows", "dataset_extractor",
           "num_frames_of"]
