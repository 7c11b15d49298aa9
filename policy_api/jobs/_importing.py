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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlalchemy.engine import Engine

from allocator import EVENT_TYPES, FEEDBACK_TYPES

from ..errors import InvalidInput, NotFound, NotReady
from ..log import IMPORT_POLICY, encode_candidates, insert_stored, load_items, stored_timestamps

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


#: an import writes the rows of this many interactions at a time (whole users: a (user, time) group is
#: never split), so that its memory does not grow with the file beyond the interactions read
IMPORT_CHUNK_ROWS = 200_000


def import_rows(db: Engine, data: dict[str, np.ndarray], item_category: dict[str, str], source: str, *,
                progress: Callable[[int, int], None] | None = None,
                chunk_rows: int = IMPORT_CHUNK_ROWS) -> tuple[int, int]:
    """Write interactions as import decisions + feedback. Returns (decisions, events) sent; re-imports
    are no-ops (both inserts are idempotent: ids hash the interaction's content).

    One decision per (user, time) group, the log's unit: its layout lists the group's distinct items
    in file order, in a module of the first one's category. The rows are built column-wise and
    handed to the driver as stored (:func:`~policy_api.log.insert_stored`): what
    :func:`~policy_api.log.insert_decisions` and :func:`~policy_api.log.insert_feedback` would store
    for the same rows, without a dict and an encoding per row, ``chunk_rows`` interactions of whole
    users at a time. ``progress(rows, total)`` is called as the rows are written (``rows`` written
    since the last call; ``total`` decisions and events)."""
    n = data["user_id"].size
    if n == 0:
        return 0, 0
    ucode = np.unique(data["user_id"].astype(str), return_inverse=True)[1]
    by_user = np.argsort(ucode, kind="stable")  # file order within each user
    total = n + int(_groups(ucode, np.asarray(data["ts"], dtype=np.float64))[1].sum())  # events + decisions
    ends = np.cumsum(np.bincount(ucode))  # rows up to each user's last, in user order
    cuts = np.unique(np.r_[0, ends[np.searchsorted(ends, np.arange(chunk_rows, n, chunk_rows))], n])
    step = None if progress is None else (lambda rows: progress(rows, total))
    got = [_import_chunk(db, {k: np.asarray(v)[by_user[a:b]] for k, v in data.items()}, item_category, source, step)
           for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)]
    return sum(g for g, _ in got), sum(m for _, m in got)


def _groups(ucode: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (user, time) groups: rows sorted by user, then time, then file order (a stable sort), and
    whether each sorted row starts a group."""
    order = np.lexsort((ts, ucode))
    us, ts_s = ucode[order], ts[order]
    return order, np.r_[True, (us[1:] != us[:-1]) | (ts_s[1:] != ts_s[:-1])]


def _import_chunk(db: Engine, data: dict[str, np.ndarray], item_category: dict[str, str], source: str,
                  progress: Callable[[int], None] | None) -> tuple[int, int]:
    """:func:`import_rows` for interactions of whole users: returns (decisions, events) sent."""
    n = data["user_id"].size
    uid_all = data["user_id"].astype(str)
    iid_all = data["item_id"].astype(str)
    ts_all = np.asarray(data["ts"], dtype=np.float64)
    users, ucode = np.unique(uid_all, return_inverse=True)
    items, icode = np.unique(iid_all, return_inverse=True)
    order, new_group = _groups(ucode, ts_all)
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(new_group) - 1
    G = int(new_group.sum())
    first = order[new_group]  # each group's first row in the file
    g_user = users[ucode[first]].tolist()
    g_ts = ts_all[first]
    g_rid = ["import:" + _hash(u, repr(t)) for u, t in zip(g_user, g_ts.tolist(), strict=True)]
    # each group's distinct items in file order: the first row of each (group, item) pair
    pair = group * items.size + icode
    _, pair_first = np.unique(pair, return_index=True)
    pair_first = pair_first[np.lexsort((pair_first, group[pair_first]))]  # by group, then file order
    bounds = np.r_[0, np.cumsum(np.bincount(group[pair_first], minlength=G))]
    item_json = [orjson.dumps({"item_id": i, "long_tail": False}).decode() for i in items.tolist()]
    shown = [item_json[i] for i in icode[pair_first].tolist()]
    cat_json = [orjson.dumps(item_category[i]).decode() for i in items.tolist()]  # once per distinct item
    cats = [cat_json[i] for i in icode[first].tolist()]
    layouts = ['[{"slot":0,"module_id":"import","category":' + c + ',"tilt":0.0,"items":[' +
               ",".join(shown[bounds[g]:bounds[g + 1]]) + "]}]" for g, c in enumerate(cats)]
    dialect = db.dialect.name
    when = stored_timestamps(g_ts, dialect)
    context = orjson.dumps({"source": source}).decode()
    candidates = orjson.dumps(encode_candidates([])).decode()
    decision_rows = list(zip(g_rid, when, g_user, [context] * G, ["{}"] * G, [IMPORT_POLICY] * G,
                             [candidates] * G, ["[1.0]"] * G, [0] * G, [1.0] * G, layouts, [None] * G, strict=True))
    ts_repr = [repr(t) for t in ts_all.tolist()]
    uid_l, iid_l, ev_l = uid_all.tolist(), iid_all.tolist(), data["event"].astype(str).tolist()
    event_id = ["import:" + _hash(u, i, e, t) for u, i, e, t in zip(uid_l, iid_l, ev_l, ts_repr, strict=True)]
    value = np.asarray(data["value"], dtype=np.float64)
    values = [None if v != v else v for v in value.tolist()]  # NaN: no value
    rid_of_row = [g_rid[g] for g in group.tolist()]
    received = stored_timestamps(np.array([datetime.now(tz=UTC).timestamp()]), dialect) * n
    feedback_rows = list(zip(event_id, rid_of_row, [0] * n, iid_l, ev_l, values, stored_timestamps(ts_all, dialect),
                             received, strict=True))
    insert_stored(db, "decisions", decision_rows, progress=progress)
    insert_stored(db, "feedback", feedback_rows, progress=progress)
    return G, n


@dataclass(frozen=True, slots=True)
class ImportResult:
    decisions: int
    events: int
    users: int
    by_event: dict[str, int]


def import_file(db: Engine, path: str | Path, *, progress: Callable[[int, int], None] | None = None
                ) -> ImportResult:
    """Import an interactions file against the catalog in the database (``progress``: see
    :func:`import_rows`)."""
    items = load_items(db)
    if len(items["item_ids"]) == 0:
        raise NotReady("the catalog is empty; load it first with `homepage catalog load items.csv`", field="catalog")
    cat = dict(zip(map(str, items["item_ids"]), map(str, items["category"]), strict=True))
    data = read_interactions(path, set(cat))
    n_dec, n_ev = import_rows(db, data, cat, source=str(path), progress=progress)
    kinds = {e: int((data["event"] == e).sum()) for e in EVENT_TYPES if (data["event"] == e).any()}
    return ImportResult(n_dec, n_ev, int(np.unique(data["user_id"]).size), kinds)
