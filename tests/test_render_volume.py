"""Triplane volume renderer and super-resolution: known answers and a brute-force per-ray reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talkinghead import camera
from talkinghead.render.superres import SuperResolution
from talkinghead.render.volume import (OSGDecoder, VolumeConfig, camera_rays, composite, importance_samples,
                                       normalize_points, ray_box, render_rays, render_triplane, sample_triplane,
                                       scene_viewmat, stratified_samples)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _look_at_z(distance: float = 4.0) -> torch.Tensor:
    """Camera on the -z axis looking at the origin (OpenCV: z forward), slightly rotated."""
    R = torch.tensor(camera.viewmat(np.eye(3), np.zeros(3)))[:3, :3]
    a = math.radians(7.0)
    Ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    R = Ry @ R
    return torch.tensor(camera.viewmat(R.numpy(), np.array([0.0, 0.0, distance])))


def test_camera_rays_reproject_to_pixel_centres():
    vm = _look_at_z()
    K = torch.tensor(camera.intrinsics(20.0, 22.0, 6.0, 5.0))
    o, d = camera_rays(vm, K, 12, 10)
    assert o.shape == d.shape == (120, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(120), atol=1e-6)
    pts = (o + 3.0 * d).numpy()
    uv = camera.project(pts, vm.numpy(), K.numpy())
    v, u = np.meshgrid(np.arange(10) + 0.5, np.arange(12) + 0.5, indexing="ij")
    assert np.allclose(uv, np.stack([u.ravel(), v.ravel()], -1), atol=1e-4)
    # Every ray starts at the camera centre.
    centre = -(vm[:3, :3].T @ vm[:3, 3])
    assert torch.allclose(o, centre.expand(120, 3), atol=1e-6)


def test_scene_viewmat_sees_the_scaled_scene_on_the_same_pixels():
    vm = _look_at_z()
    K = camera.intrinsics(20.0, 20.0, 6.0, 5.0)
    c, s = torch.tensor([0.3, -0.2, 0.1]), 0.25
    X = torch.tensor([[0.1, 0.2, -0.3], [0.5, -0.4, 0.2]])
    moved = scene_viewmat(vm, c, s)
    assert np.allclose(camera.project(X.numpy(), vm.numpy(), K),
                       camera.project(((X - c) / s).numpy(), moved.numpy(), K), atol=1e-4)
    assert torch.equal(moved[:3, :3], vm[:3, :3])


def test_ray_box_distances_and_misses():
    o = torch.tensor([[0.0, 0.0, -5.0], [3.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far = ray_box(o, d, BOX)
    assert torch.allclose(near, torch.tensor([4.0, near[1], 0.0]))
    assert torch.allclose(far, torch.tensor([6.0, near[1], 1.0]))
    assert near[1] == far[1]  # misses
    near, far = ray_box(o[:1], d[:1], BOX, margin=0.25)  # box grown by 0.5 on every side
    assert torch.allclose(near, torch.tensor([3.5])) and torch.allclose(far, torch.tensor([6.5]))


def test_stratified_samples_one_per_bin():
    near, far = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.5])
    t = stratified_samples(near, far, 4, perturb=False)
    assert torch.allclose(t[0], torch.tensor([1.25, 1.75, 2.25, 2.75]))
    g = torch.Generator().manual_seed(0)
    t = stratified_samples(near, far, 4, perturb=True, generator=g)
    bins = (t - near[:, None]) / (far - near)[:, None] * 4
    assert torch.equal(bins.floor(), torch.arange(4.0).expand(2, 4))


def test_importance_samples_follow_the_smoothed_pdf():
    S, n = 9, 400
    t = torch.linspace(0.0, 8.0, S)[None]  # intervals [i, i+1]
    w = torch.zeros(1, S - 1)
    w[0, 4] = 1.0
    fine = importance_samples(t, w, n, perturb=False)
    # EG3D's smoothing of a one-hot interval k: 0.5, 1, 0.5 at k-1, k, k+1, plus 0.01 everywhere.
    pdf = torch.full((S - 1,), 0.01)
    pdf[3], pdf[4], pdf[5] = 0.51, 1.01, 0.51
    pdf /= pdf.sum()
    counts = torch.bincount(fine[0].floor().long(), minlength=S - 1).float() / n
    assert torch.allclose(counts, pdf, atol=1.5 / n)
    assert bool((fine >= 0).all() and (fine <= 8).all())


def test_empty_space_renders_nothing():
    vm, K = _look_at_z(), torch.tensor(camera.intrinsics(10.0, 10.0, 4.0, 4.0))
    planes = torch.zeros(3, 4, 8, 8)
    dec = OSGDecoder(4, 16, 5)
    with torch.no_grad():
        dec.net[2].bias[0] = -40.0  # density softplus(-41) ~ 1e-18
    out = render_triplane(planes, dec, BOX, vm, K, 8, 8, VolumeConfig(num_coarse=8, num_fine=8))
    assert out["features"].shape == (8, 8, 5) and out["alpha"].shape == (8, 8)
    assert float(out["alpha"].detach().max()) < 1e-12 and float(out["features"].detach().abs().max()) < 1e-12
    # A box behind the camera: no ray hits it, every output is exactly zero.
    far_box = BOX + torch.tensor([0.0, 0.0, -20.0])
    out = render_triplane(planes, dec, far_box, vm, K, 8, 8, VolumeConfig(num_coarse=8, num_fine=8))
    assert float(out["alpha"].detach().abs().max()) == 0.0 and float(out["features"].detach().abs().max()) == 0.0


def _raw_for_density(sigma: float) -> float:
    """sigma_raw with softplus(sigma_raw - 1) == sigma."""
    return 1.0 + math.log(math.expm1(sigma))


def test_uniform_box_absorbs_by_beer_lambert():
    # Constant density in the whole box: the samples span L (1 - 1/n) of the ray (bin centres), exactly.
    sigma, color = 0.7, torch.tensor([0.2, 0.5, 0.9])
    raw = _raw_for_density(sigma)

    def field(x):
        return torch.full((x.shape[0],), raw), color.expand(x.shape[0], 3)

    o, d = torch.tensor([[0.0, 0.0, -5.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    near, far = ray_box(o, d, BOX)
    for cfg in (VolumeConfig(num_coarse=16, num_fine=0), VolumeConfig(num_coarse=16, num_fine=16)):
        out = render_rays(field, o, d, near, far, cfg)
        a = 1 - math.exp(-sigma * 2.0 * (1 - 1 / 16))
        assert out["alpha"].item() == pytest.approx(a, rel=1e-5)
        assert torch.allclose(out["features"][0], color * a, rtol=1e-5)


def test_constant_density_slab_alpha_colour_and_depth():
    # A slab z in [a, b] of density sigma: alpha = 1 - exp(-sigma l); expected depth (analytic) of the weights.
    a, b, sigma = -0.3, 0.2, 4.0
    l = b - a
    raw_in, raw_out = _raw_for_density(sigma), -60.0
    color = torch.tensor([0.9, 0.1, 0.4])

    def field(x):
        inside = (x[:, 2] >= a) & (x[:, 2] <= b)
        return torch.where(inside, raw_in, raw_out), color.expand(x.shape[0], 3) * inside[:, None]

    o, d = torch.tensor([[0.1, -0.2, -5.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    near, far = ray_box(o, d, BOX)
    out = render_rays(field, o, d, near, far, VolumeConfig(num_coarse=256, num_fine=256))
    alpha = 1 - math.exp(-sigma * l)
    assert out["alpha"].item() == pytest.approx(alpha, abs=5e-3)
    assert torch.allclose(out["features"][0], color * alpha, atol=5e-3)
    depth = 5.0 + a + 1 / sigma - l * math.exp(-sigma * l) / (1 - math.exp(-sigma * l))
    assert out["depth"].item() == pytest.approx(depth, abs=5e-3)


def test_single_plane_features_land_on_their_axes():
    R, C = 16, 2
    centres = (torch.arange(R) + 0.5) / R * 2 - 1  # align_corners=False cell centres in [-1, 1]
    planes = torch.zeros(3, C, R, R)
    planes[0, 0] = centres[None, :].expand(R, R)  # xy plane: column <- x
    planes[1, 1] = centres[:, None].expand(R, R)  # xz plane: row <- z
    planes[2, 0] = centres[:, None].expand(R, R) * 10  # zy plane: row <- y
    pts = torch.tensor([[0.3, -0.5, 0.6], [-0.7, 0.2, -0.1], [0.05, 0.8, 0.4]])
    f = sample_triplane(planes, pts)  # [M, 3, C]
    assert f.shape == (3, 3, C)
    # Bilinear interpolation of a linear function is exact (away from the outer half-cell).
    assert torch.allclose(f[:, 0, 0], pts[:, 0], atol=1e-5) and torch.allclose(f[:, 0, 1], torch.zeros(3))
    assert torch.allclose(f[:, 1, 1], pts[:, 2], atol=1e-5) and torch.allclose(f[:, 1, 0], torch.zeros(3))
    assert torch.allclose(f[:, 2, 0], 10 * pts[:, 1], atol=1e-4)
    # Outside the box: zero (EG3D pads with zeros).
    assert float(sample_triplane(planes, torch.tensor([[0.0, 0.0, 1.5]]))[0, 1].abs().max()) < 1e-6
    # World points through the box mapping.
    box = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 8.0]])
    assert torch.allclose(normalize_points(torch.tensor([[1.0, 1.0, 8.0]]), box), torch.tensor([[0.0, -0.5, 1.0]]))


# ------------------------------------------------------------------------------------------- reference


def _reference_ray(field, o, d, near, far, cfg: VolumeConfig):
    """One ray with Python loops: stratified bin centres, sequential transmittance, inverse CDF by scanning."""
    n_c = cfg.num_coarse
    t = [near + (far - near) * (i + 0.5) / n_c for i in range(n_c)]

    def march(ts):
        vals = [field((o + d * ti)[None]) for ti in ts]
        trans, feat, alpha, depth, ws = 1.0, 0.0, 0.0, 0.0, []
        for i in range(len(ts) - 1):
            s = 0.5 * (vals[i][0][0] + vals[i + 1][0][0])
            f = 0.5 * (vals[i][1][0] + vals[i + 1][1][0])
            a = 1.0 - torch.exp(-F.softplus(s + cfg.density_offset) * (ts[i + 1] - ts[i]))
            w = a * trans
            feat, alpha, depth = feat + w * f, alpha + w, depth + w * 0.5 * (ts[i] + ts[i + 1])
            ws.append(float(w.detach()))
            trans = trans * (1.0 - a + 1e-10)
        return feat, alpha, depth / max(float(alpha.detach()), 1e-10), ws

    feat, alpha, depth, ws = march(t)
    if cfg.num_fine:
        m = [max(ws[max(i - 1, 0)], ws[i]) for i in range(len(ws))] + [ws[-1]]
        pdf = [0.5 * (m[i] + m[i + 1]) + 0.01 for i in range(len(ws))]
        total = sum(pdf)
        fine = []
        for k in range(cfg.num_fine):
            u, acc = (k + 0.5) / cfg.num_fine * total, 0.0
            for i, p in enumerate(pdf):
                if acc + p > u or i == len(pdf) - 1:
                    fine.append(t[i] + (u - acc) / p * (t[i + 1] - t[i]))
                    break
                acc += p
        feat, alpha, depth, _ = march(sorted(t + fine))
    return feat, alpha, depth


@pytest.mark.parametrize("num_fine", [0, 6])
def test_batched_renderer_matches_per_ray_loop_with_gradients(num_fine):
    torch.manual_seed(0)
    cfg = VolumeConfig(num_coarse=7, num_fine=num_fine, chunk=5)
    planes = (torch.randn(3, 4, 6, 6) * 0.8).requires_grad_()
    dec = OSGDecoder(4, 8, 3)
    with torch.no_grad():
        dec.net[2].bias[0] = 1.5  # dense enough that the weights matter
    vm, K = _look_at_z(3.0), torch.tensor(camera.intrinsics(2.5, 2.5, 3.0, 3.0))
    out = render_triplane(planes, dec, BOX, vm, K, 6, 6, cfg)
    o, d = camera_rays(vm, K, 6, 6)
    near, far = ray_box(o, d, BOX)
    assert bool((far > near).any() and (far == near).any())  # some rays miss the box

    def field(x):
        return dec(sample_triplane(planes, normalize_points(x, BOX)).mean(1))

    ref_f, ref_a, ref_d = [], [], []
    for i in range(o.shape[0]):
        if far[i] > near[i]:
            f, a, dep = _reference_ray(field, o[i], d[i], float(near[i]), float(far[i]), cfg)
        else:
            f, a, dep = torch.zeros(3), torch.zeros(()), 0.0
        ref_f.append(f)
        ref_a.append(a)
        ref_d.append(float(dep))
    ref_f, ref_a = torch.stack(ref_f).reshape(6, 6, 3), torch.stack(ref_a).reshape(6, 6)
    assert torch.allclose(out["features"], ref_f, atol=1e-5)
    assert torch.allclose(out["alpha"], ref_a, atol=1e-5)
    assert torch.allclose(out["depth"], torch.tensor(ref_d).reshape(6, 6), atol=1e-4)

    probe = torch.randn(6, 6, 3)
    params = [planes] + list(dec.parameters())
    g_fast = torch.autograd.grad((out["features"] * probe).sum() + out["alpha"].sum(), params)
    g_ref = torch.autograd.grad((ref_f * probe).sum() + ref_a.sum(), params)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-5)
    assert float(g_fast[0].abs().sum()) > 0


def test_chunking_does_not_change_the_image():
    torch.manual_seed(1)
    planes, dec = torch.randn(3, 4, 8, 8), OSGDecoder(4, 8, 6)
    vm, K = _look_at_z(3.0), torch.tensor(camera.intrinsics(8.0, 8.0, 5.0, 4.0))
    big = render_triplane(planes, dec, BOX, vm, K, 10, 9, VolumeConfig(num_coarse=6, num_fine=6, chunk=100000))
    small = render_triplane(planes, dec, BOX, vm, K, 10, 9, VolumeConfig(num_coarse=6, num_fine=6, chunk=7))
    for k in ("features", "alpha", "depth"):
        assert torch.allclose(big[k], small[k], atol=1e-6)


def test_perturbed_sampling_is_seeded_and_unbiased_on_a_uniform_box():
    sigma = 0.5
    raw = _raw_for_density(sigma)

    def field(x):
        return torch.full((x.shape[0],), raw), torch.ones(x.shape[0], 1)

    o, d = torch.tensor([[0.0, 0.0, -5.0]]).expand(4000, 3), torch.tensor([[0.0, 0.0, 1.0]]).expand(4000, 3)
    near, far = ray_box(o, d, BOX)
    cfg = VolumeConfig(num_coarse=8, num_fine=8)
    a1 = render_rays(field, o, d, near, far, cfg, perturb=True, generator=torch.Generator().manual_seed(3))
    a2 = render_rays(field, o, d, near, far, cfg, perturb=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1["alpha"], a2["alpha"])
    # Jittered bins cover on average L (1 - 1/n) as the centres do, up to the spread of the end samples.
    assert a1["alpha"].std() > 0
    assert a1["alpha"].mean().item() == pytest.approx(1 - math.exp(-sigma * 2 * (1 - 1 / 8)), abs=0.02)


def test_composite_weights_sum_to_alpha():
    t = torch.tensor([[0.0, 0.5, 1.5, 2.0]])
    out = composite(torch.tensor([[2.0, 3.0, 0.0, 1.0]]), torch.ones(1, 4, 2), t)
    assert torch.allclose(out["weights"].sum(-1), out["alpha"])
    assert torch.allclose(out["features"][0], out["alpha"].expand(2))


def test_superresolution_starts_as_bilinear_upsampling_and_learns():
    torch.manual_seed(0)
    sr = SuperResolution(in_channels=8, out_channels=4, channels=(16, 8))
    assert sr.factor == 4
    x = torch.rand(1, 8, 6, 5)
    y = sr(x)
    assert y.shape == (1, 4, 24, 20)
    up = F.interpolate(F.interpolate(x[:, :4], scale_factor=2, mode="bilinear"), scale_factor=2, mode="bilinear")
    assert torch.allclose(y, up, atol=1e-6)
    # A target the skip path cannot give: the upsampled other channels of the input.
    target = F.interpolate(x[:, 4:], scale_factor=4, mode="bilinear")
    opt = torch.optim.Adam(sr.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = (sr(x) - target).abs().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError):
        SuperResolution(in_channels=2, out_channels=3)
