"""The person-specific linear face model: our stand-in for the FLAME / BFM expression space.

The papers drive their avatars with 3DMM expression coefficients (DEGSTalk Sec. III-A and
GaussianFlameTalk's FLAME parameters; BFM fitting in the AD-NeRF pre-processing they reuse). Without
those models we build the linear model of the same form, ``mesh = neutral + sum_k e_k B_k``, from the
clip itself (issue 2, step 5):

* meshes: the per-frame mediapipe meshes brought rigidly into head coordinates
  (``pose.align_to_template``), so only non-rigid motion is left;
* neutral: their mean (deviation: the clip's mean face, not a separately fitted rest expression);
* basis: principal components of the centred meshes, keeping the fewest that explain
  ``VARIANCE_KEPT`` of the variance, at most ``MAX_EXPRESSION``; coefficients are the projections
  (so they are zero-mean over the clip and in metres along unit-norm basis meshes);
* triangles: the mediapipe face-mesh triangulation, recovered from its tessellation edge list
  (every 3-clique of the edge graph, minus the few cliques that are not faces) and wound so normals
  point out of the face.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from talkinghead.data import FaceModel

VARIANCE_KEPT = 0.98
MAX_EXPRESSION = 32


def _tessellation() -> frozenset:
    """mediapipe's FACEMESH_TESSELATION edge list, read from its plain-Python module without importing
    mediapipe itself (which takes seconds), so a cached ``prepare`` stage stays fast."""
    import importlib.util
    import runpy

    spec = importlib.util.find_spec("mediapipe")
    if spec is None or spec.origin is None:
        from talkinghead.errors import UserError

        raise UserError("the face mesh triangulation comes from mediapipe: pip install 'talkinghead[prepare]'")
    path = Path(spec.origin).parent / "python" / "solutions" / "face_mesh_connections.py"
    return runpy.run_path(str(path))["FACEMESH_TESSELATION"]


@lru_cache(maxsize=1)
def mesh_triangles() -> np.ndarray:
    """Triangles [F, 3] int32 of the mediapipe face mesh (unwound; see ``orient_triangles``)."""
    edges = {tuple(sorted(e)) for e in _tessellation()}
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]}
    uses: dict[tuple[int, int], int] = {}
    for a, b, c in cliques:
        for e in ((a, b), (b, c), (a, c)):
            uses[e] = uses.get(e, 0) + 1
    # A clique whose three edges each border three cliques is a cycle around faces, not a face itself.
    faces = [t for t in cliques if not all(uses[e] >= 3 for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))]
    return np.array(sorted(faces), dtype=np.int32)


def orient_triangles(triangles: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Wind triangles [F, 3] so their normals point away from the head's centre (vertices [V, 3], head frame)."""
    v = vertices[triangles]  # [F, 3, 3]
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    # The head's centre lies behind the face surface (+z in the head frame) by about a head radius.
    span = vertices[:, 0].max() - vertices[:, 0].min()
    centre = vertices.mean(0) + np.array([0.0, 0.0, 0.5 * span])
    outward = ((v.mean(1) - centre) * normal).sum(1) > 0
    return np.where(outward[:, None], triangles, triangles[:, [0, 2, 1]]).astype(np.int32)


def _top_components(X: np.ndarray, k: int, oversample: int = 10, power_iterations: int = 4,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal axes of centred rows X [N, D]: (eigenvalues of X^T X [k'], unit rows [k', D]).

    Randomised range finder with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1):
    the model needs at most a few dozen components of a 1434-dimensional space, and a full
    eigen-decomposition costs seconds on a long clip. Seeded, so a clip always gives the same model.
    """
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(X @ rng.standard_normal((X.shape[1], min(k + oversample, min(X.shape)))))[0]
    for _ in range(power_iterations):
        Q = np.linalg.qr(X @ (X.T @ Q))[0]
    _, S, Vt = np.linalg.svd(Q.T @ X, full_matrices=False)
    w = S[:k] ** 2
    keep = w > (w[0] * 1e-12 if len(w) else 0)
    return w[keep], Vt[:k][keep]


def fit_face_model(meshes: np.ndarray, triangles: np.ndarray, variance_kept: float = VARIANCE_KEPT,
                   max_expression: int = MAX_EXPRESSION) -> tuple[FaceModel, np.ndarray, float]:
    """PCA face model of aligned meshes [T, V, 3] (head coordinates).

    Returns (model, expression coefficients [T, E], fraction of the variance the E components explain).
    """
    T, V, _ = meshes.shape
    X = meshes.reshape(T, -1).astype(np.float64)
    neutral = X.mean(0)
    Xc = X - neutral
    total = float((Xc ** 2).sum())  # total variance (x T): the trace, without an eigen-decomposition
    w, components = _top_components(Xc, min(max_expression, T, 3 * V)) if total > 0 else (np.zeros(0), None)
    if len(w) == 0:  # a perfectly rigid face: no expression space
        E, explained, components = 0, 1.0, np.zeros((0, 3 * V))
    else:
        cumulative = np.cumsum(w) / total
        E = int(min(np.searchsorted(cumulative, variance_kept) + 1, len(w)))
        explained = float(cumulative[E - 1])
    basis = components[:E]  # [E, 3V], orthonormal rows
    coeffs = (Xc @ basis.T).astype(np.float32)
    model = FaceModel(neutral.reshape(V, 3).astype(np.float32), basis.reshape(E, V, 3).astype(np.float32),
                      triangles.astype(np.int32))
    return model, coeffs, explained
