"""Evaluation metrics on a real clip with known answers: identity, simulated wobble, audio delay, still frame.

The clip is tracked once per module; perturbations are built in memory (or written as short mp4s for the
command-line tests) so the whole file stays around a minute on two cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_clip

from talkinghead import media
from talkinghead.eval.perturb import wobble

FPS = 25.0


@pytest.fixture(scope="module")
def may():
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.face.landmarks import track

    path = shared_clip("may_en_5s.mp4")
    frames = media.read_frames(path, FPS)
    audio = media.read_audio(path)
    return {"path": path, "frames": frames, "track": track(frames), "audio": audio,
            "features": compute_audio_features(audio, FPS, len(frames))}


def test_identity_gives_perfect_scores(may):
    from talkinghead.eval import image_metrics as im
    from talkinghead.eval.landmark_metrics import landmark_metrics
    from talkinghead.eval.stability import stability_score

    f, tr = may["frames"], may["track"]
    mask = im.face_mask_from_landmarks(tr[0], *f.shape[1:3])
    assert 0.05 < mask.mean() < 0.6  # a face, not the whole frame or nothing
    assert im.psnr(f[0], f[0]) == float("inf") and im.psnr(f[0], f[0], mask) == float("inf")
    assert im.ssim(f[0], f[0]) == pytest.approx(1.0) and im.ssim(f[0], f[0], mask) == pytest.approx(1.0)
    lm = landmark_metrics(tr, tr, f.shape[2])
    assert lm["lmd_mouth"] == 0 and lm["lmd_all"] == 0 and lm["blink_error"] == 0
    assert lm["mouth_open_corr"] == pytest.approx(1.0)
    s = stability_score(tr, tr, FPS)
    assert s.motion_difference == 0 and s.score == pytest.approx(s.reference_score)


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    import torch

    from talkinghead.eval.image_metrics import ssim

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].double()  # noqa: E731
    ref = float(tm.structural_similarity_index_measure(t(a), t(b), data_range=255.0))
    assert ssim(a, b) == pytest.approx(ref, abs=2e-3)


def test_seam_bands_and_their_errors_have_known_answers():
    from talkinghead.eval import image_metrics as im

    labels = np.zeros((64, 64), np.uint8)  # r = 64 / 64 = 1 pixel
    labels[:, :20] = 2  # hair on the left
    labels[10:40, 20:50] = 3  # face
    labels[30:35, 30:40] = 4  # inner mouth (inside the face: no boundary with hair or torso)
    labels[40:, 20:50] = 1  # neck below the chin
    bands = im.seam_bands(labels)
    cols = np.nonzero(bands["hairline"].any(0))[0]
    assert cols.tolist() == [19, 20]  # one pixel each side of the hair | face edge
    assert bands["hairline"].sum() == 2 * 32  # face rows 10..39 grown by one row at each end
    assert np.nonzero(bands["neck"].any(1))[0].tolist() == [39, 40] and bands["neck"].sum() == 2 * 32
    gt = np.zeros((64, 64, 3), np.uint8)
    pred = gt.copy()
    pred[:, 19] = 30  # error only on the hair side of the boundary
    assert im.mean_abs_error(pred, gt, bands["hairline"]) == pytest.approx(15.0)
    assert im.mean_abs_error(pred, gt, bands["neck"]) == pytest.approx(30 / 32)  # (39|40, 19) are in the neck band
    assert np.isnan(im.mean_abs_error(pred, gt, np.zeros((64, 64), bool)))


def test_wobble_ranks_monotonically(may):
    from talkinghead.eval import image_metrics as im
    from talkinghead.eval.stability import stability_score
    from talkinghead.face.landmarks import track

    f, tr = may["frames"][:75], may["track"][:75]
    ref = stability_score(tr, tr, FPS).score
    scores, psnrs, ssims = [], [], []
    for shift, rot in ((0.5, 0.2), (1.5, 0.5), (3.0, 1.0)):
        w = wobble(f, shift, rot)
        scores.append(stability_score(track(w), tr, FPS).score)
        psnrs.append(np.mean([im.psnr(w[i], f[i]) for i in range(0, 75, 15)]))
        ssims.append(np.mean([im.ssim(w[i], f[i]) for i in range(0, 75, 25)]))
    assert ref < scores[0] < scores[1] < scores[2], (ref, scores)
    assert psnrs[0] > psnrs[1] > psnrs[2] and ssims[0] > ssims[1] > ssims[2] and ssims[0] < 1


@pytest.mark.parametrize("k", [3, 6])
def test_landmark_sync_finds_audio_delay(may, k):
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.eval.sync import articulation_signal, landmark_sync
    from talkinghead.face.landmarks import mouth_opening

    mouth = mouth_opening(may["track"])
    base = landmark_sync(articulation_signal(may["features"]), mouth, FPS)
    assert abs(base.offset) <= 2  # the original clip is in sync
    delayed = np.concatenate([np.zeros(int(k * 16000 / FPS), np.float32), may["audio"]])
    res = landmark_sync(articulation_signal(compute_audio_features(delayed, FPS, len(mouth))), mouth, FPS)
    assert abs((res.offset - base.offset) - k) <= 1, (base.offset, res.offset)


def test_still_frame_has_no_sync(may):
    from talkinghead.eval.landmark_metrics import pearson
    from talkinghead.eval.sync import articulation_signal, landmark_sync
    from talkinghead.face.landmarks import mouth_opening, track

    still = np.repeat(may["frames"][:1], len(may["frames"]), axis=0)
    mouth_still = mouth_opening(track(still))
    mouth = mouth_opening(may["track"])
    assert abs(pearson(mouth_still, mouth)) < 0.2
    art = articulation_signal(may["features"])
    real = landmark_sync(art, mouth, FPS).confidence
    fake = landmark_sync(art, mouth_still, FPS).confidence
    assert fake < 0.25 * real, (fake, real)


# --- the commands, end to end -------------------------------------------------------------------------------

def _run(argv, capsys):
    from talkinghead.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def clips(may, tmp_path_factory):
    """Short mp4s: 2 s of the clip (gt), the same wobbled (pred), a faceless one, a non-video."""
    d = tmp_path_factory.mktemp("clips")
    n = 50
    audio = may["audio"][: int(n / FPS * 16000)]
    media.write_video(d / "gt.mp4", may["frames"][:n], FPS, audio=audio)
    media.write_video(d / "wobble.mp4", wobble(may["frames"][:n - 4], 1.5, 0.5), FPS, audio=audio)
    media.write_video(d / "noface.mp4", np.full((n, 64, 64, 3), 120, np.uint8), FPS, audio=audio)
    (d / "text.mp4").write_text("not a video")
    import cv2

    small = [cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in may["frames"][:10]]
    media.write_video(d / "small.mp4", small, FPS)
    return d


def test_eval_self_vs_itself_cli(clips, tmp_path, capsys):
    import json

    out = tmp_path / "self"
    code, stdout, _ = _run(["eval", "--pred", str(clips / "gt.mp4"), "--gt", str(clips / "gt.mp4"),
                            "--out", str(out), "--no-video", "--quiet"], capsys)
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["psnr_face"] == "inf" and m["psnr_full"] == "inf" and m["ssim_face"] == pytest.approx(1.0)
    assert m["lmd_mouth"] == 0 and m["landmark_sync_offset_vs_gt"] == 0
    assert m["stability"] == pytest.approx(m["stability_reference"])
    assert m["lpips_face"] is None and m["syncnet_conf"] is None  # no weights here: null, not a number
    assert "∞" in (out / "report.md").read_text()


def test_eval_wobble_cli_report_and_compare(clips, tmp_path, capsys):
    import json

    out = tmp_path / "wobble"
    code, _, _ = _run(["eval", "--pred", str(clips / "wobble.mp4"), "--gt", str(clips / "gt.mp4"),
                       "--out", str(out), "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert 20 < m["psnr_full"] < 40 and m["ssim_face"] < 0.99
    assert m["stability"] > m["stability_reference"]
    assert report["inputs"]["evaluated_frames"] == 46
    assert any("unequal lengths" in n for n in report["notes"])
    assert report["null_reasons"]["fid"] and report["null_reasons"]["csim"]
    for png in ("mouth_opening.png", "nose.png", "psnr.png", "sync.png"):
        assert (out / png).stat().st_size > 1000
    side = media.probe(out / "side_by_side.mp4")
    assert (side.width, side.height) == (3 * 512, 512)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    same = tmp_path / "same"
    assert _run(["eval", "--pred", str(clips / "gt.mp4"), "--gt", str(clips / "gt.mp4"), "--out", str(same),
                 "--no-video", "--quiet"], capsys)[0] == 0
    table = tmp_path / "table.md"
    code, stdout, _ = _run(["compare", str(out), str(same), "--out", str(table)], capsys)
    assert code == 0
    text = table.read_text()
    assert "| wobble |" in text and "| same |" in text and "Stability ↓" in text and "PSNR face ↑" in text
    assert "**∞**" in text  # the perfect run is the best PSNR, in bold


def test_eval_cross_driven_cli(clips, tmp_path, capsys):
    import json

    out = tmp_path / "cross"
    code, _, _ = _run(["eval", "--pred", str(clips / "gt.mp4"), "--audio", str(shared_clip("may_en_5s.mp4")),
                       "--out", str(out), "--quiet"], capsys)
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "cross-driven" and m["metrics"]["psnr_face"] is None
    assert isinstance(m["metrics"]["landmark_sync_offset"], int)
    assert "reference video" in m["null_reasons"]["stability"]


def test_eval_pred_alone_uses_its_own_track_on_the_video_clock(tmp_path, capsys):
    """``eval --pred X`` (no --gt / --audio) measures X against its own sound track, placed on X's video clock:
    the clip with its audio track delayed 0.24 s by ffmpeg (-itsoffset, stream copy) reads 6 frames later."""
    import json
    import subprocess

    import imageio_ffmpeg

    clip = shared_clip("may_en_5s.mp4")
    late = tmp_path / "late.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(clip), "-itsoffset",
                    "0.24", "-i", str(clip), "-map", "0:v", "-map", "1:a", "-c", "copy", str(late)], check=True)
    offsets = []
    for pred in (clip, late):
        out = tmp_path / pred.stem
        assert _run(["eval", "--pred", str(pred), "--out", str(out), "--quiet"], capsys)[0] == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["mode"] == "cross-driven" and report["inputs"]["audio"] == f"sound track of {pred}"
        offsets.append(report["metrics"]["landmark_sync_offset"])
    assert abs(offsets[0]) <= 2 and abs(offsets[1] - offsets[0] - 6) <= 1, offsets


@pytest.mark.parametrize("argv, message", [
    (["--pred", "{d}/noface.mp4", "--gt", "{d}/gt.mp4"], "no face found in the prediction"),
    (["--pred", "{d}/text.mp4", "--gt", "{d}/gt.mp4"], "cannot read"),
    (["--pred", "{d}/missing.mp4", "--gt", "{d}/gt.mp4"], "file not found"),
    (["--pred", "{d}/small.mp4", "--gt", "{d}/gt.mp4"], "frame size differs"),
    ([], "nothing to evaluate"),
])
def test_eval_bad_input_is_one_error_line(clips, tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    argv = [a.format(d=clips) for a in argv]
    code, _, err = _run(["eval", *argv, "--out", str(out), "--quiet"], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_compare_rejects_non_report(tmp_path, capsys):
    code, _, err = _run(["compare", str(tmp_path), "--out", str(tmp_path / "t.md")], capsys)
    assert code == 2 and "not an evaluation report" in err


def test_eval_avatar_form(tmp_path, capsys):
    """prepare -> train (a few iterations) -> eval AVATAR: renders the test split, reads speed from the logs."""
    import importlib.util
    import json

    for mod in ("talkinghead.prepare.command", "talkinghead.methods.command"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not available")
    clip = shared_clip("may_en_5s.mp4")
    data, avatar, out = tmp_path / "data", tmp_path / "avatar", tmp_path / "report"
    assert _run(["prepare", str(clip), "--out", str(data), "--size", "128", "--quiet"], capsys)[0] == 0
    assert _run(["train", str(data), "--out", str(avatar), "--preset", "cpu-small", "--iterations", "3"],
                capsys)[0] == 0
    code, _, err = _run(["eval", str(avatar), "--data", str(data), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    m, inputs = report["metrics"], report["inputs"]
    assert m["render_fps"] > 0 and m["train_time_s"] > 0 and inputs["method"]
    assert inputs["evaluated_frames"] == inputs["ground_truth"]["frames"] > 0
    assert isinstance(m["psnr_face"], float) and 0 < m["ssim_full"] < 1
    assert m["hairline_error"] > 0 and m["neck_error"] > 0  # parsing of the dataset: seam bands measured
    assert (out / "prediction.mp4").is_file() and (out / "side_by_side.mp4").is_file()

    # The same prediction against the test split written as a video, face masks from the dataset's parsing.
    from talkinghead.data import PreparedDataset

    ds = PreparedDataset(data, size=inputs["size"][0])
    idx = ds.split_indices("test")
    gt = tmp_path / "gt_test.mp4"
    media.write_video(gt, (np.round(ds.image(int(i)) * 255).astype(np.uint8) for i in idx), ds.fps, crf=0)
    masked = tmp_path / "masked"
    code, _, err = _run(["eval", "--pred", str(out / "prediction.mp4"), "--gt", str(gt), "--mask-from", str(data),
                         "--out", str(masked), "--no-video", "--quiet"], capsys)
    assert code == 0, err
    m2 = json.loads((masked / "metrics.json").read_text())["metrics"]
    # Same frames (GT re-encoded losslessly up to chroma subsampling) and the same parsing masks as AVATAR mode.
    assert m2["psnr_full"] == pytest.approx(m["psnr_full"], abs=0.5)
    assert m2["psnr_face"] == pytest.approx(m["psnr_face"], abs=0.5)
    assert m2["hairline_error"] == pytest.approx(m["hairline_error"], abs=2.0)
    oval = tmp_path / "oval"
    assert _run(["eval", "--pred", str(out / "prediction.mp4"), "--gt", str(gt), "--out", str(oval),
                 "--no-video", "--quiet"], capsys)[0] == 0
    m3 = json.loads((oval / "metrics.json").read_text())["metrics"]
    assert m3["psnr_full"] == m2["psnr_full"] and m3["ssim_face"] != m2["ssim_face"]  # landmark masks differ
    assert m3["hairline_error"] is None and m3["neck_error"] is None  # no parsing, no seam bands


def test_lpips_and_syncnet_run_inside_evaluate_with_local_weights(may, tmp_path):
    """evaluate() on 12 downscaled frames against themselves with random LPIPS and SyncNet weights."""
    import cv2
    import torch

    from talkinghead.eval.evaluate import Clip, EvalOptions, evaluate
    from talkinghead.eval.syncnet import SyncNet
    from test_eval_models import _save_lpips_files

    _save_lpips_files(tmp_path)
    torch.manual_seed(0)
    torch.save(SyncNet().state_dict(), tmp_path / "syncnet_v2.model")
    frames = np.stack([cv2.resize(f, (192, 192), interpolation=cv2.INTER_AREA) for f in may["frames"][:12]])
    clip = Clip("may[:12]", FPS, lambda: iter(frames), lambda: None)
    opts = EvalOptions(lpips_weights=tmp_path, syncnet_weights=tmp_path / "syncnet_v2.model", progress=False)
    ev = evaluate(clip, clip, audio=may["audio"], opts=opts)
    assert ev.metrics["lpips_full"] == 0.0 and ev.metrics["lpips_face"] == 0.0
    assert isinstance(ev.metrics["syncnet_offset"], int) and ev.metrics["syncnet_conf"] >= 0.0
    assert ev.metrics["landmark_sync_offset"] is None and "frames" in ev.reasons["landmark_sync_offset"]


def test_lmd_known_shift_and_normalisation(may):
    from talkinghead.eval.landmark_metrics import landmark_metrics
    from talkinghead.face.landmarks import interocular

    tr = may["track"][:20]
    shifted = tr.copy()
    shifted[..., 0] += 3.0
    shifted[..., 1] += 4.0  # every landmark 5 px away
    m = landmark_metrics(shifted, tr, width=512)
    assert m["lmd_mouth"] == pytest.approx(5.0, rel=1e-4) and m["lmd_all"] == pytest.approx(5.0, rel=1e-4)
    assert m["lmd_all_iod"] == pytest.approx(np.mean(5.0 / interocular(tr)), rel=1e-4)
    assert landmark_metrics(shifted, tr, width=256)["lmd_mouth"] == pytest.approx(10.0, rel=1e-4)  # at 512 px
    assert m["mouth_open_corr"] == pytest.approx(1.0) and m["aue_proxy"] == pytest.approx(0.0, abs=1e-3)


def test_blink_error_is_calibrated_on_the_ground_truth(may):
    """A prediction whose eyes stay half shut: the ground truth's calibration sees it; a per-video one would not."""
    from talkinghead.eval.landmark_metrics import landmark_metrics
    from talkinghead.face.landmarks import LEFT_EYE, RIGHT_EYE, blink_values

    tr = may["track"]
    squint = tr.copy()
    for _, p2, p3, _, p5, p6 in (RIGHT_EYE, LEFT_EYE):
        for top, bottom in ((p2, p6), (p3, p5)):  # upper lid half way down to the lower one
            squint[:, top, :2] = 0.5 * (tr[:, top, :2] + tr[:, bottom, :2])
    own = np.abs(blink_values(squint) - blink_values(tr)).mean()
    m = landmark_metrics(squint, tr, width=512)
    assert m["blink_error"] > 0.3 > own
    assert landmark_metrics(tr, tr, width=512)["blink_error"] == 0
