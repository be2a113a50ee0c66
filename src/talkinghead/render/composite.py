"""Full-frame output: a rendered square crop pasted back into the source video frame it was cut from.

``prepare`` records the clip's one fixed crop (``meta.json`` ``crop {x0, y0, side}`` in source pixels, the
square ``[x0, x0 + side) x [y0, y0 + side)``). :class:`PasteBack` resizes a render of that crop (any render
size N) to ``side`` and writes it over the source frame:

* outside the crop box the output is the source frame, bit for bit;
* inside, a feathered band of ``band`` pixels along each crop edge that lies inside the frame blends the
  render into the source frame (weight ``smoothstep((k + 0.5) / band)`` at pixel k from that edge), so the
  crop's border leaves no visible seam. An edge on the frame's own border is not feathered: there is
  nothing beyond it to blend with (a square 512^2 source whose crop is the whole frame gets the render as is);
* beyond the band the output is the render.

The blend is a per-pixel convex combination in float32 of uint8 frames, rounded once, computed only on the
band's pixels (the rest is a copy). Works for any frame
shape (non-square, odd sizes) and any crop position; a crop reaching past the frame (``prepare`` clips its
crop into the frame, so only a hand-edited meta.json has one) is pasted where it overlaps the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

FEATHER_FRACTION = 0.05  # feathered band = this fraction of the crop side (at least 2 px)


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """[h, w, 3] in [0, 1] -> [height, width, 3]: bicubic, antialiased when shrinking, clamped to [0, 1]."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrink = height < image.shape[0] or width < image.shape[1]
    x = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None].float(), size=(height, width), mode="bicubic",
                                        antialias=shrink, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def to_uint8(image: Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8 numpy (round to nearest), on the CPU."""
    return (image.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy()


def _ramp(n: int, band: int, at_start: bool, at_end: bool) -> np.ndarray:
    """[n] weights along one axis of the crop: smoothstep up from each feathered end over ``band`` pixels."""
    k = np.arange(n, dtype=np.float32)
    w = np.ones(n, np.float32)
    for on, dist in ((at_start, k), (at_end, n - 1 - k)):
        if on:
            t = np.clip((dist + 0.5) / band, 0.0, 1.0)
            w *= t * t * (3 - 2 * t)
    w[w > 1 - 1e-7] = 1.0
    return w


@dataclass(frozen=True)
class PasteBack:
    """Paste renders of the crop ``(x0, y0, side)`` into ``width`` x ``height`` source frames."""

    x0: int
    y0: int
    side: int
    width: int  # of the source frame
    height: int
    band: int = 0  # feathered pixels along each inner crop edge; 0: FEATHER_FRACTION of the side

    def __post_init__(self):
        if self.side <= 0 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"bad crop/frame: {self}")
        inside = self.x0 < self.width and self.y0 < self.height and self.x0 + self.side > 0 and self.y0 + self.side > 0
        if not inside:
            raise ValueError(f"the crop {self.x0, self.y0, self.side} lies outside the {self.width}x{self.height} frame")

    @classmethod
    def from_meta(cls, crop: dict, width: int, height: int, band: int = 0) -> "PasteBack":
        """From ``meta.json``'s ``crop`` record and the source frame size."""
        return cls(int(crop["x0"]), int(crop["y0"]), int(crop["side"]), int(width), int(height), int(band))

    @property
    def feather(self) -> int:
        return self.band if self.band > 0 else max(2, int(round(FEATHER_FRACTION * self.side)))

    @cached_property
    def box(self) -> tuple[slice, slice, slice, slice]:
        """(rows, cols) of the frame the crop covers, and the same pixels' (rows, cols) in the crop."""
        fx0, fy0 = max(0, self.x0), max(0, self.y0)
        fx1, fy1 = min(self.width, self.x0 + self.side), min(self.height, self.y0 + self.side)
        return (slice(fy0, fy1), slice(fx0, fx1), slice(fy0 - self.y0, fy1 - self.y0),
                slice(fx0 - self.x0, fx1 - self.x0))

    @cached_property
    def weight(self) -> np.ndarray:
        """[h, w, 1] float32 weight of the render over the covered part of the frame (1 beyond the band)."""
        rows, cols, _, _ = self.box
        h, w = rows.stop - rows.start, cols.stop - cols.start
        b = self.feather
        wy = _ramp(h, b, rows.start > 0, rows.stop < self.height)
        wx = _ramp(w, b, cols.start > 0, cols.stop < self.width)
        return (wy[:, None] * wx[None, :])[..., None]

    def __call__(self, frame: np.ndarray, render: Tensor) -> np.ndarray:
        """The source ``frame`` [height, width, 3] uint8 with ``render`` [N, N, 3] in [0, 1] pasted in (a new
        array; ``frame`` is not modified)."""
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, expected {self.width}x{self.height}")
        rows, cols, crows, ccols = self.box
        crop = to_uint8(resize_image(render, self.side, self.side))[crows, ccols]
        out = frame.copy()
        out[rows, cols] = crop  # weight 1: the render
        by, bx, w = self._band
        src = frame[rows, cols][by, bx].astype(np.float32)  # [K, 3] the band's pixels only
        out[rows, cols][by, bx] = (src + (crop[by, bx].astype(np.float32) - src) * w + 0.5).astype(np.uint8)
        return out

    @cached_property
    def _band(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [K], columns [K] (in the covered box) and weights [K, 1] of the pixels whose weight is < 1."""
        weight = self.weight[..., 0]
        by, bx = np.nonzero(weight < 1.0)
        return by, bx, weight[by, bx][:, None]
