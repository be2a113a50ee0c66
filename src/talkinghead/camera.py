"""The project's one camera convention. Every module uses this; nothing redefines it.

Coordinates (OpenCV, as gsplat):
  * camera space: x right, y down, z forward (into the scene); a point is visible when z > 0.
  * ``viewmat``: [4, 4] world-to-camera rigid transform, ``X_cam = R @ X_world + t``.
  * ``K``: [3, 3] pinhole intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels.
  * image space: pixel (col u, row v) covers [u, u+1) x [v, v+1); its centre is at (u + 0.5, v + 0.5).
    A camera point projects to ``(x, y) = (fx * X/Z + cx, fy * Y/Z + cy)`` in these continuous coordinates,
    so an image of width W has its optical centre at ``cx = W / 2``.
  * quaternions are (w, x, y, z).

World space for a talking head is the person's *head frame* (the rigid template fitted by ``prepare``):
the head is static and each frame's head pose is expressed as that frame's ``viewmat`` (the camera
moves around the head), as ER-NeRF / GaussianTalker do. Torso and background are image-space layers.
"""

from __future__ import annotations

import math

import numpy as np


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """K: [3, 3] float32 from focal lengths and principal point (pixels)."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float32)


def focal_from_fov(fov_deg: float, size_px: float) -> float:
    """Focal length (pixels) giving the full field of view ``fov_deg`` across ``size_px`` pixels."""
    return 0.5 * size_px / math.tan(math.radians(fov_deg) / 2.0)


def viewmat(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[4, 4] world-to-camera from rotation R: [3, 3] and translation t: [3]."""
    m = np.eye(4, dtype=np.float32)
    m[:3, :3] = R
    m[:3, 3] = np.asarray(t).reshape(3)
    return m


def project(points: np.ndarray, viewmat_: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Project world points [..., 3] to continuous pixel coordinates [..., 2] (see module docstring)."""
    cam = points @ viewmat_[:3, :3].T + viewmat_[:3, 3]
    uv = cam[..., :2] / cam[..., 2:3]
    return uv * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])


def rotate_head(viewmat_: np.ndarray, yaw_deg: float, pitch_deg: float, pivot: np.ndarray) -> np.ndarray:
    """[4, 4] viewmat of the head turned by ``yaw_deg`` (about its vertical axis; positive turns the face
    towards image right) and ``pitch_deg`` (about its ear-to-ear axis; positive tilts the chin up) around the
    head-frame point ``pivot`` [3]: ``X_cam = R (P (X - pivot) + pivot) + t``. The novel-view camera of the
    papers' yaw/pitch tables, expressed in the world = head frame convention above."""
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(b), math.sin(b)], [0.0, -math.sin(b), math.cos(b)]])
    P = ry @ rx
    p = np.asarray(pivot, np.float64).reshape(3)
    M = np.eye(4)
    M[:3, :3] = P
    M[:3, 3] = p - P @ p
    return (np.asarray(viewmat_, np.float64) @ M).astype(np.float32)
