"""rankers/: data builder, blocks, training, scorers and metrics, each against an independent reference
(slow loops, brute-force pair counting, closed forms, the simulator's ground truth)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankers import (
    CGC,
    CIN,
    TASKS,
    CrossNet,
    ItemOnlyBranch,
    PopularityScorer,
    RankerScorer,
    TargetAttention,
    TrainConfig,
    UserOnlyBranch,
    auc,
    behaviour_grade,
    build_examples,
    build_model,
    category_hit_rate,
    ece,
    evaluate,
    fit,
    gauc,
    ground_truth_ndcg,
    item_priors,
    logloss,
    ndcg_at_k,
    popularity_rank,
    predict,
    report_table,
    split_by_time,
    task_bce,
    task_log_probs,
    task_weights_from_events,
    torch_threads,
)
from rankers._train import _pairwise_loss, _Tensors

WEIGHTS = {"play": 1.0, "full_play": 2.0, "favorite": 4.0, "share": 5.0, "skip": -0.5}
TINY = dict(embed_dim=8, cin_layers=(4, 4), expert_dim=8, tower_dim=4, batch_size=256)


# ---------------------------------------------------------------------------------------------------
# synthetic logs


def random_log(
    rng: np.random.Generator, n_users: int = 12, n_items: int = 15, n_imp: int = 120, n_ev: int = 150
):
    """A messy log: integer timestamps with many ties, unknown users, events without impressions."""
    imp = {
        "decision": rng.integers(0, 40, n_imp),
        "user": rng.integers(-1, n_users, n_imp),
        "item": rng.integers(0, n_items, n_imp),
        "ts": rng.integers(0, 30, n_imp).astype(float),
    }
    ev = {
        "decision": rng.integers(0, 40, n_ev),
        "user": rng.integers(-1, n_users, n_ev),
        "item": rng.integers(0, n_items, n_ev),
        "ts": rng.integers(0, 30, n_ev).astype(float),
        "type": rng.integers(0, 5, n_ev),
    }
    cat = {
        "n_users": n_users,
        "n_items": n_items,
        "item_category": rng.integers(0, 3, n_items),
        "item_features": rng.normal(size=(n_items, 2)),
    }
    return imp, ev, cat


def group_log(
    rng: np.random.Generator, n_users: int = 40, n_items: int = 48, n_decisions: int = 500, k: int = 8
):
    """Users and items each in one of two groups; a user plays exactly the items of their group.
    full_play / collect add item-level rules, skip = not played. Deterministic labels."""
    ug = rng.integers(0, 2, n_users)
    ig = np.arange(n_items) % 2
    item_category = (np.arange(n_items) // 2) % 4
    feats = rng.normal(size=(n_items, 2))
    dec = np.repeat(np.arange(n_decisions), k)
    user = np.repeat(rng.integers(0, n_users, n_decisions), k)
    item = np.concatenate([rng.choice(n_items, k, replace=False) for _ in range(n_decisions)])
    ts = np.repeat(np.arange(n_decisions) * 100.0, k)
    play = ug[user] == ig[item]
    full = play & (feats[item, 0] > 0)
    collect = play & (item % 3 == 0)
    rows, types = [], []
    for code, mask in ((0, play), (1, full), (2, collect), (4, ~play)):
        idx = np.flatnonzero(mask)
        rows.append(idx)
        types.append(np.full(idx.shape, code))
    r, t = np.concatenate(rows), np.concatenate(types)
    imp = {"decision": dec, "user": user, "item": item, "ts": ts}
    ev = {"decision": dec[r], "user": user[r], "item": item[r], "ts": ts[r] + 10.0, "type": t}
    cat = {"n_users": n_users, "n_items": n_items, "item_category": item_category, "item_features": feats}
    return imp, ev, cat


def world_log(world, n_requests: int, rng: np.random.Generator, popularity_bias: float = 1.0):
    """Impressions and events from the simulator under a popularity-biased exposure policy."""
    from simulator import exposure_log

    return exposure_log(world, n_requests, rng, popularity_bias)


# ---------------------------------------------------------------------------------------------------
# data builder


def reference_examples(imp, ev, n_items, seq_len):
    """Slow loops: labels per impression and sequences strictly before its time."""
    n, m = len(imp["item"]), len(ev["item"])
    labels = np.zeros((n, 4))
    pos_items = np.full((n, seq_len), -1)
    pos_types = np.full((n, seq_len), -1)
    neg_items = np.full((n, seq_len), -1)
    pos_count = np.zeros(n, dtype=int)
    neg_count = np.zeros(n, dtype=int)
    for r in range(n):
        seen = {
            int(ev["type"][j])
            for j in range(m)
            if ev["decision"][j] == imp["decision"][r] and ev["item"][j] == imp["item"][r]
        }
        labels[r] = [bool(seen & {0, 1, 2, 3}), 1 in seen, bool(seen & {2, 3}), 4 in seen]
        u = imp["user"][r]
        if u < 0:
            continue
        before = [j for j in range(m) if ev["user"][j] == u and ev["ts"][j] < imp["ts"][r]]
        before.sort(key=lambda j: (ev["ts"][j], j))
        pos = [j for j in before if ev["type"][j] != 4][::-1]
        neg = [j for j in before if ev["type"][j] == 4][::-1]
        pos_count[r], neg_count[r] = len(pos), len(neg)
        for q, j in enumerate(pos[:seq_len]):
            pos_items[r, q], pos_types[r, q] = ev["item"][j], ev["type"][j]
        for q, j in enumerate(neg[:seq_len]):
            neg_items[r, q] = ev["item"][j]
    return labels, pos_items, pos_types, neg_items, pos_count, neg_count


def test_build_examples_matches_slow_reference_and_never_leaks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        imp, ev, cat = random_log(rng)
        ex = build_examples(imp, ev, **cat, seq_len=4)
        labels, pi, pt, ni, pc, nc = reference_examples(imp, ev, cat["n_items"], 4)
        np.testing.assert_array_equal(ex.labels, labels)
        np.testing.assert_array_equal(ex.seq.pos_items, pi)
        np.testing.assert_array_equal(ex.seq.pos_types, pt)
        np.testing.assert_array_equal(ex.seq.neg_items, ni)
        np.testing.assert_array_equal(ex.seq.pos_count, pc)
        np.testing.assert_array_equal(ex.seq.neg_count, nc)
        # the no-leak property stated directly: every sequence entry is an event of the same user
        # strictly before the impression
        for r in np.flatnonzero(ex.seq.pos_count > 0):
            ok = [
                any(
                    ev["user"][j] == ex.user[r] and ev["item"][j] == it and ev["ts"][j] < ex.ts[r]
                    for j in range(len(ev["item"]))
                )
                for it in ex.seq.pos_items[r][ex.seq.pos_items[r] >= 0]
            ]
            assert all(ok)


def test_history_snapshot_is_the_sequence_after_the_last_event(seed):
    rng = np.random.default_rng(seed)
    imp, ev, cat = random_log(rng)
    ex = build_examples(imp, ev, **cat, seq_len=5)
    probe = {
        "decision": np.full(cat["n_users"], 10**6),
        "user": np.arange(cat["n_users"]),
        "item": np.zeros(cat["n_users"], dtype=int),
        "ts": np.full(cat["n_users"], 1e9),
    }
    _, pi, pt, ni, pc, nc = reference_examples(probe, ev, cat["n_items"], 5)
    h = ex.history
    np.testing.assert_array_equal(h.pos_items, pi)
    np.testing.assert_array_equal(h.pos_types, pt)
    np.testing.assert_array_equal(h.neg_items, ni)
    np.testing.assert_array_equal(h.pos_count, pc)
    np.testing.assert_array_equal(h.neg_count, nc)


def test_split_by_time_orders_keeps_decisions_and_priors_use_train_only(seed):
    rng = np.random.default_rng(seed)
    imp, ev, cat = random_log(rng, n_imp=300)
    ex = build_examples(imp, ev, **cat)
    tr, va, te = split_by_time(ex, valid=0.2, test=0.2, prior_strength=5.0)
    assert len(tr) + len(va) + len(te) == len(ex)
    assert tr.ts.max() <= va.ts.min() and va.ts.max() <= te.ts.min()
    parts = [set(tr.decision.tolist()), set(va.decision.tolist()), set(te.decision.tolist())]
    # a decision may straddle only where its rows have different timestamps (time order wins)
    for a in range(3):
        for b in range(a + 1, 3):
            for d in parts[a] & parts[b]:
                assert len(set(ex.ts[ex.decision == d].tolist())) > 1
    # priors: brute force from the train rows only
    m = (tr.labels.astype(float).sum(0) + 0.5) / (len(tr) + 1.0)
    expect = np.zeros((cat["n_items"], 5))
    for i in range(cat["n_items"]):
        rows = tr.item == i
        rate = (tr.labels[rows].sum(0) + 5.0 * m) / (rows.sum() + 5.0)
        expect[i, :4] = np.log(rate / (1 - rate))
        expect[i, 4] = math.log1p(rows.sum())
    np.testing.assert_allclose(tr.item_priors, expect, rtol=1e-12)
    assert va.item_priors is tr.item_priors and te.item_priors is tr.item_priors


def test_behaviour_grade_orders_collect_full_play_play_none_skip():
    labels = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(behaviour_grade(labels), [4, 3, 2, 1, 0, 2])


def test_build_examples_errors_name_the_parameter():
    rng = np.random.default_rng(0)
    imp, ev, cat = random_log(rng)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 1"):
        build_examples(imp, ev, **cat, seq_len=0)
    with pytest.raises(ValueError, match=r"impressions must have key 'ts'"):
        build_examples({k: v for k, v in imp.items() if k != "ts"}, ev, **cat)
    bad = dict(ev, type=np.full(len(ev["item"]), 7))
    with pytest.raises(ValueError, match=r"events\['type'\] must be in \[0, 5\); got 7"):
        build_examples(imp, bad, **cat)
    bad = dict(imp, item=np.full(len(imp["item"]), cat["n_items"]))
    with pytest.raises(ValueError, match=r"impressions\['item'\] must be in \[0, 15\)"):
        build_examples(bad, ev, **cat)
    with pytest.raises(ValueError, match=r"item_features must have shape \(15, n_features\)"):
        build_examples(imp, ev, **dict(cat, item_features=np.zeros((3, 2))))
    ex = build_examples(imp, ev, **cat)
    with pytest.raises(ValueError, match=r"valid \+ test must be < 1"):
        split_by_time(ex, valid=0.5, test=0.5)
    with pytest.raises(ValueError, match=r"prior_strength must be > 0"):
        item_priors(ex, prior_strength=0.0)


# ---------------------------------------------------------------------------------------------------
# metrics against brute force


def brute_auc(y, s):
    pos, neg = s[y > 0.5], s[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def brute_ndcg(rel, s, g, k, linear=False):
    vals = []
    for grp in np.unique(g):
        idx = np.flatnonzero(g == grp)
        if len(idx) < 2:
            continue
        gain = rel[idx] if linear else 2.0 ** rel[idx] - 1

        def dcg(order, gain=gain):
            return sum(gain[o] / math.log2(r + 2) for r, o in enumerate(order[:k]))

        order = sorted(range(len(idx)), key=lambda j: (-s[idx][j], j))
        ideal = sorted(range(len(idx)), key=lambda j: (-rel[idx][j], j))
        if dcg(ideal) > 0:
            vals.append(dcg(order) / dcg(ideal))
    return float(np.mean(vals))


def test_auc_gauc_match_pair_counting(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = (rng.random(n) < 0.3).astype(float)
    s = np.round(rng.normal(size=n) + y, 1)  # rounding makes ties
    g = rng.integers(0, 12, n)
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    num = den = 0.0
    for grp in np.unique(g):
        m = g == grp
        a = brute_auc(y[m], s[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
    assert gauc(y, s, g) == pytest.approx(num / den, abs=1e-12)
    assert math.isnan(auc(np.ones(5), np.arange(5.0)))


def test_ndcg_matches_slow_loop(seed):
    rng = np.random.default_rng(seed)
    n = 200
    rel = rng.integers(0, 4, n).astype(float)
    s = np.round(rng.normal(size=n), 1)
    g = rng.integers(0, 15, n)
    assert ndcg_at_k(rel, s, g, 5) == pytest.approx(brute_ndcg(rel, s, g, 5), abs=1e-12)
    assert ndcg_at_k(rel, s, g, 3, gains="linear") == pytest.approx(brute_ndcg(rel, s, g, 3, True), abs=1e-12)
    assert ndcg_at_k(rel, rel, g, 5) == pytest.approx(1.0)


def test_ece_logloss_hit_rate_match_loops(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(500)
    y = (rng.random(500) < p**2).astype(float)
    bins = 10
    total = 0.0
    for b in range(bins):
        m = (p >= b / bins) & (p < (b + 1) / bins) if b < bins - 1 else p >= b / bins
        if m.any():
            total += m.sum() / len(p) * abs(y[m].mean() - p[m].mean())
    assert ece(y, p, n_bins=bins) == pytest.approx(total, abs=1e-12)
    assert logloss(y, p) == pytest.approx(
        -np.mean([math.log(q) if t else math.log(1 - q) for t, q in zip(y, p, strict=True)])
    )
    pref = rng.random((50, 4))
    target = rng.integers(0, 4, 50)
    hits = [t in np.argsort(-row)[:2] for row, t in zip(pref, target, strict=True)]
    assert category_hit_rate(pref, target, 2) == pytest.approx(np.mean(hits))


def test_ground_truth_ndcg_is_one_for_the_truth_and_matches_loop(seed):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(5, 30))
    noisy = true + rng.normal(size=true.shape)
    users = np.arange(5)
    cand = np.tile(np.arange(30), (5, 1))

    def truth_fn(u, i):
        return true[u, i]

    assert ground_truth_ndcg(truth_fn, truth_fn, users, cand, k=10) == pytest.approx(1.0)
    got = ground_truth_ndcg(lambda u, i: noisy[u, i], truth_fn, users, cand, k=10)
    rank = np.argsort(np.argsort(-true, axis=1), axis=1)
    rel = np.maximum(10 - rank, 0).astype(float)
    assert got == pytest.approx(brute_ndcg(rel.ravel(), noisy.ravel(), np.repeat(users, 30), 10, True))


# ---------------------------------------------------------------------------------------------------
# blocks: formulas, shapes, gradient flow


def assert_all_grads_nonzero(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_target_attention_matches_masked_softmax_loop():
    torch.manual_seed(0)
    att = TargetAttention(4)
    q = torch.randn(3, 4)
    keys = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = att(q, keys, mask)
    assert out.shape == (3, 4)
    for b in range(3):
        idx = torch.flatnonzero(mask[b]) if hasattr(torch, "flatnonzero") else mask[b].nonzero().squeeze(1)
        if len(idx) == 0:
            assert torch.equal(out[b], torch.zeros(4))
            continue
        k = att.k(keys[b, idx])
        s = (att.q(q[b]) * k).sum(-1) / 2.0
        w = torch.softmax(s, 0)
        torch.testing.assert_close(out[b], (w[:, None] * att.v(keys[b, idx])).sum(0))
    # one user's sequence broadcast over candidates equals the repeated sequence
    torch.testing.assert_close(
        att(q, keys[:1], mask[:1]), att(q, keys[:1].expand(3, -1, -1), mask[:1].expand(3, -1))
    )
    out.sum().backward()
    assert_all_grads_nonzero(att)


def test_cin_matches_paper_formula():
    torch.manual_seed(1)
    cin = CIN(3, (2, 4))
    x0 = torch.randn(2, 3, 5)
    out = cin(x0, x0.flatten(1))
    assert out.shape == (2, 6)
    xk, pooled = x0, []
    for w in cin.weights:
        h_prev = xk.shape[1]
        nxt = torch.zeros(2, w.shape[0], 5)
        for h in range(w.shape[0]):
            for i in range(h_prev):
                for j in range(3):
                    nxt[:, h] += w[h, i * 3 + j] * xk[:, i] * x0[:, j]
        xk = nxt
        pooled.append(xk.sum(-1))
    torch.testing.assert_close(out, torch.cat(pooled, 1))
    out.sum().backward()
    assert_all_grads_nonzero(cin)


def test_cross_net_matches_dcn_v2_formula():
    torch.manual_seed(2)
    net = CrossNet(6, 2)
    x0 = torch.randn(4, 6)
    x = x0
    for lin in net.layers:
        x = x0 * (x @ lin.weight.T + lin.bias) + x
    out = net(x0.view(4, 2, 3), x0)
    torch.testing.assert_close(out, x)
    (out**2).sum().backward()
    assert_all_grads_nonzero(net)


def test_cgc_matches_slow_reference():
    torch.manual_seed(3)
    cgc = CGC(in_dim=5, n_tasks=3, n_shared=2, n_specific=2, expert_dim=4, tower_dim=3)
    x = torch.randn(6, 5)
    out = cgc(x)
    assert out.shape == (6, 3)
    experts = torch.relu(cgc.experts(x)).view(6, -1, 4)  # shared experts first, then per task
    gates = cgc.gates(x).view(6, 3, 4)
    for t in range(3):
        own = [2 + t * 2, 2 + t * 2 + 1]
        g = torch.softmax(gates[:, t], dim=1)
        mixed = sum(g[:, e, None] * experts[:, ex] for e, ex in enumerate(own + [0, 1]))
        hidden = torch.relu(mixed @ cgc.tower_hidden[t] + cgc.tower_bias[t])
        torch.testing.assert_close(out[:, t], hidden @ cgc.tower_out[t] + cgc.out_bias[t])
    out.sum().backward()
    assert_all_grads_nonzero(cgc)


def test_debias_branches_formulas_and_gradients():
    torch.manual_seed(4)
    item = ItemOnlyBranch(n_pop=2, n_categories=3, n_tasks=4, hidden=5)
    pop, cat = torch.randn(7, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    out = item(pop, cat)
    torch.testing.assert_close(out, item.out(torch.relu(item.hidden(pop))) + item.category_bias.weight[cat])
    user = UserOnlyBranch(n_users=3, n_tasks=4)
    uidx, act = torch.tensor([0, 1, 2, 3]), torch.rand(4, 2)
    out_u = user(uidx, act)
    torch.testing.assert_close(
        out_u, user.bias.weight[uidx] + act @ user.activity.weight.T + user.activity.bias
    )
    (out.sum() + out_u.sum()).backward()
    assert_all_grads_nonzero(item)
    assert_all_grads_nonzero(user)


def tiny_examples(seed: int = 0):
    rng = np.random.default_rng(seed)
    imp, ev, cat = group_log(rng)
    imp["user"][::17] = -1  # some unknown users
    ex = build_examples(imp, ev, **cat, seq_len=6)
    return split_by_time(ex)


@pytest.mark.parametrize("interaction", ["cin", "cross"])
def test_every_parameter_of_the_ranker_gets_a_gradient(interaction):
    tr, va, te = tiny_examples()
    config = TrainConfig(**TINY, interaction=interaction, category_weight=1.0, pairwise_weight=1.0)
    model = build_model(tr, config)
    data = _Tensors(tr)
    order = np.argsort(tr.decision, kind="stable")[:400]
    idx = torch.from_numpy(order)
    batch = data.batch(idx)
    assert set(tr.category[order].tolist()) == {0, 1, 2, 3} and (tr.user[order] < 0).any()
    out = model(batch)
    b = len(order)
    assert out.main.shape == out.item.shape == out.user.shape == (b, 4)
    assert out.category.shape == (b, 4)
    y = data.labels[idx]
    z = out.main + out.item + out.user
    played = y[:, 0] > 0.5
    loss = (
        task_bce(z, y)
        + task_bce(out.item, y)
        + task_bce(out.user, y)
        + F.cross_entropy(out.category[played], data.category[idx][played])
        + _pairwise_loss(torch.sigmoid(z).sum(1), data.grade[idx], data.decision[idx])
    )
    loss.backward()
    assert_all_grads_nonzero(model)


def test_per_category_dispatch_equals_each_category_ranker_alone():
    tr, _, _ = tiny_examples()
    model = build_model(tr, TrainConfig(**TINY)).eval()
    data = _Tensors(tr)
    idx = torch.arange(24)
    with torch.no_grad():
        out = model(data.batch(idx))
        for r in range(24):
            one = model(data.batch(idx[r : r + 1]))
            torch.testing.assert_close(out.main[r], one.main[0], rtol=1e-5, atol=1e-6)
            c = int(tr.category[r])
            assert model.rankers[c] is not model.rankers[(c + 1) % 4]


def esmm_reference(h):
    """Task probabilities from head logits in plain numpy: play, play x full|play, play x collect|play,
    (1 - play) x skip|no play."""
    s = 1 / (1 + np.exp(-h))
    return np.stack([s[:, 0], s[:, 0] * s[:, 1], s[:, 0] * s[:, 2], (1 - s[:, 0]) * s[:, 3]], axis=1)


def test_task_composition_and_bce_match_numpy(seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(0, 3, size=(50, 4))
    y = (rng.random((50, 4)) < 0.3).astype(float)
    logp, log1mp = task_log_probs(torch.tensor(h))
    p = esmm_reference(h)
    np.testing.assert_allclose(np.exp(logp.numpy()), p, rtol=1e-10)
    np.testing.assert_allclose(np.exp(log1mp.numpy()), 1 - p, rtol=1e-6)
    expect = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert float(task_bce(torch.tensor(h), torch.tensor(y))) == pytest.approx(expect, rel=1e-6)
    # the behaviour order holds by construction: full_play, collect <= play; play + skip <= 1
    assert (p[:, 1] <= p[:, 0]).all() and (p[:, 2] <= p[:, 0]).all() and (p[:, 0] + p[:, 3] <= 1).all()


def test_pairwise_loss_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    dec = np.sort(rng.integers(0, 6, 30))
    grade = rng.integers(0, 5, 30)
    units = rng.normal(size=30)
    total, n = 0.0, 0
    for i in range(30):
        for j in range(30):
            if dec[i] == dec[j] and grade[i] > grade[j]:
                total += math.log1p(math.exp(-(units[i] - units[j])))
                n += 1
    got = _pairwise_loss(torch.tensor(units), torch.tensor(grade), torch.tensor(dec))
    assert float(got) == pytest.approx(total / n, rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# training, scoring, save/load


@pytest.fixture(scope="module")
def trained():
    tr, va, te = tiny_examples()
    model, history = fit(tr, va, TrainConfig(**TINY, max_epochs=30, patience=3, lr=1e-2))
    return tr, va, te, model, history


def test_tiny_dataset_is_learned_to_near_perfect_auc(trained):
    tr, va, te, model, history = trained
    p = predict(model, te, debias=False)
    for t, task in enumerate(TASKS):
        assert auc(te.labels[:, t], p[:, t]) > 0.95, task
    # early stopping kept the best epoch
    assert history.best_valid_logloss == pytest.approx(min(history.valid_logloss))
    pv = predict(model, va, debias=False)
    assert logloss(va.labels.ravel(), pv.ravel()) == pytest.approx(history.best_valid_logloss, rel=1e-4)


def test_fit_is_quiet_and_restores_thread_count(capsys):
    tr, va, _ = tiny_examples(1)
    before = torch.get_num_threads()
    calls = []
    fit(
        tr,
        va,
        TrainConfig(**TINY, max_epochs=2, threads=1),
        progress=lambda e, n, m: calls.append((e, n, dict(m))),
    )
    assert torch.get_num_threads() == before
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert [c[0] for c in calls] == [1, 2] and all(c[1] == 2 for c in calls)
    assert all(set(c[2]) == {"train_loss", "valid_logloss"} for c in calls)


def test_scorer_units_are_task_probabilities_times_event_weights(trained):
    tr, _, _, model, _ = trained
    scorer = RankerScorer(model, WEIGHTS, tr.history)
    items = np.arange(tr.n_items)
    for user in (0, 5, -1):
        p = scorer.probabilities(user, items)
        w = np.array([1.0, 2.0, 4.5, -0.5])
        np.testing.assert_allclose(scorer.score(user, items), p @ w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            scorer.score_pairs(np.full(len(items), user), items), p @ w, rtol=1e-5, atol=1e-6
        )
        prefs = scorer.category_preferences(user)
        assert prefs.shape == (4,) and prefs.sum() == pytest.approx(1.0) and (prefs > 0).all()
        assert scorer.top_categories(user, 2).tolist() == np.argsort(-prefs, kind="stable")[:2].tolist()
    custom = RankerScorer(model, {"play": 1, "full_play": 0, "collect": 10, "skip": 0}, tr.history)
    p = custom.probabilities(3, items)
    np.testing.assert_allclose(custom.score(3, items), p[:, 0] + 10 * p[:, 2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(task_weights_from_events(WEIGHTS), [1.0, 2.0, 4.5, -0.5])
    with pytest.raises(ValueError, match=r"item_idx must be in \[0, 48\)"):
        scorer.score(0, np.array([48]))
    with pytest.raises(ValueError, match=r"user_idx must be in \[-1, 40\)"):
        scorer.score(40, items)
    with pytest.raises(ValueError, match=r"event_weights must have key 'skip'"):
        RankerScorer(model, {"play": 1, "full_play": 2, "collect": 3}, tr.history)


def test_scorer_uses_the_stored_history(trained):
    tr, _, _, model, _ = trained
    scorer = RankerScorer(model, WEIGHTS, tr.history)
    # same as predicting an example row whose behaviour equals the snapshot
    user = int(np.flatnonzero(tr.history.pos_count > 3)[0])
    rows = np.flatnonzero(tr.user == user)
    last = tr.subset(rows[-1:])
    snap = tr.history.take(np.array([user]))
    seq = type(last.seq)(snap.pos_items, snap.pos_types, snap.neg_items, snap.pos_count, snap.neg_count)
    from dataclasses import replace

    probe = replace(last, seq=seq)
    np.testing.assert_allclose(scorer.probabilities(user, last.item), predict(model, probe), rtol=1e-5)


def test_save_load_round_trip_gives_identical_scores(trained):
    tr, _, _, model, _ = trained
    for debias in (True, False):
        scorer = RankerScorer(model, WEIGHTS, tr.history, debias=debias)
        again = RankerScorer.load(scorer.save())
        items = np.arange(tr.n_items)
        for user in (0, 7, -1):
            np.testing.assert_array_equal(scorer.score(user, items), again.score(user, items))
            np.testing.assert_array_equal(scorer.category_preferences(user), again.category_preferences(user))
        assert again.debias is debias
    with pytest.raises(ValueError, match=r"data must be a saved RankerScorer"):
        import io

        buf = io.BytesIO()
        torch.save({"format": "something else"}, buf)
        RankerScorer.load(buf.getvalue())


def test_debias_switch_only_moves_branch_terms(trained):
    tr, _, te, model, _ = trained
    factual, debiased = predict(model, te, debias=False), predict(model, te, debias=True)
    data = _Tensors(te)
    with torch.no_grad():
        out = model(data.batch(torch.arange(len(te))))
        np.testing.assert_allclose(
            factual, esmm_reference((out.main + out.item + out.user).double().numpy()), rtol=1e-5
        )
        np.testing.assert_allclose(
            debiased, esmm_reference((out.main + model.item_ref + model.user_ref).double().numpy()), rtol=1e-5
        )
        # the references are the branch means over the training rows
        tr_out = model(_Tensors(tr).batch(torch.arange(len(tr))))
        torch.testing.assert_close(model.item_ref, tr_out.item.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.user_ref, tr_out.user.mean(0), rtol=1e-4, atol=1e-5)


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"interaction must be one of \('cin', 'cross', 'none'\); got 'fm'"):
        TrainConfig(interaction="fm")
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1; got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"user_dropout must be in \[0, 1\)"):
        TrainConfig(user_dropout=1.0)
    with pytest.raises(ValueError, match=r"event_weights must have 'collect' or both 'favorite' and 'share'"):
        TrainConfig(event_weights={"play": 1, "full_play": 2, "skip": -1})
    with pytest.raises(ValueError, match=r"threads must be an int >= 1; got 0"):
        with torch_threads(0):
            pass


# ---------------------------------------------------------------------------------------------------
# popularity baseline


def test_popularity_scorer_units_follow_popularity_and_round_trip(seed):
    rng = np.random.default_rng(seed)
    pop = rng.zipf(1.5, 200).astype(float)
    cat = rng.integers(0, 4, 200)
    s = PopularityScorer(pop, cat, mean_units=0.7)
    units = s.score(3, np.arange(200))
    # order = popularity order (ties equal), mean = mean_units up to the 1/n of the rank scale
    for i, j in zip(rng.integers(0, 200, 300), rng.integers(0, 200, 300), strict=True):
        assert (units[i] > units[j]) == (pop[i] > pop[j]) and (units[i] == units[j]) == (pop[i] == pop[j])
    assert units.mean() == pytest.approx(0.7 * (1 + 1 / 200))
    assert units.max() <= 2 * 0.7 + 1e-12
    q = np.array([(np.sum(pop < p) + (np.sum(pop == p) + 1) / 2) / 200 for p in pop])
    np.testing.assert_allclose(popularity_rank(pop), q)
    np.testing.assert_allclose(s.category_preferences(0), np.bincount(cat, pop, 4) / pop.sum())
    again = PopularityScorer.load(s.save())
    np.testing.assert_array_equal(again.score(0, np.arange(200)), units)
    with pytest.raises(ValueError, match=r"popularity must be finite and >= 0"):
        PopularityScorer(-pop, cat)
    with pytest.raises(ValueError, match=r"item_idx must be in \[0, 200\)"):
        s.score(0, np.array([200]))


def test_popularity_scorer_from_examples_fits_mean_units():
    tr, _, _ = tiny_examples()
    s = PopularityScorer.from_examples(tr, event_weights=WEIGHTS)
    w = np.array([1.0, 2.0, 4.5, -0.5])
    assert s.mean_units == pytest.approx((tr.labels @ w).mean())
    np.testing.assert_array_equal(s.popularity, np.bincount(tr.item, minlength=tr.n_items))


# ---------------------------------------------------------------------------------------------------
# evaluation report


def test_evaluate_baselines_and_verdict_agree_with_direct_computation(trained):
    tr, _, te, model, _ = trained
    is_tail = np.arange(tr.n_items) % 3 == 0
    metrics = evaluate(
        model, te, train=tr, event_weights=WEIGHTS, is_tail=is_tail, n_eval_users=10, n_candidates=8
    )
    prior = 1 / (1 + np.exp(-tr.item_priors[te.item, 0]))
    assert metrics.value("item_prior", "auc", "play") == pytest.approx(auc(te.labels[:, 0], prior))
    p = predict(model, te, debias=True)
    k = te.user >= 0
    assert metrics.value("ranker", "gauc", "play") == pytest.approx(
        gauc(te.labels[k, 0], p[k, 0], te.user[k])
    )
    songs = te.category == 1
    assert metrics.value("ranker", "ece", "skip", "c1") == pytest.approx(
        ece(te.labels[songs, 3], p[songs, 3])
    )
    pf = predict(model, te, debias=False)
    assert metrics.value("ranker_factual", "gauc", "play") == pytest.approx(
        gauc(te.labels[k, 0], pf[k, 0], te.user[k])
    )
    # the verdict: GAUC judges the factual click model against every baseline
    g = {
        s: metrics.value(s, "gauc", "play")
        for s in ("ranker_factual", "popularity", "item_prior", "logistic")
    }
    assert metrics.model == "ranker_factual"
    assert metrics.beats_baselines == all(
        g["ranker_factual"] > g[b] for b in ("popularity", "item_prior", "logistic")
    )
    text = report_table(metrics)
    assert ("PASS" if metrics.beats_baselines else "does NOT beat") in text
    assert "task play" in text and "long-tail share" in text
    assert 0.0 <= metrics.value("ranker", "tail_share@10", "units") <= 1.0


# ---------------------------------------------------------------------------------------------------
# debiasing against the simulator's ground truth


@pytest.mark.slow
def test_debiasing_removes_a_planted_popularity_effect():
    from simulator import make_world

    world = make_world(n_users=300, n_items=400, seed=3, conformity=2.0, popularity_quality_corr=0.0)
    rng = np.random.default_rng(0)
    imp, ev = world_log(world, 1200, rng, popularity_bias=0.7)
    ex = build_examples(
        imp,
        ev,
        n_users=world.n_users,
        n_items=world.n_items,
        item_category=world.item_category,
        item_features=world.item_features,
        popularity=world.popularity,
    )
    tr, va, _ = split_by_time(ex, valid=0.15, test=0.0)
    model, _ = fit(tr, va, TrainConfig(**dict(TINY, batch_size=512), max_epochs=6, lr=5e-3))
    users = rng.choice(world.n_users, 60, replace=False)
    biased = RankerScorer(model, world.event_weights, tr.history, debias=False)
    debiased = RankerScorer(model, world.event_weights, tr.history, debias=True)
    u = np.repeat(users, world.n_items)
    i = np.tile(np.arange(world.n_items), users.shape[0])
    truth = world.true_preference(u, i)
    # within-category, within-user correlation with the true preference (what a module ranks on)
    _, group = np.unique(u * world.n_categories + world.item_category[i], return_inverse=True)

    def within(x):
        means = np.bincount(group, x) / np.bincount(group)
        return x - means[group]

    sb, sd = biased.score_pairs(u, i), debiased.score_pairs(u, i)
    corr_b = np.corrcoef(within(sb), within(truth))[0, 1]
    corr_d = np.corrcoef(within(sd), within(truth))[0, 1]
    assert corr_d > corr_b + 0.02
    # long tail (bottom 80 % of each category by popularity) in each user's top-10 per category
    is_tail = popularity_rank(world.popularity) < 0.8  # global rank is enough here

    def tail_share(s):
        s = s.reshape(users.shape[0], world.n_items)
        shares = []
        for c in range(world.n_categories):
            cols = np.flatnonzero(world.item_category == c)
            top = cols[np.argsort(-s[:, cols], axis=1)[:, :10]]
            shares.append(is_tail[top].mean())
        return float(np.mean(shares))

    assert tail_share(sd) > tail_share(sb) + 0.1
