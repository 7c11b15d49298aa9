"""What every command shares: the database, the config file, time options, error printing."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from allocator import ConfigError, HomepageConfig, load_config

from .. import registry
from ..errors import Conflict, InvalidInput, NotFound, Unavailable, from_config_error
from ..log import make_engine, normalize_url, upgrade
from ..registry import ConfigRecord
from ..settings import database_url, resolve_config_path

__all__ = ["active_config", "config_arg", "db_engine", "load_cfg", "parse_time", "redact"]


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="operator config (default: $HOMEPAGE_CONFIG, else ./homepage.toml)")


def load_cfg(args: argparse.Namespace) -> tuple[Path, HomepageConfig]:
    """(path, config) from --config / HOMEPAGE_CONFIG / ./homepage.toml; InvalidInput if invalid."""
    path = resolve_config_path(getattr(args, "config", None))
    try:
        return path, load_config(path)
    except FileNotFoundError as e:
        raise NotFound(f"{e}; pass --config PATH or set HOMEPAGE_CONFIG", field="config") from None
    except ConfigError as e:
        raise from_config_error(e) from None


def db_engine() -> Engine:
    """The migrated database engine of ``DATABASE_URL``."""
    url = database_url()
    try:
        normalize_url(url)
    except ValueError as e:
        raise InvalidInput(f"DATABASE_URL: {e}", field="DATABASE_URL") from None
    try:
        upgrade(url)
    except sa.exc.OperationalError as e:  # down, refusing, wrong credentials, unreadable file
        reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
        raise Unavailable(f"DATABASE_URL: cannot reach the database at {redact(url)}: {reason}",
                          field="DATABASE_URL") from None
    return make_engine(url)


def active_config(db: Engine, args: argparse.Namespace) -> ConfigRecord:
    """The active config. A ``--config`` given to a job must be the active one: jobs never activate a
    config (that is ``homepage config apply FILE`` or ``PUT /config``)."""
    active = registry.require_active_config(db) if not getattr(args, "config", None) else registry.active_config(db)
    if getattr(args, "config", None):
        path, _ = load_cfg(args)
        body = path.read_text(encoding="utf-8")
        if active is None or active.body != body:
            shown = "none is active" if active is None else f"the active config is version {active.version}"
            raise Conflict(f"--config {path} is not the active config ({shown}); apply it first with "
                           f"`homepage config apply {path}`, or dry-run it with `homepage config check {path}`",
                           field="config")
    assert active is not None
    return active


def parse_time(s: str | None, name: str) -> datetime | None:
    """An ISO 8601 option value (UTC when no zone is given)."""
    if s is None:
        return None
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO 8601 time (e.g. 2026-11-22T08:00:00+00:00); got {s!r}",
                           field=name) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url
