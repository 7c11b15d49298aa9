"""Compiled one-request kernels of the layout step (numba): the block table and the candidate layouts
of a single user, step for step what :func:`allocator.block_table` and
:func:`allocator.build_candidates` compute with numpy on batches, and equal to them bit for bit.

Why compiled: a request's pool is a few hundred items and its tables a few hundred cells, so the numpy
versions spend most of their time calling numpy (~60 small calls each), not computing. The kernels do
the same arithmetic in the same order (every float sum accumulates in the order numpy's ``bincount``
and its short reductions do), and every sort is of distinct keys or stable, so the results are the same
arrays. They release the interpreter lock (``nogil``), so a worker's request threads overlap in them.

Compiled on first use and cached on disk beside this file (or in numba's user cache directory where
that is read-only); the engine calls them once at load so that no request pays for the compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["block_table_one", "candidates_one", "showable_one", "warm"]

_MAX = np.finfo(np.float64).max


@njit(cache=True, nogil=True)
def showable_one(rank_scores: np.ndarray, cat: np.ndarray, is_tail: np.ndarray, need: int, n_groups: int
                 ) -> np.ndarray:
    """:func:`allocator.showable` for finite ``rank_scores``: the positions (ascending) of each
    (category, head/tail) group's best ``need`` items, ties at the last place all kept."""
    P = rank_scores.size
    sc = np.empty(P)
    for p in range(P):
        sc[p] = min(max(rank_scores[p], -1e300), 1e300)
    by = np.argsort(-sc, kind="mergesort")
    count = np.zeros(n_groups, np.int64)
    threshold = np.full(n_groups, -np.inf)
    for i in range(P):
        p = by[i]
        g = cat[p] * 2 + (1 if is_tail[p] else 0)
        count[g] += 1
        if count[g] == need:
            threshold[g] = sc[p]
    n = 0
    for p in range(P):
        if sc[p] >= threshold[cat[p] * 2 + (1 if is_tail[p] else 0)]:
            n += 1
    out = np.empty(n, np.int64)
    n = 0
    for p in range(P):
        if sc[p] >= threshold[cat[p] * 2 + (1 if is_tail[p] else 0)]:
            out[n] = p
            n += 1
    return out


@njit(cache=True, nogil=True)
def block_table_one(value_scores: np.ndarray, scores: np.ndarray, cat: np.ndarray, is_tail: np.ndarray,
                    tail: np.ndarray, levels: np.ndarray, K: int, C: int, R: int, w_pos: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One user's block table (see :func:`allocator.block_table`; scores finite). Returns
    ``mean (B, C, R), n_tail, n_shown, order (B, P), rank (B, P), cat_sorted (B, P)``."""
    P = scores.size
    B = levels.size
    neg = np.empty(P)
    for p in range(P):
        neg[p] = -min(max(scores[p], -1e300), 1e300)
    # rank by score (ties: pool order), and for tail items by score then the deeper tail first
    by_score = np.argsort(neg, kind="mergesort")
    srank = np.empty(P, np.int64)
    for i in range(P):
        srank[by_score[i]] = i
    by_tail = np.argsort(-tail, kind="mergesort")
    neg_t = np.empty(P)
    for i in range(P):
        neg_t[i] = neg[by_tail[i]]
    o2 = np.argsort(neg_t, kind="mergesort")
    by_trank = np.empty(P, np.int64)
    for i in range(P):
        by_trank[i] = by_tail[o2[i]]
    # rank within (category, head/tail) group: head items by score, tail items by the tail order
    g_count = np.zeros(2 * C, np.int64)
    grank = np.empty(P, np.int64)
    c_count = np.zeros(C, np.int64)
    crank = np.empty(P, np.int64)
    for i in range(P):
        p = by_score[i]
        crank[p] = c_count[cat[p]]
        c_count[cat[p]] += 1
        if not is_tail[p]:
            g = cat[p] * 2
            grank[p] = g_count[g]
            g_count[g] += 1
    for i in range(P):
        p = by_trank[i]
        if is_tail[p]:
            g = cat[p] * 2 + 1
            grank[p] = g_count[g]
            g_count[g] += 1
    first = np.empty(C, np.int64)
    acc = 0
    for c in range(C):
        first[c] = acc
        acc += c_count[c]
    big = P * K + 1
    # each category's items by score, its head items and its tail items by their group rank: a level's
    # order within a category is the merge of the last two by their keys (numpy sorts the keys instead)
    by_cat = np.empty(P, np.int64)
    head = np.empty(P, np.int64)
    tail_l = np.empty(P, np.int64)
    h_start = np.zeros(C + 1, np.int64)
    t_start = np.zeros(C + 1, np.int64)
    for c in range(C):
        h_start[c + 1] = h_start[c] + g_count[2 * c]
        t_start[c + 1] = t_start[c] + g_count[2 * c + 1]
    for p in range(P):
        by_cat[first[cat[p]] + crank[p]] = p
        if is_tail[p]:
            tail_l[t_start[cat[p]] + grank[p]] = p
        else:
            head[h_start[cat[p]] + grank[p]] = p
    order = np.empty((B, P), np.int64)
    rank = np.empty((B, P), np.int64)
    cat_sorted = np.empty((B, P), np.int64)
    n_shown = np.zeros((B, C, R))
    w_sum = np.zeros((B, C, R))
    s_sum = np.zeros((B, C, R))
    n_tail = np.zeros((B, C, R))
    for c in range(C):
        for j in range(first[c], first[c] + c_count[c]):
            cat_sorted[:, j] = c
            rank[:, j] = j - first[c]
    for b in range(B):
        quota = min(max(np.floor(levels[b] * K + 0.5), 0.0), float(K))
        q = int(quota)
        head_n = max(K - q, 1)
        tail_n = max(q, 1)
        for c in range(C):
            if q == 0:  # the plain order by score
                for j in range(first[c], first[c] + c_count[c]):
                    order[b, j] = by_cat[j]
                continue
            i, hi = h_start[c], h_start[c + 1]
            t, ti = t_start[c], t_start[c + 1]
            j = first[c]
            while i < hi or t < ti:
                if i < hi and t < ti:
                    g = i - h_start[c]
                    kh = (g // head_n) * K + g % head_n if q < K else big + g
                    g = t - t_start[c]
                    kt = (g // tail_n) * K + (K - q) + g % tail_n
                    take_head = kh < kt
                else:
                    take_head = i < hi
                if take_head:
                    order[b, j] = head[i]
                    i += 1
                else:
                    order[b, j] = tail_l[t]
                    t += 1
                j += 1
            # inside each block, best first by score (a block holds at most K items: insertion sort)
            lo = first[c]
            end = first[c] + c_count[c]
            while lo < end:
                stop = min(lo + K, end)
                for x in range(lo + 1, stop):
                    v = order[b, x]
                    y = x - 1
                    while y >= lo and srank[order[b, y]] > srank[v]:
                        order[b, y + 1] = order[b, y]
                        y -= 1
                    order[b, y + 1] = v
                lo = stop
        for j in range(P):
            blk = rank[b, j] // K
            if blk < R:
                c = cat_sorted[b, j]
                p = order[b, j]
                wi = w_pos[rank[b, j] % K]
                n_shown[b, c, blk] += 1.0
                w_sum[b, c, blk] += wi
                s_sum[b, c, blk] += value_scores[p] * wi
                n_tail[b, c, blk] += 1.0 if is_tail[p] else 0.0
    mean = np.empty((B, C, R))
    for b in range(B):
        for c in range(C):
            for r in range(R):
                if n_shown[b, c, r] > 0:
                    mean[b, c, r] = s_sum[b, c, r] / (w_sum[b, c, r] if w_sum[b, c, r] > 0 else 1.0)
                else:
                    mean[b, c, r] = np.nan
    return mean, n_tail, n_shown, order, rank, cat_sorted


@njit(cache=True, nogil=True)
def candidates_one(mean: np.ndarray, n_shown: np.ndarray, n_tail: np.ndarray, category_value: np.ndarray,
                   n_blocks: np.ndarray, mod_of: np.ndarray, prices: np.ndarray, W: float, n_items: int,
                   n_modules: int, w: np.ndarray, forced: np.ndarray, price_on: np.ndarray, kind: np.ndarray,
                   target: np.ndarray, wn: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One user's candidate layouts before the cut to ``max_candidates`` (see
    :func:`allocator.build_candidates`): variant ``v`` at tilt ``b`` is candidate ``v * B + b``.
    ``W`` is the position weights' sum as numpy adds them, ``n_items`` the slots times the items per
    module. Returns ``categories (V, S), blocks (V, S), modules (V, S), tilt (V,), value (V,),
    exposure (V, K), mask (V,)``."""
    B, C, R = mean.shape
    S = w.size
    n_var = forced.size
    V = n_var * B
    K = kind.size
    # the prices as per-unit gains (allocator._layout._exposure_terms, in its order)
    cat_p = np.zeros(C)
    mod_p = np.zeros(n_modules)
    tail_sum = 0.0
    for k in range(K):
        if kind[k] == 0:
            cat_p[target[k]] += prices[k]
        elif kind[k] == 1:
            tail_sum += prices[k]
        else:
            mod_p[target[k]] += prices[k]
    for c in range(C):
        cat_p[c] = cat_p[c] / W
    for j in range(n_modules):
        mod_p[j] = mod_p[j] / W
    tail_p = tail_sum / n_items
    block_val = np.empty((B, C, R))
    avail = np.empty((B, C, R), np.bool_)
    for b in range(B):
        for c in range(C):
            for r in range(R):
                m = mean[b, c, r]
                if np.isnan(m):
                    m = -np.inf
                elif m == np.inf:
                    m = _MAX
                elif m == -np.inf:
                    m = -_MAX
                block_val[b, c, r] = m * category_value[c]
                avail[b, c, r] = n_shown[b, c, r] > 0 and r < n_blocks[c]
    mod_p_cr = np.zeros((C, R))
    for c in range(C):
        for r in range(R):
            if mod_of[c, r] >= 0:
                mod_p_cr[c, r] = mod_p[mod_of[c, r]]
    cats = np.zeros((V, S), np.int64)
    blks = np.zeros((V, S), np.int64)
    value = np.zeros(V)
    ok = np.ones(V, np.bool_)
    tilt = np.empty(V, np.int64)
    used = np.zeros(C, np.int64)
    gain = np.empty(C)
    gval = np.empty(C)
    gav = np.empty(C, np.bool_)
    for v in range(n_var):
        for b in range(B):
            i = v * B + b
            tilt[i] = b
            used[:] = 0
            for s in range(S):
                best = 0
                for c in range(C):
                    r = used[c]
                    ri = min(r, R - 1)
                    av = avail[b, c, ri] and r < R
                    gv = w[s] * block_val[b, c, ri]
                    gp = w[s] * cat_p[c] + tail_p * n_tail[b, c, ri] + w[s] * mod_p_cr[c, ri]
                    g = gv + price_on[v] * gp
                    gain[c] = g if av else -np.inf
                    gval[c] = gv
                    gav[c] = av
                # the first maximum, a nan first of all (np.argmax)
                for c in range(C):
                    if np.isnan(gain[c]):
                        best = c
                        break
                    if gain[c] > gain[best]:
                        best = c
                if s == 0 and forced[v] >= 0:
                    best = forced[v]
                if not gav[best]:
                    ok[i] = False
                else:
                    value[i] += gval[best]
                cats[i, s] = best
                blks[i, s] = used[best]
                used[best] += 1
    mods = np.empty((V, S), np.int64)
    exposure = np.zeros((V, K))
    for i in range(V):
        nt = 0.0
        ns = 0.0
        for s in range(S):
            ri = min(blks[i, s], R - 1)
            mods[i, s] = mod_of[cats[i, s], ri]
            nt += n_tail[tilt[i], cats[i, s], ri]
            ns += n_shown[tilt[i], cats[i, s], ri]
        for k in range(K):
            if kind[k] == 1:
                exposure[i, k] = nt / max(ns, 1.0)
            else:
                e = 0.0
                for s in range(S):
                    hit = cats[i, s] == target[k] if kind[k] == 0 else mods[i, s] == target[k]
                    e += wn[s] if hit else 0.0
                exposure[i, k] = e
    mask = ok.copy()
    for i in range(V):  # a candidate identical to an earlier one is masked out
        if not mask[i]:
            continue
        for j in range(i):
            if tilt[j] != tilt[i]:
                continue
            same = True
            for s in range(S):
                if cats[j, s] != cats[i, s]:
                    same = False
                    break
            if same:
                mask[i] = False
                break
    return cats, blks, mods, tilt, value, exposure, mask


def warm() -> None:
    """Load (or compile) both kernels for the argument types the layout step passes, so that the first
    request does not pay for it (~0.4 s from numba's cache, seconds to compile)."""
    P = 4
    f8, i8 = np.zeros(P), np.zeros(P, np.int64)
    showable_one(f8, i8, np.zeros(P, np.bool_), 1, 2)
    mean, n_tail, n_shown, *_ = block_table_one(f8, f8, i8, np.zeros(P, np.bool_), f8, np.array([0.0, 0.5]), 2, 1, 1,
                                                np.ones(2))
    one = np.ones(1)
    candidates_one(mean, n_shown, n_tail, one, np.ones(1, np.int64), np.zeros((1, 1), np.int64), np.zeros(1), 2.0, 4,
                   1, np.ones(2), np.array([-1, -1], np.int64), np.array([1.0, 0.0]), np.zeros(1, np.int64),
                   np.zeros(1, np.int64), np.ones(2) / 2)
