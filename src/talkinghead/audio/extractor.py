"""The dataset's feature extractor as a small picklable object, so it can run in a worker process.

pocketsphinx holds Python's GIL while it decodes (measured: a 1 s decode stalls every other thread of the
process for the whole second), so the live server runs extraction in worker processes, and a streaming
window extractor can keep one decoder per process (:class:`~talkinghead.audio.phones.PhoneDecoder`: building
one costs ~0.5 s). ``keep_decoder=False`` is exactly ``prepare``'s / ``render``'s extractor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from talkinghead.audio.features import AudioFeatures, compute_audio_features


@lru_cache(maxsize=1)
def _process_decoder():
    from talkinghead.audio.phones import PhoneDecoder

    return PhoneDecoder()  # one per process, kept across windows


class _Spare:
    """A fresh (never used) decoder built ahead of time in the background: using it gives exactly what a
    decoder built on the spot gives, without waiting ~0.5 s for it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.next = None
        self.thread: threading.Thread | None = None

    def _build(self) -> None:
        from talkinghead.audio.phones import PhoneDecoder

        dec = PhoneDecoder()
        with self.lock:
            self.next = dec

    def take(self):
        from talkinghead.audio.phones import PhoneDecoder

        if self.thread is not None:
            self.thread.join()
        with self.lock:
            dec, self.next = self.next, None
        self.thread = threading.Thread(target=self._build, daemon=True)
        self.thread.start()
        return dec if dec is not None else PhoneDecoder()


_SPARE = _Spare()


@dataclass(frozen=True)
class DatasetExtractor:
    """``(wave [S] 16 kHz, fps, num_frames) -> AudioFeatures`` as the dataset was prepared."""

    wav2vec_model: str | None = None  # the dataset's local wav2vec / HuBERT folder (prepare --wav2vec)
    keep_decoder: bool = False  # reuse this process's pocketsphinx decoder (live windows; not offline-equal)
    whisper: object | None = None  # the dataset's talkinghead.audio.whisper.WhisperChoice, if any

    def __call__(self, wave: np.ndarray, fps: float, num_frames: int) -> AudioFeatures:
        kw = {"wav2vec_model": self.wav2vec_model}
        if self.whisper is not None:  # no phone recognition with Whisper features: no decoder to keep or build
            return compute_audio_features(wave, fps, num_frames, whisper=self.whisper, **kw)
        if self.keep_decoder:
            return compute_audio_features(wave, fps, num_frames, phone_decoder=_process_decoder(), **kw)
        dec = _SPARE.take()  # a fresh decoder, as prepare's, built while the previous request decoded
        try:
            return compute_audio_features(wave, fps, num_frames, phone_decoder=dec, **kw)
        finally:
            dec.close()

    # ---- an utterance known in full, part by part (the live server's uploads and typed text)

    def parts(self, wave: np.ndarray, fps: float, num_frames: int) -> list[tuple[int, int]]:
        """Frame ranges [a, b), in order, covering the utterance, whose rows :meth:`rows` computes one at a time:
        Whisper's windows (one per 22 s after the first 30 s) with Whisper features alone, else one part."""
        if self.whisper is None or self.wav2vec_model is not None:
            return [(0, num_frames)]
        from talkinghead.audio.features import frames_audio
        from talkinghead.audio.whisper import whisper_windows

        plan = whisper_windows(len(frames_audio(wave, fps, num_frames)), fps, num_frames)
        return [(int(sel[0]), int(sel[-1]) + 1) for _, sel in plan]

    def rows(self, wave: np.ndarray, fps: float, num_frames: int, part: int) -> np.ndarray:
        """The driving rows of part ``part`` of :meth:`parts`: float32 [b - a, D], exactly
        ``self(wave, fps, num_frames).stack()[a:b]``, with the encoder run only through the deepest hidden
        state ``stack()`` reads and only over that part's window (relative energy is cheap: always the whole
        utterance's, as offline)."""
        a, b = self.parts(wave, fps, num_frames)[part]
        if self.whisper is None or self.wav2vec_model is not None:
            return np.asarray(self(wave, fps, num_frames).stack()[a:b], np.float32)
        feats = compute_audio_features(wave, fps, num_frames, whisper=self.whisper, whisper_depth=max(self.whisper.layers),
                                       whisper_windows=(part,))
        return np.asarray(feats.stack()[a:b], np.float32)


def warm_up(whispers: tuple = ()) -> bool:
    """Import and build everything a worker process needs (called once per worker at server start): the
    decoders, and the Whisper encoders of ``whispers`` (WhisperChoice), loaded once per process
    (:func:`talkinghead.audio.whisper.shared_whisper`)."""
    DatasetExtractor(keep_decoder=True)(np.zeros(1600, np.float32), 25.0, 2)
    DatasetExtractor()(np.zeros(1600, np.float32), 25.0, 2)
    if whispers:
        from talkinghead.audio.whisper import shared_whisper

        for w in whispers:
            shared_whisper(w.checkpoint)
    return True
