"""Streaming the training clips: nothing is preloaded whole.

A :class:`ClipSource` keeps a prepared dataset open through :class:`talkinghead.data.PreparedDataset` and
holds only its small per-frame arrays (audio features, coefficients in the shared space, poses); images
and torso backdrops are decoded from disk when a batch asks for them. Batches are drawn by item: item ``j``
of global step ``t`` is fully determined by ``(seed, t, j)`` (:func:`item_rng`), so a run split over
torchrun ranks (rank r takes items r, r + W, ...) sees exactly the batch of a one-process run, and a resumed
run continues with the batches it would have drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from talkinghead.errors import UserError

from .emotion import emotion_weights
from .expression import ExpressionSpace
from .motion import ctc_targets


def item_rng(seed: int, step: int, item: int, stage: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step, item])


def rank_items(batch: int, rank: int, world: int) -> list[int]:
    """The items of a global batch this rank computes."""
    if batch % world:
        raise UserError(f"the global batch {batch} does not split over {world} processes; use a divisor")
    return list(range(rank, batch, world))


class ClipSource:
    """One prepared clip, read lazily at ``size`` (module docstring)."""

    def __init__(self, path: Path, size: int, label: str = "neutral", actor: str | None = None):
        from talkinghead.data import PreparedDataset

        self.path = Path(path)
        self.ds = PreparedDataset(self.path, size=size)
        self.label, self.actor = label, actor or self.path.name
        self.train = self.ds.split_indices("train")
        self.audio = self.ds.audio_matrix  # [T, D]
        features = self.ds.audio_features
        self.phone_ids = features.phone_ids  # [T] the CTC targets of L_ctc
        if self.phone_ids is None:  # a Whisper dataset carries no phones: recognise them from its audio.wav
            from talkinghead.audio.features import phone_features

            self.phone_ids = phone_features(self.ds.audio_wave, features.fps, features.num_frames)[0]
        self.phone_names = list(features.phone_names)
        self.viewmats = self.ds.tracks.viewmats.astype(np.float32)
        self.K = self.ds.K.astype(np.float32)
        self.coefs: np.ndarray | None = None  # [T, K] once the space is known

    def attach(self, space: ExpressionSpace) -> None:
        self.coefs = space.clip_coefficients(self.ds.face_model, self.ds.tracks.expression)

    def window(self, i: int, length: int) -> np.ndarray:
        """[length, K] coefficients around frame i (odd length), indices clipped to the clip."""
        r = length // 2
        return self.coefs[np.clip(np.arange(i - r, i + r + 1), 0, self.ds.num_frames - 1)]

    def image(self, i: int) -> np.ndarray:
        return self.ds.image(int(i)).transpose(2, 0, 1)

    def backdrop(self, i: int) -> np.ndarray:
        return self.ds.torso_image(int(i)).transpose(2, 0, 1)


def open_sources(paths: list[Path], size: int) -> list[ClipSource]:
    if not paths:
        raise UserError("give at least one prepared dataset")
    sources = [ClipSource(p, size) for p in paths]
    dims = {s.audio.shape[1] for s in sources}
    if len(dims) > 1:
        raise UserError(f"the datasets carry different audio features (widths {sorted(dims)}); prepare them alike")
    return sources


def motion_batch(sources: list[ClipSource], items: list[int], step: int, seed: int, length: int,
                 feature_dropout: float = 0.0, time_mask: int = 0) -> dict:
    """Stretches of ``length`` train frames: audio [B, L, D] (augmented: see ``MotionConfig``; ``target_audio``
    [B, L, D] is the clean one, L_lat's pseudo-truth), coefs [B, L, K], CTC label lists."""
    audio, clean, coefs, ctc = [], [], [], []
    for j in items:
        rng = item_rng(seed, step, j, 1)
        src = sources[int(rng.integers(len(sources)))]
        n = len(src.train)
        L = min(length, n)
        a = int(src.train[0] + rng.integers(n - L + 1))
        idx = np.arange(a, a + L)
        if L < length:  # a clip shorter than the stretch repeats its last frame
            idx = np.concatenate([idx, np.full(length - L, idx[-1])])
        a_clean = src.audio[idx]
        a_aug = a_clean.copy()
        if feature_dropout > 0:
            a_aug[:, rng.random(a_aug.shape[1]) < feature_dropout] = 0.0
        if time_mask > 0:
            span = int(rng.integers(time_mask + 1))
            at = int(rng.integers(length - span + 1))
            a_aug[at:at + span] = 0.0
        clean.append(a_clean)
        audio.append(a_aug)
        coefs.append(src.coefs[idx])
        ctc.append(ctc_targets(src.phone_ids[idx], src.phone_names))
    return {"audio": torch.from_numpy(np.stack(audio)), "target_audio": torch.from_numpy(np.stack(clean)),
            "coefs": torch.from_numpy(np.stack(coefs)), "ctc": ctc}


def pair_batch(sources: list[ClipSource], items: list[int], step: int, seed: int, window: int,
               source_of=None) -> dict:
    """Source/driving pairs from the train split of one clip each (sec. III-C2).

    ``source_of(src) -> ClipSource`` picks the clip the source frame comes from (default: the same clip;
    the mapper stage takes it from the actor's neutral clip)."""
    out: dict[str, list] = {k: [] for k in ("src_image", "drv_image", "backdrop", "src_window", "drv_window",
                                              "src_viewmat", "drv_viewmat", "K", "weights", "labels")}
    gens = []
    for j in items:
        rng = item_rng(seed, step, j, 2)
        drv = sources[int(rng.integers(len(sources)))]
        src = source_of(drv) if source_of else drv
        s = int(src.train[rng.integers(len(src.train))])
        d = int(drv.train[rng.integers(len(drv.train))])
        out["src_image"].append(src.image(s))
        out["backdrop"].append(src.backdrop(s))
        out["drv_image"].append(drv.image(d))
        out["src_window"].append(src.window(s, window))
        out["drv_window"].append(drv.window(d, window))
        out["src_viewmat"].append(src.viewmats[s])
        out["drv_viewmat"].append(drv.viewmats[d])
        out["K"].append(src.K)
        out["weights"].append(emotion_weights(drv.label))
        out["labels"].append(drv.label)
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        gens.append(g)
    batch = {k: torch.from_numpy(np.stack(v)).float() for k, v in out.items() if k != "labels"}
    batch["labels"] = out["labels"]
    # the source and the driving render of an item each draw their own jitter
    batch["generators"] = gens + [torch.Generator().manual_seed(int(g.initial_seed()) + 1) for g in gens]
    return batch
