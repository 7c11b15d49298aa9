"""The shared check suite (STYLE 9): every policy, estimator and pacer of the core packages passes the
same contract, each check against a reference computed independently of the call under test.

Checks, for every case below:

* ``test_same_seed_gives_identical_outputs``: two objects built separately, from inputs drawn
  separately with the same seed, give bit-identical outputs;
* ``test_another_seed_changes_only_the_random_outputs``: where an object draws random numbers (the
  bootstrap's ``rng``, the seeded draw after ``EpsilonGreedy``, VW's ``--random_seed`` under
  ``bag``), another policy seed changes those outputs and nothing else;
* ``test_inputs_are_not_mutated``: every array passed in (to the constructor, ``fit``/``learn``,
  predictions and the round trips) is byte-identical afterwards, compared with copies taken before;
* ``test_round_trip_predicts_identically``: ``save``/``load``, ``to_dict``/``from_dict`` (through JSON
  text) and pickle give an object of the same type whose outputs on fresh inputs, which neither object
  has seen, are bit-identical to the original's;
* ``test_outputs_match_the_reference``: the outputs equal an independent reference (a slow per-round
  loop, a closed form, brute force, VW's own DSJSON parser, or an optimality condition), so the checks
  above cannot pass on a constant or broken output.

Pacers are every class ``allocator`` exports with ``update``, ``to_dict`` and ``from_dict``, so a pacer
added later joins the suite when it is exported. Every seeded test passes for seeds 0..99
(``SEEDS=all pytest tests/test_common.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from scipy.stats import rankdata

import allocator
from bandits import (
    ALGORITHMS,
    DM,
    DR,
    IPS,
    SNDR,
    SNIPS,
    EpsilonGreedy,
    RidgeRewardModel,
    SwitchDR,
    VWLayoutBandit,
    bootstrap_ci,
    sample,
    sample_batch,
    to_dsjson_line,
)
from rankers import (
    CategoryPopularity,
    ItemKNN,
    ItemPriorBaseline,
    LogisticBaseline,
    PopularityScorer,
    RecentPopularity,
    UserHistory,
    build_examples,
    split_by_time,
)

Outputs = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------------
# the contract


class Case:
    """One class under the contract.

    ``train(rng)`` draws what the object is built and fitted from, ``build(data, seed)`` constructs and
    fits it (``seed`` is the policy seed: where the object's own randomness comes from), ``query(rng)``
    draws inputs for predictions and ``outputs(obj, query, seed)`` returns them as named arrays.
    ``check(data, query, out, seed)`` asserts ``out`` against an independent reference.
    """

    name: str
    #: outputs that depend on the policy seed (empty: the object is deterministic)
    random_outputs: tuple[str, ...] = ()
    round_trips: tuple[str, ...] = ("pickle",)

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        return {}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        raise NotImplementedError

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        raise NotImplementedError

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _json_round_trip(obj: Any) -> Any:
    text = json.dumps(obj.to_dict(), allow_nan=False)  # "JSON-ready": strict JSON, no NaN or inf
    return type(obj).from_dict(json.loads(text))


def _save_load(obj: Any) -> Any:
    data = obj.save()
    assert isinstance(data, bytes)
    return type(obj).load(data)


ROUND_TRIPS: dict[str, Callable[[Any], Any]] = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "save/load": _save_load,
    "to_dict/from_dict": _json_round_trip,
}


def run(case: Case, seed: int, policy_seed: int | None = None) -> tuple[Any, dict, dict, Outputs]:
    """Draw inputs from ``seed``, build and fit the object, and return its outputs on the query."""
    rng = np.random.default_rng(seed)
    data = case.train(rng)
    query = case.query(rng)
    ps = seed if policy_seed is None else policy_seed
    obj = case.build(data, ps)
    return obj, data, query, case.outputs(obj, query, ps)


def assert_identical(a: Outputs, b: Outputs) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


def _arrays(x: Any, path: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Every numpy array inside dicts, sequences and dataclasses (``Examples``, ``UserHistory``)."""
    if isinstance(x, np.ndarray):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _arrays(v, f"{path}.{k}")
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            yield from _arrays(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _arrays(getattr(x, f.name), f"{path}.{f.name}")


def snapshot(x: Any) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {p: (a.dtype.str, a.shape, a.tobytes()) for p, a in _arrays(x)}


# ---------------------------------------------------------------------------------------------------
# bandits: off-policy estimators


def random_log(rng: np.random.Generator, n_rounds: int = 300, n_cand: int = 5) -> dict[str, np.ndarray]:
    """A log over padded candidates: round i had ``n_i`` in [2, n_cand] real ones."""
    n_i = rng.integers(2, n_cand + 1, n_rounds)
    real = np.arange(n_cand)[None, :] < n_i[:, None]
    action_dist = np.where(real, rng.gamma(1.0, size=(n_rounds, n_cand)), 0.0)
    action_dist /= action_dist.sum(axis=1, keepdims=True)
    return {
        "reward": rng.normal(1.0, 1.0, n_rounds),
        "action": np.floor(rng.random(n_rounds) * n_i).astype(np.int64),
        "pscore": rng.uniform(0.1, 0.9, n_rounds),
        "action_dist": action_dist,
        "estimated_rewards": rng.normal(1.0, 0.5, (n_rounds, n_cand)),
    }


def slow_estimate(name: str, log: dict[str, np.ndarray], tau: float) -> tuple[float, float, float | None]:
    """(value, ess, se or None) by a loop over rounds, from the formulas in the estimators' docstrings."""
    r, a, p = log["reward"], log["action"], log["pscore"]
    pi, q = log["action_dist"], log["estimated_rewards"]
    n = r.shape[0]
    w, q_pi, q_a = np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        w[i] = pi[i, a[i]] / p[i]
        q_pi[i] = sum(pi[i, j] * q[i, j] for j in range(pi.shape[1]))
        q_a[i] = q[i, a[i]]
    ess = w.sum() ** 2 / (w**2).sum()
    unbiased = {
        "DM": q_pi,
        "IPS": w * r,
        "DR": q_pi + w * (r - q_a),
        "Switch-DR": q_pi + np.where(w <= tau, w * (r - q_a), 0.0),
    }
    if name in unbiased:
        t = unbiased[name]
        return float(t.mean()), ess, float(t.std(ddof=1) / math.sqrt(n))
    if name == "SNIPS":
        return float((w * r).sum() / w.sum()), ess, None
    assert name == "SNDR"
    return float(q_pi.mean() + (w * (r - q_a)).sum() / w.sum()), ess, None


class EstimatorCase(Case):
    random_outputs = ("bootstrap",)

    def __init__(self, cls: type, **params: float) -> None:
        self.cls, self.params = cls, params
        self.name = cls.__name__

    def build(self, data: dict[str, Any], seed: int) -> Any:
        return self.cls(**self.params)

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return random_log(rng)

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        q = query["estimated_rewards"] if obj.needs_model else None
        args = (query["reward"], query["action"], query["pscore"], query["action_dist"], q)
        est = obj.estimate(*args)
        ci = bootstrap_ci(obj, *args, n_boot=40, rng=np.random.default_rng(seed))
        return {
            "estimate": np.array([est.value, est.se, est.ci_low, est.ci_high, est.overlap.ess]),
            "bootstrap": np.array([ci.low, ci.high, ci.se]),
        }

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        value, ess, se = slow_estimate(self.cls.name, query, self.params.get("tau", math.inf))
        got_value, got_se, low, high, got_ess = out["estimate"]
        assert got_value == pytest.approx(value, rel=1e-10, abs=1e-12)
        assert got_ess == pytest.approx(ess, rel=1e-10)
        if se is not None:
            assert got_se == pytest.approx(se, rel=1e-9)
        assert low < got_value < high
        b_low, b_high, b_se = out["bootstrap"]
        assert b_low < b_high and b_se > 0


# ---------------------------------------------------------------------------------------------------
# bandits: reward model, exploration, the VW adapter


class RidgeCase(Case):
    name = "RidgeRewardModel"
    alpha = 0.5

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        x = rng.normal(size=(60, 4, 3))
        action = rng.integers(0, 4, 60)
        reward = x[np.arange(60), action] @ np.array([1.0, -2.0, 0.5]) + 0.3 + rng.normal(0, 0.1, 60)
        return {"action_features": x, "action": action, "reward": reward}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        return RidgeRewardModel(alpha=self.alpha).fit(data["action_features"], data["action"], data["reward"])

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"action_features": rng.normal(size=(20, 4, 3))}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        return {"q": obj.predict(query["action_features"])}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        # closed form of the ridge with an unpenalised intercept: least squares on the augmented system
        # [1 X; 0 sqrt(alpha) I] [b; beta] = [r; 0]
        xa = data["action_features"][np.arange(60), data["action"]]
        d = xa.shape[1]
        design = np.block([[np.ones((60, 1)), xa], [np.zeros((d, 1)), math.sqrt(self.alpha) * np.eye(d)]])
        coef = np.linalg.lstsq(design, np.r_[data["reward"], np.zeros(d)], rcond=None)[0]
        np.testing.assert_allclose(out["q"], query["action_features"] @ coef[1:] + coef[0], rtol=1e-9, atol=1e-9)


class EpsilonGreedyCase(Case):
    """The policy is the pmf and its seeded draw ``sample_batch(pmf, seeds)``: the seeds are its
    randomness (the engine derives them from request ids)."""

    name = "EpsilonGreedy"
    random_outputs = ("action",)
    budget = 0.3

    def build(self, data: dict[str, Any], seed: int) -> Any:
        return EpsilonGreedy(self.budget)

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        n, n_cand = 200, 6
        mask = rng.random((n, n_cand)) < 0.6
        greedy = rng.integers(0, n_cand, n)
        mask[np.arange(n), greedy] = True  # the greedy candidate is a real one
        return {"greedy": greedy, "mask": mask}

    @staticmethod
    def seeds(seed: int, n: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 2**63, n, dtype=np.uint64)

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        pmf = obj.pmf_batch(query["greedy"], query["mask"])
        one = obj.pmf(int(query["greedy"][0]), query["mask"].shape[1])
        return {"pmf": pmf, "pmf_one": one, "action": sample_batch(pmf, self.seeds(seed, pmf.shape[0]))}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        greedy, mask = query["greedy"], query["mask"]
        want = np.zeros(mask.shape)
        for i in range(mask.shape[0]):
            n = int(mask[i].sum())
            eps = min(1.0, self.budget * n / (n - 1)) if n > 1 else 0.0
            want[i, mask[i]] = eps / n
            want[i, greedy[i]] = 1.0 - eps + eps / n
        np.testing.assert_allclose(out["pmf"], want, rtol=0, atol=1e-12)
        n_cand = mask.shape[1]
        eps_all = min(1.0, self.budget * n_cand / (n_cand - 1))
        one = np.full(n_cand, eps_all / n_cand)
        one[greedy[0]] += 1.0 - eps_all
        np.testing.assert_allclose(out["pmf_one"], one, rtol=0, atol=1e-12)
        seeds = self.seeds(seed, mask.shape[0])
        assert out["action"].tolist() == [sample(out["pmf"][i], int(s)) for i, s in enumerate(seeds)]
        assert mask[np.arange(mask.shape[0]), out["action"]].all()


def vw_pmf(n_act: int, chosen: int, pscore: float) -> np.ndarray:
    pmf = np.full(n_act, (1.0 - pscore) / (n_act - 1))
    pmf[chosen] = pscore
    return pmf


class VWCase(Case):
    round_trips = ("save/load", "pickle")
    n_cand, d_s, d_a = 6, 4, 5

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.name = f"VWLayoutBandit-{algorithm}"
        # only bagging draws random numbers in cb_explore_adf's predictions (its bootstrap weights)
        self.random_outputs = ("pmf", "pmf_one") if algorithm == "bag" else ()

    def params(self, seed: int) -> dict[str, Any]:
        return {"epsilon": 0.1, "bag": 3, "cover": 2, "bits": 14, "seed": seed}

    def features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shared = rng.normal(size=(n, self.d_s))
        shared[:, 0] = 1.0
        actions = rng.normal(size=(n, self.n_cand, self.d_a))
        actions[np.abs(actions) < 0.4] = 0.0  # sparse, as the engine's one-hot layout features are
        n_actions = rng.integers(2, self.n_cand + 1, n)
        return shared, actions, n_actions

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        shared, actions, n_actions = self.features(rng, 80)
        chosen = np.floor(rng.random(80) * n_actions).astype(np.int64)
        cost = -(actions[np.arange(80), chosen, 0] + rng.normal(0, 0.1, 80))
        return {"shared": shared, "actions": actions, "n_actions": n_actions, "chosen": chosen, "cost": cost,
                "pscore": rng.uniform(0.2, 0.8, 80)}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        bandit = VWLayoutBandit(self.algorithm, **self.params(seed))
        bandit.learn_batch(data["shared"], data["actions"], data["chosen"], data["cost"], data["pscore"],
                           data["n_actions"])
        return bandit

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        shared, actions, n_actions = self.features(rng, 12)
        return {"shared": shared, "actions": actions, "n_actions": n_actions}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        s, a, k = query["shared"], query["actions"], query["n_actions"]
        one = np.zeros(a.shape[:2])
        for i in range(s.shape[0]):
            one[i, : k[i]] = obj.predict(s[i], a[i, : k[i]])
        return {"pmf": obj.predict_batch(s, a, k), "pmf_one": one}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        # reference: the same bandit learned by VW's own parser from the DSJSON export of the log
        lines = [
            to_dsjson_line(event_id=f"r{i}", timestamp=1.7e9 + i, shared=data["shared"][i],
                           actions=data["actions"][i, :k], pmf=vw_pmf(k, c, p), chosen=c, cost=cost)
            for i, (k, c, p, cost) in enumerate(zip(data["n_actions"].tolist(), data["chosen"].tolist(),
                                                    data["pscore"].tolist(), data["cost"].tolist(), strict=True))
        ]
        ref = VWLayoutBandit(self.algorithm, **self.params(seed))
        assert ref.learn_dsjson(lines) == len(lines)
        np.testing.assert_array_equal(out["pmf"], ref.predict_batch(query["shared"], query["actions"],
                                                                    query["n_actions"]))
        np.testing.assert_array_equal(out["pmf"], out["pmf_one"])
        np.testing.assert_allclose(out["pmf"].sum(axis=1), 1.0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# rankers


class PopularityCase(Case):
    name = "PopularityScorer"
    round_trips = ("save/load", "pickle")
    n_items, n_categories = 30, 4

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"popularity": rng.integers(0, 8, self.n_items).astype(np.float64),  # with ties
                "item_category": rng.integers(0, self.n_categories, self.n_items)}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        return PopularityScorer(data["popularity"], data["item_category"], mean_units=0.7,
                                n_categories=self.n_categories)

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"user": rng.integers(0, 50, 15), "item": rng.integers(0, self.n_items, 15)}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        return {"score": obj.score(int(query["user"][0]), query["item"]),
                "score_pairs": obj.score_pairs(query["user"], query["item"]),
                "category_preferences": obj.category_preferences(int(query["user"][0]))}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        pop, cat = data["popularity"], data["item_category"]
        units = 0.7 * 2.0 * rankdata(pop, method="average") / pop.size
        np.testing.assert_allclose(out["score"], units[query["item"]], rtol=1e-12)
        np.testing.assert_allclose(out["score_pairs"], units[query["item"]], rtol=1e-12)
        share = [sum(p for p, c in zip(pop, cat, strict=True) if c == k) / pop.sum()
                 for k in range(self.n_categories)]
        np.testing.assert_allclose(out["category_preferences"], share, rtol=1e-12)


def interactions(rng: np.random.Generator, n: int = 80, n_users: int = 9, n_items: int = 12) -> dict[str, Any]:
    return {"user": rng.integers(0, n_users, n), "item": rng.integers(0, n_items, n),
            "ts": rng.uniform(0.0, 5 * 86400.0, n), "weight": rng.choice([0.0, 0.5, 1.0, 2.0], n),
            "item_category": rng.integers(0, 3, n_items), "n_users": n_users, "n_items": n_items}


def slow_knn(data: dict[str, Any], users: np.ndarray, n_neighbors: int, shrink: float) -> np.ndarray:
    """Dense brute force of ItemKNN's documented scores."""
    n_users, n_items = data["n_users"], data["n_items"]
    x = np.zeros((n_users, n_items))
    for u, i, w in zip(data["user"], data["item"], data["weight"], strict=True):
        if w > 0:
            x[u, i] = 1.0
    c = x.T @ x
    s = np.zeros((n_items, n_items))
    for j in range(n_items):
        sims = [(c[i, j] / (math.sqrt(c[i, i] * c[j, j]) + shrink), i) for i in range(n_items) if i != j]
        for v, i in sorted(((v, i) for v, i in sims if v > 0), key=lambda t: (-t[0], t[1]))[:n_neighbors]:
            s[i, j] = v
    out = np.empty((users.size, n_items))
    for r, u in enumerate(users):
        row = x[u] @ s if u >= 0 else np.zeros(n_items)
        out[r] = row if (row > 0).any() else x.sum(axis=0)
    return out


def slow_category_popularity(data: dict[str, Any], users: np.ndarray, alpha: float, half_life_s: float) -> np.ndarray:
    """Per-event loop of CategoryPopularity's documented scores."""
    cat, n_users, n_items = data["item_category"], data["n_users"], data["n_items"]
    n_cat = int(cat.max()) + 1
    t_end = data["ts"].max()
    pop, n_uc = np.zeros(n_items), np.zeros((n_users, n_cat))
    for u, i, t, w in zip(data["user"], data["item"], data["ts"], data["weight"], strict=True):
        wd = w * 2.0 ** (-(t_end - t) / half_life_s)
        pop[i] += wd
        n_uc[u, cat[i]] += wd
    tot = np.array([pop[cat == c].sum() for c in range(n_cat)])
    g = tot / tot.sum()
    out = np.empty((users.size, n_items))
    for r, u in enumerate(users):
        pi = g if u < 0 else (n_uc[u] + alpha * g) / (n_uc[u].sum() + alpha)
        for j in range(n_items):
            out[r, j] = pi[cat[j]] * (pop[j] / tot[cat[j]] if tot[cat[j]] > 0 else 0.0)
    return out


class SimpleScorerCase(Case):
    """``RecentPopularity``, ``CategoryPopularity`` and ``ItemKNN``: ``fit`` on interactions,
    ``score_all(user_idx)``."""

    half_life_s = 86400.0

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = cls.__name__

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        return interactions(rng)

    def build(self, data: dict[str, Any], seed: int) -> Any:
        if self.cls is RecentPopularity:
            model = RecentPopularity(half_life_s=self.half_life_s)
        elif self.cls is CategoryPopularity:
            model = CategoryPopularity(data["item_category"], alpha=2.0, half_life_s=self.half_life_s)
        else:
            model = ItemKNN(n_neighbors=3, shrink=1.0)
        return model.fit(data["user"], data["item"], data["ts"], data["weight"], n_users=data["n_users"],
                         n_items=data["n_items"])

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"user_idx": np.r_[-1, rng.integers(-1, 9, 7)]}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        return {"scores": obj.score_all(query["user_idx"])}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        users = query["user_idx"]
        if self.cls is RecentPopularity:
            pop = np.zeros(data["n_items"])
            for i, t, w in zip(data["item"], data["ts"], data["weight"], strict=True):
                pop[i] += w * 2.0 ** (-(data["ts"].max() - t) / self.half_life_s)
            want = np.tile(pop, (users.size, 1))
        elif self.cls is CategoryPopularity:
            want = slow_category_popularity(data, users, 2.0, self.half_life_s)
        else:
            want = slow_knn(data, users, 3, 1.0)
        np.testing.assert_allclose(out["scores"], want, rtol=1e-10, atol=1e-12)


def user_history(rng: np.random.Generator, n: int, n_items: int, seq_len: int = 4) -> UserHistory:
    pos_count = rng.integers(0, seq_len + 3, n)
    neg_count = rng.integers(0, seq_len + 3, n)
    filled = np.arange(seq_len)[None, :]
    return UserHistory(
        pos_items=np.where(filled < pos_count[:, None], rng.integers(0, n_items, (n, seq_len)), -1).astype(np.int32),
        pos_types=np.where(filled < pos_count[:, None], rng.integers(0, 4, (n, seq_len)), -1).astype(np.int8),
        neg_items=np.where(filled < neg_count[:, None], rng.integers(0, n_items, (n, seq_len)), -1).astype(np.int32),
        pos_count=pos_count,
        neg_count=neg_count,
    )


class ItemPriorCase(Case):
    name = "ItemPriorBaseline"
    n_items = 10

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"priors": rng.normal(-1.0, 1.0, (self.n_items, 5))}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        return ItemPriorBaseline(data["priors"])

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"user": rng.integers(-1, 12, 15), "item": rng.integers(0, self.n_items, 15),
                "seq": user_history(rng, 15, self.n_items)}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        return {"prob": obj.predict_pairs(query["user"], query["item"], query["seq"])}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        logit = data["priors"][query["item"], :4]
        np.testing.assert_allclose(out["prob"], np.exp(logit) / (1.0 + np.exp(logit)), rtol=1e-12)


class LogisticCase(Case):
    name = "LogisticBaseline"
    n_users, n_items = 12, 10

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        n_dec, k = 120, 3
        dec = np.repeat(np.arange(n_dec), k)
        user = np.repeat(rng.integers(-1, self.n_users, n_dec), k)
        item = np.concatenate([rng.choice(self.n_items, k, replace=False) for _ in range(n_dec)])
        ts = np.repeat(np.arange(n_dec) * 60.0, k)
        hit = rng.random(dec.size) < 0.6
        imp = {"decision": dec, "user": user, "item": item, "ts": ts}
        ev = {"decision": dec[hit], "user": user[hit], "item": item[hit], "ts": ts[hit] + 5.0,
              "type": rng.integers(0, 5, int(hit.sum()))}
        ex = build_examples(imp, ev, n_users=self.n_users, n_items=self.n_items,
                            item_category=np.arange(self.n_items) % 3,
                            item_features=rng.normal(size=(self.n_items, 2)), seq_len=4)
        return {"train": split_by_time(ex, valid=0.1, test=0.1)[0]}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        return LogisticBaseline(l2=1.0).fit(data["train"])

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"user": rng.integers(-1, self.n_users, 15), "item": rng.integers(0, self.n_items, 15),
                "seq": user_history(rng, 15, self.n_items)}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        return {"prob": obj.predict_pairs(query["user"], query["item"], query["seq"])}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        # optimality of the fit: the intercept is (almost) unpenalised, so at the optimum the gradient
        # in it, sum(p - y), is ~0: the mean predicted probability on the training rows equals the
        # training label rate of every task
        train = data["train"]
        fitted = LogisticBaseline(l2=1.0).fit(train)
        p = fitted.predict_pairs(train.user, train.item, train.seq)
        np.testing.assert_allclose(p.mean(axis=0), train.labels.mean(axis=0, dtype=np.float64), atol=1e-6)
        assert out["prob"].shape == (15, 4) and ((out["prob"] > 0) & (out["prob"] < 1)).all()


# ---------------------------------------------------------------------------------------------------
# allocator: pacers


def pacer_names() -> list[str]:
    """Every exported class with the pacer interface (a pacer exported later joins automatically)."""
    names = []
    for name in allocator.__all__:
        cls = getattr(allocator, name, None)
        if isinstance(cls, type) and all(hasattr(cls, m) for m in ("update", "to_dict", "from_dict")):
            names.append(name)
    return sorted(names)


#: K = 4 constraints: a floor, a cap, a range and an unconstrained share
LOWER = (0.45, -math.inf, 0.2, -math.inf)
UPPER = (math.inf, 0.3, 0.6, math.inf)
START = np.array([0.2, -0.1, 0.05, 0.0])
MAX_PRICE = 5.0
#: per-pacer config settings beyond the bounds (a pacer not listed gets its config's defaults)
PACER_SETTINGS: dict[str, dict[str, float]] = {
    "DualPacer": {"step_size": 0.8},
    "PIPacer": {"gain": 0.02, "half_life": 40.0, "margin": 0.01},
}


class PacerCase(Case):
    round_trips = ("to_dict/from_dict", "pickle")

    def __init__(self, name: str) -> None:
        self.name = name
        self.cls = getattr(allocator, name)
        # DualPacer's config is PacerConfig; any other pacer's is <Name>Config
        self.config_cls = getattr(allocator, f"{name}Config", None) or allocator.PacerConfig

    def config(self) -> Any:
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        kwargs: dict[str, Any] = {"lower": LOWER, "upper": UPPER, **PACER_SETTINGS.get(self.name, {})}
        if "max_price" in fields:
            kwargs["max_price"] = MAX_PRICE
        return self.config_cls(**kwargs)

    @staticmethod
    def batches(rng: np.random.Generator, n_batches: int) -> list[dict[str, np.ndarray]]:
        return [{"exposure": rng.random((30, 4)) * np.array([0.8, 0.9, 1.0, 1.0]), "weights": rng.random(30) + 0.1}
                for _ in range(n_batches)]

    def train(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"prices": START.copy(), "batches": self.batches(rng, 4)}

    def build(self, data: dict[str, Any], seed: int) -> Any:
        pacer = self.cls(self.config(), prices=data["prices"])
        for b in data["batches"]:
            pacer.update(b["exposure"], b["weights"])
        return pacer

    def query(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"batches": self.batches(rng, 3)}

    def outputs(self, obj: Any, query: dict[str, Any], seed: int) -> Outputs:
        prices = np.stack([obj.update(b["exposure"], b["weights"]) for b in query["batches"]])
        return {"prices": prices, "state": np.array(obj.prices_), "shares": np.array(obj.shares_),
                "n_updates": np.array(obj.n_updates_)}

    def check(self, data: dict[str, Any], query: dict[str, Any], out: Outputs, seed: int) -> None:
        prices = out["prices"]
        lo, hi = np.array(LOWER), np.array(UPPER)
        assert np.isfinite(prices).all() and (np.abs(prices) <= MAX_PRICE).all()
        assert (prices[:, ~np.isfinite(lo)] <= 0).all() and (prices[:, ~np.isfinite(hi)] >= 0).all()
        assert (prices[:, 3] == 0).all()  # unconstrained: never priced
        np.testing.assert_array_equal(out["state"], prices[-1])
        assert int(out["n_updates"]) == len(data["batches"]) + len(query["batches"])
        if self.name == "DualPacer":
            np.testing.assert_allclose(prices, self.slow_dual(data, query), rtol=0, atol=1e-12)

    @staticmethod
    def slow_dual(data: dict[str, Any], query: dict[str, Any]) -> np.ndarray:
        """DualPacer's documented projected step, constraint by constraint."""
        eta = PACER_SETTINGS["DualPacer"]["step_size"]
        alpha = [min(max(p, 0.0), MAX_PRICE) for p in data["prices"]]
        beta = [min(max(-p, 0.0), MAX_PRICE) for p in data["prices"]]
        out = []
        for b in [*data["batches"], *query["batches"]]:
            w, a = b["weights"], b["exposure"]
            for k in range(4):
                share = sum(w[i] * a[i, k] for i in range(w.size)) / w.sum()
                if math.isfinite(LOWER[k]):
                    alpha[k] = min(max(alpha[k] - eta * (share - LOWER[k]), 0.0), MAX_PRICE)
                if math.isfinite(UPPER[k]):
                    beta[k] = min(max(beta[k] - eta * (UPPER[k] - share), 0.0), MAX_PRICE)
            out.append([x - y for x, y in zip(alpha, beta, strict=True)])
        return np.array(out[len(data["batches"]):])


# ---------------------------------------------------------------------------------------------------
# the cases and the checks

CASES: list[Case] = [
    EstimatorCase(DM),
    EstimatorCase(IPS),
    EstimatorCase(SNIPS),
    EstimatorCase(DR),
    EstimatorCase(SNDR),
    EstimatorCase(SwitchDR, tau=1.5),
    RidgeCase(),
    EpsilonGreedyCase(),
    *(VWCase(algorithm) for algorithm in ALGORITHMS),
    PopularityCase(),
    SimpleScorerCase(RecentPopularity),
    SimpleScorerCase(CategoryPopularity),
    SimpleScorerCase(ItemKNN),
    ItemPriorCase(),
    LogisticCase(),
    *(PacerCase(name) for name in pacer_names()),
]
RANDOM_CASES = [c for c in CASES if c.random_outputs]
ROUND_TRIP_CASES = [pytest.param(c, how, id=f"{c.name}-{how}") for c in CASES for how in c.round_trips]


def test_the_suite_covers_every_core_class():
    names = {c.name.split("-")[0] for c in CASES}
    assert {"DM", "IPS", "SNIPS", "DR", "SNDR", "SwitchDR", "RidgeRewardModel", "EpsilonGreedy",
            "VWLayoutBandit", "PopularityScorer", "RecentPopularity", "CategoryPopularity", "ItemKNN",
            "ItemPriorBaseline", "LogisticBaseline", "DualPacer"} <= names
    assert set(pacer_names()) <= names and "DualPacer" in pacer_names()
    assert {c.name for c in CASES if c.random_outputs} >= {"IPS", "EpsilonGreedy", "VWLayoutBandit-bag"}


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_same_seed_gives_identical_outputs(case, seed):
    first = run(case, seed)[3]
    second = run(case, seed)[3]
    assert_identical(first, second)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=repr)
def test_another_seed_changes_only_the_random_outputs(case, seed):
    base = run(case, seed)[3]
    other = run(case, seed, policy_seed=seed + 1)[3]
    for key in base:
        same = np.array_equal(base[key], other[key], equal_nan=True)
        assert same is (key not in case.random_outputs), key


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_inputs_are_not_mutated(case, seed):
    rng = np.random.default_rng(seed)
    data, query, fresh = case.train(rng), case.query(rng), case.query(rng)
    before = snapshot([data, query, fresh])
    obj = case.build(data, seed)
    case.outputs(obj, query, seed)
    for how in case.round_trips:
        case.outputs(ROUND_TRIPS[how](obj), fresh, seed)
    assert snapshot([data, query, fresh]) == before


@pytest.mark.parametrize(("case", "how"), ROUND_TRIP_CASES)
def test_round_trip_predicts_identically(case, how, seed):
    obj = run(case, seed)[0]
    copy = ROUND_TRIPS[how](obj)
    assert type(copy) is type(obj) and copy is not obj
    fresh = case.query(np.random.default_rng([seed, 1]))  # inputs neither object has seen
    assert_identical(case.outputs(obj, fresh, seed), case.outputs(copy, fresh, seed))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_outputs_match_the_reference(case, seed):
    _, data, query, out = run(case, seed)
    case.check(data, query, out, seed)


def world_catalog(world: Any) -> Any:
    """The catalog of a simulator world (``simulator.World``), as ``homepage catalog load`` reads its CSV."""
    from policy_api.log import Catalog

    return Catalog(item_ids=np.asarray(world.item_ids, dtype=object),
                   category=np.array([world.categories[c] for c in world.item_category], dtype=object),
                   popularity=np.asarray(world.popularity, dtype=float),
                   features=np.asarray(world.item_features, dtype=float),
                   feature_names=tuple(world.item_feature_names))


def world_database(path: Any, world: Any, catalog: Any) -> Any:
    """A migrated log at ``path`` (a SQLite file, or a database URL such as the ``database_url``
    fixture's) holding a world's catalog and its default config, active."""
    from policy_api import registry
    from policy_api.log import make_engine, upgrade, upsert_items

    url = str(path) if "://" in str(path) else f"sqlite:///{path}"
    upgrade(url)
    eng = make_engine(url)
    upsert_items(eng, catalog.rows())
    registry.activate_config(eng, world.default_config_toml(), author="test")
    return eng
