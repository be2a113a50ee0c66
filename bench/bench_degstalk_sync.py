"""Where a DEGSTalk avatar's lip timing is lost: lags along the chain audio window -> jaw head -> rendered mouth.

Not a test. A landmark-sync offset far from 0 (cnn, issue 11: -11 frames) is either an alignment bug (audio
window centring, the plate replay, the fusion) or a weak mouth whose score curve lets a repeat of the speech
rhythm win. On the test split, self-driven, this measures the best lag L (|L| <= 8) and Pearson r at L and at 0
between consecutive signals of the chain:

* tracked gap -> ground-truth mouth opening (both from the same tracks: must read lag 0, r ~1);
* tracked gap -> the jaw head's prediction from the frame's own audio window (eq. 8);
* the same with the audio window taken ``+-SHIFT`` frames away: the known answer, the best lag must move by
  exactly -+SHIFT (a window centred wrongly would show here as a constant offset);
* jaw head -> mouth opening of the rendered frames (mediapipe on the raw 128^2 renders, before any mp4), and
  ground-truth mouth -> rendered mouth: a lag here would sit in the deformation, the plate or the fusion.

Lag convention: L > 0 = the second signal comes L frames late.

    PYTHONPATH=src .venv/bin/python bench/bench_degstalk_sync.py AVATAR DATA [--no-write]

Appends an entry to bench/RESULTS.md under the DEGSTalk section.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from benchlib import append_entry, stamp
from bench_degstalk import SECTION

MAX_LAG = 8
SHIFT = 4


def lag_corr(x: np.ndarray, y: np.ndarray, max_lag: int = MAX_LAG) -> tuple[int, float, float]:
    """(best lag L, r at L, r at 0) of y against x: r(x[t], y[t + L])."""
    r = {}
    for lag in range(-max_lag, max_lag + 1):
        a, b = (x[:len(x) - lag], y[lag:]) if lag >= 0 else (x[-lag:], y[:len(y) + lag])
        r[lag] = float(np.corrcoef(a, b)[0, 1])
    best = max(r, key=r.get)
    return best, r[best], r[0]


def measure(avatar: Path, data: Path) -> dict[str, tuple[int, float, float] | float]:
    import torch

    from talkinghead.face.landmarks import mouth_opening, track
    from talkinghead.methods.data import FrameStore, open_dataset
    from talkinghead.methods.trainer import load_model

    torch.set_num_threads(1)
    _, cfg, info, model, _ = load_model(avatar, device=torch.device("cpu"))
    store = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=info, split="test",
                       with_targets=False, progress=False)
    ds = open_dataset(data, size=cfg.data.size)
    last = len(store.windows) - 1
    jaw, gap, frames = [], [], []
    shifted: dict[int, list[float]] = {-SHIFT: [], SHIFT: []}
    with torch.no_grad():
        for k in range(len(store)):
            cond = store.condition(k)
            jaw.append(float(model.conditions(cond)[2]))
            gap.append(float(model.jaw_target(store.expressions[k])))
            for d in shifted:
                i = min(max(int(store.indices[k]) + d, 0), last)
                shifted[d].append(float(model.conditions(store.condition(k, audio=store.windows[i]))[2]))
            frames.append((model.render(cond).numpy() * 255).round().astype(np.uint8))
    jaw, gap = np.array(jaw), np.array(gap)
    gt_mouth = mouth_opening(np.stack([np.asarray(ds.frame(int(i)).landmarks, np.float32) for i in store.indices]))
    rendered = mouth_opening(track(frames))
    ok = np.isfinite(rendered)
    rendered = np.where(ok, rendered, np.nanmean(rendered))
    out: dict = {"tracked gap -> ground-truth mouth": lag_corr(gap, gt_mouth),
                 "tracked gap -> jaw head": lag_corr(gap, jaw)}
    for d, v in shifted.items():
        out[f"tracked gap -> jaw head, audio window {d:+d} frames"] = lag_corr(gap, np.array(v))
    out["jaw head -> rendered mouth"] = lag_corr(jaw, rendered)
    out["ground-truth mouth -> rendered mouth"] = lag_corr(gt_mouth, rendered)
    out["frames"] = float(len(store))
    out["rendered / ground-truth mouth opening std"] = float(rendered.std() / gt_mouth.std())
    out["jaw head / tracked gap std"] = float(jaw.std() / gap.std())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("avatar", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    res = measure(args.avatar, args.data)
    lines = [f"### {stamp()}", "", f"Lip-timing chain (bench/bench_degstalk_sync.py) of `{args.avatar}` on "
             f"`{args.data}`, test split ({int(res.pop('frames'))} frames), self-driven, raw 128² renders. "
             "Best lag L in frames (L > 0: the second signal late), Pearson r at L and at 0.", "",
             "| signal pair | best lag | r at best lag | r at lag 0 |", "|---|---|---|---|"]
    for name, v in res.items():
        if isinstance(v, tuple):
            lines.append(f"| {name} | {v[0]:+d} | {v[1]:.3f} | {v[2]:.3f} |")
    lines += ["", "; ".join(f"{k}: {v:.2f}" for k, v in res.items() if not isinstance(v, tuple)) + "."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_entry(SECTION, text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
