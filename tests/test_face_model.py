"""The linear face model: mediapipe triangles, PCA that reconstructs the meshes it was fitted to."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from talkinghead.data import FaceModel
from talkinghead.prepare import face_model


def test_triangles_form_a_manifold_surface():
    pytest.importorskip("mediapipe")
    tri = face_model.mesh_triangles()
    assert tri.shape[1] == 3 and tri.dtype == np.int32
    assert tri.min() == 0 and tri.max() == 467  # iris points 468-477 are not in the tessellation
    undirected = Counter(tuple(sorted(e)) for t in tri for e in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
    assert max(undirected.values()) == 2  # the non-face 3-cycles are gone: no edge borders three triangles
    assert len(set(map(tuple, np.sort(tri, 1).tolist()))) == len(tri)


def test_orientation_makes_normals_point_out_of_a_dome():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-1, 1, (50, 2))
    # a dome bulging towards the camera (-z in the head frame), like a face
    dome = np.concatenate([xy, (xy ** 2).sum(1, keepdims=True) - 2.0], 1)
    tri = rng.integers(0, 50, (200, 3)).astype(np.int32)
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])]
    wound = face_model.orient_triangles(tri, dome)
    v = dome[wound]
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    centre = dome.mean(0) + [0, 0, 0.5 * (dome[:, 0].max() - dome[:, 0].min())]
    assert (((v.mean(1) - centre) * normal).sum(1) >= 0).all()
    np.testing.assert_array_equal(np.sort(wound, 1), np.sort(tri, 1))


def test_pca_recovers_a_known_linear_model():
    rng = np.random.default_rng(1)
    V, E, T = 478, 3, 200
    neutral = rng.normal(size=(V, 3)) * 0.05
    basis = rng.normal(size=(E, V, 3)) * 0.01
    coeffs = rng.normal(size=(T, E)) * [3.0, 2.0, 1.0]
    meshes = neutral + np.einsum("te,evc->tvc", coeffs, basis)
    model, fitted, explained = face_model.fit_face_model(meshes, np.zeros((1, 3), np.int32))
    assert model.num_expression == E  # rank 3: the 98% threshold is met at 3 components, no earlier
    assert explained == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(model.vertices(fitted), meshes, atol=1e-5)
    # basis rows are orthonormal and coefficients zero-mean
    flat = model.basis.reshape(E, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(E), atol=1e-5)
    np.testing.assert_allclose(fitted.mean(0), 0, atol=1e-4)


def test_expression_count_is_capped():
    rng = np.random.default_rng(2)
    meshes = rng.normal(size=(100, 478, 3))  # full-rank noise: every component is needed
    model, fitted, explained = face_model.fit_face_model(meshes, np.zeros((1, 3), np.int32), max_expression=8)
    assert model.num_expression == 8 and fitted.shape == (100, 8)
    assert explained < 0.98


def test_vertices_accepts_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    model = FaceModel(rng.normal(size=(478, 3)).astype(np.float32), rng.normal(size=(4, 478, 3)).astype(np.float32),
                      np.zeros((1, 3), np.int32))
    e = rng.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(model.vertices(torch.from_numpy(e)).numpy(), model.vertices(e), atol=1e-5)


def _eye_meshes(ear: np.ndarray) -> np.ndarray:
    """Meshes [T, 478, 3] whose two eyes have the eye aspect ratios ear [T]."""
    from talkinghead.face.landmarks import LEFT_EYE, RIGHT_EYE

    meshes = np.zeros((len(ear), 478, 3), np.float32)
    for p1, p2, p3, p4, p5, p6 in (RIGHT_EYE, LEFT_EYE):
        meshes[:, p4, 0] = 1.0
        for top, bottom, x in ((p2, p6, 0.3), (p3, p5, 0.7)):
            meshes[:, top, :2] = np.stack([np.full_like(ear, x), -ear / 2], 1)
            meshes[:, bottom, :2] = np.stack([np.full_like(ear, x), ear / 2], 1)
    return meshes


def test_blink_is_calibrated_per_clip():
    from talkinghead.face.landmarks import blink_values, eye_aspect_ratio

    rng = np.random.default_rng(6)
    ear = 0.30 + rng.normal(0, 0.005, 200)
    ear[50:54] = [0.2, 0.08, 0.08, 0.2]  # one blink
    meshes = _eye_meshes(ear)
    np.testing.assert_allclose(eye_aspect_ratio(meshes)[:, 0], ear, rtol=1e-5)
    blink = blink_values(meshes)
    assert blink.shape == (200, 2) and blink.dtype == np.float32 and blink.min() >= 0 and blink.max() <= 1
    assert (blink[51:53] > 0.95).all() and 0.3 < blink[50, 0] < 0.7
    assert np.median(blink) < 0.05
    # a person with narrower eyes: the same blink reads the same after calibration
    np.testing.assert_allclose(blink_values(_eye_meshes(ear * 0.7)), blink, atol=1e-4)
    # no blink in the clip: noise stays noise, not full blinks
    calm = blink_values(_eye_meshes(0.30 + rng.normal(0, 0.005, 200)))
    assert calm.max() < 0.2


def test_blink_against_a_reference():
    from talkinghead.face.landmarks import blink_values

    rng = np.random.default_rng(7)
    ear = 0.30 + rng.normal(0, 0.005, 100)
    ear[40:44] = [0.2, 0.08, 0.08, 0.2]
    reference = _eye_meshes(ear)
    np.testing.assert_array_equal(blink_values(reference, reference=reference), blink_values(reference))
    # half-closed eyes throughout: calibrated on the reference they read as half a blink, not as open
    squint = blink_values(_eye_meshes(ear * 0.5 + 0.075), reference=reference)
    assert 0.3 < np.median(squint) < 0.7
    assert np.median(blink_values(_eye_meshes(ear * 0.5 + 0.075))) < 0.05  # (its own calibration hides it)
    # frames without a face: NaN rows, left out of the calibration
    holes = reference.copy()
    holes[10] = np.nan
    out = blink_values(holes)
    assert np.isnan(out[10]).all() and np.isfinite(np.delete(out, 10, axis=0)).all()
