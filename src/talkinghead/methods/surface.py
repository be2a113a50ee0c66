"""Points on a triangle mesh: where both methods place their initial Gaussians on the face model."""

from __future__ import annotations

import numpy as np


def points_on_triangles(verts: np.ndarray, tris: np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One uniform random point on each listed triangle: (points [n, 3], barycentric weights [n, 3]).

    verts: [V, 3]; tris: [n, 3] vertex ids (a triangle listed k times gets k points). Draws 2n numbers
    from ``rng`` (first coordinates, then second), folding the unit square onto the triangle."""
    a, b = rng.random((2, len(tris), 1))
    flip = (a + b) > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    v0, v1, v2 = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    return v0 + a * (v1 - v0) + b * (v2 - v0), np.concatenate([1 - a - b, a, b], 1)
