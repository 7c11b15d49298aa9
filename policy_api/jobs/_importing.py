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

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from sqlalchemy.engine import Engine

from allocator import EVENT_TYPES, FEEDBACK_TYPES

from ..errors import InvalidInput, NotFound, NotReady
from ..log import IMPORT_POLICY, encode_candidates, insert_stored, load_items, stored_timestamps

__all__ = ["IMPORT_ID_PREFIX", "ImportResult", "decision_ids", "event_ids", "import_file", "import_rows",
           "read_interactions", "read_interactions_by_line", "string_hashes"]


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
    """Read ``user_id,item_id,event,timestamp[,value]``; every bad line is an error naming it.

    A file whose every line is well formed is read column-wise (pyarrow's CSV reader and vectorised
    checks); any other file, line by line (:func:`read_interactions_by_line`), which names the first
    bad line and reads a 4-column line of a 5-column file."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"interactions file not found: {str(p)!r}", field="file")
    with p.open(newline="", encoding="utf-8") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    need = ["user_id", "item_id", "event", "timestamp"]
    if header[:4] != need or len(header) > 5 or (len(header) == 5 and header[4] != "value"):
        raise InvalidInput(f"{p}: line 1: header must be user_id,item_id,event,timestamp[,value]; got "
                           f"{','.join(header)!r}")
    got = _read_columns(p, header, known_items)
    return got if got is not None else read_interactions_by_line(p, known_items)


def _read_columns(p: Path, header: list[str], known_items: set[str]) -> dict[str, np.ndarray] | None:
    """:func:`read_interactions` column-wise, or None where a line is not what the line-by-line reader
    would take unchanged (it then reads the file and names the line)."""
    try:
        table = pacsv.read_csv(p, read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
                               parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    cols = {h: pc.utf8_trim_whitespace(table[h]) for h in header}
    if (table.num_rows and pc.any(pc.equal(cols["user_id"], "")).as_py()
            or not pc.all(pc.is_in(cols["item_id"], value_set=pa.array(list(known_items), pa.string()))).as_py()
            or not pc.all(pc.is_in(cols["event"], value_set=pa.array(FEEDBACK_TYPES, pa.string()))).as_py()):
        return None
    try:
        ts = pc.cast(cols["timestamp"], pa.float64()).to_numpy(zero_copy_only=False)
        if not (np.isfinite(ts) & (ts >= 0)).all():
            return None
    except pa.ArrowInvalid:  # ISO 8601 times: each distinct one parsed as the line-by-line reader does
        distinct = pc.unique(table["timestamp"])
        try:
            parsed = pa.array([_ts(t, p, 0) for t in distinct.to_pylist()], pa.float64())
        except InvalidInput:
            return None
        ts = pc.take(parsed, pc.index_in(table["timestamp"], value_set=distinct)).to_numpy(zero_copy_only=False)
    value = np.full(table.num_rows, np.nan)
    if "value" in cols:
        given = pc.not_equal(cols["value"], "")
        try:
            v = pc.cast(pc.filter(cols["value"], given), pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            return None
        if not np.isfinite(v).all():
            return None
        value[given.to_numpy(zero_copy_only=False)] = v
    return {"user_id": _shared_strings(cols["user_id"]), "item_id": _shared_strings(cols["item_id"]),
            "event": _shared_strings(cols["event"]), "ts": ts.astype(np.float64), "value": value}


def _shared_strings(col: pa.ChunkedArray) -> np.ndarray:
    """A string column as an object array in which equal values are one ``str`` (a user's id is one
    object however many lines name it: 8 bytes a line instead of ~60)."""
    enc = pc.dictionary_encode(col.combine_chunks())
    return np.asarray(enc.dictionary.to_pylist(), dtype=object)[enc.indices.to_numpy(zero_copy_only=False)]


def read_interactions_by_line(path: str | Path, known_items: set[str]) -> dict[str, np.ndarray]:
    """:func:`read_interactions` one line at a time (the reference for its column-wise reading)."""
    p = Path(path)
    users, items, events, tss, values = [], [], [], [], []
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
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


#: an imported row's id: ``import:``, its time (microseconds since the epoch plus 2**62, so earlier
#: times sort first, 16 hex digits) and a 64-bit hash of its content (16 hex digits). Ids of one
#: import go into each key's index in time order, next to each other, instead of at random places
#: (a hash alone): the indexes of a log larger than memory stay cheap to insert into.
IMPORT_ID_PREFIX = "import:"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on ``uint64`` (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_hashes(values: list[str]) -> np.ndarray:
    """A 64-bit BLAKE2b hash of each string (its UTF-8), as ``uint64``."""
    return np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "big") for v in values],
                    dtype=np.uint64)


def _ids(ts: np.ndarray, content: np.ndarray) -> np.ndarray:
    """``import:<time><hash>`` for epoch seconds ``ts`` and ``uint64`` content hashes, as an array of
    str, built without a Python call per id."""
    micros = np.round(np.asarray(ts, dtype=np.float64) * 1e6).astype(np.int64)
    words = np.stack([(micros + (1 << 62)).astype(np.uint64), content.astype(np.uint64)], axis=1)
    nibbles = words.astype(">u8").view(np.uint8).reshape(-1, 16)
    digits = np.empty((nibbles.shape[0], 32), dtype=np.uint8)
    digits[:, 0::2], digits[:, 1::2] = _HEX[nibbles >> 4], _HEX[nibbles & 15]
    text = np.frombuffer(IMPORT_ID_PREFIX.encode(), dtype=np.uint8)
    full = np.concatenate([np.broadcast_to(text, (digits.shape[0], text.size)), digits], axis=1)
    return np.ascontiguousarray(full).view(f"S{full.shape[1]}").ravel().astype(str)


def decision_ids(user_hash: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The id of the import decision of each (user, time) group: the time, then a hash of the user's
    hash (:func:`string_hashes`) and the time's exact float64 bits."""
    bits = np.ascontiguousarray(ts, dtype=np.float64).view(np.uint64)
    return _ids(ts, _splitmix(user_hash ^ _splitmix(bits)))


def event_ids(user_hash: np.ndarray, item_hash: np.ndarray, event_hash: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The id of each imported event: the time, then a hash of (user, item, event type, time)."""
    bits = np.ascontiguousarray(ts, dtype=np.float64).view(np.uint64)
    return _ids(ts, _splitmix(_splitmix(user_hash ^ _splitmix(bits)) ^ _splitmix(item_hash ^ _splitmix(event_hash))))


#: an import writes the rows of this many interactions at a time (in time order; a (user, time) group
#: is never split), so that its memory does not grow with the file beyond the interactions read
IMPORT_CHUNK_ROWS = 200_000


def import_rows(db: Engine, data: dict[str, np.ndarray], item_category: dict[str, str], source: str, *,
                progress: Callable[[int, int], None] | None = None,
                chunk_rows: int = IMPORT_CHUNK_ROWS) -> tuple[int, int]:
    """Write interactions as import decisions + feedback. Returns (decisions, events) sent; re-imports
    are no-ops (both inserts are idempotent: ids are the interaction's time and a hash of its content,
    :func:`decision_ids` and :func:`event_ids`).

    One decision per (user, time) group, the log's unit: its layout lists the group's distinct items
    in file order, in a module of the first one's category. The rows are built column-wise and
    handed to the driver as stored (:func:`~policy_api.log.insert_stored`): what
    :func:`~policy_api.log.insert_decisions` and :func:`~policy_api.log.insert_feedback` would store
    for the same rows, without a dict and an encoding per row, ``chunk_rows`` interactions at a time
    in time order, each chunk's rows sorted by id, so that every index of the log grows at its end.
    ``progress(rows, total)`` is called as the rows are written (``rows`` written since the last
    call; ``total`` decisions and events)."""
    n = data["user_id"].size
    if n == 0:
        return 0, 0
    ucode = np.unique(data["user_id"].astype(str), return_inverse=True)[1]
    ts = np.asarray(data["ts"], dtype=np.float64)
    order = np.lexsort((ucode, ts))  # by time, then user; file order within (lexsort is stable)
    us, ts_s = ucode[order], ts[order]
    starts = np.flatnonzero(np.r_[True, (us[1:] != us[:-1]) | (ts_s[1:] != ts_s[:-1])])  # each group's first row
    at = np.searchsorted(starts, np.arange(chunk_rows, n, chunk_rows))
    cuts = np.unique(np.r_[0, np.where(at < starts.size, starts[np.minimum(at, starts.size - 1)], n), n])
    step = None if progress is None else (lambda rows: progress(rows, n + starts.size))
    got = [_import_chunk(db, {k: np.asarray(v)[order[a:b]] for k, v in data.items()}, item_category, source, step)
           for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)]
    return sum(g for g, _ in got), sum(m for _, m in got)


def _import_chunk(db: Engine, data: dict[str, np.ndarray], item_category: dict[str, str], source: str,
                  progress: Callable[[int], None] | None) -> tuple[int, int]:
    """:func:`import_rows` for interactions of whole (user, time) groups, sorted by time, then user,
    then file order: returns (decisions, events) sent."""
    n = data["user_id"].size
    ts_all = np.asarray(data["ts"], dtype=np.float64)
    users, ucode = np.unique(data["user_id"].astype(str), return_inverse=True)
    items, icode = np.unique(data["item_id"].astype(str), return_inverse=True)
    events, ecode = np.unique(data["event"].astype(str), return_inverse=True)
    new_group = np.r_[True, (ucode[1:] != ucode[:-1]) | (ts_all[1:] != ts_all[:-1])]
    group = np.cumsum(new_group) - 1
    first = np.flatnonzero(new_group)  # each group's first row
    G = first.size
    user_hash = string_hashes(users.tolist())
    g_rid = decision_ids(user_hash[ucode[first]], ts_all[first])
    e_id = event_ids(user_hash[ucode], string_hashes(items.tolist())[icode], string_hashes(events.tolist())[ecode],
                     ts_all)
    # each group's distinct items in file order: the first row of each (group, item) pair
    pair = group * items.size + icode
    _, pair_first = np.unique(pair, return_index=True)
    pair_first.sort()  # rows are in group order, file order within
    bounds = np.r_[0, np.cumsum(np.bincount(group[pair_first], minlength=G))]
    item_json = [orjson.dumps({"item_id": i, "long_tail": False}).decode() for i in items.tolist()]
    shown = [item_json[i] for i in icode[pair_first].tolist()]
    cat_json = [orjson.dumps(item_category[i]).decode() for i in items.tolist()]  # once per distinct item
    cats = [cat_json[i] for i in icode[first].tolist()]
    layouts = ['[{"slot":0,"module_id":"import","category":' + c + ',"tilt":0.0,"items":[' +
               ",".join(shown[bounds[g]:bounds[g + 1]]) + "]}]" for g, c in enumerate(cats)]
    dialect = db.dialect.name
    context = orjson.dumps({"source": source}).decode()
    candidates = orjson.dumps(encode_candidates([])).decode()
    d_order = np.argsort(g_rid, kind="stable").tolist()  # each index grows at its end (ids lead with the time)
    decision_rows = list(zip(g_rid[d_order].tolist(), stored_timestamps(ts_all[first[d_order]], dialect),
                             users[ucode[first[d_order]]].tolist(), [context] * G, ["{}"] * G, [IMPORT_POLICY] * G,
                             [candidates] * G, ["[1.0]"] * G, [0] * G, [1.0] * G, [layouts[g] for g in d_order],
                             [None] * G, strict=True))
    f_order = np.argsort(e_id, kind="stable")
    value = np.asarray(data["value"], dtype=np.float64)[f_order]
    values = [None if v != v else v for v in value.tolist()]  # NaN: no value
    received = stored_timestamps(np.array([datetime.now(tz=UTC).timestamp()]), dialect) * n
    feedback_rows = list(zip(e_id[f_order].tolist(), g_rid[group[f_order]].tolist(), [0] * n,
                             items[icode[f_order]].tolist(), events[ecode[f_order]].tolist(), values,
                             stored_timestamps(ts_all[f_order], dialect), received, strict=True))
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
