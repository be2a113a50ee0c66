"""The dataset reader on a small hand-built dataset with known contents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from talkinghead.audio.features import AudioFeatures
from talkinghead.data import FORMAT, FaceModel, PreparedDataset, Tracks, is_dataset
from talkinghead.errors import UserError

T, S, E = 6, 64, 3


def _write(path: Path) -> dict:
    import cv2
    import soundfile

    rng = np.random.default_rng(0)
    for name in ("images", "parsing", "torso"):
        (path / name).mkdir(parents=True)
    truth = {"images": [], "parsing": []}
    for i in range(T):
        image = np.full((S, S, 3), 40 * i, np.uint8)
        image[:, :, 1] = 200  # flat colours survive JPEG
        labels = np.zeros((S, S), np.uint8)
        labels[8:56, 8:56] = 1
        labels[10:30, 20:40] = 2
        labels[16:40, 24:36] = 3
        labels[30:34, 28:32] = 4
        cv2.imwrite(str(path / "images" / f"{i:06d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(path / "torso" / f"{i:06d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(path / "parsing" / f"{i:06d}.png"), labels)
        truth["images"].append(image)
        truth["parsing"].append(labels)
    cv2.imwrite(str(path / "background.png"), np.zeros((S, S, 3), np.uint8))
    K = np.array([[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]], np.float32)
    tracks = Tracks(landmarks=rng.uniform(0, S, (T, 478, 3)).astype(np.float32),
                    viewmats=np.repeat(np.eye(4, dtype=np.float32)[None], T, 0), K=K,
                    expression=rng.normal(size=(T, E)).astype(np.float32),
                    blink=rng.uniform(0, 1, (T, 2)).astype(np.float32),
                    mouth_opening=rng.uniform(0, 0.3, T).astype(np.float32), tracked=np.ones(T, bool))
    tracks.save(path / "tracks.npz")
    FaceModel(rng.normal(size=(478, 3)).astype(np.float32), rng.normal(size=(E, 478, 3)).astype(np.float32),
              np.array([[0, 1, 2]], np.int32)).save(path / "face_model.npz")
    features = AudioFeatures(fps=25.0, mel=np.arange(T * 4, dtype=np.float32).reshape(T, 4),
                             energy=np.linspace(-40, -20, T).astype(np.float32), phone_ids=np.ones(T, np.int64),
                             phone_posteriors=np.eye(T, 40, dtype=np.float32))
    features.save(path / "audio_features.npz")
    soundfile.write(str(path / "audio.wav"), np.zeros(int(T / 25 * 16000), np.float32), 16000, subtype="FLOAT")
    meta = {"format": FORMAT, "format_version": 1, "num_frames": T, "fps": 25.0, "size": [S, S],
            "split": {"train": [0, 5], "test": [5, 6]}}
    (path / "meta.json").write_text(json.dumps(meta))
    truth["tracks"], truth["features"] = tracks, features
    return truth


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds")
    return path, _write(path)


def test_fields_and_shapes(built):
    path, truth = built
    ds = PreparedDataset(path)
    assert is_dataset(path) and ds.num_frames == len(ds) == T and ds.fps == 25.0 and ds.size == S
    np.testing.assert_array_equal(ds.split_indices("train"), np.arange(5))
    np.testing.assert_array_equal(ds.split_indices("test"), [5])
    f = ds[2]
    assert f.index == 2 and f.image.shape == (S, S, 3) and f.image.dtype == np.float32
    assert np.abs(f.image * 255 - truth["images"][2]).max() < 4  # JPEG of flat colours
    np.testing.assert_array_equal(f.parsing, truth["parsing"][2])
    assert f.person.sum() == 48 * 48 and f.mouth.sum() == 16
    assert (f.head == (f.hair | f.face | f.mouth)).all() and not (f.torso & f.head).any()
    np.testing.assert_array_equal(f.landmarks, truth["tracks"].landmarks[2])
    assert f.expression.shape == (E,) and f.blink.shape == (2,) and f.viewmat.shape == (4, 4)
    assert ds.face_model.vertices(f.expression).shape == (478, 3)
    assert ds.audio_matrix.shape[0] == T and f.audio.shape == (2 * ds.audio_radius + 1, ds.audio_matrix.shape[1])
    assert ds.audio_wave.dtype == np.float32 and ds.background.shape == (S, S, 3)


def test_audio_window_is_edge_padded(built):
    path, _ = built
    ds = PreparedDataset(path)
    window = ds.audio_window(0, radius=2)
    np.testing.assert_array_equal(window[0], ds.audio_matrix[0])
    np.testing.assert_array_equal(window[1], ds.audio_matrix[0])
    np.testing.assert_array_equal(window[2:], ds.audio_matrix[:3])
    np.testing.assert_array_equal(ds.audio_window(T - 1, radius=1)[2], ds.audio_matrix[T - 1])


def test_reading_at_another_size_scales_everything(built):
    path, truth = built
    ds = PreparedDataset(path, size=S // 2)
    f = ds.frame(1)
    assert f.image.shape == (S // 2, S // 2, 3) and f.parsing.shape == (S // 2, S // 2)
    assert set(np.unique(f.parsing)) <= {0, 1, 2, 3, 4}  # nearest: no blended labels
    np.testing.assert_allclose(ds.K[0, 0], 50.0)
    np.testing.assert_allclose(ds.K[:2, 2], [16.0, 16.0])
    np.testing.assert_allclose(f.landmarks, truth["tracks"].landmarks[1] / 2, rtol=1e-6)
    np.testing.assert_array_equal(f.viewmat, truth["tracks"].viewmats[1])


def test_not_a_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError):
        PreparedDataset(tmp_path)


def test_unknown_split_and_frame_range(built):
    ds = PreparedDataset(built[0])
    with pytest.raises(UserError):
        ds.split_indices("val")
    with pytest.raises(IndexError):
        ds.frame(T)


def test_reader_needs_neither_cv2_nor_mediapipe(built):
    """Train and render run on GPU boxes without the prepare stack: the reader must not import it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['cv2'] = None; sys.modules['mediapipe'] = None; "
            "sys.modules['pocketsphinx'] = None\n"
            "from talkinghead.data import PreparedDataset\n"
            f"ds = PreparedDataset({str(built[0])!r}, size=32)\n"
            "f = ds.frame(3); print(f.image.shape, f.parsing.shape, f.audio.shape, ds.background.shape)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("(")[1].startswith("32, 32, 3)")
