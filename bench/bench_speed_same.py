"""Does the faster code still compute the same thing? Train before and after from the same start, compare renders.

Not a test. For each method, in each tree (``--before REF`` exported by git archive, and this checkout): a fresh
model from the cnn dataset (seed 0), ``--iterations`` training iterations over the same frames in the same order
(GaussianTalker in its deformation stage, with the replay bank filled first, as late in a run), then the test
split rendered in eval mode. The driver compares the two trees' frames: largest and mean absolute difference,
PSNR of after against before, and each tree's face-agnostic full-frame PSNR against the ground truth. Float
rounding differs between the trees (Numba loops, folded attention, fused Adam...), and training amplifies it,
so the frames are expected close, not bit-equal.

    .venv/bin/python bench/bench_speed_same.py --before 4db0c50 [--iterations 40] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_speed import DATA, METHODS, build, export_tree  # noqa: E402


def worker(out: Path, iterations: int) -> None:
    import torch

    torch.set_num_threads(1)
    res = {}
    for method in METHODS:
        torch.manual_seed(0)
        model, cfg, store, test = build(method, None)
        step = cfg.schedule.iterations - iterations if method == "gaussiantalker" else 0
        opts = model.optimizers()
        model.train()
        order = list(range(len(store))) + list(range(iterations))
        t = time.process_time()
        for j, k in enumerate(order):
            b = store.batch(k % len(store))
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss, _ = model.train_loss(b, step + max(0, j - len(store)))
            loss.backward()
            for o in opts:
                o.step()
            model.after_step(step)
        train_s = time.process_time() - t
        model.eval()
        with torch.no_grad():
            frames = np.stack([model.render(test.condition(k)).clamp(0, 1).numpy() for k in range(len(test))])
        np.save(out / f"{method}.npy", frames)
        res[method] = {"train_cpu_s": train_s, "iterations": len(order)}
        print(method, res[method], flush=True)
    (out / "res.json").write_text(json.dumps(res))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(max(float(np.mean((a - b) ** 2)), 1e-12)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=False, default=None)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.iterations)
    from benchlib import ROOT, append_entry, stamp

    from talkinghead.methods.data import FrameStore
    from talkinghead.methods.gaussiantalker.config import make_config

    with tempfile.TemporaryDirectory(prefix="bench_same_") as tmp:
        tmp = Path(tmp)
        outs = {}
        for tag, src in (("before", export_tree(args.before, tmp)), ("after", ROOT / "src")):
            out = tmp / tag
            out.mkdir()
            env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out),
                            "--iterations", str(args.iterations)], check=True, env=env)
            outs[tag] = {m: np.load(out / f"{m}.npy") for m in METHODS}
            outs[tag]["res"] = json.loads((out / "res.json").read_text())
    gt_store = FrameStore(DATA, make_config("cpu-small", None).data, split="test", progress=False)
    truth = gt_store.images.numpy().astype(np.float32) / 255.0
    lines = [f"### {stamp()}", "",
             f"Same start (fresh model, seed 0), the same training frames in the same order: one pass over 40 "
             f"sampled frames, then {args.iterations} more iterations (GaussianTalker in its deformation stage), "
             "then the 162 test frames rendered in eval mode, before (`" + str(args.before) + "`) and after.", "",
             "| method | max abs diff | mean abs diff | PSNR after vs before | PSNR vs truth, before / after | "
             "training CPU s, before / after |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        b, a = outs["before"][m], outs["after"][m]
        d = np.abs(a - b)
        lines.append(f"| {m} | {d.max():.4f} | {d.mean():.2e} | {psnr(a, b):.1f} dB | {psnr(b, truth):.2f} / "
                     f"{psnr(a, truth):.2f} dB | {outs['before']['res'][m]['train_cpu_s']:.0f} / "
                     f"{outs['after']['res'][m]['train_cpu_s']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_entry("## Speed (bench/bench_speed.py)", text)


if __name__ == "__main__":
    main()
