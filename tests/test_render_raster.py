"""Known answers for the rasterizer: analytic footprints, depth order, culling, gradients, backends."""

from __future__ import annotations

import math

import pytest
import torch

from talkinghead.render import eval_sh, gsplat_available, rasterize
from talkinghead.render.projection import project, quat_to_rotmat
from talkinghead.render.raster_numba import available as numba_available
from talkinghead.render.raster_torch import _chunks, _spans, composite

# The CPU backends: our reference compositor, and its Numba loops where numba is installed.
CPU_BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="needs numba"))]


def camera(width: int, height: int, f: float, dtype=torch.float32):
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=dtype)
    return torch.eye(4, dtype=dtype), K


def random_scene(n: int, seed: int = 0, dtype=torch.float32, opacity_max: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * torch.tensor([0.4, 0.3, 0.3], dtype=dtype)
    means[:, 2] += 3.0
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = 0.05 + 0.15 * torch.rand(n, 3, generator=g, dtype=dtype)
    opacities = 0.1 + (opacity_max - 0.1) * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colors


def dense_reference(means, quats, scales, opacities, colors, viewmat, K, width, height):
    """Naive 3DGS: every Gaussian at every pixel, composited in a Python loop over depth (tests only)."""
    p = project(means, quats, scales, opacities, viewmat, K, width, height)
    idx = torch.nonzero(p.visible).squeeze(1)
    idx = idx[torch.argsort(p.depths[idx])]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    px, py = xs.to(means) + 0.5, ys.to(means) + 0.5
    T = torch.ones(height, width, dtype=means.dtype)
    image = torch.zeros(height, width, 3, dtype=means.dtype)
    done = torch.zeros(height, width, dtype=torch.bool)
    for i in idx.tolist():
        (u, v), (a, b, c) = p.means2d[i], p.conics[i]
        dx, dy = px - u, py - v
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = (opacities[i] * torch.exp(-sigma)).clamp(max=0.99)
        use = (sigma >= 0) & (alpha >= 1 / 255) & ~done
        done = done | (use & (T * (1 - alpha) < 1e-4))
        use = use & ~done
        alpha = torch.where(use, alpha, torch.zeros_like(alpha))
        image = image + (alpha * T)[..., None] * colors[i]
        T = T * (1 - alpha)
    return image, 1 - T


def test_isotropic_gaussian_renders_the_analytic_footprint():
    W, H, f, z, s, o = 33, 29, 40.0, 2.0, 0.1, 0.8
    viewmat, K = camera(W, H, f)
    image, alpha, depth, info = rasterize(
        torch.tensor([[0.0, 0.0, z]]), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s),
        torch.tensor([o]), torch.ones(1, 3), viewmat, K, W, H, backend="torch",
    )  # fmt: skip
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    var = (f * s / z) ** 2 + 0.3  # projected variance plus the 3DGS low-pass
    expected = o * torch.exp(-((xs - W / 2) ** 2 + (ys - H / 2) ** 2) / (2 * var))
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))
    torch.testing.assert_close(alpha[..., 0], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(image, alpha.expand(-1, -1, 3))
    assert torch.allclose(depth[alpha[..., 0] > 0], torch.tensor(z))
    assert info["radii"].shape == (1, 1, 2) and (info["radii"] > 0).all()


def test_two_gaussians_composite_front_to_back_whatever_their_order():
    W = H = 16
    viewmat, K = camera(W, H, 20.0)
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])  # red in front of blue
    args = dict(quats=torch.tensor([[1.0, 0, 0, 0]] * 2), scales=torch.full((2, 3), 0.5))
    opac, colors = torch.tensor([0.7, 0.6]), torch.eye(3)[[0, 2]]
    image, alpha, depth, _ = rasterize(means, args["quats"], args["scales"], opac, colors, viewmat, K, W, H)
    centre = image[H // 2, W // 2]
    a1 = 0.7 * math.exp(-0.5 * 0.5 / ((20 * 0.5 / 2) ** 2 + 0.3))  # pixel centre: 0.5 px off in x and y
    a2 = 0.6 * math.exp(-0.5 * 0.5 / ((20 * 0.5 / 3) ** 2 + 0.3))
    torch.testing.assert_close(centre, torch.tensor([a1, 0.0, (1 - a1) * a2]))
    torch.testing.assert_close(alpha[H // 2, W // 2, 0], torch.tensor(1 - (1 - a1) * (1 - a2)))
    expected_depth = (a1 * 2 + (1 - a1) * a2 * 3) / (a1 + (1 - a1) * a2)
    torch.testing.assert_close(depth[H // 2, W // 2, 0], torch.tensor(expected_depth))
    flipped, *_ = rasterize(
        means.flip(0), args["quats"], args["scales"], opac.flip(0), colors.flip(0), viewmat, K, W, H
    )
    torch.testing.assert_close(flipped, image)


def test_gaussians_behind_the_camera_or_off_image_contribute_nothing():
    W, H = 24, 20
    viewmat, K = camera(W, H, 25.0)
    means, quats, scales, opacities, colors = random_scene(6)
    base, base_alpha, *_ = rasterize(means, quats, scales, opacities, colors, viewmat, K, W, H)
    extra = torch.tensor([[0.0, 0.0, -2.0], [30.0, 0.0, 3.0], [0.0, -40.0, 3.0], [0.1, 0.1, 0.001]])
    m = torch.cat([means, extra]).requires_grad_()
    q = torch.cat([quats, torch.tensor([[1.0, 0, 0, 0]] * 4)])
    s = torch.cat([scales, torch.full((4, 3), 0.3)]).requires_grad_()
    o = torch.cat([opacities, torch.full((4,), 0.9)]).requires_grad_()
    image, alpha, _, info = rasterize(m, q, s, o, torch.cat([colors, torch.ones(4, 3)]), viewmat, K, W, H)
    torch.testing.assert_close(image, base)
    torch.testing.assert_close(alpha, base_alpha)
    (image.sum() + alpha.sum()).backward()
    assert (info["radii"][0, 6:] == 0).all() and (info["radii"][0, :6] > 0).all()
    for t in (m, s, o):
        assert torch.all(t.grad[6:] == 0) and t.grad[:6].abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_a_naive_dense_renderer(backend):
    W, H = 40, 30
    viewmat, K = camera(W, H, 35.0, torch.float64)
    scene = random_scene(150, seed=1, dtype=torch.float64, opacity_max=1.0)  # some alphas hit the 0.99 clamp
    image, alpha, *_ = rasterize(*scene, viewmat, K, W, H, backend=backend)
    ref_image, ref_alpha = dense_reference(*scene, viewmat, K, W, H)
    torch.testing.assert_close(image, ref_image, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(alpha[..., 0], ref_alpha, atol=1e-10, rtol=1e-8)
    assert (ref_alpha > 0.999).any(), "the scene should exercise early termination"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_finite_differences(backend):
    W, H = 14, 11
    viewmat, K = camera(W, H, 14.0, torch.float64)
    scene = [t.requires_grad_() for t in random_scene(5, seed=2, dtype=torch.float64)]
    weights = torch.rand(H, W, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(means, quats, scales, opacities, colors):
        image, alpha, depth, _ = rasterize(means, quats, scales, opacities, colors, viewmat, K, W, H,
                                           backend=backend)
        return (torch.cat([image, alpha, depth], -1) * weights).sum()

    assert torch.autograd.gradcheck(loss, scene, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_finite_differences_with_sh_two_cameras_and_a_background(backend):
    W, H = 10, 8
    _, K = camera(W, H, 10.0, torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    viewmats[1, :3, :3] = quat_to_rotmat(torch.tensor([[0.98, 0.0, 0.15, 0.05]], dtype=torch.float64))[0]
    means, quats, scales, opacities, _ = random_scene(3, seed=9, dtype=torch.float64)
    sh = 0.3 * torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    bg = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def loss(means, sh):
        image, alpha, depth, _ = rasterize(
            means, quats, scales, opacities, sh, viewmats, K.repeat(2, 1, 1), W, H, background=bg, sh_degree=1,
            backend=backend,
        )
        return image.square().sum() + depth.sum()

    assert torch.autograd.gradcheck(loss, [means.requires_grad_(), sh.requires_grad_()], atol=1e-6, rtol=1e-4)


def test_chunked_compositing_equals_one_chunk_forward_and_backward():
    W, H = 48, 64  # four 16-row bands
    viewmat, K = camera(W, H, 40.0)
    means, quats, scales, opacities, colors = random_scene(60, seed=4)
    p = project(means, quats, scales, opacities, viewmat, K, W, H)
    idx = torch.nonzero(p.visible).squeeze(1)
    idx = idx[torch.argsort(p.depths[idx])]
    _, y, _, length = _spans(p.means2d[idx], p.conics[idx], opacities[idx], W, H)
    assert len(_chunks(y, length, H, 1 << 22)) == 1 and len(_chunks(y, length, H, 300)) >= 3
    results = []
    for max_pairs in (1 << 22, 300):
        sorted_scene = (p.means2d[idx], p.conics[idx], opacities[idx], colors[idx])
        inputs = [t.detach().clone().requires_grad_() for t in sorted_scene]
        out = composite(*inputs, W, H, max_pairs=max_pairs)
        (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batched_cameras_equal_single_renders_and_background_fills_the_rest():
    W, H = 20, 18
    _, K = camera(W, H, 22.0)
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[1, :3, :3] = quat_to_rotmat(torch.tensor([[0.99, 0.0, 0.1, 0.0]]))[0]
    scene = random_scene(10, seed=5)
    bg = torch.tensor([0.2, 0.4, 0.6])
    images, alphas, depths, info = rasterize(*scene, viewmats, K.repeat(2, 1, 1), W, H, background=bg)
    assert images.shape == (2, H, W, 3) and info["means2d"].shape == (2, 10, 2)
    for c in range(2):
        image, alpha, depth, _ = rasterize(*scene, viewmats[c], K, W, H)
        torch.testing.assert_close(images[c], image + (1 - alpha) * bg)
        torch.testing.assert_close(depths[c], depth)


def test_means2d_gradient_is_retained_for_densification():
    W, H = 20, 18
    viewmat, K = camera(W, H, 22.0)
    means, quats, scales, opacities, colors = random_scene(10, seed=6)
    means.requires_grad_()
    image, _, _, info = rasterize(means, quats, scales, opacities, colors, viewmat, K, W, H)
    info["means2d"].retain_grad()
    image.sum().backward()
    g = info["means2d"].grad
    assert g.shape == (1, 10, 2) and (g[0].norm(dim=-1) > 0).sum() >= 8


def test_sh_basis_is_orthonormal_and_degree_0_is_the_dc_term():
    n = 20000  # Fibonacci sphere: near-uniform directions
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi, z = math.pi * (1 + 5**0.5) * i, 1 - 2 * i / n
    dirs = torch.stack([torch.sqrt(1 - z * z) * torch.cos(phi), torch.sqrt(1 - z * z) * torch.sin(phi), z], -1)
    one_hot = torch.eye(16, dtype=torch.float64)
    basis = torch.stack([eval_sh(3, one_hot[k].view(1, 16, 1).expand(n, 16, 3), dirs)[:, 0] for k in range(16)], 1)
    gram = basis.T @ basis * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)
    coeffs = torch.randn(4, 16, 3, dtype=torch.float64)
    torch.testing.assert_close(eval_sh(0, coeffs, dirs[:4]), 0.28209479177387814 * coeffs[:, 0])


def test_sh_colors_follow_the_view_direction():
    W = H = 9
    _, K = camera(W, H, 10.0)
    coeffs = torch.zeros(1, 4, 3)
    coeffs[0, 3, 0] = 0.5  # the band-1 "x" coefficient of red: value += -C1 * dir_x * 0.5
    colors = {}
    for side in (-1.0, 1.0):  # camera at (3 * side, 0, 0) looking at the origin along -side * x
        viewmat = torch.eye(4)
        viewmat[:3, :3] = torch.tensor([[0.0, 0, side], [0, 1, 0], [-side, 0, 0]])
        viewmat[2, 3] = 3.0
        image, alpha, *_ = rasterize(
            torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.3), torch.tensor([0.9]),
            coeffs, viewmat, K, W, H, sh_degree=1,
        )  # fmt: skip
        colors[side] = image[H // 2, W // 2] / alpha[H // 2, W // 2]
    c1 = 0.4886025119029199
    torch.testing.assert_close(colors[-1.0], torch.tensor([0.5 - c1 * 0.5, 0.5, 0.5]))  # sees it along +x
    torch.testing.assert_close(colors[1.0], torch.tensor([0.5 + c1 * 0.5, 0.5, 0.5]))  # along -x


@pytest.mark.skipif(not gsplat_available(), reason="needs CUDA and gsplat")
def test_torch_and_gsplat_backends_agree():
    W, H = 64, 48
    viewmat, K = (t.cuda() for t in camera(W, H, 60.0))
    scene = [t.cuda().requires_grad_() for t in random_scene(200, seed=7)]
    outs, grads = [], []
    for backend in ("torch", "gsplat"):
        image, alpha, depth, _ = rasterize(*scene, viewmat, K, W, H, backend=backend)
        outs.append((image, alpha))
        (image.sum() + alpha.sum()).backward()
        grads.append([t.grad.clone() for t in scene])
        for t in scene:
            t.grad = None
    for a, b in zip(*outs):
        assert (a - b).abs().max() < 1e-3
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_gsplat_adapter_passes_gsplat_conventions_and_unpacks_its_outputs(monkeypatch):
    """Without a GPU, check our side of the gsplat call against a stand-in that records it."""
    import sys
    import types

    calls = {}

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw):
        calls.update(kw, viewmats=viewmats.shape, Ks=Ks.shape)
        C, N = viewmats.shape[0], means.shape[0]
        render = torch.arange(C * height * width * 4.0).view(C, height, width, 4)
        radii = torch.ones(C, N, dtype=torch.int32)  # gsplat < 1.5: one radius per Gaussian
        meta = {"means2d": torch.zeros(C, N, 2), "radii": radii, "depths": torch.ones(C, N)}
        return render, torch.full((C, height, width, 1), 0.5), meta

    monkeypatch.setitem(sys.modules, "gsplat", types.SimpleNamespace(rasterization=rasterization))
    viewmat, K = camera(8, 6, 10.0)
    scene = random_scene(3)
    image, alpha, depth, info = rasterize(*scene, viewmat, K, 8, 6, background=torch.ones(3), backend="gsplat")
    assert calls["viewmats"] == (1, 4, 4) and calls["Ks"] == (1, 3, 3)
    assert calls["render_mode"] == "RGB+ED" and calls["eps2d"] == 0.3 and calls["rasterize_mode"] == "classic"
    assert image.shape == (6, 8, 3) and depth.shape == (6, 8, 1) and alpha.shape == (6, 8, 1)
    torch.testing.assert_close(depth[..., 0], torch.arange(3.0, 6 * 8 * 4, 4).view(6, 8))
    torch.testing.assert_close(image[0, 0], torch.tensor([0.5, 1.5, 2.5]))  # + (1 - alpha) * background
    assert info["radii"].shape == (1, 3, 2) and info["backend"] == "gsplat"


def test_auto_backend_is_numba_on_cpu_when_installed_and_unknown_backends_are_rejected():
    viewmat, K = camera(8, 6, 10.0)
    *_, info = rasterize(*random_scene(3), viewmat, K, 8, 6)
    assert info["backend"] == ("numba" if numba_available() else "torch")
    with pytest.raises(ValueError, match="backend"):
        rasterize(*random_scene(3), viewmat, K, 8, 6, backend="cuda")
    means, quats, scales, opacities, _ = random_scene(3)
    with pytest.raises(ValueError, match="sh_degree"):
        rasterize(means, quats, scales, opacities, torch.zeros(3, 4, 3), viewmat, K, 8, 6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nothing_visible_renders_the_background_and_zero_gradients(backend):
    viewmat, K = camera(8, 6, 10.0)
    means, quats, scales, opacities, colors = random_scene(4)
    means = (means * torch.tensor([1.0, 1.0, -1.0])).requires_grad_()  # all behind the camera
    scene = (means, quats, scales, opacities, colors)
    image, alpha, depth, _ = rasterize(*scene, viewmat, K, 8, 6, background=torch.ones(3), backend=backend)
    assert torch.equal(image, torch.ones(6, 8, 3)) and torch.equal(alpha, torch.zeros(6, 8, 1))
    assert torch.equal(depth, torch.zeros(6, 8, 1))
    image.sum().backward()
    assert torch.equal(means.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_under_no_grad_matches_the_training_path(backend):
    viewmat, K = camera(30, 20, 25.0)
    scene = [t.requires_grad_() for t in random_scene(30, seed=8)]
    with torch.no_grad():
        fast = rasterize(*scene, viewmat, K, 30, 20, backend=backend)[:3]
    for a, b in zip(fast, rasterize(*scene, viewmat, K, 30, 20, backend=backend)[:3]):
        if backend == "torch":
            assert torch.equal(a, b.detach())
        else:  # numba's inference path projects in float64: the same frame to float32 rounding
            torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not numba_available(), reason="needs numba")
def test_numba_compositor_equals_the_torch_reference_forward_and_backward_in_float32():
    W, H = 64, 48
    viewmat, K = camera(W, H, 50.0)
    base = random_scene(400, seed=12, opacity_max=1.0)  # dense enough for early termination and the clamp
    weights = torch.rand(H, W, 5, generator=torch.Generator().manual_seed(13))
    results = []
    for backend in ("torch", "numba"):
        scene = [t.clone().requires_grad_() for t in base]
        image, alpha, depth, _ = rasterize(*scene, viewmat, K, W, H, backend=backend)
        (torch.cat([image, alpha, depth], -1) * weights).sum().backward()
        results.append([image, alpha, depth] + [t.grad for t in scene])
    assert (results[0][1] > 0.999).any()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not numba_available(), reason="needs numba")
@pytest.mark.parametrize("sh_degree,background", [(None, "image"), (1, "image"), (3, "image"), (1, None),
                                                   (1, "colour"), (1, "colour per camera"), (1, "image per camera")])
def test_numba_inference_path_equals_the_torch_reference(sh_degree, background):
    """Without autograd the numba backend also projects, sorts, colours and composites the background in compiled
    loops: same frame, whatever the background's shape."""
    W, H = 40, 30
    _, K = camera(W, H, 35.0, torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    viewmats[1, :3, :3] = quat_to_rotmat(torch.tensor([[0.98, 0.0, 0.15, 0.05]], dtype=torch.float64))[0]
    means, quats, scales, opacities, colors = random_scene(200, seed=14, dtype=torch.float64, opacity_max=1.0)
    means[:5, 2] *= -1  # behind the camera
    if sh_degree is not None:
        colors = 0.3 * torch.randn(200, (sh_degree + 1) ** 2, 3, generator=torch.Generator().manual_seed(15),
                                   dtype=torch.float64)
    shape = {None: None, "image": (H, W, 3), "colour": (3,), "colour per camera": (2, 3),
             "image per camera": (2, H, W, 3)}[background]
    bg = None if shape is None else torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    scene = (means, quats, scales, opacities, colors, viewmats, K.repeat(2, 1, 1), W, H)
    with torch.no_grad():
        fast = rasterize(*scene, background=bg, sh_degree=sh_degree, backend="numba")
        ref = rasterize(*scene, background=bg, sh_degree=sh_degree, backend="torch")
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    for key in ("means2d", "radii", "depths"):
        torch.testing.assert_close(fast[3][key], ref[3][key])
    assert (ref[3]["radii"][:, :5] == 0).all() and (ref[1] > 0.999).any()


@pytest.mark.skipif(not numba_available(), reason="needs numba")
@pytest.mark.parametrize("features", [3, 5])
def test_numba_inference_steps_large_thin_footprints_as_the_reference(features):
    """The inference loop steps each row's start from the row above (no exp per row): on footprints tens of
    pixels tall, thin and rotated (row starts jumping by more than the stepped range too), and for features
    other than RGB (its generic loop), the frame is the torch reference's."""
    W, H = 160, 120
    _, K = camera(W, H, 150.0, torch.float64)
    means, quats, scales, opacities, _ = random_scene(60, seed=21, dtype=torch.float64, opacity_max=1.0)
    g = torch.Generator().manual_seed(22)
    scales = scales * torch.tensor([2.0, 0.3, 1.0], dtype=torch.float64)  # elongated: long, thin, tilted
    colors = torch.rand(60, features, generator=g, dtype=torch.float64)
    bg = torch.rand(H, W, features, generator=g, dtype=torch.float64)
    scene = (means, quats, scales, opacities, colors, torch.eye(4, dtype=torch.float64), K, W, H)
    with torch.no_grad():
        fast = rasterize(*scene, background=bg, backend="numba")
        ref = rasterize(*scene, background=bg, backend="torch")
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert fast[3]["radii"].max() > 20  # footprints tens of pixels across
