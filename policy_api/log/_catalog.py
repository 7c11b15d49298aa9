"""The item catalog: CSV loading with line-numbered errors, and the arrays the engine serves from."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInput

__all__ = ["Catalog", "CatalogError", "read_catalog_csv"]

REQUIRED = ("item_id", "category", "popularity")


class CatalogError(InvalidInput):
    """A catalog file or row that cannot be loaded; names the line, the column and the value."""


@dataclass(frozen=True)
class Catalog:
    """Items as arrays, in a fixed order.

    Attributes
    ----------
    item_ids : (n_items,) str
    category : (n_items,) str
    popularity : (n_items,) float64
    features : (n_items, n_features) float64
    feature_names : tuple of str
    added_at : (n_items,) float64 or None
        When each item entered the catalog, seconds since the epoch (NaN where not recorded); None for
        a catalog not read from the database.
    """

    item_ids: np.ndarray
    category: np.ndarray
    popularity: np.ndarray
    features: np.ndarray
    feature_names: tuple[str, ...]
    added_at: np.ndarray | None = None

    @property
    def n_items(self) -> int:
        return int(self.item_ids.size)

    def category_index(self, names: tuple[str, ...]) -> np.ndarray:
        """Shape (n_items,): index of each item's category in ``names``; -1 if not configured."""
        lookup = {n: i for i, n in enumerate(names)}
        return np.array([lookup.get(c, -1) for c in self.category.tolist()], dtype=np.int64)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {str(i): k for k, i in enumerate(self.item_ids.tolist())}

    def index_of(self) -> dict[str, int]:
        """item id -> row (built once per catalog; the request path looks items up in it)."""
        return self._index

    @cached_property
    def _id_list(self) -> list[str]:
        return [str(i) for i in self.item_ids.tolist()]

    def id_list(self) -> list[str]:
        """The item ids as a list of ``str`` (built once per catalog: a served page names its items
        from it without converting numpy values item by item)."""
        return self._id_list

    def rows(self) -> list[dict[str, Any]]:
        """Rows for the ``items`` table."""
        return [
            {"item_id": iid, "category": cat, "popularity": float(pop), "features": [float(x) for x in f]}
            for iid, cat, pop, f in zip(self.item_ids.tolist(), self.category.tolist(),
                                        self.popularity.tolist(), self.features, strict=True)
        ]

    @classmethod
    def from_arrays(cls, cols: dict[str, Any]) -> Catalog:
        """From ``store.load_items`` (features are positional; names are not stored in the log)."""
        feats = np.asarray(cols["features"], dtype=np.float64)
        added = cols.get("added_at")
        if added is not None:
            t = np.asarray(added, dtype="datetime64[us]")
            added = np.where(np.isnat(t), np.nan, t.astype(np.int64) / 1e6)
        return cls(
            item_ids=np.asarray(cols["item_ids"], dtype=object),
            category=np.asarray(cols["category"], dtype=object),
            popularity=np.asarray(cols["popularity"], dtype=np.float64),
            features=feats,
            feature_names=tuple(f"f{k}" for k in range(feats.shape[1])),
            added_at=added,
        )


def read_catalog_csv(path: str | Path, categories: tuple[str, ...] | None = None) -> Catalog:
    """Read ``item_id,category,popularity[,feature...]``; every further column must be numeric.

    Raises
    ------
    CatalogError
        Naming the file line, the column, what is allowed and what was found.
    """
    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"catalog file not found: {str(p)!r}")
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise CatalogError(f"{p}: line 1: expected a header {','.join(REQUIRED)}; the file is empty") from None
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise CatalogError(f"{p}: line 1: header must contain {', '.join(REQUIRED)}; "
                               f"missing {', '.join(missing)} (found {header})")
        if len(set(header)) != len(header):
            raise CatalogError(f"{p}: line 1: duplicate column names in header {header}")
        col = {h: i for i, h in enumerate(header)}
        feat_names = tuple(h for h in header if h not in REQUIRED)
        ids: list[str] = []
        cats: list[str] = []
        pops: list[float] = []
        feats: list[list[float]] = []
        seen: dict[str, int] = {}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) != len(header):
                raise CatalogError(f"{p}: line {lineno}: expected {len(header)} columns; got {len(row)}")
            iid = row[col["item_id"]].strip()
            if not iid:
                raise CatalogError(f"{p}: line {lineno}: item_id must be non-empty")
            if iid in seen:
                raise CatalogError(f"{p}: line {lineno}: item_id {iid!r} repeats line {seen[iid]}")
            seen[iid] = lineno
            cat = row[col["category"]].strip()
            if categories is not None and cat not in categories:
                raise CatalogError(f"{p}: line {lineno}: category must be one of {', '.join(categories)} "
                                   f"(the config's categories); got {cat!r}")
            pop = _number(row[col["popularity"]], p, lineno, "popularity")
            if pop < 0:
                raise CatalogError(f"{p}: line {lineno}: popularity must be >= 0; got {pop!r}")
            ids.append(iid)
            cats.append(cat)
            pops.append(pop)
            feats.append([_number(row[col[f]], p, lineno, f) for f in feat_names])
    if not ids:
        raise CatalogError(f"{p}: no items after the header")
    return Catalog(
        item_ids=np.array(ids, dtype=object),
        category=np.array(cats, dtype=object),
        popularity=np.array(pops, dtype=np.float64),
        features=np.array(feats, dtype=np.float64).reshape(len(ids), len(feat_names)),
        feature_names=feat_names,
    )


def _number(text: str, path: Path, lineno: int, column: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise CatalogError(f"{path}: line {lineno}: column {column!r} must be a number; got {text!r}") from None
    if not math.isfinite(v):
        raise CatalogError(f"{path}: line {lineno}: column {column!r} must be finite; got {text!r}")
    return v
