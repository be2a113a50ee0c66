"""How much of the mouth's motion the audio features can explain: the ceiling every method shares.

Not a test. On a prepared dataset, a ridge regression from per-frame audio features over a window of +-k frames
to the tracked mouth opening (``tracks.mouth_opening``), scored by Pearson r on held-out frames:

* blocked cross-validation: the test split (the last 1/11, as GaussianTalker / ER-NeRF hold out) and the
  frames before it cut into 10 contiguous blocks; each block predicted by a model fitted on the others minus a 10-frame
  margin on each side; the ridge strength is picked by the mean r over those 10 blocks, never by the test split;
* the same model's r on the last block, i.e. on the dataset's test split.

Feature sets (``--sets``): ``today`` = phone posteriors + log-mel + energy (``--audio-encoder none``); ``wL``
= Whisper hidden state L (0 = after the convolutions, 4 = the encoder's output for tiny); ``wA+wB`` = states
side by side; ``wmean`` = the mean of all states; ``+today`` / ``+energy`` add those columns. Whisper states come
from the dataset's ``audio_features.npz`` when it has them, else they are computed from its ``audio.wav`` with
the installed tiny.en (the same offline path as ``prepare``). ``dataset`` = ``PreparedDataset.audio_matrix``,
what the methods consume.

A linear read-out is a lower bound of what a network could extract, but on one minute of one speaker the
methods' networks land close to it (see the GaussianTalker section). Writes a section of bench/RESULTS.md.

    .venv/bin/python bench/bench_audio_ceiling.py DATA [--sets today,w2,...] [--windows 0,2] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from benchlib import append_entry, stamp

FOLDS = 11
MARGIN = 10
WINDOWS = (0, 1, 2, 4)
LAMBDAS = (1e2, 1e3, 3e3, 1e4, 3e4, 1e5)
SETS = "dataset"


def windows(x: np.ndarray, k: int) -> np.ndarray:
    """[T, D] -> [T, (2k+1) D]: rows t-k..t+k side by side (edge rows repeated)."""
    idx = np.clip(np.arange(len(x))[:, None] + np.arange(-k, k + 1)[None], 0, len(x) - 1)
    return x[idx].reshape(len(x), -1)


def blocked_cv(x: np.ndarray, y: np.ndarray, lambdas, test: np.ndarray) -> dict[float, np.ndarray]:
    """Pearson r [FOLDS] per ridge strength of each contiguous block predicted by a ridge fitted on the rest.
    The last block is the ``test`` split; the frames before it make the other FOLDS - 1 blocks. Solved in
    whichever of the primal (D x D) and dual (N x N) forms is smaller, with one eigendecomposition per fold
    for every strength: w = V (S + lambda)^-1 V^T A^T y, or A^T U (S + lambda)^-1 U^T y."""
    T = len(x)
    out = {lam: [] for lam in lambdas}
    for block in np.array_split(np.arange(test[0]), FOLDS - 1) + [test]:
        fit = np.ones(T, bool)
        fit[max(block[0] - MARGIN, 0):block[-1] + MARGIN + 1] = False
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
        a = np.c_[(x - mu) / sd, np.ones(T)]
        af, yf = a[fit], y[fit]
        dual = af.shape[0] < af.shape[1]
        s, v = np.linalg.eigh(af @ af.T if dual else af.T @ af)
        rhs = v.T @ (yf if dual else af.T @ yf)
        for lam in lambdas:
            coef = v @ (rhs / (s + lam))
            w = af.T @ coef if dual else coef
            out[lam].append(np.corrcoef(a[block] @ w, y[block])[0, 1])
    return {lam: np.array(r) for lam, r in out.items()}


def feature_set(name: str, ds, hidden) -> np.ndarray:
    """[T, D] float64 columns of one ``--sets`` entry (module docstring)."""
    if name == "dataset":
        return np.asarray(ds.audio_matrix, np.float64)
    parts = []
    for part in name.split("+"):
        if part == "today":
            parts.append(dataclasses.replace(ds.audio_features, whisper=None).stack())
        elif part == "energy":
            parts.append(dataclasses.replace(ds.audio_features, whisper=None).stack()[:, -1:])
        elif part == "wmean":
            parts.append(hidden().astype(np.float32).mean(axis=1))
        elif part.startswith("w"):
            parts.append(hidden()[:, int(part[1:])].astype(np.float32))
        else:
            raise SystemExit(f"unknown feature set part {part!r}")
    return np.concatenate(parts, axis=1).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--sets", default=SETS, help="comma-separated feature sets (default: %(default)s)")
    ap.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="comma-separated k (frames)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from functools import lru_cache

    from talkinghead.data import PreparedDataset

    ds = PreparedDataset(args.data)

    @lru_cache(maxsize=1)
    def hidden() -> np.ndarray:
        if ds.audio_features.whisper is not None:
            return ds.audio_features.whisper
        from talkinghead.audio.whisper import load_whisper, whisper_features

        return whisper_features(load_whisper(), ds.audio_wave, ds.fps, ds.num_frames)

    y = ds.tracks.mouth_opening.astype(np.float64)
    test = ds.split_indices("test")
    rows = []
    for name in args.sets.split(","):
        x = feature_set(name, ds, hidden)
        for k in (int(v) for v in args.windows.split(",")):
            scores = blocked_cv(windows(x, k), y, LAMBDAS, test)
            lam = max(scores, key=lambda v: scores[v][:-1].mean())  # never chosen on the test block
            r = scores[lam]
            rows.append(f"| {name} | {x.shape[1]} | +-{k} frames | {lam:g} | {r[:-1].mean():.3f} | "
                        f"{r[:-1].min():.3f} .. {r[:-1].max():.3f} | {r[-1]:.3f} |")
            print(rows[-1], flush=True)
    encoder = (ds.meta.get("audio_features") or {}).get("encoder")
    lines = [f"### {stamp()}", "",
             f"`{args.data.name}`: {ds.num_frames} frames at {ds.fps:g} fps; dataset encoder "
             f"{encoder['name'] + ' layers ' + str(encoder['layers']) if encoder else 'none'}; test split "
             f"frames {test[0]}..{test[-1]} (the last block).", "",
             "| features | dims | audio window | ridge lambda | mean r, 10 blocks before the test split | range | "
             "r on the test split |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        append_entry("## Audio -> mouth ceiling (bench/bench_audio_ceiling.py)", block, intro=(
            "Ridge regression from the offline audio features to the tracked mouth opening, blocked "
            "cross-validation; the mouth-sync targets of issues 4 and 6 are r >= 0.6 / 0.7 on the test split."))


if __name__ == "__main__":
    main()
