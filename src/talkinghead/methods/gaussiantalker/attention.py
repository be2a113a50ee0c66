"""Condition tokens and the spatial-audio cross-attention (GaussianTalker sec. 4.3.1-4.3.2, eqs. 10-13).

Tokens, each of the attention width d:

* audio a_n -- :class:`talkinghead.nn.audio.AudioEncoder` (shared with DEGSTalk): a window [2R+1, D] of
  per-frame audio features around frame n pooled with attention over the frames. The paper feeds
  DeepSpeech/wav2vec features; ours are the dataset's per-frame features: by default a pretrained speech
  encoder's too (Whisper tiny.en hidden states + energy, :mod:`talkinghead.audio.whisper`), phone posteriors +
  log-mel + energy with ``prepare --audio-encoder none``; + wav2vec where present.
* eye e_n -- :func:`talkinghead.nn.encoding.blink_encoding`: sinusoidal encoding of the blink value of each eye (the paper uses
  AU45), then a linear map to d (the paper only says the encoding is sized "to match the input dimensions").
* viewpoint v_n -- :class:`ViewpointEncoder`: a small MLP of the camera pose (rotation + translation).
* null -- one learned vector shared by all frames.

:class:`SpatialAudioAttention`: L blocks of z' = CA(z, tokens) + z (eq. 11/13) and z = FFN(z') + z' (eq. 12),
queries = the Gaussians' triplane features z^0 = f(mu_c) (eq. 10). Deviation: a LayerNorm before the
attention and the FFN (pre-norm transformer), for stable training from scratch at our short schedules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ViewpointEncoder(nn.Module):
    """Camera pose viewmat [4, 4] -> [d]: a small MLP of the rotation (9) and translation (3)."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, hidden), nn.LeakyReLU(0.02), nn.Linear(hidden, dim))

    def forward(self, viewmat: Tensor) -> Tensor:
        return self.mlp(viewmat[..., :3, :4].reshape(*viewmat.shape[:-2], 12))


class CrossAttentionBlock(nn.Module):
    """One block: z' = CA(LN(z), tokens) + z;  z = FFN(LN(z')) + z'.

    The cross-attention has ``nn.MultiheadAttention``'s parameters (and checkpoints) but is evaluated with the
    keys and values folded into the query and output projections: with M = 4 tokens, head h's scores are
    LN(z) (W_q,h^T k_h,m) / sqrt(d_h) + b_q,h . k_h,m / sqrt(d_h), and its output through W_o is
    sum_m w_h,m (W_o,h v_h,m). So each Gaussian costs a [d, H M] and an [H M, d] product instead of two
    [d, d] ones plus per-head products: the same function, ~3x fewer operations (eqs. 10-11 unchanged).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_f = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def cross_attention(self, q: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """q: [..., N, d] normalised queries, tokens: [..., M, d] -> (output [..., N, d], weights [..., N, M, H])."""
        attn = self.attn
        h = attn.num_heads
        d = q.shape[-1]
        dh = d // h
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        k = F.linear(tokens, w_k, b_k).unflatten(-1, (h, dh))  # [..., M, H, dh]
        v = F.linear(tokens, w_v, b_v).unflatten(-1, (h, dh))
        scale = 1.0 / math.sqrt(dh)
        fold_q = torch.einsum("...mhe,hei->...imh", k, w_q.view(h, dh, d)) * scale  # [..., d, M, H]
        bias_q = torch.einsum("...mhe,he->...mh", k, b_q.view(h, dh)) * scale  # [..., M, H]
        fold_o = torch.einsum("...mhe,ohe->...mho", v, attn.out_proj.weight.view(d, h, dh))  # [..., M, H, d]
        if q.dim() == 2 and tokens.dim() == 2:
            # One frame: scores laid out [M, H, N] (Gaussians innermost), each bias added inside its product
            # (addmm), the softmax over the tokens' axis 0 of a [M, H N] view: torch's softmax over an axis of 4
            # with 4 heads inside cost ~0.5 ms per 5000 x 16 scores on a CPU, over a leading one ~0.1 ms.
            M = bias_q.shape[0]
            scores = torch.addmm(bias_q.flatten()[:, None], fold_q.flatten(-2).T, q.T)  # [M H, N]
            w = torch.softmax(scores.view(M, -1), dim=0).view_as(scores)
            out = torch.addmm(attn.out_proj.bias, w.T, fold_o.flatten(-3, -2))
            return out, w.view(M, h, -1).permute(2, 0, 1)  # weights [N, M, H] (a view)
        # Frames in a batch: scores [..., N, M, H] (token-major), softmax over the tokens' axis -2.
        scores = (q @ fold_q.flatten(-2)).unflatten(-1, bias_q.shape[-2:]) + bias_q.unsqueeze(-3)
        w = torch.softmax(scores, dim=-2)  # [..., N, M, H]
        return w.flatten(-2) @ fold_o.flatten(-3, -2) + attn.out_proj.bias, w

    def forward(self, z: Tensor, tokens: Tensor, q: Tensor | None = None,
                weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """z: [..., N, d] queries, tokens: [..., M, d] -> (z [..., N, d], head-averaged attention [..., N, M], or
        None without ``weights``). ``q``: LN(z) when the caller has it (a renderer keeps the first block's: its
        z = f(mu_c) does not depend on the frame)."""
        a, w = self.cross_attention(self.norm_q(z) if q is None else q, tokens)
        z = z + a
        z = z + self.ffn(self.norm_f(z))
        return z, w.mean(-1) if weights else None


class SpatialAudioAttention(nn.Module):
    """Eqs. 10-13: L cross-attention blocks from per-Gaussian features to the condition tokens."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(layers))

    def forward(self, features: Tensor, tokens: Tensor, first_query: Tensor | None = None,
                weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """features [..., N, d] (f(mu_c)), tokens [..., M, d] -> (z^L [..., N, d], last layer's attention
        [..., N, M], None without ``weights``); leading axes (a batch of frames) broadcast. ``first_query``:
        the first block's LN(features), when kept (:meth:`GaussianTalker.render`)."""
        z, w = features, None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            z, w = block(z, tokens, q=first_query if i == 0 else None, weights=weights and i == last)
        return z, w
