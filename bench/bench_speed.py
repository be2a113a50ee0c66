"""Where a training iteration and a rendered frame spend their time, for both Gaussian methods, before and after.

Not a test. One run measures two source trees with the same script: ``--before REF`` (a git ref, exported with
``git archive`` into a temporary folder) and this checkout ("after"); each is measured in its own
subprocess (``--worker``), one torch thread, so both see the same machine state as closely as a shared machine
allows. Times are CPU seconds of the process (``time.process_time``: on one thread, what an idle machine's
wall clock would show), the median of the repeats; the load average is recorded beside them.

Parts (each timed in isolation: its inputs detached, its backward driven by a fixed random output gradient;
"iteration" is the whole ``train_loss`` + ``backward`` + optimiser step, timed end to end):

* GaussianTalker, deformation stage: data (``FrameStore.batch``), canonical (triplane f(mu_c) + F_can), tokens
  (audio / eye / view encoders), attention (L blocks), F_deform, raster (frame + mouth crop, forward /
  backward), losses (L1 + D-SSIM + lip L1), geometry loss with its replayed frames, optimiser step.
* GaussianFlameTalk, avatar stage: data, rigging (mesh -> bound Gaussians), raster, losses, optimiser step.
* Render, one frame (``model.render(cond)`` under ``no_grad``, eval mode) at 128^2 over the test split, with its
  parts at 128^2, and 256^2 / 512^2 totals (the same avatar, intrinsics scaled).
* Render only, for the trained avatars of ``--extra`` (default: a DEGSTalk and a Talk3D avatar of the cnn clip,
  when they exist; a tree without the method reports none): frames at the training size over the test split
  and 256^2 / 512^2, every size's Conditions from :class:`talkinghead.methods.data.Conditions`.

    .venv/bin/python bench/bench_speed.py --before 4db0c50 [--avatars GT_DIR GFT_DIR] [--repeats 15] [--no-write]

``--avatars``: trained avatars whose weights are loaded (footprints of a trained head differ from a fresh one's);
default: fresh models from the dataset (deformation switched on). Appends an entry to bench/RESULTS.md under
"## Speed (bench/bench_speed.py)".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path("/work/scratch/s8/data/cnn")  # default --data: the cnn clip (Whisper features)
METHODS = ("gaussiantalker", "gaussianflametalk")
EXTRA = ("/work/scratch/degstalk/runs/cnn_degstalk", "/work/scratch/s6/s6-t3d/full")


# ------------------------------------------------------------------------------------------ worker side


def cpu_ms(fn, repeats: int) -> float:
    """Median CPU milliseconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1000)
    return statistics.median(times)


def fwd_bwd(fn, inputs, repeats: int) -> tuple[float, float]:
    """(forward ms, backward ms) of ``fn(*inputs)`` -> tensor or dict/tuple of tensors, each output's gradient a
    fixed random tensor of its shape."""
    import torch

    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]

    def outs():
        out = fn(*leaves)
        if isinstance(out, dict):
            out = list(out.values())
        elif torch.is_tensor(out):
            out = [out]
        return [o for o in out if torch.is_tensor(o) and o.requires_grad]

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(o.shape, generator=gen) * 1e-3 for o in outs()]
    f_ms = cpu_ms(lambda: outs(), repeats)

    def backward():
        o = outs()
        t = time.process_time()
        torch.autograd.backward(o, grads)
        return (time.process_time() - t) * 1000

    backward()
    b_ms = statistics.median(backward() for _ in range(repeats))
    return f_ms, b_ms


def build(method: str, avatar: str | None, data: Path):
    """(model in train mode, its config, the train FrameStore subset, the test FrameStore)."""
    import torch

    from talkinghead.methods import get_method
    from talkinghead.methods.data import FrameStore, open_dataset

    spec = get_method(method)
    cfg = spec.make_config("cpu-small", None)
    if method == "gaussianflametalk":
        cfg.stages = ("avatar",)  # FlameTalk's own training is not timed here; its weights come with --avatars
    store = FrameStore(data, cfg.data, split="train", pick=list(range(0, 1600, 40)), progress=False)
    model = spec.build(cfg, store.info, dataset=open_dataset(data, size=cfg.data.size))
    if avatar:
        from safetensors.torch import load_file

        state = {k[6:]: v for k, v in load_file(str(Path(avatar) / "model.safetensors")).items()
                 if k.startswith("model.")}
        model.load_state_dict(state)
    test = FrameStore(data, dataclasses.replace(cfg.data, mouth_crop=0), info=store.info, split="test",
                      with_targets=False, progress=False)
    torch.manual_seed(0)
    return model, cfg, store, test


def iteration_ms(model, store, step: int, repeats: int) -> float:
    opts = model.optimizers()
    model.train()
    k = [0]

    def one():
        b = store.batch(k[0] % len(store))
        k[0] += 1
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss, _ = model.train_loss(b, step)
        loss.backward()
        for o in opts:
            o.step()
        model.after_step(step)

    for _ in range(len(store)):  # every frame once: fills GaussianTalker's replay bank as training does
        one()
    return cpu_ms(one, repeats)


def gaussiantalker_parts(model, cfg, store, repeats: int) -> dict:
    import torch

    from talkinghead.methods.losses import dssim

    step = cfg.schedule.iterations - 1  # deformation stage
    res = {"iteration": iteration_ms(model, store, step, repeats)}
    b = store.batch(1)
    res["data"] = cpu_ms(lambda: store.batch(2), repeats)
    res["canonical"] = fwd_bwd(lambda m: model.f_can(model.triplane(m)), [model.means], repeats)
    with torch.no_grad():
        f = model.triplane(model.means)
        tokens = model.tokens(b.cond)
        z, _ = model.attention(f, tokens)
    res["tokens"] = fwd_bwd(lambda a, bl, v: model._tokens(a, bl, v), [b.cond.audio, b.cond.blink, b.cond.viewmat],
                            repeats)
    res["attention"] = fwd_bwd(lambda f_, t_: model.attention(f_, t_)[0], [f, tokens], repeats)
    res["deform"] = fwd_bwd(lambda z_: model.f_deform(z_), [z], repeats)
    with torch.no_grad():
        g = model.gaussians(b.cond, deform=True)
    keys = ("means", "quats", "scales", "opacities", "sh")
    m = b.mouth

    def raster(*t):
        gg = dict(zip(keys, t))
        return (model._raster(gg, b.cond.viewmat, b.cond.K, b.cond.backdrop),
                model._raster(gg, b.cond.viewmat, m.K, m.backdrop))

    res["raster"] = fwd_bwd(raster, [g[k] for k in keys], repeats)
    with torch.no_grad():
        pred, crop = raster(*[g[k] for k in keys])

    def losses(p, c):
        return ((p - b.image).abs().mean() + cfg.lambda_dssim * dssim(p, b.image)
                + cfg.lambda_lip * (c - m.image).abs().mean())

    res["losses"] = fwd_bwd(losses, [pred, crop], repeats)

    if len(model._geo_bank):  # empty with the lip prior: no geometry loss, nothing replayed
        res["geometry replay (fwd+bwd)"] = cpu_ms(lambda: replay_only(model, cfg, b), repeats)
    opt = model.optimizers()[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    res["optimizer step"] = cpu_ms(lambda: (opt.step(), model.after_step(step)), repeats)
    return res


def replay_only(model, cfg, b):
    """The replayed frames' part of GaussianTalker's geometry loss, forward + backward (as train_loss does it)."""
    import torch

    if hasattr(model, "replay_geometry_loss"):  # the batched form (after issue 16)
        return model.replay_geometry_loss().backward()

    f_geo = model.triplane(model.means[model.geo_points])
    pick = model._geo_rng.integers(len(model._geo_bank), size=cfg.geo_replay)
    extra = []
    for i in pick:
        audio, blink, viewmat, expr = model._geo_bank[i]
        zz, _ = model.attention(f_geo, model._tokens(audio, blink, viewmat))
        extra.append(model._geo_error(model.f_deform(zz)["means"] * model.offset_scale, expr))
    torch.stack(extra).sum().backward()


def gaussianflametalk_parts(model, cfg, store, repeats: int) -> dict:
    import torch

    from talkinghead.methods.losses import dssim

    res = {"iteration": iteration_ms(model, store, 0, repeats)}
    a = model.avatar
    b = store.batch(1)
    i = b.cond.index
    res["data"] = cpu_ms(lambda: store.batch(2), repeats)
    res["rigging"] = fwd_bwd(lambda e: a.gaussians(e), [a.frame_expression(i).detach()], repeats)
    with torch.no_grad():
        g = a.gaussians(a.frame_expression(i))
        viewmat = a.frame_viewmat(i, b.cond.viewmat)
    keys = ("means", "quats", "scales", "opacities", "sh")
    m = b.mouth

    def raster(*t):
        gg = dict(zip(keys, t))
        img, alpha = model._raster(gg, viewmat, b.cond.K, b.cond.backdrop)
        crop, _ = model._raster(gg, viewmat, m.K, m.backdrop)
        return img, alpha, crop

    res["raster"] = fwd_bwd(raster, [g[k] for k in keys], repeats)
    with torch.no_grad():
        pred, alpha, crop = raster(*[g[k] for k in keys])

    def losses(p, al, c):
        return ((p - b.image).abs().mean() + cfg.lambda_dssim * dssim(p, b.image)
                + cfg.lambda_alpha * (al[..., 0] - b.head_mask).abs().mean()
                + cfg.lambda_lip * (c - m.image).abs().mean())

    res["losses"] = fwd_bwd(losses, [pred, alpha, crop], repeats)
    opt = model.optimizers()[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    res["optimizer step"] = cpu_ms(lambda: (opt.step(), model.after_step(0)), repeats)
    return res


def render_parts(method: str, model, test, repeats: int) -> dict:
    import torch

    from talkinghead.methods.data import FrameStore

    model.eval()
    res = {}
    with torch.no_grad():
        conds = [test.condition(k) for k in range(len(test))]
        for c in conds[:3]:
            model.render(c)
        t = time.process_time()
        for c in conds:
            model.render(c)
        res["frame 128"] = (time.process_time() - t) * 1000 / len(conds)
        c = conds[len(conds) // 2]
        if method == "gaussiantalker":
            res["tokens"] = cpu_ms(lambda: model.tokens(c), repeats)
            g = model.gaussians(c, deform=True)
        else:
            model.train().eval()  # a fresh stream: FlameTalk runs over the split's consecutive windows
            t = time.process_time()
            exprs = [model._expression(cc, model.speech_for(cc)) for cc in conds]
            res["flametalk (streaming) + expression"] = (time.process_time() - t) * 1000 / len(conds)
            expr = exprs[len(conds) // 2]
            static = model._frozen.get(model)  # as render() rigs: with the kept expression-independent state
            res["rigging"] = cpu_ms(lambda: model.avatar.gaussians(expr, static), repeats)
            g = model.avatar.gaussians(expr, static)
        res["raster"] = cpu_ms(lambda: model._raster(g, c.viewmat, c.K, c.backdrop), repeats)
        for size in (256, 512):
            scale = size / test.cfg.size
            K = c.K.clone()
            K[:2] *= scale
            big = torch.nn.functional.interpolate(c.backdrop.permute(2, 0, 1)[None], size=(size, size))[0]
            cond = dataclasses.replace(c, K=K, backdrop=big.permute(1, 2, 0).contiguous())
            res[f"frame {size}"] = cpu_ms(lambda: model.render(cond), max(3, repeats // 3))
    return res


def extra_render(avatar: str, repeats: int) -> dict:
    """Render-only figures of a trained avatar (any method) over its dataset's test split: CPU ms per frame at
    the training size (every test frame) and at 256^2 / 512^2 (``repeats`` frames)."""
    import torch

    from talkinghead.methods.data import Conditions, open_dataset
    from talkinghead.methods.render import render_condition
    from talkinghead.methods.trainer import load_model

    _, cfg, _, model, meta = load_model(Path(avatar))
    ds = open_dataset(meta["data"])
    test = ds.split_indices("test")
    res = {"method": meta["method"]}
    with torch.no_grad():
        for size in (cfg.data.size, 256, 512):
            make = Conditions(meta["data"], size, cfg.data.audio_radius,
                              source_frames=getattr(cfg.data, "source_frames", False))
            frames = test if size == cfg.data.size else test[len(test) // 2:][:max(3, repeats // 3)]
            conds = [make(i) for i in frames]
            for c in conds[:2]:
                render_condition(model, c, cfg.data.size)
            t = time.process_time()
            for c in conds:
                render_condition(model, c, cfg.data.size)
            res[f"frame {size}"] = (time.process_time() - t) * 1000 / len(conds)
    return res


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    out = {"load_start": os.getloadavg()}
    avatars = dict(zip(METHODS, args.avatars or [None, None]))
    for method in METHODS:
        model, cfg, store, test = build(method, avatars[method], Path(args.data))
        parts = gaussiantalker_parts if method == "gaussiantalker" else gaussianflametalk_parts
        out[method] = {"train": parts(model, cfg, store, args.repeats),
                       "render": render_parts(method, model, test, args.repeats)}
        print(method, json.dumps(out[method]), flush=True)
    from talkinghead.methods import available_methods

    for avatar in args.extra:
        method = json.loads((Path(avatar) / "config.json").read_text())["method"]
        if method in available_methods():  # the "before" tree may predate the method
            try:
                out.setdefault("extra", {})[avatar] = extra_render(avatar, args.repeats)
            except Exception as e:  # an avatar this tree cannot load (a later or earlier format): reported, skipped
                print(avatar, "not measured:", repr(e)[:200], flush=True)
                continue
            print(avatar, json.dumps(out["extra"][avatar]), flush=True)
    out["load_end"] = os.getloadavg()
    Path(args.worker).write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------------------ driver side


def export_tree(ref: str, dest: Path) -> Path:
    """``src`` of git ref ``ref`` under ``dest`` (git archive); returns the src folder."""
    root = HERE.parent
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def run_tree(src: Path, args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--repeats", str(args.repeats),
           "--data", str(args.data), "--extra", *args.extra]
    if args.avatars:
        cmd += ["--avatars", *args.avatars]
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def fmt(v) -> str:
    if isinstance(v, list):
        return f"{v[0]:.1f} / {v[1]:.1f}"
    return f"{v:.1f}"


def table(before: dict, after: dict, method: str, what: str) -> list[str]:
    rows = ["| part | before (ms) | after (ms) | speed-up |", "|---|---|---|---|"]
    for key, b in before[method][what].items():
        a = after[method][what].get(key)
        tb = sum(b) if isinstance(b, list) else b
        ta = (sum(a) if isinstance(a, list) else a) if a is not None else None
        up = f"{tb / ta:.2f}x" if ta else "--"
        rows.append(f"| {key}{' (fwd / bwd)' if isinstance(b, list) else ''} | {fmt(b)} | "
                    f"{fmt(a) if a is not None else '--'} | {up} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="git ref of the 'before' tree")
    ap.add_argument("--avatars", nargs=2, default=None, metavar=("GAUSSIANTALKER", "GAUSSIANFLAMETALK"))
    ap.add_argument("--data", default=str(DATA),
                    help="the prepared clip the parts are measured on (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--extra", nargs="*", default=[a for a in EXTRA if (Path(a) / "model.safetensors").exists()],
                    metavar="AVATAR", help="trained avatars of other methods, render figures only")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(HERE))
    from benchlib import ROOT, append_entry, stamp

    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        tmp = Path(tmp)
        res = {}
        if args.before:
            res["before"] = run_tree(export_tree(args.before, tmp), args, tmp / "before.json")
        res["after"] = run_tree(ROOT / "src", args, tmp / "after.json")
    before = res.get("before", res["after"])
    after = res["after"]
    lines = [f"### {stamp()}", "",
             f"Before: `{args.before}`, after: this commit. CPU ms per call (process time, 1 thread, median of "
             f"{args.repeats}); load average {' / '.join(f'{x:.1f}' for x in before['load_start'])} at the "
             f"start, {' / '.join(f'{x:.1f}' for x in after['load_end'])} at the end. Avatars: "
             f"{'trained (' + ', '.join(args.avatars) + ')' if args.avatars else 'fresh from the dataset'}; data "
             f"{args.data}.", ""]
    for method in METHODS:
        for what in ("train", "render"):
            lines += [f"{method}, {'one training iteration' if what == 'train' else 'one rendered frame'}:", ""]
            lines += table(before, after, method, what) + [""]
        tb, ta = before[method]["train"]["iteration"], after[method]["train"]["iteration"]
        fb, fa = before[method]["render"]["frame 128"], after[method]["render"]["frame 128"]
        lines += [f"**{method}**: {1000 / tb:.2f} -> {1000 / ta:.2f} it/s (CPU), render 128^2 "
                  f"{1000 / fb:.1f} -> {1000 / fa:.1f} FPS (CPU, one thread).", ""]
    extra = after.get("extra", {})
    if extra:
        lines += ["Other methods, render only (trained avatars; CPU ms per frame, FPS of CPU time in brackets; "
                  "'--': the before tree has no such method):", "",
                  "| avatar | method | size | before (ms) | after (ms) |", "|---|---|---|---|---|"]
        for avatar, a in extra.items():
            b = before.get("extra", {}).get(avatar, {}) if before is not after else {}
            for key in (k for k in a if k.startswith("frame")):
                bb = f"{b[key]:.1f} ({1000 / b[key]:.1f})" if key in b else "--"
                lines.append(f"| {avatar} | {a['method']} | {key[6:]}^2 | {bb} | {a[key]:.1f} ({1000 / a[key]:.1f}) |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (Path(tempfile.gettempdir()) / "bench_speed.json").write_text(json.dumps(res, indent=1))
    if not args.no_write:
        append_entry("## Speed (bench/bench_speed.py)", text, intro=(
            "Issue 16: a training iteration and a rendered frame split into parts, before and after, both methods."))


if __name__ == "__main__":
    main()
