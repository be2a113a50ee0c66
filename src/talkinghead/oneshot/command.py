"""``talkinghead oneshot train`` and ``talkinghead oneshot render`` (paper 003: one portrait -> a 3-D talking head)."""

from __future__ import annotations

import argparse
from pathlib import Path

TRAIN_HELP = """\
Train the person-agnostic one-shot model (paper 003) on prepared datasets of different people.
Stages: the motion generator G_m alone, then the identity encoder, motion encoder, triplane synthesis and
renderer jointly on source/driving pairs, then the emotion mapper M_e (only with --mead or --clip).
Runs under `torchrun --nproc_per_node N` too (DistributedDataParallel: gloo on CPU, nccl on GPU; the
global batch is split over the processes). Datasets are read frame by frame, never preloaded whole.
"""

RENDER_HELP = """\
Animate one portrait (an image, or the first frame of a video) with audio: the face is tracked, inverted
into the model (a few optimisation steps, with a progress bar) and driven by the motion G_m predicts from
the audio. --emotion adds the label's FACS expression offset (and drives M_e when the model has one);
--yaw/--pitch move the camera about the head for a novel view (talkinghead.camera.orbit).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("oneshot", help="one portrait + audio (+ emotion) -> free-view talking head (paper 003)",
                              description="The one-shot, person-agnostic 3-D talking face of paper 003.")
    sub = p.add_subparsers(dest="oneshot_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train one model on many people's prepared datasets", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("data", nargs="+", type=Path, metavar="DATA", help="prepared datasets (talkinghead prepare)")
    t.add_argument("--out", type=Path, required=True, metavar="MODEL", help="model folder to write")
    t.add_argument("--preset", default="cpu-small", help="cpu-small (128², minutes on 2 cores) or gpu (256², CUDA)")
    t.add_argument("--resume", action="store_true", help="continue the run in MODEL from its checkpoint")
    t.add_argument("--mead", type=Path, metavar="ROOT",
                   help="MEAD-layout folder with prepared emotion clips: trains the emotion mapper M_e")
    t.add_argument("--clip", type=Path, metavar="DIR", help="local CLIP model folder: trains M_e with the CLIP loss")
    t.add_argument("--lpips-weights", metavar="DIR", help="local LPIPS weights for the perceptual loss")
    t.add_argument("--motion-steps", type=int, help="override the preset's G_m steps")
    t.add_argument("--generator-steps", type=int, help="override the preset's generator steps")
    t.add_argument("--mapper-steps", type=int, help="override the preset's M_e steps")
    t.add_argument("--batch", type=int, help="override the generator's global batch")
    t.add_argument("--checkpoint-every", type=int, help="override how often (steps) the checkpoint is written")
    t.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    t.set_defaults(func=run_train)

    r = sub.add_parser("render", help="animate a portrait with audio", description=RENDER_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("model", type=Path, metavar="MODEL", help="folder written by `talkinghead oneshot train`")
    r.add_argument("--image", type=Path, required=True, metavar="PORTRAIT", help="image or video (first frame)")
    r.add_argument("--audio", type=Path, required=True, metavar="WAV", help="driving speech (any format PyAV reads)")
    r.add_argument("--out", type=Path, required=True, metavar="OUT.mp4")
    r.add_argument("--emotion", default="neutral",
                   help="neutral, angry, contempt, disgusted, fear, happy, sad or surprised (MEAD's labels)")
    r.add_argument("--intensity", type=float, default=1.0, help="scale of the emotion's expression offset")
    r.add_argument("--yaw", type=float, default=0.0, metavar="DEG", help="camera yaw about the head, degrees (-90..90; + moves it to image right)")
    r.add_argument("--pitch", type=float, default=0.0, metavar="DEG", help="camera pitch about the head, degrees (-90..90; + moves it up)")
    r.add_argument("--inversion-steps", type=int, help="override the model's inversion steps on w_id")
    r.add_argument("--tune-steps", type=int, help="override the model's generator-tuning steps (0: none)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    r.set_defaults(func=run_render)


def run_train(args) -> int:
    import torch

    from .train import train

    torch.set_num_threads(max(1, args.threads))
    overrides = {k: v for k, v in (("motion_steps", args.motion_steps), ("generator_steps", args.generator_steps),
                                   ("mapper_steps", args.mapper_steps), ("generator_batch", args.batch),
                                   ("checkpoint_every", args.checkpoint_every))
                 if v is not None}
    log = train(args.data, args.out, preset=args.preset, resume=args.resume, overrides=overrides, mead=args.mead,
                clip=args.clip, lpips=args.lpips_weights)
    if "train_time_s" in log:
        print(f"{args.out}: {log['steps']} steps in {log['train_time_s']:.0f} s; emotion mapper {log['mapper']}")
    return 0


def run_render(args) -> int:
    import torch

    from .render import render

    torch.set_num_threads(max(1, args.threads))
    info = render(args.model, args.image, args.audio, args.out, emotion=args.emotion, intensity=args.intensity,
                  yaw=args.yaw, pitch=args.pitch, code_steps=args.inversion_steps, tune_steps=args.tune_steps)
    print(f"{args.out}: {info['frames']} frames at {info['fps']:g} fps ({info['render_fps']:.1f} frames/s)")
    return 0
