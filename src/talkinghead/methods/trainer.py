"""The one training loop every method uses: ``talkinghead train DATA --method NAME --out AVATAR``.

The loop only knows the :class:`~talkinghead.methods.base.Method` protocol: it draws training frames in a
seeded per-epoch permutation (reproducible without saving sampler state), calls ``train_loss``, steps the
method's optimizers, then ``after_step``. Around it:

* progress bar with the loss and iterations/s;
* every ``schedule.val_every`` iterations: ``AVATAR/val/step_NNNNNN.png`` (held-out test frames, ground
  truth above, render below) and ``AVATAR/loss.png`` (the logged figures against the iteration);
* every ``schedule.checkpoint_every`` iterations: ``AVATAR/checkpoint.safetensors`` -- weights, optimizer
  moments and the loop state in one file replaced atomically -- so ``--resume`` continues a killed run;
* at the end: ``AVATAR/model.safetensors`` (weights), ``AVATAR/config.json`` (method, variant, preset, full
  config, dataset info) and ``AVATAR/train_log.json`` (``method``, ``train_time_s``, ``iterations``, ...).

An avatar folder is identified by ``config.json``'s ``method``; it is written first (atomically) so that a
resumed run can check that it continues the same method on the same data.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from talkinghead.errors import UserError
from talkinghead.fileio import publish, temp_file

from . import get_method
from .base import DatasetInfo, config_from_dict, config_to_dict
from .data import FrameStore, open_dataset

FORMAT = "talkinghead-avatar/1"
CONFIG, MODEL, CHECKPOINT, LOG = "config.json", "model.safetensors", "checkpoint.safetensors", "train_log.json"


# ---------------------------------------------------------------------------------------------- files


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = temp_file(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = temp_file(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_avatar_config(avatar: Path) -> dict[str, Any]:
    """``AVATAR/config.json`` or a UserError when ``avatar`` is not an avatar folder."""
    path = Path(avatar) / CONFIG
    if not path.is_file():
        raise UserError(f"{avatar} is not an avatar folder (no {CONFIG}; make one with `talkinghead train`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if data.get("format") != FORMAT or "method" not in data:
        raise UserError(f"{path} is not a talkinghead avatar config (format {data.get('format')!r})")
    return data


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(avatar: Path, expect_method: str | None = None, device: torch.device | None = None):
    """(spec, config, DatasetInfo, model in eval mode on ``device``, avatar meta) of a trained avatar."""
    from safetensors.torch import load_file

    meta = read_avatar_config(avatar)
    if expect_method is not None and meta["method"] != expect_method:
        raise UserError(f"{avatar} is a {meta['method']!r} avatar, not {expect_method!r}")
    spec = get_method(meta["method"])
    cfg = config_from_dict(spec.config_type, meta["config"])
    info = config_from_dict(DatasetInfo, meta["info"])
    weights = Path(avatar) / MODEL
    if not weights.is_file():
        ckpt = Path(avatar) / CHECKPOINT
        if not ckpt.is_file():
            raise UserError(f"{avatar} has no trained weights ({MODEL}); did training finish?")
        weights = ckpt
    state = {k[len("model."):]: v for k, v in load_file(str(weights)).items() if k.startswith("model.")}
    model = spec.build(cfg, info)
    model.load_state_dict(state)
    if isinstance(model, torch.nn.Module):
        model.to(device or default_device()).eval()
    return spec, cfg, info, model, meta


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, groups = {}, []
    for j, opt in enumerate(opts):
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for key, val in st.items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"opt{j}.{pid}.{key}"] = t
        groups.append(sd["param_groups"])
    return tensors, groups


def _load_optimizers(opts: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], groups: list) -> None:
    for j, opt in enumerate(opts):
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"opt{j}."
        for name, t in tensors.items():
            if name.startswith(prefix):
                pid, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[key] = t
        opt.load_state_dict({"state": state, "param_groups": groups[j]})


def save_checkpoint(out: Path, model, opts, step: int, history: dict, elapsed: float) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, groups = _optimizer_tensors(opts)
    tensors.update(opt_tensors)
    loop = {"step": step, "history": history, "elapsed_s": elapsed, "param_groups": groups}
    save_tensors_atomic(out / CHECKPOINT, tensors, metadata={"loop": json.dumps(loop)})


def load_checkpoint(out: Path, model, opts) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out / CHECKPOINT
    with safe_open(str(path), "pt") as f:
        loop = json.loads(f.metadata()["loop"])
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizers(opts, {k: v for k, v in tensors.items() if k.startswith("opt")}, loop["param_groups"])
    return loop


# ---------------------------------------------------------------------------------------------- pictures


def _save_png(path: Path, image: np.ndarray) -> None:
    import matplotlib.image

    tmp = temp_file(path, ".png")
    matplotlib.image.imsave(tmp, np.clip(image, 0, 1))
    publish(tmp, path)


def save_validation(out: Path, model, val: FrameStore, step: int) -> float:
    """PNG of the validation frames (ground truth row over render row); returns their mean PSNR."""
    rows_gt, rows_pr, psnrs = [], [], []
    with torch.no_grad():
        for k in range(len(val)):
            b = val.batch(k)
            pred = model.render(b.cond.to(device_of(model))).clamp(0, 1).cpu()
            psnrs.append(float(-10 * torch.log10(((pred - b.image) ** 2).mean().clamp(min=1e-10))))
            rows_gt.append(b.image.numpy())
            rows_pr.append(pred.numpy())
    grid = np.concatenate([np.concatenate(rows_gt, 1), np.concatenate(rows_pr, 1)], 0)
    (out / "val").mkdir(exist_ok=True)
    _save_png(out / "val" / f"step_{step:06d}.png", grid)
    return float(np.mean(psnrs))


def device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def save_loss_curve(out: Path, history: dict[str, dict[str, list]]) -> None:
    """``AVATAR/loss.png``: each logged figure (moving average) against the iterations where it was logged.

    Nothing is written before a figure has been logged (e.g. a FlameTalk-only run has no image iterations).
    """
    if not any(h["values"] for h in history.values()):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, h in history.items():
        if not h["values"]:
            continue
        v = np.asarray(h["values"], dtype=np.float64)
        k = max(1, len(v) // 50)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(h["steps"][k - 1:len(smooth) + k - 1], smooth, label=name)
    ax.set_xlabel("iteration")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = temp_file(out / "loss.png", ".png")
    fig.savefig(tmp)
    plt.close(fig)
    publish(tmp, out / "loss.png")


# ---------------------------------------------------------------------------------------------- the loop


def train(data: Path, method: str, out: Path, preset: str = "cpu-small", variant: str | None = None,
          resume: bool = False, iterations: int | None = None, progress: bool = True,
          seed: int | None = None) -> dict[str, Any]:
    """Train ``method`` on the prepared dataset ``data`` into the avatar folder ``out``; returns train_log.

    ``iterations`` and ``seed`` override the preset's (a resumed run keeps the seed it started with)."""
    t_start = time.perf_counter()
    data, out = Path(data), Path(out)
    spec = get_method(method)
    if preset not in spec.presets:
        raise UserError(f"method {method!r} has no preset {preset!r} (presets: {', '.join(spec.presets)})")
    if variant is not None and variant not in spec.variants:
        known = ", ".join(spec.variants) or "none"
        raise UserError(f"method {method!r} has no variant {variant!r} (variants: {known})")
    open_dataset(data)  # a one-line error before anything is written
    if (out / CONFIG).exists() and not resume:
        raise UserError(f"{out} already holds an avatar: pass --resume to continue it, or choose another --out")
    if resume and (out / CONFIG).exists():
        meta = read_avatar_config(out)
        if meta["method"] != method:
            raise UserError(f"{out} holds a {meta['method']!r} avatar; cannot resume it as {method!r}")
        cfg = config_from_dict(spec.config_type, meta["config"])
    else:
        cfg = spec.make_config(preset, variant)
        meta = None
        ds = open_dataset(data)
        cfg.schedule.iterations = cfg.schedule.for_clip(len(ds.split_indices("train")) / ds.fps)
    if iterations is not None:
        cfg.schedule.iterations = int(iterations)
    if seed is not None and meta is None:
        cfg.schedule.seed = int(seed)
    device = default_device()
    if preset == "gpu" and device.type != "cuda":
        raise UserError("the gpu preset needs a CUDA GPU (none found); use --preset cpu-small")
    _check_writable(out)

    torch.manual_seed(cfg.schedule.seed)
    store = FrameStore(data, cfg.data, split="train", progress=progress)
    info = store.info if meta is None else config_from_dict(DatasetInfo, meta["info"])
    store.info = info
    val = _validation_store(data, cfg, info)
    fresh = not (resume and (out / CHECKPOINT).exists())
    model = spec.build(cfg, info, dataset=open_dataset(data, size=cfg.data.size) if fresh else None)
    if isinstance(model, torch.nn.Module):
        model.to(device)
    opts = model.optimizers()
    meta = {"format": FORMAT, "method": method, "variant": variant, "preset": preset, "data": str(data.resolve()),
            "config": config_to_dict(cfg), "info": config_to_dict(info)}
    write_json_atomic(out / CONFIG, meta)

    start, history, elapsed_before = 0, {}, 0.0  # history: name -> {"steps": [...], "values": [...]}
    if not fresh:
        loop = load_checkpoint(out, model, opts)
        start, history, elapsed_before = loop["step"], loop["history"], loop["elapsed_s"]
    load_s = time.perf_counter() - t_start

    total = cfg.schedule.iterations
    n = len(store)
    from tqdm import tqdm

    t_loop = time.perf_counter()
    last_psnr = float("nan")
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train {method}", unit="it",
               disable=not progress, dynamic_ncols=True)
    if isinstance(model, torch.nn.Module):
        model.train()
    for step in bar:
        epoch, pos = divmod(step, n)
        k = int(np.random.default_rng(cfg.schedule.seed + epoch).permutation(n)[pos])
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss, logs = model.train_loss(store.batch(k).to(device), step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at iteration {step}")
        loss.backward()
        for o in opts:
            o.step()
        model.after_step(step)
        for name, v in logs.items():
            h = history.setdefault(name, {"steps": [], "values": []})
            h["steps"].append(step)
            h["values"].append(float(v))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        done = step + 1
        elapsed = elapsed_before + time.perf_counter() - t_loop
        if done == total or (cfg.schedule.val_every and done % cfg.schedule.val_every == 0):
            last_psnr = _validate(out, model, val, done, history)
        if done < total and cfg.schedule.checkpoint_every and done % cfg.schedule.checkpoint_every == 0:
            save_checkpoint(out, model, opts, done, history, elapsed)
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t_loop
    if start >= total and val is not None:
        last_psnr = _validate(out, model, val, total, history)
    save_checkpoint(out, model, opts, total, history, elapsed)
    save_tensors_atomic(out / MODEL, {f"model.{k}": v for k, v in model.state_dict().items()},
                        metadata={"method": method})
    log = {
        "method": method,
        "variant": variant,
        "preset": preset,
        "iterations": total,
        "seed": cfg.schedule.seed,
        "resumed_from": start,
        "train_time_s": round(elapsed, 2),
        "load_time_s": round(load_s, 2),
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "size": cfg.data.size,
        "train_frames": n,
        "val_psnr": None if math.isnan(last_psnr) else round(last_psnr, 3),
        "final": {k: float(np.mean(h["values"][-50:])) for k, h in history.items() if h["values"]},
    }
    log.update(getattr(model, "log_extras", lambda: {})())
    write_json_atomic(out / LOG, log)
    return log


def _validation_store(data: Path, cfg, info: DatasetInfo) -> FrameStore | None:
    """Two held-out frames (start and middle of the test split) for the validation PNGs."""
    ds = open_dataset(data)
    test = np.asarray(ds.split_indices("test"))
    if test.size == 0:
        return None
    return FrameStore(data, _no_crop(cfg.data), info=info, split="test", pick=[0, len(test) // 2], progress=False)


def _no_crop(dcfg):
    import dataclasses

    return dataclasses.replace(dcfg, mouth_crop=0)


def _validate(out: Path, model, val: FrameStore | None, step: int, history: dict) -> float:
    if isinstance(model, torch.nn.Module):
        model.eval()
    psnr = save_validation(out, model, val, step) if val is not None else float("nan")
    save_loss_curve(out, history)
    if isinstance(model, torch.nn.Module):
        model.train()
    return psnr
