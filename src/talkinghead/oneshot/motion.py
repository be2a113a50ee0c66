"""Audio-synchronised motion (paper 003 sec. III-A, III-C1) and the motion encoder (sec. III-B1).

* :class:`MotionGenerator` G_m: "a stack of several transformer encoder layers" over the audio features in
  windows ``a'_i = a_{i-δa : i+δa}`` (δa = 2) -> expression coefficients of the shared space
  (:mod:`.expression`) per frame. Deviation: the audio encoder is the project's per-frame features
  (pocketsphinx phone posteriors + log-mel + energy, or wav2vec 2.0 columns when the datasets carry them),
  not a wav2vec 2.0 we cannot load offline by default.
* :class:`LipReader`: SelfTalk's lip-reading module: lip vertices of the meshes rebuilt from the coefficients
  -> latent features ``Ŝ^latent`` (matched to the audio features, L_lat) and phone log-probabilities
  ``Ŝ^text`` (CTC, L_ctc). Deviation: pocketsphinx's phone sequence of the clip stands in for wav2vec 2.0's
  text tokens (:func:`ctc_targets`); the audio features stand in for wav2vec's latents.
* :func:`motion_loss`: eq. 1, ``L = L_lat + 0.1 L_ctc + 10 L_MSE``. The lip reader is trained by the same
  two terms on the *tracked* lips too (it needs to read real lips before it can judge predicted ones).
* :class:`MotionEncoder` E_m: 1-D convolutions + residual blocks over δm = 11 neighbouring coefficient
  frames -> motion code z_m.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SILENCE = "SIL"


def frame_windows(x: Tensor, radius: int) -> Tensor:
    """[B, T, D] -> [B, T, (2r+1) D]: each frame with its r neighbours on each side (edges repeated)."""
    if radius == 0:
        return x
    padded = torch.cat([x[:, :1].expand(-1, radius, -1), x, x[:, -1:].expand(-1, radius, -1)], 1)
    win = padded.unfold(1, 2 * radius + 1, 1)  # [B, T, D, 2r+1]
    return win.permute(0, 1, 3, 2).reshape(x.shape[0], x.shape[1], -1)


def sinusoidal(length: int, dim: int) -> Tensor:
    """[length, dim] fixed positional encoding (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class MotionGenerator(nn.Module):
    """G_m: audio features [B, T, D] -> coefficients [B, T, K] (module docstring)."""

    def __init__(self, audio_dim: int, num_coefficients: int, d_model: int = 128, layers: int = 3, heads: int = 4,
                 window: int = 2, dropout: float = 0.0):
        super().__init__()
        self.window = window
        self.inp = nn.Linear(audio_dim * (2 * window + 1), d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, num_coefficients)

    def forward(self, audio: Tensor) -> Tensor:
        h = self.inp(frame_windows(audio, self.window))
        h = h + sinusoidal(h.shape[1], h.shape[2]).to(h)
        return self.out(self.encoder(h))


class LipReader(nn.Module):
    """Lip vertex displacements [B, T, L, 3] -> (latent [B, T, D_lat], phone log-probs [B, T, C])."""

    def __init__(self, num_lip_vertices: int, latent_dim: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(num_lip_vertices * 3, hidden, 5, padding=2), nn.GELU(),
            nn.Conv1d(hidden, hidden, 5, padding=2), nn.GELU(),
            nn.Conv1d(hidden, hidden, 5, padding=2), nn.GELU())
        self.latent = nn.Linear(hidden, latent_dim)
        self.text = nn.Linear(hidden, num_classes)

    def forward(self, lips: Tensor) -> tuple[Tensor, Tensor]:
        x = lips.flatten(2) * 100.0  # metres -> centimetres: unit-scale inputs
        h = self.net(x.transpose(1, 2)).transpose(1, 2)
        return self.latent(h), F.log_softmax(self.text(h), dim=-1)


def ctc_targets(phone_ids: np.ndarray, phone_names: list[str]) -> list[int]:
    """The phone sequence of a stretch of frames as CTC labels: runs collapsed, silence dropped, phone j -> j+1
    (0 is CTC's blank)."""
    sil = phone_names.index(SILENCE) if SILENCE in phone_names else -1
    out, last = [], None
    for p in np.asarray(phone_ids).tolist():
        if p != last and p != sil:
            out.append(int(p) + 1)
        last = p
    return out


def motion_loss(pred: Tensor, target: Tensor, lips_pred: Tensor, lips_true: Tensor, audio: Tensor,
                reader: LipReader, targets: list[list[int]], weights: dict[str, float]) -> tuple[Tensor, dict]:
    """Eq. 1 on a batch of clips' stretches.

    pred, target: [B, T, K] coefficients; lips_*: [B, T, L, 3] lip displacements of the predicted / tracked
    meshes; audio: [B, T, D] the audio features (L_lat's pseudo-truth); targets: B CTC label lists.
    weights: ``mse`` (10), ``ctc`` (0.1), ``lat`` (1). Returns (loss, figures).
    """
    mse = F.mse_loss(pred, target)
    logs = {"coef_mse": mse.item()}
    total = weights["mse"] * mse
    T = pred.shape[1]
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    flat = torch.tensor([p for t in targets for p in t], dtype=torch.long)
    inp_len = torch.full((pred.shape[0],), T, dtype=torch.long)
    for name, lips in (("pred", lips_pred), ("true", lips_true)):
        latent, logp = reader(lips)
        lat = F.mse_loss(latent, audio)
        ctc = F.ctc_loss(logp.transpose(0, 1), flat, inp_len, lengths, blank=0, reduction="mean",
                         zero_infinity=True) if int(lengths.sum()) else logp.sum() * 0
        total = total + weights["lat"] * lat + weights["ctc"] * ctc
        logs[f"lat_{name}"], logs[f"ctc_{name}"] = lat.item(), ctc.item()
    logs["motion_loss"] = total.item()
    return total, logs


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.net(x), 0.2)


class MotionEncoder(nn.Module):
    """E_m: coefficient windows [B, δm, K] -> motion code [B, Z].

    The paper's δm = 11 is the window length: the frame and 5 neighbours on each side."""

    def __init__(self, num_coefficients: int, code_dim: int = 64, window: int = 11, hidden: int = 128,
                 blocks: int = 2):
        super().__init__()
        self.window = window
        self.conv = nn.Sequential(
            nn.Conv1d(num_coefficients, hidden, 3), nn.LeakyReLU(0.2),
            nn.Conv1d(hidden, hidden, 3), nn.LeakyReLU(0.2))
        self.proj = nn.Linear(hidden * (window - 4), hidden)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(blocks)])
        self.out = nn.Linear(hidden, code_dim)

    def forward(self, window: Tensor) -> Tensor:
        h = self.conv(window.transpose(1, 2)).flatten(1)
        return self.out(self.blocks(F.leaky_relu(self.proj(h), 0.2)))


def coefficient_windows(coefs: Tensor, window: int) -> Tensor:
    """[T, K] -> [T, window, K]: each frame's δm-frame neighbourhood (edges repeated), E_m's input."""
    return frame_windows(coefs[None], window // 2)[0].view(coefs.shape[0], window, coefs.shape[1])
