"""Region masks and the hair plate C_hair of DEGSTalk's hair-preserving rendering (sec. II-C, eq. 7).

All from a frame's parsing labels (docs/dataset.md: 0 background, 1 torso = neck/shoulders/clothes,
2 hair = hair + head outside the face: ears, earrings, back of the head; 3 face skin, 4 inner mouth):

* :func:`hair_plate` -- C_hair: the frame's own hair pixels (ears and earrings count as hair) over its
  backdrop (background + torso, head removed: neck and clothes come from the torso layer, "composited
  back"), plus the face's outer border band of ``erode_px`` (the face + mouth region eroded by that much is
  what is cut out). Face and mouth Gaussians are splatted over it, so where they are opaque they win; the
  band gives the hair line real pixels on both sides of the parsing boundary, where the labels are least
  sure, instead of a hole filled with background.
* :func:`region_masks` -- the training targets' masks, dilated by ``dilate_px`` (the paper dilates the face
  and mouth regions during training "to better capture their features"): the face field is trained on the
  face + mouth region (or the whole head when there is no plate: w/o H), the mouth field on the inner mouth.

Dilation/erosion are square max-pools (Chebyshev distance), on [H, W] float masks in {0, 1}.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

HAIR, FACE, MOUTH = 2, 3, 4


def dilate(mask: Tensor, px: int) -> Tensor:
    """[H, W] {0, 1} mask grown by ``px`` pixels (square structuring element)."""
    if px <= 0:
        return mask
    return F.max_pool2d(mask[None, None], 2 * px + 1, stride=1, padding=px)[0, 0]


def erode(mask: Tensor, px: int) -> Tensor:
    """[H, W] {0, 1} mask shrunk by ``px`` pixels (the image border counts as inside)."""
    return 1.0 - dilate(1.0 - mask, px)


def hair_plate(image: Tensor, labels: Tensor, backdrop: Tensor, erode_px: int) -> Tensor:
    """C_hair [H, W, 3]: hair of ``image`` [H, W, 3] (+ the face's border band) over ``backdrop`` [H, W, 3].

    labels: [H, W] uint8 parsing of ``image``."""
    face = (labels >= FACE).float()
    keep = (labels == HAIR).float() + face - erode(face, erode_px) if erode_px > 0 else (labels == HAIR).float()
    keep = keep.clamp(0, 1)[..., None]
    return image * keep + backdrop * (1 - keep)


def region_masks(labels: Tensor, dilate_px: int, with_hair: bool) -> tuple[Tensor, Tensor]:
    """(face-field mask, mouth-field mask), each [H, W] in {0, 1}, from parsing ``labels`` [H, W].

    The face field's region is face skin + inner mouth (+ hair when ``with_hair``: w/o H), the mouth
    field's the inner mouth; both dilated by ``dilate_px``."""
    face = (labels >= (HAIR if with_hair else FACE)).float()
    mouth = (labels == MOUTH).float()
    return dilate(face, dilate_px), dilate(mouth, dilate_px)


def pixels(fraction: float, size: int) -> int:
    """A mask width given as a fraction of the image side, in whole pixels (a positive fraction gives >= 1)."""
    if fraction <= 0:
        return 0
    return max(1, int(round(fraction * size)))
