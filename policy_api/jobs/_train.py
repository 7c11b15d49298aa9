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
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import Engine

import rankers
from allocator import EVENT_TYPES, long_tail
from rankers import build_examples, split_by_time

from .. import registry
from ..engine import EngineState, ScorerHandle, build_state
from ..errors import InvalidInput
from ..log import IMPORT_POLICY, Catalog, load_items, read_log_columns, to_epoch
from ..registry import ConfigRecord, RankerArtifact
from ._plan import feedback_seen

if TYPE_CHECKING:  # torch-backed types: serving imports this module and must not load torch for them
    from rankers import RankerMetrics, TrainHistory

    from ._evaluate import Holdout, PageScorer

__all__ = ["MAX_ECE", "MAX_REPEAT_SHARE", "POP_EXPONENTS", "TrainResult", "gate_holdout", "log_training_arrays", "recent_item_popularity",
           "residual_scorer", "served_gate", "shown_items", "train_ranker"]

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
    try:
        return _training_arrays(db, catalog, sampled_negatives, seed)
    finally:  # Arrow's allocator keeps what it freed for its own reuse: hand it back for numpy's
        pa.default_memory_pool().release_unused()


def _training_arrays(db: Engine, catalog: Catalog, sampled_negatives: int, seed: int) -> dict[str, Any]:
    # the log's strings stay in Arrow's buffers and are joined by hash (no Python object or fixed-width
    # copy per row): a log of millions of events is read in a fraction of the memory
    dec = read_log_columns(db, "decisions", ["request_id", "ts", "user_id", "policy"])
    fb = read_log_columns(db, "feedback", ["request_id", "item_id", "type", "ts"])
    distinct = pc.unique(dec["user_id"])
    user_list = pc.take(distinct, pc.sort_indices(distinct))  # sorted, as np.unique sorts
    user_idx = pc.index_in(dec["user_id"], value_set=user_list).to_numpy(zero_copy_only=False).astype(np.int64)
    users = np.asarray(user_list.to_pylist(), dtype=object)
    found = pc.index_in(fb["request_id"], value_set=dec["request_id"])
    matched = found.is_valid().to_numpy(zero_copy_only=False)
    d_idx = found.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ids = np.asarray(catalog.item_ids, dtype=str)
    at = pc.index_in(fb["item_id"], value_set=pa.array(ids.tolist(), pa.large_string()))
    known_item = at.is_valid().to_numpy(zero_copy_only=False)
    item = at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ts = to_epoch(fb["ts"])
    ok = matched & known_item
    # each event's code (its position in EVENT_TYPES), -1 for a type that is not a behaviour event
    code = pc.index_in(fb["type"], value_set=pa.array(list(_EVENT_CODE), pa.large_string())).fill_null(-1).to_numpy(
        zero_copy_only=False)
    is_impression = pc.equal(fb["type"], "impression").fill_null(False).to_numpy(zero_copy_only=False)
    # impressions: distinct (decision, item) with any event; time = the decision's time
    key = d_idx[ok].astype(np.int64) * (ids.size + 1) + item[ok]
    uk = np.unique(key)
    if sampled_negatives and ids.size > 1:
        d0 = uk // (ids.size + 1)
        imported = d0[pc.equal(dec["policy"], IMPORT_POLICY).to_numpy(zero_copy_only=False)[d0]]
        rng = np.random.default_rng(seed)
        neg_dec = np.repeat(imported, sampled_negatives)
        neg_item = rng.integers(0, ids.size, size=neg_dec.size)
        uk = np.unique(np.concatenate([uk, neg_dec.astype(np.int64) * (ids.size + 1) + neg_item]))
    imp_dec = uk // (ids.size + 1)
    imp_item = uk % (ids.size + 1)
    dec_ts = to_epoch(dec["ts"])
    # explicit: the client reported the exposure itself (an `impression` event), so the pair is known to
    # have been shown whether or not the user acted on it (`jobs.exposure_of`)
    explicit = np.isin(uk, key[is_impression[ok]])
    impressions = {"decision": imp_dec, "user": user_idx[imp_dec], "item": imp_item, "ts": dec_ts[imp_dec],
                   "explicit": explicit}
    beh = ok & ~is_impression & (code >= 0)
    events = {"decision": d_idx[beh], "user": user_idx[d_idx[beh]], "item": item[beh], "ts": ts[beh],
              "type": code[beh].astype(np.int64)}
    return {"impressions": impressions, "events": events, "user_ids": users.tolist(), "n_users": int(users.size)}


@dataclass(frozen=True)
class TrainResult:
    """A training run: the report text, the registry metrics, the version published (None if nothing
    was), the version recorded as rejected (the trained model, when the gate refused it) and what is
    served now (``metrics["served"]``). ``history`` and ``report`` are the torch ranker's (None for the
    residual ranker)."""

    text: str
    metrics: dict[str, Any]
    published: int | None
    rejected: int | None
    history: TrainHistory | None = None
    report: RankerMetrics | None = None


def recent_item_popularity(events: Mapping[str, np.ndarray], event_weights: np.ndarray, n_items: int, *,
                           t_end: float, half_life_s: float) -> np.ndarray:
    """Shape (n_items,): ``sum_e w_e 2 ** (-(t_end - ts_e) / half_life_s)`` over the positive events
    (event-type weight ``w_e > 0``) with ``ts_e <= t_end``: recent popularity as of ``t_end``."""
    w = np.asarray(event_weights, dtype=np.float64)[np.asarray(events["type"], dtype=np.int64)]
    ts = np.asarray(events["ts"], dtype=np.float64)
    keep = (w > 0) & (ts <= t_end)
    decay = np.exp2(-(t_end - ts[keep]) / half_life_s)
    return np.bincount(np.asarray(events["item"], dtype=np.int64)[keep], weights=w[keep] * decay, minlength=n_items)


def _page_scorer(name: str, candidate: Any, user_ids: list[str]) -> PageScorer:
    from ._evaluate import history_page_scorer, ranker_page_scorer

    if isinstance(candidate, rankers.HistoryScorer):
        return history_page_scorer(candidate)
    index = {u: i for i, u in enumerate(user_ids)}
    return ranker_page_scorer(ScorerHandle(candidate, index, name=name), user_ids)


#: the fewest held-out users the publish gate decides on: with fewer, chance ranks the scorers, and
#: nothing is published (neither the trained model nor a baseline in place of the catalog's popularity)
MIN_GATE_USERS = 200
#: the most held-out users the publish gate judges (a sample beyond): the CI of a difference narrows
#: as 1/sqrt(users), and a model that is better by a little is refused on a small sample
GATE_USERS = 5000
#: the most users of the inner split the residual ranker's coefficients are fitted on (its grid is
#: users x pool x features)
FIT_USERS = 1000


def gate_holdout(state: EngineState, data: Mapping[str, Any], cutoff: float, event_weights: np.ndarray, *,
                 max_users: int = GATE_USERS, seed: int = 0) -> Holdout:
    """The publish gate's temporal holdout: the log's events split at ``cutoff``."""
    from ._evaluate import holdout_split

    ev = data["events"]
    return holdout_split(np.asarray(ev["user"]), np.asarray(ev["item"]), np.asarray(ev["ts"]), np.asarray(ev["type"]),
                         event_weights=event_weights, n_users=max(int(data["n_users"]), 1),
                         n_items=state.catalog.n_items, cutoff=cutoff, max_users=max_users, seed=seed)


def served_gate(state: EngineState, data: Mapping[str, Any], candidates: Mapping[str, Any], cutoff: float,
                event_weights: np.ndarray, *, max_users: int = GATE_USERS, n_boot: int = 1000, seed: int = 0,
                half_life_s: float = 14 * 86400.0, require_ndcg: bool = False,
                min_users: int = MIN_GATE_USERS, item_rate: bool = False) -> tuple[str | None, dict[str, Any]]:
    """Does a candidate's served page beat every built-in baseline's on the temporal holdout?

    The baselines are fitted on the positive events before ``cutoff`` and every scorer's page is
    judged against the held-out users' positives from it on (:func:`evaluate_pages`). A candidate is
    a :class:`rankers.HistoryScorer` fitted on the same past, or any scorer with ``score_pairs`` over
    the log's user rows holding the users' history as of ``cutoff``. The candidate of highest mean
    recall is chosen; it passes when the paired-bootstrap 95% CI of its recall minus the best
    baseline's lies above 0 (and, with ``require_ndcg``, its NDCG's too), on at least ``min_users``
    held-out users.

    With ``item_rate`` and a log whose client reports impressions, the baselines include each item's
    positive rate per impression before ``cutoff`` (:data:`ITEM_RATE`, :func:`rankers.item_rates`): the
    engine's built-in scorer once its plan carries item rates. A model has to beat what the engine
    already serves, not only the baselines it would replace.

    Returns (the chosen candidate's name if it passed, else None; the gate's table as a JSON-friendly
    dict, with ``best_baseline``: the baseline that is served when no candidate passes).
    """
    from ._evaluate import (
        ITEM_RATE,
        baseline_scorers,
        catalog_page_scorer,
        evaluate_pages,
        with_catalog_popularity,
    )

    try:
        h = gate_holdout(state, data, cutoff, event_weights, max_users=max_users, seed=seed)
    except InvalidInput as e:
        return None, {"passed": False, "reason": f"no served-page holdout: {e.message}"}
    scorers = baseline_scorers(h, state.item_category, half_life_s=half_life_s)
    base = with_catalog_popularity(scorers, state.catalog.popularity)  # what is served built in: beat it too
    if item_rate and np.asarray(data["impressions"]["explicit"]).any():
        cat0 = np.where(state.item_category >= 0, state.item_category, 0)
        rate, _ = rankers.item_rates(*shown_items(data, event_weights, cutoff), cat0)
        prior = catalog_page_scorer(rate)  # rates are > 0: never None
        if prior is not None:
            scorers[ITEM_RATE] = prior
            base.append(ITEM_RATE)
    users = list(data["user_ids"])
    for name, sc in candidates.items():
        scorers[name] = _page_scorer(name, sc, users)
    res = evaluate_pages(state, h, scorers, baselines=base, n_boot=n_boot, seed=seed)
    chosen = max(candidates, key=lambda n: res.row(n)["recall"])
    d = res.diff(chosen, "recall")
    dn = res.diff(chosen, "ndcg")
    enough = res.n_users >= min_users
    passed = enough and bool(d["ci_low"] > 0.0) and (not require_ndcg or bool(dn["ci_low"] > 0.0))
    reason = (f"served-page recall of {chosen} {res.row(chosen)['recall']:.4f} vs best baseline {res.best_baseline} "
              f"{res.row(res.best_baseline)['recall']:.4f}: difference {d['mean_diff']:+.4f}, 95% CI "
              f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" + ("" if d["ci_low"] > 0 else " (must lie above 0)"))
    if require_ndcg:
        reason += (f"; NDCG difference {dn['mean_diff']:+.4f}, 95% CI [{dn['ci_low']:+.4f}, {dn['ci_high']:+.4f}]"
                   + ("" if dn["ci_low"] > 0 else " (must lie above 0)"))
    if not enough:
        reason += f"; only {res.n_users} held-out users (need at least {min_users} to decide)"
    return (chosen if passed else None), {"passed": passed, "chosen": chosen, "reason": reason,
                                          "half_life_days": half_life_s / 86400.0, "min_users": min_users,
                                          **res.to_dict()}


def shown_items(data: Mapping[str, Any], event_weights: np.ndarray, before: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The exposures of :func:`log_training_arrays`' ``data`` before ``before`` (epoch seconds; None =
    all), for the residual ranker's item rates (:func:`rankers.item_rates`): the item row of each
    impression whose decision came before it, and whether it earned a positive event (event-type
    weight > 0) before it. An impression is a (decision, item) pair with any event: the client's
    ``impression`` events where the log has them, else the behaviour events themselves (an imported
    log of ratings: each rated item)."""
    imp, ev = data["impressions"], data["events"]
    dec = np.asarray(imp["decision"], dtype=np.int64)
    item = np.asarray(imp["item"], dtype=np.int64)
    ets = np.asarray(ev["ts"], dtype=np.float64)
    pos = np.asarray(event_weights, dtype=np.float64)[np.asarray(ev["type"], dtype=np.int64)] > 0
    keep = np.ones(item.size, dtype=bool)
    if before is not None:
        keep = np.asarray(imp["ts"], dtype=np.float64) < before
        pos &= ets < before
    n = np.int64(max(int(item.max(initial=-1)), int(np.max(ev["item"], initial=-1))) + 1)
    key = np.asarray(ev["decision"], dtype=np.int64)[pos] * n + np.asarray(ev["item"], dtype=np.int64)[pos]
    return item[keep], np.isin(dec[keep] * n + item[keep], key)


def residual_scorer(data: Mapping[str, Any], item_category: np.ndarray, coef: np.ndarray, pop_exponent: float,
                    event_weights: np.ndarray, *, before: float | None = None,
                    half_life_days: float = 14.0) -> rankers.HistoryScorer:
    """The residual ranker of coefficients ``coef`` and popularity dial ``pop_exponent`` on the snapshot
    of :func:`log_training_arrays`' ``data`` before ``before`` (epoch seconds; None = all of it): its
    positive events and its exposures (:func:`shown_items`) before then. ``homepage train`` judges it
    as of the holdout's cutoff and publishes it on the whole log."""
    u, i, t, w = _positive_events(data, event_weights)
    if before is not None:
        keep = t < before
        u, i, t, w = u[keep], i[keep], t[keep], w[keep]
    shown, positive = shown_items(data, event_weights, before)
    cat = np.where(np.asarray(item_category) >= 0, item_category, 0).astype(np.int64)
    return rankers.HistoryScorer("residual", cat, coef=coef, pop_exponent=pop_exponent, type_weights=event_weights,
                                 half_life_s=half_life_days * 86400.0).fit(
        u, i, t, w, n_users=max(int(data["n_users"]), 1), shown_item=shown, shown_positive=positive)


def _positive_events(data: Mapping[str, Any], event_weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """(user, item, ts, weight) of the log's positive events (event-type weight > 0)."""
    ev = data["events"]
    w = np.asarray(event_weights, dtype=np.float64)[np.asarray(ev["type"], dtype=np.int64)]
    keep = w > 0
    return (np.asarray(ev["user"], dtype=np.int64)[keep], np.asarray(ev["item"], dtype=np.int64)[keep],
            np.asarray(ev["ts"], dtype=np.float64)[keep], w[keep])


#: serving demotes what a user already engaged with only where fewer plays than this come back to an item
#: the same user played before (``rankers.repeat_share`` of the log's plays)
MAX_REPEAT_SHARE = 0.1
#: ... and only once the log holds this many plays: in a young log few users had the time to come back
#: to anything, and the share of repeats looks low in any app
MIN_PLAYS_TO_DEMOTE = 2000


def _publish_scorer(db: Engine, scorer: rankers.HistoryScorer, data: Mapping[str, Any], catalog: Catalog,
                    categories: tuple[str, ...], metrics: dict[str, Any], event_weights: np.ndarray) -> int:
    scorer.demote_seen, share, plays = _demotes_seen(data, catalog)
    served = metrics.get("served")
    if isinstance(served, dict):
        served.update(repeat_share=share, plays=plays, demote_seen=scorer.demote_seen)
    artifact = registry.pack_ranker(RankerArtifact(
        scorer=scorer.save(), user_ids=list(data["user_ids"]), item_ids=[str(i) for i in catalog.item_ids.tolist()],
        categories=list(categories)))
    return registry.publish_model(db, "ranker", metrics, artifact)


def beats_catalog_popularity(gate: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the gate's best baseline is surely better than the catalog's popularity (which the
    engine serves built in): the catalog's recall minus the baseline's has its 95% CI below 0, or is
    not surely above 0 while its NDCG difference is surely below 0. A holdout of a few dozen users
    ranks the baselines by chance. True when the gate did not judge the catalog's popularity."""
    from ._evaluate import CATALOG_POPULARITY

    diffs = {d["metric"]: d for d in gate.get("differences_vs_best_baseline", []) if d["scorer"] == CATALOG_POPULARITY}
    r, n = diffs.get("recall"), diffs.get("ndcg")
    if r is None or n is None or r["ci_high"] < 0 or (r["ci_low"] <= 0 and n["ci_high"] < 0):
        return True, ""
    best = gate.get("best_baseline")
    return False, (f"the best baseline {best} is not surely better than the catalog's popularity, which the engine "
                   f"serves built in (the catalog's recall minus {best}'s {r['mean_diff']:+.4f}, 95% CI "
                   f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]; NDCG {n['mean_diff']:+.4f} [{n['ci_low']:+.4f}, "
                   f"{n['ci_high']:+.4f}])")


def _serve_baseline(db: Engine, gate: Mapping[str, Any], data: Mapping[str, Any], state: EngineState,
                    catalog: Catalog, categories: tuple[str, ...], event_weights: np.ndarray, metrics: dict[str, Any],
                    why: str) -> tuple[int | None, dict[str, Any]]:
    """Publish the gate's best baseline, refitted on every positive event of the log, as the served
    scorer (when the gate had a holdout to name one); returns (its version, the ``served`` entry)."""
    from ._evaluate import BUILT_IN_SCORERS, CATALOG_POPULARITY, ITEM_RATE, fit_baseline

    best = gate.get("best_baseline")
    if not best:
        return None, {"kind": "unchanged", "scorer": "as before",
                      "reason": f"{why}; no holdout to rank the baselines on, so nothing is published and the engine "
                                "keeps what it serves (its built-in popularity scorer if nothing was ever published)"}
    row = next(r for r in gate["scorers"] if r["scorer"] == best)
    # the client reports impressions and the plan serves each item's positives per impression (its lift
    # over the built-in popularity): what is served built in stays
    item_rates = any(r["scorer"] == ITEM_RATE for r in gate["scorers"])
    if best == CATALOG_POPULARITY and not item_rates:
        return _serve_catalog_popularity(
            db, gate, data, state, catalog, categories, event_weights, metrics,
            f"{why}; the catalog's popularity, which the engine serves built in, is the best baseline "
            f"(served-page recall {row['recall']:.4f}, NDCG {row['ndcg']:.4f} on the temporal holdout)")
    if best in BUILT_IN_SCORERS:
        what = ("the catalog's popularity" if best == CATALOG_POPULARITY
                else "each item's rate per impression (the plan's item rates)")
        return None, {"kind": "unchanged", "scorer": "as before",
                      "reason": f"{why}; {what}, which the engine serves built in, is the best "
                                f"baseline (served-page recall {row['recall']:.4f}, NDCG {row['ndcg']:.4f} on the "
                                "temporal holdout): nothing is published and the engine keeps what it serves"}
    if item_rates:
        # the client reports impressions and the plan serves each item's positives per impression: a
        # baseline counting positive events measures what the engine showed as much as what users like,
        # and its recall on the same log cannot tell the two apart (in the live-loop benchmark category
        # popularity had the best recall, 0.902 against the item rates' 0.842, and served 0.6 a page less)
        return None, {"kind": "unchanged", "scorer": "as before",
                      "reason": f"{why}; the log reports impressions and the engine serves each item's rate per "
                                f"impression: a baseline of positive counts ({best}, served-page recall "
                                f"{row['recall']:.4f}) does not replace it; nothing is published"}
    surely, why_not = beats_catalog_popularity(gate)
    if int(gate.get("n_users", 0)) < int(gate.get("min_users", 0)):
        surely, why_not = False, (f"the gate held out only {gate.get('n_users')} users (at least "
                                  f"{gate.get('min_users')} to replace what is served)")
    if not surely:
        return _serve_catalog_popularity(db, gate, data, state, catalog, categories, event_weights, metrics,
                                         f"{why}; {why_not}")
    u, i, t, w = _positive_events(data, event_weights)
    scorer = fit_baseline(best, u, i, t, w, item_category=state.item_category, n_users=max(int(data["n_users"]), 1),
                          half_life_s=float(gate.get("half_life_days", 14.0)) * 86400.0, type_weights=event_weights)
    served = {"kind": "baseline", "scorer": best, "params": scorer.describe(),
              "gate_recall": row["recall"], "gate_ndcg": row["ndcg"],
              "reason": f"{why}; serving the best built-in baseline {best} (served-page recall {row['recall']:.4f}, "
                        f"NDCG {row['ndcg']:.4f} on the temporal holdout), refitted on the whole log"}
    version = _publish_scorer(db, scorer, data, catalog, categories, {**metrics, "served": served}, event_weights)
    return version, served


def _serve_catalog_popularity(db: Engine, gate: Mapping[str, Any], data: Mapping[str, Any], state: EngineState,
                              catalog: Catalog, categories: tuple[str, ...], event_weights: np.ndarray,
                              metrics: dict[str, Any], why: str) -> tuple[int | None, dict[str, Any]]:
    """The catalog's popularity is what stays served: as the gate judged it, with what each user already
    engaged with below every other item, where the log says users seldom come back to an item (a
    ``catalog_popularity`` history scorer, published; the engine reads the popularity from its catalog
    as it stands). Where they do come back, the built-in scorer is that page already: nothing is published."""
    from ._evaluate import CATALOG_POPULARITY

    demote, share, plays = _demotes_seen(data, catalog)
    row: dict[str, Any] = next((r for r in gate.get("scorers", []) if r["scorer"] == CATALOG_POPULARITY), {})
    if not (catalog.popularity > 0).any():
        return None, {"kind": "unchanged", "scorer": "as before",
                      "reason": f"{why}: nothing is published and the engine keeps what it serves (the catalog "
                                "gives no popularity)"}
    if not demote:
        why_kept = (f"{share:.0%} of the log's {plays} plays come back to an item the user played before"
                    if share >= MAX_REPEAT_SHARE else f"the log holds {plays} plays (at least "
                                                      f"{MIN_PLAYS_TO_DEMOTE} to tell whether users come back to items)")
        return None, {"kind": "unchanged", "scorer": "as before", "repeat_share": share, "plays": plays,
                      "reason": f"{why}: nothing is published and the engine keeps what it serves ({why_kept}, so "
                                "what users engaged with is not put last)"}
    u, i, t, w = _positive_events(data, event_weights)
    cat = np.where(np.asarray(state.item_category) >= 0, state.item_category, 0).astype(np.int64)
    scorer = rankers.HistoryScorer(CATALOG_POPULARITY, cat, type_weights=event_weights,
                                   item_popularity=catalog.popularity).fit(u, i, t, w, n_users=max(int(data["n_users"]), 1))
    served = {"kind": "baseline", "scorer": CATALOG_POPULARITY, "params": scorer.describe(),
              "gate_recall": row.get("recall"), "gate_ndcg": row.get("ndcg"),
              "reason": f"{why}: the catalog's popularity stays served, each user's page without what the user "
                        "already engaged with, as the gate judged it"}
    version = _publish_scorer(db, scorer, data, catalog, categories, {**metrics, "served": served}, event_weights)
    return version, served


def _demotes_seen(data: Mapping[str, Any], catalog: Catalog) -> tuple[bool, float, int]:
    """(whether serving puts what a user already engaged with last, the log's repeat share of plays, plays):
    only where fewer than :data:`MAX_REPEAT_SHARE` of the plays come back to an item and the log holds
    :data:`MIN_PLAYS_TO_DEMOTE` plays."""
    ev = data["events"]
    play = np.asarray(ev["type"], dtype=np.int64) == rankers.EVENT_TYPES.index("play")
    share = rankers.repeat_share(np.asarray(ev["user"])[play], np.asarray(ev["item"])[play], np.asarray(ev["ts"])[play],
                                 catalog.item_ids.size)
    plays = int(play.sum())
    return bool(share < MAX_REPEAT_SHARE and plays >= MIN_PLAYS_TO_DEMOTE), share, plays


def _truth_ndcg(scorers: Mapping[str, rankers.HistoryScorer], true_relevance: Callable[[np.ndarray, np.ndarray],
                np.ndarray], state: EngineState, users: np.ndarray, seed: int, k: int = 10) -> dict[str, float]:
    """Ground-truth NDCG@k of each scorer over per-category candidate lists of ``users`` (simulator)."""
    rng = np.random.default_rng(seed)
    lists, lu = [], []
    for items in state.by_category:  # a handful of categories
        if items.size < 2:
            continue
        m = min(100, items.size)
        keys = rng.random((users.size, items.size))
        lists.append(items[np.argpartition(keys, m - 1, axis=1)[:, :m]] if m < items.size else
                     np.broadcast_to(items, (users.size, items.size)))
        lu.append(users)
    if not lists:
        return {}
    width = min(x.shape[1] for x in lists)
    cand = np.concatenate([x[:, :width] for x in lists])
    uu = np.concatenate(lu)
    return {name: rankers.ground_truth_ndcg(sc.score_pairs, true_relevance, uu, cand, k=k)
            for name, sc in scorers.items()}


def train_ranker(db: Engine, config: ConfigRecord, *, model: str = "residual", interaction: str = "cin",
                 max_epochs: int = 20, threads: int = 1, force: bool = False,
                 true_relevance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 on_epoch: EpochCallback | None = None, seed: int = 0, require_test: bool = False,
                 max_ece: float = MAX_ECE, gate_users: int = GATE_USERS, min_gate_users: int = MIN_GATE_USERS,
                 fit_users: int = FIT_USERS, sampled_negatives: int = 4,
                 recency_half_life_days: float | None = None, half_life_days: float = 14.0) -> TrainResult:
    """Train a ranker on the log and publish what serves the best pages.

    ``model="residual"`` (the default): the residual ranker of :class:`rankers.HistoryScorer` — a
    logistic model over the baselines' own signals (multi-granularity recent popularity, item-kNN of
    the user's history, the user's category shares, time since the user's last positive in the
    category) and each item's positive rate per exposure (:func:`shown_items`; its coefficient kept
    >= 0) whose coefficients are fitted on an inner split of the past (features before it,
    labels after it) and whose popularity dial (a PDA-style exponent) is chosen on that inner split's
    served pages. ``model="torch"``: the multi-task torch ranker (:func:`rankers.fit`).

    The gate (:func:`served_gate`), on the temporal holdout (the last 20 % of events; nothing of it is
    used to fit): the pages the engine would serve with the model must recall more of the held-out
    users' future positives than the best built-in baseline's (popularity, recent popularity with
    ``half_life_days``, per-category popularity, item-kNN), the paired-bootstrap 95% CI above 0; its
    calibration (ECE) must be at most ``max_ece``; with ``require_test`` its NDCG must beat the best
    baseline's too. A model that passes is published (refitted on the whole log). One that fails is
    recorded as ``rejected`` with its gate table, and the gate's best baseline, refitted on the whole
    log, is published in its place as the served scorer (``metrics["served"]`` says which and why)
    when it is surely better than the catalog's popularity the engine serves built in
    (:func:`beats_catalog_popularity`). Nothing is published on fewer than ``min_gate_users``
    held-out users; the gate judges at most ``gate_users`` of them, the residual ranker's coefficients
    are fitted on at most ``fit_users`` users of the inner split. ``force`` publishes the model anyway.
    """
    if model not in ("residual", "torch"):
        raise InvalidInput(f"model must be 'residual' or 'torch'; got {model!r}", field="model")
    if not 0.0 < max_ece <= 1.0:
        raise InvalidInput(f"max_ece must be in (0, 1]; got {max_ece!r}", field="max_ece")
    if not half_life_days > 0:
        raise InvalidInput(f"half_life_days must be > 0; got {half_life_days!r}", field="half_life_days")
    cfg = config.config
    through = feedback_seen(db)  # recorded with the model: what a restarted loop counts new events from
    catalog = Catalog.from_arrays(load_items(db))
    cats = catalog.category_index(cfg.category_names)
    if (cats < 0).any():
        bad = sorted(set(catalog.category[cats < 0].tolist()))
        raise InvalidInput(f"catalog categories must all be in the config {list(cfg.category_names)}; "
                           f"got {bad} as well", field="category")
    if model == "torch":
        return _train_torch(db, config, catalog, cats, interaction=interaction, max_epochs=max_epochs,
                            threads=threads, force=force, true_relevance=true_relevance, on_epoch=on_epoch, seed=seed,
                            require_test=require_test, max_ece=max_ece, gate_users=gate_users,
                            min_gate_users=min_gate_users,
                            sampled_negatives=sampled_negatives, recency_half_life_days=recency_half_life_days,
                            half_life_days=half_life_days, feedback_through=through)
    return _train_residual(db, config, catalog, force=force, true_relevance=true_relevance, seed=seed,
                           require_test=require_test, max_ece=max_ece, gate_users=gate_users,
                           min_gate_users=min_gate_users, fit_users=fit_users, half_life_days=half_life_days,
                           feedback_through=through)


#: the debiasing dial's settings: the popularity coefficients' multiplier (PDA-style exponent)
POP_EXPONENTS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25)


def _train_residual(db: Engine, config: ConfigRecord, catalog: Catalog, *, force: bool,
                    true_relevance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None, seed: int,
                    require_test: bool, max_ece: float, gate_users: int, min_gate_users: int,
                    fit_users: int, half_life_days: float, feedback_through: int) -> TrainResult:
    from ._evaluate import _pools, evaluate_pages, held_in_pools, history_page_scorer, holdout_split

    cfg = config.config
    t0 = time.perf_counter()
    data = log_training_arrays(db, catalog)
    wv = cfg.event_weight_vector()
    u, i, t, w = _positive_events(data, wv)
    ev = data["events"]
    ts_all = np.asarray(ev["ts"], dtype=np.float64)
    if u.size < 50:
        raise InvalidInput(f"only {u.size} positive events in the log; need at least 50 to train (serve traffic or "
                           "`homepage import` history first)", field="log")
    state = build_state(cfg, catalog)
    n_users = max(int(data["n_users"]), 1)
    cat0 = np.where(state.item_category >= 0, state.item_category, 0)
    cutoff = float(np.sort(ts_all)[min(int(ts_all.size * 0.8), ts_all.size - 1)])
    # the inner split: the past of the gate's holdout split again; the coefficients learn from it
    # (features before its cutoff, labels after) and the dial is chosen on its served pages
    past = ts_all < cutoff
    try:
        inner = holdout_split(np.asarray(ev["user"])[past], np.asarray(ev["item"])[past], ts_all[past],
                              np.asarray(ev["type"])[past], event_weights=wv, n_users=n_users,
                              n_items=catalog.n_items, train_share=0.8, max_users=fit_users, seed=seed)
    except InvalidInput as e:
        raise InvalidInput(f"too little history before the holdout to fit the ranker: {e.message}",
                           field="log") from None

    def residual(coef: np.ndarray, gamma: float, before: float | None) -> rankers.HistoryScorer:
        return residual_scorer(data, cat0, coef, gamma, wv, before=before, half_life_days=half_life_days)

    shown, positive = shown_items(data, wv, inner.cutoff)
    base = rankers.HistoryScorer("popularity", cat0, half_life_s=half_life_days * 86400.0).fit(
        inner.train_user, inner.train_item, inner.train_ts, inner.train_weight, n_users=n_users,
        shown_item=shown, shown_positive=positive)
    grid_x, grid_y, grid_m = rankers.residual_grid(base, inner.users, _pools(state, inner.users.size, seed),
                                                   inner.positives)
    fitted = rankers.fit_residual(grid_x, grid_y, grid_m, nonnegative=(rankers.RATE_COLUMN,))
    coefs = {g: rankers.with_dial(grid_x, grid_y, grid_m, fitted, g) for g in POP_EXPONENTS}
    dial = {f"residual(pop^{g:g})": g for g in POP_EXPONENTS}
    snapshot = residual(coefs[POP_EXPONENTS[0]], POP_EXPONENTS[0], inner.cutoff)  # fitted once for every dial
    inner_scorers = {name: history_page_scorer(snapshot.with_coef(coefs[g], g)) for name, g in dial.items()}
    inner_res = evaluate_pages(state, inner, inner_scorers, baselines=list(dial), n_boot=1, seed=seed)
    chosen_name = max(dial, key=lambda n: (inner_res.row(n)["recall"], inner_res.row(n)["ndcg"]))
    gamma = dial[chosen_name]
    coef = coefs[gamma]
    fit_s = time.perf_counter() - t0
    # the gate: the same model (coefficients, dial) on the snapshot as of the holdout's cutoff
    try:
        h = gate_holdout(state, data, cutoff, wv, max_users=gate_users, seed=seed)
        mu, mi, mt, mw = h.train_user, h.train_item, h.train_ts, h.train_weight
    except InvalidInput:
        mu, mi, mt, mw = u[t < cutoff], i[t < cutoff], t[t < cutoff], w[t < cutoff]
        h = None
    candidate = residual(coef, gamma, cutoff)
    chosen, gate = served_gate(state, data, {"residual": candidate}, cutoff, wv, max_users=gate_users,
                               min_users=min_gate_users, seed=seed, item_rate=cfg.loop.item_events > 0,
                               half_life_s=half_life_days * 86400.0, require_ndcg=require_test)
    ece = float("nan")
    if h is not None:
        pools = _pools(state, h.users.size, seed)
        p = candidate.score_pools(h.users, pools)
        y, seen = held_in_pools(h.positives, pools), held_in_pools(h.seen, pools)
        ece = rankers.ece(y[~seen].astype(np.float64), p[~seen])
    ece_ok = bool(np.isfinite(ece) and ece <= max_ece)
    gate.update({"valid_play_ece": ece, "max_ece": max_ece, "ece_passed": ece_ok,
                 "ece_of": "P(future positive) of the candidates on the holdout"})
    passed = chosen is not None and ece_ok
    metrics: dict[str, Any] = {
        "model": "residual", "train_s": time.perf_counter() - t0, "fit_s": fit_s, "feedback_through": feedback_through,
        "inner_split": {"cutoff": inner.cutoff, "n_users": int(inner.users.size),
                        "dial": {n: {"recall": inner_res.row(n)["recall"], "ndcg": inner_res.row(n)["ndcg"]}
                                 for n in dial}, "chosen": chosen_name},
        "pop_exponent": gamma, "coef": dict(zip(candidate.feature_names(), coef.round(6).tolist(), strict=True)),
        "gate": gate, "config_version": config.version, "forced": bool(force and not passed)}
    if true_relevance is not None and h is not None:
        truth = {b: rankers.HistoryScorer(b, cat0, half_life_s=half_life_days * 86400.0).fit(
            mu, mi, mt, mw, n_users=n_users) for b in ("popularity", "recent_popularity", "category_popularity",
                                                       "item_knn")}
        truth["residual"] = candidate
        metrics["truth_ndcg@10"] = _truth_ndcg(truth, true_relevance, state, h.users, seed)
    published = rejected = None
    names = tuple(cfg.category_names)
    if passed or force:
        scorer = residual(coef, gamma, None)
        row: dict[str, Any] = next((r for r in gate.get("scorers", []) if r["scorer"] == "residual"), {})
        served = {"kind": "model", "scorer": "residual", "params": scorer.describe(),
                  "gate_recall": row.get("recall"), "gate_ndcg": row.get("ndcg"),
                  "reason": ("forced" if not passed else "the trained model passed the gate") + f": {gate['reason']}"}
        metrics["served"] = served
        published = _publish_scorer(db, scorer, data, catalog, names, metrics, wv)
    else:
        why = f"the trained model was refused ({gate['reason']}" + ("" if ece_ok else
                                                                    f"; ECE {ece:.4f} > {max_ece}") + ")"
        rejected = registry.publish_model(db, "ranker", {**metrics, "served": {"kind": "rejected"}}, None,
                                          status="rejected")
        published, served = _serve_baseline(db, gate, data, state, catalog, names, wv, metrics, why)
        metrics["served"] = served
    metrics["train_s"] = time.perf_counter() - t0
    return TrainResult(_residual_text(metrics, published, rejected), metrics, published, rejected)


def _residual_text(metrics: Mapping[str, Any], published: int | None, rejected: int | None) -> str:
    """The train report: the inner split's dial, the gate's table and what is served now."""
    gate = metrics["gate"]
    inner = metrics["inner_split"]
    lines = [f"residual ranker: coefficients fitted on {inner['n_users']} users of the inner split; debiasing dial "
             "(popularity exponent) by inner-split served-page recall:"]
    for n, r in inner["dial"].items():
        lines.append(f"  {n:<22} recall {r['recall']:.4f}  ndcg {r['ndcg']:.4f}" + ("  <- chosen" if n == inner["chosen"]
                                                                                   else ""))
    if "scorers" in gate:
        k = gate["page_size"]
        lines.append(f"publish gate (temporal holdout, {gate['n_users']} users, page of {k}):")
        lines.append(f"  {'scorer':<22} {'Recall@' + str(k):>10} {'NDCG@' + str(k):>9}   recall vs {gate['best_baseline']}"
                     " [95% CI]")
        for r in gate["scorers"]:
            d = next((x for x in gate["differences_vs_best_baseline"] if x["scorer"] == r["scorer"]
                      and x["metric"] == "recall"), None)
            vs = "(best baseline)" if d is None else f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
            lines.append(f"  {r['scorer']:<22} {r['recall']:>10.4f} {r['ndcg']:>9.4f}   {vs}")
    lines.append(f"gate: {gate['reason']}; calibration ECE {gate.get('valid_play_ece', float('nan')):.4f} "
                 f"(max {gate.get('max_ece')})")
    if "truth_ndcg@10" in metrics:
        lines.append("ground-truth NDCG@10: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["truth_ndcg@10"].items()))
    served = metrics["served"]
    if rejected is not None:
        lines.append(f"trained model recorded as rejected (ranker version {rejected}).")
    where = f"ranker version {published}" if published is not None else "nothing published"
    lines.append(f"SERVED SCORER: {served['kind']} {served['scorer']} ({where}) - {served['reason']}.")
    lines.append(f"train time {metrics['train_s']:.1f} s")
    return "\n".join(lines)


def _train_torch(db: Engine, config: ConfigRecord, catalog: Catalog, cats: np.ndarray, *, interaction: str,
                 max_epochs: int, threads: int, force: bool,
                 true_relevance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
                 on_epoch: EpochCallback | None, seed: int, require_test: bool, max_ece: float, gate_users: int,
                 min_gate_users: int,
                 sampled_negatives: int, recency_half_life_days: float | None, half_life_days: float,
                 feedback_through: int) -> TrainResult:
    cfg = config.config
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
        cutoff, cfg.event_weight_vector(), max_users=gate_users, seed=seed, half_life_s=half_life_days * 86400.0,
        min_users=min_gate_users, item_rate=cfg.loop.item_events > 0)
    ece_ok = bool(np.isfinite(valid_ece) and valid_ece <= max_ece)
    served.update({"valid_play_ece": valid_ece, "max_ece": max_ece, "ece_passed": ece_ok})
    better = chosen is not None and ece_ok
    debias = dial.get(str(served.get("chosen")), True)
    report = rankers.evaluate(model, test, train=train, event_weights=dict(cfg.events), is_tail=is_tail,
                      true_relevance=true_relevance, category_names=cfg.category_names, threads=threads,
                      seed=seed)
    metrics = {"examples": {"train": len(train), "valid": len(valid), "test": len(test)},
               "feedback_through": feedback_through,
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
        metrics["served"] = {"kind": "model", "scorer": f"torch ranker ({'debiased' if debias else 'factual'})",
                             "reason": "forced" if not better else f"the trained model passed the gate: {served['reason']}"}
        scorer = rankers.RankerScorer(model, dict(cfg.events), ex.history, debias=debias)
        artifact = registry.pack_ranker(RankerArtifact(
            scorer=scorer.save(), user_ids=list(data["user_ids"]),
            item_ids=[str(i) for i in catalog.item_ids.tolist()], categories=list(cfg.category_names)))
        published = registry.publish_model(db, "ranker", metrics, artifact)
    else:
        rejected = registry.publish_model(db, "ranker", {**metrics, "served": {"kind": "rejected"}}, None,
                                          status="rejected")
        published, metrics["served"] = _serve_baseline(
            db, served, data, build_state(cfg, catalog), catalog, tuple(cfg.category_names), cfg.event_weight_vector(),
            metrics, f"the trained model was refused ({served.get('reason', 'not evaluated')})")
    text = rankers.report_table(report) + f"\nSERVED SCORER: {metrics['served']['kind']} {metrics['served']['scorer']}"
    text += f" (ranker version {published}) - {metrics['served']['reason']}." if published is not None else \
        f" - {metrics['served']['reason']}."
    return TrainResult(text, metrics, published, rejected, history, report)
