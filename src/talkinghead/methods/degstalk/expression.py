"""DEGSTalk's face-model inputs: the implicit expression coefficients f_e and the jaw target of L_jaw.

The paper takes f_e = {psi_id, psi_s, psi_exp, psi_eye} from SMIRK (FLAME) and supervises a jaw head with
psi_jaw (sec. II-B, eq. 8). We have the dataset's person-specific linear face model (neutral + PCA basis of
mediapipe's 478-point mesh) and its per-frame tracked expression instead:

* :func:`upper_face_projection` -> f_e's input: the expression's effect on the *upper face* (eyes, brows,
  forehead: the vertices above the eye line), reduced to its ``k`` main directions over the training frames
  and scaled to unit variance, plus the two blink values; a small MLP (model.py) maps them to f_e.
  Deviation, and why: with new audio the coefficients come from the replayed source frame, and self-driven
  from the test frame itself, so the mouth part of psi_exp would drive the lips from the video rather than
  the audio (and leak the true mouth into the self-driven metrics). Identity and shape are constant for one
  person's model, so they carry nothing here.
* :func:`jaw_functional` -> L_jaw's target: the inner-lip gap (mm, head frame y between the inner-lip
  centre landmarks 13 and 14) of the tracked expression, a linear function of it, standing in for psi_jaw.
"""

from __future__ import annotations

import numpy as np

from talkinghead.face.landmarks import LEFT_EYE, RIGHT_EYE

UPPER_LIP, LOWER_LIP = 13, 14  # mediapipe: centre of the inner upper / lower lip


def upper_face_vertices(neutral: np.ndarray) -> np.ndarray:
    """Indices of the vertices at or above the eyes: y (head frame, y down) below the eyes' lowest point."""
    eyes = neutral[list(RIGHT_EYE) + list(LEFT_EYE)]
    return np.flatnonzero(neutral[:, 1] <= eyes[:, 1].max())


def upper_face_projection(neutral: np.ndarray, basis: np.ndarray, expressions: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(mean [E], projection [E, k]) with ``(e - mean) @ projection`` the upper face's k main motion
    coefficients (unit variance over ``expressions`` [T, E]); directions with no motion get zero columns."""
    up = upper_face_vertices(neutral)
    B = basis[:, up, :].reshape(basis.shape[0], -1).astype(np.float64)  # [E, 3 Vu]
    X = np.asarray(expressions, np.float64)
    mean = X.mean(0)
    D = (X - mean) @ B  # [T, 3 Vu] upper-face displacements
    _, S, Vt = np.linalg.svd(D, full_matrices=False)
    proj = np.zeros((basis.shape[0], k))
    n = min(k, len(S))
    std = S[:n] / np.sqrt(max(1, len(X)))
    ok = std > 1e-9
    proj[:, :n][:, ok] = (B @ Vt[:n].T)[:, ok] / std[ok]
    return mean.astype(np.float32), proj.astype(np.float32)


def jaw_functional(neutral: np.ndarray, basis: np.ndarray) -> tuple[float, np.ndarray]:
    """(offset, weights [E]) so that ``offset + e @ weights`` is the inner-lip gap in mm of expression e."""
    offset = (neutral[LOWER_LIP, 1] - neutral[UPPER_LIP, 1]) * 1000.0
    weights = (basis[:, LOWER_LIP, 1] - basis[:, UPPER_LIP, 1]) * 1000.0
    return float(offset), np.asarray(weights, np.float32)
