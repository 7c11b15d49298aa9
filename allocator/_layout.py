"""Layouts: long tail, tilted module contents, candidate layouts with value and exposure.

The layout model (see ``docs/internals.md``): a layout puts one module in every slot and applies one
tilt level ``beta`` to all of them. The r-th module of category c on the page (slots counted in
order) shows ranks ``[r*K, (r+1)*K)`` of the category's items ordered by ``score + beta * tail``, so
modules of one category never repeat an item. Everything is vectorised over users and tilt levels;
the only Python loops run over slots and candidate variants (a handful each).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from ._config import HomepageConfig

__all__ = [
    "long_tail",
    "LayoutSpace",
    "BlockTable",
    "Candidates",
    "block_table",
    "build_candidates",
    "default_leads",
    "layout_items",
    "showable",
    "stats_table",
]


def long_tail(popularity: np.ndarray, item_category: np.ndarray, head_share: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Long-tail flag and tail score of every item, per category.

    Within a category, items sorted by popularity (descending; ties by index) form the head until
    their cumulative popularity reaches ``head_share`` of the category's total; the rest is long tail.
    The tail score is 0 in the head and, in the tail, ``0.5 + 0.5 * j / (n_tail - 1)`` for the j-th
    tail item (j = 0 the most popular of the tail): it grows as popularity falls, and its step at the
    head's edge is what lets a tilt lift long-tail items even when the scorer's own order follows
    popularity (a tilt linear in rank would only rescale such an order, never change it).

    Parameters
    ----------
    popularity
        Shape (n_items,), >= 0.
    item_category
        Shape (n_items,), int category index.
    head_share
        In (0, 1].

    Returns
    -------
    is_tail : (n_items,) bool
    tail : (n_items,) float64 in [0, 1]

    Examples
    --------
    >>> is_tail, tail = long_tail(np.array([10., 5., 3., 1., 1.]), np.zeros(5, int), 0.8)
    >>> is_tail.tolist(), tail.tolist()
    ([False, False, False, True, True], [0.0, 0.0, 0.0, 0.5, 1.0])
    """
    pop = np.asarray(popularity, dtype=np.float64)
    cat = np.asarray(item_category, dtype=np.int64)
    if pop.ndim != 1 or cat.shape != pop.shape:
        raise ValueError(f"popularity and item_category must be 1-d of one length; got shapes "
                         f"{pop.shape} and {cat.shape}")
    if not 0.0 < head_share <= 1.0:
        raise ValueError(f"head_share must be in (0, 1]; got {head_share!r}")
    if (pop < 0).any() or not np.isfinite(pop).all():
        raise ValueError("popularity must be finite and >= 0")
    n = pop.size
    is_tail = np.zeros(n, dtype=bool)
    tail = np.zeros(n, dtype=np.float64)
    if n == 0:
        return is_tail, tail
    order = np.lexsort((np.arange(n), -pop, cat))  # by category, popularity desc, index
    cat_sorted = cat[order]
    starts = np.r_[0, np.flatnonzero(np.diff(cat_sorted)) + 1]
    group_len = np.diff(np.r_[starts, n])
    group_of = np.repeat(np.arange(starts.size), group_len)
    rank = np.arange(n) - starts[group_of]
    pop_sorted = pop[order]
    csum = np.cumsum(pop_sorted)
    before = np.r_[0.0, csum][starts][group_of]  # cumulative sum before each group
    total = np.add.reduceat(pop_sorted, starts)[group_of]
    cum_prev = csum - pop_sorted - before  # popularity of strictly more popular items in the group
    # the head keeps adding items while the share reached so far is below head_share
    head = cum_prev < head_share * total - 1e-12 * np.maximum(total, 1.0)
    head |= rank == 0
    is_tail[order] = ~head
    n_head = np.bincount(group_of, weights=head.astype(np.float64), minlength=starts.size)[group_of]
    n_tail = group_len[group_of] - n_head
    j = rank - n_head  # position within the tail
    tail[order] = np.where(head, 0.0, 0.5 + 0.5 * j / np.maximum(n_tail - 1, 1))
    return is_tail, tail


class _KernelArgs(NamedTuple):
    """A space's arrays as the one-request kernels take them (C-ordered, typed), made once per space."""

    tilt_levels: np.ndarray
    item_weights: np.ndarray
    category_value: np.ndarray
    n_blocks: np.ndarray
    R: int
    mod_of: np.ndarray  # (C, R) module index of each category's r-th block, -1 past its modules
    position_weights: np.ndarray
    slot_share: np.ndarray  # position weights / their sum
    weight_sum: float  # their sum, as numpy adds them
    n_items: int  # items on a page: slots x items per module
    kind: np.ndarray
    target: np.ndarray
    n_modules: int


@dataclass(frozen=True)
class LayoutSpace:
    """The config's layout geometry as arrays, computed once per config."""

    position_weights: np.ndarray  # (S,)
    items_per_module: int
    category_value: np.ndarray  # (C,)
    modules_of: tuple[tuple[int, ...], ...]  # per category, module indices in config order
    module_category: np.ndarray  # (M,)
    tilt_levels: np.ndarray  # (B,)
    n_blocks: np.ndarray  # (C,) modules per category = blocks that can appear
    # exposure rows: kind code 0 category_share / 1 long_tail / 2 module_share, and the target index
    kind: np.ndarray  # (K,)
    target: np.ndarray  # (K,)
    #: (items_per_module,) examination weight of each position inside a module (None = all equal)
    item_weights: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: HomepageConfig) -> LayoutSpace:
        cats = cfg.category_names
        mods = cfg.module_ids
        kinds, targets = [], []
        for c in cfg.constraints:
            if c.kind == "category_share":
                kinds.append(0)
                targets.append(cats.index(c.category or ""))
            elif c.kind == "long_tail_share":
                kinds.append(1)
                targets.append(0)
            else:
                kinds.append(2)
                targets.append(mods.index(c.module or ""))
        mo = cfg.modules_of()
        return cls(
            position_weights=np.asarray(cfg.position_weights, dtype=np.float64),
            items_per_module=cfg.items_per_module,
            category_value=cfg.category_values(),
            modules_of=tuple(tuple(x) for x in mo),
            module_category=cfg.module_category(),
            tilt_levels=np.asarray(cfg.tilt.levels, dtype=np.float64),
            n_blocks=np.array([len(x) for x in mo], dtype=np.int64),
            kind=np.array(kinds, dtype=np.int64),
            target=np.array(targets, dtype=np.int64),
            item_weights=cfg.item_weights(),
        )

    @property
    def n_slots(self) -> int:
        return int(self.position_weights.size)

    @property
    def n_constraints(self) -> int:
        return int(self.kind.size)

    @property
    def tail_goal(self) -> bool:
        """True when a constraint is on the long-tail share (what tilted layouts are for)."""
        return bool((self.kind == 1).any())

    @cached_property
    def kernel_args(self) -> _KernelArgs:
        """The arrays the one-request kernels take, made on first use (the space's arrays are not
        changed in place: a new config is a new space)."""
        f8, i8 = np.float64, np.int64
        C = self.category_value.size
        R = max(int(self.n_blocks.max(initial=1)), 1)
        mod_of = np.full((C, R), -1, dtype=i8)
        for c, mods_c in enumerate(self.modules_of):
            mod_of[c, :len(mods_c)] = mods_c
        pw = np.array(self.position_weights, dtype=f8)
        return _KernelArgs(np.array(self.tilt_levels, dtype=f8), np.array(_item_weights(self), dtype=f8),
                           np.array(self.category_value, dtype=f8), np.array(self.n_blocks, dtype=i8), R, mod_of,
                           pw, pw / pw.sum(), float(pw.sum()), pw.size * self.items_per_module,
                           np.array(self.kind, dtype=i8), np.array(self.target, dtype=i8),
                           int(self.module_category.size))


@dataclass(frozen=True)
class BlockTable:
    """What each (tilt, category, block) would show, for a batch of users.

    Attributes
    ----------
    mean_score : (U, B, C, R) untilted score of the block's items averaged with the examination weight of
                 the position each is shown at (``space.item_weights``; nan when the block is empty)
    n_tail : (U, B, C, R) number of long-tail items in the block
    n_shown : (U, B, C, R) number of items in the block (<= K)
    order : (U, B, P) pool positions sorted by (category, tilted score desc)
    rank : (U, B, P) rank of each sorted position within its category
    cat_sorted : (U, B, P) category of each sorted position
    """

    mean_score: np.ndarray
    n_tail: np.ndarray
    n_shown: np.ndarray
    order: np.ndarray
    rank: np.ndarray
    cat_sorted: np.ndarray


def block_table(space: LayoutSpace, scores: np.ndarray, pool_category: np.ndarray,
                pool_is_tail: np.ndarray, pool_tail: np.ndarray, rank_scores: np.ndarray | None = None
                ) -> BlockTable:
    """Block statistics for users' candidate pools at every tilt level.

    Parameters
    ----------
    scores
        Shape (U, P): expected engagement units of each pool item per examined impression (what the
        blocks' means are made of).
    pool_category, pool_is_tail, pool_tail
        Shape (U, P) or (P,): category index, long-tail flag and tail score of each pool item (the tail
        score only breaks ties between tail items of equal score: the deeper tail first).
    rank_scores
        Shape (U, P) or None (= ``scores``): what orders the items within a category. A calibration
        that values a category's head and tail differently changes what an item is worth, not which
        items a module shows.

    The tilt is a quota: at level ``beta`` each module (block) shows ``round(beta * K)`` long-tail
    items, the user's best of the category, and its other positions the best head items; a group that
    runs out leaves its positions to the other, and level 0 is the plain order by score. Inside a block
    the items are shown best first, so the tail items usually take the last positions, where they cost
    the least attention (the exposure constraints count every shown item once, wherever it is shown).
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    U, P = scores.shape
    value_scores = scores
    if rank_scores is not None:
        scores = np.atleast_2d(np.asarray(rank_scores, dtype=np.float64))
        if scores.shape != value_scores.shape:
            raise ValueError(f"rank_scores must have the shape of scores {value_scores.shape}; got {scores.shape}")
    if U == 1:  # one request: the same table from 1-d arrays, compiled where the sort keys are finite
        cat1, tail1 = _row(pool_category, P), _row(pool_tail, P)
        args = (space, value_scores[0], scores[0], cat1, _row(pool_is_tail, P), tail1)
        compiled = (P > 0 and np.isfinite(scores).all() and np.isfinite(tail1).all()
                    and 0 <= cat1.min() and cat1.max() < space.category_value.size)
        return _block_table_compiled(*args) if compiled else _block_table_one(*args)
    cat = np.broadcast_to(pool_category, (U, P)).astype(np.int64, copy=False)
    is_tail = np.broadcast_to(pool_is_tail, (U, P))
    tail = np.broadcast_to(pool_tail, (U, P))
    levels = space.tilt_levels
    B, C, K = levels.size, space.category_value.size, space.items_per_module
    R = max(int(space.n_blocks.max(initial=1)), 1)
    # the tilt is a quota: at level beta each block keeps round(beta * K) of its K positions for the
    # user's best long-tail items of the category and fills the rest with the best head items (a group
    # that runs out leaves its positions to the other); level 0 is the plain order by score
    sc = np.clip(scores, -1e300, 1e300)
    tail_f = is_tail.astype(np.int64)
    # every sort below is of distinct int keys: a user's items ranked once by score (ties: pool order;
    # tail items: the deeper tail first among equal scores), then by category, group, block
    ar = np.broadcast_to(np.arange(P), (U, P))
    srank = np.empty((U, P), dtype=np.int64)
    np.put_along_axis(srank, np.argsort(-sc, axis=-1, kind="stable"), ar, axis=-1)
    trank = np.empty((U, P), dtype=np.int64)
    np.put_along_axis(trank, np.lexsort((-tail, -sc), axis=-1), ar, axis=-1)
    gid = cat * 2 + tail_f
    by_group = np.argsort(gid * P + np.where(is_tail, trank, srank), axis=-1)  # category, head/tail, score desc
    g_sorted = np.take_along_axis(gid, by_group, axis=-1)
    g_counts = np.zeros((U, 2 * C), dtype=np.int64)
    np.add.at(g_counts, (np.repeat(np.arange(U), P), gid.ravel()), 1)
    g_first = np.cumsum(g_counts, axis=1) - g_counts
    grank = np.empty((U, P), dtype=np.int64)  # rank among the user's items of the same category and group
    np.put_along_axis(grank, by_group, ar - np.take_along_axis(g_first, g_sorted, axis=-1), axis=-1)
    by_score = np.argsort(cat * P + srank, axis=-1)
    c_counts = np.zeros((U, C), dtype=np.int64)
    np.add.at(c_counts, (np.repeat(np.arange(U), P), cat.ravel()), 1)
    first = np.cumsum(c_counts, axis=1) - c_counts  # (U,C)
    crank = np.empty((U, P), dtype=np.int64)  # rank among the user's items of the same category
    np.put_along_axis(crank, by_score, ar - np.take_along_axis(
        first, np.take_along_axis(cat, by_score, axis=-1), axis=-1), axis=-1)
    quota = np.clip(np.floor(levels * K + 0.5), 0, K).astype(np.int64)[None, :, None]  # (1,B,1)
    g = grank[:, None, :]
    head_n = np.maximum(K - quota, 1)
    tail_n = np.maximum(quota, 1)
    big = P * K + 1
    head_key = np.where(quota < K, (g // head_n) * K + g % head_n, big + g)
    tail_key = np.where(quota > 0, (g // tail_n) * K + (K - quota) + g % tail_n, big + g)
    key = np.where(is_tail[:, None, :], tail_key, head_key)
    key = np.where(quota == 0, crank[:, None, :], key)  # (U,B,P), distinct within a category
    cat_b = np.broadcast_to(cat[:, None, :], (U, B, P))
    order = np.argsort(cat_b * (big + P + 1) + key, axis=-1)  # (U,B,P)
    cat_sorted = np.take_along_axis(cat_b, order, axis=-1)
    # rank within category = position - first position of the category in the sorted row
    rank = np.arange(P)[None, None, :] - np.take_along_axis(first[:, None, :].repeat(B, 1), cat_sorted,
                                                            axis=-1)
    block = rank // K
    if (quota > 0).any():
        # inside each (category, block): best first by score; (category, block) runs are contiguous, so
        # only the order inside a block changes (rank and block stay valid)
        sr_sorted = np.take_along_axis(np.broadcast_to(srank[:, None, :], (U, B, P)), order, axis=-1)
        perm = np.argsort((cat_sorted * (P + 1) + block) * P + sr_sorted, axis=-1)
        order = np.take_along_axis(order, perm, axis=-1)
    keep = block < R
    # flat index of (u, b, c, r)
    ub = (np.arange(U)[:, None, None] * B + np.arange(B)[None, :, None])
    flat = ((ub * C + cat_sorted) * R + np.minimum(block, R - 1))[keep]
    sc_sorted = np.take_along_axis(np.broadcast_to(value_scores[:, None, :], (U, B, P)), order, axis=-1)
    tl_sorted = np.take_along_axis(np.broadcast_to(is_tail[:, None, :], (U, B, P)), order, axis=-1)
    size = U * B * C * R
    n_shown = np.bincount(flat, minlength=size).reshape(U, B, C, R)
    w_item = _item_weights(space)[rank % K][keep]  # the weight of the position each item is shown at
    w_sum = np.bincount(flat, weights=w_item, minlength=size).reshape(U, B, C, R)
    s_sum = np.bincount(flat, weights=sc_sorted[keep] * w_item, minlength=size).reshape(U, B, C, R)
    n_tail = np.bincount(flat, weights=tl_sorted[keep].astype(np.float64), minlength=size).reshape(U, B, C, R)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_shown > 0, s_sum / np.where(w_sum > 0, w_sum, 1.0), np.nan)
    return BlockTable(mean, n_tail, n_shown.astype(np.float64), order, rank, cat_sorted)


def _item_weights(space: LayoutSpace) -> np.ndarray:
    K = space.items_per_module
    w_pos = np.ones(K) if space.item_weights is None else np.asarray(space.item_weights, dtype=np.float64)
    if w_pos.shape != (K,) or not (w_pos > 0).all():
        raise ValueError(f"space.item_weights must be {K} positive numbers; got {w_pos!r}")
    return w_pos


def showable(space: LayoutSpace, rank_scores: np.ndarray, pool_category: np.ndarray,
             pool_is_tail: np.ndarray) -> np.ndarray:
    """Pool positions (ascending) of the items one request's :func:`block_table` can show: of each
    category's head and of its long tail, the best ``R * K`` by ``rank_scores`` (ties at the last place
    all kept), ``R`` the most modules of a category and ``K`` the items per module.

    At any tilt level a category's ``R`` blocks hold at most ``R * K`` items of either group, the best
    of the group first, so every item shown is among these: :func:`block_table` on this sub-pool gives
    the same block statistics, and :func:`layout_items` the same items (as positions in the sub-pool).
    Shapes (P,); the table costs what the sub-pool's size does, whatever the pool's."""
    need = max(int(space.n_blocks.max(initial=1)), 1) * space.items_per_module
    C = space.category_value.size
    rs = np.asarray(rank_scores, dtype=np.float64)
    if rs.ndim == 1 and rs.size and np.isfinite(rs).all():  # a request's pool: the compiled kernel
        from . import _kernels

        cat = _arg(pool_category, np.int64)
        if cat.shape == rs.shape and np.shape(pool_is_tail) == rs.shape and 0 <= cat.min() and cat.max() < C:
            return _kernels.showable_one(_arg(rs, np.float64), cat, _arg(pool_is_tail, np.bool_), need, 2 * C)
    return _showable_numpy(rs, pool_category, pool_is_tail, need, 2 * C)


def _showable_numpy(rank_scores: np.ndarray, pool_category: np.ndarray, pool_is_tail: np.ndarray, need: int,
                    n_groups: int) -> np.ndarray:
    """:func:`showable` in numpy (any scores; the compiled kernel is for a request's finite ones)."""
    sc = np.clip(rank_scores, -1e300, 1e300)
    P = sc.size
    gid = np.asarray(pool_category, dtype=np.int64) * 2 + np.asarray(pool_is_tail, dtype=np.int64)
    counts = np.bincount(gid, minlength=n_groups)
    if counts.max(initial=0) <= need:
        return np.arange(P)
    by = np.lexsort((-sc, gid))  # group, best first
    start = np.cumsum(counts) - counts
    full = counts > need
    threshold = np.full(n_groups, -np.inf)
    threshold[full] = sc[by[start[full] + need - 1]]
    return np.flatnonzero(sc >= threshold[gid])


def _row(a: np.ndarray, P: int) -> np.ndarray:
    """One request's (P,) row of a per-item input given as (P,) or (1, P)."""
    if isinstance(a, np.ndarray) and a.shape == (P,):
        return a
    return np.broadcast_to(a, (1, P))[0]


def warm_kernels() -> None:
    """Load the one-request kernels (:mod:`allocator._kernels`) now, so that no request pays for it."""
    from . import _kernels

    _kernels.warm()


def _arg(a: np.ndarray | float, dtype: type) -> np.ndarray:
    """An argument as the kernels are compiled for: C-ordered, writable (numba types a read-only view, such
    as ``np.broadcast_to``'s, apart, and would compile for it again)."""
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=dtype, order="C")


def _block_table_compiled(space: LayoutSpace, value_scores: np.ndarray, scores: np.ndarray, cat: np.ndarray,
                          is_tail: np.ndarray, tail: np.ndarray) -> BlockTable:
    """:func:`_block_table_one` by the compiled kernel (equal arrays; finite ``scores`` and ``tail``)."""
    from . import _kernels  # numba loads on the first request, not with the package

    ka = space.kernel_args
    f8 = np.float64
    mean, n_tail, n_shown, order, rank, cat_sorted = _kernels.block_table_one(
        _arg(value_scores, f8), _arg(scores, f8), _arg(cat, np.int64), _arg(is_tail, np.bool_), _arg(tail, f8),
        ka.tilt_levels, int(space.items_per_module), int(ka.category_value.size), ka.R, ka.item_weights)
    return BlockTable(mean[None], n_tail[None], n_shown[None], order[None], rank[None], cat_sorted[None])


def _block_table_one(space: LayoutSpace, value_scores: np.ndarray, scores: np.ndarray, cat: np.ndarray,
                     is_tail: np.ndarray, tail: np.ndarray) -> BlockTable:
    """:func:`block_table` for one user, step for step on (P,) and (B, P) arrays (equal results)."""
    P = scores.size
    cat = cat.astype(np.int64, copy=False)
    levels = space.tilt_levels
    B, C, K = levels.size, space.category_value.size, space.items_per_module
    R = max(int(space.n_blocks.max(initial=1)), 1)
    sc = np.clip(scores, -1e300, 1e300)
    ar = np.arange(P)
    srank = np.empty(P, dtype=np.int64)
    srank[np.argsort(-sc, kind="stable")] = ar
    trank = np.empty(P, dtype=np.int64)
    trank[np.lexsort((-tail, -sc))] = ar
    gid = cat * 2 + is_tail
    by_group = np.argsort(gid * P + np.where(is_tail, trank, srank))
    g_counts = np.bincount(gid, minlength=2 * C)
    grank = np.empty(P, dtype=np.int64)
    grank[by_group] = ar - (np.cumsum(g_counts) - g_counts)[gid[by_group]]
    first = np.bincount(cat, minlength=C)
    first = np.cumsum(first) - first
    by_score = np.argsort(cat * P + srank)
    crank = np.empty(P, dtype=np.int64)
    crank[by_score] = ar - first[cat[by_score]]
    quota = np.clip(np.floor(levels * K + 0.5), 0, K).astype(np.int64)[:, None]  # (B,1)
    head_n = np.maximum(K - quota, 1)
    tail_n = np.maximum(quota, 1)
    big = P * K + 1
    head_key = np.where(quota < K, (grank // head_n) * K + grank % head_n, big + grank)
    tail_key = np.where(quota > 0, (grank // tail_n) * K + (K - quota) + grank % tail_n, big + grank)
    key = np.where(quota == 0, crank, np.where(is_tail, tail_key, head_key))  # (B,P)
    order = np.argsort(cat * (big + P + 1) + key, axis=-1)
    cat_sorted = cat[order]
    rank = ar - first[cat_sorted]
    block = rank // K
    if (quota > 0).any():
        perm = np.argsort((cat_sorted * (P + 1) + block) * P + srank[order], axis=-1)
        order = np.take_along_axis(order, perm, axis=-1)
    keep = block < R
    flat = ((np.arange(B)[:, None] * C + cat_sorted) * R + np.minimum(block, R - 1))[keep]
    size = B * C * R
    n_shown = np.bincount(flat, minlength=size).reshape(1, B, C, R)
    w_item = _item_weights(space)[rank % K][keep]
    w_sum = np.bincount(flat, weights=w_item, minlength=size).reshape(1, B, C, R)
    s_sum = np.bincount(flat, weights=value_scores[order][keep] * w_item, minlength=size).reshape(1, B, C, R)
    n_tail = np.bincount(flat, weights=is_tail[order][keep].astype(np.float64), minlength=size).reshape(1, B, C, R)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_shown > 0, s_sum / np.where(w_sum > 0, w_sum, 1.0), np.nan)
    return BlockTable(mean, n_tail, n_shown.astype(np.float64), order[None], rank[None], cat_sorted[None])


@dataclass(frozen=True)
class Candidates:
    """Candidate layouts for a batch of users.

    Attributes
    ----------
    categories : (U, L, S) category index per slot
    blocks : (U, L, S) block index per slot (r-th module of that category on the page)
    modules : (U, L, S) module index per slot
    tilt : (U, L) tilt level index
    value : (U, L) expected value v(u,l) = sum_s w_s p(u,m_s;beta) value(c(m_s))
    exposure : (U, L, K) exposure vector a(u,l) in the config's constraint order
    mask : (U, L) True for real (non-duplicate, feasible) candidates
    """

    categories: np.ndarray
    blocks: np.ndarray
    modules: np.ndarray
    tilt: np.ndarray
    value: np.ndarray
    exposure: np.ndarray
    mask: np.ndarray

    @property
    def n_cand(self) -> int:
        return int(self.value.shape[1])

    def greedy(self, prices: np.ndarray | None = None) -> np.ndarray:
        """Shape (U,): argmax over real candidates of v + a @ prices."""
        score = self.scores(prices)
        return np.argmax(score, axis=1)

    def scores(self, prices: np.ndarray | None = None) -> np.ndarray:
        """Shape (U, L): dual-adjusted score v + a @ prices, -inf on padding."""
        s = self.value.copy()
        if prices is not None and self.exposure.shape[-1]:
            s += self.exposure @ np.asarray(prices, dtype=np.float64)
        s[~self.mask] = -np.inf
        return s


def _exposure_terms(space: LayoutSpace, prices: np.ndarray,
                    tbl: BlockTable) -> tuple[np.ndarray, float, np.ndarray]:
    """Prices turned into per-unit gains for greedy filling: per category (C,) and per module (M,)
    price per unit of slot weight (divided by the total weight), and the long-tail price per shown
    item (divided by S*K)."""
    W = space.position_weights.sum()
    n_items = space.n_slots * space.items_per_module
    C = space.category_value.size
    cat_price = np.zeros(C)
    tail_price = 0.0
    mod_price = np.zeros(space.module_category.size)
    for k, (kind, tgt) in enumerate(zip(space.kind, space.target, strict=True)):
        if kind == 0:
            cat_price[tgt] += prices[k]
        elif kind == 1:
            tail_price += prices[k]
        else:
            mod_price[tgt] += prices[k]
    return cat_price / W, tail_price / n_items, mod_price / W


def default_leads(space: LayoutSpace, tbl: BlockTable, n: int = 4) -> np.ndarray:
    """(U, min(C, n)) each user's categories by the value of their first untilted block, best first (lowest
    index on ties; an empty category last): the categories :func:`build_candidates` leads variants with
    when it is given none."""
    C = tbl.mean_score.shape[2]
    first = np.nan_to_num(tbl.mean_score[:, 0, :, 0], nan=-np.inf) * space.category_value[None, :]
    first = np.where((tbl.n_shown[:, 0, :, 0] > 0) & (space.n_blocks[None, :] > 0), first, -np.inf)
    return np.argsort(-first, axis=1, kind="stable")[:, : min(C, n)]


def stats_table(mean_score: np.ndarray, n_tail: np.ndarray, n_shown: np.ndarray) -> BlockTable:
    """A :class:`BlockTable` of the block statistics alone (no item order; shapes (U, B, C, R)), as the
    decision log keeps them: enough for :func:`build_candidates`, not for :func:`layout_items`. A block
    with nothing shown may hold any ``mean_score``."""
    ms = np.asarray(mean_score, dtype=np.float64)
    shown = np.asarray(n_shown, dtype=np.int64)
    empty = np.zeros(ms.shape[:2] + (0,), dtype=np.int64)
    return BlockTable(np.where(shown > 0, ms, np.nan), np.asarray(n_tail, dtype=np.int64), shown, empty, empty, empty)


def build_candidates(space: LayoutSpace, tbl: BlockTable, prices: np.ndarray | None = None,
                     lead_categories: np.ndarray | None = None, max_candidates: int = 32,
                     explore: np.ndarray | None = None) -> Candidates:
    """Candidate layouts for every user: greedy under prices, unpriced greedy, and one variant led by
    each of the user's top categories, each at every tilt level; duplicates masked out.

    Greedy filling walks the slots in order and gives each one the category whose next block adds the
    most ``w_s * mean * value(c) + prices-weighted exposure``.

    Parameters
    ----------
    lead_categories
        Shape (U, N): each user's top-N categories (e.g. the rankers' category preferences); by
        default the categories whose first block is worth the most.
    explore
        Shape (U,): one more variant per user led by this category (-1: none), a category to learn
        about that no other variant may show; it is kept (untilted) when the candidates are cut to
        ``max_candidates``.
    """
    U, B, C, R = tbl.mean_score.shape
    K = space.n_constraints
    prices = np.zeros(K) if prices is None else np.asarray(prices, dtype=np.float64)
    if prices.shape != (K,):
        raise ValueError(f"prices must have shape ({K},) (one per constraint); got {prices.shape}")
    lead = default_leads(space, tbl) if lead_categories is None else np.asarray(lead_categories, dtype=np.int64)
    if lead.ndim != 2 or lead.shape[0] != U or (lead.size and (lead.max() >= C or lead.min() < -1)):
        raise ValueError(f"lead_categories must have shape ({U}, N) with categories in [-1, {C}); got {lead!r}")
    if explore is not None:
        explore = np.asarray(explore, dtype=np.int64)
        if explore.shape != (U,) or explore.max(initial=-1) >= C or explore.min(initial=-1) < -1:
            raise ValueError(f"explore must have shape ({U},) with categories in [-1, {C}); got {explore!r}")
        lead = np.concatenate([lead, explore[:, None]], axis=1)
    # variants: 0 = greedy under prices, 1 = unpriced greedy, 2.. = led by lead[:, j] (the last one by
    # explore when given; -1 leads nothing: a repeat of the greedy one, masked out below)
    n_var = 2 + lead.shape[1]
    V = n_var * B
    price_on = np.array([1.0, 0.0] + [1.0] * lead.shape[1])
    forced = np.concatenate([np.full((U, 2), -1), lead], axis=1)  # (U, n_var)

    ka = space.kernel_args
    if U == 1 and ka.R == R:  # one request: the compiled kernel, equal to the numpy steps below
        from . import _kernels

        f8 = np.float64
        out = _kernels.candidates_one(
            _arg(tbl.mean_score[0], f8), _arg(tbl.n_shown[0], f8), _arg(tbl.n_tail[0], f8), ka.category_value,
            ka.n_blocks, ka.mod_of, _arg(prices, f8), ka.weight_sum, ka.n_items, ka.n_modules, ka.position_weights,
            _arg(forced[0], np.int64), price_on, ka.kind, ka.target, ka.slot_share)
        cats, blks, mods, tilt, value, exposure, mask = (a[None] for a in out)
    else:
        cat_p, tail_p, mod_p = _exposure_terms(space, prices, tbl)
        # module index of (c, r) — a (C, R) table, -1 where the category has fewer modules
        mod_of = np.full((C, R), -1, dtype=np.int64)
        for c, mods_c in enumerate(space.modules_of):
            mod_of[c, :len(mods_c)] = mods_c
        cats, blks, mods, tilt, value, exposure, mask = _candidates_numpy(
            space, tbl, cat_p, tail_p, mod_p, mod_of, forced, price_on)
    if V > max_candidates:
        # keep the best max_candidates real ones by priced score (greedy is always kept)
        sc = value + (exposure @ prices if K else 0.0)
        if explore is not None:  # the untilted explore variant stays
            sc[:, (n_var - 1) * B] = np.inf
        sc = np.where(mask, sc, -np.inf)
        keep = np.argsort(-sc, axis=1, kind="stable")[:, :max_candidates]
        keep.sort(axis=1)

        def take(a: np.ndarray) -> np.ndarray:
            return np.take_along_axis(a, keep.reshape(U, -1, *([1] * (a.ndim - 2))), axis=1)

        cats, blks, mods, value, exposure, mask = (take(cats), take(blks), take(mods), take(value),
                                                   take(exposure), take(mask))
        tilt = take(tilt)
    return Candidates(cats, blks, mods, np.ascontiguousarray(tilt), value, exposure, mask)


def _candidates_numpy(space: LayoutSpace, tbl: BlockTable, cat_p: np.ndarray, tail_p: float, mod_p: np.ndarray,
                      mod_of: np.ndarray, forced: np.ndarray, price_on: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`build_candidates`' greedy fill and its candidates' modules, exposure and mask for a batch
    of users, in numpy (:func:`allocator._kernels.candidates_one` is the same for one)."""
    U, B, C, R = tbl.mean_score.shape
    S = space.n_slots
    w = space.position_weights
    n_var = forced.shape[1]
    V = n_var * B
    block_val = np.nan_to_num(tbl.mean_score, nan=-np.inf) * space.category_value[None, None, :, None]  # (U,B,C,R)
    avail = (tbl.n_shown > 0) & (np.arange(R)[None, None, None, :] < space.n_blocks[None, None, :, None])
    mod_p_cr = np.where(mod_of >= 0, mod_p[np.maximum(mod_of, 0)], 0.0)  # (C,R)
    # state per (U, var, B)
    used = np.zeros((U, n_var, B, C), dtype=np.int64)
    cats = np.zeros((U, n_var, B, S), dtype=np.int64)
    blks = np.zeros((U, n_var, B, S), dtype=np.int64)
    value = np.zeros((U, n_var, B))
    ok = np.ones((U, n_var, B), dtype=bool)
    # the tables gathered by flat index ((u*B + b)*C + c)*R + r against the per-state block index
    # (U, var, B, C), and one category per state picked by flat index too: one take per table and slot,
    # no copies of the tables per variant (fancy indexing with four index grids costs several times more)
    base = ((np.arange(U)[:, None, None, None] * B + np.arange(B)[None, None, :, None]) * C
            + np.arange(C)[None, None, None, :]) * R
    bv_flat, av_flat, nt_flat = np.ravel(block_val), np.ravel(avail), np.ravel(tbl.n_tail)
    mp_flat, mp_base = np.ravel(mod_p_cr), np.arange(C) * R
    state_base = np.arange(U * n_var * B) * C
    used_flat = used.reshape(-1)  # a view: writes go to used
    for s in range(S):
        # next block of each category for each state: used[..., c]
        r_next = used  # (U,var,B,C)
        in_range = r_next < R
        r_idx = np.minimum(r_next, R - 1)
        at_table = base + r_idx
        bv = bv_flat[at_table]
        av = av_flat[at_table]
        av &= in_range
        nt = nt_flat[at_table]
        mp = mp_flat[mp_base + r_idx]
        gain_val = w[s] * bv
        gain_price = w[s] * cat_p[None, None, None, :] + tail_p * nt + w[s] * mp
        gain = gain_val + price_on[None, :, None, None] * gain_price
        gain = np.where(av, gain, -np.inf)
        pick = np.argmax(gain, axis=-1)  # (U,var,B)
        if s == 0:
            f = forced[:, :, None].repeat(B, 2)
            pick = np.where(f >= 0, f, pick)
        at = state_base + pick.reshape(-1)
        got_av = av.reshape(-1)[at].reshape(U, n_var, B)
        ok &= got_av
        value += np.where(got_av, gain_val.reshape(-1)[at].reshape(U, n_var, B), 0.0)
        cats[..., s] = pick
        r_at = used_flat[at]
        blks[..., s] = r_at.reshape(U, n_var, B)
        used_flat[at] = r_at + 1

    cats_l, blks_l = cats.reshape(U, V, S), blks.reshape(U, V, S)
    tilt = np.broadcast_to(np.arange(B)[None, None, :], (U, n_var, B)).reshape(U, V)
    mods = mod_of[cats_l, np.minimum(blks_l, R - 1)]
    exposure = _exposure(space, tbl, cats_l, blks_l, mods, tilt)
    mask = ok.reshape(U, V) & _first_occurrence(cats_l, tilt)
    return cats_l, blks_l, mods, tilt, value.reshape(U, V), exposure, mask


def _first_occurrence(cats: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """Shape (U, L): False for a candidate identical to an earlier one of the same user."""
    U, L, S = cats.shape
    radix = int(max(cats.max(initial=0), tilt.max(initial=0))) + 1
    if S * np.log2(radix) + np.log2(radix) < 62:  # each candidate as one int: a sort finds the repeats
        key = tilt.astype(np.int64)
        for s in range(S):
            key = key * radix + cats[..., s]
        order = np.argsort(key, axis=1, kind="stable")
        sk = np.take_along_axis(key, order, axis=1)
        first = np.ones((U, L), dtype=bool)
        first[:, 1:] = sk[:, 1:] != sk[:, :-1]
        out = np.empty((U, L), dtype=bool)
        np.put_along_axis(out, order, first, axis=1)
        return out
    key3 = np.concatenate([cats, tilt[..., None]], axis=-1)  # (U,L,S+1)
    same = (key3[:, :, None, :] == key3[:, None, :, :]).all(-1)  # (U,L,L)
    earlier = np.tril(np.ones((L, L), dtype=bool), k=-1)
    return ~(same & earlier[None]).any(-1)


def _exposure(space: LayoutSpace, tbl: BlockTable, cats: np.ndarray, blks: np.ndarray, mods: np.ndarray,
              tilt: np.ndarray) -> np.ndarray:
    """Shape (U, L, K): exposure of each candidate in constraint order."""
    U, L, S = cats.shape
    K = space.n_constraints
    out = np.zeros((U, L, K))
    if K == 0:
        return out
    wn = space.position_weights / space.position_weights.sum()
    R = tbl.mean_score.shape[-1]
    B, C = tbl.mean_score.shape[1:3]
    at = ((np.arange(U)[:, None, None] * B + tilt[:, :, None]) * C + cats) * R + np.minimum(blks, R - 1)
    n_tail = np.ravel(tbl.n_tail)[at].sum(-1)
    n_shown = np.ravel(tbl.n_shown)[at].sum(-1)
    for k in range(K):
        kind, tgt = space.kind[k], space.target[k]
        if kind == 0:
            out[..., k] = ((cats == tgt) * wn).sum(-1)
        elif kind == 1:
            out[..., k] = n_tail / np.maximum(n_shown, 1)
        else:
            out[..., k] = ((mods == tgt) * wn).sum(-1)
    return out


def layout_items(space: LayoutSpace, tbl: BlockTable, user: int, categories: np.ndarray,
                 blocks: np.ndarray, tilt: int) -> list[np.ndarray]:
    """Pool positions shown in each slot of one layout (slot order), each of length <= K, best first
    (views of the table's order: copy one before changing it)."""
    order = tbl.order[user, tilt]
    K = space.items_per_module
    # the order is by category, a category's items at ranks 0, 1, ... from where its run starts: the
    # r-th block of category c is a slice of it
    starts = np.searchsorted(tbl.cat_sorted[user, tilt], np.arange(space.category_value.size + 1)).tolist()
    out = []
    for c, r in zip(categories.tolist(), blocks.tolist(), strict=True):
        lo = starts[c] + r * K
        out.append(order[lo:max(lo, min(lo + K, starts[c + 1]))])
    return out
