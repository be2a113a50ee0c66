"""DEGSTalk: hair plate and region masks, face-model inputs, the fields, stages, densification with embeddings,
persistence, and the method end to end on the synthetic dataset of test_methods."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from talkinghead.methods import get_method
from talkinghead.methods.base import config_from_dict, config_to_dict
from talkinghead.methods.data import FrameStore, open_dataset
from talkinghead.methods.degstalk.config import VARIANTS, DEGSTalkConfig, make_config
from talkinghead.methods.degstalk.expression import jaw_functional, upper_face_projection, upper_face_vertices
from talkinghead.methods.degstalk.model import DEGSTalk, _mouth_window
from talkinghead.methods.degstalk.plate import (MOUTH, dilate, erode, face_field_target, fill_holes, hair_plate,
                                                mouth_field_background, mouth_opacity, pixels, region_masks)
from talkinghead.methods.surface import mesh_displacement
from talkinghead.render import rasterize
from talkinghead.methods.trainer import load_model, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dilate_and_erode_are_square_max_pools():
    m = torch.zeros(7, 7)
    m[3, 3] = 1
    assert dilate(m, 1).sum() == 9 and dilate(m, 1)[2:5, 2:5].all() and dilate(m, 0).equal(m)
    block = dilate(m, 2)  # 5x5
    assert erode(block, 1).sum() == 9 and erode(block, 2).equal(m)


def test_hair_plate_keeps_the_hair_and_the_face_border_band_over_the_backdrop():
    labels = torch.zeros(8, 8, dtype=torch.uint8)
    labels[:, :2] = 2  # hair (ears count too: same label)
    labels[1:7, 2:8] = 3  # face 6 x 6
    labels[3:5, 4:6] = 4  # inner mouth inside it
    labels[7, 2:] = 1  # torso
    image, backdrop = torch.ones(8, 8, 3), torch.zeros(8, 8, 3)
    no_band = hair_plate(image, labels, backdrop, erode_px=0)[..., 0]
    assert no_band.equal((labels == 2).float())  # torso, face, mouth, background: the backdrop
    band = hair_plate(image, labels, backdrop, erode_px=1)[..., 0]
    face = (labels >= 3).float()
    cut = erode(face, 1)
    assert band.equal(((labels == 2).float() + face - cut).clamp(0, 1))
    assert band[3:5, 4:6].sum() == 0 and band[2:6, 3:7].sum() == 0  # the face's inside is cut out
    # fill_px: the cut-out's outer band is filled from around it (between the backdrop's 0 and the image's 1),
    # its inside stays backdrop, everything outside the cut-out is as before.
    filled = hair_plate(image, labels, backdrop, erode_px=1, fill_px=1)[..., 0]
    rim = (cut - erode(cut, 1)).bool()
    assert filled[~rim].equal(band[~rim])
    assert (filled[rim] > 0.05).all() and (filled[rim] < 1).all() and erode(cut, 1).sum() > 0


def test_fill_holes_keeps_known_pixels_and_fills_from_the_surroundings():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(13, 10, 3, generator=g)
    known = torch.ones(13, 10)
    known[3:9, 2:7] = 0
    out = fill_holes(image, known)
    assert out[known == 1].equal(image[known == 1])
    lo, hi = image[known == 1].min(0).values, image[known == 1].max(0).values
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()
    # A hole inside one colour is filled with exactly that colour, wherever it sits.
    flat = torch.tensor([0.2, 0.5, 0.9]).expand(13, 10, 3).clone()
    flat[known == 0] = 7.0
    torch.testing.assert_close(fill_holes(flat, known), torch.tensor([0.2, 0.5, 0.9]).expand(13, 10, 3))
    assert fill_holes(image, torch.zeros(13, 10)).equal(image)


def test_region_masks_dilate_the_face_and_mouth_and_take_the_hair_only_without_a_plate():
    labels = torch.zeros(9, 9, dtype=torch.uint8)
    labels[:, :2] = 2
    labels[2:7, 3:8] = 3
    labels[4, 5] = 4
    f, m = region_masks(labels, 0, with_hair=False)
    assert f.equal((labels >= 3).float()) and m.sum() == 1
    f, m = region_masks(labels, 1, with_hair=False)
    assert f.sum() == 7 * 7 and m.sum() == 9
    f, _ = region_masks(labels, 0, with_hair=True)
    assert f.equal((labels >= 2).float())


def _toy_face(E: int = 3):
    """A 478-vertex 'face': eyes at y = 0, a mouth below; component 0 moves only the lower lip (jaw), 1 the
    eyebrows, 2 both."""
    from talkinghead.face.landmarks import LEFT_EYE, RIGHT_EYE

    rng = np.random.default_rng(0)
    v = rng.uniform(-0.05, 0.05, (478, 3)).astype(np.float32)
    v[list(RIGHT_EYE) + list(LEFT_EYE), 1] = 0.0
    v[13], v[14] = [0, 0.04, 0], [0, 0.045, 0]  # inner lips, below the eyes
    up = v[:, 1] <= 0
    B = np.zeros((E, 478, 3), np.float32)
    B[0, 14, 1] = 0.01  # jaw: opens by 10 mm per unit
    B[1, up, 1] = -0.002
    B[2, up, 0] = 0.001
    B[2, 14, 1] = 0.005
    return v, B


def _one_gaussian_on_the_mouth(colour, size=16):
    """(image, plate, labels, Gaussian kwargs for rasterize at 16^2): an open mouth (dark red) in a skin face, one
    opaque Gaussian of ``colour`` covering the mouth, seen by a camera at 1 m."""
    img = torch.full((size, size, 3), 0.8)
    labels = torch.zeros(size, size, dtype=torch.uint8)
    labels[2:14, 2:14] = 3
    labels[6:10, 5:11] = MOUTH
    img[labels == MOUTH] = torch.tensor([0.25, 0.08, 0.1])
    plate = torch.full((size, size, 3), 0.3)
    K = torch.tensor([[40.0, 0, size / 2], [0, 40.0, size / 2], [0, 0, 1]])
    g = dict(means=torch.tensor([[0.0, 0.0, 1.0]]), quats=torch.tensor([[1.0, 0, 0, 0]]),
             scales=torch.tensor([[0.05, 0.03, 0.01]]), colors=torch.tensor([colour]), viewmat=torch.eye(4), K=K,
             width=size, height=size, backend="torch")
    return img, plate, labels, g


def test_the_face_field_must_let_the_open_mouth_through():
    mouth = (0.25, 0.08, 0.1)
    img, plate, labels, g = _one_gaussian_on_the_mouth(mouth)
    inner = labels == MOUTH
    face = (labels >= 3).float()
    bg, target = face_field_target(img, plate, face, labels)
    assert target.equal(img * face[..., None] + plate * (1 - face[..., None]))
    assert bg[inner].equal(img[inner]) and bg[~inner].equal(plate[~inner])  # transparent there = the target
    assert float(mouth_opacity(torch.ones(16, 16, 1), labels)) == pytest.approx(float(inner.float().mean()))

    def fit(lambda_clear: float, steps: int = 60) -> float:
        """Opacity of a Gaussian painted in the open mouth's own colour after fitting only its opacity to the
        face field's stage 1-2 terms (L1 + lambda_clear x mouth opacity)."""
        logit = torch.tensor([3.0], requires_grad=True)  # starts at opacity 0.95
        opt = torch.optim.Adam([logit], lr=0.1)
        for _ in range(steps):
            opt.zero_grad()
            out, alpha, _, _ = rasterize(opacities=torch.sigmoid(logit), background=bg, **g)
            # the model's L1 is a mean over the frame: the mouth pixels' share of it, as mouth_opacity's
            l1 = (out - target)[inner].abs().mean(-1).sum() / inner.numel()
            (l1 + lambda_clear * mouth_opacity(alpha, labels)).backward()
            opt.step()
        return float(torch.sigmoid(logit.detach()))

    # Known answer: painting the open mouth in its own colour costs nothing photometrically (the failure on
    # cnn: the Gaussian stays opaque); the opacity term of the default config makes it go transparent.
    assert fit(0.0) > 0.9
    assert fit(DEGSTalkConfig().lambda_clear) < 0.1


def test_mesh_displacement_is_the_barycentric_mix_of_the_vertex_displacements():
    basis = torch.randn(2, 5, 3)
    e = torch.tensor([0.5, -2.0])
    ids = torch.tensor([[3, 3, 3], [0, 1, 4]])
    bary = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    disp = 0.5 * basis[0] - 2.0 * basis[1]  # [V, 3]
    out = mesh_displacement(e, basis, ids, bary)
    torch.testing.assert_close(out[0], disp[3])
    torch.testing.assert_close(out[1], 0.2 * disp[0] + 0.3 * disp[1] + 0.5 * disp[4])
    batched = mesh_displacement(torch.stack([e, 2 * e]), basis, ids, bary)
    assert batched.shape == (2, 2, 3)
    torch.testing.assert_close(batched[1], 2 * out)


def test_upper_face_coefficients_ignore_the_jaw_and_have_unit_variance():
    v, B = _toy_face()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3)).astype(np.float32)
    mean, proj = upper_face_projection(v, B, X, k=4)
    assert proj.shape == (3, 4) and np.allclose(mean, X.mean(0))
    feats = (X - mean) @ proj
    assert np.allclose(feats[:, :2].std(0), 1.0, atol=1e-4) and np.allclose(feats[:, 2:], 0)  # 2 upper directions
    assert np.allclose(proj[0], 0, atol=1e-6)  # the jaw component moves no upper-face vertex
    assert 13 not in upper_face_vertices(v) and 14 not in upper_face_vertices(v)


def test_jaw_functional_is_the_inner_lip_gap_in_mm():
    v, B = _toy_face()
    offset, w = jaw_functional(v, B)
    assert offset == pytest.approx(5.0, abs=1e-4)  # 0.045 - 0.04 m
    np.testing.assert_allclose(w, [10.0, 0.0, 5.0], atol=1e-4)


def test_variants_switch_one_component_each_and_configs_round_trip():
    base = make_config("cpu-small", None)
    assert base.embedding_dim == 32 and base.expression and base.hair_plate and base.fine_tune
    assert base.data.source_frames and base.beta_jaw == 0.001 and base.lambda_dssim == 0.5
    assert base.gamma_lpips == 0.2
    changed = {v: {k for k, val in config_to_dict(make_config("cpu-small", v)).items()
                   if val != config_to_dict(base)[k]} for v in VARIANTS}
    assert changed == {"no-embedding": {"embedding_dim"}, "no-expression": {"expression"},
                       "direct-fusion": {"train_dilate", "plate_erode", "plate_fill", "fine_tune"},
                       "no-hair": {"hair_plate", "num_hair", "max_face"}, "no-lip-geometry": {"lambda_geo"}}
    assert make_config("cpu-small", "no-lip-geometry").lambda_clear == base.lambda_clear > 0
    for preset in ("cpu-small", "gpu"):
        cfg = make_config(preset, "no-hair")
        assert config_from_dict(DEGSTalkConfig, config_to_dict(cfg)) == cfg
    from talkinghead.errors import UserError

    with pytest.raises(UserError):
        make_config("cpu-small", "nope")


def test_mouth_window_camera_sees_exactly_the_cropped_pixels():
    from talkinghead.methods.base import Condition
    from talkinghead.render import rasterize

    K = torch.tensor([[60.0, 0, 16], [0, 60, 16], [0, 0, 1]])
    view = torch.eye(4)
    view[2, 3] = 1.0
    cond = Condition(viewmat=view, K=K, backdrop=torch.zeros(32, 32, 3), audio=torch.zeros(1, 1), blink=torch.zeros(2))
    ys, xs, Kc = _mouth_window(torch.tensor([18.0, 20.0, 26.0, 24.0]), cond)
    gen = torch.Generator().manual_seed(0)
    # Gaussians well inside the window (pixel ~22 = world 0.1 at depth 1), so no footprint crosses its edge.
    g = dict(means=torch.tensor([0.1, 0.1, 0.0]) + torch.randn(30, 3, generator=gen) * 0.015,
             quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(30, 1), scales=torch.full((30, 3), 0.01),
             opacities=torch.full((30,), 0.8), colors=torch.rand(30, 3, generator=gen))
    full, _, _, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], view, K, 32, 32)
    h, w = ys.stop - ys.start, xs.stop - xs.start
    crop, _, _, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], view, Kc, w, h)
    assert (h, w) == (16, 16) and crop.sum() > 1  # min side; centred on the box, inside the frame; not empty
    torch.testing.assert_close(crop, full[ys, xs], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ on a dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_methods import write_synthetic_dataset

    path = tmp_path_factory.mktemp("degstalk_data")
    write_synthetic_dataset(path, T=40, test_frames=8)
    return path


def _small_config(**kw) -> DEGSTalkConfig:
    cfg = make_config("cpu-small", None)
    cfg.data = dataclasses.replace(cfg.data, size=64)
    cfg.schedule = dataclasses.replace(cfg.schedule, iterations=16, val_every=0, checkpoint_every=8)
    cfg.num_face, cfg.num_mouth, cfg.max_face, cfg.max_mouth = 600, 60, 900, 90
    cfg.triplane_resolutions = (8, 16)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _model(data, cfg):
    store = FrameStore(data, cfg.data, split="train", progress=False)
    return DEGSTalk.build(cfg, store.info, dataset=open_dataset(data, size=cfg.data.size)), store


def test_transparent_fields_render_the_hair_plate_and_the_source_frame_reaches_render(data):
    cfg = _small_config()
    model, store = _model(data, cfg)
    test = FrameStore(data, cfg.data, info=store.info, split="test", with_targets=False, progress=False)
    cond = test.condition(0)
    assert cond.source is not None and cond.source.labels.shape == (64, 64)  # render-time stores carry it
    with torch.no_grad():
        for f in (model.face, model.mouth):
            f.gaussians.logit_opacities.fill_(-30.0)
        out = model.render(cond)
    torch.testing.assert_close(out, model.plate(cond).clamp(0, 1), atol=1e-6, rtol=0)


def test_the_mouth_field_is_trained_over_what_is_behind_it_at_render_time(data):
    """Eq. 7 splats the mouth field over C_hair: where it is transparent in training it must show the plate (not
    black: a mouth field fading out over black let the plate's backdrop through at render, cnn's blue lip line)."""
    img, plate, labels, _ = _one_gaussian_on_the_mouth((0.25, 0.08, 0.1))
    inner = (labels == MOUTH).float()
    bg = mouth_field_background(img, plate, inner)
    assert bg[inner > 0].equal(plate[inner > 0]) and bg[inner == 0].equal(img[inner == 0])
    cfg = _small_config()
    model, store = _model(data, cfg)
    k = next(k for k in range(len(store)) if (store.batch(k).cond.source.labels == MOUTH).sum() > 2)
    b = store.batch(k)
    with torch.no_grad():
        model.mouth.gaussians.logit_opacities.fill_(-30.0)  # a transparent mouth field renders its background
    _, logs = model.train_loss(b, 0)
    with torch.no_grad():
        ys, xs, _ = _mouth_window(b.mouth_box, b.cond)
        _, m_mouth = region_masks(b.cond.source.labels, pixels(cfg.train_dilate, 64), with_hair=False)
        plate = model.plate(b.cond)
        expect = (plate - b.image)[ys, xs].mul(m_mouth[ys, xs, None]).abs().mean()
        # ... which is what the fused render puts behind the face field there
        behind, _, _, _ = model._raster(model.mouth.deformed(None), b.cond, plate)
    assert m_mouth[ys, xs].sum() > 0 and expect > 0
    assert logs["l1_mouth"] == pytest.approx(float(expect), rel=1e-4)
    torch.testing.assert_close(behind, plate, atol=1e-6, rtol=0)


def test_static_stage_densifies_copying_embeddings_and_an_avatar_reloads_at_the_new_size(data, tmp_path):
    cfg = _small_config(densify_every=2, densify_grad=0.0, static_fraction=0.5)
    model, store = _model(data, cfg)
    opt = model.optimizers()[0]
    with torch.no_grad():
        model.face.gaussians.embedding.copy_(torch.arange(len(model.face), dtype=torch.float32)[:, None])
    before = len(model.face)
    binding0 = model.face.gaussians.binding.detach().clone()
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        loss, _ = model.train_loss(store.batch(step), step)
        loss.backward()
        opt.step()
        model.after_step(step)
    grown = model._densified["face"]
    assert before < len(model.face) <= cfg.max_face and grown["cloned"] + grown["split"] > 0
    emb = model.face.gaussians.embedding.detach()[:, 0]
    # Every Gaussian carries its parent's embedding (moved a little by Adam from the integer it started at).
    assert (emb - emb.round()).abs().max() < 0.05 and set(emb.round().long().tolist()) <= set(range(before))
    assert len({int(i) for i in emb.round().long().tolist()}) < len(emb)  # some rows are copies
    # ... and its parent's place on the mesh, untouched by the optimiser.
    parent = emb.round().long()
    torch.testing.assert_close(model.face.gaussians.binding.detach(), binding0[parent], atol=0, rtol=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = DEGSTalk.build(cfg, store.info)
    fresh.load_state_dict(state)
    fresh.eval(), model.eval()
    cond = store.condition(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh.render(cond), model.render(cond))


def test_stages_motion_adds_the_jaw_loss_and_fine_tuning_updates_colours_only(data):
    cfg = _small_config()
    model, store = _model(data, cfg)
    motion, fine = model.stage_bounds()
    assert (motion, fine) == (4, 14)
    b = store.batch(0)
    _, logs1 = model.train_loss(b, 0)
    assert "jaw_mm2" not in logs1 and "l1_mouth" in logs1
    loss2, logs2 = model.train_loss(b, motion)
    assert "jaw_mm2" in logs2 and int(model.stage) == 2
    loss2.backward()
    assert model.face.heads["means"].weight.grad.abs().sum() > 0 and model.jaw_head[0].weight.grad is not None
    model.zero_grad(set_to_none=True)
    loss3, logs3 = model.train_loss(b, fine)
    loss3.backward()
    assert "l1_fused" in logs3 and int(model.stage) == 3
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.rsplit(".", 1)[-1] in ("sh0", "shN") for n in with_grad)


def test_lip_gaussians_are_bound_to_the_mouth_mesh_and_replayed_geometry_matches_per_frame(data):
    from talkinghead.face.landmarks import MOUTH_VERTICES

    cfg = _small_config(geo_replay=3)
    model, store = _model(data, cfg)
    rows, ids, bary = model._geo_binding()
    on_mouth = torch.zeros(478, dtype=torch.bool)
    on_mouth[list(MOUTH_VERTICES)] = True
    assert 0 < len(rows) < len(model.face) and on_mouth[ids].any(1).all()
    assert set(rows[rows < 478].tolist()) == set(MOUTH_VERTICES)  # vertex Gaussians: exactly the mouth's
    with torch.no_grad():  # non-zero deformation heads and a non-trivial basis
        for h in model.face.heads.values():
            h.weight.normal_(0, 0.1)
        model.expression_basis.normal_(0, 0.01)
    motion, _ = model.stage_bounds()
    batches = [store.batch(i) for i in range(4)]
    for b in batches[1:]:
        model._remember(b)
    model._remember(batches[1])  # a frame already seen is not added twice
    assert len(model._geo_bank) == 3
    b = batches[0]
    with torch.no_grad():
        face, _, _ = model.fields(b.cond, deform=True)
        pick = np.random.default_rng(cfg.schedule.seed).integers(3, size=3)  # the bank's draw (FrameBank)
        got = model.geometry_loss(face["offsets"], b.expression)
        # Reference: every frame deformed on its own through the full field.
        errs = []
        for bb in [b] + [batches[1 + i] for i in pick]:
            off = model.face.deformed(model.conditions(bb.cond)[0])["offsets"][rows]
            tgt = mesh_displacement(bb.expression, model.expression_basis, ids, bary)
            errs.append(((off - tgt) / model.face.offset_scale).square().mean())
    torch.testing.assert_close(got, torch.stack(errs).mean(), rtol=1e-5, atol=1e-7)
    loss, logs = model.train_loss(b, motion)
    assert "geo" in logs
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert model.face.gaussians.binding.grad is None and model.jaw_head[0].weight.grad.abs().sum() > 0


def test_no_embedding_and_no_expression_drop_their_inputs(data):
    m_e, _ = _model(data, _small_config(embedding_dim=0))
    m_f, _ = _model(data, _small_config(expression=False))
    m, _ = _model(data, _small_config())
    assert "embedding" not in m_e.face.gaussians.param_names and m_e.face.embedding_dim == 0
    assert m_f.expression_mlp is None
    width = m.face.trunk[0].in_features
    assert width - m_e.face.trunk[0].in_features == 32 and width - m_f.face.trunk[0].in_features == 32


def test_degstalk_trains_resumes_and_renders_through_the_shared_trainer(data, tmp_path):
    spec = get_method("degstalk")
    assert "no-hair" in spec.variants
    out = tmp_path / "av"
    train(data, "degstalk", out, iterations=6, progress=False, variant="no-hair")
    log = train(data, "degstalk", out, iterations=10, progress=False, variant="no-hair", resume=True)
    assert log["iterations"] == 10 and log["resumed_from"] == 6
    assert log["hair_plate"] is False and log["lpips"].startswith("off")
    _, cfg, info, model, meta = load_model(out)
    assert meta["variant"] == "no-hair" and int(model.stage) == 3
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test",
                       with_targets=False, progress=False)
    with torch.no_grad():
        img = model.render(store.condition(0))
    assert img.shape == (128, 128, 3) and torch.isfinite(img).all()
