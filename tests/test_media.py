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


def _lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> int:
    """The shift L (samples) maximising the cross-correlation of a[t + L] with b[t]: a is b delayed by L."""
    n = min(len(a), len(b)) - 2 * max_lag
    scores = [float(np.dot(a[max_lag + L: max_lag + L + n], b[max_lag: max_lag + n]))
              for L in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


@pytest.mark.parametrize("delay_s", [0.24, -0.2, 0.0])
def test_audio_placed_on_the_video_clock_when_it_starts_late_or_early(tmp_path, delay_s):
    """ffmpeg -itsoffset moves one stream of a clip (AAC with its priming samples and edit list, as our own
    mp4s): read_audio returns the sound where it plays against frame 0, found by cross-correlation with the
    original wave. The container's stream start times alone are off by the AAC priming (64 ms at 16 kHz)."""
    import subprocess

    import imageio_ffmpeg

    rate = media.AUDIO_RATE
    t = np.arange(4 * rate) / rate
    wave = (np.random.default_rng(0).standard_normal(len(t)) * 0.1 * (np.sin(2 * np.pi * 1.3 * t) > 0)).astype(np.float32)
    clip = tmp_path / "clip.mp4"
    media.write_video(clip, np.zeros((100, 32, 32, 3), np.uint8), 25, wave)
    moved = tmp_path / "moved.mp4"
    offset = ["-itsoffset", f"{abs(delay_s)}"]
    inputs = (["-i", str(clip)] + offset + ["-i", str(clip)]) if delay_s >= 0 else (offset + ["-i", str(clip),
                                                                                               "-i", str(clip)])
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *inputs, "-map", "0:v", "-map",
                    "1:a", "-c", "copy", str(moved)], check=True)
    back = media.read_audio(moved)
    assert abs(_lag(back, wave, 6000) - delay_s * rate) <= 2
    frames = media.read_frames(moved, 25)
    assert len(frames) >= 100 - 1  # the video itself is untouched
