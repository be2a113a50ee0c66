"""Stability ("wobble") score of GaussianFlameTalk (paper 000, sec. 3.3): lower is steadier.

The paper: nose key points are tracked on the generated and the reference (ground-truth) video, because
the nose is "largely unaffected by jaw movement and expression changes"; the score averages three terms,
the mean motion difference M_d, the variability in motion magnitude V_m and the high-frequency power H_f
from an FFT, "each normalized by its respective maximum values across a given sequence of input frames":
``stability = (M_d + V_m + H_f) / 3``.

What we compute (``p``: the 10 mediapipe nose points ``landmarks.NOSE``, pixels divided by the reference's
median interocular distance so the score does not depend on resolution; ``g`` generated, ``r`` reference):

* motion ``v_t = p_{t+1} - p_t`` per point; motion magnitude ``s_t = mean_points |v_t|``.
* ``M_d = mean_t mean_points |v^g_t - v^r_t|  /  max_t s^r_t``
* ``V_m = mean_t |s^g_t - mean(s^g)|  /  max_t |s^r_t - mean(s^r)|``
* ``H_f = mean_{f >= f_c} P^g(f)  /  max_{f >= f_c} P^r(f)``, with ``P(f)`` the power spectrum (rFFT,
  Hann window, linear trend removed) of the nose trajectory summed over points and x/y, and ``f_c = 5 Hz``.

Ambiguities and our choices:

1. *Whose maximum normalises.* If every term were divided by the maximum of its own series, each would
   lie in [0, 1] and measure only how peaked a series is, not how much it moves; Table 1 also reports
   scores up to 1.88, impossible for a mean of three terms in [0, 1]. So each term is the generated
   video's mean divided by the **reference's** maximum of the same quantity: a prediction moving like the
   reference scores like the reference, extra wobble raises every term without bound.
2. *The reference's own score.* M_d of the reference against itself is 0, so ``stability(r, r)`` is
   ``(V_m + H_f) / 3`` of the reference: the floor a perfect prediction reaches. We report it beside the
   prediction's score.
3. *"High frequency".* Not given. Natural head motion and the nose's small jaw-coupled motion sit below a
   few Hz, while frame-to-frame wobble spreads up to Nyquist; we take ``f_c = 5 Hz`` (above the ~4 Hz
   syllable rate of speech), i.e. the upper 60 % of the band at 25 fps.
4. *Which frames.* Frames where either video lost the face are dropped and the remaining frames are
   joined (gaps are rare; interpolating would invent motion).
5. *Without a reference* (cross-driven without a reference video) the score is not defined: ``None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from talkinghead.face.landmarks import NOSE, interocular

HIGH_FREQ_HZ = 5.0
_EPS = 1e-6  # floor of the normalisers: a perfectly still reference would otherwise divide by 0


@dataclass(frozen=True)
class Stability:
    score: float
    motion_difference: float  # M_d
    motion_variability: float  # V_m
    high_freq_power: float  # H_f
    reference_score: float  # the same score of the reference against itself

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def nose_trajectory(track: np.ndarray, scale: float) -> np.ndarray:
    """Nose points [T, 10, 2] of a face-mesh track [T, 478, 3], divided by ``scale`` (pixels)."""
    return track[:, list(NOSE), :2] / scale


def power_spectrum(traj: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(freqs [F], power [F]) of a trajectory [T, P, 2]: detrended, Hann-windowed, summed over P and x/y."""
    t = np.arange(len(traj), dtype=np.float64)
    x = traj.reshape(len(traj), -1).astype(np.float64)
    coef = np.polyfit(t, x, 1)  # [2, P*2]: remove the linear trend (slow drift is not wobble)
    x = x - (t[:, None] * coef[0] + coef[1])
    spec = np.fft.rfft(x * np.hanning(len(t))[:, None], axis=0)
    return np.fft.rfftfreq(len(t), 1.0 / fps), (np.abs(spec) ** 2).sum(-1) / len(t)


def _terms(gen: np.ndarray, ref: np.ndarray, fps: float) -> tuple[float, float, float]:
    vg, vr = np.diff(gen, axis=0), np.diff(ref, axis=0)  # [T-1, P, 2]
    sg, sr = np.linalg.norm(vg, axis=-1).mean(-1), np.linalg.norm(vr, axis=-1).mean(-1)  # [T-1]
    m_d = np.linalg.norm(vg - vr, axis=-1).mean() / max(sr.max(), _EPS)
    v_m = np.abs(sg - sg.mean()).mean() / max(np.abs(sr - sr.mean()).max(), _EPS)
    freqs, pg = power_spectrum(gen, fps)
    _, pr = power_spectrum(ref, fps)
    high = freqs >= HIGH_FREQ_HZ
    h_f = pg[high].mean() / max(pr[high].max(), _EPS ** 2)
    return float(m_d), float(v_m), float(h_f)


def stability_score(gen_track: np.ndarray, ref_track: np.ndarray, fps: float) -> Stability:
    """Stability of a generated video against its reference from face-mesh tracks [T, 478, 3] (same T)."""
    ok = np.isfinite(gen_track).all(axis=(1, 2)) & np.isfinite(ref_track).all(axis=(1, 2))
    if ok.sum() < 8:
        raise ValueError("stability needs at least 8 frames with a face in both videos")
    if HIGH_FREQ_HZ >= fps / 2:
        raise ValueError(f"stability needs fps > {2 * HIGH_FREQ_HZ:g} to see frequencies above {HIGH_FREQ_HZ} Hz")
    scale = float(np.median(interocular(ref_track[ok])))
    gen, ref = nose_trajectory(gen_track[ok], scale), nose_trajectory(ref_track[ok], scale)
    m_d, v_m, h_f = _terms(gen, ref, fps)
    r_md, r_vm, r_hf = _terms(ref, ref, fps)
    return Stability((m_d + v_m + h_f) / 3, m_d, v_m, h_f, (r_md + r_vm + r_hf) / 3)
