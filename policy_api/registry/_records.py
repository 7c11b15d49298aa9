"""What the registry returns: frozen records of configs, plans and models."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from allocator import HomepageConfig

__all__ = ["ConfigRecord", "ModelRecord", "PlanRecord", "Versions"]


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    """One stored operator config: its TOML text, the parsed config, and its audit fields."""

    version: int
    body: str
    config: HomepageConfig
    status: str
    author: str = ""
    note: str = ""
    created_at: datetime | None = None
    projection: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PlanRecord:
    """One stored plan: a price per constraint name, for one config version."""

    version: int
    config_version: int | None
    status: str
    prices: dict[str, float]
    projected: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None
    created_at: datetime | None = None

    def price_vector(self, config: HomepageConfig) -> np.ndarray:
        """Shape (K,): the prices in ``config``'s constraint order (0 for a constraint it lacks)."""
        return np.array([float(self.prices.get(n, 0.0)) for n in config.constraint_names], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One stored model version (``ranker`` or ``bandit``); ``artifact`` is None for a rejected one."""

    name: str
    version: int
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact: bytes | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Versions:
    """What serving workers poll: the active config and plan, the newest published model per name."""

    config: int | None
    plan: int | None
    models: dict[str, int]
