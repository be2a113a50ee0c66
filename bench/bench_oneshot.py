"""One-shot 3-D talking face (paper 003): leave-one-identity-out against the static portrait, novel views,
cross-driving, emotions, and distributed / resumed training. Writes the ``## One-shot`` section of RESULTS.md.

    python bench/bench_oneshot.py --model MODEL --left-out DATA [--train DATA...]   # evaluation (trains MODEL
                                                                                    # on --train when absent)
    python bench/bench_oneshot.py --ddp DATA DATA                                  # 1 vs 2 processes, resume

Evaluation (all at the model's size, 128^2 for cpu-small): the left-out person's clip is never seen in
training; frame 0 of its prepared dataset is the portrait, the whole clip's own audio drives it, and every
frame is compared with the real one. Static baseline = the portrait repeated. PSNR / SSIM on the face over frames 1..
(parsing labels face + mouth of the real frame), mouth-opening r (mediapipe on the renders vs the real clip's
tracked mouth), landmark sync (eval.sync) against the audio, the fraction of frames where mediapipe finds a face
at yaw -30 / +30 degrees. Cross-driven: the first ``--cross-seconds`` of speech_en_60s.wav. Emotions: each label
on the first ``--emotion-frames`` frames, the change of mouth-corner lift, brow raise and eye opening (landmarks
on the renders, in interocular units) against neutral.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SECTION = "## One-shot 3-D talking face (paper 003)"
SHARED = benchlib.ROOT.parent / "shared" / "data"


def _track(frames: np.ndarray) -> np.ndarray:
    from talkinghead.face.landmarks import track

    return track(iter(frames), total=len(frames))


def _found(track: np.ndarray) -> float:
    return float(np.isfinite(track[:, 0, 0]).mean())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    from talkinghead.eval.landmark_metrics import pearson

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) < 1e-9:
        return 0.0
    return float(pearson(a[ok], b[ok]))


def _sync(wave: np.ndarray, track: np.ndarray, fps: float) -> float | None:
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.eval.sync import articulation_signal, landmark_sync
    from talkinghead.face.landmarks import mouth_opening

    try:
        art = articulation_signal(compute_audio_features(wave, fps, len(track)))
        return round(landmark_sync(art, mouth_opening(track), fps).confidence, 3)
    except ValueError:
        return None


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _face_metrics(pred: np.ndarray, gt: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Mean face PSNR / SSIM over frames 1.. (frame 0 is the portrait itself: the static baseline's is exact)."""
    from talkinghead.eval.image_metrics import psnr, ssim

    p = [psnr(_u8(pred[i]), _u8(gt[i]), masks[i]) for i in range(1, len(gt))]
    s = [ssim(_u8(pred[i]), _u8(gt[i]), masks[i]) for i in range(1, len(gt))]
    return float(np.mean(p)), float(np.mean(s))


def _sheet(path: Path, rows: list[tuple[str, np.ndarray]], picks: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(picks), figsize=(1.6 * len(picks), 1.7 * len(rows)))
    for r, (name, frames) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r, c]
            ax.imshow(frames[min(i, len(frames) - 1)])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def motion_only(model_dir: Path, left_out: Path) -> dict:
    """G_m of a model alone on the left-out clip: mouth-opening r of its meshes, coefficient MSE."""
    from talkinghead.data import PreparedDataset
    from talkinghead.face.landmarks import mouth_opening
    from talkinghead.oneshot.model import load_model
    from talkinghead.oneshot.render import driving_motion

    model, meta = load_model(model_dir)
    ds = PreparedDataset(left_out)
    coefs = driving_motion(model, ds.audio_wave, ds.fps)[: ds.num_frames]
    own = model.space.clip_coefficients(ds.face_model, ds.tracks.expression)
    m = meta["config"]["motion"]
    return {"model": str(model_dir), "layers": m["layers"], "feature_dropout": m.get("feature_dropout", 0.0),
            "time_mask": m.get("time_mask", 0), "weight_decay": m.get("weight_decay", 0.0),
            "mesh_mouth_r": round(_pearson(mouth_opening(model.space.mesh(coefs)), ds.tracks.mouth_opening), 3),
            "coefficient_mse": round(float(np.mean((coefs - own) ** 2)), 4)}


def evaluate(model_dir: Path, left_out: Path, out: Path, cross_seconds: float, emotion_frames: int,
             view_frames: int, code_steps: int | None = None, tune_steps: int | None = None,
             frames: int | None = None) -> dict:
    import torch

    from talkinghead.data import PreparedDataset
    from talkinghead.face.landmarks import mouth_opening
    from talkinghead.media import read_audio
    from talkinghead.oneshot.emotion import EMOTIONS, expression_measures
    from talkinghead.oneshot.model import load_model
    from talkinghead.oneshot.render import driving_motion, load_identity, render_frames

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_dir)
    size = model.cfg.generator.image_size
    ds = PreparedDataset(left_out, size=size)
    fps, T = ds.fps, min(ds.num_frames, frames or ds.num_frames)
    portrait = out / "portrait.png"
    from PIL import Image

    Image.fromarray(np.asarray(PreparedDataset(left_out).image(0) * 255 + 0.5, np.uint8)).save(portrait)
    res: dict = {"model": str(model_dir), "left_out": left_out.name, "frames": T, "size": size}
    t = time.perf_counter()
    ident = load_identity(model, portrait, code_steps, tune_steps, crop=False)
    res["inversion_s"] = round(time.perf_counter() - t, 1)
    res["inversion_loss"] = {k: round(v, 4) for k, v in ident.figures.items() if k.startswith("loss")}
    wave = ds.audio_wave
    coefs = driving_motion(model, wave, fps)[:T]
    # G_m alone: the mouth opening of its meshes (mean face + predicted expression) against the real clip's,
    # and that of the clip's own tracked coefficients projected into the shared space (the space's ceiling)
    space = model.space
    own = space.clip_coefficients(ds.face_model, ds.tracks.expression[:T])
    res["motion_generator"] = {
        "mesh_mouth_r": round(_pearson(mouth_opening(space.mesh(coefs)), ds.tracks.mouth_opening[:T]), 3),
        "tracked_coefficients_mouth_r": round(_pearson(mouth_opening(space.mesh(own)), ds.tracks.mouth_opening[:T]), 3),
        "coefficient_mse": round(float(np.mean((coefs - own) ** 2)), 4)}
    gt = np.stack([ds.image(i) for i in range(T)])
    masks = np.stack([ds.parsing(i) >= 3 for i in range(T)])
    t = time.perf_counter()
    ours = np.stack(list(render_frames(model, ident, coefs))).astype(np.float32) / 255
    res["render_fps"] = round(T / (time.perf_counter() - t), 2)
    res["render_cpu_note"] = "frames/s of wall time on the shared, loaded cores"
    static = np.repeat(((ident.portrait.image * 255 + 0.5).astype(np.uint8).astype(np.float32) / 255)[None], T, 0)
    gt_mouth = ds.tracks.mouth_opening[:T]

    rows = {}
    for name, frames in (("static portrait", static), ("one-shot (ours)", ours)):
        tr = _track((frames * 255 + 0.5).astype(np.uint8))
        p, s = _face_metrics(frames, gt, masks)
        rows[name] = {"face_psnr": round(p, 2), "face_ssim": round(s, 4),
                      "mouth_r": round(_pearson(mouth_opening(tr), gt_mouth), 3),
                      "mouth_std": round(float(np.nanstd(mouth_opening(tr))), 4),
                      "sync": _sync(wave[: int(T / fps * 16000)], tr, fps), "face_found": round(_found(tr), 3)}
    gt_track = ds.tracks.landmarks[:T]
    rows["real clip"] = {"sync": _sync(wave[: int(T / fps * 16000)], gt_track, fps),
                         "mouth_std": round(float(np.std(gt_mouth)), 4)}
    res["self_driven"] = rows
    n = min(view_frames, T)
    views = {}
    view_frames_out = {}
    for yaw in (-30.0, 30.0):
        fr = np.stack(list(render_frames(model, ident, coefs[:n], yaw=yaw)))
        tr = _track(fr)
        views[f"yaw {yaw:+.0f}"] = {"face_found": round(_found(tr), 3),
                                    "mouth_r": round(_pearson(mouth_opening(tr), gt_mouth[:n]), 3)}
        view_frames_out[yaw] = fr.astype(np.float32) / 255
    res["novel_views"] = views
    # cross-driven
    speech = read_audio(SHARED / "speech_en_60s.wav")[: int(cross_seconds * 16000)]
    cc = driving_motion(model, speech, fps)
    cross = np.stack(list(render_frames(model, ident, cc)))
    tr = _track(cross)
    res["cross_driven"] = {"seconds": cross_seconds, "frames": len(cross), "sync": _sync(speech, tr, fps),
                           "face_found": round(_found(tr), 3),
                           "static_sync": _sync(speech, np.repeat(_track(cross[:1]), len(cross), 0), fps)}
    # emotions
    m = min(emotion_frames, T)
    emo, emo_frames = {}, {}
    base = None
    for label in EMOTIONS:
        fr = np.stack(list(render_frames(model, ident, coefs[:m], emotion=label)))
        tr = _track(fr)
        meas = {k: float(np.nanmean(v)) for k, v in expression_measures(tr).items()}
        if label == "neutral":
            base = meas
        emo[label] = {k: round(meas[k] - base[k], 4) for k in meas}
        emo[label]["face_found"] = round(_found(tr), 3)
        emo_frames[label] = fr[m // 2].astype(np.float32) / 255
    res["emotions_vs_neutral"] = emo
    # the same measures on the meshes the offsets make (mean face, frontal x/y), independent of the renderer
    offsets = model.emotion_offsets()
    base_mesh = {k: float(np.mean(v)) for k, v in expression_measures(space.mesh(coefs[:m])).items()}
    res["emotion_offsets_on_meshes_vs_neutral"] = {
        label: {k: round(float(np.mean(v)) - base_mesh[k], 4)
                for k, v in expression_measures(space.mesh(coefs[:m] + offsets[label])).items()}
        for label in EMOTIONS}
    res["emotion_control"] = "FACS offset + M_e" if bool(model.mapper_trained) else "FACS offset only (no M_e)"
    picks = list(np.linspace(0, T - 1, 6).round().astype(int))
    _sheet(out / "sheet.png", [("real", gt), ("static", static), ("ours", ours),
                               ("ours yaw -30", view_frames_out[-30.0]), ("ours yaw +30", view_frames_out[30.0]),
                               ("cross-driven", cross.astype(np.float32) / 255)],
           [p for p in picks if p < n] + [p for p in picks if p >= n][: max(0, 6 - len([p for p in picks if p < n]))])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EMOTIONS), figsize=(1.6 * len(EMOTIONS), 2.0))
    for ax, label in zip(axes, EMOTIONS):
        ax.imshow(emo_frames[label])
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "emotions.png", dpi=110)
    plt.close(fig)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def _train_cmd(datas: list[Path], out: Path, extra: list[str], nproc: int = 1) -> list[str]:
    if nproc > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "talkinghead.cli"]
    else:
        runner = benchlib.CLI
    return [*runner, "oneshot", "train", *map(str, datas), "--out", str(out), *extra]


def _cpu_run(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the children) of a command."""
    before = os.times()
    wall = benchlib.run_timed(cmd)
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def ddp_and_resume(datas: list[Path], out: Path, steps: tuple[int, int]) -> dict:
    """1 process vs torchrun --nproc_per_node 2 with the same global batch; a killed run resumed."""
    import shutil

    extra = ["--motion-steps", str(steps[0]), "--generator-steps", str(steps[1]), "--batch", "2",
             "--checkpoint-every", "5"]
    res = {}
    runs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        folder = out / f"ddp_{name}"
        shutil.rmtree(folder, ignore_errors=True)
        wall, cpu = _cpu_run(_train_cmd(datas, folder, extra, nproc))
        runs[name] = json.loads((folder / "train_log.json").read_text())["history"]
        res[f"{name}_process_wall_s"], res[f"{name}_process_cpu_s"] = round(wall, 1), round(cpu, 1)
    curves = {}
    for key in ("motion_loss", "generator_loss"):
        a, b = np.asarray(runs["one"][key]["values"]), np.asarray(runs["two"][key]["values"])
        curves[key] = {"one": [round(v, 5) for v in a[:: max(1, len(a) // 8)]],
                       "two": [round(v, 5) for v in b[:: max(1, len(b) // 8)]],
                       "max_rel_diff": float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-8)))}
    res["curves"] = curves
    # killed run: SIGKILL once the checkpoint of step 10 is written, then --resume
    folder = out / "killed"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = _train_cmd(datas, folder, extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from safetensors import safe_open

    killed_at = None
    while proc.poll() is None:
        ck = folder / "checkpoint.safetensors"
        if ck.exists():
            try:
                with safe_open(str(ck), "pt") as f:
                    step = json.loads(f.metadata()["loop"])["step"]
                if step >= 10:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed_at = step
                    break
            except Exception:
                pass
        time.sleep(0.2)
    benchlib.run_timed(cmd + ["--resume"])
    log = json.loads((folder / "train_log.json").read_text())
    res["killed_at_checkpoint_step"] = killed_at
    res["resumed_from"] = log["resumed_from"]
    diffs = []
    for key in ("motion_loss", "generator_loss"):
        a, b = np.asarray(runs["one"][key]["values"]), np.asarray(log["history"][key]["values"])
        diffs.append(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-8))))
    res["resumed_vs_uninterrupted_max_rel_diff"] = max(diffs)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--left-out", type=Path)
    ap.add_argument("--train", type=Path, nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_oneshot"))
    ap.add_argument("--cross-seconds", type=float, default=12.0)
    ap.add_argument("--emotion-frames", type=int, default=40)
    ap.add_argument("--view-frames", type=int, default=100)
    ap.add_argument("--inversion-steps", type=int, help="default: the model's")
    ap.add_argument("--tune-steps", type=int, help="default: the model's")
    ap.add_argument("--frames", type=int, help="only the first frames of the left-out clip (quick checks)")
    ap.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    ap.add_argument("--also-motion", type=Path, nargs="*", default=[],
                    help="further models whose G_m alone is measured on the left-out clip")
    ap.add_argument("--ddp", type=Path, nargs="*")
    ap.add_argument("--ddp-steps", type=int, nargs=2, default=(20, 10))
    args = ap.parse_args()
    if args.ddp:
        res = ddp_and_resume(args.ddp, args.out, tuple(args.ddp_steps))
        print(json.dumps(res, indent=1))
        entry = (f"### torchrun --nproc_per_node 2 vs 1 process, and a killed run resumed\n{benchlib.stamp()}\n\n"
                 f"Datasets {', '.join(p.name for p in args.ddp)}; {args.ddp_steps[0]} G_m steps (global batch 8) + "
                 f"{args.ddp_steps[1]} generator steps (global batch 2: 1 item per rank with 2 processes), gloo.\n\n"
                 f"```\n{json.dumps(res, indent=1)}\n```\n")
        benchlib.append_entry(SECTION, entry)
        return 0
    if args.model is None or args.left_out is None:
        ap.error("give --model and --left-out (or --ddp DATA...)")
    if not (args.model / "model.safetensors").exists() and args.train:
        wall, cpu = _cpu_run(_train_cmd(args.train, args.model, []))
        print(f"trained in {wall:.0f} s wall, {cpu:.0f} CPU s")
    res = evaluate(args.model, args.left_out, args.out, args.cross_seconds, args.emotion_frames, args.view_frames,
                   args.inversion_steps, args.tune_steps, args.frames)
    res["motion_generator_variants"] = [motion_only(m, args.left_out) for m in [args.model, *args.also_motion]]
    log = json.loads((args.model / "train_log.json").read_text()) if (args.model / "train_log.json").exists() else {}
    res["train"] = {k: log.get(k) for k in ("preset", "steps", "train_time_s", "stage_time_s", "mapper", "perceptual")}
    print(json.dumps(res, indent=1))
    if args.no_record:
        return 0
    entry = (f"### Leave-one-identity-out: {args.left_out.name} animated from its frame 0\n{benchlib.stamp()}\n\n"
             f"```\n{json.dumps(res, indent=1)}\n```\n")
    benchlib.append_entry(SECTION, entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
