"""The method spine: registry, configs, the shared loader, the trainer (checkpoints, resume), render, errors.

A tiny synthetic prepared dataset stands in for a real one (written here, following docs/dataset.md): a flat
face disc in front of the camera whose dark mouth opens with a known per-frame "audio" value. A toy method
registered in the test proves that a method plugs in with a config + a model and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from talkinghead.audio.features import AudioFeatures
from talkinghead.data import FORMAT, FaceModel, PreparedDataset, Tracks
from talkinghead.errors import UserError
from talkinghead.face.landmarks import FACE_OVAL, LIPS_INNER, LIPS_OUTER, NOSE_TIP
from talkinghead.methods import available_methods, get_method, register_method, render_split
from talkinghead.methods.base import DataConfig, MethodSpec, Schedule, config_from_dict, config_to_dict
from talkinghead.methods.data import FrameStore, audio_windows
from talkinghead.methods.render import pingpong, render_audio
from talkinghead.methods.trainer import load_model, train

SIZE, FPS = 64, 25.0
FACE_R = 0.08  # metres
DIST = 0.5  # camera distance, metres
FOCAL = 140.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def opening_signal(T: int) -> np.ndarray:
    """How open the synthetic mouth is per frame, in [0, 1] (two incommensurate sines: no simple period)."""
    t = np.arange(T)
    return (0.5 + 0.3 * np.sin(t * 0.9) + 0.2 * np.sin(t * 0.37 + 1.0)).clip(0, 1).astype(np.float32)


def _mesh(rng) -> tuple[np.ndarray, np.ndarray]:
    """478 vertices on a face disc (z = 0 plane, nose bumped forward) with lips/oval indices placed sensibly."""
    from scipy.spatial import Delaunay

    r = FACE_R * np.sqrt(rng.random(478))
    a = rng.random(478) * 2 * np.pi
    v = np.stack([r * np.cos(a), r * np.sin(a), np.zeros(478)], 1)
    ang = np.linspace(0, 2 * np.pi, len(LIPS_OUTER), endpoint=False)
    mouth_c = np.array([0.0, 0.035])
    v[list(LIPS_OUTER), :2] = mouth_c + np.stack([0.025 * np.cos(ang), 0.012 * np.sin(ang)], 1)
    v[list(LIPS_INNER), :2] = mouth_c + np.stack([0.018 * np.cos(ang), 0.006 * np.sin(ang)], 1)
    ang = np.linspace(0, 2 * np.pi, len(FACE_OVAL), endpoint=False)
    v[list(FACE_OVAL), :2] = FACE_R * np.stack([np.cos(ang), np.sin(ang)], 1)
    v[NOSE_TIP] = [0.0, 0.0, -0.02]  # towards the camera (camera looks along +z)
    tri = Delaunay(v[:, :2]).simplices.astype(np.int32)
    return v.astype(np.float32), tri


def write_synthetic_dataset(path: Path, T: int = 40, test_frames: int = 8, seed: int = 0) -> np.ndarray:
    """A prepared dataset of T frames at SIZE^2; returns the per-frame mouth opening in [0, 1]."""
    import cv2
    import soundfile

    rng = np.random.default_rng(seed)
    for name in ("images", "parsing", "torso"):
        (path / name).mkdir(parents=True, exist_ok=True)
    v, tri = _mesh(rng)
    K = np.array([[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]], np.float32)
    view = np.eye(4, dtype=np.float32)
    view[2, 3] = DIST
    open_ = opening_signal(T)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    c = SIZE / 2
    face_px = FOCAL * FACE_R / DIST
    mouth_y = c + FOCAL * 0.035 / DIST
    bg = np.array([90, 110, 140], np.uint8)
    lms = []
    for i in range(T):
        img = np.empty((SIZE, SIZE, 3), np.uint8)
        img[:] = bg
        face = (xx - c) ** 2 + (yy - c) ** 2 < face_px**2
        img[face] = (210, 160, 130)
        mouth = ((xx - c) / (0.02 * FOCAL / DIST)) ** 2 + ((yy - mouth_y) / (0.1 + 0.012 * open_[i] * FOCAL / DIST)) ** 2 < 1
        img[mouth] = (60, 20, 25)
        labels = np.where(face, 3, 0).astype(np.uint8)
        labels[mouth] = 4
        cv2.imwrite(str(path / "images" / f"{i:06d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 98])
        torso = np.empty_like(img)
        torso[:] = bg
        cv2.imwrite(str(path / "torso" / f"{i:06d}.jpg"), cv2.cvtColor(torso, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(path / "parsing" / f"{i:06d}.png"), labels)
        cam = v + view[:3, 3]
        lms.append(np.concatenate([cam[:, :2] / cam[:, 2:] * FOCAL + c, cam[:, 2:] * FOCAL], 1))
    cv2.imwrite(str(path / "background.png"), np.broadcast_to(bg[::-1], (SIZE, SIZE, 3)).copy())
    Tracks(landmarks=np.stack(lms).astype(np.float32), viewmats=np.repeat(view[None], T, 0), K=K,
           expression=np.zeros((T, 2), np.float32), blink=np.zeros((T, 2), np.float32),
           mouth_opening=open_, tracked=np.ones(T, bool)).save(path / "tracks.npz")
    FaceModel(v, np.zeros((2, 478, 3), np.float32), tri).save(path / "face_model.npz")
    post = np.zeros((T, 40), np.float32)
    post[:, 1] = 1.0
    mel = np.zeros((T, 80), np.float32)
    mel[:, :40] = open_[:, None] * 6.0  # stack() divides the mean-removed log-mel by 3
    AudioFeatures(fps=FPS, mel=mel, energy=np.full(T, -30.0, np.float32), phone_ids=np.ones(T, np.int64),
                  phone_posteriors=post).save(path / "audio_features.npz")
    t = np.arange(int(T / FPS * 16000)) / 16000
    soundfile.write(str(path / "audio.wav"), (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    meta = {"format": FORMAT, "format_version": 1, "num_frames": T, "fps": FPS, "size": [SIZE, SIZE],
            "split": {"train": [0, T - test_frames], "test": [T - test_frames, T]}}
    (path / "meta.json").write_text(json.dumps(meta))
    return open_


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(path)
    return path


# ------------------------------------------------------------------------------------------ a toy method


@dataclass
class ToyConfig:
    data: DataConfig = field(default_factory=lambda: DataConfig(size=SIZE, audio_radius=2))
    schedule: Schedule = field(default_factory=lambda: Schedule(iterations=30, val_every=10, checkpoint_every=10))
    lr: float = 0.05


class Toy(nn.Module):
    """An image plus an audio-driven offset: the smallest thing satisfying the Method protocol."""

    def __init__(self, cfg: ToyConfig, info):
        super().__init__()
        self.cfg = cfg
        self.image = nn.Parameter(torch.zeros(SIZE, SIZE, 3))
        self.audio = nn.Linear(info.audio_dim, 3)

    @classmethod
    def build(cls, cfg, info, dataset=None):
        return cls(cfg, info)

    def render(self, cond):
        image = self.image
        if (cond.height, cond.width) != tuple(image.shape[:2]):  # any render size (Method.render's contract)
            image = nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(cond.height, cond.width),
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        return torch.sigmoid(image + self.audio(cond.audio.mean(0))) * 0.5 + cond.backdrop * 0.5

    def optimizers(self):
        return [torch.optim.Adam(self.parameters(), lr=self.cfg.lr)]

    def train_loss(self, batch, step):
        loss = (self.render(batch.cond) - batch.image).abs().mean()
        return loss, {"l1": loss.item()}

    def after_step(self, step):
        pass


def _toy_config(preset, variant):
    return ToyConfig()


register_method(MethodSpec(name="toy", description="test method", config_type=ToyConfig,
                           make_config=_toy_config, build=Toy.build, presets=("cpu-small",)))


# ------------------------------------------------------------------------------------------ tests


def test_registry_lists_and_rejects():
    assert {"gaussiantalker", "toy"} <= set(available_methods())
    assert get_method("gaussiantalker").config_type.__name__ == "GaussianTalkerConfig"
    with pytest.raises(UserError, match="unknown method 'nope'.*gaussiantalker"):
        get_method("nope")


@pytest.mark.parametrize("preset", ["cpu-small", "gpu"])
@pytest.mark.parametrize("variant", [None, "fast"])
def test_gaussiantalker_config_round_trips_through_json(preset, variant):
    spec = get_method("gaussiantalker")
    cfg = spec.make_config(preset, variant)
    back = config_from_dict(spec.config_type, json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    assert cfg.attention_layers == (1 if variant == "fast" else 2)
    assert cfg.data.size == (128 if preset == "cpu-small" else 512)
    with pytest.raises(ValueError, match="no field"):
        config_from_dict(spec.config_type, {**config_to_dict(cfg), "bogus": 1})


def test_pingpong_never_jumps():
    seq = [pingpong(j, 4) for j in range(12)]
    assert seq == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert all(abs(a - b) == 1 for a, b in zip(seq, seq[1:]))
    assert [pingpong(j, 1) for j in range(3)] == [0, 0, 0]


def test_audio_windows_match_the_dataset_reader(dataset):
    ds = PreparedDataset(dataset)
    w = audio_windows(ds.audio_matrix, 3)
    assert w.shape == (ds.num_frames, 7, ds.audio_matrix.shape[1])
    for i in (0, 1, 20, ds.num_frames - 1):
        np.testing.assert_array_equal(w[i].numpy(), ds.audio_window(i, 3))


def test_frame_store_mouth_crop_camera_sees_the_lips(dataset):
    store = FrameStore(dataset, DataConfig(size=SIZE, audio_radius=2, mouth_crop=32), progress=False)
    b = store.batch(3)
    assert b.image.shape == (SIZE, SIZE, 3) and b.cond.audio.shape == (5, store.info.audio_dim)
    assert b.mouth.image.shape == (24, 32, 3)
    # The lips' landmarks, projected with the crop camera, land inside the crop.
    lm = PreparedDataset(dataset).tracks.landmarks[3][list(LIPS_OUTER), :2]
    s = b.mouth.K[0, 0] / store.K[0, 0]
    uv = (lm - store.K[:2, 2].numpy()) * s.item() + b.mouth.K[:2, 2].numpy()
    assert (uv > 0).all() and (uv[:, 0] < 32).all() and (uv[:, 1] < 24).all()
    # ... and the crop shows the dark mouth at its centre.
    assert b.mouth.image[12, 16].mean() < 0.35


def test_train_writes_an_avatar_and_resume_continues_exactly(dataset, tmp_path):
    full = train(dataset, "toy", tmp_path / "full", preset="cpu-small", progress=False)
    assert full["method"] == "toy" and full["iterations"] == 30 and full["train_time_s"] > 0
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "train_log.json", "loss.png",
                 "val/step_000010.png", "val/step_000030.png"):
        assert (tmp_path / "full" / name).is_file(), name
    log = json.loads((tmp_path / "full" / "train_log.json").read_text())
    assert log["method"] == "toy" and log["final"]["l1"] < 0.1
    # A run stopped at 20 iterations (its last checkpoint) and resumed ends with the same weights.
    train(dataset, "toy", tmp_path / "part", preset="cpu-small", iterations=20, progress=False)
    train(dataset, "toy", tmp_path / "part", preset="cpu-small", iterations=30, resume=True, progress=False)
    a = load_model(tmp_path / "full")[3].state_dict()
    b = load_model(tmp_path / "part")[3].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="already holds an avatar"):
        train(dataset, "toy", tmp_path / "full", preset="cpu-small", progress=False)
    with pytest.raises(UserError, match="'toy' avatar; cannot resume it as 'gaussiantalker'"):
        train(dataset, "gaussiantalker", tmp_path / "full", preset="cpu-small", resume=True, progress=False)


def test_render_split_and_driving_audio_make_mp4s_with_sound(dataset, tmp_path):
    import av

    train(dataset, "toy", tmp_path / "av", preset="cpu-small", iterations=5, progress=False)
    res = render_split(tmp_path / "av", None, "test", tmp_path / "test.mp4")
    assert res["frames"] == 8 and res["fps"] > 0
    wav = tmp_path / "drive.wav"
    import soundfile

    t = np.arange(int(2.2 * 16000)) / 16000
    soundfile.write(str(wav), (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32),
                    16000)
    res = render_audio(tmp_path / "av", wav, tmp_path / "drive.mp4")
    assert res["frames"] == int(np.ceil(2.2 * FPS))  # longer than the 32 training frames: the poses loop
    with av.open(str(tmp_path / "drive.mp4")) as c:
        assert c.streams.video and c.streams.audio
        assert c.streams.video[0].codec_context.width == SIZE
        assert abs(float(c.streams.audio[0].duration * c.streams.audio[0].time_base) - 2.2) < 0.1
    res = render_audio(tmp_path / "av", wav, tmp_path / "static.mp4", pose="static")
    assert res["frames"] == int(np.ceil(2.2 * FPS)) and res["pose"] == "static"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "talkinghead.cli", *args], capture_output=True, text=True, env=env)


def _one_error_line(p: subprocess.CompletedProcess, pattern: str) -> None:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert lines[-1].startswith("error: ") and pattern in lines[-1], p.stderr
    assert "Traceback" not in p.stderr


def test_bad_inputs_give_one_error_line_and_leave_nothing(dataset, tmp_path):
    _one_error_line(_cli("train", str(tmp_path), "--out", str(tmp_path / "a")), "not a prepared dataset")
    assert not (tmp_path / "a").exists()
    _one_error_line(_cli("render", str(dataset), "--split", "test", "--out", str(tmp_path / "x.mp4")),
                    "not an avatar folder")
    train(dataset, "toy", tmp_path / "av", preset="cpu-small", iterations=2, progress=False)
    silent = tmp_path / "silent.wav"
    import soundfile

    soundfile.write(str(silent), np.zeros(16000, np.float32), 16000)
    _one_error_line(_cli("render", str(tmp_path / "av"), "--audio", str(silent), "--out", str(tmp_path / "s.mp4")),
                    "silent")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    _one_error_line(_cli("render", str(tmp_path / "av"), "--audio", str(junk), "--out", str(tmp_path / "j.mp4")),
                    "cannot read")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _one_error_line(_cli("render", str(tmp_path / "av"), "--split", "test", "--out", str(locked / "o.mp4")),
                        "cannot write")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_error_line(_cli("render", str(tmp_path / "av"), "--split", "test", "--out", str(blocker / "o.mp4")),
                    "cannot write")
    _one_error_line(_cli("train", str(dataset), "--out", str(blocker / "av")), "cannot write")
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*.mp4"))


def test_schedule_follows_the_training_clip_length_when_the_preset_sets_knots(dataset, tmp_path):
    sched = Schedule(iterations=4000, clip_seconds=(10.0, 60.0), clip_iterations=(1500, 4000))
    assert [sched.for_clip(s) for s in (5.0, 10.0, 35.0, 60.0, 71.0)] == [1500, 1500, 2750, 4000, 4000]
    assert Schedule(iterations=123).for_clip(5.0) == 123  # no knots: the preset's count

    def clip_config(preset, variant):
        return ToyConfig(schedule=Schedule(iterations=30, val_every=0, clip_seconds=(1.0, 2.0),
                                           clip_iterations=(10, 20)))

    register_method(MethodSpec(name="toy-clip", description="test method", config_type=ToyConfig,
                               make_config=clip_config, build=Toy.build, presets=("cpu-small",)))
    seconds = len(PreparedDataset(dataset).split_indices("train")) / FPS  # 32 frames: 1.28 s
    log = train(dataset, "toy-clip", tmp_path / "clip", preset="cpu-small", progress=False)
    assert log["iterations"] == round(10 + (seconds - 1.0) * 10) == 13
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["config"]["schedule"]["iterations"] == 13
    log = train(dataset, "toy-clip", tmp_path / "explicit", preset="cpu-small", iterations=4, progress=False)
    assert log["iterations"] == 4  # --iterations wins
