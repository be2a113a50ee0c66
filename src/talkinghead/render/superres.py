"""Super-resolution of a volume-rendered feature image, in the spirit of EG3D's SuperresolutionHybrid8XDC.

EG3D (sec. 4.2) renders a low-resolution feature image (its first 3 channels an RGB image) and upsamples it with
two blocks of convolutions, each doubling the size; an RGB skip path carries the bilinearly upsampled image and
every block adds its own ``toRGB`` output to it. We keep that structure, sized per preset (Talk3D: 128 -> 512
with 256 then 128 channels; our cpu-small: 64 -> 128 with one block of 32), and differ where EG3D's generator
context does not exist for us:

* no style modulation (EG3D modulates the convolutions with its latent w; a person-specific model has no w);
* the ``toRGB`` layers start at zero, so an untrained module is exactly the bilinear upsampling of the skip
  channels: training starts from the volume render's own image instead of from noise.

Shapes::

    sr = SuperResolution(in_channels=32, out_channels=3, channels=(256, 128))   # 2 blocks: x4
    image = sr(features)   # features [B, in_channels, h, w] -> [B, out_channels, 4h, 4w]

The skip path is the first ``out_channels`` input channels (e.g. RGB, or RGB + alpha for a head that is
composited over a backdrop), so the output lives in the same units as they do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Block(nn.Module):
    """x2 bilinear upsampling, two 3x3 convolutions with LeakyReLU (EG3D's SynthesisBlock without styles)."""

    def __init__(self, in_channels: int, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2))
        self.to_rgb = nn.Conv2d(channels, out_channels, 1)
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, x: Tensor, rgb: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + self.to_rgb(x)
        return x, rgb


class SuperResolution(nn.Module):
    """[B, in_channels, h, w] feature image -> [B, out_channels, h * 2^k, w * 2^k], k = len(channels)."""

    def __init__(self, in_channels: int = 32, out_channels: int = 3, channels: tuple[int, ...] = (256, 128)):
        super().__init__()
        if out_channels > in_channels:
            raise ValueError("the skip path takes the first out_channels input channels")
        self.out_channels = out_channels
        widths = (in_channels,) + tuple(channels)
        self.blocks = nn.ModuleList(_Block(widths[i], widths[i + 1], out_channels) for i in range(len(channels)))

    @property
    def factor(self) -> int:
        return 2 ** len(self.blocks)

    def forward(self, features: Tensor) -> Tensor:
        # channels-last: the same convolutions, ~1.3x faster on a CPU at Talk3D's cpu-small sizes (forward + backward)
        x = features.contiguous(memory_format=torch.channels_last)
        rgb = features[:, : self.out_channels]
        for block in self.blocks:
            x, rgb = block(x, rgb)
        return rgb
