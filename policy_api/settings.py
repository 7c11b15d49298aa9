"""Where things are: the database URL, the data folder, the config file, the operator token; and the
serving worker's durability deadlines."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_DATABASE_URL", "Settings", "database_url", "resolve_config_path"]

DEFAULT_DATABASE_URL = "sqlite:///homepage-data/homepage.db"


def database_url() -> str:
    """``DATABASE_URL``, else the embedded SQLite default."""
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def resolve_config_path(cli_value: str | None) -> Path:
    """``--config``, else ``HOMEPAGE_CONFIG``, else ``./homepage.toml``."""
    return Path(cli_value or os.environ.get("HOMEPAGE_CONFIG") or "homepage.toml")


def _number(env: Any, key: str, default: float) -> float:
    text = env.get(key)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key} must be a number > 0; got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{key} must be a number > 0; got {text!r}")
    return value


def _sync_mode(text: str) -> bool:
    mode = text.strip().lower()
    if mode not in ("fsync", "write"):
        raise ValueError(f"HOMEPAGE_JOURNAL_SYNC must be 'fsync' or 'write'; got {text!r}")
    return mode == "fsync"


@dataclass(frozen=True)
class Settings:
    """A serving worker's settings (``from_env`` reads them from the environment)."""

    database_url: str = DEFAULT_DATABASE_URL
    data_dir: Path = Path("homepage-data")
    reload_s: float = 1.0
    operator_token: str | None = None
    spill_dir: Path | None = None
    #: journal what the API acknowledges before answering (``HOMEPAGE_JOURNAL``, "0" turns it off)
    journal: bool = True
    #: longest wait of a request for its journal fsync (``HOMEPAGE_JOURNAL_DEADLINE_MS``)
    journal_deadline_s: float = 1.0
    #: ``HOMEPAGE_JOURNAL_SYNC``: "fsync" (answer after the fsync: survives a machine crash) or "write"
    #: (after the write into the page cache: survives a worker crash; the fsync follows within ms)
    journal_sync: bool = True
    #: longest wait of a request for a database read: the feedback duplicate check
    #: (``HOMEPAGE_DB_DEADLINE_MS``); past it the request goes on without the answer
    db_deadline_s: float = 0.25
    #: a log flush in flight this long marks the writer stalled (``HOMEPAGE_WRITER_STALL_S``)
    writer_stall_s: float = 3.0
    #: on shutdown, how long to try to flush to the database before leaving rows in the journal
    #: (``HOMEPAGE_SHUTDOWN_FLUSH_S``); below gunicorn's graceful timeout
    shutdown_flush_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("journal_deadline_s", "db_deadline_s", "writer_stall_s", "shutdown_flush_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be a number > 0; got {value!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        base: dict[str, Any] = {
            "database_url": database_url(),
            "data_dir": Path(env.get("HOMEPAGE_DATA_DIR", "homepage-data")),
            "reload_s": float(env.get("HOMEPAGE_RELOAD_S", "1")),
            "operator_token": env.get("HOMEPAGE_OPERATOR_TOKEN") or None,
            "spill_dir": Path(env["HOMEPAGE_SPILL_DIR"]) if env.get("HOMEPAGE_SPILL_DIR") else None,
            "journal": env.get("HOMEPAGE_JOURNAL", "1").strip().lower() not in ("0", "false", "no", "off"),
            "journal_deadline_s": _number(env, "HOMEPAGE_JOURNAL_DEADLINE_MS", 1000.0) / 1000.0,
            "journal_sync": _sync_mode(env.get("HOMEPAGE_JOURNAL_SYNC", "fsync")),
            "db_deadline_s": _number(env, "HOMEPAGE_DB_DEADLINE_MS", 250.0) / 1000.0,
            "writer_stall_s": _number(env, "HOMEPAGE_WRITER_STALL_S", 3.0),
            "shutdown_flush_s": _number(env, "HOMEPAGE_SHUTDOWN_FLUSH_S", 3.0),
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def spill_path(self) -> Path:
        return self.spill_dir or (self.data_dir / "spill")
