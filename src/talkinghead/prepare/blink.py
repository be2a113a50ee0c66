"""Per-frame eye blink in [0, 1] for each eye: our stand-in for OpenFace's AU45 (GaussianTalker Sec. 4.3.2).

The eye aspect ratio (``talkinghead.face.landmarks.eye_aspect_ratio``) is measured on the meshes in
head coordinates (frontalised, so a nod does not read as a blink) and calibrated per clip: the median
is "open" (eyes are open most of the time) and the 0.5th percentile "closed" (a full closure lasts a
frame or two of each blink, so only the lowest few frames of a clip reach it), but never less than
``MIN_CLOSURE`` below open, so a clip without blinks does not turn landmark noise into full blinks.
"""

from __future__ import annotations

import numpy as np

from talkinghead.face.landmarks import eye_aspect_ratio

CLOSED_PERCENTILE = 0.5
MIN_CLOSURE = 0.4  # the closed reference is at most (1 - MIN_CLOSURE) x the open EAR


def blink_values(meshes: np.ndarray) -> np.ndarray:
    """Blink [T, 2] (right, left eye; 0 open .. 1 closed) from head-frame meshes [T, 478, 3]."""
    ear = eye_aspect_ratio(meshes)  # [T, 2]
    open_ = np.median(ear, axis=0)
    closed = np.minimum(np.percentile(ear, CLOSED_PERCENTILE, axis=0), open_ * (1.0 - MIN_CLOSURE))
    return np.clip((open_ - ear) / (open_ - closed), 0.0, 1.0).astype(np.float32)
