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


def head_pivot(vertices: np.ndarray, nose_tip: int = 1) -> np.ndarray:
    """[3] the point a head turns about, in head coordinates, from its face mesh ``vertices`` [V, 3] (metres).

    The face mesh is a mask on the front of the head; the pivot sits behind it: the centre of the mesh's box
    in x and y, and 0.5 face widths behind the box centre in depth ("behind" is away from the nose tip,
    vertex ``nose_tip`` of the mediapipe mesh) -- about where the neck carries a head."""
    v = np.asarray(vertices, np.float64)
    lo, hi = v.min(0), v.max(0)
    centre = (lo + hi) / 2
    back = -np.sign(v[nose_tip, 2] - centre[2]) or 1.0
    return np.array([centre[0], centre[1], centre[2] + back * 0.5 * (hi[0] - lo[0])], np.float32)


def orbit(viewmat_: np.ndarray, yaw_deg: float, pitch_deg: float, pivot: np.ndarray) -> np.ndarray:
    """[4, 4] world-to-camera of the camera moved on a sphere about ``pivot`` [3] (world = head coordinates).

    Positive yaw moves the camera towards the head's +x (image right in a frontal view: the face turns to
    the image left), positive pitch moves it up (towards -y, above the head), as if the head had turned the
    other way in front of a fixed camera. Yaw turns about the head's vertical axis after pitch about its x.
    (0, 0) returns ``viewmat_`` unchanged."""
    a, b = np.radians(yaw_deg), np.radians(pitch_deg)
    # Camera-to-world C' = T(p) R T(-p) C, so world-to-camera V' = V T(p) R^T T(-p).
    ry = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), np.sin(b)], [0.0, -np.sin(b), np.cos(b)]])
    R = ry.T @ rx  # moves a camera at -z (in front of the face) to +x for yaw > 0, to -y for pitch > 0
    p = np.asarray(pivot, np.float64).reshape(3)
    M = np.eye(4)
    M[:3, :3] = R.T
    M[:3, 3] = p - R.T @ p
    return (np.asarray(viewmat_, np.float64) @ M).astype(np.float32)
