"""Ranker training: training data from the log, fit, evaluation against baselines, a gated publish.

An impression is a (decision, item) pair the user is known to have seen; behaviour events are the
labels. The ranker is published only if the pages it would serve beat the best built-in baseline's on
the temporal holdout and its calibration holds (see :func:`train_ranker` and :func:`served_gate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.engine import Engine

import rankers
from allocator import EVENT_TYPES, long_tail
from rankers import build_examples, split_by_time

from .. import registry
from ..engine import EngineState, ScorerHandle, build_state
from ..errors import InvalidInput
from ..log import Catalog, load_items, read_decisions, read_feedback, to_epoch
from ..registry import ConfigRecord, RankerArtifact

if TYPE_CHECKING:  # torch-backed types: serving imports this module and must not load torch for them
    from rankers import RankerMetrics, TrainHistory

__all__ = ["MAX_ECE", "TrainResult", "log_training_arrays", "recent_item_popularity", "served_gate", "train_ranker"]

#: the publish gate's bound on the validation expected calibration error of the play probability
MAX_ECE = 0.05

EpochCallback = Callable[[int, int, Mapping[str, float]], None]


_EVENT_CODE = {e: k for k, e in enumerate(EVENT_TYPES)}


def log_training_arrays(db: Engine, catalog: Catalog, *, sampled_negatives: int = 0,
                        seed: int = 0) -> dict[str, Any]:
    """Impressions and events for :func:`rankers.build_examples`, from the log.

    An impression is a (decision, item) pair the user is known to have seen: one with any feedback
    event (the client's ``impression`` events, or any behaviour). Shown-but-unexamined items are not
    taken as negatives, which keeps position bias out of the labels.

    Imported history (``homepage import``) has no impressions: every row is something the user chose.
    With ``sampled_negatives = n`` each imported decision also gets ``n`` catalog items per interacted
    item, drawn uniformly, as impressions without an event (the implicit-feedback convention: what the
    user did not choose), so that the model learns what users pick, not only how they rate what they
    picked.
    """
    if isinstance(sampled_negatives, bool) or not isinstance(sampled_negatives, int) or sampled_negatives < 0:
        raise InvalidInput(f"sampled_negatives must be an int >= 0; got {sampled_negatives!r}",
                           field="sampled_negatives")
    dec = read_decisions(db, columns=["request_id", "ts", "user_id", "policy"])
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
    if sampled_negatives and ids.size > 1:
        d0 = uk // (ids.size + 1)
        imported = d0[np.asarray(dec["policy"], dtype=str)[d0] == "import"]
        rng = np.random.default_rng(seed)
        neg_dec = np.repeat(imported, sampled_negatives)
        neg_item = rng.integers(0, ids.size, size=neg_dec.size)
        uk = np.unique(np.concatenate([uk, neg_dec.astype(np.int64) * (ids.size + 1) + neg_item]))
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


def recent_item_popularity(events: Mapping[str, np.ndarray], event_weights: np.ndarray, n_items: int, *,
                           t_end: float, half_life_s: float) -> np.ndarray:
    """Shape (n_items,): ``sum_e w_e 2 ** (-(t_end - ts_e) / half_life_s)`` over the positive events
    (event-type weight ``w_e > 0``) with ``ts_e <= t_end``: recent popularity as of ``t_end``."""
    w = np.asarray(event_weights, dtype=np.float64)[np.asarray(events["type"], dtype=np.int64)]
    ts = np.asarray(events["ts"], dtype=np.float64)
    keep = (w > 0) & (ts <= t_end)
    decay = np.exp2(-(t_end - ts[keep]) / half_life_s)
    return np.bincount(np.asarray(events["item"], dtype=np.int64)[keep], weights=w[keep] * decay, minlength=n_items)


def served_gate(state: EngineState, data: Mapping[str, Any], candidates: Mapping[str, rankers.RankerScorer],
                cutoff: float, event_weights: np.ndarray, *, max_users: int = 1000, n_boot: int = 1000,
                seed: int = 0) -> tuple[str | None, dict[str, Any]]:
    """Does a candidate's served page beat every built-in baseline's on the temporal holdout?

    The baselines are fitted on the positive events before ``cutoff`` (the start of the candidates'
    validation period) and every scorer's page is judged against the held-out users' positives from
    it on (:func:`evaluate_pages`). The candidate of highest mean recall is chosen (e.g. among
    debiasing strengths); it passes when the paired-bootstrap 95% CI of its recall minus the best
    baseline's lies above 0. Each candidate must hold the users' history as of ``cutoff``.

    Returns (the chosen candidate's name if it passed, else None; the gate's table as a JSON-friendly
    dict).
    """
    from ._evaluate import baseline_scorers, evaluate_pages, holdout_split, ranker_page_scorer

    ev = data["events"]
    try:
        h = holdout_split(np.asarray(ev["user"]), np.asarray(ev["item"]), np.asarray(ev["ts"]), np.asarray(ev["type"]),
                          event_weights=event_weights, n_users=max(int(data["n_users"]), 1),
                          n_items=state.catalog.n_items, cutoff=cutoff, max_users=max_users, seed=seed)
    except InvalidInput as e:
        return None, {"passed": False, "reason": f"no served-page holdout: {e.message}"}
    scorers = baseline_scorers(h, state.item_category)
    users = list(data["user_ids"])
    index = {u: i for i, u in enumerate(users)}
    for name, sc in candidates.items():
        scorers[name] = ranker_page_scorer(ScorerHandle(sc, index, name=name), users)
    res = evaluate_pages(state, h, scorers, n_boot=n_boot, seed=seed)
    chosen = max(candidates, key=lambda n: res.row(n)["recall"])
    d = res.diff(chosen, "recall")
    passed = bool(d["ci_low"] > 0.0)
    reason = (f"served-page recall of {chosen} {res.row(chosen)['recall']:.4f} vs best baseline {res.best_baseline} "
              f"{res.row(res.best_baseline)['recall']:.4f}: difference {d['mean_diff']:+.4f}, 95% CI "
              f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" + ("" if passed else " (must lie above 0)"))
    return (chosen if passed else None), {"passed": passed, "chosen": chosen, "reason": reason, **res.to_dict()}


def train_ranker(db: Engine, config: ConfigRecord, *, interaction: str = "cin", max_epochs: int = 20,
                 threads: int = 1, force: bool = False,
                 true_relevance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 on_epoch: EpochCallback | None = None, seed: int = 0, require_test: bool = False,
                 max_ece: float = MAX_ECE, gate_users: int = 1000, sampled_negatives: int = 4,
                 recency_half_life_days: float | None = None) -> TrainResult:
    """Build the data from the log, train on its first 80 %, and publish only if the model passes the
    gate (or ``force``); a refused model is recorded as ``rejected``, its gate table in its metrics.

    The gate (:func:`served_gate`): on the temporal holdout from the start of the validation period,
    the pages the engine would serve with the model must recall more of the held-out users' future
    positives than those of the best built-in baseline (popularity, recent popularity, per-category
    popularity, item-kNN), the paired-bootstrap 95% CI of the difference above 0; and the validation
    ECE of the play probability must be at most ``max_ece``. With ``require_test`` the model must also
    beat every baseline on the logged test split (the background loop publishes unattended, so it asks
    for both).

    Imported history gets ``sampled_negatives`` unchosen items per chosen one (see
    :func:`log_training_arrays`). With ``recency_half_life_days`` the item tower also sees each item's
    positive engagement decayed with that half-life up to the end of the training part
    (:func:`recent_item_popularity`). ``on_epoch(epoch, max_epochs, metrics)`` is called after every
    epoch (progress bars).
    """
    if not 0.0 < max_ece <= 1.0:
        raise InvalidInput(f"max_ece must be in (0, 1]; got {max_ece!r}", field="max_ece")
    cfg = config.config
    catalog = Catalog.from_arrays(load_items(db))
    cats = catalog.category_index(cfg.category_names)
    if (cats < 0).any():
        bad = sorted(set(catalog.category[cats < 0].tolist()))
        raise InvalidInput(f"catalog categories must all be in the config {list(cfg.category_names)}; "
                           f"got {bad} as well", field="category")
    data = log_training_arrays(db, catalog, sampled_negatives=sampled_negatives, seed=seed)
    if data["impressions"]["item"].size < 200:
        raise InvalidInput(f"only {data['impressions']['item'].size} impressions with feedback in the log; need "
                           "at least 200 to train (serve traffic or `homepage import` history first)", field="log")
    t0 = time.perf_counter()
    ex = build_examples(data["impressions"], data["events"], n_users=data["n_users"], n_items=catalog.n_items,
                        item_category=cats, item_features=catalog.features, popularity=catalog.popularity,
                        n_categories=len(cfg.category_names))
    train, valid, test = split_by_time(ex, valid=0.1, test=0.1)
    if recency_half_life_days is not None:
        # decayed item popularity as of the end of the training part: a catalog feature (a column of
        # the item tower's dense table), so the model starts from what recent popularity knows
        recent = recent_item_popularity(data["events"], cfg.event_weight_vector(), catalog.n_items,
                                        t_end=float(np.max(train.ts)), half_life_s=recency_half_life_days * 86400.0)
        feats = np.column_stack([ex.item_features, np.log1p(recent)])
        train, valid, test = (replace(x, item_features=feats) for x in (train, valid, test))
        ex = replace(ex, item_features=feats)
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
    valid_ece = gate.value(gate.model, "ece", "play")
    cutoff = float(np.min(valid.ts)) if len(valid) else float(np.max(train.ts)) + 1.0
    past = {k: {c: np.asarray(v)[np.asarray(t["ts"]) < cutoff] for c, v in t.items()}
            for k, t in (("impressions", data["impressions"]), ("events", data["events"]))}
    then = build_examples(past["impressions"], past["events"], n_users=data["n_users"], n_items=catalog.n_items,
                          item_category=cats, item_features=catalog.features, popularity=catalog.popularity,
                          n_categories=len(cfg.category_names)).history  # the users as of the cutoff
    # the debiasing dial, chosen on the holdout: the counterfactual score (popularity branches removed)
    # or the factual one; on real logs popular items are mostly popular because they are good
    dial = {"debiased": True, "factual": False}
    chosen, served = served_gate(
        build_state(cfg, catalog), data,
        {name: rankers.RankerScorer(model, dict(cfg.events), then, debias=d, threads=threads) for name, d in dial.items()},
        cutoff, cfg.event_weight_vector(), max_users=gate_users, seed=seed)
    ece_ok = bool(np.isfinite(valid_ece) and valid_ece <= max_ece)
    served.update({"valid_play_ece": valid_ece, "max_ece": max_ece, "ece_passed": ece_ok})
    better = chosen is not None and ece_ok
    debias = dial.get(str(served.get("chosen")), True)
    report = rankers.evaluate(model, test, train=train, event_weights=dict(cfg.events), is_tail=is_tail,
                      true_relevance=true_relevance, category_names=cfg.category_names, threads=threads,
                      seed=seed)
    metrics = {"examples": {"train": len(train), "valid": len(valid), "test": len(test)},
               "train_s": train_s, "examples_per_s": len(train) * len(history.train_loss) / max(train_s, 1e-9),
               "best_epoch": history.best_epoch, "valid_logloss": list(history.valid_logloss),
               "valid_play_gauc": model_gauc, "valid_play_gauc_popularity": pop_gauc,
               "valid_ndcg": model_ndcg, "valid_ndcg_popularity": pop_ndcg, "gate": served,
               "test_beats_baselines": report.beats_baselines, "verdict": report.verdict,
               "interaction": interaction, "config_version": config.version, "forced": bool(force and not better)}
    published = rejected = None
    if require_test and not report.beats_baselines:
        better = False
    if better or force:
        scorer = rankers.RankerScorer(model, dict(cfg.events), ex.history, debias=debias)
        artifact = registry.pack_ranker(RankerArtifact(
            scorer=scorer.save(), user_ids=list(data["user_ids"]),
            item_ids=[str(i) for i in catalog.item_ids.tolist()], categories=list(cfg.category_names)))
        published = registry.publish_model(db, "ranker", metrics, artifact)
    else:
        rejected = registry.publish_model(db, "ranker", metrics, None, status="rejected")
    return TrainResult(rankers.report_table(report), metrics, published, rejected, history, report)
