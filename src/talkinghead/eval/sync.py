"""Landmark sync: audio-visual offset and confidence without SyncNet weights.

SyncNet (Chung & Zisserman 2016, the "Sync" column of every paper) embeds 0.2 s of mouth crops and of
MFCCs, slides the audio against the video over +-15 frames, and reports the offset of the smallest
embedding distance and a confidence = median distance - minimum distance. Its weights are not available
offline, so we run the same search on two interpretable 1-D signals instead, and call the result
"landmark sync" (``syncnet.py`` computes the real SyncNet confidence when weights are given locally):

* visual: the lip aperture ``landmarks.mouth_opening`` (the project's one definition), per video frame;
* audio, the *articulation signal*: from ``talkinghead.audio.features`` (the project's one audio front end)
  the log power of the mel bands centred in 1-3 kHz (second/third formant region, which rises with lip
  and jaw opening in vowels and collapses in closures) plus a vowel-openness score from the phone
  posteriors (open vowels +1 ... bilabial closures and silence -1), each standardised and summed; the log
  power is floored 40 dB under its 95th percentile (digital silence would otherwise be an outlier).
  On five real clips this correlated better with lip aperture than broadband energy (bench_eval.py).
* both signals are high-passed (minus a 0.5 s moving average: slow loudness and posture drifts are not
  articulation; 0.5 s separated the true offset from the speech rhythm's repeats best on
  our clips); the audio is standardised, the mouth signal is divided by ``sqrt(var + MOUTH_FLOOR^2)`` so
  that a mouth moving less than landmark noise (``MOUTH_FLOOR`` interocular units) counts as still instead
  of being blown up to unit variance.
* for each offset k in [-15, 15] frames the score ``c_k = mean_t m[t] * a[t + k]`` (a correlation when the
  mouth moves well above the floor); **offset** = argmax_k c_k minus the natural lag (below), **confidence**
  = max_k c_k - median_k c_k (SyncNet's definition with similarity in place of distance).

Offset sign: positive = the audio comes *late* (audio delayed by k frames gives offset k).
Natural lag: acoustic energy follows lip opening; on four in-sync clips (may, aoc, german, cnn) the argmax is at
+1..+3 frames at 25 fps (median 2 = 80 ms), so ``NATURAL_LAG_S = 0.08`` is subtracted and an in-sync video reads
about 0 +- 2 frames. Comparing a prediction with its ground truth (``offset - offset_gt``) cancels the lag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MAX_OFFSET = 15  # frames, as SyncNet's evaluation
NATURAL_LAG_S = 0.08
MOUTH_FLOOR = 0.01  # interocular units
HIGHPASS_S = 0.5
FORMANT_BAND_HZ = (1000.0, 3000.0)
FLOOR_DB = 40.0
# Vowel openness / closure weights on the ARPAbet phone set of talkinghead.audio.phones (others 0).
OPENNESS = {"AA": 1.0, "AE": 1.0, "AH": 1.0, "AO": 1.0, "AW": 1.0, "AY": 1.0, "EH": 0.8, "EY": 0.7,
            "OW": 0.8, "OY": 0.8, "ER": 0.5, "IH": 0.4, "UH": 0.4, "IY": 0.3, "UW": 0.3,
            "F": -0.5, "V": -0.5, "P": -1.0, "B": -1.0, "M": -1.0, "SIL": -1.0}


@dataclass(frozen=True)
class SyncResult:
    offset: int  # frames, positive = audio late
    confidence: float
    scores: list[float]  # c_k for k = -MAX_OFFSET..MAX_OFFSET

    def as_dict(self) -> dict:
        return asdict(self)


def highpass(x: np.ndarray, fps: float) -> np.ndarray:
    """``x`` [T] minus its centred moving average over ``HIGHPASS_S`` seconds (edges padded)."""
    n = max(3, int(round(HIGHPASS_S * fps)) | 1)
    padded = np.pad(x.astype(np.float64), n // 2, mode="edge")
    return x - np.convolve(padded, np.ones(n) / n, mode="valid")


def _standardise(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / s if s > 1e-12 else np.zeros_like(x)


def articulation_signal(features) -> np.ndarray:
    """[T] articulation signal from ``talkinghead.audio.features.AudioFeatures`` (see module docstring)."""
    from talkinghead.audio.features import N_FFT, mel_filterbank
    from talkinghead.media import AUDIO_RATE

    fb = mel_filterbank(features.mel.shape[1], N_FFT, AUDIO_RATE)
    centre = np.linspace(0.0, AUDIO_RATE / 2, N_FFT // 2 + 1)[fb.argmax(1)]
    band = (centre >= FORMANT_BAND_HZ[0]) & (centre < FORMANT_BAND_HZ[1])
    formant = np.log(np.exp(features.mel[:, band].astype(np.float64)).sum(1))
    # Digital silence has a log power near -inf; floor it 40 dB under the loud frames so silence reads as
    # "closed", not as an outlier that outweighs all speech.
    formant = np.maximum(formant, np.percentile(formant, 95) - FLOOR_DB / 10 * np.log(10))
    weights = np.array([OPENNESS.get(p, 0.0) for p in features.phone_names])
    openness = features.phone_posteriors.astype(np.float64) @ weights
    fps = features.fps
    return _standardise(highpass(formant, fps)) + _standardise(highpass(openness, fps))


def landmark_sync(articulation: np.ndarray, mouth: np.ndarray, fps: float,
                  max_offset: int = MAX_OFFSET) -> SyncResult:
    """Offset search between an articulation signal [T] and mouth opening [T] (NaN = no face: skipped)."""
    T = min(len(articulation), len(mouth))
    if T < 2 * max_offset + 8:
        raise ValueError(f"landmark sync needs at least {2 * max_offset + 8} frames, got {T}")
    a, m = articulation[:T].astype(np.float64), mouth[:T].astype(np.float64)
    ok = np.isfinite(m)
    if ok.sum() < 8:
        raise ValueError("landmark sync needs a face in at least 8 frames")
    m = np.where(ok, m, np.interp(np.arange(T), np.flatnonzero(ok), m[ok]))  # bridge short gaps for the filter
    a = _standardise(highpass(a, fps))
    m = highpass(m, fps)
    m = np.where(ok, (m - m[ok].mean()) / np.sqrt(m[ok].var() + MOUTH_FLOOR ** 2), 0.0)
    scores = []
    for k in range(-max_offset, max_offset + 1):
        lo, hi = max(0, -k), min(T, T - k)  # t such that both t and t + k are inside
        w = ok[lo:hi]
        scores.append(float((m[lo:hi][w] * a[lo + k:hi + k][w]).mean()))
    c = np.array(scores)
    best = int(np.argmax(c))
    offset = best - max_offset - int(round(NATURAL_LAG_S * fps))
    return SyncResult(offset, float(c[best] - np.median(c)), scores)
