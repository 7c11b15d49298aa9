"""rankers._fast: the numpy serving path against the torch model (random and trained weights, the
training snapshot and live sequences), and the live-sequence merge against a slow reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rankers import RankerScorer, TrainConfig, build_examples, build_model, fit, split_by_time

WEIGHTS = {"play": 1.0, "full_play": 2.0, "favorite": 4.0, "share": 5.0, "skip": -0.5}
TINY = dict(embed_dim=8, cin_layers=(4, 4), expert_dim=8, tower_dim=4, batch_size=256)
N_CAT = 4


def category_log(rng: np.random.Generator, n_users: int = 300, n_items: int = 64, n_decisions: int = 1500,
                 k: int = 8):
    """Each user likes one category: plays its items (full play for half of them), skips the rest.
    Many users with few visits each, so the behaviour sequence carries the taste."""
    taste = rng.integers(0, N_CAT, n_users)
    item_category = np.arange(n_items) % N_CAT
    feats = rng.normal(size=(n_items, 2))
    dec = np.repeat(np.arange(n_decisions), k)
    user = np.repeat(rng.integers(0, n_users, n_decisions), k)
    item = np.concatenate([rng.choice(n_items, k, replace=False) for _ in range(n_decisions)])
    ts = np.repeat(np.arange(n_decisions) * 100.0, k)
    play = taste[user] == item_category[item]
    full = play & (feats[item, 0] > 0)
    rows, types = [], []
    for code, mask in ((0, play), (1, full), (4, ~play)):
        idx = np.flatnonzero(mask)
        rows.append(idx)
        types.append(np.full(idx.shape, code))
    r, t = np.concatenate(rows), np.concatenate(types)
    imp = {"decision": dec, "user": user, "item": item, "ts": ts}
    ev = {"decision": dec[r], "user": user[r], "item": item[r], "ts": ts[r] + 10.0, "type": t}
    ex = build_examples(imp, ev, n_users=n_users, n_items=n_items, item_category=item_category,
                        item_features=feats, seq_len=6)
    return split_by_time(ex)


@pytest.fixture(scope="module")
def trained():
    tr, va, _ = category_log(np.random.default_rng(0), n_decisions=800)
    model, _ = fit(tr, va, TrainConfig(**TINY, max_epochs=6, patience=2, lr=1e-2))
    return tr, model


#: interaction blocks: CIN with one, two and three layers (the fast path treats the first and the last
#: layer specially), the DCN-v2 cross layers, none
BLOCKS = {"cin": {"interaction": "cin"}, "cin1": {"interaction": "cin", "cin_layers": (4,)},
          "cin3": {"interaction": "cin", "cin_layers": (4, 3, 5)}, "cross": {"interaction": "cross"},
          "none": {"interaction": "none"}}


def random_model(tr, block: str, seed: int):
    """An untrained model with every weight and reference logit moved well away from its init."""
    model = build_model(tr, TrainConfig(**{**TINY, **BLOCKS[block]}, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.item_ref.normal_(generator=g)
        model.user_ref.normal_(generator=g)
    return model.eval()


def float64_reference(model, tr, debias: bool) -> RankerScorer:
    """The same model in float64 torch: the reference the fast path must equal to 1e-6."""
    return RankerScorer(copy.deepcopy(model).double(), WEIGHTS, tr.history, debias=debias)


def live_sequences(rng: np.random.Generator, n_items: int):
    pos = rng.choice(n_items, 4, replace=False)
    return pos, rng.integers(0, 4, 4), rng.choice(n_items, 3, replace=False)


@pytest.mark.parametrize("interaction", list(BLOCKS))
@pytest.mark.parametrize("debias", [True, False])
def test_fast_path_equals_torch_on_random_weights(seed, interaction, debias):
    tr, _, _ = category_log(np.random.default_rng(seed), n_decisions=300)
    model = random_model(tr, interaction, seed)
    scorer = RankerScorer(model, WEIGHTS, tr.history, debias=debias)
    ref64 = float64_reference(model, tr, debias)
    rng = np.random.default_rng(seed)
    items = rng.permutation(tr.n_items)  # categories interleaved: the fast path regroups them
    fast = scorer.fast()
    for user in (0, 7, -1):
        for live in (None, live_sequences(rng, tr.n_items)):
            seq = scorer.sequences(user) if live is None else scorer.sequences(user, *live, live_counts=(4, 3))
            side = scorer.user_side(user, seq)
            want, want_prefs = ref64.score_sequences(user, items, seq)
            np.testing.assert_allclose(fast.score(side, items), want, rtol=0, atol=1e-6)
            np.testing.assert_allclose(fast.category_preferences(side), want_prefs, rtol=0, atol=1e-6)
            # and the float32 model as served before, to its own rounding
            got32, _ = scorer.score_sequences(user, items, seq)
            np.testing.assert_allclose(fast.score(side, items), got32, rtol=1e-4, atol=1e-4)
        # without live events the fast path is the scorer's own score
        want, _ = ref64.score_sequences(user, items, ref64.sequences(user))
        np.testing.assert_allclose(fast.score(scorer.user_side(user), items), want, rtol=0, atol=1e-6)
    assert fast.score(scorer.user_side(0), np.zeros(0, dtype=np.int64)).shape == (0,)


def test_fast_path_equals_torch_on_trained_weights(trained):
    tr, model = trained
    for debias in (True, False):
        scorer = RankerScorer(model, WEIGHTS, tr.history, debias=debias)
        items = np.arange(tr.n_items)[::-1].copy()
        rng = np.random.default_rng(1)
        for user in range(-1, tr.n_users, 37):
            np.testing.assert_allclose(scorer.fast().score(scorer.user_side(user), items), scorer.score(user, items),
                                       rtol=0, atol=1e-6)
            np.testing.assert_allclose(scorer.fast().category_preferences(scorer.user_side(user)),
                                       scorer.category_preferences(user), rtol=0, atol=1e-6)
            seq = scorer.sequences(user, *live_sequences(rng, tr.n_items))
            want, _ = scorer.score_sequences(user, items, seq)
            np.testing.assert_allclose(scorer.fast().score(scorer.user_side(user, seq), items), want, rtol=0, atol=1e-6)


def slow_merge(live, live_t, snap, snap_t, L):
    items, types = [], []
    for i, t in zip(live, live_t, strict=True):
        items.append(int(i))
        types.append(int(t))
    for i, t in zip(snap, snap_t, strict=True):
        if i >= 0 and int(i) not in set(int(x) for x in live):
            items.append(int(i))
            types.append(int(t))
    items, types = items[:L], types[:L]
    return items + [-1] * (L - len(items)), types + [-1] * (L - len(types))


def test_live_sequences_go_ahead_of_the_snapshot(seed):
    tr, _, _ = category_log(np.random.default_rng(seed), n_decisions=300)
    scorer = RankerScorer(build_model(tr, TrainConfig(**TINY)), WEIGHTS, tr.history)
    rng = np.random.default_rng(seed)
    L = tr.history.seq_len
    users = np.flatnonzero(tr.history.pos_items[:, 2] >= 0)[:5].tolist() + [-1]
    for user in users:
        snap_pos = tr.history.pos_items[user] if user >= 0 else np.full(L, -1)
        snap_types = tr.history.pos_types[user] if user >= 0 else np.full(L, -1)
        snap_neg = tr.history.neg_items[user] if user >= 0 else np.full(L, -1)
        live = np.concatenate([snap_pos[1:2], rng.choice(tr.n_items, 2, replace=False)])  # one repeats the snapshot
        live = live[live >= 0]
        live_t = rng.integers(0, 4, live.size)
        neg = rng.choice(tr.n_items, 2, replace=False)
        seq = scorer.sequences(user, live, live_t, neg, live_counts=(3, 2))
        want_i, want_t = slow_merge(live, live_t, snap_pos, snap_types, L)
        assert seq.pos_items.tolist() == want_i and seq.pos_types.tolist() == want_t
        assert seq.neg_items.tolist() == slow_merge(neg, neg, snap_neg, snap_neg, L)[0]
        counts = (tr.history.pos_count[user], tr.history.neg_count[user]) if user >= 0 else (0, 0)
        np.testing.assert_allclose(seq.activity, np.log1p([counts[0] + 3, counts[1] + 2]))
    with pytest.raises(ValueError, match=r"live item rows must be in \[0, 64\)"):
        scorer.sequences(0, np.array([64]), np.array([0]))
    with pytest.raises(ValueError, match=r"live_pos_types must have one code per live item \(2\)"):
        scorer.sequences(0, np.array([1, 2]), np.array([0]))
    with pytest.raises(ValueError, match=r"user_idx must be in \[-1, 300\)"):
        scorer.sequences(300)


def test_unknown_user_is_scored_from_live_events(trained):
    """A user the model never saw, whose live plays are all in one category, gets that category's items
    scored above the cold-start user's, exactly as a direct model call with those sequences."""
    tr, model = trained
    scorer = RankerScorer(model, WEIGHTS, tr.history)
    items = np.arange(tr.n_items)
    cat = tr.item_category
    cold = scorer.score(-1, items)
    for c in range(N_CAT):
        plays = np.flatnonzero(cat == c)[:4]
        skips = np.flatnonzero(cat == (c + 1) % N_CAT)[:2]
        seq = scorer.sequences(-1, plays, np.zeros(4, dtype=np.int64), skips)
        got = scorer.fast().score(scorer.user_side(-1, seq), items)
        want, _ = scorer.score_sequences(-1, items, seq)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        lift = got - cold
        assert lift[cat == c].mean() > lift[cat != c].mean() + 0.05, (c, lift[cat == c].mean(), lift[cat != c].mean())
        # the category's items move up the user's ranking
        top = np.argsort(-got, kind="stable")[:8]
        top_cold = np.argsort(-cold, kind="stable")[:8]
        assert (cat[top] == c).sum() > (cat[top_cold] == c).sum() or (cat[top] == c).all()
