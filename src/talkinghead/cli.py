"""The ``talkinghead`` command: one subcommand per pipeline stage.

Each stage lives in its own module exposing ``register(subparsers)``, which adds
its parser and sets ``func`` to a handler taking the parsed args and returning an
exit code. Handlers import their heavy dependencies lazily so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from talkinghead import __version__
from talkinghead.errors import UserError

# Modules that add subcommands, in the order they appear in --help.
_COMMAND_MODULES: tuple[str, ...] = (
    "talkinghead.prepare.command",
    "talkinghead.methods.command",
    "talkinghead.eval.command",
    "talkinghead.serve.command",
    "talkinghead.oneshot.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="talkinghead",
        description=(
            "Turn a short monocular video of a person into a 3D avatar that speaks new audio.\n"
            "Stages: prepare (video -> dataset) -> train (dataset -> avatar) -> "
            "render (avatar + audio -> mp4) -> eval (metrics and reports)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"talkinghead {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
