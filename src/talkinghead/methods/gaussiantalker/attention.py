"""Condition tokens and the spatial-audio cross-attention (GaussianTalker sec. 4.3.1-4.3.2, eqs. 10-13).

Tokens, each of the attention width d:

* audio a_n -- :class:`talkinghead.nn.audio.AudioEncoder` (shared with DEGSTalk): a window [2R+1, D] of
  per-frame audio features around frame n pooled with attention over the frames. The paper feeds
  DeepSpeech/wav2vec features; ours are the dataset's per-frame features.
* eye e_n -- :func:`blink_encoding`: sinusoidal encoding of the blink value of each eye (the paper uses
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
from torch import Tensor, nn


def blink_encoding(blink: Tensor, num_freqs: int = 6) -> Tensor:
    """Sinusoidal encoding [..., 2 * 2 * num_freqs] of blink values [..., 2] in [0, 1]."""
    freqs = (2.0 ** torch.arange(num_freqs, dtype=blink.dtype, device=blink.device)) * math.pi
    x = blink[..., None] * freqs  # [..., 2, F]
    return torch.cat([torch.sin(x), torch.cos(x)], -1).flatten(-2)


class ViewpointEncoder(nn.Module):
    """Camera pose viewmat [4, 4] -> [d]: a small MLP of the rotation (9) and translation (3)."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, hidden), nn.LeakyReLU(0.02), nn.Linear(hidden, dim))

    def forward(self, viewmat: Tensor) -> Tensor:
        return self.mlp(viewmat[..., :3, :4].reshape(*viewmat.shape[:-2], 12))


class CrossAttentionBlock(nn.Module):
    """One block: z' = CA(LN(z), tokens) + z;  z = FFN(LN(z')) + z'."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_f = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, z: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """z: [N, d] queries, tokens: [M, d] -> (z [N, d], attention weights [N, M])."""
        q = self.norm_q(z)[None]
        a, w = self.attn(q, tokens[None], tokens[None], need_weights=True)
        z = z + a[0]
        z = z + self.ffn(self.norm_f(z))
        return z, w[0]


class SpatialAudioAttention(nn.Module):
    """Eqs. 10-13: L cross-attention blocks from per-Gaussian features to the condition tokens."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(layers))

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """features [N, d] (f(mu_c)), tokens [M, d] -> (z^L [N, d], last layer's attention [N, M])."""
        z, w = features, None
        for block in self.blocks:
            z, w = block(z, tokens)
        return z, w
