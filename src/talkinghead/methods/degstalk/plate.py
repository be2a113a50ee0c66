"""Region masks and the hair plate C_hair of DEGSTalk's hair-preserving rendering (sec. II-C, eq. 7).

All from a frame's parsing labels (docs/dataset.md: 0 background, 1 torso = neck/shoulders/clothes,
2 hair = hair + head outside the face: ears, earrings, back of the head; 3 face skin, 4 inner mouth):

* :func:`hair_plate` -- C_hair: the frame's own hair pixels (ears and earrings count as hair) over its
  backdrop (background + torso, head removed: neck and clothes come from the torso layer, "composited
  back"), plus the face's outer border band of ``erode_px`` (the face + mouth region eroded by that much is
  what is cut out). Face and mouth Gaussians are splatted over it, so where they are opaque they win; the
  band gives the hair line real pixels on both sides of the parsing boundary, where the labels are least
  sure, instead of a hole filled with background. The cut-out's outer band of ``fill_px`` is filled from
  the plate around it (:func:`fill_holes`) rather than left as backdrop: wherever the face field does not
  cover the cut-out the plate shows through, and the backdrop there is the background behind the head (on
  hdtf_radio2_8s a grey window strip by the ear where the parsing calls a strip of the cheek edge face in
  some frames and hair in others, so the face field learnt to be transparent there); filled, such pixels
  show the neighbouring hair and skin. Only a band: a whole filled cut-out lets the face field go
  transparent inside the face too (eyebrows), where the backdrop keeps it opaque. Deviation: the paper's
  C_hair is zero inside the face region.
* :func:`region_masks` -- the training targets' masks, dilated by ``dilate_px`` (the paper dilates the face
  and mouth regions during training "to better capture their features"): the face field is trained on the
  face + mouth region (or the whole head when there is no plate: w/o H), the mouth field on the inner mouth.
* :func:`face_field_target` -- the face field's (background, target) pair of stages 1-2: the frame inside
  the face mask, the plate outside, the frame's own inner mouth in both (so a face field transparent there
  is exactly right), and :func:`mouth_opacity`, the term that asks the face field for that transparency.
* :func:`mouth_field_background` -- the mouth field's background in stages 1-2: the frame with the plate in
  the (dilated) inner-mouth region, i.e. what lies behind the mouth field there at render time (eq. 7 splats
  it over C_hair). With black there instead (the paper's C_hair is zero inside the face) the mouth field learnt
  to fade out at its edges over a dark cavity, and at render the plate's backdrop showed through those edges:
  on cnn a blue line between the lips (the studio's blue behind the head, plate colour (0.0, 0.41, 0.88)).

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
    # The square's max is the column max of the row maxes, and on a {0, 1} mask a window's max is whether its
    # count of ones (a difference of running sums, exact integers) is positive: O(1) per pixel whatever px,
    # where the square max-pool took (2 px + 1)^2 comparisons (~0.17 s of a 512^2 DEGSTalk frame). The same
    # values exactly; a mask with other values takes the max-pools.
    if not ((mask == 0) | (mask == 1)).all():
        k = 2 * px + 1
        rows = F.max_pool2d(mask[None, None], (1, k), stride=1, padding=(0, px))
        return F.max_pool2d(rows, (k, 1), stride=1, padding=(px, 0))[0, 0]
    return _grow(_grow(mask, px, 1), px, 0)


def _grow(mask: Tensor, px: int, dim: int) -> Tensor:
    """{0, 1} ``mask`` [H, W] dilated by ``px`` along ``dim`` only: 1 where the window of 2 px + 1 holds a one."""
    n = mask.shape[dim]
    pad = (px, px + 1, 0, 0) if dim == 1 else (0, 0, px, px + 1)
    c = F.pad(mask, pad).cumsum(dim)  # c[j] = ones among padded entries 0..j
    hi = c.narrow(dim, 2 * px, n)  # window i: padded entries i .. i + 2 px
    lo = F.pad(c, (1, 0, 0, 0) if dim == 1 else (0, 0, 1, 0)).narrow(dim, 0, n)  # entries before i
    return (hi - lo > 0.5).to(mask.dtype)


def erode(mask: Tensor, px: int) -> Tensor:
    """[H, W] {0, 1} mask shrunk by ``px`` pixels (the image border counts as inside)."""
    return 1.0 - dilate(1.0 - mask, px)


def fill_holes(image: Tensor, known: Tensor) -> Tensor:
    """``image`` [H, W, C] with the pixels where ``known`` [H, W] is 0 filled from the known ones around them.

    Push-pull: a pyramid of known-weighted 2x2 means (every level halves the side) down to one pixel, then
    from the coarsest level up, each level's own mean where it has known pixels (weighted by how much of the
    cell is known) over the coarser level's estimate. Known pixels come back unchanged; a hole surrounded by
    one colour is filled with exactly that colour. All-unknown input comes back as it is."""
    if known.all() or not known.any():
        return image
    x = (image * known[..., None]).permute(2, 0, 1)[None]  # [1, C, H, W] weighted colours
    w = known[None, None].to(image.dtype)  # [1, 1, H, W] weights
    levels = [(x, w)]
    while min(x.shape[-2:]) > 1:
        x, w = F.avg_pool2d(x, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)
        levels.append((x, w))
    est = levels[-1][0] / levels[-1][1].clamp(min=1e-12)
    for x, w in reversed(levels[:-1]):
        up = F.interpolate(est, size=x.shape[-2:], mode="bilinear", align_corners=False)
        mean = x / w.clamp(min=1e-12)
        a = w.clamp(0, 1)
        est = mean * a + up * (1 - a)
    return est[0].permute(1, 2, 0)


def hair_plate(image: Tensor, labels: Tensor, backdrop: Tensor, erode_px: int, fill_px: int = 0) -> Tensor:
    """C_hair [H, W, 3]: hair of ``image`` [H, W, 3] (+ the face's border band) over ``backdrop`` [H, W, 3],
    the outer ``fill_px`` of the face's cut-out filled from around it (:func:`fill_holes`; 0: none).

    labels: [H, W] uint8 parsing of ``image``."""
    face = (labels >= FACE).float()
    cut = erode(face, erode_px) if erode_px > 0 else face
    keep = ((labels == HAIR).float() + face - cut).clamp(0, 1)[..., None]
    plate = image * keep + backdrop * (1 - keep)
    if fill_px <= 0:
        return plate
    band = (cut - erode(cut, fill_px))[..., None]
    return plate * (1 - band) + fill_holes(plate, 1 - cut) * band


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


def face_field_target(image: Tensor, plate: Tensor, face_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(background, target), each [H, W, 3], of the face field's stage 1-2 loss.

    image: [H, W, 3] the frame; plate: [H, W, 3] C_hair; face_mask: [H, W] the (dilated) face-field region;
    labels: [H, W] the frame's parsing. Target: ``image`` inside ``face_mask``, ``plate`` outside; background:
    the plate with the frame's inner mouth pasted in, so that where the face field is transparent over the
    open mouth the render equals the target there."""
    inner = (labels == MOUTH).to(image.dtype)[..., None]
    m = face_mask[..., None]
    return plate * (1 - inner) + image * inner, image * m + plate * (1 - m)


def mouth_field_background(image: Tensor, plate: Tensor, mouth_mask: Tensor) -> Tensor:
    """[H, W, 3] the mouth field's stage 1-2 background: ``image`` [H, W, 3] outside ``mouth_mask`` [H, W] (the
    dilated inner mouth), ``plate`` [H, W, 3] (C_hair, behind the mouth field in eq. 7) inside it."""
    m = mouth_mask[..., None]
    return image * (1 - m) + plate * m


def mouth_opacity(alpha: Tensor, labels: Tensor) -> Tensor:
    """[] the face field's accumulated opacity ``alpha`` [H, W, 1] on the inner-mouth pixels of ``labels``
    [H, W], averaged over the whole frame (the normalisation of the L1 term it is added to)."""
    return (alpha[..., 0] * (labels == MOUTH)).mean()
