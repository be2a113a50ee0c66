"""``talkinghead serve``: the CLI face of :mod:`talkinghead.serve.app`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve live avatars to a web browser (WebRTC)",
        description=(
            "Serve one or more avatars live: open http://HOST:PORT/ in a browser, pick an avatar, then make it\n"
            "speak by uploading an audio file, through the microphone, or by typing text (offline TTS).\n"
            "Every avatar is loaded once and shared by all sessions; while nobody speaks it idles (blinks,\n"
            "the training pose loop). The HTTP API is described in the README (GET /api/avatars, ...).\n"
            "Binds to localhost unless --host says otherwise."
        ),
    )
    p.add_argument("avatars", type=Path, nargs="+", metavar="AVATAR", help="avatar folder(s) from `talkinghead train`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="live sessions at once; more get HTTP 503 (default %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default %(default)s MB)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="longest utterance (default %(default)s s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default %(default)s)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import torch

    from talkinghead.errors import UserError

    from .speech import UploadLimits

    if args.max_sessions < 1:
        raise UserError("--max-sessions must be at least 1")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number")
    for a in args.avatars:
        if not (a / "config.json").is_file():
            raise UserError(f"{a} is not an avatar folder (no config.json; make one with `talkinghead train`)")
    torch.set_num_threads(max(1, args.threads))
    from .app import run

    limits = UploadLimits(max_bytes=int(args.max_upload_mb * 2**20), max_seconds=args.max_seconds)
    try:
        run(args.avatars, args.host, args.port, args.max_sessions, limits)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0
