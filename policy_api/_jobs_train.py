"""Ranker jobs: import historical interactions, build training data from the log, train, evaluate
against baselines, publish a versioned model.

Imported interactions become log rows of their own kind: one ``decisions`` row per (user, time)
with ``policy = "import"``, no candidates (so learning and replay skip them) and the interacted items
as its layout, plus one ``feedback`` row per interaction (idempotent by a content hash, so importing
a file twice adds nothing). The ranker's data builder then sees them exactly like served traffic.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from allocator import EVENT_TYPES, FEEDBACK_TYPES

from . import _store as store
from ._cli_common import CliError, db_engine

__all__ = ["add_commands", "read_interactions", "import_rows", "ImportError_"]


class ImportError_(ValueError):  # noqa: N801 - not the builtin ImportError
    """A bad interactions file; names the line, the column, what is allowed and what was found."""


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
        raise ImportError_(f"{path}: line {line}: timestamp must be epoch seconds or ISO 8601; got {text!r}") from None


def read_interactions(path: str | Path, known_items: set[str]) -> dict[str, np.ndarray]:
    """Read ``user_id,item_id,event,timestamp[,value]``; every bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise ImportError_(f"interactions file not found: {str(p)!r}")
    users, items, events, tss, values = [], [], [], [], []
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        need = ["user_id", "item_id", "event", "timestamp"]
        if header[:4] != need or len(header) > 5 or (len(header) == 5 and header[4] != "value"):
            raise ImportError_(f"{p}: line 1: header must be user_id,item_id,event,timestamp[,value]; got "
                               f"{','.join(header)!r}")
        allowed = ", ".join(FEEDBACK_TYPES)
        for line, row in enumerate(reader, start=2):
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) not in (4, len(header)):  # the value column may be left off a line
                raise ImportError_(f"{p}: line {line}: expected {len(header)} columns; got {len(row)}")
            uid, iid, ev = row[0].strip(), row[1].strip(), row[2].strip()
            if not uid:
                raise ImportError_(f"{p}: line {line}: user_id must be non-empty")
            if iid not in known_items:
                raise ImportError_(f"{p}: line {line}: item_id {iid!r} is not in the catalog (load it first with "
                                   "`homepage catalog load`)")
            if ev not in FEEDBACK_TYPES:
                raise ImportError_(f"{p}: line {line}: event must be one of {allowed}; got {ev!r}")
            val = None
            if len(row) == 5 and len(header) == 5 and row[4].strip():
                try:
                    val = float(row[4])
                except ValueError:
                    raise ImportError_(f"{p}: line {line}: value must be a number; got {row[4]!r}") from None
                if not math.isfinite(val):
                    raise ImportError_(f"{p}: line {line}: value must be finite; got {row[4]!r}")
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


def import_rows(db: Any, data: dict[str, np.ndarray], item_category: dict[str, str], source: str) -> tuple[int, int]:
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
                          "versions": {}, "policy": "import", "candidates": [], "pmf": [1.0], "chosen": 0,
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
        store.insert_decisions(db, decisions[k:k + 5000])
    for k in range(0, len(feedback), 5000):
        store.insert_feedback(db, feedback[k:k + 5000])
    return len(decisions), len(feedback)


def cmd_import(args: argparse.Namespace) -> int:
    db = db_engine()
    items = store.load_items(db)
    if len(items["item_ids"]) == 0:
        raise CliError("the catalog is empty; load it first with `homepage catalog load items.csv`")
    cat = dict(zip(map(str, items["item_ids"]), map(str, items["category"]), strict=True))
    try:
        data = read_interactions(args.file, set(cat))
    except ImportError_ as e:
        raise CliError(str(e)) from None
    n_dec, n_ev = import_rows(db, data, cat, source=str(args.file))
    kinds = {e: int((data["event"] == e).sum()) for e in EVENT_TYPES if (data["event"] == e).any()}
    print(f"imported {n_ev} interactions of {np.unique(data['user_id']).size} users as {n_dec} log entries "
          f"({', '.join(f'{k} {v}' for k, v in kinds.items())})")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("import", help="warm-start from history: interactions.csv (user_id,item_id,event,timestamp[,value])")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_import)


# ---- training data from the log ------------------------------------------------------------------
_EVENT_CODE = {e: k for k, e in enumerate(EVENT_TYPES)}


def log_training_arrays(db: Any, config: Any, catalog: Any) -> dict[str, Any]:
    """Impressions and events for :func:`rankers.build_examples`, from the log.

    An impression is a (decision, item) pair the user is known to have seen: one with any feedback
    event (the client's ``impression`` events, or any behaviour). Shown-but-unexamined items are not
    taken as negatives, which keeps position bias out of the labels.
    """
    dec = store.read_decisions(db, columns=["request_id", "ts", "user_id"])
    fb = store.read_feedback(db, columns=["request_id", "item_id", "type", "ts"])
    rid = np.asarray(dec["request_id"], dtype=str)
    order = np.argsort(rid, kind="stable")
    users, user_idx = np.unique(np.asarray(dec["user_id"], dtype=str), return_inverse=True)
    f_rid = np.asarray(fb["request_id"], dtype=str)
    pos = np.minimum(np.searchsorted(rid[order], f_rid), max(rid.size - 1, 0))
    matched = (rid[order][pos] == f_rid) if rid.size else np.zeros(f_rid.size, bool)
    d_idx = order[pos]
    ids = np.asarray(catalog.item_ids, dtype=str)
    io = np.argsort(ids, kind="stable")
    f_item = np.asarray(fb["item_id"], dtype=str)
    ipos = np.minimum(np.searchsorted(ids[io], f_item), max(ids.size - 1, 0))
    known_item = ids[io][ipos] == f_item
    item = io[ipos]
    from ._logdata import to_epoch

    ts = to_epoch(fb["ts"])
    ok = matched & known_item
    types = np.asarray(fb["type"], dtype=str)
    # impressions: distinct (decision, item) with any event; time = the decision's time
    key = d_idx[ok].astype(np.int64) * (ids.size + 1) + item[ok]
    uk = np.unique(key)
    imp_dec = uk // (ids.size + 1)
    imp_item = uk % (ids.size + 1)
    dec_ts = to_epoch(dec["ts"])
    impressions = {"decision": imp_dec, "user": user_idx[imp_dec], "item": imp_item, "ts": dec_ts[imp_dec]}
    beh = ok & (types != "impression") & np.isin(types, EVENT_TYPES)
    events = {"decision": d_idx[beh], "user": user_idx[d_idx[beh]], "item": item[beh], "ts": ts[beh],
              "type": np.array([_EVENT_CODE[t] for t in types[beh].tolist()], dtype=np.int64)}
    return {"impressions": impressions, "events": events, "user_ids": users.tolist(), "n_users": int(users.size)}
