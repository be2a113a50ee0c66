"""GaussianModel persistence (safetensors, 3DGS .ply) and the density-control strategy."""

from __future__ import annotations

import pytest
import torch

from talkinghead.errors import UserError
from talkinghead.render import DensityStrategy, GaussianModel


def random_model(n: int = 7, sh_degree: int = 3, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2
    return GaussianModel(
        means=torch.randn(n, 3, generator=g) + torch.tensor([0, 0, 3.0]),
        log_scales=torch.randn(n, 3, generator=g) * 0.3 - 2.5,
        quats=torch.randn(n, 4, generator=g),
        logit_opacities=torch.randn(n, generator=g),
        sh0=torch.randn(n, 1, 3, generator=g),
        shN=torch.randn(n, k - 1, 3, generator=g) * 0.1,
    )


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = random_model()
    model.save(tmp_path / "g.safetensors")
    loaded = GaussianModel.load(tmp_path / "g.safetensors")
    assert loaded.sh_degree == 3 and len(loaded) == 7
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError):
        GaussianModel.load(tmp_path / "bad.safetensors")
    with pytest.raises(UserError):
        GaussianModel.load(tmp_path / "missing.safetensors")


def test_ply_export_has_the_3dgs_layout_and_reads_back(tmp_path):
    model = random_model(sh_degree=3)
    model.export_ply(tmp_path / "g.ply")
    raw = (tmp_path / "g.ply").read_bytes()
    header = raw[: raw.index(b"end_header\n")].decode().splitlines()
    props = [line.split()[-1] for line in header if line.startswith("property")]
    assert header[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 7"]
    assert props[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert props[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert props[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len(raw) - raw.index(b"end_header\n") - len(b"end_header\n") == 7 * 62 * 4
    loaded = GaussianModel.load_ply(tmp_path / "g.ply")
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    # f_rest is channel-major: the first 15 values are the red coefficients of bands 1..3.
    first = torch.frombuffer(bytearray(raw[raw.index(b"end_header\n") + 11 :][: 62 * 4]), dtype=torch.float32)
    assert torch.equal(first[9:24], model.shN[0, :, 0].detach())


def test_from_points_uses_neighbour_distances_and_renders():
    pts = torch.tensor([[0.0, 0, 3], [0.1, 0, 3], [0, 0.1, 3], [0.1, 0.1, 3], [0.05, 0.05, 3]])
    model = GaussianModel.from_points(pts, torch.rand(5, 3), sh_degree=1)
    assert model.shN.shape == (5, 3, 3)
    assert torch.allclose(model.scales[0], torch.full((3,), (0.1**2 * 2 / 3 + 0.05**2 * 2 / 3) ** 0.5))
    K = torch.tensor([[50.0, 0, 16], [0, 50, 16], [0, 0, 1]])
    image, alpha, _, _ = model.render(torch.eye(4), K, 32, 32, background=torch.ones(3))
    assert image.shape == (32, 32, 3) and alpha.max() > 0.05


def _fake_info(model: GaussianModel, grad: torch.Tensor) -> dict:
    means2d = torch.zeros(1, len(model), 2, requires_grad=True)
    means2d.grad = grad[None]
    radii = torch.ones(1, len(model), 2, dtype=torch.int32)
    return {"means2d": means2d, "radii": radii, "width": 100, "height": 100, "n_cameras": 1}


def test_strategy_clones_small_splits_large_prunes_transparent_and_keeps_adam_in_step():
    torch.manual_seed(0)
    scale = torch.tensor([0.001, 0.05, 0.001, 0.001])  # clone, split, unchanged, pruned
    model = GaussianModel(
        means=torch.randn(4, 3),
        log_scales=torch.log(scale)[:, None].repeat(1, 3),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1),
        logit_opacities=torch.logit(torch.tensor([0.5, 0.6, 0.7, 0.001])),
        sh0=torch.arange(4.0)[:, None, None].repeat(1, 1, 3),
        shN=torch.zeros(4, 3, 3),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()  # creates Adam moments that the strategy must carry along
    parent_mean = model.means[1].detach().clone()
    strategy = DensityStrategy(refine_start_iter=0, refine_every=10, reset_every=1000)
    grad = torch.tensor([[1e-4, 0], [0, 1e-4], [1e-7, 0], [1e-4, 0]])  # x 50 (NDC) -> 5e-3 vs threshold 2e-4
    changes = strategy.step_post_backward(model, opt, 10, _fake_info(model, grad))
    # The transparent one is cloned too before pruning removes it and its clone.
    assert changes == {"cloned": 2, "split": 1, "pruned": 2, "opacity_reset": 0}
    assert len(model) == 4 + 2 + 2 - 1 - 2
    ids = model.sh0[:, 0, 0].tolist()
    assert sorted(round(i) for i in ids) == [0, 0, 1, 1, 2]  # colours identify the parents
    children = model.sh0[:, 0, 0].round() == 1
    assert torch.allclose(model.scales[children], torch.full((2, 3), 0.05 / 1.6), rtol=3e-3)  # Adam moved it 1e-3
    assert torch.allclose(model.means[children].mean(0), parent_mean, atol=1e-6)  # drawn as +-offset
    assert (model.means[children] - parent_mean).norm(dim=-1).min() > 0
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
    assert len(opt.param_groups[0]["params"]) == 6 and all(
        any(q is p for q in model.parameters()) for p in opt.param_groups[0]["params"]
    )
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()  # would fail on any shape mismatch


def test_strategy_resets_opacity_and_needs_the_retained_gradient():
    model = random_model(5)
    model.logit_opacities.data.fill_(3.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.logit_opacities.sum().backward()
    opt.step()
    strategy = DensityStrategy(reset_every=100, refine_start_iter=10_000)
    strategy.step_post_backward(model, opt, 100, _fake_info(model, torch.zeros(5, 2)))
    assert torch.allclose(model.opacities, torch.full((5,), 0.01))
    assert torch.all(opt.state[model.logit_opacities]["exp_avg"] == 0)
    info = _fake_info(model, torch.zeros(5, 2))
    info["means2d"].grad = None
    with pytest.raises(RuntimeError, match="step_pre_backward"):
        strategy.step_post_backward(model, opt, 101, info)


def test_strategy_runs_on_real_renders():
    torch.manual_seed(0)
    model = random_model(30, sh_degree=1)
    target = torch.rand(24, 32, 3)
    K = torch.tensor([[30.0, 0, 16], [0, 30, 12], [0, 0, 1]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    strategy = DensityStrategy(refine_start_iter=0, refine_every=2, grow_grad2d=1e-9, grow_scale3d=1.0)
    for step in range(1, 5):
        image, _, _, info = model.render(torch.eye(4), K, 32, 24)
        strategy.step_pre_backward(info)
        (image - target).abs().mean().backward()
        changes = strategy.step_post_backward(model, opt, step, info)
        opt.step()
        opt.zero_grad()
    # Every Gaussian seen on screen had a gradient above the (tiny) threshold at steps 2 and 4: cloned.
    assert changes["cloned"] > 0 and len(model) > 30
    assert all(p.shape[0] == len(model) for p in model.parameters())


def test_extra_per_gaussian_parameters_follow_clone_split_prune_and_save(tmp_path):
    """An embedding row per Gaussian (DEGSTalk's z) is copied to clones and both split children, pruned with
    its Gaussian, optimised like the rest, and kept by save/load."""
    torch.manual_seed(0)
    scale = torch.tensor([0.001, 0.05, 0.001, 0.001])  # clone, split, unchanged, pruned
    emb = torch.arange(4.0)[:, None].repeat(1, 5) * 10  # row i = 10 i
    model = GaussianModel(
        means=torch.randn(4, 3), log_scales=torch.log(scale)[:, None].repeat(1, 3),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1),
        logit_opacities=torch.logit(torch.tensor([0.5, 0.6, 0.7, 0.001])),
        sh0=torch.arange(4.0)[:, None, None].repeat(1, 1, 3), shN=torch.zeros(4, 3, 3), extras={"embedding": emb},
    )
    assert model.param_names[-1] == "embedding" and len(list(model.parameters())) == 7
    with pytest.raises(ValueError):
        GaussianModel(model.means, model.log_scales, model.quats, model.logit_opacities, model.sh0, model.shN,
                      extras={"embedding": torch.zeros(3, 5)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()  # Adam moments for the strategy to carry along; every value moves by ~1e-3
    strategy = DensityStrategy(refine_start_iter=0, refine_every=10, reset_every=1000)
    grad = torch.tensor([[1e-4, 0], [0, 1e-4], [1e-7, 0], [1e-4, 0]])
    strategy.step_post_backward(model, opt, 10, _fake_info(model, grad))
    parent = model.sh0[:, 0, 0].round()  # colours identify the parents
    torch.testing.assert_close(model.embedding, (parent * 10)[:, None].repeat(1, 5), atol=2e-3, rtol=0)
    assert sorted(parent.tolist()) == [0, 0, 1, 1, 2] and model.embedding.shape == (5, 5)
    assert opt.state[model.embedding]["exp_avg"].shape == (5, 5)
    model.save(tmp_path / "g.safetensors")
    loaded = GaussianModel.load(tmp_path / "g.safetensors")
    assert loaded.extra_names == ("embedding",)
    torch.testing.assert_close(loaded.embedding, model.embedding)
