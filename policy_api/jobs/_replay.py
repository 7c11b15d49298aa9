"""Replay (off-policy evaluation) of another policy or config on the logged candidates, and the log's
exports for other tools (Parquet lives in :mod:`policy_api.log`; Vowpal Wabbit DSJSON here).

A replay target's distribution is recomputed on each logged decision's candidates: ``logged``,
``greedy`` (the logged price-adjusted argmax), ``uniform``, a bandit version (budgeted as serving
budgets it), or a config file (its plan solved on the logged candidates, then epsilon-greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from allocator import ConfigError, HomepageConfig, InfeasiblePlan, load_config, solve_plan
from bandits import VWLayoutBandit, budget_pmf, cross_fit_rewards, estimate_all, to_dsjson_line

from .. import registry
from ..errors import InvalidInput, NotFound, from_config_error
from ..log import DecisionLog, decision_log, export_parquet, read_parquet
from ._learn import load_log, log_features

__all__ = ["MIN_ESS_SHARE", "MAX_WEIGHT", "TARGETS", "ReplayResult", "config_candidates", "export_parquet_with_rewards", "overlap_warnings", "export_dsjson", "log_from_parquet", "parse_target",
           "replay", "target_distribution"]


def _one_hot(idx: np.ndarray, L: int) -> np.ndarray:
    out = np.zeros((idx.size, L))
    out[np.arange(idx.size), idx] = 1.0
    return out


def _budgeted(pmf: np.ndarray, greedy: np.ndarray, dlog: DecisionLog, value: np.ndarray,
              config: HomepageConfig) -> np.ndarray:
    """Serving's budget rule applied to a batch of target pmfs over padded logged candidates."""
    ex = config.exploration
    return budget_pmf(pmf, greedy, ex.budget, value=value, max_value_loss=ex.max_value_loss, mask=dlog.mask)


def config_candidates(dlog: DecisionLog, new: HomepageConfig, module_ids: list[list[list[str]]] | None = None,
                      logged_categories: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Value and exposure of the logged candidates under another config (its position weights,
    category values and constraints), from each candidate's logged per-slot engagement.

    ``dlog.categories`` index the logged config's categories; pass ``logged_categories`` (the logged
    config's ``category_names``) so a config that orders, adds or drops categories is matched by name.
    Without it the two configs must list the same categories in the same order.

    Returns ``value (n, L)`` (0 on padding) and ``exposure (n, L, K_new)`` in ``new``'s constraint order.
    """
    w = np.asarray(new.position_weights)
    S = min(w.size, dlog.categories.shape[-1])
    cats = dlog.categories[..., :S]
    if logged_categories is not None:
        remap = np.array([new.category_names.index(c) if c in new.category_names else -1
                          for c in logged_categories] + [-1], dtype=np.int64)
        cats = remap[np.where(cats >= 0, cats, -1)]
    vals = np.append(new.category_values(), 0.0)[np.where(cats >= 0, cats, -1)]
    value = (w[:S] * dlog.engagement[..., :S] * vals).sum(-1)
    wn = w[:S] / w[:S].sum()
    K = len(new.constraints)
    ex = np.zeros((*value.shape, K))
    names = new.category_names
    module_of: np.ndarray | None = None
    for k, c in enumerate(new.constraints):
        if c.kind == "category_share":
            ex[..., k] = ((cats == names.index(c.category or "")) * wn).sum(-1)
        elif c.kind == "long_tail_share":
            ex[..., k] = dlog.tail
        else:
            if module_ids is None:
                raise ValueError(f"constraint {c.name!r} (module_share) needs the logged module ids")
            if module_of is None:  # (n, L, S) module ids, "" on padding (rows have different counts)
                module_of = np.full(value.shape + (S,), "", dtype=object)
                for i, row in enumerate(module_ids):
                    for j, cand in enumerate(row):
                        mods = list(cand)[:S]
                        module_of[i, j, :len(mods)] = mods
            ex[..., k] = (module_of == c.module) @ wn
    return np.where(dlog.mask, value, 0.0), ex


TARGETS = "logged, greedy, uniform, bandit[:VERSION], a bandit version number or a config file"


def parse_target(target: str) -> tuple[str, int | None]:
    """``(kind, bandit version)`` of a replay target; :class:`InvalidInput` naming the allowed values."""
    if target in ("logged", "greedy", "uniform"):
        return target, None
    if target.endswith(".toml") or Path(target).is_file():
        if not Path(target).is_file():
            raise InvalidInput(f"policy {target!r}: config file not found", field="policy")
        return "config", None
    if target == "bandit" or target.startswith("bandit:") or target.isdigit():
        tail = target.split(":", 1)[1] if ":" in target else (target if target.isdigit() else "")
        if tail and not tail.isdigit():
            raise InvalidInput(f"policy must be {TARGETS}; got {target!r} (the bandit version must be an integer)",
                               field="policy")
        return "bandit", int(tail) if tail else None
    raise InvalidInput(f"policy must be {TARGETS}; got {target!r}", field="policy")


def target_distribution(target: str, dlog: DecisionLog, cfg: HomepageConfig, db: Engine | None = None,
                        ) -> tuple[np.ndarray, str, dict[str, Any]]:
    """The target policy's distribution over each logged decision's candidates, (n, L).

    ``target``: ``logged`` | ``greedy`` (the logged price-adjusted argmax) | ``uniform`` |
    ``bandit`` (newest model) | ``bandit:N`` | an integer N (bandit version) | a config file path.
    """
    L = dlog.mask.shape[1]
    info: dict[str, Any] = {}
    if target == "logged":
        return dlog.pmf, "logged policy", info
    if target == "greedy":
        return _one_hot(np.argmax(np.where(dlog.mask, dlog.score, -np.inf), axis=1), L), "greedy (logged prices)", info
    if target == "uniform":
        return dlog.mask / dlog.mask.sum(1, keepdims=True), "uniform over candidates", info
    kind, version = parse_target(target)
    if kind == "config":
        return _config_target(Path(target), dlog, cfg, info)
    if db is None:
        raise InvalidInput("policy: a bandit target needs the database (its model registry)", field="policy")
    rec = registry.model(db, "bandit", version)
    if rec is None or rec.artifact is None:
        raise NotFound(f"policy: no published bandit model{'' if version is None else f' version {version}'}",
                       field="policy")
    bandit = VWLayoutBandit.load(rec.artifact)
    shared, actions = log_features(dlog, cfg)
    pmf = bandit.predict_batch(shared, actions, dlog.n_cand)
    # as serving does: the bandit spends the budget around the priced argmax
    greedy = np.argmax(np.where(dlog.mask, dlog.score, -np.inf), axis=1)
    info["bandit_version"] = rec.version
    return _budgeted(pmf, greedy, dlog, dlog.value, cfg), f"bandit v{rec.version} (within the budget)", info


def _config_target(path: Path, dlog: DecisionLog, cfg: HomepageConfig, info: dict[str, Any]
                   ) -> tuple[np.ndarray, str, dict[str, Any]]:
    try:
        new = load_config(path)
    except FileNotFoundError as e:
        raise NotFound(str(e), field="policy") from None
    except ConfigError as e:
        raise from_config_error(e, str(path)) from None
    value, ex = config_candidates(dlog, new, dlog.modules, logged_categories=cfg.category_names)
    lo, hi = new.bounds()
    n = len(dlog)
    weight = np.full(n, 1.0 / n)
    try:
        plan = solve_plan(value, ex, weight, lo, hi, dlog.mask, names=new.constraint_names)
    except InfeasiblePlan as e:
        raise InvalidInput(f"policy {path}: infeasible on the logged candidates; {e.diagnosis}",
                           field="policy") from None
    score = np.where(dlog.mask, value + ex @ plan.prices, -np.inf)
    greedy = np.argmax(score, axis=1)
    uniform = dlog.mask / dlog.mask.sum(1, keepdims=True)
    info.update({"prices": dict(zip(new.constraint_names, map(float, plan.prices), strict=True)),
                 "projected_value_model": float(plan.objective)})
    return _budgeted(uniform, greedy, dlog, value, new), f"config {path.name} (planned, epsilon-greedy)", info


#: below this share of the logged decisions as effective sample size, estimates are flagged
MIN_ESS_SHARE = 0.01
#: above this importance weight on any decision, estimates are flagged
MAX_WEIGHT = 100.0


def overlap_warnings(weights: np.ndarray, *, min_ess_share: float = MIN_ESS_SHARE,
                     max_weight: float = MAX_WEIGHT) -> tuple[str, ...]:
    """Sentences saying why the overlap between the target and the logging policy is too thin to trust
    an importance-weighted estimate; empty when it is not.

    ESS = (sum w)^2 / sum w^2 over the importance weights ``w = pi_target / pi_logged`` of the served
    actions, shape (n_rounds,); the estimate rests on about ESS decisions, and a single weight of W
    makes one decision count as much as W average ones.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    sq = float((w * w).sum())
    ess = float(w.sum()) ** 2 / sq if sq > 0 else 0.0
    top = float(w.max(initial=0.0))
    out = []
    if ess < min_ess_share * n:
        out.append(f"effective sample size {ess:.0f} of {n} logged decisions ({ess / max(n, 1):.2%}, below "
                   f"{min_ess_share:.0%}): the target rarely chose what the logging policy served, so "
                   "IPS-type estimates rest on a handful of decisions")
    if top > max_weight:
        out.append(f"max importance weight {top:.0f} (above {max_weight:.0f}): one decision counts as much as "
                   f"{top:.0f} average ones")
    if out:
        out.append("do not trust these estimates: collect more exploration (a larger exploration budget) or "
                   "evaluate a target closer to the logged policy; DM does not need overlap but is only as good "
                   "as its reward model")
    return tuple(out)


@dataclass(frozen=True)
class ReplayResult:
    target: str
    label: str
    rows: list[dict[str, Any]]
    logged_mean: float
    n: int
    shares: list[dict[str, Any]]
    weights: np.ndarray
    info: dict[str, Any]
    #: sentences on thin overlap (low ESS, huge weights); empty when the estimates can be trusted
    warnings: tuple[str, ...] = ()
    #: whose bounds ``shares`` compares with: "logged config" or the what-if config's file name
    targets_of: str = "logged config"


def replay(dlog: DecisionLog, reward: np.ndarray, target: str, cfg: HomepageConfig, db: Engine | None = None,
           *, n_boot: int = 200, seed: int = 0) -> ReplayResult:
    """Every estimator of the target's value on the log, with CIs and overlap diagnostics."""
    if len(dlog) < 10:
        raise InvalidInput(f"replay needs at least 10 logged decisions with candidates; found {len(dlog)}",
                           field="since")
    dist, label, info = target_distribution(target, dlog, cfg, db)
    rng = np.random.default_rng(seed)
    _, actions = log_features(dlog, cfg)
    est_r = cross_fit_rewards(actions, dlog.action, reward, n_folds=2, rng=rng)
    rows = estimate_all(reward, dlog.action, dlog.pscore, dist, est_r, n_boot=n_boot, rng=rng)
    logged = float(reward.mean())
    for r in rows:  # relative change, signed as the value's change even when rewards are negative
        r["relative_to_logged"] = (r["value"] - logged) / abs(logged) if logged else None
    w = dist[np.arange(len(dlog)), dlog.action] / dlog.pscore
    # a what-if config is measured against its own constraints and bounds, on the same candidates
    targets_of, shown, exposure = "logged config", cfg, dlog.exposure
    if parse_target(target)[0] == "config":
        shown = load_config(Path(target))
        _, exposure = config_candidates(dlog, shown, dlog.modules, logged_categories=cfg.category_names)
        targets_of = f"what-if config {Path(target).name}"
    proj = np.einsum("nl,nlk->k", dist, exposure) / len(dlog)
    logged_sh = exposure[np.arange(len(dlog)), dlog.action].mean(0)
    shares = []
    for k, c in enumerate(shown.constraints):
        shares.append({"constraint": c.name, "min": c.min, "max": c.max, "logged": float(logged_sh[k]),
                       "target": float(proj[k])})
    return ReplayResult(target, label, rows, logged, len(dlog), shares, w, info, overlap_warnings(w), targets_of)


def log_from_parquet(path: Path, cfg: HomepageConfig) -> tuple[DecisionLog, dict[str, np.ndarray]]:
    """The decisions and feedback of a ``homepage log export`` Parquet file."""
    cols = read_parquet(path)
    n = len(cols["request_id"])
    cands = []
    for i in range(n):
        mods = cols["cand_modules"][i] or []
        row = []
        for j in range(len(mods)):
            row.append({"modules": mods[j], "tilt": cols["cand_tilt"][i][j], "value": cols["cand_value"][i][j],
                        "score": cols["cand_score"][i][j], "exposure": cols["cand_exposure"][i][j],
                        **{k: cols[f"cand_{k}"][i][j] for k in ("categories", "engagement", "tail")
                           if f"cand_{k}" in cols and cols[f"cand_{k}"][i] is not None}})
        cands.append(row)
    dcols = {k: cols[k] for k in ("request_id", "ts", "user_id", "policy", "chosen", "propensity", "pmf", "context",
                                  "versions", "layout")}
    dcols["candidates"] = cands
    dlog = decision_log(dcols, cfg)
    fb_rows = [(e["request_id"] if "request_id" in e else cols["request_id"][i], e["item_id"], e["type"], e["ts"])
               for i in range(n) for e in (cols["feedback"][i] or [])]
    fb = {"request_id": np.array([r[0] for r in fb_rows], dtype=object),
          "item_id": np.array([r[1] for r in fb_rows], dtype=object),
          "type": np.array([r[2] for r in fb_rows], dtype=object),
          "ts": np.array([r[3] for r in fb_rows], dtype=object)}
    return dlog, fb


def export_parquet_with_rewards(db: Engine, out: Path, since: datetime | None = None,
                                until: datetime | None = None) -> tuple[int, int | None]:
    """The Parquet export plus ``reward`` (each decision's reward under the active config: its event
    weights, category values and reward window) and ``exposure`` (the served layout's exposure named
    by the active config's constraints), for the decisions made under the active config; the others
    get nulls. Returns (decisions written, the config version the rewards are computed under, or None
    when no config is active and the file has neither column)."""
    rec = registry.active_config(db)
    if rec is None:
        return export_parquet(db, out, since, until), None
    cfg = rec.config
    dlog, rw = load_log(db, cfg, since, until, config_version=rec.version, with_modules=False)
    meta = {"homepage.reward_config_version": str(rec.version),
            "homepage.reward_window_s": repr(float(cfg.learning.reward_window_s)),
            "homepage.default_reward": repr(float(cfg.learning.default_reward))}
    n = export_parquet(db, out, since, until, rewards=(dlog.request_id, rw.reward),
                       exposure_names=cfg.constraint_names, metadata=meta)
    return n, rec.version


def export_dsjson(db: Engine, out: Path, since: datetime | None = None, until: datetime | None = None) -> int:
    """Write the active config's decisions in [since, until) as Vowpal Wabbit DSJSON lines; their count.

    Each line carries the cost ``homepage learn`` minimises (the Lagrangian reward, negated) and the
    raw reward as its outcome.
    """
    cfg = registry.require_active_config(db)
    dlog, rw = load_log(db, cfg.config, since, until, config_version=cfg.version)  # features mean one config
    shared, actions = log_features(dlog, cfg.config)
    prices, _ = registry.prices(db, cfg)
    cost = -(rw.reward + dlog.chosen_exposure @ prices)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for i in range(len(dlog)):  # one JSON line per decision: this is the format's unit
            k = int(dlog.n_cand[i])
            fh.write(to_dsjson_line(event_id=str(dlog.request_id[i]), timestamp=float(dlog.ts[i]), shared=shared[i],
                                    actions=actions[i, :k], pmf=dlog.pmf[i, :k], chosen=int(dlog.action[i]),
                                    cost=float(cost[i]), outcomes=(float(rw.reward[i]),),
                                    model_version=str((dlog.versions[i] or {}).get("bandit") or "N/A")) + "\n")
    return len(dlog)
