"""Where things are: the database URL, the data folder, the config file, the operator token."""

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


@dataclass(frozen=True)
class Settings:
    """A serving worker's settings (``from_env`` reads them from the environment)."""

    database_url: str = DEFAULT_DATABASE_URL
    data_dir: Path = Path("homepage-data")
    reload_s: float = 1.0
    operator_token: str | None = None
    spill_dir: Path | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        base: dict[str, Any] = {
            "database_url": database_url(),
            "data_dir": Path(env.get("HOMEPAGE_DATA_DIR", "homepage-data")),
            "reload_s": float(env.get("HOMEPAGE_RELOAD_S", "1")),
            "operator_token": env.get("HOMEPAGE_OPERATOR_TOKEN") or None,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def spill_path(self) -> Path:
        return self.spill_dir or (self.data_dir / "spill")
