"""A bank of the training frames a method has seen, replayed by losses that need many frames per step.

The trainer hands a method one frame per iteration. Losses that do not render (a mapping from audio to tracked
lip motion, say) are cheap enough to evaluate on dozens of frames per step, and with one frame a step such a
mapping sees each frame only a few times in a CPU schedule and underfits. A method remembers each frame's
tensors the first time the trainer passes it (keyed by ``Condition.index``) and draws a random batch of them.
Training only: the bank is not saved with the avatar (after ``--resume`` it refills as frames come by).

    bank = FrameBank(seed=0)
    bank.add(batch.cond.index, batch.cond.audio, batch.expression)   # no-op for a frame already held
    audio, expression = bank.sample(32)                             # [32, 2R+1, D], [32, E]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class FrameBank:
    """Per-frame tensors remembered once per frame index; :meth:`sample` stacks a random draw of them."""

    def __init__(self, seed: int = 0):
        self._rows: list[tuple[Tensor, ...]] = []
        self._seen: set[int] = set()
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, index: int, *tensors: Tensor) -> None:
        """Remember ``tensors`` of frame ``index`` (detached) unless that frame is already held."""
        if index in self._seen:
            return
        if self._rows and len(tensors) != len(self._rows[0]):
            raise ValueError(f"the bank holds {len(self._rows[0])} tensors per frame, got {len(tensors)}")
        self._seen.add(index)
        self._rows.append(tuple(t.detach() for t in tensors))

    def sample(self, n: int) -> tuple[Tensor, ...]:
        """``n`` frames drawn with replacement: one stacked tensor [n, ...] per remembered tensor."""
        if not self._rows:
            raise ValueError("the bank is empty")
        pick = self._rng.integers(len(self._rows), size=n)
        return tuple(torch.stack(t) for t in zip(*(self._rows[i] for i in pick)))
