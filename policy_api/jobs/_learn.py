"""The bandit learner: join rewards inside the reward window, Lagrangian cost, publish a VW model.

Also the log reading every learning and replay job shares: decisions as arrays (:func:`load_log`)
with their rewards, and the bandit's features rebuilt exactly as serving built them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy.engine import Engine

from allocator import HomepageConfig
from bandits import VWLayoutBandit

from .. import registry
from ..engine import layout_features
from ..log import (
    DecisionLog,
    Rewards,
    feedback_first_seen,
    iter_log_rewards,
    join_rewards,
    load_items,
    read_decision_log,
    read_feedback,
    read_log_rewards,
    serving_began,
)

__all__ = ["LearnResult", "catalog_categories", "learn", "load_log", "log_features", "new_bandit"]


def catalog_categories(db: Engine) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, their category names) of the catalog, as str arrays."""
    items = load_items(db)
    return np.asarray(items["item_ids"], dtype=str), np.asarray(items["category"], dtype=str)


def load_log(db: Engine, config: HomepageConfig, since: datetime | None, until: datetime | None,
             config_version: int | None = None, *, with_modules: bool = True,
             sql_join: bool = False) -> tuple[DecisionLog, Rewards]:
    """Decisions in [since, until) made under ``config_version`` (all if None) and their rewards.

    ``with_modules`` keeps each candidate's module ids (replay of configs with module constraints
    needs them; the learner does not). ``sql_join`` joins the rewards in the database while the
    decisions are read (:func:`~policy_api.log.read_log_rewards`: one row per decision, the
    learner's path) instead of reading the behaviour events and joining them here
    (:func:`~policy_api.log.join_rewards`, the reference; replay uses it, so its estimates do not
    move with the order of additions).
    """
    if sql_join:
        return read_log_rewards(db, config, since, until, config_version, with_modules=with_modules)
    dlog = read_decision_log(db, config, since, until, config_version, with_modules=with_modules)
    # an imported history's events (before serving began) belong to no serving decision: not read
    began = serving_began(db)
    fb_since = since if began is None or (since is not None and since >= began) else began
    # impressions carry no units: fetch behaviour events only, and which decisions saw any event
    fb = read_feedback(db, since=fb_since, columns=["request_id", "item_id", "type", "ts"],
                       exclude_types=("impression",))
    seen = feedback_first_seen(db, since=fb_since)
    ids, cats = catalog_categories(db)
    return dlog, join_rewards(dlog, fb, config, ids, cats, first_seen=seen)


def log_features(dlog: DecisionLog, config: HomepageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(shared (n, d_s), actions (n, L, d_a)) as serving built them."""
    actions = layout_features(dlog.categories, dlog.tilt, dlog.value, dlog.score, len(config.categories), dlog.mask)
    return dlog.shared, actions


def new_bandit(config: HomepageConfig) -> VWLayoutBandit:
    """A fresh bandit with the config's exploration algorithm and budget."""
    return VWLayoutBandit(config.exploration.algorithm, epsilon=max(config.exploration.budget, 1e-3), seed=0)


@dataclass(frozen=True, slots=True)
class LearnResult:
    bandit_version: int
    config_version: int
    learned_until: str
    decisions: int
    decisions_per_s: float
    mean_reward: float
    mean_lagrangian: float
    late_events: int
    algorithm: str
    previous: int | None

    def metrics(self) -> dict[str, object]:
        """The registry row's metrics."""
        return {k: getattr(self, k) for k in self.__slots__ if k != "bandit_version"}


def learn(db: Engine, *, until: datetime | None = None, min_decisions: int = 100,
          chunk_size: int = 4096) -> LearnResult | None:
    """Learn from decisions whose reward window has closed by ``until`` (default now) and that the
    newest model has not seen; publish the next bandit version. None when there was too little.

    The log streams in chunks of ``chunk_size`` decisions (:func:`~policy_api.log.iter_log_rewards`):
    VW learns each chunk while the next one is read, parsed and joined to its rewards in other
    threads, and memory holds a chunk or two, not the log. VW learns the decisions in log order
    either way, so the model equals one learned from the whole log at once.
    """
    cfg = registry.require_active_config(db)
    config = cfg.config
    closed = (until or datetime.now(tz=UTC)) - timedelta(seconds=config.learning.reward_window_s)
    latest = registry.model(db, "bandit")
    since = None
    bandit = None
    if latest is not None and latest.metrics.get("config_version") == cfg.version and latest.artifact is not None:
        bandit = VWLayoutBandit.load(latest.artifact)
        learned = latest.metrics.get("learned_until")
        since = None if learned is None else datetime.fromisoformat(str(learned))
    t0 = time.perf_counter()
    bandit = bandit or new_bandit(config)
    prices, _ = registry.prices(db, cfg)
    rewards, costs, late = [], [], 0
    for dlog, rw in iter_log_rewards(db, config, since, closed, cfg.version, chunk_size=chunk_size):
        cost = -(rw.reward + dlog.chosen_exposure @ prices)
        shared, actions = log_features(dlog, config)
        # a chunk whose shared vectors are all shorter than the model's is zero-padded, as reading
        # the whole log pads it (VW skips zero features: the examples are the same)
        width = bandit.n_shared_features_ or 0
        if shared.shape[1] < width:
            shared = np.pad(shared, ((0, 0), (0, width - shared.shape[1])))
        # learned as it comes; nothing is published below min_decisions, and the model is this call's copy
        bandit.learn_batch(shared, actions, dlog.action, cost, dlog.pscore, dlog.n_cand)
        rewards.append(rw.reward)
        costs.append(cost)
        late += rw.n_late
    n = sum(len(r) for r in rewards)
    if n == 0 or n < min_decisions:
        return None
    secs = time.perf_counter() - t0
    reward, cost = np.concatenate(rewards), np.concatenate(costs)
    res = LearnResult(bandit_version=0, config_version=cfg.version, learned_until=closed.isoformat(),
                      decisions=n, decisions_per_s=n / max(secs, 1e-9),
                      mean_reward=float(reward.mean()), mean_lagrangian=float(-cost.mean()),
                      late_events=late, algorithm=bandit.algorithm,
                      previous=None if latest is None else latest.version)
    v = registry.publish_model(db, "bandit", res.metrics(), bandit.save())
    return replace(res, bandit_version=v)
