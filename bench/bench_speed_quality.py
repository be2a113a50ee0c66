"""Quality before/after a speed change: train each method with each seed from one source tree, evaluate, compare.

Not a test. For every (method, seed): ``talkinghead train DATA --preset cpu-small`` (the seed set through the
method's config: the CLI has no seed flag, and the "before" tree must run unchanged), then ``talkinghead eval
AVATAR --data DATA --no-video``; at the end ``talkinghead compare`` of every report found under ``--work``
(so a second call with ``--src`` of the other tree and another ``--tag`` adds its rows to the same table).

    .venv/bin/python bench/bench_speed_quality.py --tag before --src /tmp/before/src --work /work/scratch/speed/q
    .venv/bin/python bench/bench_speed_quality.py --tag after --work /work/scratch/speed/q   # this tree

``--src`` is the ``src`` folder whose ``talkinghead`` runs (default: this checkout's); ``bench/bench_speed.py
--before REF`` makes one from a git ref. Each step's wall and CPU seconds (children's user + sys) and the load
average go into ``WORK/TAG_runs.json``; the table into ``WORK/compare.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchlib import ROOT, load

TRAIN = """
import dataclasses, sys
from talkinghead.methods import get_method, register_method
from talkinghead.methods.trainer import train
method, data, out, seed, iterations = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
spec = get_method(method)
def make_config(preset, variant, _make=spec.make_config):
    cfg = _make(preset, variant)
    cfg.schedule.seed = seed
    return cfg
register_method(dataclasses.replace(spec, make_config=make_config))
import torch
torch.set_num_threads(1)
log = train(data, method, out, preset="cpu-small", progress=False,
            iterations=int(iterations) if iterations != "preset" else None)
print(log["train_time_s"], "s loop")
"""


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` and return its wall seconds and the CPU seconds its process tree used."""
    print("+", " ".join(cmd[:3]), "...", cmd[-4:], flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)  # the slot wrapper already runs niced
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(cpu, 1), "load": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True, help="name of this tree's rows (e.g. before, after)")
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--data", type=Path, default=Path("/work/data/cnn_anchor_en_71s"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["gaussiantalker", "gaussianflametalk"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--iterations", nargs="+", default=["preset"], metavar="N",
                    help="iterations per method, in --methods order (default: the preset's)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(args.src.resolve()), OMP_NUM_THREADS="1")
    py = [sys.executable]
    runs_path = args.work / f"{args.tag}_runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    iterations = dict(zip(args.methods, args.iterations * len(args.methods)))
    for seed in args.seeds:
        for method in args.methods:
            name = f"{args.tag}_{method}_s{seed}"
            avatar, report = args.work / name, args.work / f"{name}_report"
            r = runs.setdefault(name, {})
            if not (avatar / "train_log.json").exists():
                args_ = [method, str(args.data), str(avatar), str(seed), iterations[method]]
                r["train"] = timed(py + ["-c", TRAIN, *args_], env)
                r["train_log"] = json.loads((avatar / "train_log.json").read_text())
            if not (report / "metrics.json").exists():
                r["eval"] = timed(py + ["-m", "talkinghead.cli", "eval", str(avatar), "--data", str(args.data),
                                        "--out", str(report), "--no-video", "--quiet"], env)
            runs_path.write_text(json.dumps(runs, indent=1))
    reports = sorted(str(p.parent) for p in args.work.glob("*_report/metrics.json"))
    subprocess.run(py + ["-m", "talkinghead.cli", "compare", *reports, "--out", str(args.work / "compare.md")],
                   check=True, env=dict(os.environ, PYTHONPATH=str((ROOT / "src").resolve())))
    print((args.work / "compare.md").read_text())


if __name__ == "__main__":
    main()
