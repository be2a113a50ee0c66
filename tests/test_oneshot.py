"""The one-shot system of paper 003 (talkinghead.oneshot): known answers for its pieces, the stages on a
synthetic dataset (DDP vs one process, resume), and the CLI's bad inputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talkinghead.data import FaceModel, Tracks
from talkinghead.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# sizes small enough for a few seconds of training on one thread
TINY = {"generator.image_size": 32, "generator.render_size": 8, "generator.superres_channels": [8, 8],
        "generator.plane_size": 8, "generator.plane_channels": 4, "generator.synthesis_channels": 8,
        "generator.code_dim": 16, "generator.feature_channels": 4, "generator.num_coarse": 4,
        "generator.num_fine": 4, "motion.d_model": 16, "motion.layers": 1, "motion.heads": 2, "motion.sequence": 16,
        "motion.num_coefficients": 3, "motion.motion_code": 8, "motion_steps": 3, "generator_steps": 3,
        "mapper_steps": 0, "motion_batch": 2, "generator_batch": 2, "checkpoint_every": 2}


def _synthetic(path: Path, seed: int) -> Path:
    """The project's synthetic dataset with a face model that moves (two smooth expression directions)."""
    from test_methods import write_synthetic_dataset

    write_synthetic_dataset(path, T=30, test_frames=6, seed=seed)
    fm = FaceModel.load(path / "face_model.npz")
    rng = np.random.default_rng(seed)
    basis = np.zeros((2, 478, 3), np.float32)
    basis[0, :, 1] = 0.002 * np.tanh(fm.neutral[:, 1] / 0.03)
    basis[1, :, 0] = 0.002 * np.sin(fm.neutral[:, 0] / 0.02)
    FaceModel(fm.neutral, basis, fm.triangles).save(path / "face_model.npz")
    tr = Tracks.load(path / "tracks.npz")
    tr.expression = rng.normal(size=(30, 2)).astype(np.float32)
    tr.save(path / "tracks.npz")
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("oneshot_data")
    return [_synthetic(root / f"p{i}", i) for i in range(2)]


# ------------------------------------------------------------------------------------- expression space


def _random_models(n: int, rng) -> tuple[list[FaceModel], list[np.ndarray], np.ndarray]:
    shared = rng.normal(size=(3, 478, 3)).astype(np.float32) * 0.001  # true person-agnostic directions
    models, exprs = [], []
    base = rng.normal(size=(478, 3)).astype(np.float32) * 0.05
    for _ in range(n):
        neutral = base + rng.normal(size=(478, 3)).astype(np.float32) * 0.002
        models.append(FaceModel(neutral, shared.copy(), np.zeros((1, 3), np.int32)))
        exprs.append(rng.normal(size=(50, 3)).astype(np.float32))
    return models, exprs, shared


def test_expression_space_is_shared_across_people_and_recovers_single_meshes():
    from talkinghead.oneshot.expression import build_expression_space

    rng = np.random.default_rng(0)
    models, exprs, shared = _random_models(4, rng)
    space = build_expression_space(models, exprs, num_components=3)
    B = space.basis.reshape(3, -1)
    np.testing.assert_allclose(B @ B.T, np.eye(3), atol=1e-5)
    # the space spans the true directions: projecting and rebuilding a displacement is exact
    d = np.einsum("k,kvc->vc", rng.normal(size=3), shared)
    np.testing.assert_allclose(space.displacement(space.project(d)), d, atol=1e-6)
    # two people making the same expression get the same coefficients
    e = rng.normal(size=(1, 3)).astype(np.float32)
    c0 = space.clip_coefficients(models[0], e)
    c1 = space.clip_coefficients(models[1], e)
    np.testing.assert_allclose(c0, c1, atol=1e-5)
    assert np.std(space.clip_coefficients(models[0], exprs[0]), 0) == pytest.approx(np.ones(3), abs=0.35)
    # a single mesh: mean face + identity offset + expression -> the expression back (ridge: close, not exact)
    m = np.array([1.5, -1.0, 0.5], np.float32)
    mesh = space.mesh(m) + 0.5 * space.identity_std[0] * space.identity_basis[0]
    np.testing.assert_allclose(space.fit_mesh(mesh), m, atol=0.15)
    # torch and numpy agree
    np.testing.assert_allclose(space.mesh(torch.from_numpy(m)).numpy(), space.mesh(m), atol=1e-6)


# ------------------------------------------------------------------------------------------------ motion


def test_frame_windows_and_ctc_targets():
    from talkinghead.oneshot.motion import coefficient_windows, ctc_targets, frame_windows

    x = torch.arange(5, dtype=torch.float32).view(1, 5, 1)
    w = frame_windows(x, 2)[0]
    np.testing.assert_array_equal(w[0].numpy(), [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(w[4].numpy(), [2, 3, 4, 4, 4])
    c = coefficient_windows(torch.arange(12, dtype=torch.float32).view(6, 2), 3)
    np.testing.assert_array_equal(c[0].numpy(), [[0, 1], [0, 1], [2, 3]])
    names = ["SIL", "AA", "B"]
    assert ctc_targets(np.array([0, 0, 1, 1, 2, 0, 2, 2, 1]), names) == [2, 3, 3, 2]


def test_motion_generator_learns_with_the_lip_reader():
    from talkinghead.oneshot.motion import LipReader, MotionEncoder, MotionGenerator, motion_loss

    torch.manual_seed(0)
    G = MotionGenerator(6, 3, d_model=16, layers=1, heads=2)
    reader = LipReader(4, 6, 5, hidden=16)
    audio = torch.randn(2, 12, 6)
    target = audio[..., :3] * 0.5
    lip_basis = torch.randn(3, 4, 3) * 0.01
    opt = torch.optim.Adam(list(G.parameters()) + list(reader.parameters()), lr=1e-2)
    first = None
    for _ in range(25):
        pred = G(audio)
        loss, logs = motion_loss(pred, target, torch.einsum("btk,kvc->btvc", pred, lip_basis),
                                 torch.einsum("btk,kvc->btvc", target, lip_basis), audio, reader,
                                 [[1, 2, 3], [4, 4]], {"mse": 10.0, "ctc": 0.1, "lat": 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or logs
    assert logs["coef_mse"] < 0.5 * first["coef_mse"] and np.isfinite(logs["ctc_pred"])
    E = MotionEncoder(3, 8, window=11)
    assert E(torch.randn(5, 11, 3)).shape == (5, 8)


# ---------------------------------------------------------------------------------------- identity, M_e


def test_identity_encoder_levels_and_neutral_mapper_is_identity():
    from talkinghead.oneshot.identity import EmotionMapper, IdentityEncoder

    enc = IdentityEncoder(32, 16, channels=(8, 8, 8, 8), fpn_channels=8)
    w = enc.code(torch.rand(2, 3, 32, 32))
    assert w.shape == (2, 3, 16)
    me = EmotionMapper(16, 7, hidden=8)
    torch.nn.init.normal_(me.nets[3][2].weight)  # a trained-looking net for one (level, emotion)
    np.testing.assert_allclose(me(w, torch.zeros(2, 7)).detach().numpy(), w.detach().numpy())
    moved = me(w, torch.eye(7)[[3, 3]])
    assert not torch.allclose(moved[:, 0], w[:, 0]) and torch.allclose(moved[:, 1:], w[:, 1:])


# ----------------------------------------------------------------------------------------------- emotion


def test_facs_prototypes_move_the_right_landmarks():
    from talkinghead.oneshot.emotion import EMOTIONS, check_emotion, emotion_weights, expression_measures, \
        prototype_displacement

    rng = np.random.default_rng(1)
    face = rng.normal(size=(478, 3)).astype(np.float32) * 0.04
    face[61, 0], face[291, 0] = -0.025, 0.025  # mouth corners on their sides
    assert np.abs(prototype_displacement(face, "neutral")).max() == 0
    happy = prototype_displacement(face, "happy")
    assert happy[61, 1] < -0.003 and happy[291, 1] < -0.003  # corners up (y is down)
    assert happy[61, 0] < 0 < happy[291, 0]  # and outwards, mirrored
    contempt = prototype_displacement(face, "contempt")
    assert contempt[61, 1] < -0.003 and abs(contempt[291, 1]) < 1e-4  # one side only
    surprised = prototype_displacement(face, "surprised")
    assert surprised[152, 1] > 0.005 and surprised[105, 1] < -0.003  # jaw drops, brows rise
    assert emotion_weights("neutral").sum() == 0 and emotion_weights("sad")[EMOTIONS.index("sad") - 1] == 1
    with pytest.raises(UserError, match="unknown emotion"):
        check_emotion("joyful")
    # measurements: corners lifted by 2 px on an interocular of 100 px -> lift +0.02
    lm = np.zeros((1, 478, 3), np.float32)
    lm[0, 263, 0] = 100.0
    lm[0, [0, 17], 1] = 50.0
    lm[0, [61, 291], 1] = 48.0
    assert expression_measures(lm)["mouth_corner_lift"][0] == pytest.approx(0.02)


def test_mead_reader(tmp_path):
    from talkinghead.oneshot.mead import scan_mead

    for rel in ("M003/video/front/happy/level_2/001.mp4", "M003/video/front/neutral/level_1/002.mp4",
                "M003/video/left_30/happy/level_2/001.mp4", "W009/video/front/joy/level_1/001.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    prepared = tmp_path / "M003/video/front/happy/level_2/001"
    prepared.mkdir()
    (prepared / "meta.json").write_text(json.dumps({"format": "talkinghead-dataset"}))
    clips = scan_mead(tmp_path)
    assert [(c.actor, c.emotion, c.level) for c in clips] == [("M003", "happy", 2), ("M003", "neutral", 1)]
    assert clips[0].prepared == prepared and clips[1].prepared is None
    with pytest.raises(UserError, match="no MEAD clips"):
        scan_mead(tmp_path / "M003/video/left_30")


def test_clip_loss_loads_a_local_model_and_histogram_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from talkinghead.oneshot.clip_loss import histogram_loss, load_clip

    cfg = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 60, "max_position_embeddings": 160},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16}, projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "photo</w>", "of</w>"])}
    for ch in "abcdefghijklmnopqrstuvwxyz,-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    loss = load_clip(tmp_path)
    img = torch.rand(2, 3, 40, 40, requires_grad=True)
    val = loss(img, ["happy", "sad"])
    val.backward()
    assert 0 <= float(val) <= 2 and img.grad.abs().sum() > 0
    assert float(histogram_loss(img, img)) == pytest.approx(0, abs=1e-6)
    assert float(histogram_loss(img, 1 - img ** 4)) > 0.1
    with pytest.raises(UserError, match="not a local CLIP"):
        load_clip(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- synthesis


def test_modulated_conv_matches_plain_conv_and_synthesis_is_per_sample():
    from talkinghead.oneshot.synthesis import ModulatedConv, TriplaneSynthesis

    torch.manual_seed(0)
    conv = ModulatedConv(3, 5, 3, style_dim=4, demodulate=False)
    torch.nn.init.zeros_(conv.affine.weight)  # style = bias = 1: the plain convolution
    x = torch.randn(2, 3, 6, 6)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x, torch.randn(2, 4)), ref)
    G = TriplaneSynthesis(8, 4, plane_size=16, plane_channels=3, channels=8)
    w, z = torch.randn(3, 3, 8), torch.randn(3, 4)
    both = G(w, z)
    assert both.shape == (3, 3, 3, 16, 16)
    torch.testing.assert_close(both[1:2], G(w[1:2], z[1:2]), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------- stages, DDP, resume


def test_rank_items_split_the_global_batch():
    from talkinghead.oneshot.data import rank_items

    assert rank_items(4, 0, 2) + rank_items(4, 1, 2) == [0, 2, 1, 3]
    with pytest.raises(UserError, match="does not split"):
        rank_items(3, 0, 2)


def test_motion_batches_are_per_item_and_augmented_columnwise(datasets):
    from talkinghead.oneshot.data import motion_batch, open_sources
    from talkinghead.oneshot.expression import build_expression_space

    sources = open_sources(datasets, 32)
    space = build_expression_space([s.ds.face_model for s in sources], [s.ds.tracks.expression for s in sources], 2)
    for s in sources:
        s.attach(space)
    full = motion_batch(sources, [0, 1, 2], step=5, seed=0, length=10, feature_dropout=0.5, time_mask=0)
    part = motion_batch(sources, [1], step=5, seed=0, length=10, feature_dropout=0.5, time_mask=0)
    torch.testing.assert_close(full["audio"][1], part["audio"][0])  # an item does not depend on its batch
    a, clean = full["audio"].numpy(), full["target_audio"].numpy()
    dropped = (a == 0).all(1) & (clean != 0).any(1)  # [B, D] columns zeroed over the whole stretch
    assert dropped.any() and np.array_equal(a[~np.broadcast_to(dropped[:, None], a.shape)],
                                            clean[~np.broadcast_to(dropped[:, None], a.shape)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, world: int, port: int, datas, out, overrides, result):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from talkinghead.oneshot.train import train

    log = train(datas, out, overrides=overrides, progress=False)
    if rank == 0:
        result.put(log["history"])


def test_two_processes_match_one_and_a_stopped_run_resumes(datasets, tmp_path):
    import torch.multiprocessing as mp

    from talkinghead.oneshot.model import load_model
    from talkinghead.oneshot.train import train

    one = train(datasets, tmp_path / "one", overrides=TINY, progress=False)["history"]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run_rank, args=(r, 2, port, datasets, tmp_path / "two", TINY, q)) for r in range(2)]
    for p in procs:
        p.start()
    two = q.get(timeout=240)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for key in ("motion_loss", "generator_loss"):
        np.testing.assert_allclose(two[key]["values"], one[key]["values"], rtol=2e-4, atol=1e-6)
    # killed after step 4 (a checkpoint at 4), resumed: the same curve as the uninterrupted run
    assert train(datasets, tmp_path / "cut", overrides=TINY, progress=False, stop_after=4) == {"stopped_at": 4}
    with pytest.raises(UserError, match="already holds a model"):
        train(datasets, tmp_path / "cut", overrides=TINY, progress=False)
    resumed = train(datasets, tmp_path / "cut", overrides=TINY, progress=False, resume=True)
    assert resumed["resumed_from"] == 4
    for key in ("motion_loss", "generator_loss"):
        np.testing.assert_allclose(resumed["history"][key]["values"], one[key]["values"], rtol=2e-4, atol=1e-6)
    model, meta = load_model(tmp_path / "one")
    assert meta["format"] == "talkinghead-oneshot/1" and not bool(model.mapper_trained)


def test_mapper_stage_trains_only_m_e_from_mead_clips(datasets, tmp_path):
    import shutil

    from talkinghead.oneshot.model import load_model
    from talkinghead.oneshot.train import train

    root = tmp_path / "mead"
    for (emotion, src) in (("neutral", datasets[0]), ("happy", datasets[1])):
        level = root / "M003" / "video" / "front" / emotion / "level_1"
        level.mkdir(parents=True)
        (level / "001.mp4").write_bytes(b"")
        shutil.copytree(src, level / "001")
    base = train(datasets, tmp_path / "plain", overrides=TINY, progress=False)
    log = train(datasets, tmp_path / "mapped", overrides={**TINY, "mapper_steps": 2}, mead=root, progress=False)
    assert log["steps"] == base["steps"] + 2 and log["mapper"] == "trained on MEAD clips"
    plain, _ = load_model(tmp_path / "plain")
    mapped, _ = load_model(tmp_path / "mapped")
    assert bool(mapped.mapper_trained) and not bool(plain.mapper_trained)
    for name, p in mapped.state_dict().items():  # the mapper stage changed M_e and nothing else
        if not name.startswith("emotion_mapper.") and name != "mapper_trained":
            torch.testing.assert_close(p, plain.state_dict()[name], msg=name)
    changed = [n for n, p in mapped.state_dict().items() if n.startswith("emotion_mapper.")
               and not torch.equal(p, plain.state_dict()[n])]
    assert changed


# --------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "talkinghead.cli", *args], capture_output=True, text=True, env=env)


def _one_error_line(p: subprocess.CompletedProcess, pattern: str) -> None:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], p.stderr


@pytest.fixture(scope="module")
def tiny_model(datasets, tmp_path_factory) -> Path:
    from talkinghead.oneshot.train import train

    out = tmp_path_factory.mktemp("tiny_model") / "m"
    train(datasets, out, overrides=TINY, progress=False)
    return out


def test_render_bad_inputs_one_line_exit_2(tiny_model, datasets, tmp_path):
    from PIL import Image

    wav = datasets[0] / "audio.wav"
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(blank)
    base = ["oneshot", "render", str(tiny_model), "--audio", str(wav), "--out", str(tmp_path / "o.mp4")]
    _one_error_line(_cli(*base, "--image", str(blank)), "no face found")
    _one_error_line(_cli(*base, "--image", str(blank), "--emotion", "joyful"), "unknown emotion 'joyful'")
    _one_error_line(_cli(*base, "--image", str(blank), "--yaw", "120"), "--yaw 120")
    other = tmp_path / "avatar"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "talkinghead-avatar/1", "method": "gaussiantalker"}))
    _one_error_line(_cli("oneshot", "render", str(other), "--image", str(blank), "--audio", str(wav), "--out",
                         str(tmp_path / "o.mp4")), "is a 'gaussiantalker' model, not a one-shot model")
    _one_error_line(_cli("oneshot", "train", str(tmp_path), "--out", str(tmp_path / "x")), "not a prepared dataset")
    assert not (tmp_path / "o.mp4").exists()


def test_render_two_faces_is_refused_and_one_face_renders(tiny_model, datasets, tmp_path, clip):
    from PIL import Image

    from talkinghead import media

    frame = next(iter(media.iter_frames(clip("may_en_5s.mp4"), 25)))
    face = np.asarray(Image.fromarray(frame).resize((192, 192), Image.BILINEAR))
    two = tmp_path / "two.png"
    Image.fromarray(np.concatenate([face, face], 1)).save(two)
    wav = datasets[0] / "audio.wav"
    p = _cli("oneshot", "render", str(tiny_model), "--image", str(two), "--audio", str(wav), "--out",
             str(tmp_path / "o.mp4"))
    _one_error_line(p, "2 faces found")
    one = tmp_path / "one.png"
    Image.fromarray(face).save(one)
    from talkinghead.oneshot.render import render

    info = render(tiny_model, one, wav, tmp_path / "o.mp4", emotion="happy", yaw=20, code_steps=2, tune_steps=1,
                  progress=False)
    assert info["frames"] == 30 and (tmp_path / "o.mp4").stat().st_size > 0
    assert info["loss_inverted"] <= info["loss_encoder"] + 1e-6


def test_clip_source_recognises_phones_of_a_whisper_dataset(tmp_path):
    """A Whisper dataset carries no phones; the CTC targets then come from pocketsphinx on its audio.wav."""
    from talkinghead.audio.features import AudioFeatures, phone_features
    from talkinghead.oneshot.data import ClipSource

    import soundfile

    from conftest import shared_clip
    from talkinghead.media import read_audio

    path = _synthetic(tmp_path / "w", 0)
    f = AudioFeatures.load(path / "audio_features.npz")
    voiced = read_audio(shared_clip("may_en_5s.mp4"))[16000: 16000 + int(30 / 25 * 16000)]  # 1.2 s of speech
    soundfile.write(str(path / "audio.wav"), voiced, 16000)
    AudioFeatures(fps=f.fps, mel=f.mel, energy=f.energy, whisper=np.zeros((30, 2, 4), np.float16),
                  whisper_layers=(1,), encoder={"name": "test"}).save(path / "audio_features.npz")
    src = ClipSource(path, 32)
    expected = phone_features(voiced, 25.0, 30)[0]
    assert (expected != 0).sum() > 10  # speech: mostly phones, not silence
    assert src.phone_ids.shape == (30,) and src.phone_ids.dtype == np.int64
    np.testing.assert_array_equal(src.phone_ids, expected)
