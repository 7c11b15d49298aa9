"""Ranker training: training data from the log, fit, evaluation against baselines, a gated publish.

An impression is a (decision, item) pair the user is known to have seen; behaviour events are the
labels. The ranker is published only if it beats popularity on validation (see :func:`train_ranker`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.engine import Engine

import rankers
from allocator import EVENT_TYPES, long_tail
from rankers import build_examples, split_by_time

from .. import registry
from ..errors import InvalidInput
from ..log import Catalog, load_items, read_decisions, read_feedback, to_epoch
from ..registry import ConfigRecord, RankerArtifact

if TYPE_CHECKING:  # torch-backed types: serving imports this module and must not load torch for them
    from rankers import RankerMetrics, TrainHistory

__all__ = ["TrainResult", "log_training_arrays", "train_ranker"]

EpochCallback = Callable[[int, int, Mapping[str, float]], None]


_EVENT_CODE = {e: k for k, e in enumerate(EVENT_TYPES)}


def log_training_arrays(db: Engine, catalog: Catalog) -> dict[str, Any]:
    """Impressions and events for :func:`rankers.build_examples`, from the log.

    An impression is a (decision, item) pair the user is known to have seen: one with any feedback
    event (the client's ``impression`` events, or any behaviour). Shown-but-unexamined items are not
    taken as negatives, which keeps position bias out of the labels.
    """
    dec = read_decisions(db, columns=["request_id", "ts", "user_id"])
    fb = read_feedback(db, columns=["request_id", "item_id", "type", "ts"])
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


@dataclass(frozen=True)
class TrainResult:
    """A training run: the report table, the registry metrics, the version published (None if refused)."""

    text: str
    metrics: dict[str, Any]
    published: int | None
    rejected: int | None
    history: TrainHistory
    report: RankerMetrics


def train_ranker(db: Engine, config: ConfigRecord, *, interaction: str = "cin", max_epochs: int = 20,
                 threads: int = 1, force: bool = False,
                 true_relevance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 on_epoch: EpochCallback | None = None, seed: int = 0, require_test: bool = False) -> TrainResult:
    """Build the data from the log, train, evaluate against baselines, publish if better than
    popularity on validation (or ``force``); a refused model is recorded as ``rejected``.

    With ``require_test`` the model must also beat every baseline on the held-out test split (the
    background loop publishes unattended, so it asks for both).

    ``on_epoch(epoch, max_epochs, metrics)`` is called after every epoch (progress bars).
    """
    cfg = config.config
    catalog = Catalog.from_arrays(load_items(db))
    cats = catalog.category_index(cfg.category_names)
    if (cats < 0).any():
        bad = sorted(set(catalog.category[cats < 0].tolist()))
        raise InvalidInput(f"catalog categories must all be in the config {list(cfg.category_names)}; "
                           f"got {bad} as well", field="category")
    data = log_training_arrays(db, catalog)
    if data["impressions"]["item"].size < 200:
        raise InvalidInput(f"only {data['impressions']['item'].size} impressions with feedback in the log; need "
                           "at least 200 to train (serve traffic or `homepage import` history first)", field="log")
    t0 = time.perf_counter()
    ex = build_examples(data["impressions"], data["events"], n_users=data["n_users"], n_items=catalog.n_items,
                        item_category=cats, item_features=catalog.features, popularity=catalog.popularity,
                        n_categories=len(cfg.category_names))
    train, valid, test = split_by_time(ex, valid=0.1, test=0.1)
    tc = rankers.TrainConfig(interaction=interaction, max_epochs=max_epochs, threads=threads, seed=seed,
                     event_weights=dict(cfg.events))
    model, history = rankers.fit(train, valid, tc, progress=on_epoch)
    train_s = time.perf_counter() - t0
    is_tail, _ = long_tail(catalog.popularity, cats, cfg.tilt.head_share)
    gate = rankers.evaluate(model, valid, train=train, event_weights=dict(cfg.events), is_tail=is_tail,
                    category_names=cfg.category_names, threads=threads, seed=seed)
    # publish only what beats the popularity scorer served today, on validation: the click model
    # (play GAUC of the factual prediction) and the score as served (NDCG@10 of logged lists by
    # behaviour grade) — a small log can give a click model that wins yet serves worse
    model_gauc = gate.value(gate.model, "gauc", "play")
    pop_gauc = gate.value("popularity", "gauc", "play")
    ndcg = f"ndcg@{gate.k}"
    model_ndcg = gate.value("ranker", ndcg, "units")
    pop_ndcg = gate.value("popularity", ndcg, "units")
    better = bool(model_gauc > pop_gauc and model_ndcg > pop_ndcg)
    report = rankers.evaluate(model, test, train=train, event_weights=dict(cfg.events), is_tail=is_tail,
                      true_relevance=true_relevance, category_names=cfg.category_names, threads=threads,
                      seed=seed)
    metrics = {"examples": {"train": len(train), "valid": len(valid), "test": len(test)},
               "train_s": train_s, "examples_per_s": len(train) * len(history.train_loss) / max(train_s, 1e-9),
               "best_epoch": history.best_epoch, "valid_logloss": list(history.valid_logloss),
               "valid_play_gauc": model_gauc, "valid_play_gauc_popularity": pop_gauc,
               "valid_ndcg": model_ndcg, "valid_ndcg_popularity": pop_ndcg,
               "test_beats_baselines": report.beats_baselines, "verdict": report.verdict,
               "interaction": interaction, "config_version": config.version, "forced": bool(force and not better)}
    published = rejected = None
    if require_test and not report.beats_baselines:
        better = False
    if better or force:
        scorer = rankers.RankerScorer(model, dict(cfg.events), ex.history)
        artifact = registry.pack_ranker(RankerArtifact(
            scorer=scorer.save(), user_ids=list(data["user_ids"]),
            item_ids=[str(i) for i in catalog.item_ids.tolist()], categories=list(cfg.category_names)))
        published = registry.publish_model(db, "ranker", metrics, artifact)
    else:
        rejected = registry.publish_model(db, "ranker", metrics, None, status="rejected")
    return TrainResult(rankers.report_table(report), metrics, published, rejected, history, report)
