"""Writing a :class:`HomepageConfig` back to TOML (the schema is flat enough for a direct writer)."""

from __future__ import annotations

import json
from typing import Any

from allocator import HomepageConfig

__all__ = ["config_to_toml"]


def _v(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int | float):
        return repr(float(x)) if isinstance(x, float) else str(x)
    if isinstance(x, str):
        return json.dumps(x)  # a JSON string is a valid TOML basic string
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_v(e) for e in x) + "]"
    raise TypeError(f"cannot write {type(x).__name__} to TOML")


def _table(name: str, d: dict[str, Any], array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    body = "".join(f"{k} = {_v(v)}\n" for k, v in d.items() if v is not None)
    return f"{head}\n{body}"


def config_to_toml(cfg: HomepageConfig) -> str:
    """TOML text that :func:`allocator.parse_config_text` reads back to an equal config."""
    d = cfg.to_dict()
    parts = [_table("homepage", d["homepage"])]
    parts += [_table("categories", {k: v for k, v in c.items() if not (k == "new" and v is False)}, True)
              for c in d["categories"]]
    parts += [_table("modules", {k: v for k, v in m.items() if not (k == "title" and v == "")}, True)
              for m in d["modules"]]
    parts.append(_table("events", d["events"]))
    parts.append(_table("tilt", d["tilt"]))
    parts += [_table("constraints", c, True) for c in d["constraints"]]
    parts.append(_table("exploration", d["exploration"]))
    parts.append(_table("learning", d["learning"]))
    parts.append(_table("loop", d["loop"]))
    return "\n".join(parts)
