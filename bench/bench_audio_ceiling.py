"""How much of the mouth's motion our offline audio features can explain: the ceiling every method shares.

Not a test. On a prepared dataset, a ridge regression from the per-frame audio features
(``PreparedDataset.audio_matrix``: phone posteriors + log-mel + energy) over a window of +-k frames to the tracked
mouth opening (``tracks.mouth_opening``), scored by Pearson r on held-out frames:

* blocked cross-validation: the test split (the last 1/11, as GaussianTalker / ER-NeRF hold out) and the
  frames before it cut into 10 contiguous blocks; each block predicted by a model fitted on the others minus a 10-frame
  margin on each side; the ridge strength is picked by the mean r over those 10 blocks, never by the test split;
* the same model's r on the last block, i.e. on the dataset's test split.

A linear read-out is a lower bound of what a network could extract, but on one minute of one speaker the
methods' networks land close to it (see the GaussianTalker section). Writes a section of bench/RESULTS.md.

    .venv/bin/python bench/bench_audio_ceiling.py DATA [--no-write]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchlib import append_entry, stamp

FOLDS = 11
MARGIN = 10
WINDOWS = (0, 1, 2, 4)
LAMBDAS = (1e2, 1e3, 3e3, 1e4, 3e4)


def windows(x: np.ndarray, k: int) -> np.ndarray:
    """[T, D] -> [T, (2k+1) D]: rows t-k..t+k side by side (edge rows repeated)."""
    idx = np.clip(np.arange(len(x))[:, None] + np.arange(-k, k + 1)[None], 0, len(x) - 1)
    return x[idx].reshape(len(x), -1)


def blocked_cv(x: np.ndarray, y: np.ndarray, lam: float, test: np.ndarray) -> np.ndarray:
    """Pearson r [FOLDS] of each contiguous block predicted by a ridge fitted on the rest. The last block is
    the ``test`` split; the frames before it make the other FOLDS - 1 blocks."""
    T = len(x)
    out = []
    for block in np.array_split(np.arange(test[0]), FOLDS - 1) + [test]:
        fit = np.ones(T, bool)
        fit[max(block[0] - MARGIN, 0):block[-1] + MARGIN + 1] = False
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
        a = np.c_[(x - mu) / sd, np.ones(T)]
        w = np.linalg.solve(a[fit].T @ a[fit] + lam * np.eye(a.shape[1]), a[fit].T @ y[fit])
        out.append(np.corrcoef(a[block] @ w, y[block])[0, 1])
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from talkinghead.data import PreparedDataset

    ds = PreparedDataset(args.data)
    x, y = np.asarray(ds.audio_matrix, np.float64), ds.tracks.mouth_opening.astype(np.float64)
    test = ds.split_indices("test")
    rows = []
    for k in WINDOWS:
        xk = windows(x, k)
        scores = {lam: blocked_cv(xk, y, lam, test) for lam in LAMBDAS}
        lam = max(scores, key=lambda v: scores[v][:-1].mean())  # never chosen on the test block
        r = scores[lam]
        rows.append(f"| +-{k} frames | {lam:g} | {r[:-1].mean():.3f} | {r[:-1].min():.3f} .. {r[:-1].max():.3f} | "
                    f"{r[-1]:.3f} |")
    lines = [f"### {stamp()}", "",
             f"`{args.data.name}`: {len(x)} frames at {ds.fps:g} fps, {x.shape[1]} audio feature dims; test split "
             f"frames {test[0]}..{test[-1]} (the last block).", "",
             "| audio window | ridge lambda | mean r, 10 blocks before the test split | range | r on the test split |",
             "|---|---|---|---|---|", *rows, ""]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        append_entry("## Audio -> mouth ceiling (bench/bench_audio_ceiling.py)", block, intro=(
            "Ridge regression from the offline audio features to the tracked mouth opening, blocked "
            "cross-validation; the mouth-sync targets of issues 4 and 6 are r >= 0.6 / 0.7 on the test split."))


if __name__ == "__main__":
    main()
