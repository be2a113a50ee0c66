"""FlameTalk (sec. 3.2) on synthetic data: causality, the speech subset, training that learns audio -> mouth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkinghead.face.landmarks import CHIN, LEFT_EYE_OUTER, LOWER_LIP_INNER, NOSE_TIP, RIGHT_EYE_OUTER, UPPER_LIP_INNER
from talkinghead.methods.gaussianflametalk.flametalk import (
    FlameTalkConfig, alignment_mask, biased_causal_mask, build_flametalk, causal_average, evaluate_flametalk,
    periodic_positional_encoding, speech_components, train_flametalk)
from talkinghead.methods.prior import fit_linear_prior

V = 478

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _face(seed: int = 0):
    """A toy face model with mediapipe numbering: component 0 opens the mouth (moves the chin and lower
    lip down), component 1 moves the brows/eyes, component 2 is small noise everywhere."""
    rng = np.random.default_rng(seed)
    neutral = rng.normal(0, 0.03, (V, 3)).astype(np.float32)
    neutral[:, 2] = np.abs(neutral[:, 2])
    neutral[NOSE_TIP] = [0, 0, -0.02]
    neutral[CHIN] = [0, 0.07, 0]
    neutral[UPPER_LIP_INNER] = [0, 0.035, -0.01]
    neutral[LOWER_LIP_INNER] = [0, 0.036, -0.01]
    neutral[RIGHT_EYE_OUTER], neutral[LEFT_EYE_OUTER] = [-0.045, -0.03, 0], [0.045, -0.03, 0]
    basis = np.zeros((3, V, 3), np.float32)
    below = neutral[:, 1] > 0.0
    below[UPPER_LIP_INNER] = False
    basis[0, below, 1] = 0.01 * (neutral[below, 1] / 0.07)  # jaw drop, growing towards the chin
    basis[0, LOWER_LIP_INNER, 1] = 0.01
    above = neutral[:, 1] < -0.02
    basis[1, above, 1] = -0.004
    basis[2] = rng.normal(0, 0.0003, (V, 3))
    faces = np.array([[0, 1, 2]], np.int32)
    return neutral, basis, faces


def _clip(T: int, seed: int):
    """Audio [T, 6] whose 'loudness' channel drives the jaw with a one-frame lag; brows move at random."""
    rng = np.random.default_rng(seed)
    loud = np.clip(np.convolve(rng.normal(0, 1, T), np.ones(4) / 2, "same"), 0, None)
    audio = np.concatenate([loud[:, None], rng.normal(0, 1, (T, 5))], 1).astype(np.float32)
    jaw = np.concatenate([[0.0], loud[:-1]])  # frame t depends on audio at t-1 (causal)
    expr = np.stack([jaw, rng.normal(0, 1, T), rng.normal(0, 0.1, T)], 1).astype(np.float32)
    return audio, expr


def test_speech_components_pick_the_mouth_and_jaw_not_the_brows():
    neutral, basis, _ = _face()
    idx = speech_components(neutral, basis, min_share=0.5, max_count=5)
    assert 0 in idx and 1 not in idx


def test_masks_and_ppe():
    pe = periodic_positional_encoding(60, 8, 25)
    torch.testing.assert_close(pe[3], pe[28])
    assert not torch.allclose(pe[3], pe[4])
    m = biased_causal_mask(6, 2, period=2, context=4)
    assert torch.isinf(m[:, 0, 1]).all() and torch.isinf(m[:, 5, 1]).all()  # future; beyond the context
    assert (m[:, 5, 2] < m[:, 5, 4]).all()  # older frames are biased down
    a = alignment_mask(4)
    assert not a.diagonal().any() and a.sum() == 12


def test_causal_average_known_answer():
    x = torch.tensor([[3.0], [0.0], [6.0], [9.0]])
    torch.testing.assert_close(causal_average(x, 3), torch.tensor([[3.0], [1.5], [3.0], [5.0]]))
    torch.testing.assert_close(causal_average(x, 1), x)


def test_build_is_reproducible_whatever_ran_before():
    neutral, basis, _ = _face()
    audio, expr = _clip(200, 1)
    cfg = FlameTalkConfig(d_model=16, heads=2, encoder_layers=1, context=20)
    a = build_flametalk(cfg, audio, expr, neutral, basis)
    torch.rand(1000)  # moves the global generator
    b = build_flametalk(cfg, audio, expr, neutral, basis)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    c = build_flametalk(FlameTalkConfig(d_model=16, heads=2, encoder_layers=1, context=20, seed=1), audio, expr,
                        neutral, basis)
    assert not torch.equal(a.audio_embed.weight, c.audio_embed.weight)


def test_prediction_is_causal_no_future_audio_leaks():
    neutral, basis, _ = _face()
    audio, expr = _clip(60, 0)
    model = build_flametalk(FlameTalkConfig(d_model=16, heads=2, context=20, iterations=1), audio, expr, neutral, basis)
    torch.nn.init.normal_(model.motion_decoder[-1].weight, std=0.5)  # a non-trivial network
    out = model.predict(audio)
    changed = audio.copy()
    changed[40:] = np.random.default_rng(5).normal(0, 3, changed[40:].shape)
    out2 = model.predict(changed)
    np.testing.assert_allclose(out[:40], out2[:40], atol=1e-5)
    assert np.abs(out[40:] - out2[40:]).max() > 1e-3
    # the non-speech coefficients are the template's
    np.testing.assert_allclose(out[:, 1], expr[:, 1].mean(), atol=1e-6)
    # teacher-forced and autoregressive passes agree when fed the model's own predictions (within the
    # first context window; later the autoregressive pass restarts its window like a training window)
    x = torch.as_tensor(audio)[None]
    model.eval()
    with torch.no_grad():
        ar = model(x)
        tf = model(x, target_speech=ar)
    torch.testing.assert_close(tf[:, :20], ar[:, :20], atol=1e-4, rtol=1e-4)


def test_no_encoder_layers_is_a_linear_projection_of_each_frame():
    """encoder_layers 0 (a pretrained encoder's features + the paper's linear projection): C^t reads frame t only."""
    neutral, basis, _ = _face()
    audio, expr = _clip(30, 0)
    model = build_flametalk(FlameTalkConfig(d_model=16, heads=2, context=20, encoder_layers=0), audio, expr,
                            neutral, basis).eval()
    assert model.audio_encoder is None
    x = torch.as_tensor(audio)[None]
    changed = x.clone()
    changed[0, 12] += 3.0
    with torch.no_grad():
        diff = (model.encode_audio(changed) - model.encode_audio(x)).abs().amax(-1)[0]
    assert diff[12] > 1e-3 and float(diff[torch.arange(30) != 12].max()) == 0.0
    assert model.predict(audio).shape == expr.shape


def test_training_learns_audio_to_jaw_and_beats_the_mean_face():
    neutral, basis, _ = _face()
    audio, expr = _clip(1000, 1)
    test_audio, test_expr = _clip(150, 2)
    # output_average=1: the toy jaw follows white-ish noise frame by frame; this tests what the network learns
    # (no linear prior: it alone would already fit this linear toy, see the next tests).
    cfg = FlameTalkConfig(d_model=32, heads=2, encoder_layers=1, context=40, iterations=300, batch=4, lr=3e-3,
                          output_average=1, prior_taps=0)
    model = build_flametalk(cfg, audio, expr, neutral, basis)
    log: list = []
    train_flametalk(model, audio, expr, progress=False, log=log)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    m = evaluate_flametalk(model, test_audio, test_expr)
    assert m["vertex_error_mm"] < 0.7 * m["baseline_vertex_error_mm"]
    assert m["lip_error_mm"] < 0.7 * m["baseline_lip_error_mm"]
    assert m["mouth_opening_corr"] > 0.7


@pytest.mark.slow
def test_linear_prior_known_answer_and_strength_by_blocked_cv():
    rng = np.random.default_rng(0)
    z = np.c_[rng.normal(0, 1, (400, 5)), np.ones(400)]
    w_true = rng.normal(0, 1, (6, 2))
    w, lam, held_out = fit_linear_prior(z, z @ w_true, (1e-6, 1e2, 1e4))
    assert lam == 1e-6
    np.testing.assert_allclose(w, w_true, atol=1e-5)
    np.testing.assert_allclose(held_out, z @ w_true, atol=1e-5)  # an exact map predicts unseen blocks too
    # targets that carry nothing but a constant: the strongest ridge wins, the constant is kept unpenalised
    y = 3.0 + rng.normal(0, 1, (400, 2))
    w, lam, _ = fit_linear_prior(z, y, (1e-6, 1e2, 1e4))
    assert lam == 1e4 and np.abs(w[:-1]).max() < 0.02
    np.testing.assert_allclose(w[-1], y.mean(0), atol=0.02)


def test_linear_prior_alone_follows_a_lagged_jaw_before_training():
    """The closed-form prior (rows t-1..t) finds the toy's one-frame-lagged jaw with the decoder still at zero."""
    neutral, basis, _ = _face()
    audio, expr = _clip(1000, 1)
    test_audio, test_expr = _clip(150, 2)
    cfg = FlameTalkConfig(d_model=16, heads=2, encoder_layers=0, context=40, output_average=1, prior_taps=2)
    with_prior = evaluate_flametalk(build_flametalk(cfg, audio, expr, neutral, basis), test_audio, test_expr)
    assert with_prior["mouth_opening_corr"] > 0.95
    assert with_prior["vertex_error_mm"] < 0.3 * with_prior["baseline_vertex_error_mm"]
    one_tap = FlameTalkConfig(d_model=16, heads=2, encoder_layers=0, context=40, output_average=1, prior_taps=1)
    # row t alone does not see the audio of t-1 that drives the jaw at t (only its smoothed neighbour)
    assert evaluate_flametalk(build_flametalk(one_tap, audio, expr, neutral, basis), test_audio,
                              test_expr)["mouth_opening_corr"] < with_prior["mouth_opening_corr"] - 0.2


def test_flametalk_on_a_real_clip_beats_the_mean_face(tmp_path):
    """cnn_anchor_en_71s: prepare, train FlameTalk on the training split, measure on the test split (~4 min)."""
    import subprocess
    import sys

    from conftest import shared_clip

    from talkinghead.data import PreparedDataset

    video = shared_clip("cnn_anchor_en_71s.mp4")
    out = tmp_path / "cnn"
    subprocess.run([sys.executable, "-m", "talkinghead.cli", "prepare", str(video), "--out", str(out), "--quiet"],
                   check=True)
    ds = PreparedDataset(out)
    fm, A, X = ds.face_model, ds.audio_matrix, ds.tracks.expression
    train, test = ds.split_indices("train"), ds.split_indices("test")
    model = build_flametalk(FlameTalkConfig(), A[train], X[train], fm.neutral, fm.basis)
    train_flametalk(model, A[train], X[train], progress=False)
    m = evaluate_flametalk(model, A[test], X[test])
    assert m["vertex_error_mm"] < m["baseline_vertex_error_mm"]
    assert m["lip_error_mm"] < m["baseline_lip_error_mm"]
    assert m["mouth_opening_corr"] > 0.4  # 0.50-0.56 over seeds (flametalk.py); 0.7 is the unmet target
