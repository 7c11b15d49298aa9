"""Differences between two versions of a config, a plan or a model, as the operator reads them."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

__all__ = ["Change", "flatten", "mapping_diff", "text_diff"]

Change = tuple[str, Any, Any]  # (dotted key, old value or None, new value or None)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as ``{"a.b.c": leaf}``. List entries that are dicts with a ``name`` or
    ``id`` are keyed by it (``constraints.live_floor.min``), so a reordered list is not a change."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) and ("name" in v or "id" in v)
                                                   for v in value):
        for v in value:
            key = str(v.get("name", v.get("id")))
            out.update(flatten({k: x for k, x in v.items() if k not in ("name", "id")} or {"": True},
                               f"{prefix}.{key}" if prefix else key))
    else:
        out[prefix] = value
    return out


def mapping_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every flattened key whose value differs (added keys have old None, removed keys new None),
    sorted by key."""
    a, b = flatten(old), flatten(new)
    return [(k.rstrip("."), a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def text_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    """A unified diff of two texts ('' when they are equal)."""
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=old_name, tofile=new_name))
