"""Every bad input of ``prepare``: one ``error:`` line on stderr, exit code 2, no traceback, nothing left at DIR."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from talkinghead import media


def _prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "talkinghead.cli", "prepare", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=300)


def _assert_refused(run: subprocess.CompletedProcess, out: Path, match: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert match in lines[0]
    assert "Traceback" not in run.stderr
    assert not (out.exists() and any(out.iterdir()))
    assert not (out.parent / f".{out.name}.partial").exists()


@pytest.fixture(scope="module")
def may_frames():
    from conftest import shared_clip

    path = shared_clip("may_en_5s.mp4")
    frames = media.read_frames(path, 25)[:, ::2, ::2]  # 256 x 256 is enough for the face mesh, and faster
    return frames, media.read_audio(path)


def _clip(path: Path, frames: np.ndarray, audio: np.ndarray | None) -> Path:
    media.write_video(path, frames, 25, audio=audio)
    return path


def test_missing_file(tmp_path):
    _assert_refused(_prepare(tmp_path / "nope.mp4", "--out", tmp_path / "ds"), tmp_path / "ds", "not found")


def test_not_a_video(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 100)
    _assert_refused(_prepare(fake, "--out", tmp_path / "ds"), tmp_path / "ds", "notes.mp4")


def test_no_audio_and_no_audio_option(tmp_path, may_frames):
    video = _clip(tmp_path / "mute.mp4", may_frames[0][:75], None)
    _assert_refused(_prepare(video, "--out", tmp_path / "ds"), tmp_path / "ds", "no audio track")


def test_clip_shorter_than_two_seconds(tmp_path, may_frames):
    frames, audio = may_frames
    video = _clip(tmp_path / "short.mp4", frames[:37], audio[: int(1.5 * 16000)])
    _assert_refused(_prepare(video, "--out", tmp_path / "ds"), tmp_path / "ds", "at least 2 s")


def test_no_face(tmp_path, may_frames):
    _, audio = may_frames
    rng = np.random.default_rng(0)
    blank = np.repeat(rng.integers(90, 110, (1, 256, 256, 3), dtype=np.uint8), 60, axis=0)
    video = _clip(tmp_path / "wall.mp4", blank, audio[: int(2.4 * 16000)])
    _assert_refused(_prepare(video, "--out", tmp_path / "ds"), tmp_path / "ds", "no face found")


def test_long_detection_gap_names_the_frames(tmp_path, may_frames):
    frames, audio = may_frames
    gap = frames[25:65].copy()
    gap[:] = 100  # 40 frames (1.6 s) without a face
    video = _clip(tmp_path / "gap.mp4", np.concatenate([frames[:25], gap, frames[65:100]]), audio[: 4 * 16000])
    run = _prepare(video, "--out", tmp_path / "ds")
    _assert_refused(run, tmp_path / "ds", "no face found in frames 25-64")


def test_silent_audio_option(tmp_path, may_frames):
    import soundfile

    silent = tmp_path / "silent.wav"
    soundfile.write(str(silent), np.zeros(16000 * 3, np.float32), 16000)
    video = _clip(tmp_path / "mute.mp4", may_frames[0][:75], None)
    _assert_refused(_prepare(video, "--out", tmp_path / "ds", "--audio", silent), tmp_path / "ds", "silent")


def test_unreadable_audio_option(tmp_path, may_frames):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    video = _clip(tmp_path / "mute.mp4", may_frames[0][:75], None)
    _assert_refused(_prepare(video, "--out", tmp_path / "ds", "--audio", broken), tmp_path / "ds", "broken.wav")


def test_existing_folder_of_something_else_is_refused(tmp_path, may_frames):
    frames, audio = may_frames
    video = _clip(tmp_path / "v.mp4", frames[:75], audio[: 3 * 16000])
    out = tmp_path / "ds"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    run = _prepare(video, "--out", out)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "not empty" in run.stderr
    assert (out / "thesis.tex").read_text() == "precious"


def test_unwritable_output(tmp_path, may_frames):
    frames, audio = may_frames
    video = _clip(tmp_path / "v.mp4", frames[:75], audio[: 3 * 16000])
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    _assert_refused(_prepare(video, "--out", blocker / "ds"), blocker / "ds", "cannot write")


def test_short_gap_is_interpolated_and_audio_option_is_used(tmp_path, may_frames):
    """The other side of two rules: a few frames without a face are filled and marked untracked, and a
    video without sound is prepared with --audio."""
    import soundfile

    from talkinghead.data import PreparedDataset
    from talkinghead.prepare.pipeline import sha256

    frames, audio = may_frames
    clip = frames[:75].copy()
    clip[30:34] = 100
    video = _clip(tmp_path / "blip.mp4", clip, None)
    wav = tmp_path / "speech.wav"
    soundfile.write(str(wav), audio[: 3 * 16000], 16000)
    run = _prepare(video, "--out", tmp_path / "ds", "--size", "128", "--audio", wav)
    assert run.returncode == 0, run.stderr
    ds = PreparedDataset(tmp_path / "ds")
    assert ds.meta["source"]["audio_sha256"] == sha256(wav)
    np.testing.assert_allclose(ds.audio_wave, audio[: 3 * 16000], atol=1e-4)
    tracked = ds.tracks.tracked
    assert not tracked[30:34].any() and tracked[:30].all() and tracked[34:].all()
    assert ds.meta["tracked_fraction"] == pytest.approx(71 / 75)
    lm = ds.tracks.landmarks
    np.testing.assert_allclose(lm[31], lm[29] + (lm[34] - lm[29]) * 2 / 5, atol=1e-3)
