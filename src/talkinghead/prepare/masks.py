"""Per-frame masks, the background plate and torso-only images: what the methods composite the head over.

The papers parse each frame with a face-parsing network (BiSeNet in AD-NeRF / ER-NeRF, reused by
GaussianTalker, DEGSTalk and TalkingGaussian) into background / torso / neck / hair / face / mouth, build a
background image from the pixels never covered by the person, and train the head over "torso images"
(GaussianTalker Sec. 4.4: the head "is directly splatted onto the combined background and torso image";
DEGSTalk Sec. 3.4 fuses hair, face and mouth renders over them). We have no parsing network offline, so the
labels come from mediapipe selfie segmentation (person vs. background) and face-mesh geometry:

Labels (``docs/dataset.md``): 0 background, 1 torso (neck, shoulders, clothes), 2 hair and the head outside
the face (ears, back of the head), 3 face skin, 4 inner mouth.

Rules of :func:`parse_frames`, in the head's image-plane frame (``right`` along the eye line, ``up``
perpendicular to it, so head roll is followed; origin at the chin, landmark 152; ``W`` = half the face
width between landmarks 234 and 454, ``Hf`` = chin-to-forehead (landmark 10) height):

1. person = selfie-segmentation probability > 0.5.
2. face (3) = the filled FACE_OVAL polygon, whether or not the segmentation agrees (it is soft at the face's
   own edges); inner mouth (4) = the filled LIPS_INNER polygon, intersected with the face.
3. head region = everything above the jaw arc (the lower FACE_OVAL from ear to ear through the chin), plus
   the band beside and above the face up to ``HEAD_BAND * W`` from the face centre, reaching down to
   ``EAR_DROP * Hf`` below the ear landmarks outside the ears' width. Person pixels inside it that are not
   face are hair (2): hair on top, ears, hair beside the cheeks. All other person pixels are torso (1):
   the neck under the jaw, shoulders, clothes.
4. long hair: when the person fills most of the strips beside the ears (``SIDE_STRIP * W`` wide, starting
   ``EAR_WIDTH * W`` outside the ear landmarks so the ears themselves do not count, from ``EAR_DROP * Hf``
   below to ``EAR_RISE * Hf`` above the ear landmarks), hair falls below the ears. (Measured fill of these
   strips: 0.64-1.0 on the four long-haired clips, 0.0-0.28 on the five short-haired ones.)
   Then torso pixels further down inside the band, down to ``LONG_HAIR_DEPTH * Hf`` below the chin but
   never in the neck column (``NECK_HALF_WIDTH * W`` either side of the face centre), become hair when
   their Lab colour lies within ``HAIR_MAHALANOBIS`` standard deviations of the sure hair (above the eyes
   and in those strips), is nearer the hair's mean colour than the face's, and connects to the hair
   above. This keeps bobs and hair falling onto the shoulders with the head while clothes stay torso.

Limits: a fringe over the forehead is labelled face (the face oval reaches the hairline); hair of the
clothes' colour, or hair in front of the neck, stays torso; a hand or object raised beside the head is
hair; bald heads are fine (the top is "hair" = head outside the face, as the label means). A frame whose
landmarks are missing (NaN rows) borrows the nearest tracked frame of the same chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from talkinghead.face.landmarks import CHIN, FACE_OVAL, LEFT_EYE_OUTER, LIPS_INNER, RIGHT_EYE_OUTER

BACKGROUND, TORSO, HAIR, FACE, MOUTH = 0, 1, 2, 3, 4

SELFIE_MODEL = 0  # mediapipe's square 256x256 "general" model: crisper and steadier than 1 (bench/RESULTS.md)
PERSON_THRESHOLD = 0.5
HEAD_BAND = 2.0  # half-width of the head band, in face half-widths
EAR_DROP = 0.15  # the head band beside the jaw ends this far below the ear landmarks, in face heights
EAR_RISE = 0.1  # the long-hair test looks beside the face from EAR_DROP below to this far above the ears
LONG_HAIR_DEPTH = 0.9  # how far below the chin long hair may reach, in face heights
LONG_HAIR_FILL = 0.5  # fraction of the strips beside the ears that must be person to call the hair long
EAR_WIDTH = 0.2  # those strips start this far outside the ear landmarks, past the ears, in face half-widths
SIDE_STRIP = 0.4  # width of those strips, in face half-widths
NECK_HALF_WIDTH = 0.7  # long hair is never grown in front of the neck: this column under the chin, in half-widths
HAIR_ANALYSIS_PX = 64  # face height (pixels) at which the long-hair colour analysis runs
HAIR_MAHALANOBIS = 3.0  # colour distance (in standard deviations of the sure hair's colour) still called hair
PLATE_FRAMES = 64  # frames used for the background median
PLATE_MARGIN = 0.015  # person mask dilation before taking background pixels, as a fraction of the image side

_OVAL = np.array(FACE_OVAL)
_JAW = _OVAL[FACE_OVAL.index(454): FACE_OVAL.index(234) + 1]  # ear (image right) -> chin -> ear (image left)
_LIPS = np.array(LIPS_INNER)
_SHIFT = 4  # fillPoly sub-pixel bits
_EPS = 1e-6
_EYE3 = np.eye(3)


def segment_person(frames: np.ndarray, *, progress: bool = False, model: int = SELFIE_MODEL) -> np.ndarray:
    """Person probability per pixel with mediapipe selfie segmentation.

    frames: uint8 [T, H, W, 3] RGB. Returns float32 [T, H, W] in [0, 1]. ``model``: mediapipe's
    ``model_selection`` (0 general 256x256, 1 landscape 144x256; 0 is crisper and steadier on our clips).
    """
    from tqdm import tqdm

    from talkinghead.face.landmarks import quiet_native_stderr

    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import mediapipe as mp
    except ImportError:
        from talkinghead.errors import UserError

        raise UserError("person segmentation needs mediapipe: pip install 'talkinghead[prepare]'") from None
    out = np.empty(frames.shape[:3], np.float32)
    # mediapipe's native logging (TFLite start-up lines) would clutter the terminal; the bar still shows.
    with quiet_native_stderr() as stderr, \
            mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model) as seg:
        for t in tqdm(range(len(frames)), desc="person masks", unit="frame", disable=not progress, file=stderr):
            out[t] = seg.process(np.ascontiguousarray(frames[t])).segmentation_mask
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _fill(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    """Boolean [H, W] of a filled polygon given in continuous pixel coordinates [N, 2] (centres at +0.5)."""
    import cv2

    mask = np.zeros(shape, np.uint8)
    pts = np.round((polygon - 0.5) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.view(bool)


def _nearest_tracked(landmarks: np.ndarray) -> np.ndarray:
    """[T] index of the nearest frame whose landmarks are finite."""
    good = np.flatnonzero(np.isfinite(landmarks[:, :, :2]).all(axis=(1, 2)))
    if not len(good):
        raise ValueError("parse_frames needs at least one tracked frame in the chunk (interpolate gaps first)")
    t = np.arange(len(landmarks))
    after = np.minimum(np.searchsorted(good, t), len(good) - 1)  # first tracked frame >= t (or the last)
    before = good[np.maximum(after - 1, 0)]
    after = good[after]
    return np.where(np.abs(t - before) <= np.abs(after - t), before, after)


@dataclass
class _Head:
    """A frame's head geometry in image coordinates: ``point(u, v)`` = chin + u * right + v * up (pixels)."""

    chin: np.ndarray  # [2]
    right: np.ndarray  # [2] unit, along the eye line
    up: np.ndarray  # [2] unit, chin -> forehead
    left_u: float  # ear landmarks 234 (image left) and 454 (image right) along ``right``
    right_u: float
    half_w: float
    face_h: float
    ear_v: float
    eye_v: float

    @classmethod
    def from_landmarks(cls, lm: np.ndarray) -> "_Head":
        right = lm[LEFT_EYE_OUTER, :2] - lm[RIGHT_EYE_OUTER, :2]  # the subject's left eye is on image right
        right = right / (np.linalg.norm(right) + _EPS)
        up = np.array([right[1], -right[0]])
        chin = lm[CHIN, :2]
        u = (lm[:, :2] - chin) @ right
        v = (lm[:, :2] - chin) @ up
        return cls(chin, right, up, float(u[234]), float(u[454]), max(0.5 * float(u[454] - u[234]), 1.0),
                   max(float(v[10]), 1.0), 0.5 * float(v[234] + v[454]),
                   0.5 * float(v[LEFT_EYE_OUTER] + v[RIGHT_EYE_OUTER]))

    @property
    def band(self) -> tuple[float, float]:
        centre = 0.5 * (self.left_u + self.right_u)
        return centre - HEAD_BAND * self.half_w, centre + HEAD_BAND * self.half_w

    @property
    def top(self) -> float:
        return 3.0 * self.face_h + 2.0 * self.half_w  # above any image the face fits in

    @property
    def side_bottom(self) -> float:
        return self.ear_v - EAR_DROP * self.face_h


    @property
    def hair_depth(self) -> float:
        return -LONG_HAIR_DEPTH * self.face_h

    def point(self, u: float, v: float) -> np.ndarray:
        return self.chin + u * self.right + v * self.up

    def quad(self, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
        return np.stack([self.point(u0, v0), self.point(u1, v0), self.point(u1, v1), self.point(u0, v1)])

    def side_strips(self) -> list[np.ndarray]:
        """The two quads [4, 2] just outside the ears where rule 3 looks for hair reaching below the ears."""
        lo, hi = self.side_bottom, self.ear_v + EAR_RISE * self.face_h
        skip, reach = EAR_WIDTH * self.half_w, (EAR_WIDTH + SIDE_STRIP) * self.half_w
        return [self.quad(self.left_u - reach, self.left_u - skip, lo, hi),
                self.quad(self.right_u + skip, self.right_u + reach, lo, hi)]

    def head_polygon(self, lm: np.ndarray) -> np.ndarray:
        """Rule 3's head region [N, 2]: above the jaw arc, plus the band beside it down to ``side_bottom``."""
        band_l, band_r = self.band
        sb, top = self.side_bottom, self.top
        return np.concatenate([lm[_JAW, :2], np.stack([
            self.point(self.left_u, sb), self.point(band_l, sb), self.point(band_l, top),
            self.point(band_r, top), self.point(band_r, sb), self.point(self.right_u, sb)])])


def _long_hair(image: np.ndarray, labels: np.ndarray, head: _Head, offset: np.ndarray) -> None:
    """Rule 4, in place on ``labels`` (an ROI of the frame whose origin is ``offset`` in frame pixels).

    The colour analysis runs on the ROI shrunk so the face is ~``HAIR_ANALYSIS_PX`` high (hair regions are
    large; this keeps the rule near a millisecond); only the final assignment is at full resolution.
    """
    import cv2

    k = max(1, int(head.face_h // HAIR_ANALYSIS_PX))
    h, w = labels.shape[0] // k, labels.shape[1] // k
    if h < 4 or w < 4:
        return
    small = labels[k // 2: h * k: k, k // 2: w * k: k]  # block centres, as the INTER_AREA colours below
    shape = small.shape

    def fill(polygon):
        return _fill(shape, (polygon - offset) / k)

    band_l, band_r = head.band
    centre, neck = 0.5 * (head.left_u + head.right_u), NECK_HALF_WIDTH * head.half_w
    zone = fill(head.quad(band_l, centre - neck, head.hair_depth, head.side_bottom))
    zone |= fill(head.quad(centre + neck, band_r, head.hair_depth, head.side_bottom))
    candidates = (small == TORSO) & zone
    hair = small == HAIR
    # Sure hair, for the colour model: above the eyes and in the strips beside the ears.
    sure = fill(head.quad(band_l, band_r, head.eye_v, head.top))
    for strip in head.side_strips():
        sure |= fill(strip)
    sure &= hair
    if not candidates.any() or sure.sum() < 16:
        return
    lab = cv2.cvtColor(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB)
    lab = lab.astype(np.float32)
    hair_lab = lab[sure]
    mean = hair_lab.mean(axis=0)
    # A floor of 2 Lab units on the spread; cv2.invert avoids numpy's BLAS thread start-up on a 3x3.
    precision = cv2.invert(np.cov(hair_lab.T) + 4.0 * _EYE3)[1]
    face_mean = lab[small == FACE].mean(axis=0)
    x = lab[candidates]
    d = x - mean
    like = np.einsum("ni,ij,nj->n", d, precision, d) < HAIR_MAHALANOBIS ** 2
    like &= np.linalg.norm(d, axis=1) < np.linalg.norm(x - face_mean, axis=1)
    grown = hair.view(np.uint8).copy()
    grown[candidates] = like
    # Close strand-sized gaps (dark strands, highlights), then keep what connects to the hair above.
    grown = cv2.morphologyEx(grown, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    count, comp = cv2.connectedComponents(grown, connectivity=8)
    keep = np.zeros(count, bool)
    keep[np.unique(comp[hair])] = True
    keep[0] = False
    grown = (keep[comp] & zone).astype(np.float32)
    full = np.zeros(labels.shape, bool)
    full[: h * k, : w * k] = cv2.resize(grown, (w * k, h * k), interpolation=cv2.INTER_LINEAR) > 0.5
    labels[(labels == TORSO) & full] = HAIR


def parse_frames(frames: np.ndarray, landmarks: np.ndarray, person: np.ndarray) -> np.ndarray:
    """Semantic labels per pixel (module docstring): uint8 [T, H, W] in {0..4}.

    frames: uint8 [T, H, W, 3] RGB; landmarks: [T, 478, 3] in pixels of these frames (NaN rows allowed, at
    least one tracked row per call); person: float32 [T, H, W] from :func:`segment_person`.
    """
    T, H, W = person.shape
    src = _nearest_tracked(landmarks) if T else np.zeros(0, np.int64)
    out = np.empty((T, H, W), np.uint8)
    np.greater(person, PERSON_THRESHOLD, out=out.view(bool))  # torso everywhere the person is, for now
    for t in range(T):
        lm = landmarks[src[t]].astype(np.float64)
        head = _Head.from_landmarks(lm)
        band_l, band_r = head.band
        # Work inside the head band's bounding box: outside it there is only background and torso.
        corners = np.concatenate([lm[_JAW, :2], head.quad(band_l, band_r, head.hair_depth, head.top)])
        x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [W, H])
        x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, [W, H])
        if x1 <= x0 or y1 <= y0:
            continue
        offset = np.array([x0, y0], np.float64)
        labels = out[t, y0:y1, x0:x1]
        shape = labels.shape
        left, right = head.side_strips()
        strips = _fill(shape, left - offset) | _fill(shape, right - offset)
        area = int(strips.sum())
        long_hair = area > 0 and labels[strips].sum() >= LONG_HAIR_FILL * area  # labels are 0/1 person here
        labels += labels & _fill(shape, head.head_polygon(lm) - offset).view(np.uint8)  # head: torso 1 -> hair 2
        face = _fill(shape, lm[_OVAL, :2] - offset)
        labels[face] = FACE
        if long_hair:
            _long_hair(frames[t, y0:y1, x0:x1], labels, head, offset)
        labels[_fill(shape, lm[_LIPS, :2] - offset) & face] = MOUTH
    return out


def _push_pull(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill the pixels of ``image`` (float32 [H, W, C]) where ``valid`` is False from their surroundings.

    Push-pull: average the valid pixels down an image pyramid until nothing is missing, then fill each
    level's gaps with the smooth upsampled coarser level. Valid pixels keep their values exactly.
    """
    import cv2

    levels = []
    colour, weight = image * valid[..., None], valid.astype(np.float32)
    while True:
        levels.append((colour, weight))
        h, w = weight.shape
        if weight.min() > 0 or max(h, w) <= 1:
            break
        size = ((w + 1) // 2, (h + 1) // 2)
        colour = cv2.resize(colour, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], -1)
        weight = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
    colour, weight = levels.pop()
    filled = colour / np.maximum(weight, _EPS)[..., None]
    while levels:
        colour, weight = levels.pop()
        h, w = weight.shape
        coarse = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
        a = np.minimum(weight, 1.0)[..., None]
        filled = a * colour / np.maximum(weight, _EPS)[..., None] + (1.0 - a) * coarse
    return filled


def plate_frames(num_frames: int) -> np.ndarray:
    """Indices [N] of the at most ``PLATE_FRAMES`` frames, evenly spread over the clip, that vote in the plate.

    ``background_plate(frames[i], parsing[i])`` with these indices ``i`` equals ``background_plate(frames,
    parsing)``: a caller that works through a long clip in chunks keeps only these frames for the plate.
    """
    return np.unique(np.linspace(0, num_frames - 1, min(num_frames, PLATE_FRAMES)).round().astype(np.int64))


def background_plate(frames: np.ndarray, parsing: np.ndarray) -> np.ndarray:
    """Per-pixel median of the background pixels over (a subsample of) frames, holes filled: uint8 [H, W, 3].

    frames: uint8 [T, H, W, 3]; parsing: uint8 [T, H, W]. Only the frames :func:`plate_frames` picks vote.
    Person pixels, grown by ``PLATE_MARGIN`` of the image side to drop the segmentation's soft edge, never
    vote; pixels no frame shows as background are filled smoothly from the surrounding plate
    (:func:`_push_pull`).
    """
    import cv2

    T, H, W = parsing.shape
    if T == 0:
        raise ValueError("background_plate needs at least one frame")
    pick = plate_frames(T)
    r = max(1, int(round(PLATE_MARGIN * max(H, W))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    invalid = np.stack([cv2.dilate((parsing[t] > 0).astype(np.uint8), kernel) for t in pick]).astype(bool)
    n = len(pick)
    # Sort each pixel's samples: rows of a contiguous [H * W * 3, N] array sort ~5x faster than along axis 0.
    values = np.ascontiguousarray(frames[pick].reshape(n, -1).T).astype(np.uint16)
    values[np.repeat(invalid.reshape(n, -1).T, 3, axis=0)] = 1024  # sorts after every real value
    values.sort(axis=1)
    count = (~invalid).sum(axis=0)  # [H, W]
    mid = np.repeat((np.maximum(count - 1, 0) // 2).reshape(-1), 3)
    plate = np.take_along_axis(values, mid[:, None], axis=1).reshape(H, W, 3)
    seen = count > 0
    if not seen.any():  # the person covers every pixel of every frame: nothing to show behind them
        return np.full((H, W, 3), np.median(frames[pick].reshape(-1, 3), axis=0), np.uint8)
    if not seen.all():
        plate = _push_pull(plate.astype(np.float32), seen)
    return np.clip(np.round(plate), 0, 255).astype(np.uint8)


def torso_images(frames: np.ndarray, parsing: np.ndarray, plate: np.ndarray) -> np.ndarray:
    """Torso (label 1) pixels of each frame over the plate, everything else from the plate: uint8 [T, H, W, 3]."""
    import cv2

    out = np.empty_like(frames)
    for t in range(len(frames)):  # cv2.copyTo is ~10x faster than a boolean-masked numpy copy
        out[t] = plate
        cv2.copyTo(np.ascontiguousarray(frames[t]), (parsing[t] == TORSO).view(np.uint8), out[t])
    return out
