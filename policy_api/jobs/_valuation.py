"""Valuation refit: money per engagement unit by category from revenue in the feedback log."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
from sqlalchemy.engine import Engine

from allocator import HomepageConfig, refit_values

from ..log import load_items, read_feedback
from ._configio import config_to_toml

__all__ = ["Refit", "refit_valuation", "with_values"]


@dataclass(frozen=True, slots=True)
class Refit:
    category: str
    configured: float
    units: float
    revenue: float
    raw: float | None
    shrunk: float
    weight: float


def refit_valuation(db: Engine, config: HomepageConfig, prior_units: float = 500.0,
                    since: datetime | None = None) -> list[Refit]:
    """Per configured category: the evidence in the feedback log and the value refit from it
    (:func:`allocator.refit_values`; impressions carry no units, events without revenue add 0)."""
    fb = read_feedback(db, since=since, columns=["item_id", "type", "value"])
    items = load_items(db)
    ids = np.asarray(items["item_ids"], dtype=str)
    io = np.argsort(ids)
    f_items = np.asarray(fb["item_id"], dtype=str)
    pos = np.minimum(np.searchsorted(ids[io], f_items), max(ids.size - 1, 0))
    known = ids[io][pos] == f_items if ids.size else np.zeros(f_items.size, bool)
    names = np.asarray(config.category_names, dtype=str)
    item_cat = np.asarray(items["category"], dtype=str)[io][pos] if ids.size else np.zeros(0, dtype=str)
    order = np.argsort(names)
    cpos = np.minimum(np.searchsorted(names[order], item_cat), max(names.size - 1, 0))
    cat = np.where(known & (names[order][cpos] == item_cat), order[cpos], -1)
    types = np.asarray(fb["type"], dtype=str)
    uniq, inv = np.unique(types, return_inverse=True)
    unit_of = np.array([float(config.events.get(t, 0.0)) if t != "impression" else 0.0 for t in uniq.tolist()])
    units = unit_of[inv] if types.size else np.zeros(0)
    revenue = np.nan_to_num(np.asarray(fb["value"], dtype=np.float64), nan=0.0)  # NULL value = no revenue
    r = refit_values(cat, units, revenue, config.category_values(), prior_units)
    return [Refit(c.name, c.value_per_engagement, float(r.units[k]), float(r.revenue[k]),
                  None if np.isnan(r.raw[k]) else float(r.raw[k]), float(r.value[k]), float(r.weight[k]))
            for k, c in enumerate(config.categories)]


def with_values(config: HomepageConfig, refits: list[Refit]) -> str:
    """The config's TOML with each category's value replaced by its refit value."""
    cats = tuple(replace(c, value_per_engagement=round(r.shrunk, 6))
                 for c, r in zip(config.categories, refits, strict=True))
    return config_to_toml(replace(config, categories=cats))
