"""Landmark metrics between a prediction and its reference, from mediapipe face meshes [T, 478, 3].

Every metric uses only frames where a face was found in both videos (rows without NaN).

* **LMD** (landmark distance, Chen et al. 2018, cited for LMD by Talk3D [6] and DEGSTalk [36]; M-LMD in the
  one-shot paper 003): mean over frames and points of the 2-D Euclidean distance between corresponding
  landmarks. None of the five papers normalises it further: their tables are in pixels of the 512 x 512
  face crops (e.g. DEGSTalk Tab. I: 2.6-3.0). We report it the same way, in pixels of a 512-pixel-wide
  frame (``lmd_*``, rescaled by 512 / width when the video has another width), and also divided by the
  reference's interocular distance (``lmd_*_iod``), which does not depend on resolution or crop.
  "mouth" = the 40 lip points (outer + inner contours); "all" = all 478 mesh points.
* **mouth-opening correlation**: Pearson r of ``landmarks.mouth_opening`` (the project's one definition).
* **blink error** (our stand-in for AU45, which GaussianTalker uses as its blink signal): ``landmarks.blink_values``
  per eye (the project's one definition, also in the datasets ``prepare`` writes), with the open and closed eye
  calibrated on the reference for both videos (a per-video calibration would normalise away a prediction
  whose eyes never close as far); the error is the mean absolute difference over frames and both eyes.
* **AU-error proxy** (named a proxy: the papers' AUE uses OpenFace action-unit intensities, which we do
  not have): seven landmark distances tied to action units (AU1/2 brow raise inner/outer, AU4 brow
  lowerer, AU12/15 lip-corner height, AU20 lip stretch, AU25/26 mouth opening; AU45 = the blink above, mean
  of both eyes), each divided by the interocular distance and taken relative to the video's own median
  (person-specific neutral, like OpenFace's normalisation); the proxy is the mean absolute difference over
  distances and frames, in interocular units x 100.
"""

from __future__ import annotations

import math

import numpy as np

from talkinghead.face import landmarks as L

REFERENCE_WIDTH = 512  # the papers' evaluation resolution
MOUTH = L.LIPS_OUTER + L.LIPS_INNER
RIGHT_BROW_INNER, RIGHT_BROW_OUTER = 107, 70
LEFT_BROW_INNER, LEFT_BROW_OUTER = 336, 300


def valid_rows(*tracks: np.ndarray) -> np.ndarray:
    """bool [T] frames where every track [T, 478, 3] found a face."""
    ok = np.ones(len(tracks[0]), bool)
    for t in tracks:
        ok &= np.isfinite(t).all(axis=(1, 2))
    return ok


def lmd(pred: np.ndarray, gt: np.ndarray, points: tuple[int, ...] | None, width: int) -> dict[str, float]:
    """LMD over ``points`` (None = all) of tracks [T, 478, 3]: pixels at 512 wide and interocular units."""
    ok = valid_rows(pred, gt)
    idx = list(points) if points is not None else slice(None)
    d = np.linalg.norm(pred[ok][:, idx, :2] - gt[ok][:, idx, :2], axis=-1)  # [T', P]
    iod = L.interocular(gt[ok])  # [T']
    return {"px512": float(d.mean() * REFERENCE_WIDTH / width), "iod": float((d / iod[:, None]).mean())}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two [T] signals; 0 when one is constant (no co-variation to measure)."""
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def au_distances(track: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """[T, 7] AU-related landmark distances in interocular units (see module docstring); the blink (AU45) is
    calibrated on ``reference`` [T', 478, 3] (default: ``track`` itself)."""
    p = track[..., :2]
    iod = L.interocular(track)[:, None]
    eye_r = p[:, list(L.RIGHT_IRIS)].mean(1)
    eye_l = p[:, list(L.LEFT_IRIS)].mean(1)
    dist = lambda a, b: np.linalg.norm(a - b, axis=-1)  # noqa: E731
    corners_y = p[:, list(L.MOUTH_CORNERS), 1].mean(1)
    lips_mid_y = 0.5 * (p[:, L.UPPER_LIP_INNER, 1] + p[:, L.LOWER_LIP_INNER, 1])
    cols = [
        0.5 * (dist(p[:, RIGHT_BROW_INNER], eye_r) + dist(p[:, LEFT_BROW_INNER], eye_l)),  # AU1
        0.5 * (dist(p[:, RIGHT_BROW_OUTER], eye_r) + dist(p[:, LEFT_BROW_OUTER], eye_l)),  # AU2
        dist(p[:, RIGHT_BROW_INNER], p[:, LEFT_BROW_INNER]),  # AU4
        lips_mid_y - corners_y,  # AU12 (corners up) / AU15 (corners down), image y points down
        dist(p[:, L.MOUTH_CORNERS[0]], p[:, L.MOUTH_CORNERS[1]]),  # AU20
        dist(p[:, L.UPPER_LIP_INNER], p[:, L.LOWER_LIP_INNER]),  # AU25/26
    ]
    out = np.stack(cols, -1) / iod
    return np.concatenate([out, L.blink_values(track, reference).mean(-1, keepdims=True)], -1)  # AU45


def landmark_metrics(pred: np.ndarray, gt: np.ndarray, width: int) -> dict[str, float]:
    """All landmark metrics of ``pred`` against ``gt`` (tracks [T, 478, 3], same T, frame ``width``)."""
    ok = valid_rows(pred, gt)
    mouth, every = lmd(pred, gt, MOUTH, width), lmd(pred, gt, None, width)
    au_p, au_g = au_distances(pred[ok], reference=gt[ok]), au_distances(gt[ok])
    au_p -= np.median(au_p, 0)
    au_g -= np.median(au_g, 0)
    return {
        "lmd_mouth": mouth["px512"], "lmd_mouth_iod": mouth["iod"],
        "lmd_all": every["px512"], "lmd_all_iod": every["iod"],
        "mouth_open_corr": pearson(L.mouth_opening(pred[ok]), L.mouth_opening(gt[ok])),
        "blink_error": float(np.abs(L.blink_values(pred[ok], reference=gt[ok]) - L.blink_values(gt[ok])).mean()),
        "aue_proxy": float(np.abs(au_p - au_g).mean() * 100.0),
    }
