import numpy as np
import pytest

from conftest import shared_clip
from talkinghead import media
from talkinghead.errors import UserError


def test_write_read_round_trip_keeps_audio_aligned(tmp_path):
    wave = np.zeros(2 * media.AUDIO_RATE, np.float32)
    wave[media.AUDIO_RATE : media.AUDIO_RATE + 100] = 0.9  # a click at exactly 1.0 s
    frames = np.zeros((50, 64, 48, 3), np.uint8)
    frames[25:] = 200  # the picture changes at 1.0 s too
    path = tmp_path / "clip.mp4"
    assert media.write_video(path, frames, 25, wave) == 50
    back = media.read_audio(path)
    assert abs(int(np.argmax(np.abs(back))) - media.AUDIO_RATE) < 0.002 * media.AUDIO_RATE
    video = media.read_frames(path, 25)
    assert video.shape == (50, 64, 48, 3)
    assert video[24].mean() < 50 and video[25].mean() > 150


@pytest.mark.parametrize("name", ["retalk_man_suit_6s.mp4", "lowres_woman_11s_200x278_29.97fps.mp4"])
def test_odd_frame_rates_resample_to_duration_times_fps(name):
    path = shared_clip(name)
    info = media.probe(path)
    frames = media.read_frames(path, 25)
    assert abs(len(frames) - info.duration_s * 25) <= 1
    assert frames.shape[1:] == (info.height, info.width, 3)


def test_not_a_media_file_is_a_user_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video" * 100)
    with pytest.raises(UserError, match="cannot read"):
        media.probe(junk)
    with pytest.raises(UserError, match="not found"):
        media.read_audio(tmp_path / "missing.wav")


def test_outputs_get_default_permissions_not_private_temp_ones(tmp_path):
    """Atomic writes go through mkstemp (0600); the finished files must have the usual 0666 & ~umask."""
    import os

    from talkinghead.methods.trainer import save_tensors_atomic, write_json_atomic

    old = os.umask(0o022)
    try:
        media.write_video(tmp_path / "a.mp4", np.zeros((3, 16, 16, 3), np.uint8), 25)
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        import torch

        save_tensors_atomic(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("a.mp4", "a.json", "a.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
