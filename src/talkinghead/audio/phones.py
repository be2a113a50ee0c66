"""Phone recognition with pocketsphinx: the project's offline phonetic audio signal.

The papers drive their avatars with DeepSpeech logits (AD-NeRF, ER-NeRF, GaussianTalker) or wav2vec 2.0
features (Talk3D, FlameTalk, the one-shot emotion paper), i.e. a per-frame, mostly speaker-independent
description of *which sound is being made*. Those weights cannot be shipped offline; pocketsphinx 5 ships an
English acoustic model (context-independent phone HMMs, 3 emitting states each, semi-continuous GMMs) and a
phone trigram model, so we decode with its "allphone" search and keep two things:

* the 1-best phone segmentation (phone loop + phone trigram): :func:`phone_labels`, one label per frame;
* the acoustic evidence per 10 ms frame: pocketsphinx writes every active senone's score to a log file when
  given ``senlogdir`` (the only place its Python API exposes them; the allphone search builds no lattice).
  With context-independent allphone decoding the active senones are the 3 states of each of the 42 phones
  of the model's ``mdef`` (fillers included). A phone's log-likelihood is its best state's; pocketsphinx
  stores ``-log_1.0001(likelihood) >> 10`` relative to the frame's best senone, converted back to natural
  log here. :func:`phone_posteriors` turns them into a distribution with a softmax at ``ACOUSTIC_SCALE``
  and averages the 10 ms distributions under a Gaussian window around each video frame (sigma =
  max(20 ms, 0.5 / fps)), like DeepSpeech's per-window character logits the papers feed their networks.

``ACOUSTIC_SCALE`` = 1.0 was calibrated once (temperature scaling): it minimises the cross-entropy of the
per-video-frame posteriors against the decoder's own 1-best labels on cnn_anchor_en_71s (1.35 nats at
1.0-1.5, 2.99 at 0.1, 1.71 at 8) and speech_en_60s (1.36 at 1.0, optimum 1.0-1.5). These are the
*acoustic model's* posteriors without the phone language model: noisier than the 1-best labels (their
argmax agrees with the 1-best label on ~58 % of the video frames of those clips, 46 % on German speech),
but soft where the sound is ambiguous.

Non-speech: pocketsphinx's fillers (``SIL``, ``+NSN+`` noise, ``+SPN+`` speech noise) are merged into our
``SIL`` (log-sum-exp of their likelihoods), and 10 ms frames quieter than ``SILENCE_DB`` are ``SIL`` in both
outputs, because the recogniser hallucinates phones on digital silence.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
WINDOW = 410  # samples of pocketsphinx's analysis window (its default wlen, 25.625 ms)
# Frame f analyses samples [160 f, 160 f + 410), centred 12.8 ms after f / 100 s: we give it the 10 ms cell
# [f / 100 + CELL_OFFSET_S, (f + 1) / 100 + CELL_OFFSET_S), centred on that centre.
CELL_OFFSET_S = (WINDOW / 2 / AUDIO_RATE) - HOP_S / 2
SILENCE_DB = -55.0  # dBFS of a 25 ms window below which there is no speech to recognise.
ACOUSTIC_SCALE = 1.0  # softmax temperature of the frame log-likelihoods (see the module docstring)
_SENSCR_TO_LN = 1024 * math.log(1.0001)  # senone score units (log base 1.0001, shifted right 10 bits) -> ln


@dataclass(frozen=True)
class PhoneSegment:
    phone: str  # one of PHONES
    start_s: float  # inclusive
    end_s: float  # exclusive


@dataclass(frozen=True)
class PhoneRecognition:
    segments: list[PhoneSegment]  # the 1-best segmentation, in seconds (frame cells, see CELL_OFFSET_S)
    # [F, len(PHONES)] float32: natural-log acoustic likelihood per 10 ms frame (cell f, see CELL_OFFSET_S),
    # relative to the frame's best senone; -inf for phones the search did not score in that frame.
    loglik: np.ndarray


def _model_path(sub: str) -> str:
    try:
        from pocketsphinx import get_model_path
    except ImportError:
        from talkinghead.errors import UserError

        raise UserError("phone recognition needs pocketsphinx: pip install 'talkinghead[prepare]'") from None
    return get_model_path(sub)


@lru_cache(maxsize=1)
def _ci_phone_map() -> tuple[np.ndarray, int]:
    """Index into PHONES of each context-independent phone of the acoustic model, and its number of states.

    Read from the binary ``mdef``: after its text description, 4-byte aligned, come ten int32 counts
    (n_ciphone, n_phone, n_emit_state, n_ci_sen, n_sen, ...) and the n_ciphone names, NUL-terminated. The
    senones of CI phone ``i`` are ``i * n_emit_state + state``.
    """
    raw = Path(_model_path("en-us/en-us/mdef")).read_bytes()
    start = raw.index(b"END FILE FORMAT DESCRIPTION\n") + len(b"END FILE FORMAT DESCRIPTION\n")
    start += -start % 4
    n_ci, _, n_state, n_ci_sen = (int(x) for x in np.frombuffer(raw, "<i4", 4, start))
    names = raw[start + 40:].split(b"\0", n_ci)[:n_ci]
    if n_ci_sen != n_ci * n_state or len(names) != n_ci:
        raise RuntimeError("unexpected pocketsphinx mdef layout: cannot map senones to phones")
    return np.array([_INDEX.get(n.decode(), SIL) for n in names]), n_state


def _read_senone_log(path: Path, n_ci_sen: int) -> np.ndarray:
    """Scores [F, n_ci_sen] (int units, lower = better, inf = inactive) of a pocketsphinx senone log file.

    Layout: a text header ending ``endhdr\\n``, a 4-byte byte-order mark, then per frame: int16 ``n`` active
    senones; when ``n`` is not the model's total, ``n`` uint8 deltas between successive active senone ids;
    then ``n`` int16 scores.
    """
    raw = path.read_bytes()
    pos = raw.index(b"endhdr\n") + len(b"endhdr\n")
    n_sen = int(raw[: pos].split(b"n_sen ")[1].split(b"\n")[0])
    pos += 4
    rows = []
    while pos + 2 <= len(raw):
        n = int(np.frombuffer(raw, "<i2", 1, pos)[0])
        pos += 2
        if n == n_sen:
            ids = np.arange(n)
        else:
            ids = np.cumsum(np.frombuffer(raw, "u1", n, pos))
            pos += n
        scores = np.frombuffer(raw, "<i2", n, pos)
        pos += 2 * n
        row = np.full(n_ci_sen, np.inf)
        keep = ids < n_ci_sen
        row[ids[keep]] = scores[keep]
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, n_ci_sen))


def _frame_db(wave: np.ndarray, hop: int, win: int, count: int) -> np.ndarray:
    """RMS dBFS [count] of ``win``-sample windows starting every ``hop`` samples (zero-padded)."""
    padded = np.pad(wave.astype(np.float64) ** 2, (0, win + count * hop))
    csum = np.concatenate([[0.0], np.cumsum(padded)])
    starts = np.arange(count) * hop
    power = (csum[starts + win] - csum[starts]) / win
    return 10.0 * np.log10(power + 1e-12)


class PhoneDecoder:
    """A pocketsphinx allphone decoder (and its senone log folder) kept for many utterances.

    Building one costs ~0.5 s, more than decoding a second of speech, so the live server's feature stream
    keeps one per session. Its cepstral mean carries over from one utterance to the next (pocketsphinx's
    live CMN), so a reused decoder's scores differ slightly from a fresh one's: :func:`recognize_phones`
    without a decoder builds a fresh one each call (what ``prepare`` and ``render`` do).
    """

    def __init__(self):
        from pocketsphinx import Decoder

        self.logdir = Path(tempfile.mkdtemp(prefix="talkinghead-senones-"))
        try:
            self.decoder = Decoder(allphone=_model_path("en-us/en-us-phone.lm.bin"), lm=None, loglevel="ERROR",
                                   senlogdir=str(self.logdir))
        except BaseException:
            self.close()
            raise

    def decode(self, pcm: bytes) -> tuple[list, np.ndarray]:
        """(1-best segments, senone scores [F, n_ci_sen]) of one utterance of 16-bit PCM."""
        ci_map, n_state = _ci_phone_map()
        d = self.decoder
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        segs = list(d.seg())
        logs = sorted(self.logdir.iterdir())
        n_ci_sen = len(ci_map) * n_state
        scores = _read_senone_log(logs[-1], n_ci_sen) if logs else np.zeros((0, n_ci_sen))
        for log in logs:
            log.unlink(missing_ok=True)
        return segs, scores

    def close(self) -> None:
        shutil.rmtree(self.logdir, ignore_errors=True)


def recognize_phones(wave: np.ndarray, decoder: PhoneDecoder | None = None) -> PhoneRecognition:
    """Phones of ``wave`` (float32 [S] at 16 kHz): 1-best segments and per-10 ms acoustic log-likelihoods.

    ``decoder``: reuse this one (see :class:`PhoneDecoder`) instead of building a fresh one."""
    n = int(np.ceil(len(wave) / (HOP_S * AUDIO_RATE)))
    ci_map, n_state = _ci_phone_map()
    labels = np.full(n, SIL, np.int64)
    loglik = np.full((n, len(PHONES)), -np.inf, np.float32)
    loglik[:, SIL] = 0.0
    if len(wave):
        pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        own = decoder is None
        dec = PhoneDecoder() if own else decoder
        try:
            segs, scores = dec.decode(pcm)
        finally:
            if own:
                dec.close()
        for seg in segs:
            if seg.word not in _FILLERS:
                labels[max(seg.start_frame, 0):min(seg.end_frame + 1, n)] = _INDEX.get(seg.word, SIL)
        ci = -_SENSCR_TO_LN * scores.reshape(len(scores), len(ci_map), n_state).min(axis=2)  # [F, n_ci]
        merged = np.full((len(ci), len(PHONES)), -np.inf)
        for j, p in enumerate(ci_map):  # fillers and SIL share the SIL column
            merged[:, p] = np.logaddexp(merged[:, p], ci[:, j])
        m = min(n, len(merged))
        scored = np.isfinite(merged[:m]).any(axis=1)
        loglik[:m][scored] = merged[:m][scored]
    quiet = _frame_db(wave, int(HOP_S * AUDIO_RATE), WINDOW, n) < SILENCE_DB
    labels[quiet] = SIL
    loglik[quiet] = -np.inf
    loglik[quiet, SIL] = 0.0
    # Run-length encode the labels into segments.
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change]) if n else np.zeros(0, np.int64)
    ends = np.concatenate([change, [n]]) if n else np.zeros(0, np.int64)
    segments = [PhoneSegment(PHONES[labels[s]], s * HOP_S + CELL_OFFSET_S, e * HOP_S + CELL_OFFSET_S)
                for s, e in zip(starts, ends)]
    return PhoneRecognition(segments, loglik)


def phone_posteriors(loglik: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """Phone distribution per video frame from 10 ms log-likelihoods [F, P]: float32 [num_frames, P].

    Each 10 ms row becomes softmax(ACOUSTIC_SCALE * loglik); video frame ``i`` (at ``i / fps``) averages the
    rows under a Gaussian window (sigma = max(20 ms, 0.5 / fps)) on their cell centres. Time beyond the rows
    counts as ``SIL``.
    """
    z = ACOUSTIC_SCALE * loglik.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    frame_post = np.exp(z)
    frame_post /= frame_post.sum(axis=1, keepdims=True)
    sigma = max(0.02, 0.5 / fps)
    radius = int(np.ceil(3 * sigma / HOP_S))
    n = max(len(frame_post), int(np.ceil(num_frames / fps / HOP_S)) + 1)
    pad = radius + 1  # the nearest cell of frame 0 is cell -1 (cells start CELL_OFFSET_S late)
    timeline = np.zeros((n + 2 * pad, len(PHONES)))
    timeline[:, SIL] = 1.0
    timeline[pad:pad + len(frame_post)] = frame_post
    # Gaussian weights of the 10 ms rows (cell centres (k + 0.5) * HOP_S + CELL_OFFSET_S) around each frame time.
    times = np.arange(num_frames) / fps
    nearest = np.floor((times - CELL_OFFSET_S) / HOP_S).astype(np.int64)
    idx = nearest[:, None] + np.arange(-radius, radius + 1)[None, :]  # [T, K] cell indices
    w = np.exp(-0.5 * (((idx + 0.5) * HOP_S + CELL_OFFSET_S - times[:, None]) / sigma) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    post = np.einsum("tk,tkp->tp", w, timeline[idx + pad])
    return (post / post.sum(axis=1, keepdims=True)).astype(np.float32)


def phone_labels(segments: list[PhoneSegment], fps: float, num_frames: int) -> np.ndarray:
    """The 1-best phone index at each video frame's time ``i / fps``: int64 [num_frames]."""
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
