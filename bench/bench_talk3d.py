"""Talk3D beside GaussianTalker on one prepared clip: training cost, one `talkinghead compare` table, novel views.

Not a test. Steps (the 2 cores are shared: wall times come with the children's CPU seconds and the load):

1. ``talkinghead train DATA --method talk3d --preset cpu-small`` (skipped with ``--avatar``), and the same for
   GaussianTalker unless ``--gt-avatar`` names a trained one;
2. ``talkinghead eval AVATAR --data DATA`` for both (test split, self-driven: face PSNR / SSIM, LMD, mouth-opening
   r, stability, render FPS at the avatars' 128^2 on CPU) and ``talkinghead compare`` of the two reports;
3. novel views, the paper's Table 1 setting: the test split rendered with the camera orbited about the head's
   pivot (``render --yaw/--pitch``) at (yaw, pitch) = (-30, -20), (-15, -10), (15, 10), (30, 20) and the
   tracked camera (0, 0); per view and method: the fraction of frames where mediapipe finds a face (on frames
   upscaled 4x to 512^2), the landmark-sync confidence of the rendered mouth against the split's audio
   (``talkinghead.eval.sync``, as eval's cross-driven column) and the Pearson r of the mouth opening with the
   ground truth's (tracked on the real frontal frames); a PNG sheet of one test frame at every view;
4. silence-driven: the tracked view again with the test split's audio replaced by silence (a zero wave through
   the dataset's own extractor, same poses and backdrops): its mouth r should fall to ~0 if the mouth follows
   the audio and not the other tokens;
5. Talk3D's audio path (sec. 3.3): how much the deltaplane varies between test frames (rms of its per-cell std
   over the frames / its rms), the bottleneck's mean cross-attention on each token, the lip code's held-out
   mouth-opening r (the audio token's prediction of the tracked inner-lip gap), and the rendered lips with the
   frame's audio vs with silence (L1 to the real lips, their difference, its r with the real opening).

    .venv/bin/python bench/bench_talk3d.py [--data /work/scratch/whisper/cnn] [--avatar DIR] [--gt-avatar DIR]
        [--work /tmp/bench_talk3d] [--frames N] [--no-write]

Appends an entry to bench/RESULTS.md under "## Talk3D".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from benchlib import CLI, append_entry, run_timed, stamp

VIEWS = ((0.0, 0.0), (-30.0, -20.0), (-15.0, -10.0), (15.0, 10.0), (30.0, 20.0))
SILENCE = "+0,+0 silence"  # the tracked view, driven by silence


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list) -> tuple[float, float]:
    """(wall s, CPU s of the child) of a CLI run."""
    c0 = children_cpu()
    wall = run_timed(cmd)
    return wall, children_cpu() - c0


def train(data: Path, method: str, out: Path) -> dict:
    """Train ``method`` into ``out`` unless it already holds weights (a finished avatar or a checkpoint)."""
    if not any((out / f).is_file() for f in ("model.safetensors", "checkpoint.safetensors")):
        wall, cpu = timed(["nice", "-n", "10", *CLI, "train", data, "--method", method, "--out", out,
                           "--preset", "cpu-small"])
    else:
        wall = cpu = None
    log_path = out / "train_log.json"
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        return {"wall_s": wall, "cpu_s": cpu, "train_time_s": log.get("train_time_s"), "iterations": log["iterations"]}
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:  # an unfinished run: its last checkpoint
        step = json.loads(f.metadata()["loop"])["step"]
    planned = json.loads((out / "config.json").read_text())["config"]["schedule"]["iterations"]
    return {"wall_s": None, "cpu_s": None, "train_time_s": None, "iterations": f"{step} of {planned} (checkpoint)"}


def track_frames(frames: list[np.ndarray], side: int = 512) -> np.ndarray:
    """mediapipe landmarks [T, 478, 3] of frames upscaled to side^2 (NaN rows where no face), as the GT bench."""
    import cv2

    from talkinghead.face.landmarks import track

    return track([cv2.resize(f, (side, side), interpolation=cv2.INTER_CUBIC) for f in frames])


def silent_windows(data: Path, info, radius: int, indices: np.ndarray):
    """Audio windows [T_split, 2R+1, D] of silence: a zero wave through the dataset's own extractor."""
    from talkinghead.data import PreparedDataset
    from talkinghead.methods.data import audio_windows
    from talkinghead.methods.render import driving_features

    n = PreparedDataset(data).num_frames
    silent = driving_features(np.zeros(int(n / info.fps * 16000) + 1, np.float32), info.fps, data)[:n]
    return audio_windows(silent, radius)[indices]


def novel_views(avatar: Path, data: Path, frames: int | None) -> tuple[dict, dict]:
    """Per view (and the tracked view driven by silence): face-found fraction, landmark sync, mouth r, mouth
    std; and one rendered frame per view (for the sheet)."""
    import dataclasses

    import torch

    from talkinghead.audio.features import compute_audio_features
    from talkinghead.eval import landmark_metrics
    from talkinghead.eval.sync import articulation_signal, landmark_sync
    from talkinghead.face.landmarks import mouth_opening
    from talkinghead.methods.data import FrameStore, open_dataset
    from talkinghead.methods.render import novel_view
    from talkinghead.methods.trainer import load_model

    torch.set_num_threads(1)
    _, cfg, info, model, _ = load_model(avatar, device=torch.device("cpu"))
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test",
                       with_targets=False, progress=False)
    ds = open_dataset(data)
    n = len(store) if frames is None else min(frames, len(store))
    gt_mouth = np.asarray(ds.tracks.mouth_opening)[store.indices[:n]]
    audio = ds.split_audio("test")
    art = articulation_signal(compute_audio_features(audio, ds.fps, len(store)))[:n]
    quiet = silent_windows(data, info, cfg.data.audio_radius, store.indices)
    out, sheet = {}, {}
    for yaw, pitch, silence in [(y, p, False) for y, p in VIEWS] + [(0.0, 0.0, True)]:
        make = novel_view(store.condition, data, yaw, pitch)
        imgs, secs = [], 0.0
        with torch.no_grad():
            for k in range(n):
                cond = make(k)
                if silence:
                    cond = dataclasses.replace(cond, audio=quiet[k])
                t = time.perf_counter()
                img = model.render(cond)
                secs += time.perf_counter() - t
                imgs.append((img.clamp(0, 1) * 255 + 0.5).byte().numpy())
        track = track_frames(imgs)
        found = np.isfinite(track[:, 0, 0])
        mouth = mouth_opening(track)
        ok = np.isfinite(mouth) & np.isfinite(gt_mouth)
        try:
            sync = landmark_sync(art, mouth, ds.fps).confidence
        except ValueError as exc:
            sync = f"n/a ({exc})"
        r = landmark_metrics.pearson(mouth[ok], gt_mouth[ok]) if ok.sum() > 8 else float("nan")
        key = SILENCE if silence else f"{yaw:+.0f},{pitch:+.0f}"
        out[key] = {"face_found": float(found.mean()), "sync": sync, "mouth_r": r, "fps": n / max(secs, 1e-9),
                    "mouth_std": float(np.nanstd(mouth)) if found.any() else float("nan")}
        if not silence:
            sheet[(yaw, pitch)] = imgs[min(20, n - 1)]
        print(avatar.name, key, out[key], flush=True)
    return out, sheet


def audio_path(avatar: Path, data: Path) -> dict:
    """Talk3D's audio path on the test split: deltaplane variation between frames, attention, lip code r; and in
    the image, per test frame, the lips' box (grown by 2 px) rendered with the frame's audio and with silence:
    their L1 to the real frame, how much they differ, and the Pearson r of that difference with the real
    mouth opening (the audio should open the mouth where the real one is open)."""
    import dataclasses

    import torch

    from talkinghead.eval import landmark_metrics
    from talkinghead.face.landmarks import LOWER_LIP_INNER, MOUTH_VERTICES, UPPER_LIP_INNER
    from talkinghead.methods.data import FrameStore, open_dataset
    from talkinghead.methods.trainer import load_model

    torch.set_num_threads(1)
    _, cfg, info, model, _ = load_model(avatar, device=torch.device("cpu"))
    model.eval()
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test", progress=False)
    gt_mouth = np.asarray(open_dataset(data).tracks.mouth_opening)[store.indices]
    quiet = silent_windows(data, info, cfg.data.audio_radius, store.indices)
    deltas, attn, l1_own, l1_quiet, change = [], [], [], [], []
    with torch.no_grad():
        for k in range(len(store)):
            b = store.batch(k)
            planes, a = model.planes(b.cond, audio=True)
            deltas.append(planes - model.p_id)
            attn.append(a[model.audio_cells].mean(0))  # over the cells that may attend to a_n
            x0, y0, x1, y1 = (int(v) for v in b.mouth_box.tolist())
            box = (slice(max(0, y0 - 2), y1 + 3), slice(max(0, x0 - 2), x1 + 3))
            own = model.render(b.cond)[box]
            silent = model.render(dataclasses.replace(b.cond, audio=quiet[k]))[box]
            l1_own.append(float((own - b.image[box]).abs().mean()))
            l1_quiet.append(float((silent - b.image[box]).abs().mean()))
            change.append(float((own - silent).abs().mean()))
        d = torch.stack(deltas)  # [T, 3, C, R, R]
        code = model.lip_code(torch.stack([store.condition(k).audio for k in range(len(store))]))
    u, lo = MOUTH_VERTICES.index(UPPER_LIP_INNER), MOUTH_VERTICES.index(LOWER_LIP_INNER)
    gap = (code[:, lo, 1] - code[:, u, 1]).numpy()  # predicted change of the inner-lip gap (head y)
    rms = d.square().mean().sqrt()
    return {"delta_rms": float(rms), "audio_cells": int(model.audio_cells.sum()), "delta_frame_std_rel": float(d.std(0).square().mean().sqrt() / rms.clamp(min=1e-12)),
            "attention": dict(zip(("audio", "eye", "rot", "ldm", "null"), torch.stack(attn).mean(0).tolist())),
            "lip_code_r": float(landmark_metrics.pearson(gap, gt_mouth)),
            "mouth_l1_audio": float(np.mean(l1_own)), "mouth_l1_silence": float(np.mean(l1_quiet)),
            "mouth_change_vs_silence": float(np.mean(change)),
            "mouth_change_r": float(landmark_metrics.pearson(np.asarray(change), gt_mouth))}


def write_sheet(path: Path, sheets: dict[str, dict], gt: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(sheets)
    fig, axes = plt.subplots(len(rows) + 1, len(VIEWS), figsize=(2.2 * len(VIEWS), 2.3 * (len(rows) + 1)))
    for j, v in enumerate(VIEWS):
        axes[0, j].imshow(gt if j == 0 else np.full_like(gt, 255))
        axes[0, j].set_title("ground truth" if j == 0 else f"yaw {v[0]:+.0f}, pitch {v[1]:+.0f}", fontsize=8)
        for i, name in enumerate(rows):
            axes[i + 1, j].imshow(sheets[name][v])
            if j == 0:
                axes[i + 1, j].set_ylabel(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/scratch/whisper/cnn"))
    ap.add_argument("--avatar", type=Path, default=None, help="a trained talk3d avatar (else trained here)")
    ap.add_argument("--gt-avatar", type=Path, default=None, help="a trained gaussiantalker avatar (else trained)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_talk3d"))
    ap.add_argument("--frames", type=int, default=None, help="test frames per novel view (default: all)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    # `eval` leaves torch at its default threads; on shared cores two OpenMP threads were measured ~7x slower
    # than one for Talk3D's render (the CLI's train/render default to one).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    head = stamp()
    avatars = {"talk3d": args.avatar or args.work / "talk3d", "gaussiantalker": args.gt_avatar or args.work / "gt"}
    costs = {m: train(args.data, m, a) for m, a in avatars.items()}
    reports = {}
    for m, a in avatars.items():
        rep = args.work / f"eval_{m}"
        if not (rep / "metrics.json").is_file():
            run_timed(["nice", "-n", "10", *CLI, "eval", a, "--data", args.data, "--out", rep, "--no-video", "--quiet"])
        reports[m] = rep
    table = args.work / "compare.md"
    run_timed([*CLI, "compare", *reports.values(), "--out", table])
    views, sheets = {}, {}
    for m, a in avatars.items():
        views[m], sheets[m] = novel_views(a, args.data, args.frames)
    path_t3 = audio_path(avatars["talk3d"], args.data)
    print("talk3d audio path:", path_t3, flush=True)
    from talkinghead.methods.data import open_dataset

    ds = open_dataset(args.data, size=128)
    gt = (np.asarray(ds.image(int(ds.split_indices("test")[20]))) * 255).astype(np.uint8)
    sheet = args.work / "novel_views.png"
    write_sheet(sheet, sheets, gt)
    (args.work / "novel_views.json").write_text(json.dumps({"views": views, "talk3d_audio_path": path_t3}, indent=1))
    print(table.read_text())
    print(json.dumps({"costs": costs, "views": views}, indent=1))
    if args.no_write:
        return
    lines = [f"### {head}", "", f"Data: `{args.data}` (test split). Avatars: "
             + ", ".join(f"{m} `{a}`" for m, a in avatars.items()) + ".", ""]
    for m, c in costs.items():
        if c["wall_s"] is not None:
            lines.append(f"- {m} cpu-small training: {c['wall_s'] / 60:.1f} min wall, {c['cpu_s'] / 60:.1f} min CPU "
                         f"(user+sys), {c['iterations']} iterations (train loop {c['train_time_s']:.0f} s)")
        else:
            loop = f"train loop {c['train_time_s']:.0f} s" if c["train_time_s"] else "no train_log"
            lines.append(f"- {m}: reused avatar, {c['iterations']} iterations, {loop}")
    lines += ["", "`talkinghead compare` (test split, self-driven):", "", table.read_text().strip(), "",
              "Novel views (camera orbited about the head pivot; face found = mediapipe on 512^2 upscales; "
              "sync = landmark-sync confidence vs the split's audio; r = mouth opening vs the real frontal "
              "frames'):", "",
              "| view (yaw, pitch) | " + " | ".join(f"{m} face found | {m} sync | {m} r | {m} mouth std"
                                                    for m in views) + " |",
              "|---|" + "---|---|---|---|" * len(views)]
    for key in views[next(iter(views))]:
        cells = []
        for m in views:
            v = views[m][key]
            s = v["sync"] if isinstance(v["sync"], str) else f"{v['sync']:.3f}"
            cells += [f"{v['face_found']:.2f}", s, f"{v['mouth_r']:.2f}", f"{v['mouth_std']:.4f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    att = ", ".join(f"{k} {v:.3f}" for k, v in path_t3["attention"].items())
    lines += ["", f"Rows: {len(VIEWS)} camera views with the split's audio, then `{SILENCE}` (tracked camera, "
              "silent audio). Mouth std: of the rendered mouth opening (interocular units).", "",
              f"Talk3D's audio path on the test split: deltaplane rms {path_t3['delta_rms']:.4f}, its variation "
              f"between frames {path_t3['delta_frame_std_rel']:.3f} of that; bottleneck cross-attention (mean over the "
              f"{path_t3['audio_cells']} cells that may attend to a_n) {att}; "
              f"lip code (a_n -> tracked inner-lip gap) r {path_t3['lip_code_r']:.3f}. Lips' box (+2 px) on the "
              f"test frames: L1 to the real frame {path_t3['mouth_l1_audio']:.4f} with the audio, "
              f"{path_t3['mouth_l1_silence']:.4f} with silence; audio vs silence render differ by "
              f"{path_t3['mouth_change_vs_silence']:.4f} (mean abs), r of that with the real mouth opening "
              f"{path_t3['mouth_change_r']:.2f}.", "",
              f"Sheet: `{sheet}` (not committed)."]
    append_entry("## Talk3D", "\n".join(lines))


if __name__ == "__main__":
    main()
