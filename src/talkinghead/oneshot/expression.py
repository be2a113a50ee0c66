"""The person-agnostic expression space: the paper's 3DMM expression coefficients, built from our meshes.

Paper 003 (sec. III-A) drives everything through 3DMM expression coefficients, which are identity-free
because the morphable model separates identity and expression. Our face model (``prepare``) is per person:
``vertices = neutral + expression @ basis`` with a basis of its own for every clip, so its coefficients mean
different things for different people. Deviation: we build one linear space shared by all identities:

1. every training clip's head-frame meshes ``M_t`` [V, 3] (``FaceModel.vertices(expression_t)``) minus that
   person's own neutral ``N_p`` (the clip's mean face): identity-normalised displacements in the canonical
   head frame (same axes and metric scale for everyone: ``prepare`` puts the outer eye corners 9 cm apart);
2. PCA of the displacements of all clips, each clip weighted equally (at most ``frames_per_clip`` frames
   drawn evenly from each), keeping ``num_components`` directions ``B_k`` [V, 3] (orthonormal in R^{3V});
3. coefficients ``m_k = <M_t - N_p, B_k> / sigma_k``: unit variance over the training data, so the
   paper's coefficient MSE weighs all directions alike.

Identity: the mean of the training neutrals ``N̄`` and a PCA of ``N_p - N̄`` (at most P - 1 directions) give
a tiny identity basis. A single image has no neutral of its own, so its coefficients are the ridge
least-squares fit of ``mesh ~ N̄ + A beta + sigma B m`` (:meth:`ExpressionSpace.fit_mesh`); with a handful of
training identities part of a new person's shape is left in ``m`` (what the ridge on ``m`` limits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from talkinghead.face.landmarks import (LIPS_INNER, LIPS_OUTER, MOUTH_CORNERS, NUM_LANDMARKS)

# Lip vertices the lip-reading head reads (sec. III-C1: "lip vertices segmented from head meshes").
LIP_VERTICES: tuple[int, ...] = tuple(sorted(set(LIPS_OUTER) | set(LIPS_INNER) | set(MOUTH_CORNERS)))


@dataclass
class ExpressionSpace:
    """Shared linear expression model (see the module docstring).

    mean_neutral: [V, 3] mean of the training identities' neutrals (head frame, metres)
    identity_basis: [J, V, 3] orthonormal identity directions (J <= P - 1)
    identity_std: [J] their spread over the training identities
    basis: [K, V, 3] orthonormal expression directions; std: [K] their spread (sigma_k)
    """

    mean_neutral: np.ndarray
    identity_basis: np.ndarray
    identity_std: np.ndarray
    basis: np.ndarray
    std: np.ndarray

    @property
    def num_components(self) -> int:
        return int(self.basis.shape[0])

    def displacement(self, coefficients):
        """[..., V, 3] displacement of coefficients [..., K] (numpy or torch)."""
        if hasattr(coefficients, "new_tensor"):
            import torch

            b = torch.as_tensor(self.basis * self.std[:, None, None], dtype=coefficients.dtype,
                                device=coefficients.device)
            return torch.einsum("...k,kvc->...vc", coefficients, b)
        return np.einsum("...k,kvc->...vc", np.asarray(coefficients, np.float32), self.basis * self.std[:, None, None])

    def mesh(self, coefficients):
        """[..., V, 3]: the mean identity with these expression coefficients."""
        d = self.displacement(coefficients)
        if hasattr(d, "new_tensor"):
            return d + d.new_tensor(self.mean_neutral)
        return self.mean_neutral + d

    def project(self, displacements: np.ndarray) -> np.ndarray:
        """Coefficients [..., K] of identity-normalised displacements [..., V, 3]."""
        flat = np.asarray(displacements, np.float64).reshape(*displacements.shape[:-2], -1)
        return (flat @ self.basis.reshape(self.num_components, -1).T.astype(np.float64) / self.std).astype(np.float32)

    def clip_coefficients(self, face_model, expression: np.ndarray) -> np.ndarray:
        """[T, K] coefficients of a prepared clip: its meshes minus its own neutral, projected."""
        return self.project(face_model.vertices(expression) - face_model.neutral)

    def fit_mesh(self, mesh: np.ndarray, ridge_identity: float = 1.0, ridge_expression: float = 0.05) -> np.ndarray:
        """Coefficients [K] of one head-frame mesh [V, 3] of an unknown person (no neutral of its own).

        Ridge least squares of ``mesh - N̄ = sum_j b_j s_j A_j + sum_k m_k sigma_k B_k`` (coefficients in units of
        their spread) with penalties ``ridge_identity * s_j^2 * b_j^2`` and ``ridge_expression * sigma_k^2 * m_k^2``:
        were the columns orthogonal, each coefficient would shrink by ``1 / (1 + ridge)``.
        """
        r = (np.asarray(mesh, np.float64) - self.mean_neutral).reshape(-1)
        cols = [self.identity_basis.reshape(len(self.identity_std), -1).T * self.identity_std,
                self.basis.reshape(self.num_components, -1).T * self.std]
        X = np.concatenate(cols, axis=1).astype(np.float64)  # [3V, J + K]
        pen = np.concatenate([np.full(len(self.identity_std), ridge_identity),
                              np.full(self.num_components, ridge_expression)]) * (X ** 2).sum(0)
        sol = np.linalg.solve(X.T @ X + np.diag(pen), X.T @ r)
        return sol[len(self.identity_std):].astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(path, mean_neutral=self.mean_neutral, identity_basis=self.identity_basis,
                 identity_std=self.identity_std, basis=self.basis, std=self.std)

    @classmethod
    def load(cls, path: Path) -> "ExpressionSpace":
        with np.load(path) as z:
            return cls(**{k: z[k].astype(np.float32) for k in
                          ("mean_neutral", "identity_basis", "identity_std", "basis", "std")})

    def to_tensors(self) -> dict:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in
                ("mean_neutral", "identity_basis", "identity_std", "basis", "std")}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "ExpressionSpace":
        return cls(**{k: tensors[k].detach().cpu().numpy().astype(np.float32) for k in
                      ("mean_neutral", "identity_basis", "identity_std", "basis", "std")})


def _pca(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal directions [k, D] (rows, orthonormal) and standard deviations [k] of centred rows X [N, D]."""
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    k = min(k, Vt.shape[0])
    return Vt[:k], S[:k] / np.sqrt(max(1, len(X)))


def build_expression_space(face_models: list, expressions: list[np.ndarray], num_components: int = 16,
                           frames_per_clip: int = 400) -> ExpressionSpace:
    """The shared space of P clips: their ``FaceModel``s and expression tracks [T_p, E_p] (module docstring)."""
    if not face_models:
        raise ValueError("the expression space needs at least one clip")
    neutrals = np.stack([fm.neutral for fm in face_models]).astype(np.float64)  # [P, V, 3]
    V = neutrals.shape[1]
    rows = []
    for fm, expr in zip(face_models, expressions):
        pick = np.unique(np.linspace(0, len(expr) - 1, min(frames_per_clip, len(expr))).round().astype(int))
        d = (fm.vertices(expr[pick]) - fm.neutral).reshape(len(pick), -1).astype(np.float64)
        rows.append(d / np.sqrt(len(pick)))  # each clip weighs the same in the PCA
    X = np.concatenate(rows) * np.sqrt(sum(len(r) for r in rows) / len(rows))
    basis, std = _pca(X, num_components)  # each clip is centred on its own neutral (its mean face) already
    std = np.maximum(std, 1e-6)
    mean_neutral = neutrals.mean(0)
    ids = (neutrals - mean_neutral).reshape(len(neutrals), -1)
    if len(neutrals) > 1:
        id_basis, id_std = _pca(ids, len(neutrals) - 1)
        keep = id_std > 1e-7
        id_basis, id_std = id_basis[keep], id_std[keep]
    else:
        id_basis, id_std = np.zeros((0, V * 3)), np.zeros(0)
    return ExpressionSpace(mean_neutral=mean_neutral.astype(np.float32),
                           identity_basis=id_basis.reshape(-1, V, 3).astype(np.float32),
                           identity_std=id_std.astype(np.float32),
                           basis=basis.reshape(-1, V, 3).astype(np.float32), std=std.astype(np.float32))
