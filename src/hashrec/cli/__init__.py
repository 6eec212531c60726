"""Layer 8: the ``hashrec`` command. It parses and prints; the work happens in the library."""

from hashrec.cli.dispatch import build_parser, main

__all__ = ["build_parser", "main"]
