"""Issue 16's fast paths against their plain references: the same functions, to float rounding.

* D-SSIM by banded matrix products vs the two 1-D convolutions per moment it replaces;
* the compiled projection (forward + hand-written backward) vs :func:`talkinghead.render.projection.project`;
* the Numba triplane lookup vs ``F.grid_sample`` (values, gradients of planes and points, the planes' edges);
* the folded cross-attention vs ``nn.MultiheadAttention`` with the same weights (values, weights, gradients);
* GaussianTalker's batched geometry replay vs one frame at a time (the same replayed frames);
* :class:`RenderCache`: kept while nothing changes, rebuilt after an optimiser step, a load or a move;
* GaussianFlameTalk's compiled binding (rendering) vs :func:`rigging.bind_activated`;
* DEGSTalk's mask dilation (running-sum counts, or two 1-D max-pools) vs the square max-pool;
* FlameTalk's streaming step (only the rows its one output reads) vs the full encoder + decoder pass it replaces;
* whole renders: eval mode (frozen per-avatar state, the Numba inference path) vs the live training-mode
  computation with the torch reference rasterizer, for GaussianTalker and GaussianFlameTalk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from talkinghead.methods import get_method
from talkinghead.methods.base import RenderCache, adam
from talkinghead.methods.data import FrameStore
from talkinghead.methods.gaussiantalker.attention import CrossAttentionBlock
from talkinghead.methods.losses import _C1, _C2, _window, ssim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same_frame(fast, ref):
    """Equal to float32 rounding (the fast path projects in float64), except where rounding flips one of 3DGS's
    thresholds (alpha 1/255, the early termination) for a pixel: a few pixels may then differ by about one
    skipped 1/255 contribution."""
    diff = (fast - ref).abs()
    assert diff.max() < 5e-3 and (diff > 1e-4).float().mean() < 1e-3, (diff.max(), (diff > 1e-4).float().mean())


def _ssim_by_convolution(a, b):
    """3DGS's SSIM as it was written before: separable conv2d with zero padding, per moment."""
    x, y = a.permute(2, 0, 1)[:, None], b.permute(2, 0, 1)[:, None]
    g = _window().to(a)

    def blur(t):
        t = F.conv2d(t, g.view(1, 1, 1, -1), padding=(0, 5))
        return F.conv2d(t, g.view(1, 1, -1, 1), padding=(5, 0))

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return (((2 * mx * my + _C1) * (2 * sxy + _C2)) / ((mx * mx + my * my + _C1) * (sxx + syy + _C2))).mean()


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (7, 5)])
def test_ssim_by_matrix_products_equals_the_convolution_form(shape):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(*shape, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.rand(*shape, 3, generator=gen, dtype=torch.float64)
    fast, ref = ssim(a, b), _ssim_by_convolution(a, b)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    (g_fast,), (g_ref,) = torch.autograd.grad(fast, a), torch.autograd.grad(ref, a)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)
    assert ssim(b, b).item() == pytest.approx(1.0)


def test_numba_projection_equals_the_torch_projection_with_gradients():
    from talkinghead.render import raster_numba
    from talkinghead.render.projection import project

    if not raster_numba.available():
        pytest.skip("numba not installed")
    gen = torch.Generator().manual_seed(0)
    n = 300
    means = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 0.3, 0.2], dtype=torch.float64)
    means[:10, 2] = -3.0  # behind the camera
    means[10:20, 0] = 1.45  # large ones beside the image: the Jacobian's x / z (y / z) clamped, still drawn
    means[20:30, 1] = -1.4
    quats = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    scales = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 0.05 + 0.005
    scales[10:30] = 0.3
    opac = torch.rand(n, generator=gen, dtype=torch.float64)
    opac[30:35] = 1e-3  # below 1/255: culled
    angle = torch.tensor(0.3, dtype=torch.float64)
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[0, 0], viewmat[0, 2], viewmat[2, 0], viewmat[2, 2] = angle.cos(), angle.sin(), -angle.sin(), angle.cos()
    viewmat[:3, 3] = torch.tensor([0.05, -0.02, 2.0], dtype=torch.float64)
    K = torch.tensor([[120.0, 0, 60], [0, 110, 50], [0, 0, 1]], dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, viewmat)]
    outs = {}
    for name, fn in (("torch", project), ("numba", raster_numba.project_numba)):
        pr = fn(*leaves[:3], opac, leaves[3], K, 120, 100, 0.01, 1e10, 0.3)
        assert pr.visible[:10].sum() == 0 and pr.visible[30:35].sum() == 0 and pr.visible.sum() > 200
        w = torch.randn(n, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * pr.visible[:, None]
        loss = (torch.cat([pr.means2d, pr.conics, pr.depths[:, None]], 1) * w).sum()
        outs[name] = (pr, torch.autograd.grad(loss, leaves))
    (ref, ref_g), (fast, fast_g) = outs["torch"], outs["numba"]
    for key in ("means2d", "conics", "depths"):
        v = ref.visible
        torch.testing.assert_close(getattr(fast, key)[v], getattr(ref, key)[v], rtol=1e-10, atol=1e-10)
    assert torch.equal(fast.visible, ref.visible) and torch.equal(fast.radii, ref.radii)
    for name, a, b in zip(("means", "quats", "scales", "viewmat"), fast_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=name)
    assert ref.visible[10:30].sum() >= 10 and (ref_g[2][10:30].abs().sum(1) > 0).sum() >= 10  # clamped, drawn


def test_numba_triplane_equals_grid_sample_with_gradients():
    from talkinghead.nn import triplane_numba
    from talkinghead.nn.triplane import Triplane

    if not triplane_numba.available():
        pytest.skip("numba not installed")
    torch.manual_seed(0)
    plane = Triplane((5, 8), 3, torch.tensor([[-1.0, -2.0, 0.0], [1.0, 2.0, 3.0]]))
    with torch.no_grad():
        for p in plane.planes:
            p.normal_()  # signed values: a wrong corner or sign shows
    lo, hi = plane.bounds
    xyz = lo + (hi - lo) * torch.rand(200, 3)
    xyz[:4] = hi  # u = 1 exactly: grid_sample's zero-padded neighbour
    xyz[4:8] = lo
    xyz[8:12] = hi + 0.5  # outside: clamped to the faces
    xyz[12, 0] = lo[0] + (hi - lo)[0] * 0.5  # on a texel line (u = 0 on a 5-texel axis)
    xyz.requires_grad_(True)
    grad = torch.randn(200, plane.out_dim)
    results = []
    for fast in (False, True):
        plane.fast = fast
        out = plane(xyz)
        g_xyz, *g_planes = torch.autograd.grad(out, [xyz, *plane.planes], grad)
        results.append((out, g_xyz, g_planes))
    (ref, ref_xyz, ref_planes), (out, out_xyz, out_planes) = results
    assert out.grad_fn is not None and ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_xyz, ref_xyz, rtol=1e-4, atol=1e-5)
    for a, b in zip(out_planes, ref_planes):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref_xyz[8:12].abs().max() == 0  # clamped points get no gradient, either way


def test_folded_cross_attention_equals_multihead_attention_and_batches_frames():
    torch.manual_seed(0)
    block = CrossAttentionBlock(24, heads=4)
    with torch.no_grad():
        for p in block.parameters():  # away from the init, where biases are zero
            p.normal_(0, 0.3)
    z = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    block = block.double()
    out, w = block(z, tokens)
    a, w_ref = block.attn(block.norm_q(z)[None], tokens[None], tokens[None], need_weights=True)
    ref = z + a[0]
    ref = ref + block.ffn(block.norm_f(ref))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, w_ref[0])
    grads = torch.autograd.grad(out.square().sum(), [z, tokens, block.attn.in_proj_weight])
    grads_ref = torch.autograd.grad(ref.square().sum(), [z, tokens, block.attn.in_proj_weight])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    # A batch of frames (tokens [B, 4, d]) over shared queries equals each frame alone.
    many = torch.randn(3, 4, 24, dtype=torch.float64)
    batched, _ = block(z, many)
    for i in range(3):
        torch.testing.assert_close(batched[i], block(z, many[i])[0])


def test_render_cache_is_kept_until_the_weights_change():
    net = torch.nn.Linear(3, 2)
    builds = []
    cache = RenderCache(lambda: builds.append(1) or net.weight.sum().item())
    assert cache.get(net) is None and not builds  # training mode: compute live
    net.eval()
    first = cache.get(net)
    assert cache.get(net) == first and len(builds) == 1
    opt = adam([{"params": list(net.parameters()), "lr": 0.1, "name": "all"}])
    net.train()
    assert cache.get(net) is None  # a training step uses the method in training mode
    net(torch.ones(3)).sum().backward()
    opt.step()
    net.eval()
    assert cache.get(net) != first and len(builds) == 2
    with torch.no_grad():
        net.weight.add_(1.0)  # an in-place edit in eval mode
    assert cache.get(net) == pytest.approx(first_after := net.weight.sum().item()) and len(builds) == 3
    assert first_after != first
    net.load_state_dict({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    assert cache.get(net) == 0.0 and len(builds) == 4
    net.to(torch.float64)  # new tensors
    cache.get(net)
    assert len(builds) == 5


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from test_methods import write_synthetic_dataset

    path = tmp_path_factory.mktemp("speed_synth")
    write_synthetic_dataset(path, T=24, test_frames=4)
    return path


def _gaussiantalker(path, lip_prior: int | None = None):
    from test_gaussiantalker import _tiny_config

    from talkinghead.data import PreparedDataset

    cfg = _tiny_config(10)
    if lip_prior is not None:
        cfg.lip_prior = lip_prior
    store = FrameStore(path, cfg.data, progress=False)
    model = get_method("gaussiantalker").build(cfg, store.info, dataset=PreparedDataset(path, size=64))
    with torch.no_grad():
        model.deform_on.fill_(True)
        model.expression_basis[0, :, 1] = 0.004
        for h in model.f_deform.heads.values():  # non-zero offsets: the deformation matters
            torch.nn.init.normal_(h.weight, std=0.3)
    return model, store


def test_batched_geometry_replay_equals_one_frame_at_a_time(synthetic):
    model, store = _gaussiantalker(synthetic, lip_prior=0)  # the replay trains the network-placed lips
    for k in range(4):
        model.train_loss(store.batch(k), step=0)  # remember four frames
    bank = model._geo_bank
    rng_state = bank._rng.bit_generator.state
    batched = model.replay_geometry_loss()
    bank._rng.bit_generator.state = rng_state  # the same draws
    f_geo = model.triplane(model.means[model.geo_points])
    loop = []
    for i in bank._rng.integers(len(bank), size=model.cfg.geo_replay):
        audio, blink, viewmat, expr = bank._rows[i]
        z, _ = model.attention(f_geo, model._tokens(audio, blink, viewmat))
        loop.append(model._geo_error(model.f_deform(z)["means"] * model.offset_scale, expr))
    torch.testing.assert_close(batched, torch.stack(loop).sum(), rtol=1e-5, atol=1e-7)


def test_gaussiantalker_render_equals_the_live_reference_computation(synthetic):
    torch.manual_seed(0)
    model, store = _gaussiantalker(synthetic)
    with torch.no_grad():  # non-zero head biases and LayerNorm affines: the render state folds them
        for h in model.f_deform.heads.values():
            torch.nn.init.normal_(h.bias, std=0.2)
        for block in model.attention.blocks:
            for norm in (block.norm_q, block.norm_f):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
                torch.nn.init.normal_(norm.bias, std=0.2)
    conds = [store.condition(k) for k in (0, 3)]
    model.eval()
    with torch.no_grad():
        # kept render state (folded heads, first block's queries) + the auto (Numba where installed) compositor
        fast = [model.render(c) for c in conds]
        model.train()  # live: triplane, F_can, attention and F_deform as training runs them, torch compositor
        model.cfg.backend = "torch"
        ref = [model.render(c) for c in conds]
    for a, b, c in zip(fast, ref, conds):
        assert_same_frame(a, b)
        assert (b - c.backdrop).abs().max() > 0.03  # the head is in the picture
    assert (ref[0] - ref[1]).abs().max() > 1e-4  # two different frames


def test_gaussianflametalk_render_equals_the_live_reference_computation(synthetic, monkeypatch):
    from test_gaussianflametalk import _tiny

    from talkinghead.data import PreparedDataset

    spec = _tiny(monkeypatch, 5)
    cfg = spec.make_config("cpu-small", None)
    store = FrameStore(synthetic, cfg.data, progress=False)
    model = spec.build(cfg, store.info, dataset=PreparedDataset(synthetic, size=64))
    cond = store.condition(3)
    model.eval()
    with torch.no_grad():
        fast = model.render(cond)
        model.train()
        model.cfg.backend = "torch"
        ref = model.render(cond)
    assert_same_frame(fast, ref)
    assert (ref - cond.backdrop).abs().max() > 0.03


@pytest.mark.parametrize("encoder_layers,decoder_layers,lookahead,norm_first", [
    (2, 1, 0, False), (2, 1, 1, False), (0, 1, 0, False), (3, 2, 2, False), (2, 1, 1, True)])
def test_flametalk_streaming_step_equals_the_full_pass(encoder_layers, decoder_layers, lookahead, norm_first):
    """next_frame_of (encoder rows the window reaches, the last decoder row alone) = next_frame over the whole
    encoded history, at every history length up to past the stream's cap, with the linear prior."""
    import numpy as np

    from talkinghead.face.landmarks import NUM_LANDMARKS
    from talkinghead.methods.gaussianflametalk.flametalk import FlameTalkConfig, build_flametalk

    cfg = FlameTalkConfig(d_model=16, heads=2, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                          context=6, period=4, audio_lookahead=lookahead, prior_taps=3)
    rng = np.random.default_rng(0)
    E, D = 6, 5
    neutral, basis = rng.normal(0, 0.05, (NUM_LANDMARKS, 3)), rng.normal(0, 0.01, (E, NUM_LANDMARKS, 3))
    audio = rng.normal(0, 1, (40, D)).astype(np.float32)
    model = build_flametalk(cfg, audio, rng.normal(0, 1, (40, E)), neutral, basis).eval()
    if norm_first:
        for layer in [*(model.audio_encoder.layers if model.audio_encoder else []), *model.decoder.layers]:
            layer.norm_first = True
    torch.nn.init.normal_(model.motion_decoder[-1].weight, std=1.0)
    x = torch.as_tensor(audio)[None]
    S = model.speech_idx.numel()
    with torch.no_grad():
        for rows in (1, 2, 5, 9, 2 * cfg.context + lookahead, 30):
            hist = x[:, :rows]
            n = rows - lookahead
            if n < 1:
                continue
            for L in sorted({1, min(n, 3), min(n, cfg.context)}):
                prev = torch.randn(1, L - 1, S) if L > 1 else None
                C = model.encode_audio(hist)[:, :n]
                ref = model.next_frame(C[:, n - L:], prev, model.audio_prior(hist)[:, n - L:n])
                torch.testing.assert_close(model.next_frame_of(hist, n, prev), ref, rtol=1e-5, atol=1e-6)


def test_compiled_binding_equals_bind_activated():
    """Means and scales to float rounding, quaternions up to sign (q and -q: the same rotation), also on a
    sliver triangle (a closing mouth's curtain) and on one with its normal along every axis."""
    from talkinghead.methods.gaussianflametalk.rigging import bind_activated, bind_numba, quat_multiply

    g = torch.Generator().manual_seed(3)
    verts = torch.randn(40, 3, generator=g, dtype=torch.float64)
    verts[39] = (verts[0] + verts[1]) / 2 + 1e-5  # faces[-1] is nearly flat
    faces = torch.stack([torch.randperm(39, generator=g)[:3] for _ in range(60)])  # three distinct vertices
    faces[-1] = torch.tensor([0, 1, 39])
    faces[:3] = torch.tensor([[0, 1, 2]] * 3)
    verts[:3] = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)  # normal along z
    parent = torch.randint(0, 60, (300,), generator=g)
    parent[:3] = torch.tensor([0, 59, 59])
    local_means = torch.randn(300, 3, generator=g, dtype=torch.float64)
    local_quats = F.normalize(torch.randn(300, 4, generator=g, dtype=torch.float64), dim=-1)
    local_scales = torch.rand(300, 3, generator=g, dtype=torch.float64)
    ref = bind_activated(verts, faces, parent, local_means, local_quats, local_scales)
    fast = bind_numba(verts, faces, parent, local_means, local_quats, local_scales)
    torch.testing.assert_close(fast[0], ref[0])
    torch.testing.assert_close(fast[2], ref[2])
    sign = torch.sign((fast[1] * ref[1]).sum(-1, keepdim=True))
    torch.testing.assert_close(fast[1] * sign, ref[1], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(fast[1]).all() and quat_multiply is not None


@pytest.mark.parametrize("px", [1, 3, 17])
def test_separable_dilation_equals_the_square_max_pool(px):
    from talkinghead.methods.degstalk.plate import dilate, erode

    g = torch.Generator().manual_seed(px)
    mask = (torch.rand(37, 53, generator=g) > 0.97).float()
    mask[0, 5] = mask[36, 52] = 1.0  # at the borders
    square = lambda m: F.max_pool2d(m[None, None], 2 * px + 1, stride=1, padding=px)[0, 0]  # noqa: E731
    assert torch.equal(dilate(mask, px), square(mask))
    assert torch.equal(erode(mask, px), 1.0 - square(1.0 - mask))
    soft = mask * torch.rand(37, 53, generator=g)  # not a {0, 1} mask: the max-pool path
    assert torch.equal(dilate(soft, px), square(soft))
