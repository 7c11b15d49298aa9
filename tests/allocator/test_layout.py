"""Layouts: long tail, block contents, candidate value/exposure, greedy vs brute force, tilt."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from allocator import (
    ConfigError,
    LayoutSpace,
    block_table,
    build_candidates,
    layout_items,
    long_tail,
    parse_config_text,
    showable,
)

from .test_config import EXAMPLE


def tiny_space(slots=3, K=2, levels=(0.0, 0.5), modules=(("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 2)),
               constraints: bool | str = True) -> LayoutSpace:
    """Three categories (songs, videos, live: worth 1, 1.5 and 2 per engagement); ``constraints``: the
    default three (a live floor, a long-tail floor, a module cap), none, or the given TOML."""
    cats = ["songs", "videos", "live"]
    text = f"""
[homepage]
slots = {slots}
position_weights = {[1.0 - 0.2 * i for i in range(slots)]}
items_per_module = {K}
""" + "".join(f'[[categories]]\nname = "{c}"\nvalue_per_engagement = {1.0 + 0.5 * i}\n' for i, c in enumerate(cats)) \
        + "".join(f'[[modules]]\nid = "{m}"\ncategory = "{cats[c]}"\n' for m, c in modules) + """
[events]
play = 1.0
full_play = 2.0
favorite = 4.0
share = 5.0
skip = -0.5
[tilt]
levels = """ + str(list(levels)) + "\nhead_share = 0.8\n"
    if isinstance(constraints, str):
        text += constraints
    elif constraints:
        text += """
[[constraints]]
name = "live"
kind = "category_share"
category = "live"
min = 0.2
[[constraints]]
name = "tail"
kind = "long_tail_share"
min = 0.3
[[constraints]]
name = "cap_a"
kind = "module_share"
module = "a"
max = 0.5
"""
    return LayoutSpace.from_config(parse_config_text(text))


def slow_long_tail(pop, cat, head_share):
    is_tail = np.zeros(pop.size, bool)
    tail = np.zeros(pop.size)
    for c in np.unique(cat):
        idx = [i for i in range(pop.size) if cat[i] == c]
        idx.sort(key=lambda i: (-pop[i], i))
        total, acc = sum(pop[i] for i in idx), 0.0
        for r, i in enumerate(idx):
            is_tail[i] = r > 0 and acc >= head_share * total - 1e-12 * max(total, 1.0)
            acc += pop[i]
        tails = [i for i in idx if is_tail[i]]
        for j, i in enumerate(tails):
            tail[i] = 0.5 + 0.5 * j / max(len(tails) - 1, 1)
    return is_tail, tail


def test_long_tail_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = 200
    pop = np.round(rng.pareto(1.1, n) * 10, 1)
    cat = rng.integers(0, 4, n)
    is_tail, tail = long_tail(pop, cat, 0.8)
    ref_t, ref_s = slow_long_tail(pop, cat, 0.8)
    np.testing.assert_array_equal(is_tail, ref_t)
    np.testing.assert_allclose(tail, ref_s)
    # the head takes at least 80 % of each category's popularity, and dropping its last item breaks that
    for c in range(4):
        m = cat == c
        assert pop[m & ~is_tail].sum() >= 0.8 * pop[m].sum() - 1e-9


def test_long_tail_rejects_bad_input():
    with pytest.raises(ValueError, match=r"head_share must be in \(0, 1\]; got 0"):
        long_tail(np.ones(3), np.zeros(3, int), 0.0)
    with pytest.raises(ValueError, match="popularity must be finite and >= 0"):
        long_tail(np.array([1.0, -1.0]), np.zeros(2, int), 0.8)


def random_pool(rng, P=14, C=3):
    cat = np.repeat(np.arange(C), P // C + 1)[:P]
    rng.shuffle(cat)
    pop = rng.pareto(1.0, P) + 0.01
    is_tail, tail = long_tail(pop, cat, 0.8)
    return cat, is_tail, tail


def slow_blocks(scores, cat, is_tail, tail, c, K, beta):
    """The blocks of category c at tilt beta, dealt one by one in plain Python: each block takes
    round(beta*K) of the best remaining tail items and fills up with the best remaining head items (a
    group that runs out leaves its positions to the other); beta = 0 deals by score alone."""
    in_c = [i for i in range(scores.size) if cat[i] == c]
    q = min(K, int(np.floor(beta * K + 0.5)))
    if q == 0:
        ranked = sorted(in_c, key=lambda i: (-scores[i], i))
        return [ranked[r:r + K] for r in range(0, len(ranked), K)]
    heads = sorted((i for i in in_c if not is_tail[i]), key=lambda i: (-scores[i], i))
    tails = sorted((i for i in in_c if is_tail[i]), key=lambda i: (-scores[i], -tail[i], i))
    blocks = []
    while heads or tails:
        take_t = min(q, len(tails))
        take_h = min(K - take_t, len(heads))
        take_t = min(K - take_h, len(tails))
        blocks.append(tails[:take_t] + heads[:take_h])
        tails, heads = tails[take_t:], heads[take_h:]
    return blocks


def slow_layout(space, scores, cat, is_tail, tail, cats, beta_idx):
    """Items and value of one layout, in plain Python: :func:`slow_blocks` picks each block's items,
    shown best first by score; the value weighs each item by the examination weight of the position
    it is shown at."""
    K, beta = space.items_per_module, space.tilt_levels[beta_idx]
    w = space.item_weights if space.item_weights is not None else np.ones(K)
    used = {}
    items, value = [], 0.0
    for s, c in enumerate(cats):
        r = used.get(c, 0)
        used[c] = r + 1
        dealt = slow_blocks(scores, cat, is_tail, tail, c, K, beta)
        block = sorted(dealt[r], key=lambda i: (-scores[i], i)) if r < len(dealt) else []
        items.append(block)
        if block:
            value += (space.position_weights[s] * np.average(scores[block], weights=w[:len(block)])
                      * space.category_value[c])
    return items, value


@pytest.mark.parametrize("ties", [False, True])
def test_candidates_value_exposure_and_items_match_slow_reference(seed, ties):
    rng = np.random.default_rng(seed)
    space = tiny_space()
    cat, is_tail, tail = random_pool(rng)
    scores = rng.random((2, cat.size)) * 3
    if ties:  # equal scores: pool order decides, inside a block and between tail items of equal tail score
        scores = np.round(scores)
    tbl = block_table(space, scores, cat, is_tail, tail)
    prices = rng.normal(size=3)
    cand = build_candidates(space, tbl, prices)
    wn = space.position_weights / space.position_weights.sum()
    for u in range(2):
        for c in np.flatnonzero(cand.mask[u]):
            cats = cand.categories[u, c]
            items, value = slow_layout(space, scores[u], cat, is_tail, tail, cats.tolist(), cand.tilt[u, c])
            assert cand.value[u, c] == pytest.approx(value)
            got = layout_items(space, tbl, u, cats, cand.blocks[u, c], int(cand.tilt[u, c]))
            assert [g.tolist() for g in got] == items
            shown = np.concatenate(items).astype(int)
            assert cand.exposure[u, c, 0] == pytest.approx(wn[cats == 2].sum())
            assert cand.exposure[u, c, 1] == pytest.approx(is_tail[shown].mean())
            mods = cand.modules[u, c]
            assert cand.exposure[u, c, 2] == pytest.approx(wn[mods == 0].sum())
            # module of the r-th occurrence of a category is that category's r-th module in config order
            for s in range(space.n_slots):
                assert mods[s] == space.modules_of[cats[s]][cand.blocks[u, c, s]]


@pytest.mark.parametrize("ties", [False, True])
def test_one_user_table_equals_the_batched_rows_and_the_slow_reference(seed, ties):
    # a request decides for one user: block_table takes a 1-d path for U = 1, which must give the
    # batched path's row exactly (ties included), and candidates the slow reference's items and values
    rng = np.random.default_rng(seed)
    space = tiny_space(levels=(0.0, 0.5, 1.0))
    cat, is_tail, tail = random_pool(rng)
    scores = rng.random((3, cat.size)) * 3
    if ties:
        scores = np.round(scores)
    rank = scores + np.round(rng.normal(size=scores.shape)) if seed % 2 else None
    batched = block_table(space, scores, cat, is_tail, tail, rank_scores=rank)
    for u in range(3):
        one = block_table(space, scores[u:u + 1], cat, is_tail, tail,
                          rank_scores=None if rank is None else rank[u:u + 1])
        for f in ("mean_score", "n_tail", "n_shown", "order", "rank", "cat_sorted"):
            got, want = getattr(one, f), getattr(batched, f)[u:u + 1]
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), f
        if rank is not None:
            continue
        cand = build_candidates(space, one, rng.normal(size=3))
        for c in np.flatnonzero(cand.mask[0]):
            cats = cand.categories[0, c]
            items, value = slow_layout(space, scores[u], cat, is_tail, tail, cats.tolist(), cand.tilt[0, c])
            assert cand.value[0, c] == pytest.approx(value)
            got_items = layout_items(space, one, 0, cats, cand.blocks[0, c], int(cand.tilt[0, c]))
            assert [g.tolist() for g in got_items] == items


def all_layouts(space, n_items_per_cat):
    C = space.category_value.size
    K = space.items_per_module
    for cats in itertools.product(range(C), repeat=space.n_slots):
        counts = np.bincount(cats, minlength=C)
        if (counts <= space.n_blocks).all() and (counts * K <= n_items_per_cat + K - 1).all():
            yield list(cats)


def test_unpriced_greedy_at_zero_tilt_is_the_brute_force_best(seed):
    rng = np.random.default_rng(seed)
    space = tiny_space(levels=(0.0,), constraints=False)
    cat, is_tail, tail = random_pool(rng, P=15)
    scores = rng.random((1, cat.size)) * 3
    tbl = block_table(space, scores, cat, is_tail, tail)
    cand = build_candidates(space, tbl)
    n_per_cat = np.bincount(cat, minlength=3)
    best = max(slow_layout(space, scores[0], cat, is_tail, tail, c, 0)[1] for c in all_layouts(space, n_per_cat))
    assert cand.value[0, 1] == pytest.approx(best)  # variant 1 = unpriced greedy
    assert cand.value[0][cand.mask[0]].max() == pytest.approx(best)


def test_priced_greedy_moves_toward_the_priced_exposure(seed):
    rng = np.random.default_rng(seed)
    space = tiny_space()
    cat, is_tail, tail = random_pool(rng)
    scores = rng.random((1, cat.size))
    tbl = block_table(space, scores, cat, is_tail, tail)
    lo = build_candidates(space, tbl, np.zeros(3))
    hi = build_candidates(space, tbl, np.array([100.0, 0.0, 0.0]))
    assert hi.exposure[0, 0, 0] >= lo.exposure[0, 0, 0]
    assert hi.exposure[0, 0, 0] == pytest.approx(hi.exposure[0][hi.mask[0], 0].max())


def test_tilt_is_a_tail_quota_per_module(seed):
    """At level beta > 0 the first module of a category shows min(round(beta*K), #tail) tail items, topped
    up from the other group when one runs out (closed form), so its tail count never falls as beta
    rises; its items are the best of each group, shown best first."""
    rng = np.random.default_rng(seed)
    levels = tuple(float(x) for x in np.linspace(0, 1, 7))
    K = 4
    space = tiny_space(K=K, levels=levels, constraints=False)
    cat, is_tail, tail = random_pool(rng, P=30)
    scores = rng.random((3, cat.size))
    tbl = block_table(space, scores, cat, is_tail, tail)
    for c in range(3):
        n_t = int((is_tail & (cat == c)).sum())
        n_h = int((~is_tail & (cat == c)).sum())
        for b, beta in enumerate(levels[1:], start=1):
            q = min(K, int(np.floor(beta * K + 0.5)))
            t = min(q, n_t)
            h = min(K - t, n_h)
            t = min(K - h, n_t)
            np.testing.assert_array_equal(tbl.n_tail[:, b, c, 0], t)
            np.testing.assert_array_equal(tbl.n_shown[:, b, c, 0], t + h)
    n_tail0 = tbl.n_tail[:, 1:, :, 0]
    assert (np.diff(n_tail0, axis=1) >= 0).all()
    assert n_tail0[:, -1].sum() > tbl.n_tail[:, 0, :, 0].sum()  # and it does move toward the tail
    for u in range(3):
        for b in range(len(levels)):
            for c in range(3):
                got = layout_items(space, tbl, u, np.array([c]), np.array([0]), b)[0]
                assert (np.diff(scores[u, got]) <= 0).all()  # best first inside the module


def test_tilt_levels_are_shares_of_a_module():
    with pytest.raises(ConfigError, match=r"tilt.levels.*must be a list of 1 to 16 numbers in \[0, 1\]"):
        tiny_space(levels=(0.0, 1.5))


def test_candidates_are_distinct_and_bounded():
    rng = np.random.default_rng(0)
    space = LayoutSpace.from_config(parse_config_text(EXAMPLE))
    P = 400
    cat = rng.integers(0, 4, P)
    pop = rng.pareto(1.0, P)
    is_tail, tail = long_tail(pop, cat, 0.8)
    tbl = block_table(space, rng.random((5, P)), cat, is_tail, tail)
    cand = build_candidates(space, tbl, np.array([0.3, 0.2]), max_candidates=32)
    assert cand.n_cand <= 32
    for u in range(5):
        keys = {(tuple(c), t) for c, t, m in zip(cand.categories[u], cand.tilt[u], cand.mask[u], strict=True) if m}
        assert len(keys) == cand.mask[u].sum() >= 8


def test_prices_shape_is_checked():
    space = tiny_space()
    cat, is_tail, tail = random_pool(np.random.default_rng(0))
    tbl = block_table(space, np.ones((1, cat.size)), cat, is_tail, tail)
    with pytest.raises(ValueError, match=r"prices must have shape \(3,\)"):
        build_candidates(space, tbl, np.zeros(2))


def test_rank_scores_order_the_blocks_and_scores_value_them(seed):
    rng = np.random.default_rng(seed)
    space = tiny_space()
    cat, is_tail, tail = random_pool(rng)
    rank = rng.random((2, cat.size)) * 3
    value = rank * np.where(is_tail, 0.1, 1.0) - 0.5 * is_tail  # tail valued far lower: would reorder
    got = block_table(space, value, cat, is_tail, tail, rank_scores=rank)
    by_rank = block_table(space, rank, cat, is_tail, tail)
    np.testing.assert_array_equal(got.order, by_rank.order)  # the same items in the same blocks
    np.testing.assert_array_equal(got.n_tail, by_rank.n_tail)
    # each block's mean is the mean of the value scores of the items the rank put there (slow reference)
    for u in range(2):
        for b in range(space.tilt_levels.size):
            for c in range(space.category_value.size):
                items, _ = slow_layout(space, rank[u], cat, is_tail, tail, [c] * int(space.n_blocks[c]), b)
                for r, block in enumerate(items):
                    if block:
                        w = space.item_weights[:len(block)]
                        assert got.mean_score[u, b, c, r] == pytest.approx(np.average(value[u][block], weights=w))
    with pytest.raises(ValueError, match="rank_scores"):
        block_table(space, value, cat, is_tail, tail, rank_scores=rank[:1])


def test_the_explore_variant_leads_with_its_category_and_survives_the_cut(seed):
    """``explore`` adds one variant per user led by that category: its first slot shows it, the rest is
    the priced greedy fill after it (the same as a lead variant of that category), and it is kept when
    the candidates are cut to ``max_candidates`` (here to 2 of 8: greedy and the explore variant)."""
    rng = np.random.default_rng(seed)
    space = tiny_space(levels=(0.0,))
    cat, is_tail, tail = random_pool(rng, P=15)
    scores = rng.random((2, cat.size))
    scores[:, cat == 2] *= 0.01  # live is worth nothing: no greedy layout leads with it
    tbl = block_table(space, scores, cat, is_tail, tail)
    prices = np.zeros(3)
    plain = build_candidates(space, tbl, prices, lead_categories=np.zeros((2, 1), dtype=np.int64))
    assert not (plain.categories[:, :, 0][plain.mask] == 2).any()
    got = build_candidates(space, tbl, prices, lead_categories=np.zeros((2, 1), dtype=np.int64),
                           explore=np.array([2, -1]))
    led = build_candidates(space, tbl, prices, lead_categories=np.array([[0, 2], [0, 0]]))
    last = got.categories.shape[1] - 1  # one tilt level: the explore variant is the last one
    assert got.mask[0, last] and got.categories[0, last, 0] == 2
    np.testing.assert_array_equal(got.categories[0, last], led.categories[0, -1])
    assert got.value[0, last] == pytest.approx(led.value[0, -1])
    assert not got.mask[1, last]  # -1 leads nothing: a repeat of the greedy layout
    cut = build_candidates(space, tbl, prices, lead_categories=np.zeros((2, 1), dtype=np.int64),
                           explore=np.array([2, 2]), max_candidates=2)
    assert cut.categories.shape[1] == 2
    for u in range(2):
        shown = cut.categories[u][cut.mask[u]]
        assert (shown[:, 0] == 2).any(), shown
    with pytest.raises(ValueError, match="explore must have shape"):
        build_candidates(space, tbl, prices, explore=np.array([5, 0]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_the_showable_sub_pool_gives_the_full_pools_blocks(seed, ties):
    # the request path builds its block table on `showable`'s sub-pool: the blocks it can show must hold
    # the items the slow dealer puts there from the whole pool, and the table the whole pool's statistics
    rng = np.random.default_rng(seed)
    space = tiny_space(levels=(0.0, 0.5, 1.0))
    cat, is_tail, tail = random_pool(rng, P=60)
    scores = rng.random(cat.size) * 3
    if ties:
        scores = np.round(scores * 2) / 2
    sub = showable(space, scores, cat, is_tail)
    need = int(space.n_blocks.max()) * space.items_per_module
    for g in range(2 * space.category_value.size):  # at least the best `need` of each group, ties kept
        members = np.flatnonzero(cat * 2 + is_tail == g)
        kept = np.intersect1d(members, sub)
        assert kept.size >= min(need, members.size)
        if kept.size < members.size:
            assert scores[kept].min() >= np.sort(scores[members])[::-1][need - 1]
    assert sub.size < cat.size  # the pool is larger than what it can show, so something is left out
    full = block_table(space, scores[None], cat, is_tail, tail)
    part = block_table(space, scores[sub][None], cat[sub], is_tail[sub], tail[sub])
    for f in ("mean_score", "n_tail", "n_shown"):
        np.testing.assert_array_equal(getattr(part, f), getattr(full, f))
    for b, beta in enumerate(space.tilt_levels):
        for c in range(space.category_value.size):
            want = slow_blocks(scores, cat, is_tail, tail, c, space.items_per_module, beta)
            for r in range(int(space.n_blocks[c])):
                got = sub[layout_items(space, part, 0, np.array([c]), np.array([r]), b)[0]]
                expect = want[r] if r < len(want) else []
                assert sorted(got.tolist()) == sorted(expect)
                assert got.tolist() == layout_items(space, full, 0, np.array([c]), np.array([r]), b)[0].tolist()


_TABLE_FIELDS = ("mean_score", "n_tail", "n_shown", "order", "rank", "cat_sorted")
_CAND_FIELDS = ("categories", "blocks", "modules", "tilt", "value", "exposure", "mask")


def _request_case(seed, P):
    """A request's pool on the example config's space or a tiny one: scores with ties (a tenth's
    grid), rank scores of their own, unequal item weights in a module on odd seeds."""
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        space = LayoutSpace.from_config(parse_config_text(EXAMPLE))
    else:
        space = tiny_space(slots=4, K=3, levels=(0.0, 0.34, 0.67, 1.0))
    if seed % 2:
        space = dataclasses.replace(space, item_weights=np.linspace(1.0, 0.4, space.items_per_module))
    C = space.category_value.size
    cat = rng.integers(0, C, P)
    is_tail = rng.random(P) < 0.4
    tail = np.round(rng.random(P), 1)
    scores = np.round(rng.random(P) * 3, 1)
    rank = scores + np.round(rng.normal(size=P), 1) if seed % 4 else scores
    return rng, space, scores, rank, cat, is_tail, tail


@pytest.mark.parametrize("seed", range(24))
def test_the_compiled_request_table_and_candidates_equal_numpys(seed):
    # one request takes compiled kernels (allocator._kernels) for its block table and candidates: they
    # must equal the numpy steps (a batch of two users, whose rows are the same request) bit for bit,
    # ties, item weights, prices, leads, an explored category and the cut to max_candidates included
    from allocator import _layout

    rng, space, scores, rank, cat, is_tail, tail = _request_case(seed, P=(120, 7, 240)[seed % 3])
    one = block_table(space, scores[None], cat, is_tail, tail, rank_scores=rank[None])
    numpy_one = _layout._block_table_one(space, scores, rank, cat, is_tail, tail)
    pair = block_table(space, np.stack([scores, scores]), cat, is_tail, tail, rank_scores=np.stack([rank, rank]))
    for f in _TABLE_FIELDS:
        got = getattr(one, f)
        for want in (getattr(numpy_one, f), getattr(pair, f)[:1]):
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), f
    C = space.category_value.size
    prices = rng.normal(size=space.n_constraints) * (seed % 5 != 0)
    lead = rng.permutation(C)[None, : min(C, 3)] if seed % 2 else None
    explore = np.array([int(rng.integers(-1, C))]) if seed % 3 != 1 else None
    cut = 32 if seed % 4 else 5
    got = build_candidates(space, one, prices, lead, cut, explore)
    want = build_candidates(space, pair, prices, None if lead is None else np.repeat(lead, 2, axis=0), cut,
                            None if explore is None else np.repeat(explore, 2))
    for f in _CAND_FIELDS:
        g, w = getattr(got, f), getattr(want, f)[:1]
        assert g.dtype == w.dtype and np.array_equal(g, w), f
    assert got.mask[0].any() or cat.size < 10


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_request_with_non_finite_scores_gets_numpys_table(bad):
    # the compiled table is for finite sort keys; a score of nan or inf takes the numpy steps, whose
    # order numpy's sorts define: the request's table is still the batched row
    _, space, scores, rank, cat, is_tail, tail = _request_case(3, P=40)
    rank = rank.copy()
    rank[[2, 9]] = float(bad)
    one = block_table(space, scores[None], cat, is_tail, tail, rank_scores=rank[None])
    pair = block_table(space, np.stack([scores, scores]), cat, is_tail, tail, rank_scores=np.stack([rank, rank]))
    for f in _TABLE_FIELDS:
        assert np.array_equal(getattr(one, f), getattr(pair, f)[:1], equal_nan=True), f


@pytest.mark.parametrize("seed", range(12))
def test_the_compiled_showable_sub_pool_equals_numpys(seed):
    from allocator import _layout

    _, space, _, rank, cat, is_tail, _ = _request_case(seed, P=(240, 30, 600)[seed % 3])
    need = int(space.n_blocks.max()) * space.items_per_module
    got = showable(space, rank, cat, is_tail)
    want = _layout._showable_numpy(rank, cat, is_tail, need, 2 * space.category_value.size)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    if seed % 3 != 1:
        assert got.size < cat.size  # something was left out, so the thresholds were exercised


def test_out_of_range_leads_and_mismatched_pools_are_refused():
    # the one-request kernels index without bounds checks: what would index out of range is refused first
    _, space, scores, rank, cat, is_tail, tail = _request_case(3, P=40)
    tbl = block_table(space, scores[None], cat, is_tail, tail, rank_scores=rank[None])
    C = space.category_value.size
    for bad in (np.array([[C]]), np.array([[-2]]), np.array([0, 1])):
        with pytest.raises(ValueError, match="lead_categories must have shape"):
            build_candidates(space, tbl, None, bad)
    with pytest.raises(ValueError):  # numpy's own shape error: the kernel is not reached
        showable(space, rank, cat[:-1], is_tail)
