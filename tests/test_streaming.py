"""Streaming inference (methods/streaming.py): features as the audio arrives, per-session method state.

Known answers: a local extractor streamed in 20 ms chunks gives exactly its offline raw rows; an utterance known
in full gives exactly the offline driving features; both methods' per-session streams render exactly what the
shared model renders offline, also when two sessions interleave. The live pocketsphinx rows differ from the
offline ones (windowed decoding, causal normalisation): the difference on real speech is bounded here and
measured in bench/bench_serve.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from talkinghead.audio.extractor import DatasetExtractor
from talkinghead.audio.features import AudioFeatures
from talkinghead.media import AUDIO_RATE
from talkinghead.methods.streaming import (DrivenAvatar, FeatureStream, _concat, num_frames_of, open_frame_stream,
                                           utterance_features)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FPS = 25.0


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Bursts of a 180 Hz buzz with harmonics, 3 per second: voiced/silent alternation the features see."""
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    rng = np.random.default_rng(seed)
    buzz = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 6))
    env = (np.sin(2 * np.pi * 3 * t) > 0).astype(float)
    return (0.2 * buzz * env + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def make_avatars(root: Path) -> dict[str, Path]:
    """A synthetic dataset whose head turns a little per frame (so the idle pose loop moves the picture) and a
    tiny avatar of each streaming method trained on it in seconds."""
    from test_gaussiantalker import _tiny_config
    from test_methods import write_synthetic_dataset

    from talkinghead import methods
    from talkinghead.data import Tracks
    from talkinghead.methods import get_method
    from talkinghead.methods.gaussianflametalk.config import make_config as gft_config
    from talkinghead.methods.trainer import train

    data = root / "data"
    data.mkdir(parents=True)
    write_synthetic_dataset(data)
    tracks = Tracks.load(data / "tracks.npz")
    for i in range(len(tracks.viewmats)):  # yaw by up to 12 degrees
        a = np.deg2rad(12) * np.sin(i / 5)
        R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], np.float32)
        tracks.viewmats[i, :3, :3] = R
    tracks.save(data / "tracks.npz")

    def gft_small(preset, variant):
        cfg = gft_config(preset, variant)
        cfg.data.size, cfg.data.audio_radius, cfg.data.mouth_crop = 64, 2, 32
        cfg.schedule.iterations, cfg.schedule.val_every, cfg.schedule.checkpoint_every = 20, 0, 0
        cfg.per_triangle, cfg.lip_per_triangle, cfg.num_shell = 1, 2, 200
        ft = cfg.flametalk
        ft.d_model, ft.heads, ft.encoder_layers, ft.context, ft.period, ft.iterations, ft.batch = 16, 2, 1, 8, 4, 5, 2
        return cfg

    saved = dict(methods._REGISTRY)
    try:
        gt = get_method("gaussiantalker")
        methods._REGISTRY["gaussiantalker"] = dataclasses.replace(gt, make_config=lambda p, v: _tiny_config(30, v))
        train(data, "gaussiantalker", root / "gt", preset="cpu-small", variant="fast", progress=False)
        gft = get_method("gaussianflametalk")
        methods._REGISTRY["gaussianflametalk"] = dataclasses.replace(gft, make_config=gft_small)
        train(data, "gaussianflametalk", root / "gft", preset="cpu-small", progress=False)
    finally:
        methods._REGISTRY.clear()
        methods._REGISTRY.update(saved)
    return {"gt": root / "gt", "gft": root / "gft"}


@pytest.fixture(scope="session")
def avatars(tmp_path_factory) -> dict[str, Path]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_avatars(tmp_path_factory.mktemp("stream_avatars"))
    finally:
        torch.set_num_threads(before)


def _local_extractor(wave: np.ndarray, fps: float, num_frames: int) -> AudioFeatures:
    """A known-answer extractor: per frame, the mean and the log power of the audio within +-0.5 / fps."""
    times = np.arange(num_frames) / fps
    rows = []
    for t in times:
        a, b = int(max(0, round((t - 0.5 / fps) * AUDIO_RATE))), int(round((t + 0.5 / fps) * AUDIO_RATE))
        seg = wave[a:b] if b > a else np.zeros(1, np.float32)
        rows.append([seg.mean() if seg.size else 0.0, np.log((seg.astype(np.float64) ** 2).mean() + 1e-9) if seg.size else -20])
    rows = np.asarray(rows, np.float32).reshape(num_frames, 2)
    post = np.zeros((num_frames, 40), np.float32)
    post[:, 0] = 1
    return AudioFeatures(fps=fps, mel=rows, energy=rows[:, 1] * 10, phone_ids=np.ones(num_frames, np.int64),
                         phone_posteriors=post)


def _stream(wave: np.ndarray, fs: FeatureStream, chunk: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All rows of ``wave`` pushed ``chunk`` samples at a time; also (samples pushed, rows out) after each push."""
    rows, trace, out = [], [], 0
    for i in range(0, len(wave), chunk):
        r = fs.push(wave[i:i + chunk])
        out += len(r) if r.size else 0
        trace.append((min(i + chunk, len(wave)), out))
        if r.size:
            rows.append(r)
    r = fs.flush()
    if r.size:
        rows.append(r)
    return np.concatenate(rows), trace


def test_feature_stream_gives_a_local_extractors_offline_rows_with_its_stated_lookahead():
    wave = speechlike(2.3)
    n = num_frames_of(len(wave), FPS)
    offline = _local_extractor(wave, FPS, n)
    for la, hop, ctx in ((0, 1, 2), (3, 5, 4), (2, 3, 1)):
        fs = FeatureStream(FPS, _local_extractor, lookahead=la, hop=hop, context=ctx)
        rows, trace = _stream(wave, fs, 320)  # 20 ms chunks
        assert rows.shape == (n, offline.stack().shape[1])
        raw = _concat(fs.raw)
        np.testing.assert_allclose(raw.mel, offline.mel, atol=1e-6)  # every raw row exactly as offline
        # normalisation is causal: the last row saw all rows, as offline does
        np.testing.assert_allclose(rows[-1], offline.stack()[-1], atol=1e-5)
        for samples, out in trace:  # a row is out once its look-ahead is in, at most hop - 1 rows late
            covered = int(np.floor(samples * FPS / AUDIO_RATE + 1e-9))
            if samples < len(wave):
                assert max(0, covered - la - hop + 1) <= out <= max(0, covered - la)
                assert out >= covered - fs.delay_frames


def test_utterance_features_equal_the_offline_driving_features():
    from talkinghead.methods.render import driving_features

    wave = speechlike(1.2, seed=1)
    np.testing.assert_array_equal(utterance_features(wave, FPS, DatasetExtractor()), driving_features(wave, FPS))


def test_live_pocketsphinx_rows_stay_close_to_the_offline_ones(clip):
    """Windowed decoding + causal normalisation vs the whole utterance: bounded on real speech."""
    from talkinghead.media import read_audio

    wave = read_audio(clip("speech_en_imagine_6s.wav"))[: 4 * AUDIO_RATE]
    off = utterance_features(wave, FPS, DatasetExtractor())
    live, _ = _stream(wave, FeatureStream(FPS, DatasetExtractor(keep_decoder=True), 3, 5, 20), 640)
    assert live.shape == off.shape
    late = slice(50, None)  # after 2 s the running speech statistics have settled
    mel_err = np.abs(live[late, 40:120] - off[late, 40:120]).mean()
    post_tv = np.abs(live[:, :40] - off[:, :40]).sum(1).mean() / 2
    assert mel_err < 0.25, mel_err  # 0.09 measured (normalised units; speech spreads ~1)
    assert post_tv < 0.35, post_tv  # 0.20 measured (total variation, 0..1)
    assert (live[:, :40].argmax(1) == off[:, :40].argmax(1)).mean() > 0.55


@pytest.mark.parametrize("name", ["gt", "gft"])
def test_session_streams_render_what_the_offline_renderer_does_also_interleaved(avatars, name):
    from talkinghead.methods.data import audio_windows
    from talkinghead.methods.render import driving_features, pingpong

    av = DrivenAvatar(avatars[name])
    wave = speechlike(0.8, seed=2)
    rows = utterance_features(wave, av.fps, av.extract)
    # offline: the model's own render over render_audio's conditions
    model = av.model
    if hasattr(model, "_stream"):
        from talkinghead.methods.gaussianflametalk.model import _Stream

        model._stream = _Stream()
    windows = audio_windows(driving_features(wave, av.fps), av.radius)
    with torch.no_grad():
        want = [model.render(av.store.condition(pingpong(j, len(av.store)), audio=windows[j])) for j in range(len(rows))]
        a, b = av.open_stream(), av.open_stream()
        for j in range(3):  # session b idles on silence first: its state must not leak into a
            b.render(av.condition(0, av.silence[None], j))
        got_a, got_b = [], []
        for j in range(len(rows)):
            got_a.append(a.render(av.condition(j, rows, j)))
            if j == 0:
                b.reset()
            got_b.append(b.render(av.condition(j, rows, j)))
    for j in range(len(rows)):
        torch.testing.assert_close(got_a[j], want[j])
        torch.testing.assert_close(got_b[j], want[j])
    assert a.lookahead == (av.radius if name == "gt" else 0)
    assert open_frame_stream(model, av.radius).lookahead == a.lookahead


def test_the_idle_row_is_the_training_clips_pauses(tmp_path):
    """The median row of the quietest 5 % (at least 10) of the training frames: a dataset whose frames get
    quieter one by one idles on the median of its last training frames."""
    from test_methods import write_synthetic_dataset

    from talkinghead.data import PreparedDataset
    from talkinghead.methods.streaming import pause_row

    write_synthetic_dataset(tmp_path)
    f = AudioFeatures.load(tmp_path / "audio_features.npz")
    T = f.num_frames
    f.energy = np.linspace(-60, -20, T).astype(np.float32)[::-1].copy()  # the last frames are the quietest
    f.save(tmp_path / "audio_features.npz")
    ds = PreparedDataset(tmp_path)
    train = ds.split_indices("train")
    quiet = train[-max(10, int(0.05 * len(train))):]
    np.testing.assert_allclose(pause_row(tmp_path), np.median(ds.audio_matrix[quiet], axis=0), atol=1e-6)
    assert pause_row(tmp_path)[-1] < np.median(ds.audio_matrix[train, -1])  # quieter than the clip's middle
