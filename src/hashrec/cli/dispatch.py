"""The ``hashrec`` parser and dispatch. Each command lives in its own module of this package,
with ``register(subparsers)`` and ``run(args)``; ``COMMANDS`` lists them once."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from hashrec import __version__
from hashrec.cli.common import UsageError, apply_threads

# Command modules, in the order ``hashrec --help`` lists them.
COMMANDS = ("demo", "train", "evaluate", "train-retrieval", "recommend", "serve", "collisions",
            "import-phoenix", "rank")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hashrec",
        description="Hash-embedding recommenders in the style of X's For You ranking (Phoenix).",
    )
    parser.add_argument("--version", action="version", version=f"hashrec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hashrec.cli.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on a usage error, 1 on a data or runtime error."""
    # Large CPU tensors (embedding gathers and their gradients) on transparent huge pages: ~3x
    # faster allocation of a fresh 256 MB lookup output here. torch reads it at its first
    # allocation, so only the command sets it (before torch loads); THP_MEM_ALLOC_ENABLE=0 opts out.
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # and freed memory kept for the next step's or request's tensors (hashrec.memory)
    if os.environ.get("HASHREC_RETAIN_MEMORY", "1") != "0":
        from hashrec.memory import retain_freed_memory

        retain_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what launchers pass on
    if args.command is None:
        parser.print_help()
        return 2
    try:
        apply_threads(args)
        return int(args.func(args) or 0)
    except UsageError as e:
        parser.exit(2, f"hashrec {args.command}: error: {e}\n")
    except (ValueError, OSError, RuntimeError) as e:  # bad input met past parsing: no trace
        parser.exit(1, f"hashrec {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
