"""Face tracking through a clip: one identity, short detection gaps filled, long ones refused.

The papers track with OpenFace / BFM fitting; we track mediapipe's 478-point face mesh on every frame
(``talkinghead.face.landmarks.track``, which keeps the largest face at first sight and then the face
nearest to the last one kept) and close the gaps the detector leaves here.
"""

from __future__ import annotations

import numpy as np

from talkinghead.errors import UserError


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, stop) ranges where the bool array ``mask`` [T] is True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def fill_gaps(landmarks: np.ndarray, fps: float, max_gap_s: float = 0.5,
              source: str = "the video") -> tuple[np.ndarray, np.ndarray]:
    """Interpolate missing frames of ``landmarks`` [T, 478, 3] (NaN rows where no face was found).

    Gaps up to ``max_gap_s`` are filled linearly between the frames around them (held from the
    nearest tracked frame at the clip's ends). Returns (filled [T, 478, 3], tracked [T] bool).
    Raises UserError naming the frames when no face is found at all or a gap is longer.
    """
    tracked = ~np.isnan(landmarks).any(axis=(1, 2))
    if not tracked.any():
        raise UserError(f"no face found in {source}")
    max_gap = max(1, int(round(max_gap_s * fps)))
    long_gaps = [(a, b) for a, b in _runs(~tracked) if b - a > max_gap]
    if long_gaps:
        listed = ", ".join(f"{a}-{b - 1} ({a / fps:.1f}-{b / fps:.1f} s)" for a, b in long_gaps[:5])
        more = f" and {len(long_gaps) - 5} more" if len(long_gaps) > 5 else ""
        raise UserError(f"no face found in frames {listed}{more} of {source}: gaps longer than {max_gap_s:g} s "
                        "cannot be interpolated; cut them out of the video")
    t = np.arange(len(landmarks))
    flat = landmarks.reshape(len(landmarks), -1)
    filled = flat.copy()
    if not tracked.all():
        known = np.flatnonzero(tracked)
        for j in range(flat.shape[1]):  # np.interp holds the end values, as wanted
            filled[~tracked, j] = np.interp(t[~tracked], known, flat[known, j])
    return filled.reshape(landmarks.shape).astype(np.float32), tracked
