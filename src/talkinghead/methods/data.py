"""The shared loader: a prepared dataset (read through :mod:`talkinghead.data`) as method inputs.

Frames of a split are decoded once and cached as uint8 tensors at the training size (a 71 s clip at 128^2
is ~90 MB per image stack), so an iteration costs no JPEG decoding. The audio rows are
``AudioFeatures.stack()`` (already normalised per utterance by the extractor, identically for training and
driving audio), windowed by :func:`audio_windows` the same way at train and render time.

Parsing labels follow docs/dataset.md: 0 background, 1 torso, 2 hair, 3 face skin, 4 inner mouth.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from talkinghead.errors import UserError
from talkinghead.face.landmarks import LIPS_OUTER

from .base import Batch, Condition, DataConfig, DatasetInfo, MouthCrop, SourceFrame

HAIR, FACE, MOUTH = 2, 3, 4


def open_dataset(path: Path, size: int | None = None):
    """``talkinghead.data.PreparedDataset`` (a one-line UserError when ``path`` is not one)."""
    from talkinghead.data import PreparedDataset

    return PreparedDataset(Path(path), size=size)


def audio_windows(features: np.ndarray, radius: int) -> Tensor:
    """Sliding windows [T, 2R+1, D] of per-frame features [T, D], edge rows repeated (as the dataset's)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    padded = torch.cat([x[:1].expand(radius, -1), x, x[-1:].expand(radius, -1)], 0)
    return padded.unfold(0, 2 * radius + 1, 1).permute(0, 2, 1).contiguous()


def dataset_info(ds, size: int) -> DatasetInfo:
    """What a model needs to know about ``ds``."""
    return DatasetInfo(num_frames=int(ds.num_frames), fps=float(ds.fps), size=size,
                       audio_dim=int(ds.audio_matrix.shape[1]), audio_names=list(ds.audio_features.names),
                       expression_dim=int(ds.face_model.num_expression))


def _to_u8(image: np.ndarray) -> Tensor:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a))


def _f32(t: Tensor) -> Tensor:
    return t.float() / 255.0


class FrameStore:
    """The frames of one split of a prepared dataset, cached at ``cfg.size``, as Conditions and Batches.

    ``indices`` [T_split] are the source frame numbers; item ``k`` of the store is frame ``indices[k]``.
    ``with_targets=False`` skips the ground truth (render only needs poses, backdrops and blinks; the frames
    and their parsing are still read when ``cfg.source_frames`` puts a SourceFrame in every Condition);
    ``pick`` keeps only those positions of the split (e.g. a few validation frames).
    """

    def __init__(self, path: Path, cfg: DataConfig, info: DatasetInfo | None = None, split: str = "train",
                 with_targets: bool = True, pick: list[int] | None = None, progress: bool = True):
        from tqdm import tqdm

        ds = open_dataset(path, size=cfg.size)
        self.cfg = cfg
        self.info = info or dataset_info(ds, cfg.size)
        self.indices = np.asarray(ds.split_indices(split), dtype=np.int64)
        if self.indices.size == 0:
            raise UserError(f"the dataset's {split!r} split is empty")
        if pick is not None:
            self.indices = self.indices[pick]
        self.fps = float(ds.fps)
        self.K = torch.as_tensor(np.asarray(ds.K), dtype=torch.float32)
        self.windows = audio_windows(ds.audio_matrix, cfg.audio_radius)
        n = len(self.indices)
        frames_too = with_targets or cfg.source_frames  # images + parsing
        backdrops, viewmats, blinks, images, labels, boxes, exprs = [], [], [], [], [], [], []
        pool = ThreadPoolExecutor(2)  # decoding releases the GIL
        frames = pool.map(lambda i: ds.frame(int(i)), self.indices)
        for fr in tqdm(frames, total=len(self.indices), desc=f"loading {split} frames", unit="frame",
                       disable=not progress):
            backdrops.append(_to_u8(fr.torso_image))
            viewmats.append(np.asarray(fr.viewmat, np.float32))
            blinks.append(np.asarray(fr.blink, np.float32))
            exprs.append(np.asarray(fr.expression, np.float32))
            if frames_too:
                images.append(_to_u8(fr.image))
                labels.append(torch.from_numpy(np.array(fr.parsing, np.uint8)))
            if with_targets:
                lips = np.asarray(fr.landmarks, np.float32)[list(LIPS_OUTER), :2]
                boxes.append(np.concatenate([lips.min(0), lips.max(0)]))
        pool.shutdown()
        self.backdrops = torch.stack(backdrops)  # [T, H, W, 3] uint8
        self.viewmats = torch.from_numpy(np.stack(viewmats))  # [T, 4, 4]
        self.blinks = torch.from_numpy(np.stack(blinks))  # [T, 2]
        self.expressions = torch.from_numpy(np.stack(exprs))  # [T, E]
        self.images = torch.stack(images) if frames_too else None  # [T, H, W, 3] uint8
        self.labels = torch.stack(labels) if frames_too else None  # [T, H, W] uint8
        self.mouth_boxes = torch.from_numpy(np.stack(boxes)) if with_targets else None  # [T, 4]
        self.crops = None
        if with_targets and cfg.mouth_crop > 0:
            self._load_mouth_crops(path, progress)
        assert self.backdrops.shape[0] == n

    def __len__(self) -> int:
        return len(self.indices)

    def condition(self, k: int, audio: Tensor | None = None) -> Condition:
        """Condition of item ``k``; ``audio`` [2R+1, D] replaces the frame's own audio window (driving)."""
        i = int(self.indices[k])
        source = None
        if self.cfg.source_frames:
            source = SourceFrame(image=_f32(self.images[k]), labels=self.labels[k], expression=self.expressions[k])
        return Condition(viewmat=self.viewmats[k], K=self.K, backdrop=_f32(self.backdrops[k]),
                         audio=self.windows[min(i, len(self.windows) - 1)] if audio is None else audio,
                         blink=self.blinks[k], index=i, source=source)

    def batch(self, k: int) -> Batch:
        lab = self.labels[k]
        mouth = None
        if self.crops is not None:
            Kc, img, bd = self.crops
            mouth = MouthCrop(K=Kc[k], image=_f32(img[k]), backdrop=_f32(bd[k]))
        return Batch(cond=self.condition(k), image=_f32(self.images[k]),
                     head_mask=(lab >= HAIR).float(), face_mask=(lab >= FACE).float(),
                     mouth_box=self.mouth_boxes[k], expression=self.expressions[k], mouth=mouth)

    def _load_mouth_crops(self, path: Path, progress: bool) -> None:
        """Mouth crops from the full-size frames: one fixed box size per clip, centred on the lips each frame.

        The box is ``mouth_crop`` x ``3/4 mouth_crop`` pixels of output, covering the median lip width grown by
        ``mouth_margin`` on each side; its intrinsics make the crop a camera of its own (same viewmat).
        """
        from tqdm import tqdm

        full = open_dataset(path)
        scale = full.size / self.cfg.size  # full-size pixels per training pixel
        cw = self.cfg.mouth_crop
        ch = max(8, int(round(cw * 0.75)))
        b = self.mouth_boxes
        width = float(torch.median(b[:, 2] - b[:, 0])) * (1 + 2 * self.cfg.mouth_margin)
        bw_full = max(cw, int(math.ceil(width * scale)))  # box side in full-size pixels
        bh_full = max(ch, int(round(bw_full * ch / cw)))
        Ks, imgs, bds = [], [], []
        # Pillow decodes outside the GIL: two threads read the full-size JPEGs while this one crops.
        pool = ThreadPoolExecutor(2)
        pairs = pool.map(lambda i: (full.image(int(i)), full.torso_image(int(i))), self.indices)
        for k, (img, bd) in enumerate(tqdm(pairs, total=len(self.indices), desc="loading mouth crops",
                                           unit="frame", disable=not progress)):
            H, W = img.shape[:2]
            cx, cy = float(b[k, 0] + b[k, 2]) / 2 * scale, float(b[k, 1] + b[k, 3]) / 2 * scale
            x0 = int(np.clip(round(cx - bw_full / 2), 0, max(0, W - bw_full)))
            y0 = int(np.clip(round(cy - bh_full / 2), 0, max(0, H - bh_full)))
            crops = [_resize(_f32(_to_u8(a[y0:y0 + bh_full, x0:x0 + bw_full])), ch, cw) for a in (img, bd)]
            imgs.append(_to_u8(crops[0].numpy()))
            bds.append(_to_u8(crops[1].numpy()))
            # Box in training pixels -> crop camera: a zoom (cw / box width) about the box corner.
            sx, sy = cw / (bw_full / scale), ch / (bh_full / scale)
            Kc = self.K.clone()
            Kc[0, 0], Kc[0, 2] = self.K[0, 0] * sx, (self.K[0, 2] - x0 / scale) * sx
            Kc[1, 1], Kc[1, 2] = self.K[1, 1] * sy, (self.K[1, 2] - y0 / scale) * sy
            Ks.append(Kc)
        pool.shutdown()
        self.crops = (torch.stack(Ks), torch.stack(imgs), torch.stack(bds))


class Conditions:
    """Conditions of any frame of a prepared dataset at any render size, decoded when asked (the renderer's
    input: nothing is cached, so a long clip at 512^2 or more costs no memory up front).

    ``size`` is the render side N: the backdrop (torso image) is read at N from the dataset's stored frames
    (area-averaged down, bilinear up; above the dataset's own size the backdrop is upsampled) and ``K`` is the
    camera in pixels of N -- a Condition carries its render size (``Condition.height``/``width``) this way.
    At the training size a Condition equals :meth:`FrameStore.condition`'s for the same frame.
    """

    def __init__(self, path: Path, size: int, audio_radius: int, source_frames: bool = False):
        self.ds = open_dataset(path, size=size)
        self.size = int(size)
        self.source_frames = source_frames  # also give each Condition its SourceFrame (DataConfig.source_frames)
        self.K = torch.as_tensor(np.asarray(self.ds.K), dtype=torch.float32)
        self.windows = audio_windows(self.ds.audio_matrix, audio_radius)
        tracks = self.ds.tracks
        self.viewmats = torch.from_numpy(np.asarray(tracks.viewmats, np.float32))  # [T, 4, 4]
        self.blinks = torch.from_numpy(np.asarray(tracks.blink, np.float32))  # [T, 2]

    def __call__(self, i: int, audio: Tensor | None = None) -> Condition:
        """Condition of dataset frame ``i``; ``audio`` [2R+1, D] replaces the frame's own window (driving)."""
        i = int(i)
        source = None
        if self.source_frames:
            fr = self.ds.frame(i)
            source = SourceFrame(image=_f32(_to_u8(fr.image)), labels=torch.from_numpy(np.array(fr.parsing, np.uint8)),
                                 expression=torch.from_numpy(np.asarray(fr.expression, np.float32)))
        return Condition(viewmat=self.viewmats[i], K=self.K, backdrop=_f32(_to_u8(self.ds.torso_image(i))),
                         audio=self.windows[min(i, len(self.windows) - 1)] if audio is None else audio,
                         blink=self.blinks[i], index=i, source=source)


def _resize(img: Tensor, h: int, w: int) -> Tensor:
    """[h0, w0, 3] -> [h, w, 3], antialiased bilinear."""
    x = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                        antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0, 1)
