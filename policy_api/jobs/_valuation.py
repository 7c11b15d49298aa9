"""Valuation refit: money per engagement unit by category from revenue in the feedback log."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
from sqlalchemy.engine import Engine

from allocator import HomepageConfig, refit_values

from ..log import load_items, read_feedback
from ._configio import config_to_toml

__all__ = ["Refit", "refit_valuation", "winsorise", "with_values"]


@dataclass(frozen=True, slots=True)
class Refit:
    category: str
    configured: float
    units: float
    revenue: float
    raw: float | None
    shrunk: float
    weight: float
    #: revenue events of this category whose value was winsorised (outside the ``winsor`` quantiles)
    clipped: int = 0


def winsorise(category: np.ndarray, revenue: np.ndarray, winsor: float) -> tuple[np.ndarray, np.ndarray]:
    """Each category's nonzero revenues clipped to their ``[1 - winsor, winsor]`` quantiles (widened
    to include 0, so that ordinary positive revenue is only clipped from above, refunds from below).

    The quantiles are observed values (``method="lower"`` / ``"higher"``), so among ``n <= 1 / (1 -
    winsor)`` revenue events the single largest is clipped to its neighbour: one absurd value
    (``1e308``) cannot move a category's value. Returns the clipped revenue and a mask of the events
    that were clipped.

    >>> r, m = winsorise(np.zeros(5, dtype=np.int64), np.array([1.0, 2.0, 3.0, 2.0, 1e308]), 0.99)
    >>> r.tolist(), int(m.sum())
    ([1.0, 2.0, 3.0, 2.0, 3.0], 1)
    """
    if not 0.5 <= winsor <= 1.0:
        raise ValueError(f"winsor must be in [0.5, 1]; got {winsor!r}")
    out = np.asarray(revenue, dtype=np.float64).copy()
    has = (out != 0) & (category >= 0)
    for c in np.unique(category[has]).tolist():  # one pass per category, vectorised within it
        m = has & (category == c)
        v = out[m]
        lo = min(float(np.quantile(v, 1.0 - winsor, method="higher")), 0.0)
        hi = max(float(np.quantile(v, winsor, method="lower")), 0.0)
        out[m] = np.clip(v, lo, hi)
    return out, out != np.asarray(revenue, dtype=np.float64)


def refit_valuation(db: Engine, config: HomepageConfig, prior_units: float = 500.0,
                    since: datetime | None = None, winsor: float = 0.99) -> list[Refit]:
    """Per configured category: the evidence in the feedback log and the value refit from it
    (:func:`allocator.refit_values`; impressions carry no units, events without revenue add 0).
    Revenue is winsorised per category first (:func:`winsorise` at ``winsor``): a few absurd values
    in the log move the refit by no more than the largest ordinary ones would."""
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
    # NULL value = no revenue; an infinity (never accepted by the API) is at least bounded
    revenue = np.nan_to_num(np.asarray(fb["value"], dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
    revenue, clipped = winsorise(cat, revenue, winsor)
    r = refit_values(cat, units, revenue, config.category_values(), prior_units)
    n_clipped = np.bincount(cat[clipped & (cat >= 0)], minlength=len(config.categories))
    return [Refit(c.name, c.value_per_engagement, float(r.units[k]), float(r.revenue[k]),
                  None if np.isnan(r.raw[k]) else float(r.raw[k]), float(r.value[k]), float(r.weight[k]),
                  int(n_clipped[k]))
            for k, c in enumerate(config.categories)]


def with_values(config: HomepageConfig, refits: list[Refit]) -> str:
    """The config's TOML with each category's value replaced by its refit value."""
    cats = tuple(replace(c, value_per_engagement=round(r.shrunk, 6))
                 for c, r in zip(config.categories, refits, strict=True))
    return config_to_toml(replace(config, categories=cats))
