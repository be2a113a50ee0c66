"""Talk3D: split convolutions + roll-out, the attention U-Net, novel-view cameras, and the method end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkinghead import camera
from talkinghead.errors import UserError
from talkinghead.methods import get_method
from talkinghead.methods.data import FrameStore
from talkinghead.methods.talk3d.unet import AttentionUNet, SplitConv, rollout, rollout_conv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rollout_puts_the_other_planes_on_the_shared_axes():
    R, C = 5, 1
    ax = torch.arange(R, dtype=torch.float32)
    planes = torch.zeros(1, 3, C, R, R)
    planes[0, 1, 0] = ax[None, :] * 10 + ax[:, None]  # xz: rows z, cols x -> mean over z = 10 x + 2
    planes[0, 2, 0] = ax[None, :] * 100 + ax[:, None] * 1000  # zy: rows y, cols z
    planes[0, 0, 0] = ax[:, None] * 7  # xy: rows y -> mean over x = 7 y
    out = rollout(planes)
    assert out.shape == (1, 3, 3 * C, R, R)
    x, y, z = ax, ax, ax
    # Plane xy: [own, xz averaged over z as a function of x (columns), zy averaged over z as a function of y (rows)]
    assert torch.allclose(out[0, 0, 1], (10 * x + 2)[None, :].expand(R, R))
    assert torch.allclose(out[0, 0, 2], (1000 * y + 200)[:, None].expand(R, R))
    # Plane xz (rows z, cols x): xy over y as a function of x; zy over y as a function of z (rows).
    assert torch.allclose(out[0, 1, 1], torch.full((R, R), 14.0))
    assert torch.allclose(out[0, 1, 2], (100 * z + 2000)[:, None].expand(R, R))
    # Plane zy (rows y, cols z): xy over x as a function of y (rows); xz over x as a function of z (columns).
    assert torch.allclose(out[0, 2, 1], (7 * y)[:, None].expand(R, R))
    assert torch.allclose(out[0, 2, 2], (z + 20)[None, :].expand(R, R))


@pytest.mark.parametrize("C,O,R", [(2, 3, 5), (4, 2, 8), (3, 5, 2)])
def test_rollout_conv_matches_the_plain_rollout_then_convolution(C, O, R):
    """The fast path (1-D convolutions for the blended thirds) against ``conv(rollout(x))``, gradients included."""
    torch.manual_seed(0)
    conv = SplitConv(3 * C, O).double()
    x = torch.randn(2, 3, C, R, R, dtype=torch.float64, requires_grad=True)
    ref = conv(rollout(x))
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), [x, conv.conv.weight, conv.conv.bias])
    out = rollout_conv(x, conv)
    got = torch.autograd.grad((out * g).sum(), [x, conv.conv.weight, conv.conv.bias])
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-11)


def test_split_convolution_keeps_the_planes_apart():
    torch.manual_seed(0)
    conv = SplitConv(2, 3)
    x = torch.randn(1, 3, 2, 6, 6)
    y = conv(x)
    x2 = x.clone()
    x2[0, 1] += 5.0
    y2 = conv(x2)
    assert y.shape == (1, 3, 3, 6, 6)
    assert torch.equal(y[0, 0], y2[0, 0]) and torch.equal(y[0, 2], y2[0, 2]) and not torch.equal(y[0, 1], y2[0, 1])


def test_unet_starts_at_zero_and_its_delta_depends_on_the_tokens():
    torch.manual_seed(0)
    net = AttentionUNet(plane_channels=4, resolution=16, channels=(4, 8, 16), layers=1, heads=2)
    planes = torch.randn(3, 4, 16, 16)
    tokens = torch.randn(2, 5, 16)
    delta, attn = net(net.encode(planes), tokens)
    assert delta.shape == (2, 3, 4, 16, 16) and attn.shape == (2, 3 * 4 * 4, 5)
    assert float(delta.detach().abs().max()) == 0.0  # the last convolution starts at zero: training starts from P_ID
    assert torch.allclose(attn.sum(-1), torch.ones(2, 48), atol=1e-5)
    delta.sum().backward()
    assert float(net.out.conv.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        net.out.conv.weight.normal_()
    delta, _ = net(net.encode(planes), tokens)
    assert not torch.allclose(delta[0], delta[1])  # different tokens, different deltaplanes


def test_orbit_moves_the_camera_on_a_sphere_about_the_pivot():
    vm = camera.viewmat(np.eye(3), np.array([0.01, -0.02, 0.8]))
    pivot = np.array([0.0, 0.03, 0.08], np.float32)
    assert np.allclose(camera.orbit(vm, 0, 0, pivot), vm)

    def centre(m):
        return -(m[:3, :3].T @ m[:3, 3])

    r0 = np.linalg.norm(centre(vm) - pivot)
    for yaw, pitch in ((30, 0), (-15, 10), (0, -20)):
        m = camera.orbit(vm, yaw, pitch, pivot)
        assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-6)
        assert np.linalg.norm(centre(m) - pivot) == pytest.approx(r0, abs=1e-5)
        # The pivot stays where the camera saw it (the camera orbits, it does not pan).
        assert np.allclose(m[:3, :3] @ pivot + m[:3, 3], vm[:3, :3] @ pivot + vm[:3, 3], atol=1e-5)
        ang = np.degrees(np.arccos(np.clip(np.dot(*(v / np.linalg.norm(v) for v in
                                                    (centre(m) - pivot, centre(vm) - pivot))), -1, 1)))
        assert ang == pytest.approx(np.degrees(np.arccos(np.cos(np.radians(yaw)) * np.cos(np.radians(pitch)))),
                                    abs=1.5)
    assert centre(camera.orbit(vm, 30, 0, pivot))[0] > centre(vm)[0] + 0.1  # +yaw: towards +x
    assert centre(camera.orbit(vm, 0, 20, pivot))[1] < centre(vm)[1] - 0.1  # +pitch: up (-y)


def test_head_pivot_sits_behind_the_face():
    v = np.random.default_rng(0).normal(size=(478, 3)) * [0.07, 0.09, 0.02]
    v[1] = [0.0, 0.0, -0.06]  # the nose tip, towards the camera (-z)
    p = camera.head_pivot(v)
    assert p[2] > v[:, 2].mean() + 0.03


# ------------------------------------------------------------------------------------------ the method


def _tiny(iterations: int):
    from talkinghead.methods.talk3d.config import make_config

    cfg = make_config("cpu-small", None)
    cfg.data.size, cfg.data.audio_radius = 64, 2
    # No mouth crop: the synthetic frames are 64^2 at full size, so a 64-pixel crop would be the whole frame.
    cfg.data.mouth_crop = 0
    cfg.schedule.iterations, cfg.schedule.val_every, cfg.schedule.checkpoint_every = iterations, 0, 0
    cfg.plane_resolution, cfg.plane_channels, cfg.render_size, cfg.sr_channels = 16, 4, 32, (8,)
    cfg.num_coarse, cfg.num_fine, cfg.feature_channels, cfg.unet_channels = 6, 6, 8, (4, 8)
    cfg.decoder_hidden, cfg.attention_heads = 16, 2
    cfg.static_fraction, cfg.sr_fraction = 0.45, 0.1
    return cfg


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from test_methods import write_synthetic_dataset

    path = tmp_path_factory.mktemp("talk3d_synth")
    write_synthetic_dataset(path, T=24, test_frames=4)
    return path


def test_fresh_model_is_the_backdrop_outside_the_head_box_and_tokens_use_the_tracked_pose(synthetic):
    from talkinghead.data import PreparedDataset

    spec = get_method("talk3d")
    cfg = _tiny(10)
    store = FrameStore(synthetic, cfg.data, progress=False)
    model = spec.build(cfg, store.info, dataset=PreparedDataset(synthetic, size=64)).eval()
    cond = store.condition(0)
    cond.backdrop = torch.full_like(cond.backdrop, 0.25)
    cond.viewmat = cond.viewmat.clone()
    cond.viewmat[2, 3] = 2.0  # far enough that the head box leaves the image corners empty
    with torch.no_grad():
        img = model.render(cond)
        vol = model.volume(model.p_id, cond, perturb=False)
    assert img.shape == (64, 64, 3)
    assert float(vol["alpha"][16, 16]) > 0.05 and float(vol["alpha"][0, 0]) == 0.0  # head box vs corner
    assert torch.allclose(img[:2, :2], torch.full((2, 2, 3), 0.25))
    # Asked for another size (the renderer's --size), the same picture comes back at that size.
    import dataclasses

    big = dataclasses.replace(cond, K=cond.K.clone(), backdrop=torch.full((128, 128, 3), 0.25))
    big.K[:2] *= 2
    with torch.no_grad():
        img2 = model.render(big)
    assert img2.shape == (128, 128, 3)
    down = torch.nn.functional.avg_pool2d(img2.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
    assert float((down - img).abs().mean()) < 0.02
    # A novel view moves the camera, not the tokens: t_rot reads the tracked pose.
    moved = torch.from_numpy(camera.orbit(cond.viewmat.numpy(), 20, 0, np.zeros(3, np.float32)))

    novel = dataclasses.replace(cond, viewmat=moved, tracked_viewmat=cond.viewmat)
    with torch.no_grad():
        assert torch.equal(model.tokens(novel), model.tokens(cond))
        assert not torch.equal(model.render(novel), img)


def test_talk3d_trains_through_the_shared_trainer_and_renders_novel_views(synthetic, tmp_path, monkeypatch):
    from talkinghead.methods.render import render_split
    from talkinghead.methods.talk3d import config as t3config
    from talkinghead.methods.trainer import load_model, train

    import dataclasses as dc

    import talkinghead.methods as registry

    spec = get_method("talk3d")
    monkeypatch.setitem(registry._REGISTRY, "talk3d", dc.replace(spec, make_config=lambda p, v: _tiny(12)))
    log = train(synthetic, "talk3d", tmp_path / "av", iterations=12, progress=False)
    assert log["iterations"] == 12 and "off" in log["id_loss"] and "off" in log["sync_loss"]
    assert log["stages"]["audio"][0] == 5 and log["stages"]["sr"][0] == 11
    _, cfg, _, model, _ = load_model(tmp_path / "av")
    assert bool(model.audio_on) and isinstance(cfg, t3config.Talk3DConfig)
    res = render_split(tmp_path / "av", synthetic, "test", tmp_path / "v.mp4", yaw=25.0, pitch=-10.0)
    assert res["frames"] == 4 and res["yaw"] == 25.0 and res["method"] == "talk3d"
    with pytest.raises(UserError, match="outside"):
        render_split(tmp_path / "av", synthetic, "test", tmp_path / "w.mp4", yaw=95.0)
    assert not (tmp_path / "w.mp4").exists()
    # The CLI: one error line, exit 2, for a view beyond 90 degrees and for an avatar of another method.
    from test_methods import _cli, _one_error_line

    _one_error_line(_cli("render", str(tmp_path / "av"), "--split", "test", "--pitch", "-120",
                         "--out", str(tmp_path / "p.mp4")), "outside [-90, 90]")
    _one_error_line(_cli("train", str(synthetic), "--method", "gaussiantalker", "--resume",
                         "--out", str(tmp_path / "av")), "holds a 'talk3d' avatar")
    _one_error_line(_cli("render", str(tmp_path / "av"), "--split", "test", "--data", str(tmp_path),
                         "--out", str(tmp_path / "d.mp4")), "not a prepared dataset")


@pytest.mark.parametrize("preset", ["cpu-small", "gpu"])
def test_presets_build_consistent_models_and_round_trip_through_json(preset):
    from talkinghead.methods.base import DatasetInfo, config_from_dict, config_to_dict
    from talkinghead.methods.talk3d import Talk3D
    from talkinghead.methods.talk3d.config import Talk3DConfig, make_config

    cfg = make_config(preset, None)
    assert config_from_dict(Talk3DConfig, config_to_dict(cfg)) == cfg
    info = DatasetInfo(num_frames=10, fps=25.0, size=cfg.data.size, audio_dim=7, audio_names=["a"] * 7)
    model = Talk3D(cfg, info)
    assert model.sr.factor * cfg.render_size == cfg.data.size
    assert model.p_id.shape == (3, cfg.plane_channels, cfg.plane_resolution, cfg.plane_resolution)
    with pytest.raises(UserError):
        make_config(preset, "fast")


def test_frame_bank_remembers_each_frame_once_and_samples_whole_rows():
    from talkinghead.methods.replay import FrameBank

    bank = FrameBank(seed=0)
    with pytest.raises(ValueError, match="empty"):
        bank.sample(2)
    w = torch.ones(2, requires_grad=True)
    bank.add(3, w * torch.tensor([1.0, 2.0]), torch.tensor(3.0))
    bank.add(3, torch.tensor([9.0, 9.0]), torch.tensor(9.0))  # frame 3 is already held: ignored
    bank.add(5, torch.tensor([4.0, 5.0]), torch.tensor(6.0))
    assert len(bank) == 2
    a, b = bank.sample(64)
    assert a.shape == (64, 2) and b.shape == (64,) and not a.requires_grad
    assert {(tuple(x.tolist()), float(y)) for x, y in zip(a, b)} == {((1.0, 2.0), 3.0), ((4.0, 5.0), 6.0)}
    with pytest.raises(ValueError, match="2 tensors"):
        bank.add(7, torch.zeros(2))


def test_lip_code_targets_the_tracked_mouth_and_trains_the_audio_path_from_the_static_stage(synthetic):
    """The lip code's target is the lip/jaw vertices' displacement through the face model (known answer); in the
    static stage its loss is the only one that reaches the audio encoder (the U-Net is not applied yet), with
    the frame and the replayed ones; lambda_lipcode 0 leaves the audio encoder untouched."""
    import dataclasses

    from talkinghead.face.landmarks import MOUTH_VERTICES
    from talkinghead.methods.talk3d import Talk3D

    cfg = _tiny(10)
    store = FrameStore(synthetic, cfg.data, progress=False)
    torch.manual_seed(0)
    E, Vm = 2, len(MOUTH_VERTICES)
    basis = torch.randn(E, Vm, 3) * 1e-3
    box = torch.tensor([[-0.1, -0.2, -0.1], [0.1, 0.2, 0.1]])  # largest half-side 0.2 m: lip unit 2 mm
    info = dataclasses.replace(store.info, expression_dim=E)
    model = Talk3D(cfg, info, box=box, mouth_basis=basis)
    assert float(model.lip_unit) == pytest.approx(2e-3)
    assert torch.allclose(model.lip_target(torch.tensor([[0.0, 3.0]])), 3 * basis[1][None] / 2e-3)
    assert "mouth_basis" in model.state_dict()  # --resume rebuilds without the dataset
    model.optimizers()
    model.train()

    def step_grads(lam: float, k: int) -> tuple[dict, dict]:
        model.cfg.lambda_lipcode = lam
        model.zero_grad(set_to_none=True)
        b = store.batch(k)
        b.expression = torch.tensor([0.5 * k, -1.0])
        loss, logs = model.train_loss(b, 0)
        loss.backward()
        return logs, {n: p.grad for n, p in model.named_parameters()}

    logs, g = step_grads(0.0, 0)
    assert "lipcode" not in logs and all(g[n] is None for n in g if n.startswith(("audio_encoder", "lip_head")))
    logs, g = step_grads(1.0, 1)
    assert logs["lipcode"] > 0 and len(model._bank) == 1
    assert all(g[n] is not None and g[n].abs().sum() > 0 for n in g if n.startswith(("audio_encoder", "lip_head")))
    assert all(g[n] is None for n in g if n.startswith("unet."))  # static stage: no deltaplane yet
    step_grads(1.0, 2)
    assert len(model._bank) == 2  # frames 1 and 2 (with lambda 0 frame 0 was not banked)


def _synthetic_with_lip_tracks(path):
    """The synthetic clip (its mouth opening is in its audio's mel bands) with tracks whose expression is that
    opening and a face model whose one basis row moves the lip/jaw vertices down 1 cm per unit."""
    from test_methods import write_synthetic_dataset

    from talkinghead.data import FaceModel, Tracks
    from talkinghead.face.landmarks import MOUTH_VERTICES

    opening = write_synthetic_dataset(path, T=24, test_frames=4)
    tracks, fm = Tracks.load(path / "tracks.npz"), FaceModel.load(path / "face_model.npz")
    tracks.expression = np.stack([opening, np.zeros_like(opening)], 1).astype(np.float32)
    basis = np.zeros_like(fm.basis)
    basis[0, list(MOUTH_VERTICES), 1] = 0.01
    tracks.save(path / "tracks.npz")
    FaceModel(fm.neutral, basis, fm.triangles).save(path / "face_model.npz")
    return opening


def test_a_briefly_trained_deltaplane_moves_the_mouth_with_the_audio(tmp_path):
    """80 static + 160 audio-stage steps on 20 synthetic frames whose only per-frame signal is the audio (the lip
    token taught by the tracked lip code at first, then by the audio's prediction): the deltaplane varies between
    frames, the rendered mouth's darkness follows the opening (r > 0.5), and the widest frame's audio window
    moves the narrowest frame's mouth at least half way to the widest's."""
    from talkinghead.data import PreparedDataset
    from talkinghead.methods.talk3d import Talk3D

    opening = _synthetic_with_lip_tracks(tmp_path)
    cfg = _tiny(240)
    cfg.static_fraction, cfg.sr_fraction, cfg.lip_teacher = 1 / 3, 0.0, 1.0
    store = FrameStore(tmp_path, cfg.data, progress=False)
    torch.manual_seed(0)
    model = Talk3D.build(cfg, store.info, dataset=PreparedDataset(tmp_path, size=cfg.data.size))
    opts = model.optimizers()
    model.train()
    order = np.random.default_rng(0).integers(len(store), size=cfg.schedule.iterations)
    for step, k in enumerate(order):
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss, logs = model.train_loss(store.batch(int(k)), step)
        loss.backward()
        for o in opts:
            o.step()
        model.after_step(step)
    assert "lipcode" in logs
    model.eval()
    op = opening[store.indices]

    def darkness(img, box):
        x0, y0, x1, y1 = (int(v) for v in box.tolist())
        return float(1 - img[y0 - 2:y1 + 3, x0 - 2:x1 + 3].mean())

    with torch.no_grad():
        dark, deltas = [], []
        for k in range(len(store)):
            b = store.batch(k)
            dark.append(darkness(model.render(b.cond), b.mouth_box))
            deltas.append(model.planes(b.cond, audio=True)[0] - model.p_id)
        d = torch.stack(deltas)
        lo, hi = int(np.argmin(op)), int(np.argmax(op))
        b = store.batch(lo)
        swapped = model.render(store.condition(lo, audio=store.condition(hi).audio))
    assert float(d.std(0).square().mean().sqrt() / d.square().mean().sqrt()) > 0.01
    assert np.corrcoef(dark, op)[0, 1] > 0.5
    assert dark[hi] > dark[lo] and darkness(swapped, b.mouth_box) - dark[lo] > 0.5 * (dark[hi] - dark[lo])


def test_mouth_crop_is_rendered_on_the_frames_rays_and_its_loss_trains_the_renderer(synthetic):
    """The crop camera's volume render (at 1/sr-factor of the crop) is exactly the frame's volume render at the
    pixels the crop covers (same rays); a crop that is not a multiple of the SR factor is refused; the crop's L1
    is logged and reaches P_ID and the super-resolution in the static stage."""
    import dataclasses

    from talkinghead.data import PreparedDataset
    from talkinghead.methods.base import MouthCrop

    cfg = _tiny(10)
    store = FrameStore(synthetic, cfg.data, progress=False)
    torch.manual_seed(0)
    model = get_method("talk3d").build(cfg, store.info, dataset=PreparedDataset(synthetic, size=64)).eval()
    b = store.batch(0)
    s, r = model.sr.factor, cfg.render_size  # 2, 32
    dx, dy, h, w = 7, 11, 8, 12  # the crop: volume pixels [dy, dy + h) x [dx, dx + w)
    Kr = b.cond.K.clone()
    Kr[:2] *= r / b.cond.width
    Kc = Kr.clone()
    Kc[0, 2] -= dx
    Kc[1, 2] -= dy
    Kc[:2] *= s
    crop = MouthCrop(K=Kc, image=torch.rand(h * s, w * s, 3), backdrop=torch.rand(h * s, w * s, 3))
    with torch.no_grad():
        full = model.volume(model.p_id, b.cond, perturb=False)
        part = model.volume(model.p_id, b.cond, perturb=False, crop=crop)
    assert part["features"].shape == (h, w, cfg.feature_channels)
    assert float(part["alpha"].max()) > 0.05  # the crop sees the head
    assert torch.allclose(part["features"], full["features"][dy:dy + h, dx:dx + w], atol=1e-5)
    assert torch.allclose(part["alpha"], full["alpha"][dy:dy + h, dx:dx + w], atol=1e-5)
    odd = dataclasses.replace(crop, image=torch.rand(h * s + 1, w * s, 3))
    with pytest.raises(ValueError, match="multiple of the SR factor"):
        model.volume(model.p_id, b.cond, perturb=False, crop=odd)

    model.train()
    model.zero_grad(set_to_none=True)
    loss, logs = model.train_loss(dataclasses.replace(b, mouth=crop), 0)
    loss.backward()
    assert logs["lip"] > 0
    with_crop = (model.p_id.grad.clone(), model.sr.blocks[0].to_rgb.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    model.cfg.lambda_lip = 0.0
    loss, logs = model.train_loss(b, 0)
    loss.backward()
    assert "lip" not in logs
    assert not torch.allclose(with_crop[0], model.p_id.grad)
    assert not torch.allclose(with_crop[1], model.sr.blocks[0].to_rgb.weight.grad)


def test_lip_token_teacher_forcing_and_old_avatars(synthetic):
    """a_n = audio net + lip_proj(lip code): the audio's predicted code at render, the given (tracked) one when
    teacher-forced; the teacher probability is lip_teacher at the start of the audio stage, falls linearly and is
    0 outside it; a forced step leaves the lip head out of the photometric graph, an unforced one does not; a
    state dict from before the lip token loads with a zero projection (that model exactly)."""
    import dataclasses

    from talkinghead.face.landmarks import MOUTH_VERTICES
    from talkinghead.methods.talk3d import Talk3D

    cfg = _tiny(100)
    cfg.lambda_lipcode, cfg.lip_teacher = 0.0, 1.0
    store = FrameStore(synthetic, cfg.data, progress=False)
    torch.manual_seed(0)
    info = dataclasses.replace(store.info, expression_dim=2)
    model = Talk3D(cfg, info, mouth_basis=torch.randn(2, len(MOUTH_VERTICES), 3) * 1e-3)
    cond = store.condition(0)
    with torch.no_grad():
        enc = model.audio_encoder(cond.audio)
        lip = torch.randn(len(MOUTH_VERTICES), 3)
        assert torch.allclose(model.tokens(cond)[0], enc + model.lip_proj(model.lip_head(enc)), atol=1e-6)
        assert torch.allclose(model.tokens(cond, lip)[0], enc + model.lip_proj(lip.reshape(-1)), atol=1e-6)
        assert torch.equal(model.tokens(cond, lip)[1:], model.tokens(cond)[1:])
    a, s = model.stage_bounds()  # 45, 90
    assert model.teacher_probability(a - 1) == 0.0 and model.teacher_probability(s) == 0.0
    assert model.teacher_probability(a) == pytest.approx(1.0)
    assert model.teacher_probability((a + s) // 2) == pytest.approx(0.5, abs=0.03)

    model.optimizers()
    model.train()
    torch.nn.init.normal_(model.unet.out.conv.weight, std=0.05)  # a trained U-Net (its zero start passes no gradient)

    def lip_head_grad(teacher: float):
        model.cfg.lip_teacher = teacher
        model.zero_grad(set_to_none=True)
        loss, _ = model.train_loss(store.batch(1), a)
        loss.backward()
        return model.lip_head.weight.grad

    assert lip_head_grad(1.0) is None  # forced: the tracked code replaces the prediction
    g = lip_head_grad(0.0)
    assert g is not None and float(g.abs().sum()) > 0

    model.eval()
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("lip_proj.")}
    model.load_state_dict(old)
    assert float(model.lip_proj.weight.detach().abs().sum() + model.lip_proj.bias.detach().abs().sum()) == 0.0
    with torch.no_grad():
        assert torch.equal(model.tokens(cond)[0], model.audio_encoder(cond.audio))


def test_audio_region_keeps_the_audio_token_to_the_mouth_cells(synthetic):
    """region_cells (known answer): a point at a cell's centre selects that cell of each plane it projects onto,
    within the radius; in the U-Net only the selected cells attend to a_n (weight exactly 0 elsewhere, > 0 there);
    a state dict from before the region loads with every cell selected (the paper's unrestricted attention),
    and the attention mask, built once, follows it."""
    from talkinghead.data import PreparedDataset
    from talkinghead.methods.talk3d.unet import region_cells

    side = 4
    c = (torch.arange(side) + 0.5) / side * 2 - 1  # cell centres
    pt = torch.tensor([[c[1], c[2], c[3]]])  # x = col 1, y = row 2, z = 3 (xy: row y col x; xz: row z col x; zy: row y col z)
    cells = region_cells(side, pt, 0.5).reshape(3, side, side)
    expect = torch.zeros(3, side, side, dtype=torch.bool)
    expect[0, 2, 1] = expect[1, 3, 1] = expect[2, 2, 3] = True
    assert torch.equal(cells, expect)
    assert int(region_cells(side, pt, 1.01).reshape(3, side, side)[0].sum()) == 5  # the cell and its 4 neighbours

    cfg = _tiny(10)
    cfg.audio_region = 1.5
    store = FrameStore(synthetic, cfg.data, progress=False)
    model = get_method("talk3d").build(cfg, store.info, dataset=PreparedDataset(synthetic, size=64)).eval()
    sel = model.audio_cells
    assert 0 < int(sel.sum()) < sel.numel()
    with torch.no_grad():
        _, attn = model.planes(store.condition(0), audio=True)  # [3 R_b^2, 5]
    assert float(attn[~sel, 0].abs().max()) == 0.0 and float(attn[sel, 0].min()) > 0
    assert torch.allclose(attn.sum(1), torch.ones(attn.shape[0]))
    old = {k: v for k, v in model.state_dict().items() if k != "audio_cells"}
    model.load_state_dict(old)
    assert bool(model.audio_cells.all())
    with torch.no_grad():  # the mask built once follows the loaded cells
        _, attn = model.planes(store.condition(0), audio=True)
    assert float(attn[:, 0].min()) > 0


def test_mouth_replay_renders_remembered_frames_crops_through_one_batched_unet_call(synthetic):
    """The mouth replay: nothing in the static stage; from the audio stage each frame is remembered once, and a
    step draws ``mouth_replay`` remembered frames with their own crop and camera and (teacher-forced) their own
    tracked lip code; the batched U-Net call gives each of them exactly its one-frame planes; the replayed crops'
    loss is logged and reaches the audio path through the predicted lip code."""
    from talkinghead.data import PreparedDataset

    cfg = _tiny(100)
    cfg.data.mouth_crop = 32
    cfg.mouth_replay, cfg.replay_teacher, cfg.lip_teacher, cfg.lambda_lipcode = 3, 1.0, 1.0, 0.0
    store = FrameStore(synthetic, cfg.data, progress=False)
    torch.manual_seed(0)
    model = get_method("talk3d").build(cfg, store.info, dataset=PreparedDataset(synthetic, size=64))
    model.optimizers()
    model.train()
    torch.nn.init.normal_(model.unet.out.conv.weight, std=0.05)  # a trained U-Net: deltas differ between frames
    a, _ = model.stage_bounds()
    batches = [store.batch(k) for k in range(4)]
    by_index = {b.cond.index: b for b in batches}
    _, logs = model.train_loss(batches[0], a - 1)
    assert "replay" not in logs and len(model._crops) == 0  # static stage: no U-Net, no replay
    for k, b in enumerate(batches + batches[:1]):
        _, logs = model.train_loss(b, a)
        assert logs["replay"] > 0 and len(model._crops) == min(k + 1, 4)

    replay = model._replay(batches[1], a)  # teacher probability 1 at the audio stage's start
    assert len(replay) == 3
    with torch.no_grad():
        for cond, crop, lip in replay:
            src = by_index[cond.index]
            assert torch.equal(crop.image, src.mouth.image) and torch.equal(cond.viewmat, src.cond.viewmat)
            assert torch.equal(cond.audio, src.cond.audio)
            assert torch.allclose(lip, model.lip_target(src.expression[None])[0])
        tokens = torch.stack([model.tokens(c, l) for c, _, l in replay])
        batched, _ = model._edit(model.p_id.detach(), tokens)
        for k, (cond, _, lip) in enumerate(replay):
            one, _ = model.planes(cond, audio=True, lip=lip)
            assert torch.allclose(batched[k], one, atol=1e-5)
    assert len({c.index for c, _, _ in replay}) > 1 and not torch.allclose(batched[0], batched[1])

    # Unforced (the audio's own prediction of the code, as rendering uses), the replay trains the lip head too.
    model.cfg.lip_teacher = model.cfg.replay_teacher = 0.0
    assert all(lip is None for _, _, lip in model._replay(batches[2], a))

    def lip_head_grad(n: int) -> torch.Tensor:
        model.cfg.mouth_replay = n
        model._gen.manual_seed(1)
        model.zero_grad(set_to_none=True)
        loss, _ = model.train_loss(batches[2], a)
        loss.backward()
        return model.lip_head.weight.grad.clone()

    assert not torch.allclose(lip_head_grad(3), lip_head_grad(0))
