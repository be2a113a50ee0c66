"""``talkinghead oneshot train DATA... --out MODEL``: the three stages of sec. III-C, one process or torchrun.

Stages run one after the other on one global step counter: G_m alone (``motion_steps``), then E_id, E_m, G
and R jointly (``generator_steps``), then M_e alone (``mapper_steps``, only when emotion-labelled clips
(``--mead``) or a local CLIP model (``--clip``) are given; otherwise the model keeps the FACS-offset emotion
control of :mod:`.emotion` and the log says so).

Distributed: under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) the process group is gloo on CPU and
nccl on CUDA, the model is wrapped once in ``DistributedDataParallel`` and each rank computes its share of
every global batch (:mod:`.data`); DDP averages the gradients, so N processes follow the one-process run
with the same global batch. Rank 0 writes everything. The logged losses are the global-batch means.

Resumable: every ``checkpoint_every`` steps rank 0 replaces ``MODEL/checkpoint.safetensors`` (weights, all
optimizer moments, step and loss history) atomically; the same command with ``--resume`` continues from it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from talkinghead.errors import UserError

from .config import OneShotConfig, make_config
from .data import ClipSource, motion_batch, open_sources, pair_batch, rank_items
from .expression import build_expression_space
from .model import CHECKPOINT, CONFIG, FORMAT, LOG, MODEL, OneShotModel, read_model_config


class Dist:
    """The process group (or a stand-in for one process)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local)
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The average over ranks of each figure (every rank gets it)."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def flag(self, value: bool) -> bool:
        """True on every rank when ``value`` is True on any (rank 0's decision broadcast, e.g. stop)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([1 if value else 0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _optimizers(model: OneShotModel, cfg: OneShotConfig) -> dict[str, torch.optim.Optimizer]:
    t = cfg.train
    gen = [model.identity_encoder, model.motion_encoder, model.synthesis, model.renderer]
    return {
        "motion": torch.optim.AdamW(list(model.motion_generator.parameters()) + list(model.lip_reader.parameters()),
                                    lr=t.motion_lr, weight_decay=cfg.motion.weight_decay),
        "generator": torch.optim.Adam([p for m in gen for p in m.parameters()], lr=t.generator_lr, betas=(0.0, 0.99)),
        "mapper": torch.optim.Adam(model.emotion_mapper.parameters(), lr=t.mapper_lr),
    }


def stage_plan(cfg: OneShotConfig, with_mapper: bool) -> list[tuple[str, int, int]]:
    """[(stage, first step, end step)] on the global step counter."""
    t = cfg.train
    plan, at = [], 0
    for name, n in (("motion", t.motion_steps), ("generator", t.generator_steps),
                    ("mapper", t.mapper_steps if with_mapper else 0)):
        if n > 0:
            plan.append((name, at, at + n))
            at += n
    return plan


def _mead_sources(root: Path, size: int) -> list[ClipSource]:
    from .mead import scan_mead

    clips = [c for c in scan_mead(root) if c.prepared is not None]
    if not clips:
        raise UserError(f"none of the MEAD clips under {root} is prepared (run talkinghead prepare on them; "
                        "see talkinghead.oneshot.mead)")
    return [ClipSource(c.prepared, size, label=c.emotion, actor=c.actor) for c in clips]


def train(datas: list[Path], out: Path, preset: str = "cpu-small", resume: bool = False,
          overrides: dict | None = None, mead: Path | None = None, clip: Path | None = None,
          lpips: str | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train a one-shot model on prepared datasets ``datas`` into ``out``; returns the train log.

    ``overrides``: config fields to replace (``"motion_steps"`` for TrainConfig, ``"generator.image_size"``...). ``stop_after``: leave after this global
    step as a killed run would (tests and the resume benchmark), with the checkpoint written."""
    from talkinghead.methods.base import config_from_dict, config_to_dict
    from talkinghead.methods.trainer import load_checkpoint, save_checkpoint, save_loss_curve, save_tensors_atomic

    from .model import write_json_atomic

    t_start = time.perf_counter()
    out = Path(out)
    datas = [Path(d) for d in datas]
    dist = Dist()
    try:
        if (out / CONFIG).exists() and not resume:
            raise UserError(f"{out} already holds a model: pass --resume to continue it, or choose another --out")
        meta = read_model_config(out) if resume and (out / CONFIG).exists() else None
        cfg = config_from_dict(OneShotConfig, meta["config"]) if meta else make_config(preset)
        for k, v in (overrides or {}).items():  # "field" of TrainConfig, or "section.field" of any section
            section, _, name = k.rpartition(".")
            setattr(getattr(cfg, section or "train"), name, tuple(v) if isinstance(v, list) else v)
        if preset == "gpu" and dist.device.type != "cuda":
            raise UserError("the gpu preset needs a CUDA GPU (none found); use --preset cpu-small")
        torch.manual_seed(cfg.train.seed)
        sources = open_sources(datas, cfg.generator.image_size)
        space = build_expression_space([s.ds.face_model for s in sources],
                                       [s.ds.tracks.expression[s.train] for s in sources],
                                       cfg.motion.num_coefficients)
        cfg.motion.num_coefficients = space.num_components
        for s in sources:
            s.attach(space)
        emotional = _mead_sources(Path(mead), cfg.generator.image_size) if mead else []
        for s in emotional:
            s.attach(space)
        clip_loss = None
        if clip:
            from .clip_loss import load_clip

            clip_loss = load_clip(clip)
        num_phones = len(sources[0].phone_names)
        meta = {"format": FORMAT, "preset": preset, "config": config_to_dict(cfg),
                "datasets": [str(d.resolve()) for d in datas], "audio_dim": int(sources[0].audio.shape[1]),
                "audio_names": list(sources[0].ds.audio_features.names), "num_phones": num_phones,
                "identity_components": int(space.identity_basis.shape[0]), "fps": sources[0].ds.fps,
                "mead": str(mead) if mead else None, "clip": str(clip) if clip else None}
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / CONFIG, meta)
        model = OneShotModel(cfg, space, meta["audio_dim"], num_phones).to(dist.device)
        if lpips is not None or os.environ.get("TALKINGHEAD_LPIPS"):
            from talkinghead.methods.losses import PerceptualLoss

            model.perceptual, _ = PerceptualLoss.load(lpips)
        opts = _optimizers(model, cfg)
        plan = stage_plan(cfg, with_mapper=bool(emotional) or clip_loss is not None)
        total = plan[-1][2] if plan else 0
        start, history, elapsed_before = 0, {}, 0.0
        if resume and (out / CHECKPOINT).exists():
            loop = load_checkpoint(out, model, list(opts.values()))
            start, history, elapsed_before = loop["step"], loop["history"], loop["elapsed_s"]
        runner = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(model, device_ids=[dist.local] if dist.device.type == "cuda" else None,
                                             find_unused_parameters=True)
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="oneshot train", unit="step", disable=not (progress and dist.main),
                   dynamic_ncols=True)
        t_loop = time.perf_counter()
        stage_time: dict[str, float] = {}
        model.train()
        t = cfg.train
        for name, a, b in plan:
            if start >= b:
                continue
            opt = opts[name]
            bar.set_description(f"oneshot train [{name}]")
            t_stage = time.perf_counter()
            for step in range(max(start, a), b):
                if name == "motion":
                    batch = motion_batch(sources, rank_items(t.motion_batch, dist.rank, dist.world), step, t.seed,
                                         cfg.motion.sequence, cfg.motion.feature_dropout, cfg.motion.time_mask)
                elif name == "generator":
                    batch = pair_batch(sources, rank_items(t.generator_batch, dist.rank, dist.world), step, t.seed,
                                       cfg.motion.motion_window)
                else:
                    batch = _mapper_batch(emotional or sources, sources, rank_items(t.generator_batch, dist.rank,
                                                                                    dist.world), step, cfg)
                    batch["clip"] = clip_loss
                batch = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                opt.zero_grad(set_to_none=True)
                loss, logs = runner(name, batch)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss is {loss.item()} at step {step} ({name})")
                loss.backward()
                opt.step()
                if name == "mapper":
                    model.mapper_trained.fill_(True)
                logs = dist.mean(logs)
                for k, v in logs.items():
                    h = history.setdefault(k, {"steps": [], "values": []})
                    h["steps"].append(step)
                    h["values"].append(float(v))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                done = step + 1
                elapsed = elapsed_before + time.perf_counter() - t_loop
                if done < total and t.checkpoint_every and done % t.checkpoint_every == 0 and dist.main:
                    save_checkpoint(out, model, list(opts.values()), done, history, elapsed)
                if stop_after is not None and done >= stop_after:
                    if dist.main:
                        save_checkpoint(out, model, list(opts.values()), done, history, elapsed)
                    dist.barrier()
                    bar.close()
                    return {"stopped_at": done}
            stage_time[name] = round(time.perf_counter() - t_stage, 2)
        bar.close()
        elapsed = elapsed_before + time.perf_counter() - t_loop
        log = {"format": FORMAT, "preset": preset, "steps": total, "resumed_from": start, "world_size": dist.world,
               "train_time_s": round(elapsed, 2), "stage_time_s": stage_time,
               "wall_time_s": round(time.perf_counter() - t_start, 2), "plan": plan,
               "mapper": ("trained on MEAD clips" if emotional else "trained with the CLIP loss" if clip_loss
                          else "not trained (no emotion-labelled clips, no CLIP weights): --emotion uses the "
                               "FACS expression offsets"),
               "perceptual": "LPIPS (AlexNet) from local weights" if model.perceptual else "off (no local weights)",
               "identity_loss": "off (no local face-recognition weights)",
               "final": {k: float(np.mean(h["values"][-20:])) for k, h in history.items() if h["values"]},
               "history": history}
        if dist.main:
            save_checkpoint(out, model, list(opts.values()), total, history, elapsed)
            save_tensors_atomic(out / MODEL, {f"model.{k}": v for k, v in model.state_dict().items()},
                                metadata={"format": FORMAT})
            write_json_atomic(out / LOG, log)
            save_loss_curve(out, history)
        dist.barrier()
        return log
    finally:
        dist.close()


def _mapper_batch(emotional: list[ClipSource], neutral: list[ClipSource], items: list[int], step: int,
                  cfg: OneShotConfig) -> dict:
    """Driving frames from the labelled clips, the source frame from the same actor's neutral clip."""
    by_actor = {}
    for s in emotional + neutral:
        if s.label == "neutral":
            by_actor.setdefault(s.actor, s)

    def source_of(drv: ClipSource) -> ClipSource:
        return by_actor.get(drv.actor, drv)

    return pair_batch(emotional, items, step, cfg.train.seed, cfg.motion.motion_window, source_of=source_of)

