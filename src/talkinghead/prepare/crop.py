"""One fixed square crop for the whole clip: head and shoulders, as the papers' 512 x 512 portraits.

A per-frame crop would move the image under a static head and read as head jitter, so the crop is
computed once from the landmarks of every frame. The proportions follow the portraits the papers train
on (ER-NeRF / GaussianTalker's May, Obama...): the face-mesh height is about 0.54 of the side and its
centre sits a little below the middle, leaving room for hair above and shoulders below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACE_HEIGHT_FRACTION = 0.54  # face-mesh height / crop side
FACE_CENTRE_ROW = 0.55  # face-mesh centre row / crop side
MOTION_MARGIN = 1.15  # the crop side covers the union of all face boxes with this margin
FULL_FRAME_SNAP = 0.85  # keep a square source whole when the crop would cover most of it anyway


@dataclass(frozen=True)
class Crop:
    """Square window of the source frame in source pixels: columns [x0, x0+side), rows [y0, y0+side)."""

    x0: int
    y0: int
    side: int

    def apply(self, frame: np.ndarray, size: int) -> np.ndarray:
        """Crop frame [H, W, C] and resize to [size, size, C]."""
        import cv2

        window = frame[self.y0:self.y0 + self.side, self.x0:self.x0 + self.side]
        if self.side == size:
            return np.ascontiguousarray(window)
        interp = cv2.INTER_AREA if self.side > size else cv2.INTER_CUBIC
        return cv2.resize(window, (size, size), interpolation=interp)

    def to_crop_pixels(self, points: np.ndarray, size: int) -> np.ndarray:
        """Source-pixel landmarks [..., 3] (x, y, depth in the same scale) to pixels of the resized crop."""
        s = size / self.side
        out = points * np.float32(s)
        out[..., 0] -= self.x0 * s
        out[..., 1] -= self.y0 * s
        return out.astype(np.float32)


def fixed_crop(landmarks: np.ndarray, width: int, height: int) -> Crop:
    """The clip's crop from source-pixel landmarks [T, 478, 3] (no NaN) of a width x height video."""
    lo, hi = landmarks[..., :2].min(axis=1), landmarks[..., :2].max(axis=1)  # [T, 2] face boxes
    face_h = float(np.median(hi[:, 1] - lo[:, 1]))
    centre = np.median((lo + hi) / 2, axis=0)
    union = float((hi.max(0) - lo.min(0)).max())
    limit = min(width, height)
    side = max(face_h / FACE_HEIGHT_FRACTION, union * MOTION_MARGIN)
    if side >= FULL_FRAME_SNAP * limit:
        side = limit
    side = int(round(min(side, limit)))
    x0 = int(round(centre[0] - side / 2))
    y0 = int(round(centre[1] - FACE_CENTRE_ROW * side))
    return Crop(int(np.clip(x0, 0, width - side)), int(np.clip(y0, 0, height - side)), side)
