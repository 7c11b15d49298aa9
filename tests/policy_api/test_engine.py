"""The decision engine in-process: reproducible draws, the exploration budget, the safe default."""

from __future__ import annotations

import numpy as np
import pytest

from allocator import parse_config_text
from policy_api.engine import DecisionEngine, RequestIds, ScorerHandle, build_state
from policy_api.log import Catalog
from simulator import make_world


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=100, n_items=600, seed=1)


@pytest.fixture(scope="module")
def state(world):
    cfg = parse_config_text(world.default_config_toml())
    cat = Catalog(item_ids=np.asarray(world.item_ids, dtype=object),
                  category=np.array([world.categories[c] for c in world.item_category], dtype=object),
                  popularity=np.asarray(world.popularity, dtype=float),
                  features=np.asarray(world.item_features, dtype=float),
                  feature_names=tuple(world.item_feature_names))
    return build_state(cfg, cat, prices=np.array([0.5, 0.3]))


def test_same_request_id_reproduces_the_decision(state):
    eng = DecisionEngine(state)
    ids = RequestIds(b"k")
    for _ in range(5):
        rid = ids.issue()
        a, b = eng.decide("u00003", rid), eng.decide("u00003", rid)
        assert (a.candidates, a.pmf, a.chosen, a.modules) == (b.candidates, b.pmf, b.chosen, b.modules)


def test_exploration_stays_within_budget_and_propensity_is_pmf_of_chosen(state):
    eng = DecisionEngine(state)
    ids = RequestIds(b"k")
    n, off = 1500, 0
    budget = state.config.exploration.budget
    for k in range(n):
        d = eng.decide(f"u{k % 50:05d}", ids.issue())
        assert d.propensity == pytest.approx(d.pmf[d.chosen])
        assert sum(d.pmf) == pytest.approx(1.0)
        greedy = d.context["greedy"]
        # mass off the greedy candidate is exactly the budget (uniform exploration, epsilon-greedy)
        assert 1 - d.pmf[greedy] <= budget + 1e-12
        off += d.chosen != greedy
    se = np.sqrt(budget * (1 - budget) / n)
    assert off / n <= budget + 3 * se


def test_every_page_respects_the_layout_model(state, world):
    eng = DecisionEngine(state)
    d = eng.decide("u00001", RequestIds(b"k").issue())
    K = state.config.items_per_module
    seen = [it["item_id"] for m in d.modules for it in m["items"]]
    assert len(seen) == len(set(seen)) == K * state.config.slots
    cat_of = dict(zip(world.item_ids.tolist(), (world.categories[c] for c in world.item_category), strict=True))
    for m in d.modules:
        assert {cat_of[it["item_id"]] for it in m["items"]} == {m["category"]}
    # the served candidate's logged exposure matches the page: slot-weighted live share, long-tail share
    chosen = d.candidates[d.chosen]
    w = np.asarray(state.config.position_weights)
    live = sum(w[m["slot"]] for m in d.modules if m["category"] == "live") / w.sum()
    tail = np.mean([it["long_tail"] for m in d.modules for it in m["items"]])
    assert chosen["exposure"] == pytest.approx([live, tail], abs=1e-6)  # logged rounded to 1e-6


class Broken:
    def score(self, user_idx, item_idx):
        raise RuntimeError("ranker backend down")


def test_upstream_failure_serves_the_safe_default_marked_as_such(state):
    from dataclasses import replace

    eng = DecisionEngine(replace(state, scorer=ScorerHandle(Broken())))
    d = eng.decide("u1", RequestIds(b"k").issue())
    assert d.fallback and "ranker backend down" in d.fallback_reason
    assert d.propensity == 1.0
    assert [m["module_id"] for m in d.modules] == list(state.config.module_ids[: state.config.slots])
    assert len({it["item_id"] for m in d.modules for it in m["items"]}) == state.config.items_per_module * state.config.slots


def test_request_ids_are_signed():
    a, b = RequestIds(b"one"), RequestIds(b"two")
    rid = a.issue()
    assert a.issued(rid) and not b.issued(rid)
    assert not a.issued(rid[:-1] + ("0" if rid[-1] != "0" else "1"))
    assert not a.issued("garbage") and not a.issued("")


def test_new_categories_get_their_own_exploration_share(world):
    """With `new = true` on a category and `new_category_share = eta`, at least eta of traffic goes to
    layouts showing it, on top of the budget; the logged propensity stays pmf[chosen]."""
    text = world.default_config_toml().replace('name = "audio"\n', 'name = "audio"\nnew = true\n')
    text = text.replace("budget = 0.05", "budget = 0.05\nnew_category_share = 0.2")
    cfg = parse_config_text(text)
    assert cfg.categories[2].new and cfg.exploration.new_category_share == 0.2
    cat = Catalog(item_ids=np.asarray(world.item_ids, dtype=object),
                  category=np.array([world.categories[c] for c in world.item_category], dtype=object),
                  popularity=np.asarray(world.popularity, dtype=float),
                  features=np.asarray(world.item_features, dtype=float), feature_names=tuple(world.item_feature_names))
    # a price that pushes the greedy layout away from audio, so the share must come from exploration
    eng = DecisionEngine(build_state(cfg, cat, prices=np.array([0.5, 0.3])))
    ids = RequestIds(b"k")
    n, shown, expected = 1500, 0, 0.0
    for k in range(n):
        d = eng.decide(f"u{k % 50:05d}", ids.issue())
        with_audio = np.array(["audio" in c["categories"] for c in d.candidates])
        assert d.propensity == pytest.approx(d.pmf[d.chosen]) and sum(d.pmf) == pytest.approx(1.0)
        if with_audio.any():
            assert float(np.dot(d.pmf, with_audio)) >= 0.2 - 1e-12
        expected += float(np.dot(d.pmf, with_audio))
        shown += any(m["category"] == "audio" for m in d.modules)
    se = np.sqrt(max(expected / n * (1 - expected / n), 1e-9) / n)
    assert abs(shown / n - expected / n) <= 4 * se  # the draws follow the logged pmf
