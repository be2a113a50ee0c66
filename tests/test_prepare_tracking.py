"""Tracking one identity, filling gaps, and the clip's fixed crop."""

from __future__ import annotations

import numpy as np
import pytest

from talkinghead.errors import UserError
from talkinghead.prepare.crop import Crop, fixed_crop
from talkinghead.prepare.tracking import fill_gaps


def test_fill_gaps_interpolates_and_holds_the_ends():
    lm = np.zeros((10, 478, 3), np.float32)
    lm[:, :, 0] = np.arange(10)[:, None]
    lm[[0, 4, 5, 9]] = np.nan
    filled, tracked = fill_gaps(lm, fps=25, max_gap_s=0.2)
    np.testing.assert_array_equal(tracked, [0, 1, 1, 1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(filled[4:6, 0, 0], [4, 5])  # linear between frames 3 and 6
    assert filled[0, 0, 0] == 1 and filled[9, 0, 0] == 8  # ends held
    assert not np.isnan(filled).any()


def test_fill_gaps_refuses_long_gaps_and_no_face():
    lm = np.zeros((100, 478, 3), np.float32)
    lm[40:80] = np.nan
    with pytest.raises(UserError, match=r"frames 40-79 \(1.6-3.2 s\)"):
        fill_gaps(lm, fps=25, max_gap_s=0.5)
    with pytest.raises(UserError, match="no face found in clip.mp4"):
        fill_gaps(np.full((5, 478, 3), np.nan, np.float32), fps=25, source="clip.mp4")


def test_crop_is_square_inside_the_frame_and_maps_landmarks():
    rng = np.random.default_rng(0)
    lm = np.zeros((20, 478, 3), np.float32)
    lm[..., 0] = rng.uniform(800, 1000, (20, 478))  # a 200 px face right of centre in a 1920x1080 frame
    lm[..., 1] = rng.uniform(300, 550, (20, 478))
    crop = fixed_crop(lm, 1920, 1080)
    assert 0 <= crop.x0 and crop.x0 + crop.side <= 1920 and 0 <= crop.y0 and crop.y0 + crop.side <= 1080
    assert crop.x0 < 800 and crop.x0 + crop.side > 1000 and crop.y0 < 300 and crop.y0 + crop.side > 550
    frame = np.zeros((1080, 1920, 3), np.uint8)
    assert crop.apply(frame, 256).shape == (256, 256, 3)
    mapped = crop.to_crop_pixels(lm, 256)
    np.testing.assert_allclose(mapped[..., 0], (lm[..., 0] - crop.x0) * 256 / crop.side, rtol=1e-5)
    # a pixel centre maps to a pixel centre (continuous coordinates, camera.py)
    c = Crop(10, 20, 100)
    np.testing.assert_allclose(c.to_crop_pixels(np.array([[10.5, 20.5, 0]], np.float32), 200)[0, :2], [1.0, 1.0])


def test_small_frames_keep_the_whole_width():
    lm = np.zeros((5, 478, 3), np.float32)
    lm[..., 0] = np.linspace(30, 170, 478)
    lm[..., 1] = np.linspace(40, 210, 478)
    crop = fixed_crop(lm, 200, 278)  # the low-resolution clip's geometry
    assert crop.side == 200 and crop.x0 == 0 and 0 <= crop.y0 <= 78


def test_one_identity_with_two_faces_in_view(clip):
    """Two people: the larger face is kept in every frame, not whichever face is found first."""
    import cv2

    from talkinghead import media
    from talkinghead.face.landmarks import track

    big = media.read_frames(clip("may_en_5s.mp4"), 25)[:20]
    small = media.read_frames(clip("german_anchor_de_20s.mp4"), 25)[:20]
    canvas = np.full((20, 360, 640, 3), 127, np.uint8)
    for i in range(20):
        canvas[i, 20:200, 30:210] = cv2.resize(small[i], (180, 180), interpolation=cv2.INTER_AREA)  # left, small
        canvas[i, :, 280:640] = cv2.resize(big[i], (360, 360), interpolation=cv2.INTER_AREA)  # right, large
    lm = track(canvas)
    assert not np.isnan(lm).any()
    assert (lm[:, :, 0].mean(1) > 280).all()  # always the large face on the right
