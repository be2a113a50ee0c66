"""Image losses shared by the methods (differentiable; the *metrics* live in :mod:`talkinghead.eval`).

* :func:`dssim`: D-SSIM = (1 - SSIM) / 2 with the 11x11, sigma 1.5 Gaussian window of 3DGS (Kerbl et al.
  2023, sec. 7) -- the canonical-stage loss term of GaussianTalker (sec. 4.4.2).
* :class:`PerceptualLoss`: LPIPS (AlexNet) when its weights are present locally, else ``None`` with the reason;
  nothing is downloaded and nothing is replaced by a stand-in network.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_C1, _C2 = 0.01**2, 0.03**2


def _window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, n] banded matrix M with (M @ x)[i] = sum_k g[k] x[i + k - 5]: the 11-tap window along one axis with
    zero padding (what ``conv2d(padding=5)`` computes), as one matrix product."""
    g = _window().to(dtype=dtype, device=device)
    pad = g.shape[0] // 2
    i = torch.arange(n, device=device)
    k = i[None, :] - i[:, None] + pad  # tap index of column j for row i
    return torch.where((k >= 0) & (k < g.shape[0]), g[k.clamp(0, g.shape[0] - 1)], g.new_zeros(()))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of images a, b: [H, W, C] in [0, 1] (same-size padding, as 3DGS's loss).

    The separable Gaussian blur of the five moments (x, y, x^2, y^2, xy) is two banded matrix products over a
    [5, C, H, W] stack (``M_H @ X @ M_W^T``): the same sums as two 1-D convolutions per moment, several times
    faster on a CPU, backward above all."""
    x = a.permute(2, 0, 1)  # [C, H, W]
    y = b.permute(2, 0, 1)
    H, W = x.shape[1:]
    mh = _blur_matrix(H, a.dtype, a.device)
    mw = _blur_matrix(W, a.dtype, a.device).T
    mx, my, exx, eyy, exy = mh @ torch.stack([x, y, x * x, y * y, x * y]) @ mw
    sxx = exx - mx * mx
    syy = eyy - my * my
    sxy = exy - mx * my
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

    @classmethod
    def optional(cls, weight: float, folder: str | None, weight_name: str) -> tuple["PerceptualLoss | None", str]:
        """The loss when ``weight`` > 0 and its weights are found, and the note a method logs about it
        (``"on"``, or ``"off: <why>"``; ``weight_name`` is the config field that sets ``weight``)."""
        if weight <= 0:
            return None, f"off: {weight_name} = 0"
        loss, reason = cls.load(folder)
        return loss, "on" if loss is not None else f"off: {reason}"

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        x = a.permute(2, 0, 1)[None] * 2 - 1
        y = b.permute(2, 0, 1)[None] * 2 - 1
        return self.net(x, y).mean()
