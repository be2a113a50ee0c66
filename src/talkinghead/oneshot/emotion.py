"""Emotion labels, the default emotion control (FACS prototypes) and expression measurements on landmarks.

Paper 003 controls emotion through the mapper M_e trained with a CLIP loss (sec. III-C3); CLIP weights
cannot be had offline, and emotion-labelled clips (MEAD) are not part of the shared data. So the *default*
emotion control, which works in every model without either, is:

    every generated coefficient frame m_t becomes m_t + intensity * Δm_e,

where Δm_e is the projection onto the shared expression space (:mod:`.expression`) of a displacement field
on the mean face built from the emotion's FACS prototype (EMFACS): happy = AU6 + AU12, sad = AU1 + AU4 +
AU15, surprised = AU1 + AU2 + AU5 + AU26, fear = AU1 + AU2 + AU4 + AU5 + AU7 + AU20 + AU26, angry = AU4 + AU5
+ AU7 + AU23, disgusted = AU9 + AU15 + AU16, contempt = AU12 + AU14 on the subject's right side only, neutral
= nothing. Each action unit is a hand-set displacement (millimetres, head frame: x to the subject's left, y
down, z into the head) of its landmarks, spread smoothly to the vertices around them. The offset acts
through the motion path (E_m -> G), so its visible effect is limited to what the shared space spans and
what the generator learnt to render from the training clips; the bench measures it on the renders.
When the model has a trained M_e (``oneshot train --mead``), ``--emotion`` also drives M_e with the label.
"""

from __future__ import annotations

import numpy as np

from talkinghead.errors import UserError
from talkinghead.face.landmarks import LEFT_EYE, RIGHT_EYE, eye_aspect_ratio, interocular

# MEAD's eight emotion folders, in MEAD's own spelling.
EMOTIONS: tuple[str, ...] = ("neutral", "angry", "contempt", "disgusted", "fear", "happy", "sad", "surprised")

# Landmark sets, subject's right (R) and left (L) side.
_BROW_INNER = {"R": (107, 66, 55, 65), "L": (336, 296, 285, 295)}
_BROW_OUTER = {"R": (70, 63, 46, 53, 105, 52), "L": (300, 293, 276, 283, 334, 282)}
_UPPER_LID = {"R": (159, 158, 157, 160, 161, 246), "L": (386, 385, 384, 387, 388, 466)}
_LOWER_LID = {"R": (145, 144, 153, 154, 163, 7), "L": (374, 373, 380, 381, 390, 249)}
_CHEEK = {"R": (117, 118, 50, 101, 205, 123), "L": (346, 347, 280, 330, 425, 352)}
_CORNER = {"R": (61, 146, 185), "L": (291, 375, 409)}
_NOSE_SIDE = {"R": (49, 48, 129, 102), "L": (279, 278, 358, 331)}
_UPPER_LIP = (0, 37, 39, 267, 269, 13, 82, 81, 311, 312)
_LOWER_LIP = (17, 84, 181, 314, 405, 14, 87, 178, 317, 402)
_CHIN = (152, 148, 176, 377, 400, 175, 199, 200, 18)

# AU -> [(landmarks by side or both, displacement mm for the subject's right side; x is mirrored on the left)]
_AUS: dict[int, list[tuple[dict | tuple, tuple[float, float, float]]]] = {
    1: [(_BROW_INNER, (0.0, -4.0, 0.0))],  # inner brow raiser
    2: [(_BROW_OUTER, (0.0, -4.0, 0.0))],  # outer brow raiser
    4: [(_BROW_INNER, (2.0, 3.0, 0.0)), (_BROW_OUTER, (1.0, 2.0, 0.0))],  # brow lowerer (down, to the midline)
    5: [(_UPPER_LID, (0.0, -2.0, 0.0))],  # upper lid raiser
    6: [(_CHEEK, (0.0, -2.5, -1.0)), (_LOWER_LID, (0.0, -1.5, 0.0))],  # cheek raiser
    7: [(_LOWER_LID, (0.0, -1.5, 0.0))],  # lid tightener
    9: [(_NOSE_SIDE, (0.0, -2.0, 0.0)), (_UPPER_LIP, (0.0, -1.0, 0.0))],  # nose wrinkler
    12: [(_CORNER, (-3.0, -4.0, 0.0))],  # lip corner puller (up and out)
    14: [(_CORNER, (1.5, 0.0, 2.0))],  # dimpler (corners in and back)
    15: [(_CORNER, (0.0, 3.5, 0.0))],  # lip corner depressor
    16: [(_LOWER_LIP, (0.0, 2.0, 0.0))],  # lower lip depressor
    20: [(_CORNER, (-3.0, 0.5, 0.0))],  # lip stretcher
    23: [(_UPPER_LIP, (0.0, 1.0, 0.0)), (_LOWER_LIP, (0.0, -1.0, 0.0)), (_CORNER, (1.0, 0.0, 0.0))],
    26: [(_LOWER_LIP, (0.0, 7.0, 0.0)), (_CHIN, (0.0, 8.0, 0.0))],  # jaw drop
}

# EMFACS prototypes; "R" marks an AU on the subject's right side only.
PROTOTYPES: dict[str, list[tuple[int, str]]] = {
    "neutral": [],
    "happy": [(6, "RL"), (12, "RL")],
    "sad": [(1, "RL"), (4, "RL"), (15, "RL")],
    "surprised": [(1, "RL"), (2, "RL"), (5, "RL"), (26, "RL")],
    "fear": [(1, "RL"), (2, "RL"), (4, "RL"), (5, "RL"), (7, "RL"), (20, "RL"), (26, "RL")],
    "angry": [(4, "RL"), (5, "RL"), (7, "RL"), (23, "RL")],
    "disgusted": [(9, "RL"), (15, "RL"), (16, "RL")],
    "contempt": [(12, "R"), (14, "R")],
}
FALLOFF_M = 0.008  # how far (metres) an AU's pull spreads from its landmarks to the vertices around them


def check_emotion(label: str) -> str:
    if label not in EMOTIONS:
        raise UserError(f"unknown emotion {label!r} (MEAD's labels: {', '.join(EMOTIONS)})")
    return label


def emotion_weights(label: str) -> np.ndarray:
    """One-hot [len(EMOTIONS) - 1] label weights for M_e (neutral is all zeros: M_e leaves the code)."""
    check_emotion(label)
    w = np.zeros(len(EMOTIONS) - 1, np.float32)
    if label != "neutral":
        w[EMOTIONS.index(label) - 1] = 1.0
    return w


def prototype_displacement(mean_face: np.ndarray, label: str) -> np.ndarray:
    """[V, 3] displacement (metres) of the FACS prototype of ``label`` on ``mean_face`` [V, 3]."""
    check_emotion(label)
    V = len(mean_face)
    out = np.zeros((V, 3), np.float64)
    for au, sides in PROTOTYPES[label]:
        for points, mm in _AUS[au]:
            groups = ([(points[s], s) for s in sides] if isinstance(points, dict)
                      else [(points, "RL" if len(sides) == 2 else sides)])
            for idx, side in groups:
                d = np.asarray(mm, np.float64) / 1000.0
                if side == "L":
                    d = d * np.array([-1.0, 1.0, 1.0])
                src = mean_face[list(idx)]
                dist = np.linalg.norm(mean_face[:, None] - src[None], axis=-1).min(1)
                w = np.exp(-0.5 * (dist / FALLOFF_M) ** 2)
                if side == "RL" and not isinstance(points, dict):
                    # midline groups (lips, chin) pull both halves; x mirrors about the midline
                    sign = np.where(mean_face[:, 0] < 0, 1.0, -1.0)
                    out += w[:, None] * d[None] * np.stack([sign, np.ones(V), np.ones(V)], 1)
                else:
                    out += w[:, None] * d[None]
    return out.astype(np.float32)


def emotion_offsets(space) -> dict[str, np.ndarray]:
    """Δm_e [K] for every label: the prototype displacement projected onto the shared space."""
    return {e: space.project(prototype_displacement(space.mean_neutral, e)) for e in EMOTIONS}


# ---------------------------------------------------------------------------------------------- measurement

_LIP_CENTRE = (0, 17)  # upper and lower outer lip middle
_BROWS = _BROW_INNER["R"] + _BROW_OUTER["R"] + _BROW_INNER["L"] + _BROW_OUTER["L"]


def expression_measures(lm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame measurements [T] of image landmarks [T, 478, 3], each divided by the interocular distance:

    ``mouth_corner_lift``: how far the mouth corners sit above the lips' vertical centre (up = positive);
    ``brow_raise``: the brows' height above the eye centres; ``eye_opening``: the mean eye aspect ratio.
    """
    io = interocular(lm)
    centre_y = lm[:, list(_LIP_CENTRE), 1].mean(1)
    corners_y = lm[:, [61, 291], 1].mean(1)
    eyes_y = lm[:, list(RIGHT_EYE) + list(LEFT_EYE), 1].mean(1)
    brows_y = lm[:, list(_BROWS), 1].mean(1)
    return {"mouth_corner_lift": (centre_y - corners_y) / io, "brow_raise": (eyes_y - brows_y) / io,
            "eye_opening": eye_aspect_ratio(lm).mean(-1)}
