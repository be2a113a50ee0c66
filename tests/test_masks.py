"""Person segmentation, parsing labels, background plate and torso images on real clips and known cases."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_clip
from talkinghead.face.landmarks import CHIN, FACE_OVAL, LIPS_INNER, NOSE_TIP, track
from talkinghead.media import iter_frames
from talkinghead.prepare.masks import (BACKGROUND, FACE, HAIR, MOUTH, TORSO, background_plate, parse_frames,
                                       segment_person, torso_images)

cv2 = pytest.importorskip("cv2")


def _clip(name: str, count: int = 6, step: int = 7):
    frames = []
    for i, frame in enumerate(iter_frames(shared_clip(name), 25.0)):
        if i % step == 0:
            frames.append(frame)
        if len(frames) == count:
            break
    frames = np.stack(frames)
    landmarks = track(frames)
    assert np.isfinite(landmarks).all()
    person = segment_person(frames)
    return frames, landmarks, person, parse_frames(frames, landmarks, person)


@pytest.fixture(scope="module")
def may():
    return _clip("may_en_5s.mp4")


@pytest.fixture(scope="module")
def anchor():  # short hair, dark suit
    return _clip("cnn_anchor_en_71s.mp4", count=4)


@pytest.fixture(scope="module")
def long_hair():  # hair falling onto the shoulders
    return _clip("hdtf_radio2_8s.mp4", count=4)


def _inside(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    contour = polygon.astype(np.float32).reshape(-1, 1, 2)
    return np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), True) for x, y in points])


def test_person_mask_covers_the_face(may):
    frames, landmarks, person, _ = may
    assert person.shape == frames.shape[:3] and person.dtype == np.float32
    assert 0.0 <= person.min() and person.max() <= 1.0
    xy = np.floor(landmarks[:, :, :2]).astype(int)
    t = np.repeat(np.arange(len(frames)), landmarks.shape[1])
    covered = person[t, xy[..., 1].ravel(), xy[..., 0].ravel()] > 0.5
    assert covered.mean() > 0.97
    assert (person[:, :8, :8] < 0.5).all()  # the top-left corner of May's clip is background


def test_labels_and_mouth_inside_face(may):
    frames, landmarks, _, parsing = may
    assert parsing.shape == frames.shape[:3] and parsing.dtype == np.uint8
    assert set(np.unique(parsing)) <= {BACKGROUND, TORSO, HAIR, FACE, MOUTH}
    for t in range(len(frames)):
        ys, xs = np.nonzero(parsing[t] == MOUTH)
        if len(xs):  # every mouth pixel centre lies inside the face oval (1 px of rasterisation slack)
            centres = np.stack([xs + 0.5, ys + 0.5], axis=1)
            assert (_inside(landmarks[t, list(FACE_OVAL), :2], centres) > -1.0).all()
        nose = np.floor(landmarks[t, NOSE_TIP, :2]).astype(int)
        assert parsing[t, nose[1], nose[0]] == FACE
    assert (parsing == MOUTH).any()  # she speaks: the inner mouth shows in some frames
    # Every inner-mouth pixel lies inside the inner-lip polygon too.
    ys, xs = np.nonzero(parsing[0] == MOUTH)
    if len(xs):
        assert (_inside(landmarks[0, list(LIPS_INNER), :2], np.stack([xs + 0.5, ys + 0.5], 1)) > -1.0).all()


def _below_chin(landmarks, t, parsing, depth):
    """Labels on the vertical line under the chin and beside it, ``depth`` face heights down."""
    chin = landmarks[t, CHIN, :2]
    face_h = chin[1] - landmarks[t, 10, 1]
    half_w = 0.5 * (landmarks[t, 454, 0] - landmarks[t, 234, 0])
    y = int(min(chin[1] + depth * face_h, parsing.shape[1] - 1))
    return parsing[t, y, int(chin[0])], parsing[t, y], int(chin[0]), half_w


def test_neck_is_torso_and_top_of_head_is_hair(may, anchor, long_hair):
    for frames, landmarks, _, parsing in (may, anchor, long_hair):
        for t in range(len(frames)):
            neck, _, _, _ = _below_chin(landmarks, t, parsing, 0.2)
            assert neck == TORSO
            top = landmarks[t, 10, :2] - [0, 0.1 * (landmarks[t, CHIN, 1] - landmarks[t, 10, 1])]
            assert parsing[t, int(top[1]), int(top[0])] == HAIR


def test_short_hair_has_no_hair_under_the_chin(anchor):
    frames, landmarks, _, parsing = anchor
    for t in range(len(frames)):
        chin_y = int(landmarks[t, CHIN, 1])
        assert not (parsing[t, chin_y + 5:] == HAIR).any()  # the suit's shoulders stay torso


def test_long_hair_stays_hair_beside_the_neck(long_hair):
    frames, landmarks, _, parsing = long_hair
    for t in (0, 1):  # frontal frames (she turns later, and the fixed offsets below would miss the hair)
        _, row, x, half_w = _below_chin(landmarks, t, parsing, 0.1)  # (the chin is near the bottom edge)
        beside = np.concatenate([row[max(0, int(x - 1.5 * half_w)): int(x - 0.9 * half_w)],
                                 row[int(x + 0.9 * half_w): int(x + 1.5 * half_w)]])
        assert (beside == HAIR).mean() > 0.7
        assert row[x] == TORSO


def test_chunks_and_missing_landmarks(may):
    frames, landmarks, person, parsing = may
    split = np.concatenate([parse_frames(frames[:2], landmarks[:2], person[:2]),
                            parse_frames(frames[2:], landmarks[2:], person[2:])])
    np.testing.assert_array_equal(split, parsing)
    holes = landmarks.copy()
    holes[1] = np.nan  # borrows frame 0 (nearest), and frame 0's image decides the colours
    patched = parse_frames(frames[:2], holes[:2], person[:2])
    np.testing.assert_array_equal(patched[1], parse_frames(frames[1:2], landmarks[:1], person[1:2])[0])
    with pytest.raises(ValueError):
        parse_frames(frames[:1], np.full_like(landmarks[:1], np.nan), person[:1])


def test_plate_on_a_synthetic_scene():
    rng = np.random.default_rng(0)
    H, W, T = 64, 96, 10
    yy, xx = np.mgrid[:H, :W]
    background = np.stack([xx * 2, yy * 3, 128 + 0 * xx], -1).astype(np.uint8)
    frames = np.repeat(background[None], T, 0)
    parsing = np.zeros((T, H, W), np.uint8)
    for t in range(T):  # a "person" sliding right, always covering columns 40..55
        x0 = 20 + 2 * t
        parsing[t, 10:50, x0:x0 + 36] = TORSO
        frames[t, 10:50, x0:x0 + 36] = rng.integers(0, 255, (40, 36, 3))
    plate = background_plate(frames, parsing)
    assert plate.shape == (H, W, 3) and plate.dtype == np.uint8
    seen = np.ones((H, W), bool)
    seen[5:55, 36:62] = False  # never background (with the dilation margin)
    np.testing.assert_array_equal(plate[seen], background[seen])  # exact: no person pixel voted
    hole = ~seen
    err = np.abs(plate[hole].astype(int) - background[hole].astype(int))
    assert err.mean() < 12  # the smooth fill follows the gradient around the hole
    torso = torso_images(frames, parsing, plate)
    mask = parsing == TORSO
    np.testing.assert_array_equal(torso[mask], frames[mask])
    np.testing.assert_array_equal(torso[~mask], np.broadcast_to(plate, frames.shape)[~mask])


def test_plate_has_no_person_on_a_real_clip(may):
    frames, landmarks, _, parsing = may
    plate = background_plate(frames, parsing)
    always_bg = (parsing == BACKGROUND).all(axis=0)
    diff = np.abs(plate.astype(int) - np.median(frames, axis=0).astype(int)).max(-1)
    assert np.median(diff[always_bg]) <= 3
    # Where the face always is, the plate shows background colours, not skin.
    nose = np.floor(landmarks[:, NOSE_TIP, :2].mean(0)).astype(int)
    skin = frames[:, nose[1], nose[0]].astype(int).mean(0)
    assert np.abs(plate[nose[1], nose[0]].astype(int) - skin).max() > 40
    torso = torso_images(frames, parsing, plate)
    assert torso.shape == frames.shape
    np.testing.assert_array_equal(torso[parsing == FACE], np.broadcast_to(plate, frames.shape)[parsing == FACE])


def test_missing_landmark_rows_borrow_the_nearest_tracked_frame():
    from talkinghead.prepare.masks import _nearest_tracked

    lm = np.zeros((10, 478, 3), np.float32)
    lm[[0, 1, 2, 6, 7, 9]] = np.nan
    np.testing.assert_array_equal(_nearest_tracked(lm), [3, 3, 3, 3, 4, 5, 5, 8, 8, 8])
