"""Audio features with one row per video frame: what every method's audio branch consumes.

Frame ``i`` of a clip at ``fps`` is the instant ``i / fps``; audio sample ``s`` is at ``s / 16000`` (see
``docs/dataset.md``). Every feature below describes the audio *around* that instant, so row ``i`` lines up
with image ``i``. The same :func:`compute_audio_features` runs on the training clip (``prepare``) and on
new driving audio (``render``), so an avatar sees the same kind of input in both.

Features (all per video frame, ``T = num_frames`` rows; audio shorter than the video is zero-padded, longer
audio is ignored past the last frame):

* ``mel`` [T, 80]: natural-log mel power. 25 ms Hann windows every 10 ms (n_fft 512), 80 triangular HTK-mel
  bands over 0-8 kHz, then the *power* of the 10 ms frames is averaged under a box of one video frame
  (1 / fps) centred on the frame's instant before taking the log (so nothing between frames is skipped).
* ``energy`` [T]: RMS level in dBFS of the audio in the same 1 / fps box (floor -100 dB).
* ``phone_ids`` [T]: the 1-best phone (pocketsphinx allphone search with its phone trigram) at the frame's
  instant; ``phone_posteriors`` [T, 40]: the acoustic model's phone posteriors (softmax of per-10 ms phone
  log-likelihoods read from pocketsphinx's senone scores) averaged around the frame. See
  :mod:`talkinghead.audio.phones` for how they are obtained and calibrated. Only without Whisper (both None
  with it): :meth:`AudioFeatures.stack` does not use them then, and phone recognition was most of the audio
  step's time. A consumer that needs phones of a Whisper dataset computes them with :func:`phone_features`.
* ``wav2vec`` [T, D] (optional): hidden states of a local wav2vec 2.0 / HuBERT model linearly interpolated
  from 50 Hz to the video frames, as the papers do (:mod:`talkinghead.audio.wav2vec`).
* ``whisper`` [T, L + 1, D] (the default of ``prepare``): every hidden state of a Whisper encoder at the frame
  instants (:mod:`talkinghead.audio.whisper`); ``whisper_layers`` says which of them :meth:`AudioFeatures.stack`
  gives the methods and ``encoder`` identifies the checkpoint (name, sha256 of its weights, layers).

:meth:`AudioFeatures.stack` gives the normalised vector methods consume. Its normalisation never uses
statistics of *another* clip: log-mel is mean-normalised per band over the utterance's own speech frames
(cepstral-mean-normalisation style, which removes microphone and speaker timbre offsets) and divided by a
fixed scale; energy is taken relative to the utterance's median speech level (speech = the frames the phone
recogniser does not call silence; with Whisper, where there are no phones, the frames less than
``SPEECH_BELOW_P95_DB`` under the utterance's 95th-percentile energy). Applied identically to
training and driving audio, this lets an avatar trained on one recording be driven by another speaker.
With Whisper features the vector is the chosen hidden states as the encoder gives them (LayerNorm-scaled
already; no statistics of any clip) followed by the relative energy: phones and log-mel add nothing a linear
read-out of the mouth can use on top of them (bench/RESULTS.md, "Audio -> mouth ceiling").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from talkinghead.audio import phones as _phones
from talkinghead.errors import UserError
from talkinghead.media import AUDIO_RATE, read_audio

if TYPE_CHECKING:
    from talkinghead.audio.whisper import WhisperChoice

N_MELS = 80
N_FFT = 512
WIN = 400  # 25 ms
HOP = 160  # 10 ms
ENERGY_FLOOR_DB = -100.0
MEL_SCALE = 3.0  # fixed divisor of mean-normalised log-mel: brings speech to roughly unit spread
ENERGY_SCALE = 20.0  # dB per unit in stack()
ENERGY_RANGE = (-3.0, 1.0)  # stack() clips relative energy to [-60 dB, +20 dB] around the speech level
# Speech frames without phones (Whisper features): energy above the 95th percentile minus this. Measured against
# pocketsphinx's speech frames on 9 clips (English, German, studio and noisy): the median speech level agrees
# within 0.4 dB on 8 of them, 1.7 dB lower on cnn_anchor_en_71s (a noise floor: every frame is within 35 dB).
SPEECH_BELOW_P95_DB = 30.0

# check_audio thresholds: speech is typically -35..-15 dBFS RMS over a second.
MIN_SECONDS = 0.1
SILENT_PEAK = 1e-3
SILENT_RMS_DB = -55.0


@dataclass
class AudioFeatures:
    """Per-video-frame audio features of one utterance (all arrays have T rows)."""

    fps: float
    mel: np.ndarray  # [T, n_mels] float32, natural-log mel power
    energy: np.ndarray  # [T] float32, dBFS
    phone_ids: np.ndarray | None = None  # [T] int64, indices into phone_names; None with Whisper features
    phone_posteriors: np.ndarray | None = None  # [T, P] float32, rows sum to 1; None with Whisper features
    phone_names: list[str] = field(default_factory=lambda: list(_phones.PHONES))
    wav2vec: np.ndarray | None = None  # [T, D] float32
    whisper: np.ndarray | None = None  # [T, L + 1, D] float16: every hidden state of the Whisper encoder
    whisper_layers: tuple[int, ...] = ()  # the hidden states of ``whisper`` that stack() gives, in order
    encoder: dict | None = None  # {"name", "sha256", "layers", "checkpoint"} of the Whisper encoder

    @property
    def num_frames(self) -> int:
        return int(self.mel.shape[0])

    @property
    def names(self) -> list[str]:
        """One name per column of :meth:`stack`."""
        if self.whisper is not None:
            out = [f"whisper{l}:{i}" for l in self.whisper_layers for i in range(self.whisper.shape[2])]
            out.append("energy")
        else:
            out = [f"phone:{p}" for p in self.phone_names]
            out += [f"mel:{i}" for i in range(self.mel.shape[1])]
            out.append("energy")
        if self.wav2vec is not None:
            out += [f"wav2vec:{i}" for i in range(self.wav2vec.shape[1])]
        return out

    def _relative_energy(self) -> np.ndarray:
        """[T] energy relative to the utterance's median speech level, in units of 20 dB, clipped."""
        speech = self.speech_frames()
        level = float(np.median(self.energy[speech])) if self.num_frames else 0.0
        return np.clip((self.energy - level) / ENERGY_SCALE, *ENERGY_RANGE)

    def speech_frames(self) -> np.ndarray:
        """[T] bool: the speech frames whose median level :meth:`stack` normalises energy by (all frames when
        fewer than 3 are found). Without Whisper: the frames the phone recogniser does not call silence; with
        Whisper (even where old datasets still carry phones, so a dataset and new driving audio agree): energy
        above the 95th percentile minus ``SPEECH_BELOW_P95_DB``."""
        if self.whisper is not None or self.phone_ids is None:
            top = np.percentile(self.energy, 95) if self.num_frames else 0.0
            speech = self.energy > top - SPEECH_BELOW_P95_DB
        else:
            speech = self.phone_ids != _phones.SIL
        return speech if speech.sum() >= 3 else np.ones(self.num_frames, bool)

    def stack(self) -> np.ndarray:
        """The normalised per-frame vector methods consume: float32 [T, D], columns as :attr:`names`.

        Without Whisper: ``[phone posteriors | (log-mel - speech mean per band) / MEL_SCALE | relative energy
        / 20 dB | wav2vec]``. With Whisper: ``[hidden state l for l in whisper_layers | relative energy / 20 dB
        | wav2vec]``. Means and the speech level come from this utterance's own speech frames (all frames
        when no speech was found), never from another clip; see the module docstring.
        """
        energy = self._relative_energy()[:, None]
        if self.whisper is not None:
            parts = [self.whisper[:, l].astype(np.float32) for l in self.whisper_layers] + [energy]
        elif self.phone_posteriors is None:
            raise ValueError("features without Whisper need phone posteriors (compute_audio_features(phones=True))")
        else:
            speech = self.speech_frames()
            mel_mean = self.mel[speech].mean(axis=0) if self.num_frames else np.zeros(self.mel.shape[1], np.float32)
            parts = [self.phone_posteriors, (self.mel - mel_mean) / MEL_SCALE, energy]
        if self.wav2vec is not None:
            parts.append(self.wav2vec)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (no pickled objects) atomically: a temporary file renamed at the end."""
        path = Path(path)
        arrays = dict(fps=np.float64(self.fps), mel=self.mel, energy=self.energy,
                      phone_names=np.array(self.phone_names, dtype=str))
        if self.phone_ids is not None:
            arrays.update(phone_ids=self.phone_ids, phone_posteriors=self.phone_posteriors)
        if self.wav2vec is not None:
            arrays["wav2vec"] = self.wav2vec
        if self.whisper is not None:
            arrays.update(whisper=self.whisper, whisper_layers=np.array(self.whisper_layers, np.int64),
                          encoder=np.array(json.dumps(self.encoder)))
        tmp = path.with_name(f".{path.name}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AudioFeatures":
        try:
            with np.load(path, allow_pickle=False) as z:
                phones = "phone_ids" in z.files
                out = cls(fps=float(z["fps"]), mel=z["mel"], energy=z["energy"],
                          phone_ids=z["phone_ids"] if phones else None,
                          phone_posteriors=z["phone_posteriors"] if phones else None,
                          phone_names=[str(p) for p in z["phone_names"]],
                          wav2vec=z["wav2vec"] if "wav2vec" in z.files else None)
                if "whisper" in z.files:
                    out.whisper, out.whisper_layers = z["whisper"], tuple(int(l) for l in z["whisper_layers"])
                    out.encoder = json.loads(str(z["encoder"]))
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"cannot read audio features {path}: {exc}") from None
        rows = {len(a) for a in (out.mel, out.energy, out.phone_ids, out.phone_posteriors, out.wav2vec, out.whisper)
                if a is not None}
        layers_ok = out.whisper is None or all(0 <= l < out.whisper.shape[1] for l in out.whisper_layers)
        phones_ok = (out.phone_posteriors.shape[1] == len(out.phone_names) if out.phone_ids is not None
                     else out.whisper is not None)  # only Whisper features may come without phones
        if len(rows) != 1 or not phones_ok or not layers_ok:
            raise UserError(f"cannot read audio features {path}: arrays of inconsistent sizes")
        return out


def check_audio(wave: np.ndarray, source: str) -> None:
    """Raise :class:`UserError` naming ``source`` when ``wave`` (float [S], 16 kHz) is empty or silent.

    Silent = peak below 1e-3, or no second of it louder than -55 dBFS RMS (speech is ~-35..-15 dBFS).
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"check_audio expects mono samples [S], got shape {wave.shape}")
    if wave.size < MIN_SECONDS * AUDIO_RATE:
        raise UserError(f"{source}: the audio is empty or shorter than {MIN_SECONDS:g} s")
    if not np.all(np.isfinite(wave)):
        raise UserError(f"{source}: the audio holds invalid (NaN or infinite) samples")
    peak = float(np.max(np.abs(wave)))
    if peak < SILENT_PEAK:
        raise UserError(f"{source}: the audio is silent (peak level {20 * np.log10(peak + 1e-12):.0f} dBFS)")
    second = min(AUDIO_RATE, wave.size)
    csum = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    loudest = float(np.max(csum[second:] - csum[:-second]) / second)
    loudest_db = 10 * np.log10(loudest + 1e-12)
    if loudest_db < SILENT_RMS_DB:
        raise UserError(f"{source}: the audio is nearly silent (loudest second at {loudest_db:.0f} dBFS RMS, "
                        f"speech is around -30 dBFS)")


def load_driving_audio(path: str | os.PathLike) -> np.ndarray:
    """New audio for ``render``: any media file's first audio track, mono float32 [S] at 16 kHz, checked."""
    wave = read_audio(path)
    check_audio(wave, str(path))
    return wave


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = AUDIO_RATE) -> np.ndarray:
    """Triangular filters on the HTK mel scale over 0..rate/2: float32 [n_mels, n_fft // 2 + 1], peak 1."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    edges_hz = 700.0 * (10 ** (np.linspace(0.0, hz_to_mel(rate / 2), n_mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return np.clip(np.minimum(up, down), 0.0, None).astype(np.float32)


def _mel_power(wave: np.ndarray, count: int) -> np.ndarray:
    """Mel power [count, N_MELS] of 25 ms windows centred at 10 ms steps (zero-padded at both ends)."""
    padded = np.pad(wave.astype(np.float32), (WIN // 2, WIN + count * HOP))
    frames = np.lib.stride_tricks.sliding_window_view(padded, WIN)[: count * HOP: HOP]
    window, bank = np.hanning(WIN).astype(np.float32), mel_filterbank().T
    out = np.empty((count, N_MELS), np.float32)
    for a in range(0, count, 6000):  # a minute at a time bounds the complex spectrum's memory
        spec = np.abs(np.fft.rfft(frames[a:a + 6000] * window, n=N_FFT, axis=1)) ** 2
        out[a:a + 6000] = spec.astype(np.float32) @ bank
    return out


def _box_average(x: np.ndarray, times: np.ndarray, half: float, rate: float) -> np.ndarray:
    """Mean of the rows of ``x`` (sampled at ``rate`` Hz, row k at k / rate) within ``times`` ± ``half`` s."""
    csum = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(x, axis=0, dtype=np.float64)])
    a = np.clip(np.ceil((times - half) * rate - 1e-9).astype(np.int64), 0, len(x))
    b = np.clip(np.floor((times + half) * rate - 1e-9).astype(np.int64) + 1, 0, len(x))
    b = np.maximum(b, np.minimum(a + 1, len(x)))
    return ((csum[b] - csum[a]) / np.maximum(b - a, 1).reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32)


def phone_features(wave: np.ndarray, fps: float, num_frames: int,
                   decoder: "_phones.PhoneDecoder | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(phone_ids int64 [T], phone_posteriors float32 [T, 40]) of ``wave`` (float32 [S] at 16 kHz, sample 0 at
    frame 0): pocketsphinx phone recognition (:mod:`talkinghead.audio.phones`) at the frame instants."""
    recognition = _phones.recognize_phones(wave, decoder)
    posteriors = _phones.phone_posteriors(recognition.loglik, fps, num_frames)
    return _phones.phone_labels(recognition.segments, fps, num_frames), posteriors.astype(np.float32)


def frames_audio(wave: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """The samples :func:`compute_audio_features` reads for ``num_frames`` frames: float32 [S'] (audio past
    the last frame is not needed)."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    return wave[: int(np.ceil((num_frames / fps + 1.0 / fps) * AUDIO_RATE))]


def compute_audio_features(wave: np.ndarray, fps: float, num_frames: int, *, progress: bool = False,
                           wav2vec_model: str | os.PathLike | None = None,
                           whisper: "WhisperChoice | None" = None,
                           phone_decoder: "_phones.PhoneDecoder | None" = None,
                           phones: bool | None = None, whisper_depth: int | None = None,
                           whisper_windows: tuple[int, ...] | None = None) -> AudioFeatures:
    """Features of ``wave`` (float32 [S] at 16 kHz, sample 0 at frame 0) for ``num_frames`` frames at ``fps``.

    ``wav2vec_model``: a local wav2vec 2.0 / HuBERT folder (transformers format); its features are added.
    ``whisper``: which Whisper checkpoint and layers (:class:`talkinghead.audio.whisper.WhisperChoice`); its
    hidden states are added and become what :meth:`AudioFeatures.stack` gives. None: no Whisper features.
    ``phones``: run phone recognition (default: only without Whisper, the one case :meth:`AudioFeatures.stack`
    uses phones). ``phone_decoder``: a kept pocketsphinx decoder (the live server's; see
    :class:`~talkinghead.audio.phones.PhoneDecoder`) instead of a fresh one per call.
    ``whisper_depth`` / ``whisper_windows``: only Whisper's states 0..depth / only these of its windows
    (:func:`talkinghead.audio.whisper.whisper_features`; the live server's utterances, which need only the
    states :meth:`AudioFeatures.stack` reads, window by window).
    """
    from tqdm import tqdm

    if fps <= 0 or num_frames < 0:
        raise ValueError(f"need fps > 0 and num_frames >= 0, got {fps}, {num_frames}")
    wave = frames_audio(wave, fps, num_frames)
    duration = num_frames / fps
    phones = whisper is None if phones is None else phones
    steps = (["phones"] if phones else []) + ["mel"] + (["wav2vec"] if wav2vec_model is not None else []) \
        + (["whisper"] if whisper else [])
    bar = tqdm(total=len(steps), desc="audio features", unit="step", disable=not progress)
    times = np.arange(num_frames) / fps

    ids = posteriors = None
    if phones:
        ids, posteriors = phone_features(wave, fps, num_frames, phone_decoder)
        bar.update()

    count = int(np.ceil(duration * AUDIO_RATE / HOP)) + 2
    mel_power = _mel_power(wave, count)
    mel = np.log(_box_average(mel_power, times, 0.5 / fps, AUDIO_RATE / HOP) + 1e-10).astype(np.float32)
    padded = np.pad(wave.astype(np.float64) ** 2, (0, max(0, int(np.ceil(duration * AUDIO_RATE)) + 1 - len(wave))))
    power = _box_average(padded[:, None], times, 0.5 / fps, AUDIO_RATE)[:, 0]
    energy = np.maximum(10.0 * np.log10(power + 1e-12), ENERGY_FLOOR_DB).astype(np.float32)
    bar.update()

    w2v = None
    if wav2vec_model is not None:
        from talkinghead.audio.wav2vec import load_wav2vec, wav2vec_features

        w2v = wav2vec_features(load_wav2vec(wav2vec_model), wave, fps, num_frames)
        bar.update()
    out = AudioFeatures(fps=float(fps), mel=mel.reshape(num_frames, N_MELS), energy=energy,
                        phone_ids=ids, phone_posteriors=posteriors, wav2vec=w2v)
    if whisper is not None:
        from talkinghead.audio.whisper import shared_whisper, whisper_features

        encoder = shared_whisper(whisper.checkpoint)
        out.whisper = whisper_features(encoder, wave, fps, num_frames, depth=whisper_depth, windows=whisper_windows)
        out.whisper_layers = whisper.check_layers(encoder.num_layers)
        out.encoder = {"name": encoder.name, "sha256": encoder.sha256, "layers": list(out.whisper_layers),
                       "checkpoint": encoder.checkpoint}
        bar.update()
    bar.close()
    return out
