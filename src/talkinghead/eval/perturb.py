"""Known perturbations of a video, used to check that the metrics rank them right (tests and bench/)."""

from __future__ import annotations

import numpy as np


def wobble(frames: np.ndarray, shift_px: float, rot_deg: float, seed: int = 0) -> np.ndarray:
    """Simulated head wobble: each frame [T, H, W, 3] shifted and rotated about the image centre by a random
    amount (normal, std ``shift_px`` pixels and ``rot_deg`` degrees), independently per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = frames.shape[1:3]
    out = []
    for f in frames:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.normal(0.0, rot_deg), 1.0)
        m[:, 2] += rng.normal(0.0, shift_px, 2)
        out.append(cv2.warpAffine(f, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)
