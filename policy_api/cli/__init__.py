"""The ``homepage`` command line: argparse, a job, its result printed, errors mapped to exit codes."""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
