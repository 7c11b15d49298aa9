"""The re-solving pacer against a simulated stream served as the engine serves it."""

from __future__ import annotations

import numpy as np
import pytest

from allocator import ResolvePacer, ResolvePacerConfig, exploit_pmf, serving_pmf, softmax_response


def _stream(rng: np.random.Generator, n: int, J: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of n requests: a live-like share that costs value, and a tail-like share."""
    v = rng.normal(8, 2, (n, J))
    live = (rng.random((n, J)) < 0.3) * rng.uniform(0.1, 0.4, (n, J))
    v -= 12 * live * rng.uniform(0.5, 1.5, (n, 1))  # most users dislike it
    tail = rng.uniform(0, 0.6, (n, J))
    v -= 3 * tail
    return v, np.stack([live, tail], axis=2)


def _serve(rng: np.random.Generator, v: np.ndarray, a: np.ndarray, prices: np.ndarray, t: float,
           budget: float) -> np.ndarray:
    """Sample each request's layout as the engine does: softmax exploit, uniform exploration budget."""
    q = exploit_pmf(v + a @ prices, v, t)
    pmf = serving_pmf(np.full(v.shape, 1.0 / v.shape[1]), q, budget)
    u = rng.random((v.shape[0], 1))
    return (pmf.cumsum(1) < u).sum(1).clip(max=v.shape[1] - 1)


@pytest.mark.parametrize("budget", [0.0, 0.1])
def test_realised_shares_hold_each_floor_within_1pp_without_overshoot(budget: float) -> None:
    rng = np.random.default_rng(0)
    t = 0.02
    lower, upper = (0.10, 0.25), (np.inf, np.inf)
    pacer = ResolvePacer(ResolvePacerConfig(lower=lower, upper=upper, temperature=t, window=600, half_life=300))
    chosen_all = []
    for _ in range(120):  # 120 batches of 50 decisions
        v, a = _stream(rng, 50)
        j = _serve(rng, v, a, pacer.prices_, t, budget)
        chosen = a[np.arange(50), j]
        chosen_all.append(chosen)
        pacer.update(v, a, np.ones(v.shape, dtype=bool), chosen)
    served = np.concatenate(chosen_all)
    free = np.concatenate([a[np.arange(50), _serve(rng, v, a, np.zeros(2), t, budget)] for v, a in
                           (_stream(rng, 50) for _ in range(40))]).mean(0)
    assert (free < np.array(lower)).all()  # both floors bind in this world
    # the last 3,000 decisions: every floor met within 1 pp; a floor whose price is nonzero (it binds:
    # holding it costs value) not passed by more than 1 pp either; windows of 500 within 2 pp
    last = served[-3000:]
    lo = np.array(lower)
    assert (last.mean(0) >= lo - 0.01).all()
    binding = pacer.prices_ > 0
    assert binding.any()
    assert np.abs(last.mean(0) - lo)[binding].max() < 0.01
    for w in range(0, 3000, 500):
        assert (last[w:w + 500].mean(0) >= lo - 0.02).all()
        assert np.abs(last[w:w + 500].mean(0) - lo)[binding].max() < 0.02


def test_a_cap_and_a_slack_floor() -> None:
    rng = np.random.default_rng(1)
    t = 0.02
    # a cap on the tail-like share below what is served for free; a floor on the live-like one far below it
    pacer = ResolvePacer(ResolvePacerConfig(lower=(0.001, -np.inf), upper=(np.inf, 0.12), temperature=t,
                                            window=600, half_life=300))
    served = []
    for _ in range(100):
        v, a = _stream(rng, 50)
        v = v + 3 * a[:, :, 1] * 2  # now users like the tail: the cap binds
        chosen = a[np.arange(50), _serve(rng, v, a, pacer.prices_, t, 0.05)]
        served.append(chosen)
        pacer.update(v, a, np.ones(v.shape, dtype=bool), chosen)
    last = np.concatenate(served)[-2500:].mean(0)
    assert last[1] == pytest.approx(0.12, abs=0.01)
    assert pacer.prices_[1] < 0 and pacer.prices_[0] == 0.0  # the slack floor costs nothing
    assert abs(pacer.correction_[0]) < 1e-12  # and its integral did not wind up


def test_fallback_decisions_count_as_served_and_bad_config_is_named() -> None:
    pacer = ResolvePacer(ResolvePacerConfig(lower=(0.1,), upper=(np.inf,), temperature=0.02))
    p = pacer.update(np.zeros((3, 2)), np.zeros((3, 2, 1)), np.zeros((3, 2), dtype=bool), np.zeros((3, 1)))
    assert p.tolist() == [0.0] and pacer.shares_.tolist() == [0.0] and pacer.decisions_ == 3
    with pytest.raises(ValueError, match="temperature"):
        ResolvePacerConfig(lower=(0.1,), upper=(np.inf,), temperature=0.0)


def test_slope_is_the_derivative_of_the_served_shares() -> None:
    """``ResolvePacer.slope`` against central finite differences of the softmax shares."""
    from allocator import softmax_response

    rng = np.random.default_rng(4)
    v, a = _stream(rng, 400)
    t = 0.02
    pacer = ResolvePacer(ResolvePacerConfig(lower=(0.10, 0.25), upper=(np.inf, np.inf), temperature=t, window=400),
                         prices=np.array([1.5, 2.0]))
    pacer._keep(v, a, np.ones(v.shape, dtype=bool))
    got = pacer.slope()
    h = 1e-6
    for k in range(2):
        e = np.zeros(2)
        e[k] = h
        up = softmax_response(v, a, pacer.prices_ + e, t)[0][k]
        down = softmax_response(v, a, pacer.prices_ - e, t)[0][k]
        assert got[k] == pytest.approx((up - down) / (2 * h), rel=1e-5)
    assert (got > 0).all()


def test_window_correction_holds_windows_that_independent_draws_miss() -> None:
    """Requests served one at a time at the pacer's prices: with each server steering its last 100
    layouts' shares (``window_correction``, the default gain and limit), far more 250-request windows
    hold the long-tail floor's aim within 1 pp than with independent draws (whose windows are off by
    1.4 pp, one standard deviation, by chance alone), for about the same value."""
    from allocator import softmax_prices, window_correction

    t, n, W = 0.02, 6000, 100
    lower, upper = np.array([0.25]), np.array([np.inf])
    rng = np.random.default_rng(7)
    v, a = _stream(rng, n)
    a = a[..., 1:]  # the tail-like share only
    prices = softmax_prices(v[:2000], a[:2000], lower + 0.005, upper, t)
    pacer = ResolvePacer(ResolvePacerConfig(lower=tuple(lower), upper=tuple(upper), temperature=t, window=2000),
                         prices=prices)
    pacer._keep(v[:2000], a[:2000], np.ones((2000, v.shape[1]), dtype=bool))
    slope = pacer.slope()
    out = {}
    for gain in (0.0, 2.0):
        draw = np.random.default_rng(11)
        recent = np.zeros((0, 1))
        shares, values = np.zeros(n), np.zeros(n)
        for i in range(n):  # one request at a time, as a server sees them
            offset = window_correction(recent.mean(0), lower, upper, prices, slope, gain=gain) \
                if recent.shape[0] >= W // 4 else np.zeros(1)
            q = exploit_pmf(v[i] + a[i] @ (prices + offset), v[i], t)
            j = min(int((q.cumsum() < draw.random()).sum()), q.size - 1)
            shares[i], values[i] = a[i, j, 0], v[i, j]
            recent = np.vstack([recent, a[i, j]])[-W:]
        windows = shares[: n // 250 * 250].reshape(-1, 250).mean(1)
        out[gain] = (np.mean(np.abs(windows - 0.255) <= 0.01), windows.std(), values.mean())
    (held0, sd0, value0), (held1, sd1, value1) = out[0.0], out[2.0]
    assert held1 >= held0 + 0.3 and held1 >= 0.9 and sd1 < 0.6 * sd0, out
    assert abs(value1 - value0) < 0.005 * abs(value0), out


def test_the_exploration_bias_is_aimed_off_at_once() -> None:
    """A large exploration budget pulls every share toward its unconstrained level (the floors bind, so
    below them). Given each decision's bias (the served pmf's expected exposure minus the exploit
    softmax's, known exactly), the re-solve aims off by it: without the integral (``gain`` 0), the
    realised shares stand within 1 pp of the aims, and miss them by the exploration's pull without it.
    (In the live loop the integral had wound the other way during the first requests' overshoot, and
    took minutes to come back.)"""
    from allocator import exploit_pmf, serving_pmf

    t, budget = 0.02, 0.3
    lower, upper = (0.10, 0.25), (np.inf, np.inf)
    aims = np.array(lower) + 0.005
    miss = {}
    for with_bias in (False, True):
        rng = np.random.default_rng(5)
        pacer = ResolvePacer(ResolvePacerConfig(lower=lower, upper=upper, temperature=t, window=600, half_life=300,
                                                gain=0.0))
        chosen_all = []
        for _ in range(60):  # 60 batches of 50 decisions
            v, a = _stream(rng, 50)
            q = exploit_pmf(v + a @ pacer.prices_, v, t)
            pmf = serving_pmf(np.full(v.shape, 1.0 / v.shape[1]), q, budget)
            j = (pmf.cumsum(1) < rng.random((50, 1))).sum(1).clip(max=v.shape[1] - 1)
            chosen = a[np.arange(50), j]
            chosen_all.append(chosen)
            bias = np.einsum("nj,njk->nk", pmf - q, a)  # the served pmf's exposure beyond the softmax's
            pacer.update(v, a, np.ones(v.shape, dtype=bool), chosen, bias=bias if with_bias else None)
        served = np.concatenate(chosen_all)
        miss[with_bias] = np.abs(served[1000:3000].mean(0) - aims).max()
    assert miss[True] < 0.005 and miss[False] > 0.01, miss



def test_one_step_moves_a_price_at_most_its_trust_region() -> None:
    """A re-plan starts a new window. Re-solved on the few dozen sets served under it, a floor those few
    can barely reach took its price to ``max_price`` in one step (the live loop then served pages full
    of live streams until the next plan). One update moves a price at most ``max_step`` times the larger
    of its size and a quarter of the window's median value range per request; inside that region the
    re-solve is the unbounded one."""
    from allocator import softmax_prices

    t = 0.02
    rng = np.random.default_rng(7)
    v_old, a_old = _stream(rng, 600)
    v_new, a_new = _stream(rng, 30)
    a_new[:, :, 0] = np.where(np.arange(10) < 9, 0.0, 0.12)[None, :]  # the new few: one candidate with any live
    v_new[:, 9] -= 40.0  # and it costs a lot
    ones_old, ones_new = np.ones(v_old.shape, dtype=bool), np.ones(v_new.shape, dtype=bool)
    lower, upper = (0.10, 0.25), (np.inf, np.inf)
    got = {}
    aims = np.array(lower) + 0.005, np.array(upper)
    ref = softmax_prices(v_old, a_old, *aims, t, max_price=50.0)
    for step in (np.inf, 1.0):
        p = ResolvePacer(ResolvePacerConfig(lower=lower, upper=upper, temperature=t, window=1000, gain=0.0,
                                            max_step=step, max_price=50.0), prices=ref * 0.9)
        start = p.update(v_old, a_old, ones_old, a_old[:, 0])
        # a step inside the region: the prices are the softmax dual's minimiser
        np.testing.assert_allclose(start, ref, rtol=1e-5)
        p.rebase(start)
        got[step] = p.update(v_new, a_new, ones_new, a_new[:, 0])
    assert got[np.inf][0] == pytest.approx(50.0)  # out of reach of these 30 sets: the price at its cap
    spread = np.median(v_new.max(axis=1) - v_new.min(axis=1))
    reach = max(start[0], 0.25 * spread)
    assert got[1.0][0] == pytest.approx(start[0] + reach, rel=1e-9)  # on the trust region's edge
    with pytest.raises(ValueError, match="max_step"):
        ResolvePacerConfig(lower=(0.1,), upper=(np.inf,), temperature=t, max_step=0.0)


def test_a_box_that_holds_the_minimiser_changes_nothing_and_one_that_does_not_is_met_at_its_edge() -> None:
    from allocator import softmax_prices

    rng = np.random.default_rng(8)
    v, a = _stream(rng, 400)
    t, lo, hi = 0.02, np.array([0.10, 0.25]), np.array([np.inf, 0.5])
    free = softmax_prices(v, a, lo, hi, t)
    assert (free > 0).all()
    inside = softmax_prices(v, a, lo, hi, t, box=(free - 1.0, free + 1.0))
    np.testing.assert_allclose(inside, free, rtol=1e-6)
    cut = softmax_prices(v, a, lo, hi, t, box=(np.zeros(2), free / 2))
    np.testing.assert_allclose(cut, free / 2, rtol=1e-9)  # the dual is convex: the nearest corner
    # a cap's price lies below zero: its box side is the negative one
    v2 = v + 6 * a[:, :, 1]  # the tail liked: the 0.2 cap binds
    capped = softmax_prices(v2, a, np.array([-np.inf, -np.inf]), np.array([np.inf, 0.2]), t)
    assert capped[1] < 0
    half = softmax_prices(v2, a, np.array([-np.inf, -np.inf]), np.array([np.inf, 0.2]), t,
                          box=(np.array([0.0, capped[1] / 2]), np.array([0.0, 0.0])))
    assert half[1] == pytest.approx(capped[1] / 2, rel=1e-9)


def test_a_floor_passed_by_choice_does_not_wind_its_aim_down() -> None:
    """Pages that take a floor's share of their own accord (the share the window's sets give with the
    floor's price at 0 is above it) pass the floor by choice, whatever small price the re-solve leaves:
    the integral does not wind the aim down on that. Where the floor binds, an overshoot still does."""
    t = 0.02
    rng = np.random.default_rng(11)
    for liked, winds in ((True, False), (False, True)):
        pacer = ResolvePacer(ResolvePacerConfig(lower=(0.10,), upper=(np.inf,), temperature=t, window=600,
                                                half_life=300), prices=np.array([0.01]))
        for _ in range(20):
            v, a = _stream(rng, 50)
            a = a[:, :, :1]
            if liked:  # the floor's share is liked: served for free far above the floor
                v = v + 30 * a[:, :, 0]
            chosen = np.full((50, 1), 0.3)  # realised far above the floor either way
            pacer.update(v, a, np.ones(v.shape, dtype=bool), chosen)
            pacer.prices_ = np.maximum(pacer.prices_, 0.01)  # a small price left on it
        if winds:
            assert pacer.correction_[0] < -0.05
        else:
            assert pacer.correction_[0] == 0.0


def test_a_retired_window_is_re_solved_on_until_enough_fresh_sets_have_come() -> None:
    """A recalibration beside the pacer's prices retires its window: the old sets are re-solved on
    beside the new ones until ``min_fresh`` new ones have come, then on the new ones alone. The prices
    equal the softmax dual's minimiser on exactly those sets, computed here from the arrays."""
    from allocator import softmax_prices

    t = 0.02
    rng = np.random.default_rng(11)
    v_old, a_old = _stream(rng, 400)
    v_new, a_new = _stream(rng, 300)
    v_new -= 6.0 * a_new[:, :, 1]  # the new calibration values the tail-like share less
    lower, upper = (0.10, 0.25), (np.inf, np.inf)
    aims = np.array(lower) + 0.005, np.array(upper)
    cfg = ResolvePacerConfig(lower=lower, upper=upper, temperature=t, window=1000, gain=0.0, max_step=np.inf,
                             max_price=50.0, min_fresh=200)
    p = ResolvePacer(cfg, prices=np.array([0.5, 0.5]))

    def feed(v: np.ndarray, a: np.ndarray) -> np.ndarray:
        return p.update(v, a, np.ones(v.shape, dtype=bool), a[:, 0])

    feed(v_old, a_old)
    p.retire()
    got = feed(v_new[:50], a_new[:50])  # 50 new sets: the old ones stay
    assert p._value.shape[0] == 450
    want = softmax_prices(np.concatenate([v_old, v_new[:50]]), np.concatenate([a_old, a_new[:50]]), *aims, t,
                          max_price=50.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got = feed(v_new[50:250], a_new[50:250])  # 250 new sets >= min_fresh: the old ones go
    assert p._value.shape[0] == 250
    want_new = softmax_prices(v_new[:250], a_new[:250], *aims, t, max_price=50.0)
    np.testing.assert_allclose(got, want_new, rtol=1e-5)
    assert abs(want_new[1] - want[1]) > 0.05  # the two windows' prices differ: the test can tell them apart
    # a window that was never retired keeps its sets up to ``window``
    q = ResolvePacer(cfg, prices=np.array([0.5, 0.5]))
    q.update(v_old, a_old, np.ones(v_old.shape, dtype=bool), a_old[:, 0])
    q.update(v_new, a_new, np.ones(v_new.shape, dtype=bool), a_new[:, 0])
    assert q._value.shape[0] == 700
    with pytest.raises(ValueError, match="min_fresh"):
        ResolvePacerConfig(lower=(0.1,), upper=(np.inf,), temperature=t, min_fresh=0)


def _live_tables(seed: int, U: int = 240):
    """A space with a floor of 0.15 on live streams, and block tables of U users for whom live is worth
    little: no layout built at price 0 shows live, and the layouts that do come only at higher prices."""
    from allocator import PaceTables, block_table, long_tail

    from .test_layout import tiny_space

    modules = (("s1", 0), ("s2", 0), ("v1", 1), ("v2", 1), ("l1", 2), ("l2", 2))
    space = tiny_space(slots=4, levels=(0.0,), modules=modules,
                       constraints='[[constraints]]\nname = "live"\nkind = "category_share"\ncategory = "live"\nmin = 0.15\n')
    rng = np.random.default_rng(seed)
    P = 18
    cat = np.repeat(np.arange(3), P // 3)
    is_tail, tail = long_tail(rng.pareto(1.0, P) + 0.01, cat, 0.8)
    scores = rng.random((U, P)) + 0.5
    scores[:, cat == 2] *= rng.uniform(0.05, 0.35, (U, 1))  # live is worth little, to some users less
    tbl = block_table(space, scores, cat, is_tail, tail)
    lead = np.tile(np.array([[1, 0, 2]]), (U, 1))
    return space, PaceTables(tbl.mean_score, tbl.n_tail, tbl.n_shown, lead, np.full(U, -1), np.arange(U))


def test_rebuilt_sets_give_the_price_at_which_serving_with_its_own_sets_meets_the_floor(seed) -> None:
    """With block tables the pacer solves for the price at which the candidates serving builds at that
    price meet the aim (a grid search over the price is the reference), where a re-solve on the sets
    served at an older price (0: none shows live) overshoots: serving at its price with the sets built
    there gives live about 0.25 against an aim of 0.155."""
    space, tables = _live_tables(seed)
    t = 0.05
    aim = 0.15 + 0.005

    def served(p: float) -> float:  # serving's live share with the sets it builds at p
        v, a, ok = tables.candidates(space, np.array([p]))
        return float(softmax_response(v, a, np.array([p]), t, mask=ok)[0][0])

    grid = np.linspace(0.0, 8.0, 801)
    shares = np.array([served(p) for p in grid])
    assert shares[0] < 0.03 and shares[-1] > 0.5
    cross = int(np.argmax(shares >= aim))  # the reference: the first grid price that meets the aim
    v0, a0, ok0 = tables.candidates(space, np.zeros(1))
    cfg = ResolvePacerConfig(lower=(0.15,), upper=(np.inf,), temperature=t, gain=0.0, max_step=1.0, max_price=50.0)
    got = {}
    for rebuilt in (False, True):
        pacer = ResolvePacer(cfg, prices=np.array([2.0]), space=space)  # a trust region of [0, 4]
        got[rebuilt] = float(pacer.update(v0, a0, ok0, a0[:, 0], tables=tables if rebuilt else None)[0])
    assert abs(served(got[True]) - aim) <= 0.01, (got, served(got[True]), aim)
    assert grid[max(cross - 40, 0)] <= got[True] <= grid[min(cross + 40, grid.size - 1)]  # within 0.4 of it
    assert abs(served(got[False]) - aim) > 0.05  # the old sets' model: far off



def test_on_rebuilt_sets_the_aims_are_not_wound_by_shares_served_at_older_prices() -> None:
    """Once the pacer solves on the sets serving builds at its prices, a share far from its aim is
    serving at prices not yet moved there, not a model error: the integral does not wind on it, and a
    correction wound before (on served sets) fades by half every ``half_life`` decisions (closed form).
    Re-solving on served sets, the same batches wind the aim down."""
    space, tables = _live_tables(0)
    v0, a0, ok0 = tables.candidates(space, np.zeros(1))
    cfg = ResolvePacerConfig(lower=(0.15,), upper=(np.inf,), temperature=0.05, gain=0.25, half_life=300.0,
                             max_step=1.0, max_price=50.0)
    n = 60
    for rebuilt in (True, False):
        pacer = ResolvePacer(cfg, prices=np.array([2.0]), space=space)
        pacer.update(v0, a0, ok0, np.full((240, 1), 0.155), tables=tables if rebuilt else None)
        assert pacer.solved_on_ == ("rebuilt" if rebuilt else "served")
        pacer.correction_ = np.array([-0.07])  # wound before
        for _ in range(5):  # batches served far above the floor at a price the pacer keeps > 0
            pacer.prices_ = np.maximum(pacer.prices_, 0.5)
            before = pacer.correction_.copy()
            pacer.update(v0[:n], a0[:n], ok0[:n], np.full((n, 1), 0.40))
            if rebuilt:
                np.testing.assert_allclose(pacer.correction_, before * 2.0 ** (-n / 300.0), rtol=1e-12)
        if not rebuilt:
            assert pacer.correction_[0] < -0.07  # wound further down


def test_tables_without_leads_rebuild_the_candidates_led_by_their_own_best_categories(seed) -> None:
    """A decision whose scorer gave no category preferences logs no lead: its rebuilt candidates are
    those build_candidates makes with its default leads, also where the config has fewer than four
    categories (leads padded to four with -1 are cut to one per category)."""
    from allocator import PaceTables, block_table, build_candidates

    from .test_layout import random_pool, tiny_space

    space = tiny_space()  # three categories
    rng = np.random.default_rng(seed)
    cat, is_tail, tail = random_pool(rng, P=15)
    tbl = block_table(space, rng.random((6, 15)) * 3, cat, is_tail, tail)
    prices = rng.normal(size=3)
    want = build_candidates(space, tbl, prices)
    for width in (3, 4):
        got = PaceTables(tbl.mean_score, tbl.n_tail, tbl.n_shown, np.full((6, width), -1), np.full(6, -1),
                         np.arange(6)).candidates(space, prices)
        np.testing.assert_array_equal(got[0], want.value)
        np.testing.assert_array_equal(got[1], want.exposure)
