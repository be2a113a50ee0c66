"""DEGSTalk against GaussianTalker and GaussianFlameTalk (+ DEGSTalk's Table II ablations) on the same test splits.

Not a test. For each prepared dataset and each run (method, variant):

1. ``talkinghead train DATA --method M [--variant V] --preset cpu-small [--iterations N]`` (skipped when the
   avatar folder already holds ``model.safetensors``, or when ``--reuse`` names another avatar): wall time, and
   the CPU seconds (user + sys) of the command, from ``AVATAR.time`` (``wall user sys``) -- the cores are shared,
   so CPU seconds are the steadier figure;
2. ``talkinghead eval AVATAR --data DATA --out REPORT`` (the test split rendered at 128^2, self-driven; render
   FPS, PSNR/SSIM full and face, LMD, mouth-opening r, stability, landmark sync, the hairline / neck seam-band
   errors);
3. render frames per CPU second at 128^2 (one thread, in this process: eval's FPS is wall-clock on shared cores);
4. one ``talkinghead compare`` table per dataset;
5. a PNG sheet per dataset: ground truth and every run's prediction at four test frames.

Runs whose avatar is missing are listed as not run unless ``--train-missing`` trains them here, one at a time.

    PYTHONPATH=src .venv/bin/python bench/bench_degstalk.py [--work DIR] [--datasets cnn,lowres]
        [--data cnn=/work/scratch/whisper/cnn] [--reuse cnn/gaussiantalker=AVATAR] [--runs a,b]
        [--also cnn/degstalk-before-fix=AVATAR] [--iterations N] [--train-missing] [--no-write]

Appends an entry to bench/RESULTS.md under "## DEGSTalk (bench/bench_degstalk.py)".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np

from benchlib import CLI, append_entry, stamp

SECTION = "## DEGSTalk (bench/bench_degstalk.py)"
DATASETS = {"cnn": "/work/data/cnn_anchor_en_71s", "hdtf": "/work/data/hdtf_radio2_8s",
            "lowres": "/work/data/lowres_woman_11s_200x278_29.97fps"}
# (run name, method, variant)
RUNS = [
    ("degstalk", "degstalk", None),
    ("gaussiantalker", "gaussiantalker", None),
    ("gaussianflametalk", "gaussianflametalk", None),
    ("degstalk-no-embedding", "degstalk", "no-embedding"),
    ("degstalk-no-expression", "degstalk", "no-expression"),
    ("degstalk-direct-fusion", "degstalk", "direct-fusion"),
    ("degstalk-no-hair", "degstalk", "no-hair"),
    ("degstalk-no-lip-geometry", "degstalk", "no-lip-geometry"),
]


def train(data: Path, avatar: Path, method: str, variant: str | None, iterations: int | None) -> None:
    """Train into ``avatar``, writing ``avatar.time`` = "wall user sys" of the command."""
    cmd = [*CLI, "train", str(data), "--method", method, "--out", str(avatar), "--preset", "cpu-small"]
    cmd += (["--iterations", str(iterations)] if iterations else []) + (["--variant", variant] if variant else [])
    print("+", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(f"{avatar}.time").write_text(f"{wall:.2f} {after.ru_utime - before.ru_utime:.2f} "
                                      f"{after.ru_stime - before.ru_stime:.2f}\n")


def cpu_figures(avatar: Path) -> tuple[float, float] | None:
    """(wall s, CPU s) of the training command, or None when it was not recorded."""
    path = Path(f"{avatar}.time")
    if not path.is_file():
        return None
    wall, user, sys_ = (float(x) for x in path.read_text().split()[:3])
    return wall, user + sys_


def evaluate(avatar: Path, data: Path, report: Path) -> None:
    if (report / "metrics.json").is_file():
        return
    cmd = [*CLI, "eval", str(avatar), "--data", str(data), "--out", str(report), "--quiet"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def cpu_fps(avatar: Path, data: Path, frames: int = 24) -> float:
    """Rendered frames per CPU second at the training size (one torch thread, test-split conditions, after one
    warm-up frame): what one free core gives, unlike eval's wall-clock FPS on the shared cores."""
    import dataclasses

    import torch

    from talkinghead.methods.data import FrameStore
    from talkinghead.methods.trainer import load_model

    torch.set_num_threads(1)
    _, cfg, info, model, _ = load_model(avatar, device=torch.device("cpu"))
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test",
                       with_targets=False, progress=False)
    with torch.no_grad():
        model.render(store.condition(0))
        t = time.process_time()
        for k in range(frames):
            model.render(store.condition(k % len(store)))
        return frames / (time.process_time() - t)


def mouth_leak(avatar: Path, data: Path, open_px: int = 40) -> tuple[float, float, list[float]] | None:
    """DEGSTalk only (None for other methods): on the inner mouth + a 1-px ring of the test frames (self-driven,
    at the training size), the share of C_hair seen through both fields ((1 - O_face)(1 - O_mouth)), over all
    frames and over those with an open mouth (>= ``open_px`` inner-mouth pixels), and the open frames' signed
    colour error (render - truth, R G B, 0-255): where the plate's backdrop leaks into the mouth (cnn's blue
    lip line)."""
    import dataclasses

    import torch

    from talkinghead.methods.data import FrameStore
    from talkinghead.methods.degstalk.plate import MOUTH, dilate
    from talkinghead.methods.trainer import load_model

    torch.set_num_threads(1)
    _, cfg, info, model, _ = load_model(avatar, device=torch.device("cpu"))
    if not hasattr(model, "fuse"):
        return None
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test",
                       progress=False)
    seen, n, seen_o, n_o, err_o = 0.0, 0, 0.0, 0, torch.zeros(3)
    with torch.no_grad():
        for k in range(len(store)):
            b = store.batch(k)
            face, mouth, _ = model.fields(b.cond, deform=True)
            behind, a_m, _, _ = model._raster(mouth, b.cond, model.plate(b.cond))
            img, a_f, _, _ = model._raster(face, b.cond, behind)
            inner = b.cond.source.labels == MOUTH
            region = dilate(inner.float(), 1) > 0
            through = float(((1 - a_f[..., 0]) * (1 - a_m[..., 0]))[region].sum())
            seen, n = seen + through, n + int(region.sum())
            if int(inner.sum()) >= open_px:
                seen_o, n_o = seen_o + through, n_o + int(region.sum())
                err_o += (img.clamp(0, 1) - b.image)[region].sum(0) * 255
    return seen / max(n, 1), seen_o / max(n_o, 1), (err_o / max(n_o, 1)).tolist()


def compare(reports: list[Path], out: Path) -> str:
    subprocess.run([*CLI, "compare", *map(str, reports), "--out", str(out)], check=True, capture_output=True)
    return out.read_text()


def sheet(data: Path, runs: list[tuple[str, Path]], out: Path, columns: int = 4, mouth: bool = False) -> None:
    """PNG: the ground truth row, then one row per run's prediction.mp4, at ``columns`` evenly spaced test frames
    (with ``mouth``: the test frames with the widest tracked mouth opening, each cropped to a square around the
    lips' landmarks, 2.2 times their width, so that the mouth is seen at 128^2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from talkinghead import media
    from talkinghead.data import PreparedDataset

    ds = PreparedDataset(data, size=media.probe(runs[0][1] / "prediction.mp4").width)
    preds = {name: media.read_frames(rep / "prediction.mp4", ds.fps) for name, rep in runs}
    idx = ds.split_indices("test")
    pick = np.linspace(0, len(idx) - 1, columns).round().astype(int)
    crop = lambda k, im: im  # noqa: E731 - whole frames unless mouth
    if mouth:
        from talkinghead.face.landmarks import LIPS_OUTER

        opening = np.asarray(ds.tracks.mouth_opening)[idx]
        pick = np.sort(np.argsort(-opening)[:columns])

        def crop(k: int, im: np.ndarray) -> np.ndarray:
            lips = ds.frame(int(idx[k])).landmarks[list(LIPS_OUTER), :2]
            (x0, y0), (x1, y1) = lips.min(0), lips.max(0)
            half = 1.1 * max(x1 - x0, 1.0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            r0, c0 = int(max(0, round(cy - half))), int(max(0, round(cx - half)))
            return im[r0:int(round(cy + half)), c0:int(round(cx + half))]

    rows = [("ground truth", [crop(k, np.round(ds.image(int(idx[k])) * 255).astype(np.uint8)) for k in pick])]
    rows += [(name, [crop(k, frames[min(k, len(frames) - 1)]) for k in pick]) for name, frames in preds.items()]
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.3 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        for c, frame in enumerate(frames):
            ax = axes[r][c]
            ax.imshow(frame)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"test frame {int(idx[pick[c]])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {what} wants KEY=PATH, got {item!r}")
        out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/degstalk/runs"))
    ap.add_argument("--datasets", default="cnn,hdtf,lowres")
    ap.add_argument("--data", action="append", default=[], metavar="KEY=PATH",
                    help="prepared dataset of KEY (default: the /work/data ones in DATASETS)")
    ap.add_argument("--reuse", action="append", default=[], metavar="KEY/RUN=AVATAR",
                    help="take this already trained avatar for RUN on KEY instead of WORK/KEY_RUN")
    ap.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="run names to include")
    ap.add_argument("--also", action="append", default=[], metavar="KEY/NAME=AVATAR",
                    help="an extra row NAME on KEY from an already trained avatar (e.g. one from an earlier commit)")
    ap.add_argument("--iterations", type=int, help="override every run's preset length")
    ap.add_argument("--train-missing", action="store_true", help="train runs whose avatar is missing (else skip)")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a line for the entry (what differs in this run)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = {**DATASETS, **_pairs(args.data, "--data")}
    reuse = _pairs(args.reuse, "--reuse")
    wanted = args.runs.split(",")
    also = _pairs(args.also, "--also")
    parts, skipped, speed, leaks = [], [], [], []
    for key in args.datasets.split(","):
        data = Path(paths[key])
        reports, shown = [], []
        runs = sorted(RUNS, key=lambda r: wanted.index(r[0]) if r[0] in wanted else 99)
        runs = [r for r in runs if r[0] in wanted]
        runs += [(k.partition("/")[2], None, None) for k in also if k.partition("/")[0] == key]
        for name, method, variant in runs:
            avatar = Path(also.get(f"{key}/{name}") or reuse.get(f"{key}/{name}", args.work / f"{key}_{name}"))
            if not (avatar / "model.safetensors").is_file():
                if method is None:
                    raise SystemExit(f"error: --also {key}/{name}: no model.safetensors in {avatar}")
                if not args.train_missing or f"{key}/{name}" in reuse:
                    skipped.append(f"{key}/{name}")
                    continue
                train(data, avatar, method, variant, args.iterations)
            report = args.work / "reports" / key / name
            evaluate(avatar, data, report)
            reports.append(report)
            shown.append((name, report))
            log = json.loads((avatar / "train_log.json").read_text())
            m = json.loads((report / "metrics.json").read_text())["metrics"]
            cpu = cpu_figures(avatar)
            speed.append(f"| {key} | {name} | `{avatar}` | {log['iterations']} | {log['train_time_s'] / 60:.1f} | "
                         + (f"{cpu[0] / 60:.1f} | {cpu[1] / 60:.1f}" if cpu else "– | –")
                         + f" | {m['render_fps']:.1f} | {cpu_fps(avatar, data):.1f} |")
            leak = mouth_leak(avatar, data)
            if leak is not None:
                leaks.append(f"| {key} | {name} | {100 * leak[0]:.2f} | {100 * leak[1]:.2f} | "
                             + " ".join(f"{x:+.1f}" for x in leak[2]) + " |")
        if not reports:
            continue
        table = compare(reports, args.work / f"compare_{key}.md")
        sheet(data, shown, args.work / f"sheet_{key}.png")
        sheet(data, shown, args.work / f"sheet_{key}_mouth.png", mouth=True)
        parts.append(f"#### {key}: `{data}` (test split, self-driven, 128²)\n\n{table.strip()}\n\n"
                     f"Sheets: `{args.work / f'sheet_{key}.png'}`, mouth close-ups (widest-open test frames) "
                     f"`{args.work / f'sheet_{key}_mouth.png'}`")
    entry = [f"### {stamp()}", "",
             "All runs `--preset cpu-small` (128²)"
             + (f", {args.iterations} iterations" if args.iterations else ", the preset's length")
             + "; each training one job in a CPU slot of the FIFO queue (`/work/wt/q`, nice 5) on the shared 2 cores. " + args.note, ""]
    entry += ["| data | run | avatar | iterations | train loop (min) | command wall (min) | command CPU (min) | "
              "render FPS (eval, wall) | render frames / CPU s |", "|---|---|---|---|---|---|---|---|---|", *speed, ""]
    if leaks:
        entry += ["Mouth region (inner mouth + 1 px, test split, raw renders): % of the hair plate seen through both "
                  "fields, all frames / open-mouth frames (>= 40 inner-mouth px), and the open frames' signed colour "
                  "error R G B (render - truth, 0-255).", "",
                  "| data | run | plate seen (%) | plate seen, open (%) | signed error, open (R G B) |",
                  "|---|---|---|---|---|", *leaks, ""]
    entry += parts
    if skipped:
        entry += ["", "Not run: " + ", ".join(skipped) + "."]
    text = "\n".join(entry)
    print(text)
    if not args.no_write:
        append_entry(SECTION, text, intro=(
            "DEGSTalk (issue 11) beside GaussianTalker and GaussianFlameTalk, and its ablations w/o E "
            "(no per-Gaussian embedding) and w/o H (no hair-preserving rendering), on the cnn test split and two "
            "long-haired clips. Hairline / Neck err: eval's seam-band errors (mean absolute error, 0-255)."))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
