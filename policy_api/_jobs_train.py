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
    add_train_command(sub)
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


# ---- train -------------------------------------------------------------------------------------
_ARTIFACT_MAGIC = b"HPRANKER1\n"


def pack_ranker(scorer_bytes: bytes, meta: dict[str, Any]) -> bytes:
    """The registry artifact: a magic line, the JSON metadata (id mappings), the scorer's own bytes."""
    import json

    m = json.dumps(meta).encode()
    return _ARTIFACT_MAGIC + len(m).to_bytes(8, "little") + m + scorer_bytes


def unpack_ranker(data: bytes) -> tuple[bytes, dict[str, Any]]:
    import json

    if not data.startswith(_ARTIFACT_MAGIC):
        raise ValueError("ranker artifact must start with the HPRANKER1 header; got something else")
    k = len(_ARTIFACT_MAGIC)
    n = int.from_bytes(data[k:k + 8], "little")
    return data[k + 8 + n:], json.loads(data[k + 8:k + 8 + n])


def train_ranker(db: Any, config: Any, *, interaction: str = "cin", max_epochs: int = 20, threads: int = 1,
                 force: bool = False, true_relevance: Any = None, progress: bool = False,
                 seed: int = 0) -> dict[str, Any]:
    """Build the data from the log, train, evaluate against baselines, publish if better than
    popularity on validation (or forced). Returns the report as a dict (``text`` is the table)."""
    import time

    from rankers import RankerScorer, TrainConfig, build_examples, evaluate, fit, report_table, split_by_time

    from ._catalog import Catalog

    catalog = Catalog.from_arrays(store.load_items(db))
    cats = catalog.category_index(config.category_names)
    if (cats < 0).any():
        bad = sorted(set(catalog.category[cats < 0].tolist()))
        raise CliError(f"catalog categories {bad} are not in the config; every item's category must be configured")
    data = log_training_arrays(db, config, catalog)
    if data["impressions"]["item"].size < 200:
        raise CliError(f"only {data['impressions']['item'].size} impressions with feedback in the log; need at "
                       "least 200 to train (serve traffic or `homepage import` history first)")
    t0 = time.perf_counter()
    ex = build_examples(data["impressions"], data["events"], n_users=data["n_users"], n_items=catalog.n_items,
                        item_category=cats, item_features=catalog.features, popularity=catalog.popularity,
                        n_categories=len(config.category_names))
    train, valid, test = split_by_time(ex, valid=0.1, test=0.1)
    cfg = TrainConfig(interaction=interaction, max_epochs=max_epochs, threads=threads, seed=seed,
                      event_weights=dict(config.events))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_epochs, desc="train rankers", unit="epoch")

    def on_epoch(epoch: int, total: int, m: Any) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(valid_logloss=f"{m['valid_logloss']:.4f}")

    model, history = fit(train, valid, cfg, progress=on_epoch)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t0
    is_tail = None
    from allocator import long_tail

    is_tail, _ = long_tail(catalog.popularity, cats, config.tilt.head_share)
    gate = evaluate(model, valid, train=train, event_weights=dict(config.events), is_tail=is_tail,
                    category_names=config.category_names, threads=threads, seed=seed)
    # publish only what beats the popularity scorer served today, on validation: the click model
    # (play GAUC of the factual prediction) and the score as served (NDCG@10 of logged lists by
    # behaviour grade) — a small log can give a click model that wins yet serves worse
    model_gauc = gate.value(gate.model, "gauc", "play")
    pop_gauc = gate.value("popularity", "gauc", "play")
    ndcg = f"ndcg@{gate.k}"
    model_ndcg = gate.value("ranker", ndcg, "units")
    pop_ndcg = gate.value("popularity", ndcg, "units")
    better = bool(model_gauc > pop_gauc and model_ndcg > pop_ndcg)
    report = evaluate(model, test, train=train, event_weights=dict(config.events), is_tail=is_tail,
                      true_relevance=true_relevance, category_names=config.category_names, threads=threads,
                      seed=seed)
    text = report_table(report)
    metrics = {"examples": {"train": len(train), "valid": len(valid), "test": len(test)},
               "train_s": train_s, "examples_per_s": len(train) * len(history.train_loss) / max(train_s, 1e-9),
               "best_epoch": history.best_epoch, "valid_logloss": list(history.valid_logloss),
               "valid_play_gauc": model_gauc, "valid_play_gauc_popularity": pop_gauc,
               "valid_ndcg": model_ndcg, "valid_ndcg_popularity": pop_ndcg,
               "test_beats_baselines": report.beats_baselines, "verdict": report.verdict,
               "interaction": interaction}
    out: dict[str, Any] = {"text": text, "metrics": metrics, "published": None, "history": history,
                           "report": report}
    if better or force:
        scorer = RankerScorer(model, dict(config.events), ex.history)
        artifact = pack_ranker(scorer.save(), {"user_ids": data["user_ids"],
                                               "item_ids": [str(i) for i in catalog.item_ids.tolist()],
                                               "categories": list(config.category_names)})
        out["published"] = store.publish_model(db, "ranker", metrics, artifact)
    else:
        store.publish_model(db, "ranker", metrics, None, status="rejected")
    return out


def write_train_report(out_dir: Path, result: dict[str, Any]) -> Path:
    """``train.txt`` (the table) and ``train.png`` (learning curves) in the report folder."""
    from ._report import _plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text(result["text"] + "\n")
    plt = _plt()
    h = result["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(h.train_loss) + 1), h.train_loss, marker="o", label="train loss")
    ax2 = ax.twinx()
    ax2.plot(range(1, len(h.valid_logloss) + 1), h.valid_logloss, marker="s", color="#c50", label="valid logloss")
    ax.axvline(h.best_epoch + 1 if h.best_epoch < len(h.train_loss) else h.best_epoch, color="#999", ls="--")
    ax.set_xlabel("epoch")
    ax.set_title("ranker training (dashed: kept epoch)")
    fig.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "train.png", dpi=110)
    plt.close(fig)
    return out_dir / "train.txt"


def cmd_train(args: argparse.Namespace) -> int:
    import sys

    from ._jobs_plan import _active

    db = db_engine()
    version, cfg = _active(db, args)
    res = train_ranker(db, cfg, interaction=args.interaction, max_epochs=args.max_epochs, threads=args.threads,
                       force=args.force, progress=sys.stderr.isatty(), seed=args.seed)
    print(res["text"])
    page = write_train_report(Path(args.report_dir), res)
    m = res["metrics"]
    if res["published"] is not None:
        print(f"published ranker version {res['published']} (validation play GAUC {m['valid_play_gauc']:.4f} vs "
              f"popularity {m['valid_play_gauc_popularity']:.4f}); report: {page}")
        return 0
    print(f"NOT published: on validation the ranker must beat popularity on play GAUC "
          f"({m['valid_play_gauc']:.4f} vs {m['valid_play_gauc_popularity']:.4f}) and on NDCG@10 of the served "
          f"score ({m['valid_ndcg']:.4f} vs {m['valid_ndcg_popularity']:.4f}); use --force to publish anyway. "
          f"Report: {page}")
    return 1


def add_train_command(sub: Any) -> None:
    from ._cli_common import config_arg

    p = sub.add_parser("train", help="train the per-category rankers from the log, evaluate, publish a version")
    config_arg(p)
    p.add_argument("--interaction", choices=("cin", "cross"), default="cin",
                   help="feature-interaction block: CIN (xDeepFM) or the cheaper DCN-v2 cross layer")
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="publish even if it does not beat popularity")
    p.add_argument("--report-dir", default="homepage-data/report", help="where train.txt and train.png go")
    p.set_defaults(func=cmd_train)
