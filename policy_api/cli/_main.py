"""``homepage``: one entry point for serving, data, learning, planning and replay.

Every command reads the database from ``DATABASE_URL`` (default ``sqlite:///homepage-data/homepage.db``)
and the config from ``--config``, else ``HOMEPAGE_CONFIG``, else ``./homepage.toml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import HomepageError
from . import _allocation, _data, _learning, _serving, _versions

__all__ = ["build_parser", "main"]


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="homepage", description=__doc__, formatter_class=_Help)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_data, _serving, _allocation, _learning, _versions):
        module.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (errors of :mod:`policy_api.errors` print one line, no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except HomepageError as e:
        print(f"homepage: error: {e.message}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `homepage ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
