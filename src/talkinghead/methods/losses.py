"""Image losses shared by the methods (differentiable; the *metrics* live in :mod:`talkinghead.eval`).

* :func:`dssim`: D-SSIM = (1 - SSIM) / 2 with the 11x11, sigma 1.5 Gaussian window of 3DGS (Kerbl et al.
  2023, sec. 7) -- the canonical-stage loss term of GaussianTalker (sec. 4.4.2).
* :class:`PerceptualLoss`: LPIPS (AlexNet) when its weights are present locally, else ``None`` with the reason;
  nothing is downloaded and nothing is replaced by a stand-in network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_C1, _C2 = 0.01**2, 0.03**2


def _window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of images a, b: [H, W, C] in [0, 1] (same-size padding, as 3DGS's loss)."""
    x = a.permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = b.permute(2, 0, 1)[:, None]
    g = _window().to(a)
    pad = g.shape[0] // 2

    def blur(t: Tensor) -> Tensor:
        t = F.conv2d(t, g.view(1, 1, 1, -1), padding=(0, pad))
        return F.conv2d(t, g.view(1, 1, -1, 1), padding=(pad, 0))

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + _C1) * (2 * sxy + _C2)) / ((mx * mx + my * my + _C1) * (sxx + syy + _C2))
    return s.mean()


def dssim(a: Tensor, b: Tensor) -> Tensor:
    """(1 - SSIM) / 2 of [H, W, C] images."""
    return (1.0 - ssim(a, b)) / 2.0


class PerceptualLoss:
    """LPIPS(AlexNet) as a loss on [H, W, 3] images in [0, 1], if its weights are found locally.

    ``PerceptualLoss.load(folder)`` returns ``(loss, None)`` or ``(None, reason)``.
    """

    def __init__(self, net) -> None:
        self.net = net.requires_grad_(False)

    @classmethod
    def load(cls, folder: str | None = None):
        from talkinghead.eval.lpips import find_weights, load_lpips

        found = find_weights(folder)
        if isinstance(found, str):
            return None, found
        return cls(load_lpips(*found)), None

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        x = a.permute(2, 0, 1)[None] * 2 - 1
        y = b.permute(2, 0, 1)[None] * 2 - 1
        return self.net(x, y).mean()
