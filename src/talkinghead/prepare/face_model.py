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

import numpy as np

from talkinghead.data import FaceModel

VARIANCE_KEPT = 0.98
MAX_EXPRESSION = 32


def mesh_triangles() -> np.ndarray:
    """Triangles [F, 3] int32 of the mediapipe face mesh (unwound; see ``orient_triangles``)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    edges = {tuple(sorted(e)) for e in FACEMESH_TESSELATION}
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


def fit_face_model(meshes: np.ndarray, triangles: np.ndarray, variance_kept: float = VARIANCE_KEPT,
                   max_expression: int = MAX_EXPRESSION) -> tuple[FaceModel, np.ndarray, float]:
    """PCA face model of aligned meshes [T, V, 3] (head coordinates).

    Returns (model, expression coefficients [T, E], fraction of the variance the E components explain).
    """
    T, V, _ = meshes.shape
    X = meshes.reshape(T, -1).astype(np.float64)
    neutral = X.mean(0)
    Xc = X - neutral
    # Eigen-decomposition of the smaller Gram / covariance matrix: T may be thousands, 3V is 1434.
    if T <= 3 * V:
        w, U = np.linalg.eigh(Xc @ Xc.T)
        w, U = w[::-1].clip(min=0), U[:, ::-1]
        keep = w > w[0] * 1e-12 if w[0] > 0 else np.zeros_like(w, bool)
        components = (U[:, keep].T @ Xc) / np.sqrt(w[keep])[:, None]
        w = w[keep]
    else:
        w, Vecs = np.linalg.eigh(Xc.T @ Xc)
        w, components = w[::-1].clip(min=0), Vecs[:, ::-1].T
    total = w.sum()
    if total <= 0:  # a perfectly rigid face: no expression space
        E = 0
        explained = 1.0
    else:
        cumulative = np.cumsum(w) / total
        E = int(min(np.searchsorted(cumulative, variance_kept) + 1, max_expression, len(w)))
        explained = float(cumulative[E - 1])
    basis = components[:E]  # [E, 3V], orthonormal rows
    coeffs = (Xc @ basis.T).astype(np.float32)
    model = FaceModel(neutral.reshape(V, 3).astype(np.float32), basis.reshape(E, V, 3).astype(np.float32),
                      triangles.astype(np.int32))
    return model, coeffs, explained
