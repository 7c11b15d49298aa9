"""Each serving engine steers its own last ``[loop] serve_window`` layouts' shares toward the pacer's aims
(``allocator.window_correction``), from the exposure of what it served."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from allocator import parse_config_text, window_correction
from policy_api.engine import DecisionEngine, build_state
from simulator import make_world
from tests.test_common import world_catalog


@pytest.fixture(scope="module")
def state():
    world = make_world(n_users=50, n_items=600, seed=3)
    cfg = parse_config_text(world.default_config_toml() + "\n[loop]\nserve_window = 40\n")
    cat = world_catalog(world)
    return build_state(cfg, cat, prices=np.array([0.3, 0.2]))


def test_each_decision_prices_the_miss_of_the_engines_own_recent_layouts(state):
    st = replace(state, price_slope=np.array([0.05, 0.08]))
    engine = DecisionEngine(st)
    lo, hi = st.config.bounds()
    served = []
    offsets = 0
    for k in range(120):
        d = engine.decide(f"u{k % 9}", f"rq{k}")
        assert d.fallback_reason is None
        # the reference: the exposure of the layouts this engine served last (from its decisions)
        window = served[-40:]
        if len(window) >= 10:
            want = window_correction(np.mean(window, axis=0), lo, hi, st.prices, st.price_slope,
                                     margin=st.config.loop.pace_margin, gain=st.config.loop.serve_gain)
            got = d.context.get("price_offset", [0.0] * want.size)
            np.testing.assert_allclose(got, np.round(want, 6), atol=1e-6)
            offsets += bool(np.any(want != 0))
        else:
            assert "price_offset" not in d.context
        served.append(d.candidates[d.chosen]["exposure"])
    assert offsets > 50  # the floors bind (prices > 0): every full window moves the next price


def test_no_slope_or_no_gain_serves_at_the_plans_prices(state):
    for st in (state, replace(state, price_slope=np.array([0.05, 0.08]),
                              config=replace(state.config, loop=replace(state.config.loop, serve_gain=0.0)))):
        engine = DecisionEngine(st)
        for k in range(60):
            assert "price_offset" not in engine.decide(f"u{k % 5}", f"rq{k}").context
