"""Fixed input encodings that more than one method's conditioning uses."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def blink_encoding(blink: Tensor, num_freqs: int = 6) -> Tensor:
    """Sinusoidal encoding [..., 2 * 2 * num_freqs] of blink values [..., 2] in [0, 1] (GaussianTalker's eye
    token input; Talk3D's t_eye)."""
    freqs = (2.0 ** torch.arange(num_freqs, dtype=blink.dtype, device=blink.device)) * math.pi
    x = blink[..., None] * freqs  # [..., 2, F]
    return torch.cat([torch.sin(x), torch.cos(x)], -1).flatten(-2)
