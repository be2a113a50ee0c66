"""The emotion-aware identity encoder ``E_id(I | e) = M_e(E_id(I) + w̄_id | e)`` (paper 003 sec. III-B2).

* :class:`IdentityEncoder` E_id: a feature pyramid network over the reference image (bottom-up strided
  convolutions, top-down path with lateral 1x1 connections) gives three hierarchical feature maps (coarse,
  mid, fine); a small map-to-code head per level ("a simple, intermediate mapping layer") turns each into
  one part of the identity code, so ``w_id`` is [B, 3, W]: one W-vector per level, each steering its own
  group of synthesis layers (as pSp's coarse / medium / fine styles).
* ``mean_code`` w̄_id [3, W]: the paper's "average identity code of the pre-trained generator". Deviation:
  there is no pre-trained PV3D generator here, so w̄_id is a learned parameter trained with the generator
  (E_id learns offsets from it, as in the paper).
* :class:`EmotionMapper` M_e: multi-level: for every level and every emotion label a residual MLP on that
  level's code; the outputs are summed with the label weights (one-hot for one label, any mix otherwise).
  Its last layers start at zero, so an untrained mapper is the identity map and "neutral" (weight 0 on
  every emotion) always leaves the code as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 3


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2))


class _MapToCode(nn.Module):
    """Feature map [B, C, h, w] -> code [B, W]: strided convolutions down to 2x2, then a linear layer."""

    def __init__(self, channels: int, size: int, code_dim: int):
        super().__init__()
        layers = []
        while size > 2:
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            size //= 2
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * size * size, code_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x).flatten(1))


class IdentityEncoder(nn.Module):
    """Reference image [B, 3, S, S] in [0, 1] -> identity code offset [B, 3, W] (add ``mean_code``)."""

    def __init__(self, image_size: int, code_dim: int, channels: tuple[int, ...] = (32, 64, 128, 128),
                 fpn_channels: int = 64):
        super().__init__()
        self.image_size = image_size
        ch = [3, *channels]
        self.down = nn.ModuleList(_block(ch[i], ch[i + 1]) for i in range(len(channels)))
        # The three deepest bottom-up maps feed the pyramid (coarse = deepest).
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in channels[-LEVELS:])
        sizes = [image_size // 2 ** (len(channels) - k) for k in range(LEVELS)]  # coarse .. fine
        self.heads = nn.ModuleList(_MapToCode(fpn_channels, s, code_dim) for s in sizes)
        self.mean_code = nn.Parameter(torch.zeros(LEVELS, code_dim))

    def forward(self, image: Tensor) -> Tensor:
        x = image * 2 - 1
        feats = []
        for block in self.down:
            x = block(x)
            feats.append(x)
        bottom_up = feats[-LEVELS:]  # fine .. coarse
        top = self.lateral[-1](bottom_up[-1])
        pyramid = [top]
        for k in range(LEVELS - 2, -1, -1):
            top = F.interpolate(top, scale_factor=2, mode="nearest") + self.lateral[k](bottom_up[k])
            pyramid.append(top)
        # pyramid: coarse, mid, fine
        return torch.stack([head(p) for head, p in zip(self.heads, pyramid)], 1)

    def code(self, image: Tensor) -> Tensor:
        """w_id = E_id(I) + w̄_id: [B, 3, W]."""
        return self(image) + self.mean_code


class EmotionMapper(nn.Module):
    """M_e(w | e): codes [B, 3, W] and label weights [B, num_emotions] -> adjusted codes [B, 3, W]."""

    def __init__(self, code_dim: int, num_emotions: int, hidden: int = 256):
        super().__init__()
        self.num_emotions = num_emotions
        self.nets = nn.ModuleList()
        for _ in range(LEVELS * num_emotions):
            last = nn.Linear(hidden, code_dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.nets.append(nn.Sequential(nn.Linear(code_dim, hidden), nn.LeakyReLU(0.2), last))

    def forward(self, w: Tensor, weights: Tensor) -> Tensor:
        out = []
        for level in range(LEVELS):
            wl = w[:, level]
            delta = sum(weights[:, e:e + 1] * self.nets[level * self.num_emotions + e](wl)
                        for e in range(self.num_emotions))
            out.append(wl + delta)
        return torch.stack(out, 1)
