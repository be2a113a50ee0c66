"""``talkinghead eval`` (metrics and a report for one run) and ``talkinghead compare`` (one table for many)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from talkinghead.errors import UserError
from talkinghead.fileio import publish, temp_dir, temp_file

EVAL_HELP = """\
Measure a talking-head video the way the papers do, and write a report folder.

forms:
  talkinghead eval --pred PRED.mp4 --gt GT.mp4 --out REPORT    self-driven: frame-aligned ground truth
  talkinghead eval --pred PRED.mp4 [--audio WAV] --out REPORT  cross-driven: no ground-truth frames (audio:
                                                               PRED's own sound track unless --audio)
  talkinghead eval AVATAR --data DATA --out REPORT             render the dataset's test split, then
                                                               evaluate it (+ training time, render FPS)

With AVATAR, eval compares crop with crop: the test split rendered as the square crop at --size N (default:
the avatar's training size), against the dataset's crop images resized to N x N -- the same video as
`talkinghead render AVATAR --split test --crop --size N`. (A full-frame render is the source video outside
the crop box; compare it with the source's frames via --pred/--gt.) The report states the size it measured at.

metrics: PSNR/SSIM on the face (mask from --mask-from DATA's parsing, else the face-mesh oval) and the full
frame; mean absolute error in a band around the hair-face boundary and along the jaw line over the neck
(from the dataset's parsing: --mask-from DATA or AVATAR --data DATA); LPIPS (AlexNet, local weights only); LMD on mouth and all landmarks (pixels at 512 px width, and
/ interocular distance); mouth-opening correlation; blink error; AU-error proxy; stability score
(GaussianFlameTalk sec. 3.3); landmark sync (audio offset and confidence from mouth opening vs the audio's
articulation signal); SyncNet confidence with local weights. A metric that cannot be computed is null in
metrics.json with the reason, never a made-up number.

REPORT gets metrics.json, report.md, mouth_opening.png, nose.png, psnr.png, sync.png and side_by_side.mp4
(ground truth | prediction | error heat map). It is written to a temporary folder and moved in place at
the end; an existing report folder is replaced.
"""

COMPARE_HELP = """\
Gather the metrics.json of several eval reports into one markdown table laid out like the papers'
(one row per run, metric columns with arrows: higher or lower is better, best value in bold).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="metrics, plots and a side-by-side video for a rendered video",
                              description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("avatar", nargs="?", type=Path, metavar="AVATAR",
                   help="avatar folder from `talkinghead train` (renders DATA's test split; needs --data)")
    p.add_argument("--data", type=Path, help="prepared dataset of the avatar (with AVATAR)")
    p.add_argument("--size", type=int, default=None, metavar="N",
                   help="with AVATAR: render and measure the crop at N x N (default: the avatar's training size)")
    p.add_argument("--pred", type=Path, help="the prediction video to evaluate")
    p.add_argument("--gt", type=Path, help="its ground truth, frame-aligned (self-driven)")
    p.add_argument("--audio", type=Path, help="the driving audio (cross-driven; default: PRED's sound track)")
    p.add_argument("--ref", type=Path, help="cross-driven: a reference video of the person for the stability "
                                            "score (e.g. the video whose head poses drove the render)")
    p.add_argument("--mask-from", type=Path, metavar="DATA",
                   help="prepared dataset whose test-split parsing gives the face masks (GT frame i = test frame i)")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="report folder to write")
    p.add_argument("--lpips-weights", type=Path, metavar="DIR",
                   help="folder with alex.pth and alexnet-owt-*.pth (default: $TALKINGHEAD_LPIPS_WEIGHTS, then "
                        "~/.cache/torch/hub/checkpoints)")
    p.add_argument("--syncnet-weights", type=Path, metavar="FILE",
                   help="syncnet_v2.model (default: $TALKINGHEAD_SYNCNET_WEIGHTS)")
    p.add_argument("--no-video", action="store_true", help="skip the side-by-side video (faster)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default %(default)s, as train and render: one thread is fastest "
                        "when other jobs share the cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)

    c = subparsers.add_parser("compare", help="one paper-style table from several eval reports",
                              description=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("reports", nargs="+", type=Path, metavar="REPORT_DIR", help="folders written by eval")
    c.add_argument("--out", type=Path, required=True, metavar="TABLE.md", help="markdown file to write")
    c.set_defaults(func=run_compare)


def _check_args(args) -> str:
    """The form of the command ("avatar", "self", "cross"), or a UserError for a wrong combination."""
    if args.avatar is not None:
        if args.pred or args.gt or args.audio or args.ref:
            raise UserError("give either AVATAR --data DATA, or --pred with --gt/--audio, not both")
        if args.data is None:
            raise UserError("AVATAR needs --data DATA (the prepared dataset whose test split to render)")
        return "avatar"
    if args.size is not None:
        raise UserError("--size goes with AVATAR (it sets the render size); --pred is measured at its own size")
    if args.data is not None:
        raise UserError("--data goes with AVATAR; for face masks from a dataset use --mask-from DATA")
    if args.pred is None:
        raise UserError("nothing to evaluate: give --pred PRED.mp4 with --gt GT.mp4 or --audio WAV, or AVATAR --data DATA")
    if args.gt is not None and args.ref is not None:
        raise UserError("--ref is for cross-driven runs; with --gt the ground truth is the reference")
    if args.gt is None and args.mask_from is not None:
        raise UserError("--mask-from needs --gt (masks are for comparing with ground-truth frames)")
    return "self" if args.gt is not None else "cross"


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (moved onto ``out`` by :func:`_commit_out`)."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").exists():
        raise UserError(f"--out {out} is a non-empty folder that is not an eval report; choose another")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return temp_dir(out)
    except OSError as exc:
        raise UserError(f"cannot write to {out.parent}: {exc.strerror}") from None


def _commit_out(tmp: Path, out: Path) -> None:
    out = out.resolve()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    publish(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dataset_parsing(data: Path, indices=None):
    """parsing_fn(i, gt_frame) -> labels [H, W] from a prepared dataset's test-split parsing (GT frame i = test
    frame i), at the frames' size."""
    from talkinghead.data import PreparedDataset

    state: dict = {}

    def parsing_fn(i: int, frame):
        if "ds" not in state:
            state["ds"] = PreparedDataset(data, size=frame.shape[1])
            state["idx"] = state["ds"].split_indices("test") if indices is None else indices
        ds, idx = state["ds"], state["idx"]
        if i >= len(idx):
            raise UserError(f"--mask-from {data}: the ground truth has more frames than the test split "
                            f"({len(idx)}); is it the test split of this dataset?")
        labels = ds.parsing(int(idx[i]))
        if labels.shape != frame.shape[:2]:
            raise UserError(f"--mask-from {data}: parsing is {labels.shape[1]}x{labels.shape[0]}, frames are "
                            f"{frame.shape[1]}x{frame.shape[0]}")
        return labels

    return parsing_fn


def _avatar_run(args, tmp: Path, opts):
    """Render the test split into the report, return (pred clip, gt clip, parsing_fn, speed metrics)."""
    import numpy as np

    from talkinghead.data import PreparedDataset
    from talkinghead.media import probe
    from talkinghead.methods import render_split
    from talkinghead.methods.trainer import read_avatar_config

    from .evaluate import Clip

    pred_mp4 = tmp / "prediction.mp4"
    size = args.size or int(read_avatar_config(args.avatar)["info"]["size"])
    res = render_split(args.avatar, args.data, "test", pred_mp4, size=size, full_frame=False)
    width = probe(pred_mp4).width
    ds = PreparedDataset(args.data, size=width)
    idx = ds.split_indices("test")
    fps = ds.fps

    def gt_frames():
        for i in idx:
            yield np.round(ds.image(int(i)) * 255.0).astype(np.uint8)

    gt = Clip(f"{args.data} (test split, frames {idx[0]}..{idx[-1]})", fps, gt_frames, lambda: ds.split_audio("test"))
    pred = Clip.from_file(pred_mp4, fps)
    speed = {"render_fps": res.get("fps"), "measured_on": (
        f"the square crop at {width}x{width}: the test split rendered at {width}x{width}, against the dataset's "
        f"crop images resized to {width}x{width}")}
    log = args.avatar / "train_log.json"
    train = json.loads(log.read_text()) if log.is_file() else {}
    speed["train_time_s"] = train.get("train_time_s")
    speed["method"] = train.get("method") or res.get("method")
    return pred, gt, _dataset_parsing(args.data, idx), speed


def run_eval(args) -> int:
    from .evaluate import Clip, EvalOptions, evaluate
    from .report import fmt, write_report

    form = _check_args(args)
    import torch

    torch.set_num_threads(max(1, args.threads))
    for path in (args.pred, args.gt, args.audio, args.ref):
        if path is not None and not path.is_file():
            raise UserError(f"file not found: {path}")
    if args.avatar is not None and not args.avatar.is_dir():
        raise UserError(f"avatar folder not found: {args.avatar}")
    tmp = _prepare_out(args.out)
    try:
        opts = EvalOptions(lpips_weights=args.lpips_weights, syncnet_weights=args.syncnet_weights,
                           side_by_side=None if (args.no_video or form == "cross") else tmp / "side_by_side.mp4",
                           progress=not args.quiet)
        speed = {}
        audio = None
        if form == "avatar":
            pred, gt, parsing_fn, speed = _avatar_run(args, tmp, opts)
            audio = gt.audio()  # the split's audio that drove the render, not its AAC re-encoding
        else:
            from talkinghead.media import probe, read_audio

            gt = Clip.from_file(args.gt) if args.gt else None
            pred = Clip.from_file(args.pred, gt.fps if gt else None)
            pred_rate = probe(args.pred).avg_fps
            parsing_fn = _dataset_parsing(args.mask_from) if args.mask_from else None
            # on the file's video clock (media.read_audio); without --audio evaluate() takes PRED's own track
            audio = read_audio(args.audio) if args.audio else None
        ref = Clip.from_file(args.ref, pred.fps) if args.ref else None
        ev = evaluate(pred, gt, audio=audio, ref=ref, parsing_fn=parsing_fn, opts=opts)
        if form == "self" and abs(pred_rate - pred.fps) > 0.01:
            ev.notes.append(f"the prediction is {pred_rate:g} fps; resampled to the ground truth's {pred.fps:g} fps")
        if form == "avatar":
            ev.inputs["prediction"]["path"] = str(args.out / "prediction.mp4")
            ev.inputs["audio"] = f"test split of {args.data}/audio.wav (the render's driving audio)"
            ev.inputs["method"] = speed.pop("method")
            ev.inputs["measured_on"] = speed.pop("measured_on")
            ev.inputs["avatar"] = str(args.avatar)
            for k, v in speed.items():
                ev.set(k, v, None if v is not None else "not in the avatar's logs")
        else:
            reason = "only measured when evaluating an AVATAR (eval AVATAR --data DATA)"
            ev.set("render_fps", None, reason)
            ev.set("train_time_s", None, reason)
        write_report(ev, tmp, pred.fps)
        _commit_out(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = ev.metrics
    keys = ("psnr_face", "ssim_face", "lmd_mouth", "mouth_open_corr", "stability", "landmark_sync_offset",
            "landmark_sync_conf")
    size = ev.inputs.get("size")
    at = f" (measured at {size[0]}x{size[1]})" if size else ""
    print(f"{ev.mode}{at}: " + ", ".join(f"{k} {fmt(m.get(k), k)}" for k in keys if m.get(k) is not None))
    print(f"report: {args.out}/report.md")
    return 0


def run_compare(args) -> int:
    from .report import comparison_table, read_metrics

    reports = {}
    for d in args.reports:
        r = read_metrics(d)
        name = Path(d).resolve().name
        method = r.get("inputs", {}).get("method")
        label = f"{method} ({name})" if method and method != name else name
        while label in reports:
            label += "'"
        reports[label] = r
    table = comparison_table(reports)
    out = args.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file(out)
        with open(tmp, "w") as f:
            f.write(table)
        publish(tmp, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror}") from None
    print(table)
    return 0
