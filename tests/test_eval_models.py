"""LPIPS and SyncNet: the real architectures and weight loading, exercised with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkinghead.errors import UserError


def _save_lpips_files(folder, seed=0):
    """Random weights written in the published file layouts (torchvision AlexNet, lpips alex.pth)."""
    from talkinghead.eval.lpips import LPIPS

    torch.manual_seed(seed)
    model = LPIPS()
    for lin in model.lins:  # the published heads are non-negative
        lin[1].weight.data.abs_()
    state = model.state_dict()
    backbone = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.features.")}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # extra tensors of the full AlexNet are ignored
    heads = {f"lin{k}.model.1.weight": state[f"lins.{k}.1.weight"] for k in range(5)}
    torch.save(backbone, folder / "alexnet-owt-7be5be79.pth")
    torch.save(heads, folder / "alex.pth")
    return model


def test_lpips_loads_local_weights_and_is_zero_on_identical_images(tmp_path):
    from talkinghead.eval.lpips import find_weights, load_lpips, to_lpips_input

    ref = _save_lpips_files(tmp_path)
    found = find_weights(tmp_path)
    assert not isinstance(found, str)
    model = load_lpips(*found)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    with torch.no_grad():
        same = float(model(to_lpips_input(a), to_lpips_input(a)))
        diff = float(model(to_lpips_input(a), to_lpips_input(b)))
        assert diff == pytest.approx(float(ref(to_lpips_input(a), to_lpips_input(b))), rel=1e-5)
    assert same == 0.0 and diff > 0.0
    features = model.net(torch.zeros(1, 3, 224, 224))
    assert [f.shape[1] for f in features] == [64, 192, 384, 256, 256]


def test_lpips_without_weights_gives_a_reason(tmp_path, monkeypatch):
    from talkinghead.eval import lpips

    monkeypatch.delenv(lpips.LPIPS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    reason = lpips.find_weights(tmp_path / "nowhere")
    assert isinstance(reason, str) and "alex.pth" in reason


def test_lpips_rejects_wrong_files(tmp_path):
    from talkinghead.eval.lpips import load_lpips

    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "alexnet-owt-x.pth")
    torch.save({}, tmp_path / "alex.pth")
    with pytest.raises(UserError, match="features.0"):
        load_lpips(tmp_path / "alexnet-owt-x.pth", tmp_path / "alex.pth")


def test_syncnet_random_weights_run_the_offset_search(tmp_path):
    from talkinghead.eval.syncnet import SyncNet, find_weights, load_syncnet, mfcc, syncnet_offset

    torch.manual_seed(0)
    net = SyncNet()
    torch.save({f"__S__.{k}": v for k, v in net.state_dict().items()}, tmp_path / "syncnet_v2.model")
    path = find_weights(tmp_path / "syncnet_v2.model")
    model = load_syncnet(path)
    assert model.embed_audio(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (9, 224, 224, 3), dtype=np.uint8)
    wave = rng.standard_normal(16000).astype(np.float32) * 0.1
    offset, conf = syncnet_offset(model, crops, wave, max_offset=3)
    assert -3 <= offset <= 3 and np.isfinite(conf) and conf >= 0.0
    assert mfcc(wave).shape == (99, 13)  # 1 s: 25 ms frames every 10 ms
    assert isinstance(find_weights(None), str)


def test_syncnet_rejects_other_weights(tmp_path):
    from talkinghead.eval.syncnet import load_syncnet

    torch.save({"netcnnaud.0.weight": torch.zeros(3)}, tmp_path / "bad.model")
    with pytest.raises(UserError, match="not SyncNet weights"):
        load_syncnet(tmp_path / "bad.model")
