"""Exact best assignment of category blocks to slots (the oracle's combinatorial core).

A layout puts one block per slot; the r-th module of category c on the page (slots in order) shows
block r of c. Given the value ``B[u, c, r]`` of block r of c for user u (money per examined slot) and
the slot weights ``w``, the best page maximises ``sum_s w_s B[u, c_s, r_s]``. Two exact methods:

* rearrangement (fast path): when ``w`` is non-increasing and every category's block values are
  non-increasing in r, the best page takes the ``n_slots`` largest block values and puts them in
  slots in descending order (ties broken by r, so a category's blocks keep their order);
* dynamic programme over "blocks used per category" (general path): exact for any ``w >= 0`` and any
  block values; used for the users where the fast path's conditions fail (a partial last block after
  negative-valued items, for instance).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["assign_blocks", "top_sorted"]


def top_sorted(values: np.ndarray, n_top: int) -> np.ndarray:
    """Column indices of the ``n_top`` largest values of each row, sorted descending (ties: lower index).

    Parameters
    ----------
    values
        Shape (n, m), finite.
    n_top
        In [0, m].

    Returns
    -------
    (n, n_top) int64
        Identical to ``np.argsort(-values, axis=1, kind="stable")[:, :n_top]``; computed with a
        partition when ``n_top`` is much smaller than ``m``.
    """
    n, m = values.shape
    if n_top == 0:
        return np.zeros((n, 0), dtype=np.int64)
    if 4 * n_top >= m:
        return np.argsort(-values, axis=1, kind="stable")[:, :n_top].astype(np.int64, copy=False)
    part = np.argpartition(-values, n_top - 1, axis=1)[:, :n_top]
    part.sort(axis=1)  # index order first, so the stable sort below breaks ties by index
    rows = np.arange(n)[:, None]
    picked = values[rows, part]
    order = np.argsort(-picked, axis=1, kind="stable")
    out = np.take_along_axis(part, order, axis=1).astype(np.int64, copy=False)
    # The partition picks an arbitrary subset of the items tied with the n_top-th value; rows where
    # such a tie straddles the cut are redone with the full stable sort.
    threshold = picked.min(axis=1)
    n_at = (values == threshold[:, None]).sum(axis=1)
    n_at_picked = (picked == threshold[:, None]).sum(axis=1)
    bad = np.flatnonzero(n_at > n_at_picked)
    if bad.size:
        out[bad] = np.argsort(-values[bad], axis=1, kind="stable")[:, :n_top]
    return out


def assign_blocks(block_value: np.ndarray, n_blocks: np.ndarray, weights: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Best assignment of blocks to slots, per user.

    Every slot gets a block while blocks remain; when fewer than ``n_slots`` blocks exist in all,
    every block is shown and the remaining slots are left empty (wherever emptiness is worth most).

    Parameters
    ----------
    block_value
        Shape (n, n_categories, R). ``block_value[u, c, r]`` for ``r < n_blocks[c]``; the rest is ignored.
    n_blocks
        Shape (n_categories,), int >= 0. Blocks available per category.
    weights
        Shape (n_slots,), >= 0. Slot examination weights.

    Returns
    -------
    category : (n, n_slots) int64
        Category shown in each slot, -1 for an empty slot.
    block : (n, n_slots) int64
        Block index r shown in each slot, -1 for an empty slot.
    """
    n, n_cat, _ = block_value.shape
    n_slots = weights.size
    total = int(n_blocks.sum())
    n_empty = n_slots - min(n_slots, total)
    category = np.full((n, n_slots), -1, dtype=np.int64)
    block = np.full((n, n_slots), -1, dtype=np.int64)
    if n == 0 or n_slots == 0:
        return category, block

    monotone_w = bool(np.all(np.diff(weights) <= 0))
    if monotone_w:
        ok = np.ones(n, dtype=bool)
        for c in range(n_cat):
            k = int(n_blocks[c])
            if k > 1:
                ok &= np.all(np.diff(block_value[:, c, :k], axis=1) <= 0, axis=1)
        fast = np.flatnonzero(ok)
        if fast.size:
            cf, bf = _rearrangement(block_value[fast], n_blocks, n_slots, n_empty)
            category[fast], block[fast] = cf, bf
        slow = np.flatnonzero(~ok)
    else:
        slow = np.arange(n)
    if slow.size:
        cs, bs = _dynamic_programme(block_value[slow], n_blocks, weights, n_empty)
        category[slow], block[slow] = cs, bs
    return category, block


def _rearrangement(block_value: np.ndarray, n_blocks: np.ndarray, n_slots: int, n_empty: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    n, n_cat, n_r = block_value.shape
    # r-major flattening: a stable sort then breaks ties by block index r, keeping blocks in order
    cand = np.full((n, n_r, n_cat), -np.inf)
    avail = np.arange(n_r)[:, None] < n_blocks[None, :]  # (R, C)
    vals = np.swapaxes(block_value, 1, 2)
    cand[:, avail] = vals[:, avail]
    flat = cand.reshape(n, n_r * n_cat)
    if n_empty:
        # empty slots are worth 0; there are exactly n_slots - total of them, so every block is shown
        flat = np.concatenate([flat, np.zeros((n, n_empty))], axis=1)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :n_slots]
    is_block = order < n_r * n_cat
    category = np.where(is_block, order % n_cat, -1)
    block = np.where(is_block, order // n_cat, -1)
    return category.astype(np.int64), block.astype(np.int64)


def _dynamic_programme(block_value: np.ndarray, n_blocks: np.ndarray, weights: np.ndarray,
                       n_empty: int) -> tuple[np.ndarray, np.ndarray]:
    """DP over states (blocks used per category, empties used); one vector op per state and move."""
    n, n_cat, _ = block_value.shape
    n_slots = weights.size
    ranges = [range(int(k) + 1) for k in n_blocks] + [range(n_empty + 1)]
    states = [s for s in itertools.product(*ranges) if sum(s) <= n_slots]
    states.sort(key=sum)
    index = {s: i for i, s in enumerate(states)}
    n_states = len(states)
    value = np.full((n_states, n), -np.inf)
    move = np.full((n_states, n), -1, dtype=np.int64)  # move into the state: category, n_cat = empty
    prev = np.full((n_states, n_cat + 1), -1, dtype=np.int64)
    value[0] = 0.0
    for i, st in enumerate(states):
        depth = sum(st)
        if depth == n_slots:
            continue
        w = weights[depth]
        for c in range(n_cat + 1):
            limit = n_empty if c == n_cat else int(n_blocks[c])
            if st[c] >= limit:
                continue
            nxt = list(st)
            nxt[c] += 1
            j = index[tuple(nxt)]
            prev[j, c] = i
            gain = 0.0 if c == n_cat else w * block_value[:, c, st[c]]
            cand = value[i] + gain
            better = cand > value[j]
            value[j] = np.where(better, cand, value[j])
            move[j] = np.where(better, c, move[j])
    final = np.array([i for i, s in enumerate(states) if sum(s) == n_slots], dtype=np.int64)
    rows = np.arange(n)
    cur = final[np.argmax(value[final], axis=0)]
    category = np.full((n, n_slots), -1, dtype=np.int64)
    block = np.full((n, n_slots), -1, dtype=np.int64)
    state_arr = np.array(states, dtype=np.int64)  # (n_states, n_cat + 1)
    for s in range(n_slots - 1, -1, -1):
        c = move[cur, rows]
        before = prev[cur, c]
        is_block = c < n_cat
        category[:, s] = np.where(is_block, c, -1)
        # the block index shown is the count of c before this move
        r = state_arr[before, np.minimum(c, n_cat)]
        block[:, s] = np.where(is_block, r, -1)
        cur = before
    return category, block
