"""Whisper features of a live stream, computed incrementally: every 20 ms row once, with a stated look-ahead.

Offline (:func:`talkinghead.audio.whisper.whisper_features`) encodes 30 s windows, each padded as Whisper pads.
A live caller cannot wait for a window to fill, and re-encoding a padded 30 s window for every new block costs
0.85 CPU-s a call (tiny.en, one core): 4 s per second of audio at a 0.2 s hop. Here each part of the encoder
runs once per row, in blocks of ``hop`` video frames:

1. **log-mel**, Whisper's own: 400-sample periodic Hann, hop 160, centred (reflect padding at the window's
   start), 80 mel bands of ``WhisperFeatureExtractor``, log10 with floor 1e-10. Mel frame ``j`` needs the
   window's samples up to ``160 j + 200``; it equals the extractor's frame (tested). Whisper then clamps a
   window's log-mel to 8 (80 dB) below the window's loudest frame: here the loudest frame *heard so far*.
   Rows computed before a louder frame arrives keep the lower floor; only frames 80 dB below the loudest are
   concerned (digital silence, not speech).
2. **the two convolutions** (kernel 3, the second with stride 2, GELU) and the position embedding: row ``n``
   needs mel frames up to ``2 n + 2``, samples up to ``320 n + 520`` (32.5 ms after the row's instant). Exact:
   hidden state 0 equals the offline one wherever the clamp floor agrees (tested).
3. **the transformer layers**, only as deep as the deepest hidden state the avatar reads (the default state 2:
   two of tiny.en's four layers). A block's rows attend to the cached keys/values of every earlier row of the
   window (computed once, when those rows were new), to each other, and to ``lookahead`` rows after the block
   (recomputed with the next block). Offline a row attends to its whole 30 s window, i.e. to 4-26 s of audio
   after it (and to the zero padding past a clip's end): this missing right context is the one approximation,
   measured in bench/bench_serve.py ("whisper_stream") and bounded in tests/test_whisper_stream.py. With a
   look-ahead reaching the end of the audio, the rows equal the offline ones (tested).

Windows are placed as offline: core ``k`` is ``[22 k, 22 (k + 1))`` s, its window starts 4 s before (the first at
0), so a frame sits at the position in its window the encoder's position embedding saw offline; a new window's
4 s of context rows (already heard) are computed as one block when the first frame of its core is due. One
deviation: offline a clip of at most 30 s is one window, so its frames past 22 s come from window 0; a live
stream of unknown length takes them from window 1, as a longer clip's would.

The look-ahead, stated: a video frame's row is final once the audio reaches ``lookahead`` frames after its
instant plus 32.5 ms (the convolutions) plus one 20 ms row when the frame falls between two rows (fps not
dividing 50), and it is emitted with the last frame of its block of ``hop`` frames.
:attr:`WhisperStream.delay_frames` is the worst case in frames.

:class:`LiveWhisperFeatures` adds the energy column of :meth:`AudioFeatures.stack` (frame energy exactly as
offline; its reference level, the utterance's median speech level, estimated causally: see there), giving the
rows a Whisper avatar consumes.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import torch

from talkinghead.audio.features import ENERGY_FLOOR_DB, ENERGY_RANGE, ENERGY_SCALE
from talkinghead.audio.whisper import CONTEXT_S, CORE_S, MEL_HOP, N_FFT, RATE, ROW_S, WINDOW_S, WhisperEncoder

ROW = int(ROW_S * RATE)  # 320 samples per encoder row
CONV_REACH = 2 * MEL_HOP + N_FFT // 2  # 520: samples past a row's instant its convolutions read
ROWS = int(WINDOW_S / ROW_S)  # 1500 positions
LEVEL_SPAN_DB = 30.0  # live speech frames: within 30 dB of the loudest frame heard ...
SPEECH_FLOOR_DB = -45.0  # ... and above -45 dBFS (room noise reaches -55..-50: it must not set the level)
PRIOR_LEVEL_DB = -25.0  # the level before any speech was heard (speech is -35..-15 dBFS RMS)


class WhisperStream:
    """Incremental Whisper hidden states ``layers`` at the video frames of a live 16 kHz stream (module docstring).

    ``push(samples)`` returns the frames' states that became final, float32 [k, len(layers), D] (k >= 0);
    ``flush()`` the rest at the end of the stream (audio after the last sample = zeros, as offline pads).
    Frame ``i`` is the instant ``i / fps`` with sample 0 at frame 0. Values are rounded to float16, as the
    offline features are stored.
    """

    def __init__(self, encoder: WhisperEncoder, layers: tuple[int, ...], fps: float, lookahead: int = 1,
                 hop: int = 1):
        if lookahead < 0 or hop < 1 or fps <= 0:
            raise ValueError("need lookahead >= 0, hop >= 1, fps > 0")
        if not layers or any(not 0 <= l <= encoder.num_layers for l in layers):
            raise ValueError(f"layers {layers}: the encoder has hidden states 0..{encoder.num_layers}")
        self.enc, self.layers, self.fps, self.hop = encoder, tuple(layers), float(fps), hop
        self.depth = max(self.layers)  # transformer layers to run
        self.lookahead = lookahead
        self.la_rows = math.ceil(lookahead / fps / ROW_S - 1e-9)  # rows of right context past a frame's rows
        m = encoder.model
        self.device = encoder.device
        self.filters = torch.as_tensor(encoder.filters, dtype=torch.float32, device=self.device)  # [201, 80]
        self.hann = torch.hann_window(N_FFT, device=self.device)
        self.conv1, self.conv2, self.pos = m.conv1, m.conv2, m.embed_positions.weight  # pos: [1500, D]
        self.blocks = list(m.layers[: self.depth])
        self.final_norm = m.layer_norm if self.depth == encoder.num_layers else None
        self.wave = np.zeros(0, np.float32)  # samples from self.wave0 (stream index) on
        self.wave0 = 0
        self.total = 0  # samples pushed
        self.emitted = 0  # frames emitted
        self.window = -1  # core index of the window in use
        self.compute_s = 0.0  # CPU seconds of the calling threads spent computing (for the stats)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------ timing

    @property
    def delay_frames(self) -> int:
        """Frames past a frame's instant until its row is out, at most: read off the same rule :meth:`push`
        follows (the samples a block needs), over the blocks of the first window's first 10 s."""
        worst = max(self._need(a, a + self.hop, 0) - a / self.fps * RATE for a in range(0, int(10 * self.fps), self.hop))
        return math.ceil(worst / RATE * self.fps - 1e-9)

    def _core(self, frame: int) -> int:
        return int(math.floor(frame / self.fps / CORE_S + 1e-9))

    def _start(self, core: int) -> int:
        """Stream sample where the window of ``core`` starts."""
        return int(round(max(0.0, core * CORE_S - CONTEXT_S) * RATE))

    def _block(self, a: int, b: int, w0: int) -> tuple[int, int]:
        """(last row the block of frames [a, b) computes, first row of the next block) in the window starting at
        stream sample ``w0``: the block's frames' rows, ``la_rows`` after them, the rows up to the next frame's."""
        _, _, last = self._rows_of(b - 1, w0)
        _, next_first, _ = self._rows_of(b, w0)
        return min(max(last + self.la_rows, next_first - 1), ROWS - 1), next_first

    def _need(self, a: int, b: int, w0: int) -> int:
        """Stream samples that must be in before the block of frames [a, b) is computed."""
        return w0 + self._block(a, b, w0)[0] * ROW + CONV_REACH

    def _rows_of(self, frame: int, w0: int) -> tuple[float, int, int]:
        """(row position, first row, last row) of ``frame`` in the window starting at stream sample ``w0``."""
        pos = (frame / self.fps - w0 / RATE) / ROW_S
        i0 = int(math.floor(pos + 1e-9))
        return pos, i0, i0 + (1 if pos - i0 > 1e-9 else 0)

    # ------------------------------------------------------------------------------ public

    def push(self, samples: np.ndarray) -> np.ndarray:
        with self.lock:
            x = np.asarray(samples, np.float32).reshape(-1)
            self.wave = np.concatenate([self.wave, x])
            self.total += x.size
            return self._run(final=False)

    def flush(self) -> np.ndarray:
        with self.lock:
            return self._run(final=True)

    # ------------------------------------------------------------------------------ the blocks

    def _run(self, final: bool) -> np.ndarray:
        end = max(1, math.ceil(self.total / RATE * self.fps - 1e-9)) if final else None  # frames of the stream
        out = []
        t = time.thread_time()
        while True:
            a = self.emitted
            if end is not None and a >= end:
                break
            core = self._core(a)
            b = a + self.hop  # a block never spans two cores
            b = min(b, math.ceil((core + 1) * CORE_S * self.fps - 1e-9))
            if end is not None:
                b = min(b, end)
            if core != self.window:
                self._open(core)
            upto, next_first = self._block(a, b, self.w0)  # this block computes rows [cached, upto]
            if not final and self._need(a, b, self.w0) > self.total:
                break  # its look-ahead is not in yet
            states = self._compute(upto, next_first)  # rows [cached, upto]; self.first = cached
            out.append(self._frames(states, a, b))
            self.emitted = b
        self.compute_s += time.thread_time() - t
        self._trim()
        if not out:
            return np.zeros((0, len(self.layers), self.enc.width), np.float32)
        return np.concatenate(out)

    def _open(self, core: int) -> None:
        """Start the window of ``core``: empty caches, rows from its start."""
        self.window, self.w0 = core, self._start(core)
        H = int(self.enc.model.config.encoder_attention_heads)
        self.keys = [torch.zeros(H, ROWS, self.enc.width // H, device=self.device) for _ in self.blocks]  # [H, 1500, hd]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.cached = 0  # rows whose keys/values are final
        self.mel = torch.zeros(self.filters.shape[1], 2 * ROWS, device=self.device)  # log10 mel, unclamped, [80, 3000]
        self.mel_done = 0
        self.loudest = -math.inf
        self.first = 0

    def _samples(self, a: int, b: int) -> np.ndarray:
        """Stream samples [a, b) (zeros past the end of what was pushed; a >= wave0)."""
        seg = self.wave[max(0, a - self.wave0): max(0, b - self.wave0)]
        return np.pad(seg, (0, (b - a) - seg.size))

    def _mel_upto(self, frames: int) -> None:
        """Compute mel frames [mel_done, frames) of the window."""
        j0, j1 = self.mel_done, frames
        if j1 <= j0:
            return
        lo, hi = self.w0 + MEL_HOP * j0 - N_FFT // 2, self.w0 + MEL_HOP * (j1 - 1) + N_FFT // 2
        if j0 == 0:  # centred STFT: reflect padding at the window's start, as torch.stft(center=True)
            seg = np.pad(self._samples(self.w0, hi), (N_FFT // 2, 0), mode="reflect")
        else:
            seg = self._samples(lo, hi)
        spec = torch.stft(torch.from_numpy(np.ascontiguousarray(seg)).to(self.device), N_FFT, MEL_HOP,
                          window=self.hann, center=False, return_complex=True)  # [201, j1 - j0]
        mel = self.filters.T @ (spec.abs() ** 2)
        self.mel[:, j0:j1] = torch.clamp(mel, min=1e-10).log10()
        self.loudest = max(self.loudest, float(self.mel[:, j0:j1].max()))
        self.mel_done = j1

    def _embed(self, r0: int, r1: int) -> torch.Tensor:
        """Hidden state 0 of rows [r0, r1): convolutions over the clamped, scaled log-mel + positions: [r1 - r0, D]."""
        import torch.nn.functional as F

        self._mel_upto(min(2 * r1 + 1, 2 * ROWS))
        lo = 2 * r0 - 2  # conv2 row n reads conv1 rows 2n-1..2n+1, each mel frames j-1..j+1
        x = self.mel[:, max(0, lo): 2 * r1 + 1]
        x = (torch.clamp(x, min=self.loudest - 8.0) + 4.0) / 4.0  # Whisper's clamp and scaling
        x = F.pad(x, (max(0, -lo), max(0, 2 * r1 + 1 - 2 * ROWS)))  # conv1's zero padding at the window's ends
        c1 = F.gelu(F.conv1d(x[None], self.conv1.weight, self.conv1.bias))  # conv1 rows 2 r0 - 1 .. 2 r1 - 1
        if r0 == 0:  # conv2's zero padding before conv1 row 0 (not conv1 of padding)
            c1[..., 0] = 0.0
        c2 = F.gelu(F.conv1d(c1, self.conv2.weight, self.conv2.bias, stride=2))  # [1, D, r1 - r0]
        return c2[0].T + self.pos[r0:r1]

    def _compute(self, upto: int, keep: int) -> torch.Tensor:
        """Rows [cached, upto] through the layers; keys/values of rows < ``keep`` become final.
        Returns their hidden states [n, S, D] (S = depth + 1 states, the last after the final LayerNorm if the
        whole encoder runs); ``self.first`` is the window row of their row 0."""
        import torch.nn.functional as F

        c0 = self.cached
        with torch.inference_mode():
            h = self._embed(c0, upto + 1)  # [n, D]
            states = [h]
            for i, blk in enumerate(self.blocks):
                att = blk.self_attn
                H, hd = att.num_heads, att.head_dim
                x = blk.self_attn_layer_norm(h)
                q = att.q_proj(x).view(-1, H, hd).transpose(0, 1)
                k = att.k_proj(x).view(-1, H, hd).transpose(0, 1)
                v = att.v_proj(x).view(-1, H, hd).transpose(0, 1)
                K = torch.cat([self.keys[i][:, :c0], k], dim=1)
                V = torch.cat([self.values[i][:, :c0], v], dim=1)
                a = F.scaled_dot_product_attention(q[None], K[None], V[None], scale=att.scaling)[0]
                h = h + att.out_proj(a.transpose(0, 1).reshape(-1, H * hd))
                x = blk.final_layer_norm(h)
                h = h + blk.fc2(blk.activation_fn(blk.fc1(x)))
                n_keep = max(0, keep - c0)
                self.keys[i][:, c0:c0 + n_keep] = k[:, :n_keep]
                self.values[i][:, c0:c0 + n_keep] = v[:, :n_keep]
                states.append(h)
            if self.final_norm is not None:
                states[-1] = self.final_norm(states[-1])
            self.cached = max(c0, keep)
            self.first = c0
            return torch.stack([states[l] for l in self.layers], dim=1)  # [n, len(layers), D]

    def _frames(self, states: torch.Tensor, a: int, b: int) -> np.ndarray:
        """States of frames [a, b): rows linearly interpolated at the frames' instants, rounded to float16."""
        rows = []
        for f in range(a, b):
            pos, i0, i1 = self._rows_of(f, self.w0)
            w = pos - i0
            r = states[i0 - self.first] * (1 - w) + states[i1 - self.first] * w
            rows.append(r)
        return torch.stack(rows).to(torch.float16).float().cpu().numpy()

    def _trim(self) -> None:
        """Keep only the samples a later mel frame or window can still read."""
        if self.window < 0:
            return
        keep = min(self._start(self.window + 1), self.w0 + MEL_HOP * self.mel_done - N_FFT // 2)
        keep = max(keep, self.wave0)
        self.wave = self.wave[keep - self.wave0:]
        self.wave0 = keep


class LiveWhisperFeatures:
    """The rows of :meth:`AudioFeatures.stack` for a Whisper dataset, for a live stream: ``[hidden state l for l
    in layers | relative energy]`` float32 [k, D], with push / flush / compute_s / delay_frames as
    :class:`talkinghead.methods.streaming.FeatureStream`.

    Energy is offline's (RMS in dBFS of the samples within ``i / fps`` +- half a frame; needs half a frame of
    look-ahead, inside the stream's). Its reference level offline is the median energy of the frames the phone
    recogniser calls speech, over the whole utterance. Live, without running pocketsphinx: the median over the
    last ``history_s`` of the frames within 30 dB of the loudest frame heard and above -45 dBFS, at the time a
    row is emitted; -25 dBFS until 3 such frames were heard (a mic opens on room noise: offline, noise frames
    sit far below the level; taking noise for speech would open the mouth). Measured against offline's level
    on the four prepared clips (cnn, hdtf, lowres, may): within 1.9 dB over the whole clips, 2.5 dB over the
    first 5 s, 3.1 dB over the first 2 s, 5.5 dB over the first second (0.28 in the column's units of 20 dB).
    """

    def __init__(self, encoder: WhisperEncoder, layers: tuple[int, ...], fps: float, lookahead: int = 1,
                 hop: int = 1, history_s: float = 60.0):
        self.states = WhisperStream(encoder, layers, fps, lookahead, hop)
        self.fps, self.lookahead, self.hop = float(fps), lookahead, hop
        self.history = max(1, int(history_s * fps))
        self.energy = np.zeros(0, np.float32)  # dBFS of the last `history` frames emitted
        self.frames = 0  # frames emitted
        self.wave = np.zeros(0, np.float32)  # samples from wave0 on: what the next frames' energy reads
        self.wave0 = 0
        self.lock = threading.Lock()

    @property
    def delay_frames(self) -> int:
        return self.states.delay_frames

    @property
    def compute_s(self) -> float:
        return self.states.compute_s

    def _energies(self, a: int, b: int) -> np.ndarray:
        """dBFS of frames [a, b) as features.compute_audio_features' box average (zeros past the stream's end)."""
        half = 0.5 / self.fps
        out = np.empty(b - a, np.float32)
        for j, i in enumerate(range(a, b)):
            t = i / self.fps
            lo = max(0, int(np.ceil((t - half) * RATE - 1e-9)))
            hi = max(int(np.floor((t + half) * RATE - 1e-9)) + 1, lo + 1)
            seg = self.wave[max(0, lo - self.wave0): max(0, hi - self.wave0)].astype(np.float64)
            p = float((seg ** 2).sum()) / (hi - lo)
            out[j] = max(10.0 * math.log10(p + 1e-12), ENERGY_FLOOR_DB)
        return out

    def _level(self) -> float:
        e = self.energy
        speech = e > max(SPEECH_FLOOR_DB, float(e.max()) - LEVEL_SPAN_DB)
        return float(np.median(e[speech])) if speech.sum() >= 3 else PRIOR_LEVEL_DB

    def _rows(self, states: np.ndarray) -> np.ndarray:
        k = states.shape[0]
        if k == 0:
            return np.zeros((0, states.shape[1] * states.shape[2] + 1), np.float32)
        a = self.frames
        new = self._energies(a, a + k)
        self.frames += k
        keep = max(self.wave0, int(np.ceil((self.frames - 0.5) / self.fps * RATE - 1e-9)))  # the next box's start
        self.wave, self.wave0 = self.wave[keep - self.wave0:], keep
        self.energy = np.concatenate([self.energy, new])[-self.history:]
        rel = np.clip((new - self._level()) / ENERGY_SCALE, *ENERGY_RANGE)
        return np.concatenate([states.reshape(k, -1), rel[:, None]], axis=1).astype(np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        with self.lock:
            x = np.asarray(samples, np.float32).reshape(-1)
            self.wave = np.concatenate([self.wave, x])
            return self._rows(self.states.push(x))

    def flush(self) -> np.ndarray:
        with self.lock:
            return self._rows(self.states.flush())
