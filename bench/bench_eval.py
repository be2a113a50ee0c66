"""Benchmark of ``talkinghead eval``: speed, and how the metrics rank known perturbations on real clips.

Measures, on the clips of ../shared/data (skipping absent ones):
  1. eval speed: wall time of ``talkinghead eval --pred WOBBLED --gt CLIP`` with and without the side-by-side video;
  2. stability score of simulated wobble at three levels (and PSNR/SSIM of the same videos) per clip;
  3. landmark sync: offset found for the clip's audio delayed by k frames, confidence, and the confidence of a
     still frame driven by the clip's audio;
  4. articulation signals: correlation (best over +-8 frames) of high-passed mouth opening with broadband
     energy, the 1-3 kHz mel band, the phone openness score and their combination (the choice in sync.py).

Appends a dated entry to the "eval" section of bench/RESULTS.md (machine, load, git revision).
Usage: .venv/bin/python bench/bench_eval.py [--clips may_en_5s.mp4 ...] [--speed-clip NAME]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import ROOT, append_entry, commit, load, machine

DATA = ROOT.parent / "shared" / "data"
SECTION = "## eval (issue 5: talkinghead eval / compare)"
FPS = 25.0
LEVELS = ((0.5, 0.2), (1.5, 0.5), (3.0, 1.0))  # (shift px, rotation deg) std of the simulated wobble


def speed(name: str, tmp: Path) -> list[str]:
    from talkinghead import media
    from talkinghead.eval.perturb import wobble

    clip = DATA / name
    frames = media.read_frames(clip, FPS)
    pred = tmp / "wobble.mp4"
    media.write_video(pred, wobble(frames, *LEVELS[1]), FPS, audio=media.read_audio(clip))
    import resource

    rows = []
    for extra, label in (([], "with side-by-side video"), (["--no-video"], "--no-video")):
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "talkinghead.cli", "eval", "--pred", str(pred), "--gt",
                              str(clip), "--out", str(tmp / "r"), "--quiet", *extra], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"eval failed: {res.stderr[-2000:]}")
        dt = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        rows.append(f"| {name} | {len(frames)} | {label} | {dt:.1f} s | {len(frames) / dt:.1f} | {cpu:.1f} s |")
    return rows


def perturbations(name: str) -> tuple[str, str, str]:
    from talkinghead import media
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.eval import image_metrics as im
    from talkinghead.eval.landmark_metrics import pearson
    from talkinghead.eval.perturb import wobble
    from talkinghead.eval.stability import stability_score
    from talkinghead.eval.sync import articulation_signal, highpass, landmark_sync
    from talkinghead.face.landmarks import mouth_opening, track

    clip = DATA / name
    frames = media.read_frames(clip, FPS)
    audio = media.read_audio(clip)
    tr = track(frames)
    T = len(frames)
    ref = stability_score(tr, tr, FPS)
    cells = [f"{ref.score:.3f}"]
    for shift, rot in LEVELS:
        w = wobble(frames, shift, rot)
        s = stability_score(track(w), tr, FPS)
        sub = range(0, T, max(1, T // 20))
        p = np.mean([im.psnr(w[i], frames[i]) for i in sub])
        q = np.mean([im.ssim(w[i], frames[i]) for i in sub])
        cells.append(f"{s.score:.3f} (Md {s.motion_difference:.2f}, Vm {s.motion_variability:.2f}, "
                     f"Hf {s.high_freq_power:.2f}); {p:.1f} dB / {q:.3f}")
    stab = f"| {name} | " + " | ".join(cells) + " |"

    mouth = mouth_opening(tr)
    feats = {}
    sync_cells = []
    for k in (0, 3, 6, -3):
        shift = int(abs(k) * 16000 / FPS)
        a = np.concatenate([np.zeros(shift, np.float32), audio]) if k >= 0 else audio[shift:]
        feats[k] = compute_audio_features(a, FPS, T)
        r = landmark_sync(articulation_signal(feats[k]), mouth, FPS)
        sync_cells.append(f"{r.offset:+d} ({r.confidence:.2f})")
    still_mouth = mouth_opening(track(np.repeat(frames[:1], T, axis=0)))
    still = landmark_sync(articulation_signal(feats[0]), still_mouth, FPS)
    sync = (f"| {name} | " + " | ".join(sync_cells) + f" | {still.confidence:.3f} | "
            f"{pearson(still_mouth, mouth):+.3f} |")

    # Candidate articulation signals (sync.py keeps the combination).
    from talkinghead.audio.features import N_FFT, mel_filterbank
    from talkinghead.eval.sync import OPENNESS

    f = feats[0]
    fb = mel_filterbank(f.mel.shape[1], N_FFT, 16000)
    centre = np.linspace(0, 8000, N_FFT // 2 + 1)[fb.argmax(1)]
    band = np.log(np.exp(f.mel[:, (centre >= 1000) & (centre < 3000)].astype(np.float64)).sum(1))
    openness = f.phone_posteriors @ np.array([OPENNESS.get(p, 0.0) for p in f.phone_names])
    m = highpass(mouth, FPS)

    def best_r(sig):
        s = highpass(sig.astype(np.float64), FPS)
        return max(pearson(m[max(0, -k):T - max(0, k)], s[max(0, k):T - max(0, -k)]) for k in range(-8, 9))

    art = (f"| {name} | {best_r(f.energy):.3f} | {best_r(band):.3f} | {best_r(openness):.3f} | "
           f"{best_r(articulation_signal(f)):.3f} |")
    return stab, sync, art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="*", default=["may_en_5s.mp4", "hdtf_aoc_8s.mp4", "hdtf_radio2_8s.mp4",
                                                    "german_anchor_de_20s.mp4", "cnn_anchor_en_71s.mp4"])
    ap.add_argument("--speed-clip", default="hdtf_aoc_8s.mp4")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = ap.parse_args()
    clips = [c for c in args.clips if (DATA / c).exists()]
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        speed_rows = speed(args.speed_clip, Path(tmp)) if (DATA / args.speed_clip).exists() else []
    stab, sync, art = zip(*(perturbations(c) for c in clips)) if clips else ((), (), ())
    lv = ", ".join(f"{s:g} px / {r:g} deg" for s, r in LEVELS)
    entry = [
        f"### {datetime.date.today()} · {machine()} · git {commit()} · load avg before {load_before}, after {load()}",
        "",
        "Eval speed (`talkinghead eval --pred WOBBLED --gt CLIP`, whole command incl. start-up and face mesh "
        "on both videos):",
        "",
        "| clip | frames | mode | wall | frames/s | CPU time |", "|---|---|---|---|---|---|", *speed_rows,
    ]
    if clips:
        entry += [
            "",
            f"Stability score (lower = steadier) of simulated wobble, levels = per-frame shift / rotation std {lv}; "
            "after ';' PSNR / SSIM (full frame) of the wobbled frames against the originals:",
            "",
            "| clip | reference | level 1 | level 2 | level 3 |", "|---|---|---|---|---|", *stab,
            "",
            "Landmark sync: offset found (confidence) for the clip's audio delayed by k frames; a still first frame "
            "with the clip's audio: confidence and mouth-opening r vs the real video:",
            "",
            "| clip | k = 0 | k = 3 | k = 6 | k = -3 | still: conf | still: r |", "|---|---|---|---|---|---|---|",
            *sync,
            "",
            "Articulation signal candidates: best |lag| <= 8 Pearson r with the high-passed mouth opening:",
            "",
            "| clip | energy (dBFS) | mel 1-3 kHz | phone openness | combined (used) |", "|---|---|---|---|---|", *art,
        ]
    entry = "\n".join(entry)
    print(entry)
    if not args.no_write:
        append_entry(SECTION, entry)


if __name__ == "__main__":
    main()
