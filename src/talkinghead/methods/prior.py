"""Closed-form linear audio priors: ridge maps from audio rows to face-model coefficients, shared by the methods.

A few thousand training frames are too few for a network to find the linear part of audio -> mouth on its own
(FlameTalk's transformer and GaussianTalker's attention both stayed below a ridge on the same Whisper rows,
bench/RESULTS.md, issue 10); a method fits this map once, in closed form, and keeps it frozen.
"""

from __future__ import annotations

import numpy as np


def fit_linear_prior(z: np.ndarray, y: np.ndarray, lambdas,
                     blocks: int = 5) -> tuple[np.ndarray, float, np.ndarray]:
    """Ridge map z [T, K] (last column the constant) -> y [T, S], its strength chosen by blocked
    cross-validation over ``blocks`` contiguous blocks (smallest held-out squared error; the constant is not
    penalised). Returns (weight [K, S], the chosen lambda, the out-of-fold predictions [T, S] at that lambda:
    each block's by the map fitted on the other blocks)."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    K = z.shape[1]
    pen = np.eye(K)
    pen[-1, -1] = 0.0
    fold = np.arange(len(z)) * blocks // len(z)
    # Per-block Gram matrices and moments, once: the fit without block b is the total minus b's.
    gram = [z[fold == b].T @ z[fold == b] for b in range(blocks)]
    moment = [z[fold == b].T @ y[fold == b] for b in range(blocks)]
    G, M = sum(gram), sum(moment)
    held_out = []  # per lambda: [T, S] out-of-fold predictions
    for lam in lambdas:
        pred = np.zeros_like(y)
        for b in range(blocks):
            pred[fold == b] = z[fold == b] @ np.linalg.solve(G - gram[b] + lam * pen, M - moment[b])
        held_out.append(pred)
    best = int(np.argmin([((pred - y) ** 2).sum() for pred in held_out]))
    lam = float(lambdas[best])
    return np.linalg.solve(G + lam * pen, M), lam, held_out[best]
