"""GaussianTalker's parts (triplane, tokens, attention, attribute MLPs, initial points) and, end to end on a
synthetic clip whose mouth opens with the audio, that the deformation learns to follow the audio."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from talkinghead.face.landmarks import LIPS_INNER, LIPS_INNER_LOWER, LIPS_INNER_UPPER, LIPS_OUTER
from talkinghead import methods
from talkinghead.methods import get_method
from talkinghead.methods.data import FrameStore, audio_windows
from talkinghead.methods.replay import FrameBank
from talkinghead.methods.gaussiantalker.attention import SpatialAudioAttention, ViewpointEncoder
from talkinghead.methods.gaussiantalker.deformation import CanonicalMLP, DeformMLP
from talkinghead.methods.surface import base_log_scales, initial_points
from talkinghead.methods.trainer import load_model, train
from talkinghead.nn.audio import AudioEncoder
from talkinghead.nn.encoding import blink_encoding
from talkinghead.nn.triplane import Triplane

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_triplane_is_a_hadamard_product_of_bilinear_planes_concatenated_over_resolutions():
    tp = Triplane((4, 8), channels=3)
    x = torch.rand(50, 3) * 2 - 1
    f = tp(x)
    assert f.shape == (50, 6) and tp.out_dim == 6
    with torch.no_grad():
        tp.planes[0][1].zero_()  # the yz plane of the coarse level: its product vanishes, the fine one stays
    f = tp(x)
    assert torch.all(f[:, :3] == 0) and torch.all(f[:, 3:] > 0)
    # Bilinear: at a grid node the feature is the product of the three planes' node values.
    tp = Triplane((5,), channels=1)
    node = torch.tensor([[0.5, -1.0, 0.0]])  # grid index (3, 0, 2) with align_corners
    p = tp.planes[0][:, 0]
    want = p[0][0, 3] * p[1][2, 0] * p[2][3, 2]  # planes xy (row y, col x), yz (row z, col y), zx (row x, col z)
    torch.testing.assert_close(tp(node)[0, 0], want)


def test_triplane_gradients_reach_planes_and_positions():
    tp = Triplane((8, 16), channels=4, bounds=torch.tensor([[-0.1] * 3, [0.1] * 3]))
    x = (torch.rand(30, 3) * 0.1 - 0.05).requires_grad_(True)
    tp(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in tp.planes)


def test_tokens_and_attention_shapes_weights_and_gradients():
    d = 24
    enc = AudioEncoder(in_dim=10, dim=d)
    window = torch.randn(9, 10, requires_grad=True)
    a = enc(window)
    assert a.shape == (d,) and enc(torch.randn(3, 9, 10)).shape == (3, d)
    e = blink_encoding(torch.tensor([0.0, 1.0]))
    assert e.shape == (24,) and torch.allclose(e[:6], torch.zeros(6))  # sin(0) of the open right eye
    v = ViewpointEncoder(d)(torch.eye(4))
    tokens = torch.stack([a, torch.randn(d), v, torch.randn(d)])
    for layers in (1, 2):
        att = SpatialAudioAttention(d, layers=layers, heads=4)
        z, w = att(torch.randn(100, d), tokens)
        assert z.shape == (100, d) and w.shape == (100, 4)
        torch.testing.assert_close(w.sum(1), torch.ones(100))
        assert len(att.blocks) == layers
    z.sum().backward()
    assert window.grad.abs().sum() > 0  # the audio reaches every Gaussian's feature


def test_deformation_starts_at_the_canonical_head_and_canonical_heads_start_neutral():
    f = torch.randn(20, 16)
    out = DeformMLP(16, 32, num_sh=4)(f)
    assert set(out) == {"means", "scale", "rotation", "sh", "opacity"}
    assert all(torch.all(v == 0) for v in out.values()) and out["sh"].shape == (20, 4, 3)
    can = CanonicalMLP(16, 32, num_sh=4)(f)
    opac = torch.sigmoid(can["opacity"])
    assert torch.all((opac > 0.05) & (opac < 0.2))  # around 3DGS's initial 0.1
    assert torch.all(can["rotation"][:, 0] > 0.5)  # near the identity quaternion


def _mesh():
    from test_methods import _mesh

    return _mesh(np.random.default_rng(0))


def test_initial_points_cover_face_lips_mouth_and_head():
    v, tri = _mesh()
    pts = initial_points(v, tri, 3000, face_fraction=0.5, mouth_fraction=0.05, lip_weight=4.0, seed=1)
    assert pts.shape == (3000, 3) and np.isfinite(pts).all()
    np.testing.assert_array_equal(pts[:478], v)  # every mesh vertex is a Gaussian
    again = initial_points(v, tri, 3000, face_fraction=0.5, mouth_fraction=0.05, lip_weight=4.0, seed=1)
    np.testing.assert_array_equal(pts, again)
    # Lips get more points per area than the face on average.
    face = pts[:1500]
    lips = v[list(LIPS_OUTER)]
    lo, hi = lips.min(0)[:2], lips.max(0)[:2]
    in_lips = np.all((face[:, :2] > lo) & (face[:, :2] < hi), 1).mean()
    lips_area = np.prod(hi - lo)
    face_area = np.pi * 0.08**2
    assert in_lips / (lips_area / face_area) > 2.0
    # Mouth points sit inside the inner-lip ring, behind the lips (the camera looks along +z).
    mouth = pts[1500:1650]
    ring = v[list(LIPS_INNER)]
    assert np.all(np.abs(mouth[:, 0] - ring[:, 0].mean()) <= np.ptp(ring[:, 0]) / 2 + 1e-6)
    assert np.all(mouth[:, 2] >= ring[:, 2].mean() - 1e-6)
    # The head shell lies behind the face's front and does not cover it.
    head = pts[1650:]
    over_face = np.linalg.norm(head[:, :2], axis=1) < 0.07
    assert over_face.any() and np.all(head[over_face, 2] > -0.001)
    scales = base_log_scales(torch.from_numpy(pts)).exp()
    assert scales.shape == (3000, 1) and torch.all((scales > 1e-4) & (scales < 0.05))


def _tiny_config(iterations: int, variant=None):
    from talkinghead.methods.gaussiantalker.config import make_config

    cfg = make_config("cpu-small", variant)
    cfg.data.size, cfg.data.audio_radius, cfg.data.mouth_crop = 64, 2, 32
    cfg.schedule.iterations, cfg.schedule.val_every, cfg.schedule.checkpoint_every = iterations, 0, 0
    cfg.schedule.clip_seconds = cfg.schedule.clip_iterations = ()  # exactly `iterations`, whatever the clip
    cfg.num_gaussians, cfg.triplane_resolutions, cfg.triplane_channels, cfg.hidden = 1500, (16, 32), 8, 32
    cfg.canonical_fraction = 0.25
    return cfg


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from test_methods import write_synthetic_dataset

    path = tmp_path_factory.mktemp("gt_synth")
    opening = write_synthetic_dataset(path, T=48, test_frames=8)
    return path, opening


def test_fresh_model_renders_the_head_over_the_backdrop_and_deform_is_identity(synthetic):
    path, _ = synthetic
    spec = get_method("gaussiantalker")
    cfg = _tiny_config(10)
    store = FrameStore(path, cfg.data, progress=False)
    from talkinghead.data import PreparedDataset

    model = spec.build(cfg, store.info, dataset=PreparedDataset(path, size=64))
    cond = store.condition(0)
    cond.backdrop = torch.zeros_like(cond.backdrop)
    with torch.no_grad():
        a = model.gaussians(cond, deform=False)
        b = model.gaussians(cond, deform=True)
        img = model.render(cond)
    for k in ("means", "scales", "opacities", "sh", "quats"):
        torch.testing.assert_close(a[k], b[k])
    assert img.shape == (64, 64, 3)
    # The (grey) head covers the image centre, over a black backdrop, but not the corners.
    assert img[28:36, 28:36].mean() > 0.1
    assert img[:3, :3].max() < 0.01


def _mouth_darkness(model, store, audio_of) -> np.ndarray:
    """Mean darkness of the rendered mouth region per test frame, audio taken from ``audio_of(k)``."""
    out = []
    with torch.no_grad():
        for k in range(len(store)):
            img = model.render(store.condition(k, audio=audio_of(k)))
            out.append(1.0 - float(img[37:47, 26:38].mean()))
    return np.array(out)


def test_deformation_learns_the_audio_driven_mouth(synthetic, tmp_path, monkeypatch):
    """Trained end to end (both stages) through the shared trainer: on held-out frames the rendered mouth
    opens with the audio, and with the audio of one fixed frame it does not follow the opening."""
    path, opening = synthetic
    spec = get_method("gaussiantalker")
    tiny = dataclasses.replace(spec, make_config=lambda preset, variant: _tiny_config(240, variant))
    monkeypatch.setitem(methods._REGISTRY, "gaussiantalker", tiny)
    log = train(path, "gaussiantalker", tmp_path / "av", preset="cpu-small", variant="fast", progress=False)
    assert log["canonical_iterations"] == 60 and log["attention_layers"] == 1 and log["lpips"].startswith("off")
    _, cfg, info, model, _ = load_model(tmp_path / "av")
    store = FrameStore(path, cfg.data, info=info, split="test", with_targets=False, progress=False)
    truth = opening[store.indices]
    driven = _mouth_darkness(model, store, lambda k: None)
    fixed = _mouth_darkness(model, store, lambda k: store.windows[0])
    r = np.corrcoef(driven, truth)[0, 1]
    assert r > 0.8, (r, driven, truth)
    assert np.std(fixed) < 0.3 * np.std(driven)


def test_initial_points_binding_places_the_mesh_points_on_their_triangles():
    v, tri = _mesh()
    pts = initial_points(v, tri, 3000, face_fraction=0.5, mouth_fraction=0.05, lip_weight=4.0, seed=1)
    again, ids, bary = initial_points(v, tri, 3000, face_fraction=0.5, mouth_fraction=0.05, lip_weight=4.0,
                                      seed=1, binding=True)
    np.testing.assert_array_equal(pts, again)  # same points with or without the binding
    on_mesh = np.zeros(3000, bool)
    on_mesh[:1500] = True
    mouth = slice(1500, 1650)
    assert (bary.sum(1) > 0)[:1650].all() and not (bary.sum(1) > 0)[1650:].any()  # face + inner mouth, no head
    np.testing.assert_allclose(bary[:1650].sum(1), 1.0, atol=1e-6)
    assert (bary >= -1e-6).all()
    np.testing.assert_allclose((v[ids] * bary[..., None]).sum(1)[on_mesh], pts[on_mesh], atol=1e-6)
    # Inner-mouth points hang between an upper and a lower inner-lip vertex: the higher a point sits in the
    # cavity, the more it follows the upper lip.
    upper, lower = set(LIPS_INNER_UPPER), set(LIPS_INNER_LOWER)
    assert set(ids[mouth, 0]) <= upper and set(ids[mouth, 1]) <= lower
    down = np.sign(v[list(lower), 1].mean() - v[list(upper), 1].mean())
    assert np.corrcoef(down * pts[mouth, 1], bary[mouth, 1])[0, 1] > 0.99


def test_expression_supervision_targets_interpolate_the_triangle_displacements(synthetic):
    """Every Gaussian on a triangle touching a lip/chin vertex is supervised, towards the barycentric mix of
    its triangle's tracked vertex displacements."""
    from talkinghead.data import PreparedDataset
    from talkinghead.methods.gaussiantalker.model import MOUTH_VERTICES

    path, _ = synthetic
    cfg = _tiny_config(10)
    cfg.lip_prior = 0  # the network places them
    store = FrameStore(path, cfg.data, progress=False)
    model = get_method("gaussiantalker").build(cfg, store.info, dataset=PreparedDataset(path, size=64))
    pts, ids = model.geo_points, model.geo_vertices
    assert set(MOUTH_VERTICES) <= set(pts.tolist())  # the vertex Gaussians themselves
    assert len(pts) > len(MOUTH_VERTICES) and (pts >= 478).any()  # and points sampled on the triangles
    assert all(set(MOUTH_VERTICES) & set(row) for row in ids.tolist())
    # Displacement linear in x: the target of a triangle point is its own canonical position's displacement.
    with torch.no_grad():
        model.expression_basis.zero_()
        model.expression_basis[0, :, 1] = 0.01 * model.means[:478, 0]
    batch = store.batch(0)
    batch.expression = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        model.f_deform.apply(lambda m: torch.nn.init.zeros_(m.weight) if isinstance(m, torch.nn.Linear) else None)
        model.f_deform.apply(lambda m: torch.nn.init.zeros_(m.bias) if isinstance(m, torch.nn.Linear) else None)
        _, logs = model.train_loss(batch, step=10**6)
    # A mesh point's target is its own position's displacement; an inner-mouth point's the mix of its two
    # inner-lip vertices' (it lies between them, off the mesh).
    n_face = max(478, int(cfg.num_gaussians * cfg.face_fraction))
    x = model.means[pts, 0].clone()
    cavity = pts >= n_face
    assert cavity.any()
    x[cavity] = (model.means[ids[cavity], 0] * model.geo_weights[cavity]).sum(1)
    want = ((0.01 * x / model.offset_scale) ** 2).mean().item() / 3  # y of (x, y, z)
    assert logs["geo"] == pytest.approx(want, rel=1e-3)


def _model_with_offsets(path, cfg):
    """(FrameStore, GaussianTalker) on the synthetic clip: expression 0 moves every vertex 4 mm down and the
    deformation heads have random weights, so the network's offsets are non-zero and differ between frames."""
    from talkinghead.data import PreparedDataset

    store = FrameStore(path, cfg.data, progress=False)
    model = get_method("gaussiantalker").build(cfg, store.info, dataset=PreparedDataset(path, size=64))
    with torch.no_grad():
        model.expression_basis[0, :, 1] = 0.004
        for h in model.f_deform.heads.values():
            torch.nn.init.normal_(h.weight, std=0.5)
    return store, model


def test_geometry_loss_replays_earlier_training_frames(synthetic):
    """Each training frame is remembered once; the geometry loss averages the current frame with
    ``geo_replay`` remembered ones, deforming only the supervised Gaussians (same offsets as a full deform)."""
    cfg = _tiny_config(10)
    cfg.geo_replay, cfg.lip_prior = 3, 0
    store, model = _model_with_offsets(synthetic[0], cfg)  # non-zero offsets, so frames differ
    for k in (0, 1, 0, 2):
        model.train_loss(store.batch(k), step=0)  # canonical stage: frames are remembered already
    assert len(model._geo_bank) == 3
    # With every remembered frame identical to the current one, the replayed loss equals the frame's own.
    batch = store.batch(1)
    only = FrameBank()
    only.add(1, *model._geo_bank._rows[1])  # the bank keeps frames in the order first seen: 0, 1, 2
    model._geo_bank = only
    with torch.no_grad():
        _, logs = model.train_loss(batch, step=10**6)
        off = model.gaussians(batch.cond, deform=True)["offsets"][model.geo_points]
        want = model._geo_error(off, batch.expression).item()
    assert logs["geo"] == pytest.approx(want, rel=1e-4)


def test_expression_supervision_moves_the_mouth_vertices(synthetic):
    """In the deformation stage the lip/chin vertex Gaussians are pulled towards their tracked expression
    displacement: the loss measures it, and training moves them that way."""
    from talkinghead.data import PreparedDataset
    from talkinghead.methods.gaussiantalker.model import MOUTH_VERTICES

    path, _ = synthetic
    cfg = _tiny_config(10)
    cfg.lambda_lip, cfg.lambda_dssim, cfg.lip_prior = 0.0, 0.0, 0
    store = FrameStore(path, cfg.data, progress=False)
    model = get_method("gaussiantalker").build(cfg, store.info, dataset=PreparedDataset(path, size=64))
    with torch.no_grad():
        model.expression_basis[0, :, 1] = 0.004  # expression 0 moves every vertex 4 mm down
    batch = store.batch(0)
    batch.expression = torch.tensor([1.0, 0.0])
    loss, logs = model.train_loss(batch, step=10**6)
    assert logs["geo"] == pytest.approx((0.004 / model.offset_scale) ** 2 / 3, rel=1e-4)  # offsets start at 0
    # A few steps of training move the mouth vertices' Gaussians down (+y), towards the target.
    opt = model.optimizers()[0]
    for step in range(30):
        opt.zero_grad()
        model.train_loss(batch, step=10**6)[0].backward()
        opt.step()
    with torch.no_grad():
        off = model.gaussians(batch.cond, deform=True)["offsets"]
    assert off[list(MOUTH_VERTICES), 1].mean() > 0.001


def test_the_mouth_binding_is_saved_so_a_resumed_run_keeps_its_geometry_supervision(synthetic):
    from talkinghead.data import PreparedDataset

    path, _ = synthetic
    cfg = dataclasses.replace(_tiny_config(10), lip_prior=0)  # the network places them, by the geometry loss
    store = FrameStore(path, cfg.data, progress=False)
    model = get_method("gaussiantalker").build(cfg, store.info, dataset=PreparedDataset(path, size=64))
    assert len(model.geo_points) > 0
    empty = get_method("gaussiantalker").build(cfg, store.info)  # what --resume builds
    assert len(empty.geo_points) == 0
    empty.load_state_dict(model.state_dict())
    for name in ("geo_points", "geo_vertices", "geo_weights"):
        torch.testing.assert_close(getattr(empty, name), getattr(model, name))
    batch = store.batch(0)
    with torch.no_grad():
        assert "geo" in empty.train_loss(batch, step=10**6)[1]
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("geo_")}  # saved before
    again = get_method("gaussiantalker").build(cfg, store.info)
    again.load_state_dict(old)
    assert len(again.geo_points) == 0


def test_training_renders_the_lips_at_their_tracked_place_and_the_gradient_reaches_the_offsets(synthetic, monkeypatch):
    """With ``tracked_lips`` the deformation stage's training render puts the geometry-supervised Gaussians at
    canonical + tracked displacement (every other Gaussian where the network puts it), and the photometric loss
    alone (no geometry term) still trains the position offsets."""
    from talkinghead.methods.surface import mesh_displacement

    cfg = _tiny_config(10)
    cfg.lambda_lip, cfg.lip_prior = 0.0, 0
    store, model = _model_with_offsets(synthetic[0], cfg)  # the network's own offsets differ from the tracked
    batch = store.batch(0)
    batch.expression = torch.tensor([1.0, 0.0])
    seen = []
    raster = model._raster
    monkeypatch.setattr(model, "_raster", lambda g, *a, **k: (seen.append(g["means"]), raster(g, *a, **k))[1])
    loss, _ = model.train_loss(batch, step=10**6)
    net = model.gaussians(batch.cond, deform=True)["means"].detach()
    pts = model.geo_points
    want = model.means[pts] + mesh_displacement(batch.expression, model.expression_basis, model.geo_vertices,
                                                model.geo_weights)
    torch.testing.assert_close(seen[0][pts], want, atol=1e-6, rtol=0)
    assert (seen[0][pts] - net[pts]).abs().max() > 1e-3  # the network alone would have put them elsewhere
    rest = torch.ones(len(net), dtype=torch.bool)
    rest[pts] = False
    torch.testing.assert_close(seen[0][rest], net[rest])
    # Photometric gradient only: still reaches the position head through the moved points.
    model.zero_grad()
    l1 = (raster(model._at_tracked_place(model.gaussians(batch.cond, deform=True), batch.expression),
                 batch.cond.viewmat, batch.cond.K, batch.cond.backdrop) - batch.image).abs().mean()
    l1.backward()
    assert model.f_deform.heads["means"].weight.grad.abs().sum() > 0


class _LinearClip:
    """A dataset stand-in whose tracked expression is an exact linear map of the audio window (+ a constant)."""

    def __init__(self, T: int, D: int, E: int, radius: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.audio_matrix = rng.normal(0, 1, (T, D)).astype(np.float32)
        win = audio_windows(self.audio_matrix, radius).flatten(1).numpy()
        self.map = rng.normal(0, 0.3, (win.shape[1], E))
        expression = win @ self.map + 0.5
        self.tracks = type("Tracks", (), {"expression": expression.astype(np.float32)})()
        self._test = np.arange(T - 20, T)

    def split_indices(self, name: str) -> np.ndarray:
        return self._test if name == "test" else np.arange(self._test[0])


def test_lip_prior_recovers_a_linear_audio_to_expression_map_and_places_the_lips(synthetic):
    """The lip prior, fitted in closed form, recovers an exact linear audio -> expression map on held-out
    frames (its leading components; the rest at their training mean), and puts the geometry-bound Gaussians
    (only those) at that expression's displacement -- in training's deform and in the kept render state alike."""
    from talkinghead.data import PreparedDataset
    from talkinghead.methods.surface import mesh_displacement

    cfg = _tiny_config(10)
    cfg.lip_prior, cfg.prior_lambdas = 1, (1e-8, 1e4)
    store, model = _model_with_offsets(synthetic[0], cfg)  # random heads: the network would move every point
    clip = _LinearClip(1000, store.info.audio_dim, 2, cfg.data.audio_radius)  # more frames than window dims
    model._fit_lip_prior(clip)
    assert model.log_extras()["lip_prior"].startswith("1 expression components, ridge lambda 1e-08")
    test = clip.split_indices("test")
    win = audio_windows(clip.audio_matrix, cfg.data.audio_radius)[test]
    want = clip.tracks.expression[test].copy()
    want[:, 1] = clip.tracks.expression[clip.split_indices("train"), 1].mean()  # not predicted: its mean
    with torch.no_grad():
        got = mesh_displacement(torch.from_numpy(want), model.expression_basis, model.geo_vertices, model.geo_weights)
        torch.testing.assert_close(model._prior_offsets(win), got, atol=1e-5, rtol=1e-4)
        cond = store.condition(0, audio=win[0])
        g = model.gaussians(cond, deform=True)
        pts = model.geo_points
        torch.testing.assert_close(g["means"][pts], model.means[pts] + got[0], atol=1e-6, rtol=0)
        canonical = model.gaussians(cond, deform=False)["means"]
        rest = torch.ones(len(canonical), dtype=torch.bool)
        rest[pts] = False
        assert (g["means"][rest] - canonical[rest]).abs().max() > 1e-4  # the network moves the others
        model.eval()  # the render path's kept state gives the same Gaussians
        state = model._frozen.get(model)
        torch.testing.assert_close(model._render_gaussians(cond, state)["means"], g["means"], atol=1e-5, rtol=0)
    # No geometry loss to train F_deform for points it does not place; the training render has them tracked.
    model.train()
    batch = store.batch(0)
    _, logs = model.train_loss(batch, step=10**6)
    assert "geo" not in logs and len(model._geo_bank) == 0
    # Saved and loaded with the avatar; an avatar saved before the prior existed loads without it.
    again = get_method("gaussiantalker").build(cfg, store.info)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.prior_weight, model.prior_weight)
    old = get_method("gaussiantalker").build(dataclasses.replace(cfg), store.info)
    old.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prior_")})
    assert old.cfg.lip_prior == 0 and not old._lip_prior_on
