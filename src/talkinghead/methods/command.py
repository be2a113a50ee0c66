"""``talkinghead train`` and ``talkinghead render``: the CLI face of :mod:`.trainer` and :mod:`.render`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    from . import available_methods

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "train", formatter_class=fmt, help="train an avatar on a prepared dataset",
        description=(
            "Train a method on a prepared dataset (from `talkinghead prepare`) into an avatar folder.\n"
            "AVATAR receives config.json, model.safetensors, a resumable checkpoint.safetensors,\n"
            "train_log.json, val/step_*.png (held-out frames: ground truth above, render below) and loss.png.\n\n"
            "presets: cpu-small = 128x128 sized to finish in about 20 min on 2 CPU cores;\n"
            "         gpu = the paper's setting at 512x512 (needs CUDA + gsplat)."
        ),
    )
    p.add_argument("data", type=Path, metavar="DATA", help="prepared dataset folder")
    p.add_argument("--method", default="gaussiantalker", choices=available_methods(),
                   help="method to train (default: %(default)s)")
    p.add_argument("--variant", default=None,
                   help="method variant; gaussiantalker: 'fast' = GaussianTalker* (one attention layer); "
                        "degstalk: the paper's ablations no-embedding (w/o E), no-expression (w/o F), "
                        "direct-fusion (w/o R), no-hair (w/o H); no-lip-geometry = without our lip-geometry "
                        "guidance (not the paper's)")
    p.add_argument("--stage", default=None, choices=("avatar", "flametalk"),
                   help="gaussianflametalk: train one stage only (default: both); on an AVATAR that is already "
                        "trained, --stage flametalk retrains FlameTalk in place and keeps the Gaussians")
    p.add_argument("--out", type=Path, required=True, metavar="AVATAR", help="avatar folder to write")
    p.add_argument("--preset", default=None, choices=("cpu-small", "gpu"),
                   help="training size/length (default: gpu with CUDA, else cpu-small)")
    p.add_argument("--iterations", type=int, default=None, help="override the preset's iteration count")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the initialisation and the frame order (default: the preset's, 0)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in AVATAR")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: measured ~4x faster than 2 when other jobs share the cores)")
    p.set_defaults(func=_train)

    r = subparsers.add_parser(
        "render", formatter_class=fmt, help="render an avatar speaking new audio (or a test split) to mp4",
        description=(
            "Render an avatar to an mp4 with the audio muxed in.\n"
            "  --audio WAV     drive with new audio (features from the same extractor as training);\n"
            "                  poses, background and torso replay the training sequence back and forth.\n"
            "  --split test    self-driven: the split's own audio and poses (compare with the ground truth).\n\n"
            "Output: the full frame by default -- the rendered crop pasted back into the source video (the one\n"
            "`prepare` read; meta.json source.path, or --source) at its resolution, on the dataset's frame clock,\n"
            "feathered inside the crop border; outside the crop box the frames are the source's. For new audio\n"
            "the source frames replay with the same back-and-forth pose loop as the backdrop. Without the source\n"
            "video, or with --crop, the square crop as rendered. --size N renders the crop at N x N whatever the\n"
            "avatar trained at (default: the dataset's size; full frame: the crop's side in the source, at most\n"
            "the dataset's size). `talkinghead eval AVATAR` compares crops: see its --help.\n"
            "Prints the output size and the rendering speed in frames per second."
        ),
    )
    r.add_argument("avatar", type=Path, metavar="AVATAR", help="avatar folder from `talkinghead train`")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", type=Path, metavar="WAV", help="driving audio (any format ffmpeg reads)")
    src.add_argument("--split", choices=("train", "test"), help="render a split of the training dataset")
    r.add_argument("--out", type=Path, required=True, metavar="OUT.mp4", help="video to write")
    r.add_argument("--pose", choices=("train", "static"), default="train",
                   help="with --audio: replay the training poses (default) or hold the first one")
    r.add_argument("--data", type=Path, default=None,
                   help="prepared dataset (default: the one the avatar was trained on)")
    r.add_argument("--yaw", type=float, default=0.0, metavar="DEG",
                   help="novel view: orbit the camera about the head's pivot by DEG degrees sideways "
                        "(+: towards the image right; within [-90, 90]; default 0 = the tracked camera)")
    r.add_argument("--pitch", type=float, default=0.0, metavar="DEG",
                   help="novel view: orbit the camera DEG degrees up (+) or down (-) about the head's pivot")
    r.add_argument("--audio-encoder", default=None, metavar="PATH",
                   help="with --audio: the Whisper checkpoint the avatar's dataset was prepared with, when it is "
                        "no longer where prepare found it (the weights must be the same; default: that path)")
    r.add_argument("--size", type=int, default=None, metavar="N",
                   help="render the crop at N x N pixels (16..4096; default: see above)")
    framing = r.add_mutually_exclusive_group()
    framing.add_argument("--full-frame", dest="full_frame", action="store_const", const=True, default=None,
                         help="paste into the source video's frames (the default when the video is at hand; "
                              "an error when it is not)")
    framing.add_argument("--crop", dest="full_frame", action="store_const", const=False,
                         help="write the square crop as rendered (N x N)")
    r.add_argument("--source", type=Path, default=None, metavar="VIDEO",
                   help="the source video when it moved (must be the file the dataset was prepared from)")
    r.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default %(default)s)")
    r.set_defaults(func=_render)


def _train(args) -> int:
    import torch

    from talkinghead.errors import UserError

    from .trainer import MODEL, train

    torch.set_num_threads(max(1, args.threads))
    variant = args.variant
    if args.stage is not None:
        if args.method != "gaussianflametalk":
            raise UserError(f"--stage is for --method gaussianflametalk ({args.method} trains in one stage)")
        if variant not in (None, args.stage):
            raise UserError(f"--stage {args.stage} contradicts --variant {variant}")
        if args.stage == "flametalk" and (args.out / MODEL).is_file() and not args.resume:
            from .gaussianflametalk.model import retrain_flametalk

            metrics = retrain_flametalk(args.out, args.data)
            print(f"retrained FlameTalk in {args.out}")
            print(json.dumps(metrics))
            return 0
        variant = args.stage
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu-small")
    log = train(args.data, args.method, args.out, preset=preset, variant=variant, resume=args.resume,
                iterations=args.iterations, seed=args.seed)
    print(f"trained {log['method']} in {log['train_time_s']:.0f} s ({log['iterations']} iterations): {args.out}")
    print(json.dumps({k: log[k] for k in ("val_psnr", "train_time_s", "wall_time_s")}))
    return 0


def _render(args) -> int:
    import torch

    from .render import check_size, render_audio, render_split

    check_size(args.size)  # before loading anything
    torch.set_num_threads(max(1, args.threads))
    kw = dict(size=args.size, full_frame=args.full_frame, source=args.source)
    if args.audio is not None:
        res = render_audio(args.avatar, args.audio, args.out, pose=args.pose, data=args.data, yaw=args.yaw,
                           pitch=args.pitch, audio_encoder=args.audio_encoder, **kw)
    else:
        res = render_split(args.avatar, args.data, args.split, args.out, yaw=args.yaw, pitch=args.pitch, **kw)
    if res.get("note"):
        print(f"note: {res['note']}")
    print(describe(res))
    return 0


def describe(res: dict) -> str:
    """One line about a render's output: its size, what it shows, the speed."""
    w, h = res["video_size"]
    n = res["render_size"][0]
    if res["full_frame"]:
        c = res["crop"]
        what = (f"{w}x{h} full frame (the {n}x{n} render of the {c['side']} px crop at ({c['x0']}, {c['y0']}) "
                f"pasted into {res['source']}; paste-back {res['paste_ms']:.1f} ms/frame)")
    else:
        what = f"{w}x{h} square crop"
    fw, fh = res["frame_size"]
    odd = f" (yuv420p needs even sizes: the {fw}x{fh} frames lose their last column/row)" if (fw, fh) != (w, h) else ""
    return f"wrote {res['out']}: {what}{odd}, {res['frames']} frames, rendered at {res['fps']:.1f} frames/s"
