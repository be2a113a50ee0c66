"""Head pose and camera: a person-specific rigid template, one pinhole K per clip, R and t per frame.

The papers get pose from BFM fitting (AD-NeRF / ER-NeRF pre-processing, reused by GaussianTalker and
DEGSTalk). Ours, from the face mesh of every frame (issue 2, step 4):

1. Rigid template (``rigid_template``, refined by ``fit_head``): generalised Procrustes of the per-frame
   3D landmark clouds (x, y pixels, mediapipe depth in the same scale) on *stable* landmarks only
   (forehead, nose bridge, eye corners, temples; no mouth, jaw or brows, which move with speech). The
   mean shape is put in the head frame: origin at the centroid of the stable points, x from the right to
   the left eye corners (subject's own sides), y from forehead to chin, z = x cross y (into the head), so
   a frontal face has rotation identity; scaled so the outer eye corners are ``EYE_CORNER_DISTANCE_M``
   apart (metres). Those clouds are weak-perspective (mediapipe's depth is relative), so ``fit_head`` then alternates
   PnP poses (step 3) with re-estimating the template from the landmarks lifted onto their camera rays.
2. Intrinsics (``clip_intrinsics``): one K per clip, principal point at the crop centre, focal from a
   fixed field of view. Deviation: we do not fit the focal; a mostly frontal talking head does not
   constrain it (focal and depth trade off), and a fixed plausible value keeps the clips comparable.
3. Per-frame pose (``estimate_poses``): a similarity (Umeyama) alignment of the template to the frame's
   3D landmarks gives R and, from the scale, the depth (weak perspective); Levenberg-Marquardt PnP on the
   2D landmarks of the stable points then refines R, t under the full perspective K.
4. Light zero-phase temporal smoothing of rotation vectors and translations: a Savitzky-Golay filter
   (local quadratic fit over ``SMOOTH_SECONDS``, 9 frames at 25 fps). Offline and symmetric, so there is
   no lag; a local quadratic keeps velocity and acceleration, so real head turns pass (gain 0.99 at 1 Hz,
   0.93 at 2 Hz) while the tracker's frame-to-frame noise is cut (measured in bench/RESULTS.md).
"""

from __future__ import annotations

import numpy as np

from talkinghead import camera

# Landmarks that move rigidly with the skull: forehead, nose bridge and tip, eye corners, temples, cheekbones.
STABLE = (10, 151, 9, 8, 109, 338, 67, 297, 103, 332, 108, 337, 69, 299,  # forehead
          168, 6, 197, 195, 5, 4, 1,  # nose bridge and tip
          33, 133, 263, 362, 130, 359, 243, 463,  # eye corners
          127, 356, 162, 389, 21, 251, 54, 284, 234, 454,  # temples, sides of the head
          116, 345, 123, 352, 117, 346, 47, 277, 198, 420)  # cheekbones, sides of the nose
RIGHT_SIDE = (33, 133, 127, 234, 162, 116, 123, 130)  # subject's right, mirrored by LEFT_SIDE
LEFT_SIDE = (263, 362, 356, 454, 389, 345, 352, 359)
FOREHEAD, CHIN = 10, 152
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
EYE_CORNER_DISTANCE_M = 0.09  # average adult outer-canthus distance: sets the unit of head coordinates
DEFAULT_FOV_DEG = 24.0  # a portrait (short tele) lens: about 1200 px focal length at 512 px
SMOOTH_SECONDS = 0.36  # Savitzky-Golay window: 9 frames at 25 fps


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarities ``dst[i] ~ s[i] * R[i] @ src + t[i]`` (Umeyama 1991), one per frame.

    src: [N, 3]; dst: [T, N, 3]. Returns s [T], R [T, 3, 3] proper rotations, t [T, 3].
    """
    mu_s, mu_d = src.mean(0), dst.mean(1)
    a, b = src - mu_s, dst - mu_d[:, None]
    U, S, Vt = np.linalg.svd(np.transpose(b, (0, 2, 1)) @ a / len(src))
    d = np.ones((len(dst), 3))
    d[:, 2] = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    R = U @ (d[:, :, None] * Vt)
    s = (S * d).sum(1) / (a ** 2).sum(1).mean()
    return s, R, mu_d - s[:, None] * (R @ mu_s)


def align_to_template(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Per-frame 3D landmarks [T, 478, 3] brought into head coordinates [T, 478, 3].

    Each frame is mapped by the similarity that best fits its stable points to the template's, so what
    is left in the result is the non-rigid motion (speech, blinks, expressions).
    """
    s, R, t = umeyama(template[list(STABLE)], landmarks[:, list(STABLE)].astype(np.float64))
    # Inverse of x -> s R x + t applied to every landmark.
    out = (landmarks - t[:, None]) @ R / s[:, None, None]  # row vectors: x @ R applies R^T
    return out.astype(np.float32)


def lift_to_head(landmarks: np.ndarray, meshes: np.ndarray, viewmats: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Head-frame meshes [T, V, 3] that project exactly onto the 2D landmarks [T, V, 3] under viewmats, K.

    Each vertex of ``meshes`` (head coordinates, e.g. from ``align_to_template``) keeps its camera depth
    but slides along its pixel's ray, so pose + mesh reproduce what the tracker saw, non-rigid and
    perspective effects included.
    """
    R, t = viewmats[:, :3, :3].astype(np.float64), viewmats[:, :3, 3].astype(np.float64)
    depth = (meshes @ R[:, 2, :, None])[..., 0] + t[:, None, 2]  # [T, V]
    x = (landmarks[..., 0] - K[0, 2]) / K[0, 0] * depth
    y = (landmarks[..., 1] - K[1, 2]) / K[1, 1] * depth
    cam = np.stack([x, y, depth], axis=-1)
    return ((cam - t[:, None]) @ R).astype(np.float32)


def rigid_template(landmarks: np.ndarray, iterations: int = 3) -> np.ndarray:
    """The person's mean face mesh [478, 3] in head coordinates (metres), from landmarks [T, 478, 3]."""
    lm = landmarks.astype(np.float64)
    ref = lm[len(lm) // 2]
    for _ in range(iterations):  # generalised Procrustes: align all to the mean, re-estimate the mean
        s, R, t = umeyama(ref[list(STABLE)], lm[:, list(STABLE)])
        aligned = (lm - t[:, None]) @ R / s[:, None, None]
        ref = np.median(aligned, axis=0)
    return _canonical(ref)


def _canonical(ref: np.ndarray) -> np.ndarray:
    """Mesh ref [478, 3] moved into the head frame and scaled to metres (module docstring, step 1)."""
    x = ref[list(LEFT_SIDE)].mean(0) - ref[list(RIGHT_SIDE)].mean(0)
    x /= np.linalg.norm(x)
    y = ref[CHIN] - ref[FOREHEAD]
    y -= x * (y @ x)
    y /= np.linalg.norm(y)
    C = np.stack([x, y, np.cross(x, y)])  # rows: head axes in the reference frame
    scale = EYE_CORNER_DISTANCE_M / np.linalg.norm(ref[LEFT_EYE_OUTER] - ref[RIGHT_EYE_OUTER])
    return (scale * (ref - ref[list(STABLE)].mean(0)) @ C.T).astype(np.float32)


def refine_template(landmarks: np.ndarray, template: np.ndarray, viewmats: np.ndarray, K: np.ndarray) -> np.ndarray:
    """A perspective-correct template: the landmarks lifted onto their rays at the depths the current
    template and poses give, taken back to head coordinates and averaged (median) over the clip."""
    meshes = lift_to_head(landmarks, np.broadcast_to(template, landmarks.shape), viewmats, K)
    return _canonical(np.median(meshes.astype(np.float64), axis=0))


def fit_head(landmarks: np.ndarray, K: np.ndarray, iterations: int = 2,
             smooth_window: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Template [478, 3] and viewmats [T, 4, 4] of landmarks [T, 478, 3] (pixels of K's image).

    Starts from the weak-perspective template (``rigid_template``), then alternates PnP poses and
    ``refine_template`` so the template loses the perspective distortion of the per-frame clouds.
    """
    subset = landmarks[:: max(1, len(landmarks) // 400)]  # the template needs a few hundred frames, not all
    template = rigid_template(subset)
    for _ in range(iterations):
        template = refine_template(subset, template, estimate_poses(subset, template, K, 0), K)
    return template, estimate_poses(landmarks, template, K, smooth_window)


def clip_intrinsics(size: int, fov_deg: float = DEFAULT_FOV_DEG) -> np.ndarray:
    """K [3, 3] of a square ``size`` image: focal from the field of view, principal point at the centre."""
    f = camera.focal_from_fov(fov_deg, size)
    return camera.intrinsics(f, f, size / 2.0, size / 2.0)


def _rotvec_to_matrix(rv: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.Rodrigues(np.asarray(rv, np.float64).reshape(3, 1))[0]


def _matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.Rodrigues(np.asarray(R, np.float64))[0].reshape(3)


def smooth_window(fps: float) -> int:
    """Odd Savitzky-Golay window in frames covering ``SMOOTH_SECONDS`` at ``fps``."""
    return max(5, int(round(SMOOTH_SECONDS * fps)) // 2 * 2 + 1)


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Zero-phase Savitzky-Golay smoothing of x [T, D] along time; window 0 = none.

    Each sample is replaced by the value at its centre of the least-squares quadratic over the window;
    the first and last half-windows take the quadratic fitted to the first / last full window (as
    scipy's ``savgol_filter(mode="interp")``, without importing scipy.signal, which takes seconds).
    """
    window = min(window, len(x) if len(x) % 2 else len(x) - 1)
    if window < 5:
        return x
    h = window // 2
    k = np.arange(-h, h + 1, dtype=np.float64)
    fit = np.linalg.pinv(np.stack([np.ones_like(k), k, k * k], axis=1))  # [3, window]: samples -> a, b, c
    out = np.empty_like(x, dtype=np.float64)
    # interior: the fitted value at the centre is the constant term
    windows = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # [T - 2h, D, window]
    out[h:len(x) - h] = windows @ fit[0]
    for rows, block in ((slice(0, h), x[:window]), (slice(len(x) - h, len(x)), x[-window:])):
        coef = fit @ block  # [3, D]
        at = k[:h] if rows.start == 0 else k[h + 1:]
        out[rows] = coef[0] + at[:, None] * coef[1] + (at * at)[:, None] * coef[2]
    return out


def estimate_poses(landmarks: np.ndarray, template: np.ndarray, K: np.ndarray,
                   smooth_window: int = 9) -> np.ndarray:
    """World-to-camera viewmats [T, 4, 4] of the head from landmarks [T, 478, 3] in pixels of K's image."""
    import cv2

    stable = list(STABLE)
    obj = template[stable].astype(np.float64)
    f = float(K[0, 0])
    s, R, t = umeyama(obj, landmarks[:, stable].astype(np.float64))
    rvecs, tvecs = np.zeros((len(landmarks), 3)), np.zeros((len(landmarks), 3))
    for i in range(len(landmarks)):
        # Weak-perspective start: s pixels per metre at depth f / s; the origin projects to t[:2].
        depth = f / s[i]
        t0 = np.array([(t[i, 0] - K[0, 2]) * depth / f, (t[i, 1] - K[1, 2]) * depth / f, depth])
        rvec, tvec = _matrix_to_rotvec(R[i]).reshape(3, 1), t0.reshape(3, 1)
        ok, rvec, tvec = cv2.solvePnP(obj, landmarks[i, stable, :2].astype(np.float64), K.astype(np.float64),
                                      None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok or tvec[2, 0] <= 0:
            rvec, tvec = _matrix_to_rotvec(R[i]).reshape(3, 1), t0.reshape(3, 1)
        rvecs[i], tvecs[i] = rvec.reshape(3), tvec.reshape(3)
    # Smooth rotations as rotation vectors relative to the clip's middle frame (no wrap-around there).
    R_ref = _rotvec_to_matrix(rvecs[len(rvecs) // 2])
    rel = np.stack([_matrix_to_rotvec(_rotvec_to_matrix(r) @ R_ref.T) for r in rvecs])
    rel, tvecs = _smooth(rel, smooth_window), _smooth(tvecs, smooth_window)
    out = np.zeros((len(landmarks), 4, 4), np.float32)
    for i in range(len(landmarks)):
        out[i] = camera.viewmat(_rotvec_to_matrix(rel[i]) @ R_ref, tvecs[i])
    return out


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle [...] in degrees of rotation matrices R [..., 3, 3]."""
    R = np.asarray(R, np.float64)
    cos = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    axis = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return np.degrees(np.arctan2(np.linalg.norm(axis, axis=-1) / 2.0, cos))  # exact near 0, unlike arccos


def frame_to_frame_jitter_deg(viewmats: np.ndarray) -> np.ndarray:
    """Rotation angle [T-1] in degrees between consecutive head poses of viewmats [T, 4, 4].

    Real head motion and tracking noise together; see ``pose_acceleration_deg`` for the noise alone."""
    R = viewmats[:, :3, :3].astype(np.float64)
    return rotation_angle_deg(R[1:] @ np.transpose(R[:-1], (0, 2, 1)))


def pose_acceleration_deg(viewmats: np.ndarray) -> np.ndarray:
    """Change [T-2] in degrees of the frame-to-frame rotation: ``angle(D_i D_{i-1}^T)``, D_i = R_{i+1} R_i^T.

    Zero for a head turning at constant angular velocity; what is left is jitter (tracking noise and
    sudden jerks), the part of frame-to-frame motion a viewer sees as shaking."""
    R = viewmats[:, :3, :3].astype(np.float64)
    D = R[1:] @ np.transpose(R[:-1], (0, 2, 1))
    return rotation_angle_deg(D[1:] @ np.transpose(D[:-1], (0, 2, 1)))


def euler_deg(viewmats: np.ndarray) -> np.ndarray:
    """Head (pitch, yaw, roll) [T, 3] in degrees of viewmats [T, 4, 4]: R = Rz(roll) Ry(yaw) Rx(pitch).

    Pitch about the camera x axis (nodding), yaw about y (shaking), roll about z (tilting in the image
    plane; positive turns the face clockwise on screen, since y points down).
    """
    R = viewmats[:, :3, :3].astype(np.float64)
    yaw = np.arcsin(np.clip(-R[:, 2, 0], -1.0, 1.0))
    pitch = np.arctan2(R[:, 2, 1], R[:, 2, 2])
    roll = np.arctan2(R[:, 1, 0], R[:, 0, 0])
    return np.degrees(np.stack([pitch, yaw, roll], axis=1))
