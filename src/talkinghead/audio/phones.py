"""Phone recognition with pocketsphinx: the project's offline phonetic audio signal.

The papers drive their avatars with DeepSpeech logits (AD-NeRF, ER-NeRF, GaussianTalker) or wav2vec 2.0
features (Talk3D, FlameTalk, the one-shot emotion paper), i.e. a per-frame, mostly speaker-independent
description of *which sound is being made*. Those weights cannot be shipped offline; pocketsphinx 5 ships an
English acoustic model and a phone language model, so we decode phones with its "allphone" search (phone
loop weighted by the phone trigram model) and turn the 1-best phone segmentation into per-video-frame labels
and soft distributions.

What the posteriors are, honestly: pocketsphinx's allphone search builds no lattice and its Python API
exposes no per-frame acoustic scores, so :func:`phone_posteriors` is *not* an acoustic posterior. It is the
1-best segmentation (10 ms resolution) smoothed in time with a Gaussian kernel whose width covers one video
frame (sigma = max(20 ms, 0.5 / fps)): a frame straddling a phone boundary, or within ~20 ms of one, shares
its mass between the phones on either side, which models coarticulation and the decoder's boundary
uncertainty, but a wrongly recognised phone stays confidently wrong. Mass is therefore spread in time only.

Non-speech: pocketsphinx's fillers (``SIL``, ``+NSN+`` noise, ``+SPN+`` speech noise) all map to our ``SIL``,
and 10 ms frames quieter than ``SILENCE_DB`` are forced to ``SIL`` because the recogniser hallucinates phones
on digital silence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from talkinghead.media import AUDIO_RATE

# SIL first, then the 39 ARPAbet phones of the CMU dictionary (pocketsphinx en-us mdef, fillers removed).
# The set is fixed so every clip, training or driving, has the same columns.
PHONES: tuple[str, ...] = (
    "SIL", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH",
    "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W",
    "Y", "Z", "ZH",
)
SIL = 0
_INDEX = {name: i for i, name in enumerate(PHONES)}
_FILLERS = {"+NSN+", "+SPN+", "<s>", "</s>", "<sil>"}

HOP_S = 0.01  # pocketsphinx's frame rate: 100 frames per second.
SILENCE_DB = -55.0  # dBFS of a 25 ms window below which there is no speech to recognise.


@dataclass(frozen=True)
class PhoneSegment:
    phone: str  # one of PHONES
    start_s: float  # inclusive
    end_s: float  # exclusive


def _decoder():
    try:
        from pocketsphinx import Decoder, get_model_path
    except ImportError:
        from talkinghead.errors import UserError

        raise UserError("phone recognition needs pocketsphinx: pip install 'talkinghead[prepare]'") from None
    return Decoder(allphone=get_model_path("en-us/en-us-phone.lm.bin"), lm=None, loglevel="ERROR")


def _frame_db(wave: np.ndarray, hop: int, win: int, count: int) -> np.ndarray:
    """RMS dBFS [count] of ``win``-sample windows centred every ``hop`` samples (zero-padded)."""
    padded = np.pad(wave.astype(np.float64) ** 2, (win // 2, win))
    csum = np.concatenate([[0.0], np.cumsum(padded)])
    starts = np.arange(count) * hop
    power = (csum[starts + win] - csum[starts]) / win
    return 10.0 * np.log10(power + 1e-12)


def recognize_phones(wave: np.ndarray) -> list[PhoneSegment]:
    """The 1-best phone segmentation of ``wave``: float32 [S] at 16 kHz, covering [0, S / 16000) s.

    Consecutive segments of the same phone are merged; silence gaps are explicit ``SIL`` segments.
    """
    n = int(np.ceil(len(wave) / (HOP_S * AUDIO_RATE)))
    labels = np.full(n, SIL, np.int64)
    if len(wave):
        pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        decoder = _decoder()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        for seg in decoder.seg():
            if seg.word in _FILLERS:
                continue
            labels[max(seg.start_frame, 0):min(seg.end_frame + 1, n)] = _INDEX.get(seg.word, SIL)
    hop = int(HOP_S * AUDIO_RATE)
    labels[_frame_db(wave, hop, int(0.025 * AUDIO_RATE), n) < SILENCE_DB] = SIL
    # Run-length encode into segments.
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change]) if n else np.zeros(0, np.int64)
    ends = np.concatenate([change, [n]]) if n else np.zeros(0, np.int64)
    return [PhoneSegment(PHONES[labels[s]], s * HOP_S, e * HOP_S) for s, e in zip(starts, ends)]


def phone_posteriors(segments: list[PhoneSegment], fps: float, num_frames: int) -> np.ndarray:
    """Soft phone distribution per video frame: float32 [num_frames, len(PHONES)], rows sum to 1.

    Frame ``i`` is centred at ``i / fps``. The 10 ms one-hot timeline of ``segments`` is averaged under a
    Gaussian window (sigma = max(20 ms, 0.5 / fps)) around that time; beyond the segments it is ``SIL``.
    """
    sigma = max(0.02, 0.5 / fps)
    radius = int(np.ceil(3 * sigma / HOP_S))
    end = max((s.end_s for s in segments), default=0.0)
    n = max(int(round(end / HOP_S)), int(np.ceil(num_frames / fps / HOP_S)) + 1) + 2 * radius
    timeline = np.zeros((n, len(PHONES)), np.float32)
    timeline[:, SIL] = 1.0
    for seg in segments:
        a, b = radius + int(round(seg.start_s / HOP_S)), radius + int(round(seg.end_s / HOP_S))
        timeline[a:b] = 0.0
        timeline[a:b, _INDEX[seg.phone]] = 1.0
    # Gaussian weights of the 10 ms frames (centres at (k + 0.5) * HOP_S) around each video frame time.
    times = np.arange(num_frames) / fps
    centre = np.floor(times / HOP_S).astype(np.int64) + radius
    offsets = np.arange(-radius, radius + 1)
    idx = centre[:, None] + offsets[None, :]  # [T, K]
    dt = (idx - radius + 0.5) * HOP_S - times[:, None]
    w = np.exp(-0.5 * (dt / sigma) ** 2).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    post = np.einsum("tk,tkp->tp", w, timeline[idx])
    return post / post.sum(axis=1, keepdims=True)


def phone_labels(segments: list[PhoneSegment], fps: float, num_frames: int) -> np.ndarray:
    """The phone index being spoken at each video frame's time ``i / fps``: int64 [num_frames]."""
    out = np.full(num_frames, SIL, np.int64)
    if not segments:
        return out
    times = np.arange(num_frames) / fps
    starts = np.array([s.start_s for s in segments])
    ids = np.array([_INDEX[s.phone] for s in segments])
    k = np.searchsorted(starts, times, side="right") - 1
    inside = (k >= 0) & (times < segments[-1].end_s)
    out[inside] = ids[k[inside]]
    return out
