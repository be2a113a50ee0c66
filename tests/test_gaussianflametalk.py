"""GaussianFlameTalk end to end on a tiny synthetic dataset: build, train both stages, save, load, render."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from talkinghead.cli import main
from talkinghead.errors import UserError
from talkinghead.methods import get_method
from talkinghead.methods.data import FrameStore
from talkinghead.methods.gaussianflametalk.avatar import axis_angle_to_matrix, corrected_viewmat
from talkinghead.methods.gaussianflametalk.config import make_config
from talkinghead.methods.gaussianflametalk.model import retrain_flametalk
from talkinghead.methods.render import render_audio, render_split
from talkinghead.methods.trainer import load_model, train
from talkinghead.render.projection import quat_to_rotmat

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from test_methods import write_synthetic_dataset

    path = tmp_path_factory.mktemp("gft_synth")
    write_synthetic_dataset(path, T=40, test_frames=8)
    return path


def _tiny(monkeypatch, iterations: int):
    """cpu-small shrunk to seconds: 64^2, few Gaussians, a tiny FlameTalk."""
    import talkinghead.methods.gaussianflametalk as pkg

    def small(preset, variant):
        cfg = make_config(preset, variant)
        cfg.data.size, cfg.data.audio_radius, cfg.data.mouth_crop = 64, 2, 32
        cfg.schedule.iterations = iterations if variant != "flametalk" else 0
        cfg.schedule.val_every = cfg.schedule.checkpoint_every = 0
        cfg.per_triangle, cfg.lip_per_triangle, cfg.num_shell = 1, 2, 200
        ft = cfg.flametalk
        ft.d_model, ft.heads, ft.encoder_layers, ft.context, ft.period, ft.iterations, ft.batch = 16, 2, 1, 8, 4, 5, 2
        return cfg

    spec = get_method("gaussianflametalk")
    from dataclasses import replace

    from talkinghead.methods import register_method

    register_method(replace(spec, make_config=small))
    monkeypatch.setattr(pkg, "make_config", small)
    return spec


def test_axis_angle_and_pose_correction():
    v = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    R = axis_angle_to_matrix(v)
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64))
    angle = v.norm()
    q = torch.cat([torch.cos(angle / 2)[None], torch.sin(angle / 2) * v / angle])
    torch.testing.assert_close(R, quat_to_rotmat(q[None])[0])
    view = torch.eye(4, dtype=torch.float64)
    view[2, 3] = 1.0
    out = corrected_viewmat(view, torch.cat([torch.zeros(3), torch.tensor([0.0, 0.0, 0.1])]).double())
    assert out[2, 3] == pytest.approx(1.1)


def test_unknown_variant_is_a_user_error():
    with pytest.raises(UserError, match="variant"):
        make_config("cpu-small", "both")


def test_train_save_load_render_both_stages(synthetic, tmp_path, monkeypatch):
    spec = _tiny(monkeypatch, iterations=30)
    out = tmp_path / "avatar"
    log = train(synthetic, "gaussianflametalk", out, preset="cpu-small", progress=False)
    try:
        assert log["num_bound"] > 0 and log["num_shell"] > 0
        assert log["frames_with_corrections"] > 0 and "flametalk" in log
        assert np.isfinite(log["final"]["l1"])
        _, cfg, info, model, meta = load_model(out, expect_method="gaussianflametalk")
        assert bool(model.flametalk_trained)
        # The loaded model renders what the trained one saved: the avatar's Gaussians are identical.
        saved = json.loads((out / "train_log.json").read_text())
        assert saved["num_bound"] == model.avatar.num_bound
        store = FrameStore(synthetic, cfg.data, info=info, split="test", progress=False)
        img = model.render(store.condition(0))
        assert img.shape == (64, 64, 3) and torch.isfinite(img).all()
        # The head covers the centre of the frame; the border shows the backdrop.
        bd = store.condition(0).backdrop
        assert (img[28:36, 28:36] - bd[28:36, 28:36]).abs().mean() > 0.05
        torch.testing.assert_close(img[:2, :2], bd[:2, :2], atol=0.02, rtol=0)
        res = render_split(out, synthetic, "test", tmp_path / "test.mp4")
        assert res["frames"] == 8 and (tmp_path / "test.mp4").stat().st_size > 0
        # Cross-driven: new audio, poses replayed from the training frames.
        res = render_audio(out, synthetic / "audio.wav", tmp_path / "cross.mp4")
        assert res["frames"] == 40 and (tmp_path / "cross.mp4").stat().st_size > 0
        # An avatar saved before FlameTalk had its linear prior loads as a model without one.
        state = {k: v for k, v in model.state_dict().items() if k != "flametalk.prior_weight"}
        old = type(model)(copy.deepcopy(cfg), info, model.avatar, model.flametalk)
        old.load_state_dict(state)
        assert old.flametalk.cfg.prior_taps == 0 and old.flametalk.audio_prior(torch.zeros(1, 3, info.audio_dim)) is None
        # The FlameTalk stage re-run in place (the per-stage hook): the Gaussians are kept, FlameTalk changes.
        before = {k: v.clone() for k, v in model.state_dict().items()}
        retrain_flametalk(out, synthetic, {"d_model": 8, "iterations": 3}, progress=False)
        _, cfg2, _, model2, _ = load_model(out)
        assert cfg2.flametalk.d_model == 8 and model2.flametalk.cfg.d_model == 8
        torch.testing.assert_close(model2.avatar.local_means, before["avatar.local_means"])
        assert json.loads((out / "train_log.json").read_text())["flametalk"]["iterations"] == 3
        # The same hook from the command line: `train --stage flametalk` on a trained avatar.
        (out / "train_log.json").write_text(json.dumps({**saved, "flametalk": {}}))
        assert main(["train", str(synthetic), "--method", "gaussianflametalk", "--stage", "flametalk",
                     "--out", str(out)]) == 0
        assert json.loads((out / "train_log.json").read_text())["flametalk"]["iterations"] == 3
        # An avatar from before the linear prior (no prior_taps in its config, no prior_weight saved) renders as
        # it was trained, without one; retraining its FlameTalk gives it one.
        from safetensors.torch import load_file, save_file

        meta = json.loads((out / "config.json").read_text())
        del meta["config"]["flametalk"]["prior_taps"]
        (out / "config.json").write_text(json.dumps(meta))
        tensors = load_file(out / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if not k.endswith("flametalk.prior_weight")},
                  out / "model.safetensors", metadata={"method": "gaussianflametalk"})
        assert load_model(out)[3].flametalk.prior_weight is None
        retrain_flametalk(out, synthetic, {"iterations": 2}, progress=False)
        assert load_model(out)[3].flametalk.prior_weight is not None
    finally:
        from talkinghead.methods import register_method

        register_method(spec)


def test_streaming_flametalk_equals_offline_prediction(synthetic, monkeypatch):
    """render() drives FlameTalk frame by frame: the result matches the offline causal pass."""
    spec = _tiny(monkeypatch, iterations=0)
    try:
        from talkinghead.methods.gaussianflametalk.model import GaussianFlameTalk
        from talkinghead.methods.data import dataset_info, open_dataset

        cfg = get_method("gaussianflametalk").make_config("cpu-small", None)
        ds = open_dataset(synthetic, size=64)
        info = dataset_info(ds, 64)
        model = GaussianFlameTalk.build(cfg, info, dataset=ds).eval()
        torch.nn.init.normal_(model.flametalk.motion_decoder[-1].weight, std=1.0)
        store = FrameStore(synthetic, cfg.data, info=info, split="train", with_targets=False, progress=False)
        rng = np.random.default_rng(0)
        feats = rng.normal(0, 1, (20, info.audio_dim)).astype(np.float32)
        from talkinghead.methods.data import audio_windows

        windows = audio_windows(feats, cfg.data.audio_radius)
        stream = torch.stack([model.speech_for(store.condition(j % len(store), audio=windows[j])) for j in range(20)])
        offline = torch.as_tensor(model.flametalk.predict(feats))[:, model.flametalk.speech_idx]
        # the first frames differ (the edge-padded window stands in for unseen history), later ones agree
        torch.testing.assert_close(stream[cfg.data.audio_radius + 1:], offline[cfg.data.audio_radius + 1:],
                                   atol=1e-4, rtol=1e-4)
    finally:
        from talkinghead.methods import register_method

        register_method(spec)


def test_smoothed_corrections_average_trained_frames_only():
    from talkinghead.methods.gaussianflametalk.avatar import RiggedAvatar

    a = RiggedAvatar(num_frames=20, num_expression=2, num_vertices=3)
    with torch.no_grad():
        a.trained_frames[:15] = True
        a.pose_delta[:, 0] = 0.5
        a.pose_delta[:15, 1] = torch.tensor([1.0, -1.0] * 7 + [1.0])  # frame-to-frame noise
        a.pose_delta[15:] = 100.0  # untrained frames never contribute
        a.expression_delta[:15, 0] = torch.arange(15.0)  # a slow drift survives
    with torch.no_grad():
        pose, expr = a.smoothed_corrections(radius=2)
    torch.testing.assert_close(pose[:15, 0], torch.full((15,), 0.5))
    assert pose[2:13, 1].abs().max() <= 0.2 + 1e-6
    assert pose[14, 0] == pytest.approx(0.5)  # its window holds untrained frames 15, 16: ignored
    torch.testing.assert_close(expr[2:13, 0], torch.arange(2.0, 13.0))


def test_flametalk_variant_trains_only_flametalk(synthetic, tmp_path, monkeypatch):
    spec = _tiny(monkeypatch, iterations=10)
    try:
        log = train(synthetic, "gaussianflametalk", tmp_path / "ft", variant="flametalk", progress=False)
        assert log["iterations"] == 0 and log["stages"] == ["flametalk"] and "flametalk" in log
        assert log["frames_with_corrections"] == 0
        _, _, _, model, _ = load_model(tmp_path / "ft")
        assert bool(model.flametalk_trained)
    finally:
        from talkinghead.methods import register_method

        register_method(spec)


def test_stage_is_only_for_gaussianflametalk(synthetic, tmp_path, capsys):
    code = main(["train", str(synthetic), "--method", "gaussiantalker", "--stage", "avatar",
                 "--out", str(tmp_path / "a")])
    assert code == 2 and capsys.readouterr().err.startswith("error: --stage is for --method gaussianflametalk")
    assert not (tmp_path / "a").exists()
