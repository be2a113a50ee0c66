"""Speech-related expression coefficients and closed-form linear maps from audio to them.

Shared by the methods that read the person's face model from audio: FlameTalk's linear prior
(:mod:`talkinghead.methods.gaussianflametalk.flametalk`) and GaussianTalker's expression readout
(:mod:`talkinghead.methods.gaussiantalker.model`). Both fit a ridge map on the training frames in closed form,
its strength by blocked cross-validation, and train the network on top of it with the map's *out-of-fold*
predictions (the in-sample fit is better on the training frames than it will be on new audio, and a network
trained on it learns to trust it too much: bench/RESULTS.md, "FlameTalk over seeds and settings").

"Speech-related" for a PCA basis. FLAME separates jaw pose from expression; our PCA components mix regions.
Component e is speech-related when the share of its displacement energy on the mouth/jaw region (every vertex
below the nose tip along the nose -> chin direction, see :func:`mouth_jaw_region`) is at least ``min_share``;
the largest such shares are taken first and at most ``max_count`` kept.
"""

from __future__ import annotations

import numpy as np

from talkinghead.face.landmarks import CHIN, NOSE_TIP


def mouth_jaw_region(neutral: np.ndarray) -> np.ndarray:
    """Bool [V]: vertices of the mouth and jaw, i.e. below the nose tip along the nose -> chin axis.

    neutral: [V, 3] with mediapipe numbering (vertex j = landmark j).
    """
    down = neutral[CHIN] - neutral[NOSE_TIP]
    down = down / np.linalg.norm(down)
    return (neutral - neutral[NOSE_TIP]) @ down > 0.0


def speech_components(neutral: np.ndarray, basis: np.ndarray, min_share: float = 0.5, max_count: int = 12) -> np.ndarray:
    """Indices [S] of the expression components whose displacement lies mostly on the mouth/jaw region.

    basis: [E, V, 3]. Share_e = sum over mouth/jaw vertices of |basis_e,v|^2 / sum over all vertices. Sorted
    by decreasing share; at least one component (the most mouth-centred) is always returned.
    """
    region = mouth_jaw_region(neutral)
    energy = (basis**2).sum(-1)  # [E, V]
    share = energy[:, region].sum(1) / np.maximum(energy.sum(1), 1e-20)
    order = np.argsort(-share, kind="stable")
    keep = [int(e) for e in order if share[e] >= min_share][:max_count]
    return np.array(keep or [int(order[0])], dtype=np.int64)


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

    def solve(rows, lam):
        return np.linalg.solve(z[rows].T @ z[rows] + lam * pen, z[rows].T @ y[rows])

    fold = np.arange(len(z)) * blocks // len(z)
    held_out = []  # per lambda: [T, S] out-of-fold predictions
    for lam in lambdas:
        pred = np.zeros_like(y)
        for b in range(blocks):
            pred[fold == b] = z[fold == b] @ solve(fold != b, lam)
        held_out.append(pred)
    best = int(np.argmin([((pred - y) ** 2).sum() for pred in held_out]))
    lam = float(lambdas[best])
    return solve(np.ones(len(z), bool), lam), lam, held_out[best]


