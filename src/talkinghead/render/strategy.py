"""Adaptive density control of 3D Gaussian Splatting (Kerbl et al. 2023, sec. 5.2) as a strategy object.

The trainer calls two hooks around ``loss.backward()``; everything else (statistics, schedules, and the
surgery on both the model's parameters and the optimiser's state) lives here:

    strategy = DensityStrategy(scene_scale=...)
    for step in range(n_steps):
        image, alpha, depth, info = model.render(...)
        strategy.step_pre_backward(info)
        loss.backward()
        strategy.step_post_backward(model, optimizer, step, info)
        optimizer.step(); optimizer.zero_grad()

Defaults are the paper's (and gsplat ``DefaultStrategy``'s) for scenes normalised to ``scene_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .model import GaussianModel
from .projection import quat_to_rotmat


@dataclass
class DensityStrategy:
    scene_scale: float = 1.0  # world size of the subject; the 3D size thresholds are relative to it
    grow_grad2d: float = 0.0002  # mean screen-space positional gradient (NDC units) that triggers growth
    grow_scale3d: float = 0.01  # below this largest scale (x scene_scale) a Gaussian is cloned, above split
    prune_opa: float = 0.005  # Gaussians less opaque than this are removed
    prune_scale3d: float = 0.1  # Gaussians larger than this (x scene_scale) are removed after the first reset
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    reset_every: int = 3000  # opacity reset period
    split_factor: float = 1.6  # a split Gaussian's two children have scales divided by this (the paper's phi)
    max_gaussians: int | None = None  # growth stops at this count (pruning continues)
    # State between refinements: [N] summed |d loss / d means2d| (NDC) and how many renders saw each Gaussian.
    grad2d_sum: Tensor | None = field(default=None, init=False, repr=False)
    visible_count: Tensor | None = field(default=None, init=False, repr=False)

    def step_pre_backward(self, info: dict[str, Any]) -> None:
        """Ask autograd to keep the screen-space means' gradient (a non-leaf tensor)."""
        info["means2d"].retain_grad()

    def step_post_backward(
        self, model: GaussianModel, optimizer: torch.optim.Optimizer, step: int, info: dict[str, Any]
    ) -> dict[str, int]:
        """Accumulate statistics, and at refinement steps grow, prune and reset; returns what changed."""
        changes = {"cloned": 0, "split": 0, "pruned": 0, "opacity_reset": 0}
        if step >= self.refine_stop_iter:
            return changes
        self._accumulate(info, len(model))
        if step > self.refine_start_iter and step % self.refine_every == 0:
            changes["cloned"], changes["split"] = self._grow(model, optimizer)
            changes["pruned"] = self._prune(model, optimizer, step)
            self.grad2d_sum = self.visible_count = None
        if step > 0 and step % self.reset_every == 0:
            self._reset_opacity(model, optimizer)
            changes["opacity_reset"] = 1
        return changes

    def _accumulate(self, info: dict[str, Any], n: int) -> None:
        grad = info["means2d"].grad  # [C, N, 2], d loss / d pixel coordinates
        if grad is None:
            raise RuntimeError("means2d has no gradient: call step_pre_backward(info) before backward()")
        # Pixel gradients to NDC units (x_ndc = 2 u / W - 1), so thresholds do not depend on resolution; times
        # the number of cameras, which a loss averaged over cameras divides out (as gsplat does).
        scale = grad.new_tensor([info["width"] / 2, info["height"] / 2]) * info["n_cameras"]
        norms = (grad.detach() * scale).norm(dim=-1)  # [C, N]
        seen = (info["radii"] > 0).all(-1)
        if self.grad2d_sum is None or self.grad2d_sum.shape[0] != n:
            self.grad2d_sum = norms.new_zeros(n)
            self.visible_count = norms.new_zeros(n)
        self.grad2d_sum += (norms * seen).sum(0)
        self.visible_count += seen.sum(0)

    def _grow(self, model: GaussianModel, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        if self.grad2d_sum is None or (self.max_gaussians is not None and len(model) >= self.max_gaussians):
            return 0, 0
        with torch.no_grad():
            high = self.grad2d_sum / self.visible_count.clamp(min=1) > self.grow_grad2d
            small = model.scales.max(-1).values <= self.grow_scale3d * self.scene_scale
            clone, split = high & small, high & ~small
            if self.max_gaussians is not None:  # keep the strongest candidates within the budget
                room = self.max_gaussians - len(model)
                clone, split = _limit(clone, split, self.grad2d_sum / self.visible_count.clamp(min=1), room)
            n_clone, n_split = int(clone.sum()), int(split.sum())
            # Clone: an identical copy (extra per-Gaussian parameters too); the two then move apart under their
            # own gradients.
            if n_clone:
                _append(model, optimizer, {name: getattr(model, name)[clone] for name in model.param_names})
            # Split: two children drawn from the parent's own distribution, shrunk by split_factor, each with a
            # copy of the parent's extra parameters; the parent is removed. (Masks are padded for the clones
            # appended just above.)
            if n_split:
                split = torch.cat([split, split.new_zeros(n_clone)])
                scales = model.scales[split]
                offsets = (quat_to_rotmat(model.quats[split]) @ (scales * torch.randn_like(scales))[..., None])[..., 0]
                children = {name: getattr(model, name)[split].repeat_interleave(2, 0)
                            for name in model.param_names}
                children["means"] = children["means"] + torch.stack([offsets, -offsets], 1).reshape(-1, 3)
                children["log_scales"] = children["log_scales"] - math.log(self.split_factor)
                _append(model, optimizer, children)
                _select(model, optimizer, ~torch.cat([split, split.new_zeros(2 * n_split)]))
        return n_clone, n_split

    def _prune(self, model: GaussianModel, optimizer: torch.optim.Optimizer, step: int) -> int:
        with torch.no_grad():
            drop = model.opacities < self.prune_opa
            if step > self.reset_every:  # before the first reset, big Gaussians are still being split
                drop |= model.scales.max(-1).values > self.prune_scale3d * self.scene_scale
            n = int(drop.sum())
            if n:
                _select(model, optimizer, ~drop)
        return n

    def _reset_opacity(self, model: GaussianModel, optimizer: torch.optim.Optimizer) -> None:
        """Cap every opacity at 2 x prune_opa so that Gaussians must earn their opacity again (3DGS 5.2)."""
        with torch.no_grad():
            cap = torch.logit(torch.tensor(2 * self.prune_opa))
            model.logit_opacities.clamp_(max=cap)
            for state in _states_of(optimizer, model.logit_opacities):
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == model.logit_opacities.shape:
                        value.zero_()


def _limit(clone: Tensor, split: Tensor, score: Tensor, room: int) -> tuple[Tensor, Tensor]:
    """Keep the highest-scoring candidates so that clones (+1 each) and splits (+1 each) fit in ``room``."""
    cand = clone | split
    if int(cand.sum()) <= room:
        return clone, split
    keep = torch.zeros_like(cand)
    if room > 0:
        keep[torch.topk(torch.where(cand, score, torch.full_like(score, -1.0)), room).indices] = True
    return clone & keep, split & keep


def _states_of(optimizer: torch.optim.Optimizer, param: Tensor) -> list[dict]:
    params = (p for group in optimizer.param_groups for p in group["params"])
    return [optimizer.state[p] for p in params if p is param and p in optimizer.state]


def _replace(
    model: GaussianModel, optimizer: torch.optim.Optimizer, update: Callable[[str, Tensor, bool], Tensor]
) -> None:
    """Swap each parameter for ``update(name, old, False)`` and its optimiser state for ``update(name, s, True)``.

    The optimiser keys its state by parameter object, so the new Parameter takes the old one's place in
    the param groups and inherits its transformed moments (Adam's exp_avg, exp_avg_sq...).
    """
    for name in model.param_names:
        old = getattr(model, name)
        new = torch.nn.Parameter(update(name, old.detach(), False), requires_grad=old.requires_grad)
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    if old in optimizer.state:
                        state = optimizer.state.pop(old)
                        optimizer.state[new] = {
                            k: update(name, v, True) if torch.is_tensor(v) and v.shape == old.shape else v
                            for k, v in state.items()
                        }
        setattr(model, name, new)


def _select(model: GaussianModel, optimizer: torch.optim.Optimizer, keep: Tensor) -> None:
    _replace(model, optimizer, lambda _name, t, _is_state: t[keep].contiguous())


def _append(model: GaussianModel, optimizer: torch.optim.Optimizer, rows: dict[str, Tensor]) -> None:
    """Add Gaussians; their optimiser moments start at zero, as for a fresh parameter."""

    def update(name: str, t: Tensor, is_state: bool) -> Tensor:
        extra = rows[name].detach().to(t)
        return torch.cat([t, torch.zeros_like(extra) if is_state else extra])

    _replace(model, optimizer, update)
