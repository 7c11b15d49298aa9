"""The block tables a share of decisions log (``[loop] pace_sample``), from which the pacer rebuilds
the candidates serving would build at the prices it tries."""

from __future__ import annotations

import numpy as np

from allocator import LayoutSpace, PaceTables, parse_config_text
from policy_api.engine import DecisionEngine, build_state
from simulator import make_world
from tests.test_common import world_catalog


def _engine_state(sample: float):
    world = make_world(n_users=60, n_items=600, seed=5)
    cfg = parse_config_text(world.default_config_toml() + f"\n[loop]\npace_sample = {sample}\n")
    return build_state(cfg, world_catalog(world), prices=np.array([0.4, 0.3]))


def _tables(decisions) -> PaceTables:
    rows = [(i, d.context["pace"]) for i, d in enumerate(decisions) if "pace" in d.context]
    B, C, R = rows[0][1]["shape"]
    return PaceTables(np.array([t["mean"] for _, t in rows]).reshape(-1, B, C, R),
                      np.array([t["tail"] for _, t in rows]).reshape(-1, B, C, R),
                      np.array([t["shown"] for _, t in rows]).reshape(-1, B, C, R),
                      np.array([t["lead"] if t["lead"] is not None else [-1] * 4 for _, t in rows]),
                      np.array([t["explore"] for _, t in rows]), np.array([i for i, _ in rows]))


def test_a_share_of_decisions_log_the_table_their_candidates_are_rebuilt_from_exactly():
    st = _engine_state(0.25)
    engine = DecisionEngine(st)
    decisions = [engine.decide(f"u{k % 13}", f"rq{k}") for k in range(400)]
    tables = _tables(decisions)
    # the sample is drawn by request id: 25 % of 400 within a 4-sigma binomial bound
    assert abs(len(tables) - 100) <= 4 * np.sqrt(400 * 0.25 * 0.75)
    space = LayoutSpace.from_config(st.config)
    assert st.space.tail_goal  # every real candidate is exploitable: the mask is the logged candidates'
    value, exposure, ok = tables.candidates(space, st.prices)
    for row, i in enumerate(tables.at.tolist()):
        logged = decisions[i].candidates
        real = np.flatnonzero(ok[row])  # the rebuilt real candidates, in the order serving logs them
        assert real.size == len(logged)
        np.testing.assert_allclose(value[row, real], [c["value"] for c in logged], atol=2e-6)
        np.testing.assert_allclose(exposure[row, real], [c["exposure"] for c in logged], atol=2e-6)


def test_no_sample_or_no_constraint_logs_no_table():
    engine = DecisionEngine(_engine_state(0.0))
    assert not any("pace" in engine.decide(f"u{k}", f"rq{k}").context for k in range(50))
    world = make_world(n_users=60, n_items=600, seed=5)
    text = world.default_config_toml().split("[[constraints]]")[0] + "\n[loop]\npace_sample = 1.0\n"
    cfg = parse_config_text(text)
    assert not cfg.constraints
    engine = DecisionEngine(build_state(cfg, world_catalog(world)))
    assert not any("pace" in engine.decide(f"u{k}", f"rq{k}").context for k in range(20))
