"""Importing history: ``user_id,item_id,event,timestamp[,value]`` interactions as log rows.

Imported interactions become log rows of their own kind: one ``decisions`` row per (user, time)
with ``policy = "import"``, no candidates (so learning and replay skip them) and the interacted items
as its layout, plus one ``feedback`` row per interaction (idempotent by a content hash, so importing
a file twice adds nothing). The ranker's data builder then sees them exactly like served traffic.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from allocator import EVENT_TYPES, FEEDBACK_TYPES

from ..errors import InvalidInput, NotFound, NotReady
from ..log import IMPORT_POLICY, insert_decisions, insert_feedback, load_items

__all__ = ["ImportResult", "import_file", "import_rows", "read_interactions"]


def _ts(text: str, path: Path, line: int) -> float:
    t = text.strip()
    try:
        v = float(t)
        if math.isfinite(v) and v >= 0:
            return v
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00"))
        return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        raise InvalidInput(f"{path}: line {line}: timestamp must be epoch seconds or ISO 8601; got {text!r}") from None


def read_interactions(path: str | Path, known_items: set[str]) -> dict[str, np.ndarray]:
    """Read ``user_id,item_id,event,timestamp[,value]``; every bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"interactions file not found: {str(p)!r}", field="file")
    users, items, events, tss, values = [], [], [], [], []
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        need = ["user_id", "item_id", "event", "timestamp"]
        if header[:4] != need or len(header) > 5 or (len(header) == 5 and header[4] != "value"):
            raise InvalidInput(f"{p}: line 1: header must be user_id,item_id,event,timestamp[,value]; got "
                               f"{','.join(header)!r}")
        allowed = ", ".join(FEEDBACK_TYPES)
        for line, row in enumerate(reader, start=2):
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) not in (4, len(header)):  # the value column may be left off a line
                raise InvalidInput(f"{p}: line {line}: expected {len(header)} columns; got {len(row)}")
            uid, iid, ev = row[0].strip(), row[1].strip(), row[2].strip()
            if not uid:
                raise InvalidInput(f"{p}: line {line}: user_id must be non-empty")
            if iid not in known_items:
                raise InvalidInput(f"{p}: line {line}: item_id {iid!r} is not in the catalog (load it first with "
                                   "`homepage catalog load`)")
            if ev not in FEEDBACK_TYPES:
                raise InvalidInput(f"{p}: line {line}: event must be one of {allowed}; got {ev!r}")
            val = None
            if len(row) == 5 and len(header) == 5 and row[4].strip():
                try:
                    val = float(row[4])
                except ValueError:
                    raise InvalidInput(f"{p}: line {line}: value must be a number; got {row[4]!r}") from None
                if not math.isfinite(val):
                    raise InvalidInput(f"{p}: line {line}: value must be finite; got {row[4]!r}")
            users.append(uid)
            items.append(iid)
            events.append(ev)
            tss.append(_ts(row[3], p, line))
            values.append(np.nan if val is None else val)
    return {"user_id": np.array(users, dtype=object), "item_id": np.array(items, dtype=object),
            "event": np.array(events, dtype=object), "ts": np.array(tss, dtype=np.float64),
            "value": np.array(values, dtype=np.float64)}


def _hash(*parts: Any) -> str:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def import_rows(db: Engine, data: dict[str, np.ndarray], item_category: dict[str, str], source: str) -> tuple[int, int]:
    """Write interactions as import decisions + feedback. Returns (decisions, events) sent; re-imports
    are no-ops (both inserts are idempotent)."""
    n = data["user_id"].size
    if n == 0:
        return 0, 0
    key = np.array([f"{u}\x1f{t!r}" for u, t in zip(data["user_id"].tolist(), data["ts"].tolist(), strict=True)])
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inv, minlength=uniq.size))]
    decisions, feedback = [], []
    for g in range(uniq.size):  # one row per (user, time) group: the log's unit
        rows = order[bounds[g]:bounds[g + 1]]
        i0 = int(first[g])
        uid, ts = str(data["user_id"][i0]), float(data["ts"][i0])
        rid = "import:" + _hash(uid, repr(ts))
        shown = list(dict.fromkeys(data["item_id"][rows].tolist()))
        when = datetime.fromtimestamp(ts, tz=UTC)
        decisions.append({"request_id": rid, "ts": when, "user_id": uid, "context": {"source": source},
                          "versions": {}, "policy": IMPORT_POLICY, "candidates": [], "pmf": [1.0], "chosen": 0,
                          "propensity": 1.0,
                          "layout": [{"slot": 0, "module_id": "import", "category": item_category[shown[0]], "tilt": 0.0,
                                      "items": [{"item_id": i, "long_tail": False} for i in shown]}],
                          "fallback_reason": None})
        for r in rows.tolist():
            v = float(data["value"][r])
            feedback.append({"event_id": "import:" + _hash(uid, data["item_id"][r], data["event"][r], repr(ts)),
                             "request_id": rid, "slot": 0, "item_id": str(data["item_id"][r]),
                             "type": str(data["event"][r]), "value": None if math.isnan(v) else v, "ts": when,
                             "received_at": datetime.now(tz=UTC)})
    for k in range(0, len(decisions), 5000):
        insert_decisions(db, decisions[k:k + 5000])
    for k in range(0, len(feedback), 5000):
        insert_feedback(db, feedback[k:k + 5000])
    return len(decisions), len(feedback)


@dataclass(frozen=True, slots=True)
class ImportResult:
    decisions: int
    events: int
    users: int
    by_event: dict[str, int]


def import_file(db: Engine, path: str | Path) -> ImportResult:
    """Import an interactions file against the catalog in the database."""
    items = load_items(db)
    if len(items["item_ids"]) == 0:
        raise NotReady("the catalog is empty; load it first with `homepage catalog load items.csv`", field="catalog")
    cat = dict(zip(map(str, items["item_ids"]), map(str, items["category"]), strict=True))
    data = read_interactions(path, set(cat))
    n_dec, n_ev = import_rows(db, data, cat, source=str(path))
    kinds = {e: int((data["event"] == e).sum()) for e in EVENT_TYPES if (data["event"] == e).any()}
    return ImportResult(n_dec, n_ev, int(np.unique(data["user_id"]).size), kinds)
