"""Mediapipe face mesh (478 points, refined lips and irises) and measurements taken from it.

Landmarks are float32 [478, 3]: x, y in continuous pixel coordinates of the frame (see
``talkinghead.camera``), z in the same pixel scale (mediapipe's relative depth, smaller = closer).
A missing face is a row of NaN. ``prepare`` and ``eval`` both measure mouth opening and blinks
through the functions here, so a figure means the same thing in both.

mediapipe is imported lazily: the rest of the package runs where it is not installed.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO

import numpy as np

NUM_LANDMARKS = 478

# Index sets of the canonical mediapipe mesh. "Left"/"right" are the subject's own.
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
# The inner-lip ring's two arcs without its corners (78, 308): upper 415 .. 191, lower 95 .. 324.
LIPS_INNER_UPPER, LIPS_INNER_LOWER = LIPS_INNER[11:], LIPS_INNER[1:10]
MOUTH_CORNERS = (61, 291)
RIGHT_EYE = (33, 160, 158, 133, 153, 144)  # outer, upper x2, inner, lower x2 (EAR order p1..p6)
LEFT_EYE = (263, 387, 385, 362, 380, 373)
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
RIGHT_IRIS, LEFT_IRIS = tuple(range(468, 473)), tuple(range(473, 478))
NOSE_TIP = 1
NOSE = (1, 2, 4, 5, 6, 19, 94, 168, 195, 197)
CHIN = 152
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
# Lips and chin/jaw line: the vertices whose tracked motion is the speech-driven part of the face (GaussianTalker's
# geometry loss, Talk3D's lip code supervise them).
MOUTH_VERTICES = tuple(sorted(set(LIPS_OUTER + LIPS_INNER + (152, 148, 176, 149, 150, 377, 400, 378, 379))))


def interocular(lm: np.ndarray) -> np.ndarray:
    """Outer-eye-corner distance [...] in pixels: the scale every landmark distance is normalised by."""
    return np.linalg.norm(lm[..., LEFT_EYE_OUTER, :2] - lm[..., RIGHT_EYE_OUTER, :2], axis=-1)


def mouth_opening(lm: np.ndarray) -> np.ndarray:
    """Inner-lip gap divided by the interocular distance [...]; ~0 closed, ~0.3-0.5 wide open."""
    gap = np.linalg.norm(lm[..., UPPER_LIP_INNER, :2] - lm[..., LOWER_LIP_INNER, :2], axis=-1)
    return gap / interocular(lm)


def eye_aspect_ratio(lm: np.ndarray) -> np.ndarray:
    """Eye aspect ratio (Soukupova & Cech 2016) of the [..., 2] (right, left) eyes; drops to ~0 in a blink."""
    out = []
    for p1, p2, p3, p4, p5, p6 in (RIGHT_EYE, LEFT_EYE):
        v = np.linalg.norm(lm[..., p2, :2] - lm[..., p6, :2], axis=-1) + np.linalg.norm(
            lm[..., p3, :2] - lm[..., p5, :2], axis=-1)
        h = np.linalg.norm(lm[..., p1, :2] - lm[..., p4, :2], axis=-1)
        out.append(v / (2.0 * h))
    return np.stack(out, axis=-1)


BLINK_CLOSED_PERCENTILE = 0.5
BLINK_MIN_CLOSURE = 0.4  # the closed reference is at most (1 - BLINK_MIN_CLOSURE) x the open EAR


def blink_calibration(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open and closed eye aspect ratios [2] each (right, left eye) of the landmarks ``reference`` [T, 478, 3].

    Open = the median EAR (eyes are open most of the time); closed = the ``BLINK_CLOSED_PERCENTILE``-th
    percentile (a full closure lasts a frame or two of each blink, so only the lowest few frames of a clip
    reach it), but never less than ``BLINK_MIN_CLOSURE`` below open, so a clip without blinks does not turn
    landmark noise into full blinks. Rows with NaN (no face) are left out.
    """
    ear = eye_aspect_ratio(reference).reshape(-1, 2)
    ear = ear[np.isfinite(ear).all(axis=-1)]
    if not len(ear):
        raise ValueError("blink calibration needs at least one frame with a face")
    open_ = np.median(ear, axis=0)
    closed = np.minimum(np.percentile(ear, BLINK_CLOSED_PERCENTILE, axis=0), open_ * (1.0 - BLINK_MIN_CLOSURE))
    return open_, closed


def blink_values(lm: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Blink float32 [T, 2] (right, left eye; 0 open .. 1 closed) of landmarks ``lm`` [T, 478, 3]: the project's
    one definition of a blink, our stand-in for OpenFace's AU45 (GaussianTalker Sec. 4.3.2).

    The eye aspect ratio mapped linearly from the open (0) to the closed (1) EAR of ``reference`` [T', 478, 3]
    (:func:`blink_calibration`; default ``lm`` itself: per-clip calibration, so people with narrower eyes read
    the same), clipped to [0, 1]; NaN where ``lm`` has no face. ``prepare`` measures it on head-frame meshes
    (frontalised, so a nod does not read as a blink); ``eval`` on image landmarks of a prediction with the
    ground truth as ``reference``, so a prediction whose eyes never open or close as far is not calibrated
    into agreement.
    """
    open_, closed = blink_calibration(lm if reference is None else reference)
    ear = eye_aspect_ratio(lm)
    return np.clip((open_ - ear) / (open_ - closed), 0.0, 1.0).astype(np.float32)


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@contextmanager
def quiet_native_stderr() -> Iterator[TextIO]:
    """Silence what native code writes to file descriptor 2 inside the block; yields the real stderr.

    mediapipe's C++ side (TFLite, absl logging) prints a few lines when a graph starts and around its
    first inferences, from its own threads, whatever GLOG_minloglevel says. Inside the block descriptor 2
    goes to /dev/null; write progress bars to the yielded stream, which still reaches the terminal.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        os.dup2(devnull, 2)
        yield real
    finally:
        sys.stderr.flush()
        _flush_c_stdio()  # native lines may sit in a C stdio buffer until exit otherwise
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        real.close()


class FaceMesh:
    """Mediapipe face mesh in video mode (it tracks between frames). Use as a context manager.

    ``detect(image)`` returns every face found as a list of [478, 3] arrays.
    """

    def __init__(self, max_faces: int = 2, video_mode: bool = True, min_confidence: float = 0.5):
        os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ logging would clutter stderr
        try:
            import mediapipe as mp
        except ImportError:  # the GPU box runs train/render on prepared datasets without mediapipe
            from talkinghead.errors import UserError

            raise UserError("face tracking needs mediapipe: pip install 'talkinghead[prepare]'") from None
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video_mode, max_num_faces=max_faces, refine_landmarks=True,
            min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence)

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        h, w = image.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(image))
        faces = []
        for face in result.multi_face_landmarks or ():
            xyz = np.array([(p.x * w, p.y * h, p.z * w) for p in face.landmark], dtype=np.float32)
            faces.append(xyz)
        return faces

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bbox_area(lm: np.ndarray) -> float:
    span = lm[:, :2].max(0) - lm[:, :2].min(0)
    return float(span[0] * span[1])


def track(frames: Iterable[np.ndarray], progress: bool = False, total: int | None = None) -> np.ndarray:
    """Landmarks of one person through a clip: float32 [T, 478, 3], NaN rows where no face was found.

    With several faces in view, the person is the largest face at first sight and then, frame after
    frame, the face whose landmarks lie closest to the last ones kept (one identity, not whoever is
    biggest in each frame). When the first frame shows a single face, the mesh tracks one face only:
    mediapipe then follows it from frame to frame instead of also running its face detector on every
    frame to look for a second one (about a third of the per-frame cost).
    """
    import itertools

    from tqdm import tqdm

    rows: list[np.ndarray] = []
    last: np.ndarray | None = None
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        return np.zeros((0, NUM_LANDMARKS, 3), np.float32)
    with quiet_native_stderr() as stderr:
        with FaceMesh(max_faces=4, video_mode=False) as probe:
            crowd = len(probe.detect(first))
        with FaceMesh(max_faces=1 if crowd <= 1 else 2) as mesh:
            for image in tqdm(itertools.chain([first], frames), total=total, desc="face mesh", unit="frame",
                              disable=not progress, file=stderr):
                faces = mesh.detect(image)
                if not faces:
                    rows.append(np.full((NUM_LANDMARKS, 3), np.nan, np.float32))
                    continue
                if last is None:
                    pick = max(faces, key=_bbox_area)
                else:
                    pick = min(faces, key=lambda f: float(np.mean(np.linalg.norm(f[:, :2] - last[:, :2], axis=-1))))
                rows.append(pick)
                last = pick
    return np.stack(rows)
