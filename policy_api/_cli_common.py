"""Helpers shared by every CLI command module."""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["CliError", "config_arg", "db_url", "load_cfg", "db_engine", "redact"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="operator config (default: $HOMEPAGE_CONFIG, else ./homepage.toml)")


def db_url() -> str:
    from ._runtime import DEFAULT_DATABASE_URL

    return os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)


def load_cfg(args: argparse.Namespace) -> tuple[Any, Any]:
    """(path, HomepageConfig) from --config / HOMEPAGE_CONFIG / ./homepage.toml; CliError if invalid."""
    from allocator import ConfigError, load_config

    from ._runtime import resolve_config_path

    path = resolve_config_path(getattr(args, "config", None))
    try:
        return path, load_config(path)
    except FileNotFoundError as e:
        raise CliError(f"{e}; pass --config PATH or set HOMEPAGE_CONFIG") from None
    except ConfigError as e:
        raise CliError(str(e)) from None


def db_engine() -> Any:
    """The migrated database engine of DATABASE_URL."""
    from ._db import make_engine, upgrade

    url = db_url()
    upgrade(url)
    return make_engine(url)


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url
