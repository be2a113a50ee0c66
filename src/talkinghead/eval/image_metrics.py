"""Per-frame image metrics: PSNR and SSIM on the full frame and on the face region, and face masks.

The papers measure reconstruction "exclusively on the facial region" (GaussianTalker, 001 sec. 5.2.1;
Talk3D, DEGSTalk and GaussianFlameTalk follow the same ER-NeRF/TalkingGaussian protocol without restating
it). We report both: ``face`` over a face mask and ``full`` over the whole frame.

* PSNR (peak 255) per frame; an identical frame is ``inf``. On the face region the squared error is
  averaged over the mask's pixels only.
* SSIM (Wang et al. 2004, the form every paper cites): 11-tap Gaussian window, sigma 1.5, K1 = 0.01,
  K2 = 0.03, computed per RGB channel and averaged, on the valid part of the image (no padding, so the
  map is 10 pixels smaller). On the face region the SSIM map is averaged over the (cropped) mask.
* Face mask: the prepared dataset's parsing labels 3 (face skin) + 4 (inner mouth) when available,
  otherwise the filled mediapipe face-oval polygon of the *reference* frame's landmarks.
* Seam bands (:func:`seam_bands`, from the ground truth's parsing only): where head avatars break first
  (DEGSTalk sec. III-D, Fig. 3: "the junction between the face and hair" and "the connection between the
  neck and head"). ``hairline`` = the pixels within r of both the hair (label 2: hair, ears) and the face
  (3 skin + 4 inner mouth); ``neck`` = within r of both the torso (1: neck, shoulders, clothes) and the face,
  i.e. the jaw line over the neck; r = width / 64 pixels (2 at 128, 8 at 512), at least 1. The error there is
  the mean absolute difference (0-255, averaged over RGB) over the band's pixels.
"""

from __future__ import annotations

import math

import numpy as np

from talkinghead.face.landmarks import FACE_OVAL

_SSIM_SIZE, _SSIM_SIGMA, _K1, _K2, _PEAK = 11, 1.5, 0.01, 0.03, 255.0


def face_mask_from_landmarks(lm: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [H, W] mask inside the face-oval polygon of ``lm``: [478, 3]; all False when ``lm`` is NaN."""
    import cv2

    mask = np.zeros((height, width), np.uint8)
    if np.isfinite(lm).all():
        poly = np.round(lm[list(FACE_OVAL), :2] - 0.5).astype(np.int32)  # continuous -> pixel index
        cv2.fillPoly(mask, [poly], 1)
    return mask.astype(bool)


def face_mask_from_parsing(parsing: np.ndarray) -> np.ndarray:
    """bool [H, W] face mask from dataset parsing labels [H, W] (3 face skin, 4 inner mouth)."""
    return (parsing == 3) | (parsing == 4)


def seam_bands(parsing: np.ndarray) -> dict[str, np.ndarray]:
    """{"hairline", "neck"}: bool [H, W] bands around the hair-face and neck-face boundaries of parsing
    labels [H, W] (see the module docstring)."""
    import cv2

    r = max(1, int(round(parsing.shape[1] / 64)))
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    near = lambda m: cv2.dilate(m.astype(np.uint8), kernel).astype(bool)  # noqa: E731  (within r, square)
    face = near(face_mask_from_parsing(parsing))
    return {"hairline": face & near(parsing == 2), "neck": face & near(parsing == 1)}


def mean_abs_error(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """Mean |pred - gt| (0-255, RGB averaged) of uint8 images [H, W, 3] over ``mask`` [H, W] (NaN if empty)."""
    if not mask.any():
        return math.nan
    return float(np.abs(pred.astype(np.float64) - gt.astype(np.float64)).mean(-1)[mask].mean())


def psnr(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images [H, W, 3], over ``mask``: [H, W] bool if given; ``inf`` when equal."""
    diff = pred.astype(np.float64) - gt.astype(np.float64)
    sq = (diff ** 2).mean(-1)
    if mask is not None:
        if not mask.any():
            return math.nan
        sq = sq[mask]
    mse = float(sq.mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(_PEAK ** 2 / mse)


def ssim_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """SSIM map [H - 10, W - 10] of uint8 images [H, W, 3], averaged over the RGB channels."""
    import cv2

    x, y = pred.astype(np.float64), gt.astype(np.float64)
    r = (_SSIM_SIZE - 1) // 2

    def blur(t: np.ndarray) -> np.ndarray:  # normalised sampled Gaussian; keep only the valid part
        return cv2.GaussianBlur(t, (_SSIM_SIZE, _SSIM_SIZE), _SSIM_SIGMA)[r:-r, r:-r]

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (_K1 * _PEAK) ** 2, (_K2 * _PEAK) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(-1)


def ssim(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM of uint8 images [H, W, 3], over ``mask``: [H, W] bool if given (NaN for an empty mask)."""
    return masked_mean(ssim_map(pred, gt), mask)


def masked_mean(smap: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean of an SSIM map [H - 10, W - 10] over the matching part of ``mask``: [H, W] (all when None)."""
    if mask is None:
        return float(smap.mean())
    r = (_SSIM_SIZE - 1) // 2
    m = mask[r:-r, r:-r]
    return float(smap[m].mean()) if m.any() else math.nan


def error_heatmap(pred: np.ndarray, gt: np.ndarray, full_scale: float = 64.0) -> np.ndarray:
    """uint8 RGB [H, W, 3] heat map of the per-pixel mean absolute error (saturates at ``full_scale``)."""
    import matplotlib

    err = np.abs(pred.astype(np.float32) - gt.astype(np.float32)).mean(-1) / full_scale
    rgba = matplotlib.colormaps["inferno"](np.clip(err, 0.0, 1.0))
    return (rgba[..., :3] * 255).astype(np.uint8)
