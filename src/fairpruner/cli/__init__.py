"""The ``fairpruner`` command line: run (the whole path), demo, score, plan, prune, report, finetune.

Run ``fairpruner --help`` (or ``python -m fairpruner.cli --help``) for the commands and an example of each.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional, Sequence

from .loading import check_out
from .parser import build_parser

__all__ = ["main", "build_parser"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``fairpruner`` command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit status: 0 on success, 2 on a usage or input error (printed as ``error: <message>``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        for option in ("out", "json"):  # files to write are checked before the work that fills them
            if getattr(args, option, None) and not (args.command == "demo" and option == "out"):
                check_out(getattr(args, option), f"--{option}")
        with warnings.catch_warnings():  # a warning is a line for the user, not a source location
            warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
            return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # FairPrunerError is a ValueError
        message = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
