"""The audio-window encoder: a window [2R+1, D] of per-frame audio features -> one audio feature vector.

Each frame is projected by an MLP, then 1-D convolutions run along time, then a learned softmax weighting
of the frames (attention over the neighbours) pools the window: the temporal smoothing of AD-NeRF's /
ER-NeRF's audio attention net, which GaussianTalker (a_n, sec. 4.3.1) and TalkingGaussian / DEGSTalk (f_a)
reuse. The papers feed DeepSpeech/wav2vec features; ours are the dataset's per-frame features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AudioEncoder(nn.Module):
    """[2R+1, D] (or [B, 2R+1, D]) window of audio features -> [d] (or [B, d]) audio feature."""

    def __init__(self, in_dim: int, dim: int, hidden: int = 64):
        super().__init__()
        self.frame = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.02), nn.Linear(hidden, dim))
        self.temporal = nn.Sequential(
            nn.Conv1d(dim, dim, 3, padding=1), nn.LeakyReLU(0.02), nn.Conv1d(dim, dim, 3, padding=1))
        self.score = nn.Sequential(nn.Conv1d(dim, 16, 3, padding=1), nn.LeakyReLU(0.02), nn.Conv1d(16, 1, 3, padding=1))

    def forward(self, window: Tensor) -> Tensor:
        single = window.dim() == 2
        x = window[None] if single else window  # [B, T, D]
        h = self.frame(x).transpose(1, 2)  # [B, d, T]
        h = h + self.temporal(h)
        w = torch.softmax(self.score(h), dim=-1)  # [B, 1, T]: how much each neighbouring frame counts
        out = (h * w).sum(-1)  # [B, d]
        return out[0] if single else out
