"""GaussianTalker end to end on a real clip: train (cpu-small), render, and the must-show figures.

Not a test. Steps (each timed; the machine's load average is recorded since the 2 cores are shared):

1. ``talkinghead prepare`` the clip (reused when ``--data`` is given);
2. ``talkinghead train DATA --preset cpu-small`` (skipped with ``--avatar``): wall time of the command;
3. self-driven test split (``render_split``): render FPS; face-region PSNR of our frames and of the
   background-only image (the backdrop the head is splatted on) against the ground truth, face region =
   parsing labels face + inner mouth of each ground-truth frame;
4. mouth opening (``talkinghead.face.landmarks``: mediapipe on frames upscaled 4x to 512^2, the same way for
   ours and the ground truth) and its Pearson correlation with the ground truth's, for the avatar driven by
   the split's audio and by silence (zero wave, same poses);
5. cross-driven: ``talkinghead render --audio speech_en_60s.wav``: frames, FPS, and eval's landmark-sync
   confidence of the rendered mouth against the audio, beside a still frame's (floor) and the real clip's.
   (Raw loudness is a poor yardstick: on the cnn clip the tracked mouth opening correlates 0.22 with it.)

    .venv/bin/python bench/bench_gaussiantalker.py [--video ../shared/data/cnn_anchor_en_71s.mp4]
        [--data DIR] [--avatar DIR] [--variant fast] [--work /tmp/bench_gt] [--no-write]

Appends a section to bench/RESULTS.md (under "## GaussianTalker").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchlib import CLI, ROOT, append_entry, commit, load, machine, now, run_timed
from talkinghead.eval import landmark_metrics
from talkinghead.eval.image_metrics import psnr

SHARED = ROOT.parent / "shared" / "data"
def _upscaled(frames: list[np.ndarray], side: int = 512) -> list[np.ndarray]:
    import cv2

    return [cv2.resize(f, (side, side), interpolation=cv2.INTER_CUBIC) for f in frames]


def mouth_track(frames: list[np.ndarray]) -> np.ndarray:
    """Mouth opening [T] by mediapipe on frames upscaled to 512^2 (NaN where no face)."""
    from talkinghead.face.landmarks import mouth_opening, track

    return mouth_opening(track(_upscaled(frames)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the frames where both signals exist (mediapipe may miss a face)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return landmark_metrics.pearson(a[ok], b[ok])


def render_frames(model, store, windows=None) -> tuple[list[np.ndarray], float]:
    """uint8 frames of the store's items (own audio, or ``windows[k]``) and the render-only seconds."""
    import torch

    out, secs = [], 0.0
    with torch.no_grad():
        for k in range(len(store)):
            cond = store.condition(k, audio=None if windows is None else windows[k])
            t = time.perf_counter()
            img = model.render(cond)
            secs += time.perf_counter() - t
            out.append((img.clamp(0, 1) * 255 + 0.5).byte().numpy())
    return out, secs


def evaluate(avatar: Path, data: Path, work: Path) -> dict:
    import dataclasses

    import torch

    from talkinghead.data import PreparedDataset
    from talkinghead.methods import render_split
    from talkinghead.methods.render import driving_features
    from talkinghead.methods.data import FrameStore, audio_windows
    from talkinghead.methods.trainer import load_model

    torch.set_num_threads(1)
    res: dict = {}
    train_size = int(json.loads((avatar / "config.json").read_text())["info"]["size"])
    r = render_split(avatar, data, "test", work / "test_split.mp4", size=train_size, full_frame=False)
    res["render_fps_split"] = r["fps"]
    _, cfg, info, model, _ = load_model(avatar)
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test", progress=False)
    ours, secs = render_frames(model, store)
    res["render_fps"] = len(ours) / secs
    gt = [(store.images[k].numpy()) for k in range(len(store))]
    backdrop = [(store.backdrops[k].numpy()) for k in range(len(store))]
    masks = [(store.labels[k].numpy() >= 3) for k in range(len(store))]
    res["frames"] = len(ours)
    res["psnr_face"] = float(np.mean([psnr(o, g, m) for o, g, m in zip(ours, gt, masks)]))
    res["psnr_face_background_only"] = float(np.mean([psnr(b, g, m) for b, g, m in zip(backdrop, gt, masks)]))
    res["psnr_full"] = float(np.mean([psnr(o, g) for o, g in zip(ours, gt)]))

    # Silence: zero wave through the same extractor (the dataset's encoder), same poses and backdrops.
    n = PreparedDataset(data).num_frames
    silent = driving_features(np.zeros(int(n / info.fps * 16000) + 1, np.float32), info.fps, data)[:n]
    sil_windows = audio_windows(silent, cfg.data.audio_radius)[store.indices]
    quiet, _ = render_frames(model, store, sil_windows)
    m_gt, m_ours, m_quiet = mouth_track(gt), mouth_track(ours), mouth_track(quiet)
    res["mouth_corr"] = pearson(m_ours, m_gt)
    res["mouth_corr_silence"] = pearson(m_quiet, m_gt)
    res["mouth_std"] = {"gt": float(np.nanstd(m_gt)), "ours": float(np.nanstd(m_ours)),
                        "silence": float(np.nanstd(m_quiet))}
    res["mouth_detected"] = float(np.isfinite(m_ours).mean())
    import cv2

    strip = np.concatenate([np.concatenate([g, o, q], 0) for g, o, q in zip(gt[::20], ours[::20], quiet[::20])], 1)
    cv2.imwrite(str(work / "test_strip.png"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    return res


def cross_driven(avatar: Path, audio: Path, work: Path, data: Path, video: Path) -> dict:
    """Render ``audio`` and measure whether the lips move with it: landmark-sync confidence (eval's), beside
    the same figure for a still frame of the render (no lip motion: the floor) and for the training clip's
    real frames with their own audio (what a real speaker scores)."""
    import av

    from talkinghead.audio.features import compute_audio_features, load_driving_audio
    from talkinghead.data import PreparedDataset
    from talkinghead.eval.sync import articulation_signal, landmark_sync
    from talkinghead.methods.render import render_audio

    out = work / "cross_60s.mp4"
    train_size = int(json.loads((avatar / "config.json").read_text())["info"]["size"])
    r = render_audio(avatar, audio, out, size=train_size, full_frame=False)  # the crop, as before issue 13
    frames = []
    with av.open(str(out)) as c:
        duration = float(c.duration / 1e6) if c.duration else float("nan")
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
    m = mouth_track(frames)
    fps = float(json.loads((avatar / "config.json").read_text())["info"]["fps"])
    art = articulation_signal(compute_audio_features(load_driving_audio(audio), fps, len(frames)))
    ours = landmark_sync(art, m, fps)
    still = landmark_sync(art, mouth_track([frames[0]] * len(frames)), fps)  # the first frame, repeated
    ds = PreparedDataset(data)
    # The clip's own articulation from its sound track, as eval computes it (a Whisper dataset's features
    # carry no phone posteriors).
    own = compute_audio_features(load_driving_audio(video), ds.fps, int(ds.num_frames))
    real = landmark_sync(articulation_signal(own), ds.tracks.mouth_opening, ds.fps)
    return {"frames": r["frames"], "fps": r["fps"], "duration_s": duration, "mouth_std": float(np.nanstd(m)),
            "sync_conf": ours.confidence, "sync_offset": ours.offset, "sync_conf_still": still.confidence,
            "sync_conf_real_clip": real.confidence, "sync_offset_real_clip": real.offset, "mp4": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=SHARED / "cnn_anchor_en_71s.mp4")
    ap.add_argument("--audio", type=Path, default=SHARED / "speech_en_60s.wav")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--avatar", type=Path, default=None)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's (a shorter run)")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the preset's)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gaussiantalker"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log: dict = {"machine": machine(), "date": now(), "commit": commit(), "load_start": load()}
    data = args.data
    if data is None:
        data = args.work / "data"
        log["prepare_s"] = run_timed(CLI + ["prepare", str(args.video), "--out", str(data), "--quiet"])
    avatar = args.avatar
    if avatar is None:
        avatar = args.work / ("avatar_fast" if args.variant else "avatar")
        cmd = CLI + ["train", str(data), "--out", str(avatar), "--preset", "cpu-small"]
        if args.variant:
            cmd += ["--variant", args.variant]
        if args.iterations:
            cmd += ["--iterations", str(args.iterations)]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        log["train_wall_s"] = run_timed(cmd)
    log["train_log"] = json.loads((avatar / "train_log.json").read_text())
    log["load_after_train"] = load()
    log["self"] = evaluate(avatar, data, args.work)
    log["cross"] = cross_driven(avatar, args.audio, args.work, data, args.video)
    log["load_end"] = load()
    (args.work / "bench.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1))
    if not args.no_write:
        write_results(log, args)


def write_results(log: dict, args) -> None:
    tl, s, c = log["train_log"], log["self"], log["cross"]
    lines = [
        f"### {log['machine']}; {log['date']}; commit {log['commit']}; load average {log['load_start']} at start, "
        f"{log['load_after_train']} after training (1/5/15 min)",
        "",
        f"Clip `{args.video.name}`, preset cpu-small ({tl['size']}x{tl['size']}), variant "
        f"{tl.get('variant') or 'L=2 (GaussianTalker)'}, {tl.get('num_gaussians')} Gaussians, {tl['iterations']} iterations "
        f"({tl.get('canonical_iterations')} canonical, seed {tl.get('seed', 0)}), {tl['train_frames']} training frames, LPIPS {tl.get('lpips', '?')[:3]}.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if "train_wall_s" in log:
        lines.append(f"| `talkinghead train` wall time (loading + loop + writing) | {log['train_wall_s'] / 60:.1f} min |")
    lines += [
        f"| training loop time (train_log train_time_s) | {tl['train_time_s'] / 60:.1f} min |",
        f"| render FPS at {tl['size']}^2, CPU 1 thread (deformation + raster, test split) | {s['render_fps']:.1f} |",
        f"| test split: PSNR face region, ours | {s['psnr_face']:.2f} dB |",
        f"| test split: PSNR face region, background-only image | {s['psnr_face_background_only']:.2f} dB |",
        f"| test split: PSNR full frame, ours | {s['psnr_full']:.2f} dB |",
        f"| mouth-opening correlation with ground truth, driven by the split's audio | {s['mouth_corr']:.3f} |",
        f"| mouth-opening correlation with ground truth, driven by silence | {s['mouth_corr_silence']:.3f} |",
        f"| mouth-opening std (gt / ours / silence) | {s['mouth_std']['gt']:.3f} / {s['mouth_std']['ours']:.3f} / "
        f"{s['mouth_std']['silence']:.3f} |",
        f"| cross-driven `{args.audio.name}`: frames, duration | {c['frames']}, {c['duration_s']:.1f} s |",
        f"| cross-driven: render FPS (deformation + raster) | {c['fps']:.1f} |",
        f"| cross-driven: mouth-opening std | {c['mouth_std']:.3f} |",
        f"| cross-driven: landmark-sync confidence (offset) / a still frame / the real clip with its audio | "
        f"{c['sync_conf']:.3f} ({c['sync_offset']:+d}) / {c['sync_conf_still']:.3f} / "
        f"{c['sync_conf_real_clip']:.3f} ({c['sync_offset_real_clip']:+d}) |",
        "| `gpu` preset (512^2, L=1 and L=2): training time, render FPS | not measured (no GPU lent) |",
        "",
    ]
    block = "\n".join(lines)
    append_entry("## GaussianTalker (bench/bench_gaussiantalker.py)", block, intro=(
        "Must-show figures of issue 4. The 2 cores are shared with other engineers' jobs: wall times are "
        "inflated by the load averages given. Mouth opening: mediapipe on frames upscaled 4x to 512^2."))


if __name__ == "__main__":
    main()
