"""Held-out evaluation of a trained ranker against baselines, in one run, and a plain-text report."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._baselines import ItemPriorBaseline, LogisticBaseline, PopularityScorer, popularity_rank
from ._data import TASKS, Examples, behaviour_grade
from ._metrics import auc, category_hit_rate, ece, gauc, logloss, ndcg_at_k
from ._model import Ranker
from ._scorer import RankerScorer
from ._train import DEFAULT_EVENT_WEIGHTS, predict, predict_categories, task_weights_from_events

__all__ = ["RankerMetrics", "evaluate", "report_table", "ground_truth_ndcg"]

BASELINES: tuple[str, ...] = ("popularity", "item_prior", "logistic")
PairScore = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RankerMetrics:
    """Evaluation results.

    ``values[(scorer, metric, task, category)]`` -> float. Metrics: ``auc``, ``gauc``, ``logloss``,
    ``ece`` (per task of ``TASKS``), ``ndcg@k`` (task ``units``, logged lists per decision and
    category, graded by behaviour), ``truth_ndcg@k`` and ``tail_share@k`` (task ``units``, sampled
    users x per-category candidate lists, against the true preference order), ``category_hit@N``
    (task ``-``). ``category`` is a category name or ``all``.

    ``beats_baselines`` is True when the ranker beats every baseline on held-out play GAUC and (when
    ground truth was given) on ground-truth NDCG@k; ``verdict`` says so, or says which baseline won,
    in words. GAUC on logged clicks judges the click model, i.e. the factual prediction
    (``ranker_factual`` when debiasing; the counterfactual score deliberately departs from logged
    clicks); ground-truth NDCG judges the score as served (``ranker``). ``model`` names the scorer
    the GAUC verdict used.
    """

    values: Mapping[tuple[str, str, str, str], float]
    scorers: tuple[str, ...]
    categories: tuple[str, ...]
    model: str
    k: int
    top_n: int
    beats_baselines: bool
    verdict: str

    def value(self, scorer: str, metric: str, task: str = "all", category: str = "all") -> float:
        return self.values.get((scorer, metric, task, category), float("nan"))


def ground_truth_ndcg(
    score_fn: PairScore,
    true_relevance: PairScore,
    users: np.ndarray,
    candidates: np.ndarray,
    *,
    k: int = 10,
) -> float:
    """NDCG@k of ``score_fn``'s order against the order of ``true_relevance``, per (user, list).

    Parameters
    ----------
    score_fn, true_relevance
        ``f(user_idx (n,), item_idx (n,)) -> (n,)``.
    users
        Shape (n_lists,), the user of each list.
    candidates
        Shape (n_lists, n_cand), item indices of each list.

    Notes
    -----
    Graded by true rank: the item of true rank r (0 = best) has relevance ``max(k - r, 0)``, gains
    linear, so NDCG@k = 1 exactly when the top k come in the true order.
    """
    users = np.asarray(users, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != users.shape[0]:
        raise ValueError(
            f"candidates must have shape (n_lists, n_cand) with n_lists = len(users) = {users.shape[0]}; "
            f"got {candidates.shape}"
        )
    u = np.repeat(users, candidates.shape[1])
    i = candidates.ravel()
    truth = np.asarray(true_relevance(u, i), dtype=np.float64).reshape(candidates.shape)
    score = np.asarray(score_fn(u, i), dtype=np.float64).reshape(candidates.shape)
    return _truth_ndcg(score, truth, k)


def _truth_ndcg(score: np.ndarray, truth: np.ndarray, k: int) -> float:
    """NDCG@k of lists ``score`` (n_lists, n_cand) against relevance ``max(k - true rank, 0)``."""
    n_lists, n_cand = truth.shape
    rank = np.empty(truth.shape, dtype=np.int64)
    order = np.argsort(-truth, axis=1, kind="stable")
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n_cand), truth.shape), axis=1)
    rel = np.maximum(k - rank, 0).astype(np.float64)
    return ndcg_at_k(rel.ravel(), score.ravel(), np.repeat(np.arange(n_lists), n_cand), k, gains="linear")


def _sample_lists(
    test: Examples, n_users: int, n_candidates: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users (n_lists,), their category (n_lists,) and candidate lists (n_lists, n_cand): for each of up
    to ``n_users`` known test users and each category, a random sample of that category's items."""
    known = np.unique(test.user[test.user >= 0])
    users = rng.choice(known, size=min(n_users, known.shape[0]), replace=False) if known.size else known
    per_cat = [np.flatnonzero(test.item_category == c) for c in range(test.n_categories)]
    m = min([n_candidates] + [p.shape[0] for p in per_cat if p.shape[0] > 0])
    lists_u, lists_c, lists = [], [], []
    for c, items in enumerate(per_cat):  # a handful of categories, not a per-row loop
        if items.shape[0] < 2:
            continue
        # an independent random subset of size m per user: argsort of uniform keys, row-wise
        keys = rng.random((users.shape[0], items.shape[0]))
        pick = np.argpartition(keys, m - 1, axis=1)[:, :m] if m < items.shape[0] else np.argsort(keys, axis=1)
        lists.append(items[pick])
        lists_u.append(users)
        lists_c.append(np.full(users.shape[0], c))
    if not lists:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
    return np.concatenate(lists_u), np.concatenate(lists_c), np.concatenate(lists)


def evaluate(
    model: Ranker,
    test: Examples,
    *,
    train: Examples,
    event_weights: Mapping[str, float] | None = None,
    debias: bool = True,
    is_tail: np.ndarray | None = None,
    true_relevance: PairScore | None = None,
    category_names: Sequence[str] | None = None,
    k: int = 10,
    top_n: int = 2,
    n_eval_users: int = 300,
    n_candidates: int = 100,
    seed: int = 0,
    threads: int = 1,
) -> RankerMetrics:
    """Metrics per task and per category for the ranker and the baselines, on the same held-out rows.

    Scorers: ``ranker`` (served variant: counterfactual if ``debias``), ``ranker_factual`` (when
    ``debias``; the factual prediction the log should match), and the baselines ``popularity``
    (:class:`PopularityScorer` fitted on ``train``; per task ``p_t = min(2 m_t q_i, 1)`` for the
    engagement tasks, the mean rate for skip), ``item_prior`` (smoothed per-item rates) and
    ``logistic`` (:class:`LogisticBaseline`). Category preferences are compared with the global
    category shares of ``train`` plays (``popularity``) and with the user's most frequent categories
    in the positive sequence (``history_freq``).

    Parameters
    ----------
    model
        Trained :class:`Ranker`.
    test, train
        Held-out and training parts from :func:`split_by_time`; ``train`` fits the baselines.
    event_weights
        Units per event (defaults to the simulator's); ranks lists by expected units.
    is_tail
        Shape (n_items,) bool, long-tail items: adds ``tail_share@k``.
    true_relevance
        ``f(user_idx (n,), item_idx (n,)) -> (n,)`` (e.g. ``World.true_preference``): adds
        ``truth_ndcg@k`` and the ``truth`` row of ``tail_share@k``.
    category_names
        Names of the categories (default ``c0``, ``c1``, ...).
    k, top_n
        Cut-off of NDCG / tail share, and N of the top-N category hit rate.
    n_eval_users, n_candidates, seed
        Users sampled for the ground-truth lists and candidates per category list.
    """
    if len(test) == 0:
        raise ValueError("test must have at least one row; got 0")
    if train.item_priors is None:
        raise ValueError("train.item_priors must be set (use split_by_time); got None")
    weights = dict(event_weights or DEFAULT_EVENT_WEIGHTS)
    w = task_weights_from_events(weights)
    names = (
        tuple(category_names)
        if category_names is not None
        else tuple(f"c{c}" for c in range(test.n_categories))
    )
    if len(names) != test.n_categories:
        raise ValueError(f"category_names must have {test.n_categories} names; got {len(names)}")
    if is_tail is not None:
        is_tail = np.asarray(is_tail, dtype=bool)
        if is_tail.shape != (test.n_items,):
            raise ValueError(f"is_tail must have shape ({test.n_items},); got {is_tail.shape}")
    rng = np.random.default_rng(seed)

    # ---- the scorers on the test rows: task probabilities (n, 4)
    pop_scorer = PopularityScorer.from_examples(train, event_weights=weights)
    q = popularity_rank(pop_scorer.popularity)
    rate = train.labels.mean(axis=0)
    pop_prob = np.clip(2.0 * rate[None, :] * q[:, None], 1e-6, 1 - 1e-6)
    pop_prob[:, 3] = rate[3]
    prior = ItemPriorBaseline(train.item_priors)
    logistic = LogisticBaseline().fit(train)
    scorer = RankerScorer(model, weights, train.history, debias=debias, threads=threads)
    probs: dict[str, np.ndarray] = {"ranker": predict(model, test, debias=debias, threads=threads)}
    if debias:
        probs["ranker_factual"] = predict(model, test, debias=False, threads=threads)
    probs["popularity"] = pop_prob[test.item]
    probs["item_prior"] = prior.predict_pairs(test.user, test.item, test.seq)
    probs["logistic"] = logistic.predict_pairs(test.user, test.item, test.seq)
    scorers = tuple(probs)
    values: dict[tuple[str, str, str, str], float] = {}

    cat_masks = [("all", np.ones(len(test), dtype=bool))] + [
        (names[c], test.category == c) for c in range(test.n_categories)
    ]
    known = test.user >= 0
    grade = np.maximum(behaviour_grade(test.labels) - 1, 0).astype(np.float64)  # none/skip 0 .. collect 3
    group = test.decision * test.n_categories + test.category
    for name, p in probs.items():
        units = p @ w
        for cname, m in cat_masks:
            for t, task in enumerate(TASKS):
                y = test.labels[m, t]
                values[(name, "auc", task, cname)] = auc(y, p[m, t])
                values[(name, "gauc", task, cname)] = gauc(
                    y[known[m]], p[m, t][known[m]], test.user[m][known[m]]
                )
                values[(name, "logloss", task, cname)] = logloss(y, p[m, t])
                values[(name, "ece", task, cname)] = ece(y, p[m, t])
            values[(name, f"ndcg@{k}", "units", cname)] = ndcg_at_k(grade[m], units[m], group[m], k)

    # ---- category preferences: next engaged category in the top N
    played = test.labels[:, 0] > 0.5
    if played.any():
        target = test.category[played]
        pref = predict_categories(model, test.subset(played), threads=threads)
        values[("ranker", f"category_hit@{top_n}", "-", "all")] = category_hit_rate(pref, target, top_n)
        tr_played = train.labels[:, 0] > 0.5
        share = np.bincount(train.category[tr_played], minlength=train.n_categories).astype(np.float64)
        glob = np.broadcast_to(share, (target.shape[0], train.n_categories))
        values[("popularity", f"category_hit@{top_n}", "-", "all")] = category_hit_rate(glob, target, top_n)
        seq = test.seq.pos_items[played]
        valid = seq >= 0
        cats = np.where(valid, test.item_category[np.where(valid, seq, 0)], 0)
        counts = np.zeros((seq.shape[0], train.n_categories))
        np.add.at(counts, (np.repeat(np.arange(seq.shape[0]), seq.shape[1]), cats.ravel()), valid.ravel())
        hist_pref = counts + 1e-6 * share / max(share.sum(), 1.0)  # ties broken by global share
        values[("history_freq", f"category_hit@{top_n}", "-", "all")] = category_hit_rate(
            hist_pref, target, top_n
        )
        scorers = (*scorers, "history_freq")

    # ---- ground truth lists (sampled users x per-category candidates)
    if true_relevance is not None or is_tail is not None:
        lu, lc, lists = _sample_lists(test, n_eval_users, n_candidates, rng)
        if lists.size:
            u = np.repeat(lu, lists.shape[1])
            i = lists.ravel()
            seq_rows = train.history.take(u)
            pair_units: dict[str, np.ndarray] = {"ranker": scorer.score_pairs(u, i)}
            if debias:
                factual = RankerScorer(model, weights, train.history, debias=False, threads=threads)
                pair_units["ranker_factual"] = factual.score_pairs(u, i)
            pair_units["popularity"] = pop_scorer.score_pairs(u, i)
            pair_units["item_prior"] = prior.predict_pairs(u, i, seq_rows) @ w
            pair_units["logistic"] = logistic.predict_pairs(u, i, seq_rows) @ w
            if true_relevance is not None:
                pair_units["truth"] = np.asarray(true_relevance(u, i), dtype=np.float64)
            n_cand = lists.shape[1]
            for name, s in pair_units.items():
                s2 = s.reshape(-1, n_cand)
                if true_relevance is not None and name != "truth":
                    truth2 = pair_units["truth"].reshape(-1, n_cand)
                    for cname, sel in [("all", np.ones(lists.shape[0], bool))] + [
                        (names[c], lc == c) for c in range(test.n_categories)
                    ]:
                        if sel.any():
                            values[(name, f"truth_ndcg@{k}", "units", cname)] = _truth_ndcg(
                                s2[sel], truth2[sel], k
                            )
                if is_tail is not None:
                    top = np.argsort(-s2, axis=1, kind="stable")[:, : min(k, n_cand)]
                    tail_top = is_tail[np.take_along_axis(lists, top, axis=1)]
                    values[(name, f"tail_share@{k}", "units", "all")] = float(tail_top.mean())
                    for c in range(test.n_categories):
                        if (lc == c).any():
                            values[(name, f"tail_share@{k}", "units", names[c])] = float(
                                tail_top[lc == c].mean()
                            )
            if "truth" in pair_units:
                scorers = (*scorers, "truth")

    # ---- verdict: logged clicks judge the click model (the factual prediction; the counterfactual one
    # deliberately departs from them), the ground truth judges the served ranking
    gauc_name = "ranker_factual" if debias else "ranker"
    served = "debiased" if debias else "factual"
    g = {s: values.get((s, "gauc", "play", "all"), math.nan) for s in (gauc_name, *BASELINES)}
    lost = [b for b in BASELINES if not g[gauc_name] > g[b]]
    parts = [f"held-out play GAUC {g[gauc_name]:.4f} ({gauc_name})"]
    lost_t: list[str] = []
    truth: dict[str, float] = {}
    if true_relevance is not None:
        truth = {s: values.get((s, f"truth_ndcg@{k}", "units", "all"), math.nan) for s in ("ranker", *BASELINES)}
        lost_t = [b for b in BASELINES if not truth["ranker"] > truth[b]]
        parts.append(f"ground-truth NDCG@{k} {truth['ranker']:.4f} (ranker, {served} score as served)")
    beats = not lost and not lost_t
    if beats:
        verdict = "ranker beats every baseline: " + ", ".join(parts)
        if true_relevance is None:
            verdict += " (no ground truth given: GAUC only)"
    else:
        msgs = []
        if lost:
            msgs.append(
                f"play GAUC ({gauc_name}): "
                + ", ".join(f"{b} {g[b]:.4f} >= {g[gauc_name]:.4f}" for b in lost)
            )
        if lost_t:
            msgs.append(
                f"ground-truth NDCG@{k} (ranker, {served}): "
                + ", ".join(f"{b} {truth[b]:.4f} >= {truth['ranker']:.4f}" for b in lost_t)
            )
        verdict = "ranker does NOT beat every baseline: " + "; ".join(msgs)
    return RankerMetrics(
        values=values,
        scorers=scorers,
        categories=names,
        model=gauc_name,
        k=k,
        top_n=top_n,
        beats_baselines=beats,
        verdict=verdict,
    )


def _fmt(v: float) -> str:
    return "       -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:8.4f}"


def report_table(metrics: RankerMetrics) -> str:
    """The metrics as plain-text tables, ending with the verdict line."""
    m = metrics
    lines: list[str] = []
    width = max(len(s) for s in m.scorers) + 2
    for task in TASKS:
        lines.append(f"task {task} (all categories)")
        lines.append("scorer".ljust(width) + "".join(h.rjust(9) for h in ("AUC", "GAUC", "logloss", "ECE")))
        for s in m.scorers:
            row = [m.value(s, metric, task) for metric in ("auc", "gauc", "logloss", "ece")]
            if all(math.isnan(v) for v in row):
                continue
            lines.append(s.ljust(width) + "".join(" " + _fmt(v) for v in row))
        lines.append("")
    for metric, task, title in (
        ("gauc", "play", "play GAUC by category"),
        (f"ndcg@{m.k}", "units", f"logged NDCG@{m.k} by category (lists = decision x category)"),
        (f"truth_ndcg@{m.k}", "units", f"ground-truth NDCG@{m.k} by category"),
        (f"tail_share@{m.k}", "units", f"long-tail share of top-{m.k} by category"),
    ):
        rows = [(s, [m.value(s, metric, task, c) for c in ("all", *m.categories)]) for s in m.scorers]
        rows = [(s, r) for s, r in rows if not all(math.isnan(v) for v in r)]
        if not rows:
            continue
        lines.append(title)
        lines.append("scorer".ljust(width) + "".join(c[:8].rjust(9) for c in ("all", *m.categories)))
        lines.extend(s.ljust(width) + "".join(" " + _fmt(v) for v in r) for s, r in rows)
        lines.append("")
    hits = [(s, m.value(s, f"category_hit@{m.top_n}", "-")) for s in m.scorers]
    hits = [(s, v) for s, v in hits if not math.isnan(v)]
    if hits:
        lines.append(f"top-{m.top_n} category hit rate (next played category)")
        lines.extend(s.ljust(width) + " " + _fmt(v) for s, v in hits)
        lines.append("")
    lines.append(("PASS: " if m.beats_baselines else "FAIL: ") + m.verdict)
    return "\n".join(lines)
