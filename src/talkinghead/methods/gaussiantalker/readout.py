"""GaussianTalker's speech readout: a closed-form linear map audio window -> speech coefficients, as a token input.

A deviation from the paper (model.py's docstring says why): the audio token a_n of eq. 13 is the audio
encoder's output plus a learned projection of ``p [E]``, the person's expression coefficients normalised by
their training std, of which the speech-related ones (:func:`talkinghead.methods.speech_prior.speech_components`)
are read off the window's rows t-r..t+r by a ridge map fitted on the training frames in closed form
(:func:`talkinghead.methods.speech_prior.fit_linear_prior`, strength by blocked CV), then frozen; the others
are 0 (audio does not predict blinks or brows, and they would set the map's strength). ``p`` spans all E
coefficients so that every shape is known from the config and the dataset's sizes (an avatar loads, and a
run resumes, into a model built before any data is read). The
projection starts at zero, so training starts from the paper's token. In training ``p`` is the map's
out-of-fold prediction of the frame (each block's from the map fitted on the other blocks), stored per frame
(``oof [num_frames, S]``, NaN outside the training split); rendering reads it from the window.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from talkinghead.methods.speech_prior import fit_linear_prior, speech_components


class SpeechReadout(nn.Module):
    """p [.., E] -> token term [.., d]; ``predict`` reads p off a window [.., 2R+1, D]."""

    def __init__(self, radius: int, audio_dim: int, dim: int, num_frames: int, expression_dim: int):
        super().__init__()
        self.radius = radius
        K = (2 * radius + 1) * audio_dim + 1
        self.register_buffer("weight", torch.zeros(K, expression_dim))  # ridge map [K, E], last row the constant
        self.register_buffer("audio_mean", torch.zeros(audio_dim))
        self.register_buffer("audio_std", torch.ones(audio_dim))
        self.register_buffer("expression_std", torch.ones(expression_dim))  # p's unit per coefficient [E]
        # out-of-fold predictions of the training frames [num_frames, E] (NaN elsewhere): training inputs only,
        # saved so that a resumed run trains on the same inputs
        self.register_buffer("oof", torch.full((num_frames, expression_dim), float("nan")))
        self.proj = nn.Linear(expression_dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def inputs(self, window: Tensor) -> Tensor:
        """[.., 2R+1, D] -> [.., K]: the normalised centre rows t-r..t+r side by side and a constant 1."""
        c = window.shape[-2] // 2
        rows = (window[..., c - self.radius:c + self.radius + 1, :] - self.audio_mean) / self.audio_std
        flat = rows.flatten(-2)
        return torch.cat([flat, torch.ones_like(flat[..., :1])], -1)

    def predict(self, window: Tensor) -> Tensor:
        """Normalised coefficients p [.., E] of the window's centre frame (the frozen map)."""
        return self.inputs(window) @ self.weight

    def training_input(self, index: int, window: Tensor) -> Tensor:
        """p [E] for training frame ``index``: its out-of-fold prediction (the map's own where it has none)."""
        if 0 <= index < len(self.oof) and not bool(torch.isnan(self.oof[index]).any()):
            return self.oof[index]
        return self.predict(window)

    def forward(self, p: Tensor) -> Tensor:
        return self.proj(p)


def fit_speech_readout(out: SpeechReadout, windows: Tensor, expression: np.ndarray, train: np.ndarray,
                       neutral: np.ndarray, basis: np.ndarray, lambdas,
                       min_share: float = 0.75, max_count: int = 12) -> SpeechReadout:
    """``out`` fitted on the training frames ``train`` [T] (indices into the dataset's frames): their audio
    windows [T, 2R+1, D] and tracked expression [T, E]; the face model's neutral [V, 3] / basis [E, V, 3]."""
    idx = speech_components(neutral, basis, min_share, max_count)
    std = np.maximum(np.asarray(expression, np.float64).std(0), 1e-6)
    y = np.asarray(expression, np.float64)[:, idx] / std[idx]
    centre = windows[:, windows.shape[1] // 2]  # each frame's own row [T, D]
    out.audio_mean.copy_(centre.mean(0))
    out.audio_std.copy_(centre.std(0).clamp_min(1e-3))
    out.expression_std.copy_(torch.from_numpy(std).float())
    with torch.no_grad():
        z = out.inputs(windows).double().numpy()
    w, _, held_out = fit_linear_prior(z, y, lambdas)
    out.weight.zero_()
    out.weight[:, torch.from_numpy(idx)] = torch.from_numpy(w).float()
    oof = torch.zeros(len(train), out.weight.shape[1])
    oof[:, torch.from_numpy(idx)] = torch.from_numpy(held_out).float()
    out.oof[torch.as_tensor(train)] = oof
    return out
