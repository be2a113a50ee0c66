"""Head pose: known rigid motions come back, and a real clip rotated in the image plane gives that roll."""

from __future__ import annotations

import numpy as np
import pytest

from talkinghead import camera
from talkinghead.prepare import pose


def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _synthetic_face(rng) -> np.ndarray:
    """A face-like point cloud [478, 3] in metres: a curved shield, symmetric landmarks placed by index."""
    pts = np.zeros((478, 3))
    pts[:, 0] = rng.uniform(-0.07, 0.07, 478)
    pts[:, 1] = rng.uniform(-0.09, 0.09, 478)
    pts[:, 2] = 2.0 * (pts[:, 0] ** 2 + 0.5 * pts[:, 1] ** 2)
    for r, l in zip(pose.RIGHT_SIDE, pose.LEFT_SIDE):  # mirror pairs so the head frame is well defined
        pts[l] = pts[r] * [-1, 1, 1]
    pts[pose.FOREHEAD] = [0, -0.09, 0.01]
    pts[pose.CHIN] = [0, 0.1, 0.01]
    return pts


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(40, 3))
    R = _rot("x", 20) @ _rot("y", -35) @ _rot("z", 10)
    dst = 2.5 * src @ R.T + [1.0, -2.0, 3.0]
    mirrored = src * [1, 1, -1] @ R.T  # a reflection is not a rotation: the best proper one is returned
    s, R_est, t = pose.umeyama(src, np.stack([dst, mirrored]))
    assert s[0] == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_allclose(R_est[0], R, atol=1e-6)
    np.testing.assert_allclose(t[0], [1.0, -2.0, 3.0], atol=1e-6)
    assert np.linalg.det(R_est[1]) == pytest.approx(1.0)


def test_known_head_motion_is_recovered():
    rng = np.random.default_rng(1)
    face = _synthetic_face(rng)
    size = 512
    K = pose.clip_intrinsics(size)
    T = 30
    truth = []
    lms = np.zeros((T, 478, 3), np.float32)
    for i in range(T):
        R = _rot("y", 15 * np.sin(i / 5)) @ _rot("x", 8 * np.cos(i / 7)) @ _rot("z", 5 * np.sin(i / 3))
        t = np.array([0.01 * np.sin(i / 4), -0.01, 0.7 + 0.02 * np.cos(i / 6)])
        vm = camera.viewmat(R, t)
        uv = camera.project(face, vm, K)
        depth = face @ R[2] + t[2]
        # mediapipe-like depth: relative, in the pixel scale of x and y
        lms[i, :, :2] = uv
        lms[i, :, 2] = (depth - depth.mean()) * K[0, 0] / depth.mean()
        truth.append(R)
    template, viewmats = pose.fit_head(lms, K, smooth_window=0)
    assert np.linalg.norm(template[pose.LEFT_EYE_OUTER] - template[pose.RIGHT_EYE_OUTER]) == pytest.approx(
        pose.EYE_CORNER_DISTANCE_M, rel=1e-4)
    # The template's head frame is its own; relative motions between frames must match the truth.
    errors = []
    for i in range(1, T):
        est = viewmats[i, :3, :3] @ viewmats[0, :3, :3].T
        ref = truth[i] @ truth[0].T
        errors.append(pose.rotation_angle_deg(est @ ref.T))
    assert max(errors) < 0.5
    # The recovered pose reprojects the template onto the landmarks.
    proj = camera.project(template[list(pose.STABLE)], viewmats[5], K)
    assert np.abs(proj - lms[5, list(pose.STABLE), :2]).mean() < 1.0


def test_roll_of_rotated_real_frames(clip):
    """Frames of a real clip rotated in the image plane by a known angle give that roll back."""
    import cv2

    from talkinghead import media
    from talkinghead.face.landmarks import track

    frames = media.read_frames(clip("may_en_5s.mp4"), 25)[:40:2]
    h, w = frames.shape[1:3]
    angle = 12.0
    M = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)  # cv2 uses integer pixel centres
    rotated = np.stack([cv2.warpAffine(f, M, (w, h), borderMode=cv2.BORDER_REPLICATE) for f in frames])
    K = camera.intrinsics(*(2 * [camera.focal_from_fov(24, w)]), w / 2, h / 2)
    poses = []
    for images in (frames, rotated):
        lm = track(images)
        assert not np.isnan(lm).any()
        poses.append(pose.fit_head(lm, K, smooth_window=0)[1])
    delta = poses[1][:, :3, :3] @ np.transpose(poses[0][:, :3, :3], (0, 2, 1))
    roll = np.degrees(np.arctan2(delta[:, 1, 0], delta[:, 0, 0]))
    expected = np.degrees(np.arctan2(M[1, 0], M[0, 0]))  # the image-plane rotation applied to pixels
    assert abs(expected) == pytest.approx(angle)
    assert np.median(roll) == pytest.approx(expected, abs=1.0)
    # and the rest of the relative rotation is small: the rotation is about the optical axis
    assert np.median(pose.rotation_angle_deg(delta)) == pytest.approx(angle, abs=1.5)


def test_jitter_and_euler_of_static_pose():
    vm = np.repeat(camera.viewmat(_rot("z", 10), [0, 0, 1])[None], 5, axis=0)
    np.testing.assert_allclose(pose.frame_to_frame_jitter_deg(vm), 0, atol=1e-3)
    np.testing.assert_allclose(pose.euler_deg(vm)[:, 2], 10, atol=1e-4)
    np.testing.assert_allclose(pose.euler_deg(vm)[:, :2], 0, atol=1e-4)


def test_smoothing_removes_noise_without_lag():
    """A steady head turn with per-frame noise: smoothing cuts the jitter and leaves the turn in place."""
    rng = np.random.default_rng(4)
    T = 60
    yaw = np.linspace(-20, 20, T)  # 0.68 deg per frame
    vm = np.stack([camera.viewmat(_rot("y", a), [0, 0, 1]) for a in yaw])
    noisy = vm.copy()
    for i in range(T):
        noisy[i, :3, :3] = _rot("x", rng.normal(0, 0.3)) @ _rot("y", rng.normal(0, 0.3)) @ vm[i, :3, :3]
    rv = np.stack([pose._matrix_to_rotvec(R) for R in noisy[:, :3, :3]])
    smoothed = np.stack([camera.viewmat(pose._rotvec_to_matrix(r), [0, 0, 1])
                         for r in pose._smooth(rv, pose.smooth_window(25))])
    assert np.median(pose.pose_acceleration_deg(smoothed)) < 0.5 * np.median(pose.pose_acceleration_deg(noisy))
    assert np.median(pose.pose_acceleration_deg(vm)) < 1e-3  # a steady turn has no jitter
    # no lag: the smoothed yaw stays centred on the true one
    err = pose.euler_deg(smoothed)[:, 1] - yaw
    assert abs(err.mean()) < 0.1 and np.abs(err).max() < 0.6


def test_smoothing_matches_the_reference_savitzky_golay():
    from scipy.signal import savgol_filter

    x = np.random.default_rng(5).normal(size=(40, 3))
    for window in (5, 9, 11):
        np.testing.assert_allclose(pose._smooth(x, window), savgol_filter(x, window, 2, axis=0, mode="interp"),
                                   atol=1e-12)
    np.testing.assert_allclose(pose._smooth(x[:7], 9), savgol_filter(x[:7], 7, 2, axis=0, mode="interp"), atol=1e-12)
    assert pose._smooth(x[:4], 9) is not None and np.array_equal(pose._smooth(x[:4], 9), x[:4])
