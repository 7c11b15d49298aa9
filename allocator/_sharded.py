"""Sharded planning: the dual method of :func:`allocator.plan_dual` with the users split into shards.

Only the K exposure rows couple users, so every quantity the dual method needs is a sum over users:
the smoothed dual ``g_tau`` and its gradient (the softmax policy's shares), the hard Lagrangian bound
``sum_u w_u max_l (v + a @ lambda)``, and the softmax plan's objective and shares.  A shard holds its
users' arrays and answers each pass with ``K + 2`` partial sums (smooth and hard maxima, K shares);
the driver adds them in shard order and runs the same L-BFGS-B, annealing and crossover as
:func:`plan_dual`.  Per dual evaluation the driver ships the K prices out and gets ``K + 2`` numbers
back from each shard, whatever the number of users.

The exact plan's crossover gathers only the *marginal* users (those whose best and runner-up
priced scores are within ``delta``): each shard returns the fixed users' objective and shares and
the marginal users' near-best candidates; the driver solves the same reduced LP as the
single-machine crossover.  Shards that are contiguous user ranges in order therefore reproduce
:func:`plan_dual` on the concatenated users up to floating-point summation order.

Shards are plain objects behind :class:`ShardMap` (``map(method, *args) -> one result per shard``):
:class:`LocalShards` runs them in this process (tests, one machine); ``policy_api.scale`` runs
them in Ray actors.  This module never imports Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from allocator._dual import (
    _MAX_CROSSOVER_VARS,
    _anneal,
    _check_args,
    _crossover_rounds,
    _DualProblem,
    _Infeasible,
    _reduced_lp,
    _smoothed_pass,
    _split_marginal,
)
from allocator._plan import (
    InfeasibilityDiagnosis,
    InfeasiblePlan,
    _bound_term,
    _chunks,
    _objective_and_shares,
    _precheck,
    _Problem,
    _rel_gap,
    _scores,
    _validate,
    _violation,
)

__all__ = ["ChunkedShard", "CompactShard", "LocalShards", "PlanShard", "ShardMap", "ShardedPlan", "plan_dual_sharded"]


class PlanShard:
    """One shard of a plan's users, kept in memory where it lives (a process, a Ray actor).

    Parameters
    ----------
    value
        Shape (n_users, n_cand), float32 or float64 (not copied).
    exposure
        Shape (n_users, n_cand, K), float32 or float64 (not copied when C-contiguous).
    weight
        Shape (n_users,): each user's traffic share of the *whole* plan (the weights of all shards
        together sum to 1), finite and >= 0.
    mask
        Shape (n_users, n_cand) bool, or None when every candidate is real.

    Examples
    --------
    >>> s = PlanShard(np.array([[3.0, 1.0]]), np.array([[[0.0], [1.0]]]), np.array([0.5]))
    >>> s.n_users, s.n_constraints, s.summary()[:2].tolist()
    (1, 1, [0.5, 2.0])
    """

    def __init__(self, value: np.ndarray, exposure: np.ndarray, weight: np.ndarray,
                 mask: np.ndarray | None = None) -> None:
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weight must be a 1-D array of finite traffic shares >= 0; got shape {w.shape} "
                             f"with min {float(np.min(w)) if w.size else float('nan')!r}")
        total = float(w.sum())
        k = np.asarray(exposure).shape[-1] if np.asarray(exposure).ndim == 3 else 0
        zeros = np.zeros(k)
        # _validate checks shapes, dtypes, finiteness and the mask; it wants weights summing to 1
        norm = w / total if total > 0 else np.full(w.shape, 1.0 / max(w.size, 1))
        self.p = _validate(value, exposure, norm, zeros, zeros, mask, None)._replace(weight=w)

    @classmethod
    def _checked(cls, value: np.ndarray, exposure: np.ndarray, weight: np.ndarray,
                 mask: np.ndarray | None) -> PlanShard:
        """A shard of arrays its caller has checked (a :class:`CompactShard`'s chunk): no validation pass."""
        s = cls.__new__(cls)
        n, n_cand, k = exposure.shape
        n_vars = n * n_cand if mask is None else int(mask.sum())
        zeros = np.zeros(k)
        s.p = _Problem(value, exposure, weight, zeros, zeros, None if n_vars == n * n_cand else mask,
                       tuple(f"constraint_{i}" for i in range(k)), n, n_cand, k, n_vars)
        return s

    @property
    def n_users(self) -> int:
        return self.p.n_users

    @property
    def n_constraints(self) -> int:
        return self.p.n_constraints

    def sizes(self) -> tuple[int, int]:
        """``(n_users, K)``."""
        return self.p.n_users, self.p.n_constraints

    def summary(self) -> np.ndarray:
        """``[sum w, n_vars, sum_u w_u min_l v, sum_u w_u (max_l v - min_l v), reach_lo (K), reach_hi (K)]``:
        what the driver needs before the first pass (the pre-check, the value scale, the weights)."""
        p = self.p
        floor = 0.0
        spread = 0.0
        lo = np.zeros(p.n_constraints)
        hi = np.zeros(p.n_constraints)
        for i0, i1 in _chunks(p.n_users):
            v = p.value[i0:i1].astype(np.float64)
            a = p.exposure[i0:i1]
            w = p.weight[i0:i1]
            if p.mask is None:
                vlo, vhi = v.min(axis=1), v.max(axis=1)
                hi += w @ a.max(axis=1)
                lo += w @ a.min(axis=1)
            else:
                mk = p.mask[i0:i1]
                vlo = np.where(mk, v, np.inf).min(axis=1)
                vhi = np.where(mk, v, -np.inf).max(axis=1)
                hi += w @ np.where(mk[:, :, None], a, -np.inf).max(axis=1)
                lo += w @ np.where(mk[:, :, None], a, np.inf).min(axis=1)
            floor += float(w @ vlo)
            spread += float(w @ (vhi - vlo))
        return np.concatenate([[float(p.weight.sum()), float(p.n_vars), floor, spread], lo, hi])

    def float32(self) -> bool:
        return bool(self.p.exposure.dtype == np.float32 or self.p.value.dtype == np.float32)

    def smoothed(self, prices: np.ndarray, tau: float) -> np.ndarray:
        """``[sum_u w_u tau logsumexp(s_u / tau), sum_u w_u max_l s_u, shares (K)]`` at ``prices``."""
        r = _smoothed_pass(self.p, np.asarray(prices, dtype=np.float64), float(tau))
        return np.concatenate([[r.smooth, r.hard], r.shares])

    def bound(self, prices: np.ndarray) -> float:
        """``sum_u w_u max_l (v + a @ prices)`` in float64 (the shard's part of the Lagrangian bound)."""
        p = self.p
        pc = np.asarray(prices, dtype=np.float64)
        total = 0.0
        for i0, i1 in _chunks(p.n_users):
            total += float(p.weight[i0:i1] @ _scores(p, i0, i1, pc, exact=True).max(axis=1))
        return total

    def softmax_totals(self, prices: np.ndarray, tau: float) -> np.ndarray:
        """``[objective, shares (K)]`` of the softmax policy at ``tau`` over this shard's users."""
        x = np.empty((self.p.n_users, self.p.n_cand))
        _smoothed_pass(self.p, np.asarray(prices, dtype=np.float64), float(tau), policy_out=x)
        obj, shares = _objective_and_shares(self.p, x)
        return np.concatenate([[obj], shares])

    def crossover_part(self, prices: np.ndarray, delta: float) -> CrossoverPart:
        """Users whose runner-up is more than ``delta`` behind take their argmax (summed here); the
        marginal users' near-best candidates go back to the driver's reduced LP."""
        p = self.p
        _, fixed_obj, fixed_shares, u, near_all = _split_marginal(p, prices, delta)
        ui, li = np.nonzero(near_all)
        gu = u[ui]
        return CrossoverPart(fixed_obj, fixed_shares, int(u.size), float(p.weight[u].sum()), ui,
                             p.weight[gu], p.value[gu, li].astype(np.float64),
                             p.exposure[gu, li].astype(np.float64))

    def crossover_count(self, prices: np.ndarray, delta: float) -> int:
        """How many near-best pairs :meth:`crossover_part` would send at ``(prices, delta)``: the driver
        asks first, so that a band too wide for the reduced LP ships nothing."""
        return int(np.count_nonzero(_split_marginal(self.p, prices, delta)[4]))

    def crossover_counts(self, prices: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """:meth:`crossover_count` for each band of ``deltas`` (shape (D,)), in one pass."""
        p = self.p
        pc = np.asarray(prices, dtype=np.float64)
        d = np.asarray(deltas, dtype=np.float64)
        out = np.zeros(d.size, dtype=np.int64)
        for i0, i1 in _chunks(p.n_users):
            s = _scores(p, i0, i1, pc)
            s.sort(axis=1)
            behind = s[:, -1:] - s  # >= 0, the best last; +inf on padding
            # a pair counts at band d when it and the user's runner-up are within d of the best
            key = np.maximum(behind, behind[:, -2:-1])
            out += np.bincount(np.searchsorted(d, key.ravel()), minlength=d.size + 1)[: d.size]
        return np.cumsum(out)

    def choose(self, prices: np.ndarray) -> np.ndarray:
        """Shape (n_users,): each user's priced argmax (what serving takes at these prices)."""
        p = self.p
        pc = np.asarray(prices, dtype=np.float64)
        return np.concatenate([_scores(p, i0, i1, pc, exact=True).argmax(axis=1)
                               for i0, i1 in _chunks(p.n_users)])


class ChunkedShard:
    """A shard that keeps no candidate arrays: every pass rebuilds its users chunk by chunk.

    ``make_chunk(i)`` returns chunk ``i`` as a :class:`PlanShard` (e.g. generated from a seed and
    ``i``, or read from a file); it must return the same users every time it is called. Each method
    answers like one :class:`PlanShard` over the concatenated chunks, holding one chunk in memory at
    a time, so a worker's memory does not grow with its users and the time per pass is the chunks'
    build time plus the pass itself. Sums over chunks are taken in chunk order, so the shard equals
    :class:`LocalShards` over the same chunks (one shard each) up to floating-point summation order.

    Parameters
    ----------
    make_chunk
        ``i -> PlanShard`` for ``i`` in ``range(n_chunks)``; it must pickle to travel to a Ray actor
        (``functools.partial`` of a module-level function or class).
    n_chunks
        Number of chunks, >= 1.

    Examples
    --------
    >>> from functools import partial
    >>> def chunk(i: int) -> PlanShard:
    ...     return PlanShard(np.array([[3.0, 1.0]]), np.array([[[0.0], [1.0]]]), np.array([0.5]))
    >>> s = ChunkedShard(chunk, 2)
    >>> s.sizes(), s.summary()[:2].tolist()
    ((2, 1), [1.0, 4.0])
    """

    def __init__(self, make_chunk: Callable[[int], PlanShard], n_chunks: int) -> None:
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f"n_chunks must be an integer >= 1; got {n_chunks!r}")
        self.make_chunk = make_chunk
        self.n_chunks = n_chunks
        self._sizes, self._summary, self._float32 = self._survey()

    def _survey(self) -> tuple[tuple[int, int], np.ndarray, bool]:
        """``(sizes, summary, float32)``: what the driver asks before the first dual pass, from one
        pass over the chunks."""
        parts = self._map("summary", with_sizes=True)
        ks = {k for _, k in parts[1]}
        if len(ks) != 1:
            raise ValueError(f"every chunk must have the same number of constraints K; got {sorted(ks)}")
        return (sum(n for n, _ in parts[1]), parts[1][0][1]), _add(parts[0]), any(parts[2])

    def _map(self, method: str, *args: Any, with_sizes: bool = False) -> tuple[list[Any], list[Any], list[Any]]:
        out, sizes, f32 = [], [], []
        for i in range(self.n_chunks):
            ch = self.make_chunk(i)
            out.append(getattr(ch, method)(*args))
            if with_sizes:
                sizes.append(ch.sizes())
                f32.append(ch.float32())
            del ch
        return out, sizes, f32

    def sizes(self) -> tuple[int, int]:
        """``(n_users, K)`` over all chunks."""
        return self._sizes

    def summary(self) -> np.ndarray:
        """As :meth:`PlanShard.summary`, over all chunks (computed once, when the shard is built)."""
        return self._summary.copy()

    def float32(self) -> bool:
        return self._float32

    def smoothed(self, prices: np.ndarray, tau: float) -> np.ndarray:
        return _add(self._map("smoothed", prices, tau)[0])

    def bound(self, prices: np.ndarray) -> float:
        total = 0.0
        for b in self._map("bound", prices)[0]:
            total += b
        return total

    def softmax_totals(self, prices: np.ndarray, tau: float) -> np.ndarray:
        return _add(self._map("softmax_totals", prices, tau)[0])

    def crossover_part(self, prices: np.ndarray, delta: float) -> CrossoverPart:
        parts: list[CrossoverPart] = self._map("crossover_part", prices, delta)[0]
        offsets = np.cumsum([0] + [pt.n_marginal for pt in parts[:-1]])
        k = self._sizes[1]
        return CrossoverPart(
            float(sum(pt.fixed_obj for pt in parts)), _add([pt.fixed_shares for pt in parts]),
            int(sum(pt.n_marginal for pt in parts)), float(sum(pt.marginal_weight for pt in parts)),
            np.concatenate([pt.row + o for pt, o in zip(parts, offsets, strict=True)]),
            np.concatenate([pt.weight for pt in parts]), np.concatenate([pt.value for pt in parts]),
            np.concatenate([pt.exposure.reshape(-1, k) for pt in parts]))

    def crossover_count(self, prices: np.ndarray, delta: float) -> int:
        return int(sum(self._map("crossover_count", prices, delta)[0]))

    def crossover_counts(self, prices: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        return np.sum(self._map("crossover_counts", prices, deltas)[0], axis=0)

    def choose(self, prices: np.ndarray) -> np.ndarray:
        return np.concatenate(self._map("choose", prices)[0])


class CompactShard(ChunkedShard):
    """A shard whose exposures are held as small integer counts: a quarter of float32's memory.

    A layout's exposure to a constraint is usually a count over the page: how many of its slots
    hold a live module, how many of its items are long-tail. Held as ``uint8`` counts with one unit
    per constraint (``exposure[u, l, k] = counts[u, l, k] * unit[k]``, e.g. ``unit = 1 / items on
    the page``), a user of 16 candidates and 8 constraints takes 128 bytes instead of 512, and a
    ``float16`` value (estimates of expected reward carry far more error than its 3 significant
    digits) 32 instead of 64. Every pass converts ``chunk_users`` users at a time to a float32
    :class:`PlanShard` (``counts * unit`` rounded to float32, the value widened to float32) and
    answers with its methods, so the shard solves exactly the problem of that float32 PlanShard
    (equal up to floating-point summation order across chunks).

    Parameters
    ----------
    value
        Shape (n_users, n_cand), float16, float32 or float64 (not copied).
    counts
        Shape (n_users, n_cand, K), an unsigned integer dtype (``uint8`` for counts up to 255).
    unit
        Shape (K,): the exposure of one count of each constraint, finite and > 0.
    weight
        Shape (n_users,), or one float: every user's traffic share (the weights of all shards
        together sum to 1).
    mask
        Shape (n_users, n_cand) bool, or None when every candidate is real.
    chunk_users
        Users converted at a time (memory per pass: 4 * n_cand * (K + 1) bytes per user of a chunk).

    Examples
    --------
    >>> s = CompactShard(np.array([[3.0, 1.0]]), np.array([[[0], [6]]], dtype=np.uint8), np.array([1 / 6]), 1.0)
    >>> s.sizes(), s.summary()[:2].tolist(), s.summary()[-1].round(6)
    ((1, 1), [1.0, 2.0], np.float64(1.0))
    """

    def __init__(self, value: np.ndarray, counts: np.ndarray, unit: np.ndarray, weight: np.ndarray | float,
                 mask: np.ndarray | None = None, chunk_users: int = 8192) -> None:
        v = np.asarray(value)
        if v.dtype not in (np.float16, np.float32, np.float64) or v.ndim != 2:
            raise ValueError(f"value must be a 2-D float16/float32/float64 array (n_users, n_cand); got "
                             f"dtype {v.dtype}, shape {v.shape}")
        c = np.asarray(counts)
        if not np.issubdtype(c.dtype, np.unsignedinteger) or c.ndim != 3 or c.shape[:2] != v.shape:
            raise ValueError(f"counts must be an unsigned integer array of shape (n_users, n_cand, K) = "
                             f"({v.shape[0]}, {v.shape[1]}, K); got dtype {c.dtype}, shape {c.shape}")
        u = np.asarray(unit, dtype=np.float64)
        if u.shape != (c.shape[2],) or not np.isfinite(u).all() or (u <= 0).any():
            raise ValueError(f"unit must hold K = {c.shape[2]} finite values > 0 (the exposure of one count); "
                             f"got {u.tolist()!r}")
        if np.ndim(weight) == 0:
            w_one = float(weight)
            if not math.isfinite(w_one) or w_one < 0:
                raise ValueError(f"weight must be a finite traffic share >= 0; got {w_one!r}")
            w: np.ndarray | float = w_one
        else:
            w = np.asarray(weight, dtype=np.float64)
            if w.shape != (v.shape[0],):
                raise ValueError(f"weight must be one float or have shape (n_users,) = ({v.shape[0]},); "
                                 f"got shape {w.shape}")
        if isinstance(chunk_users, bool) or not isinstance(chunk_users, int) or chunk_users < 1:
            raise ValueError(f"chunk_users must be an integer >= 1; got {chunk_users!r}")
        if v.dtype != np.float64 and not all(np.isfinite(v[i0:i1]).all() for i0, i1 in _chunks(v.shape[0], 65536)):
            raise ValueError("value must be finite everywhere (fill padding with 0 and mark it in mask)")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape != v.shape or not mask.any(axis=1).all():
                raise ValueError(f"mask must be a bool array of shape {v.shape} with a real candidate for every "
                                 f"user; got dtype {mask.dtype}, shape {mask.shape}")
        self.value, self.counts, self.unit, self.weight, self.mask = v, c, u, w, mask
        self.chunk_users = chunk_users
        self._unit32 = u.astype(np.float32)
        super().__init__(self._chunk, max(1, -(-v.shape[0] // chunk_users)))

    def _survey(self) -> tuple[tuple[int, int], np.ndarray, bool]:
        """The summary taken on the counts: no float32 pass over the users."""
        n, k = int(self.value.shape[0]), int(self.counts.shape[2])
        floor = spread = w_sum = 0.0
        lo, hi = np.zeros(k), np.zeros(k)
        top = np.iinfo(self.counts.dtype).max
        for i0, i1 in _chunks(n, 65536):
            w = np.full(i1 - i0, self.weight) if isinstance(self.weight, float) else self.weight[i0:i1]
            v = self.value[i0:i1].astype(np.float32 if self.value.dtype == np.float16 else self.value.dtype)
            c = self.counts[i0:i1]
            if self.mask is None:
                vlo, vhi, cmin, cmax = _fold(v, np.minimum), _fold(v, np.maximum), _fold(c, np.minimum), _fold(c, np.maximum)
            else:
                mk = self.mask[i0:i1]
                vlo = _fold(np.where(mk, v, np.inf), np.minimum)
                vhi = _fold(np.where(mk, v, -np.inf), np.maximum)
                cmin = _fold(np.where(mk[:, :, None], c, top), np.minimum)
                cmax = _fold(np.where(mk[:, :, None], c, 0), np.maximum)
            lo += w @ np.multiply(cmin, self._unit32, dtype=np.float32)
            hi += w @ np.multiply(cmax, self._unit32, dtype=np.float32)
            floor += float(w @ vlo.astype(np.float64))
            spread += float(w @ (vhi.astype(np.float64) - vlo))
            w_sum += float(w.sum())
        n_vars = n * self.value.shape[1] if self.mask is None else int(self.mask.sum())
        return (n, k), np.concatenate([[w_sum, float(n_vars), floor, spread], lo, hi]), True

    def _chunk(self, i: int) -> PlanShard:
        i0 = i * self.chunk_users
        i1 = min(self.value.shape[0], i0 + self.chunk_users)
        a = np.multiply(self.counts[i0:i1], self._unit32, dtype=np.float32)
        v = self.value[i0:i1]
        if v.dtype == np.float16:
            v = v.astype(np.float32)
        w = np.full(i1 - i0, self.weight) if isinstance(self.weight, float) else self.weight[i0:i1]
        return PlanShard._checked(v, a, w, None if self.mask is None else self.mask[i0:i1])


def _fold(a: np.ndarray, op: np.ufunc) -> np.ndarray:
    """``op.reduce(a, axis=1)`` by halving the axis: whole contiguous blocks at a time, several times
    faster than numpy's reduction over a short middle axis."""
    while a.shape[1] > 1:
        h = a.shape[1] // 2
        head = op(a[:, :h], a[:, h : 2 * h])
        a = head if a.shape[1] == 2 * h else np.concatenate([head, a[:, 2 * h :]], axis=1)
    return a[:, 0]


class CrossoverPart(NamedTuple):
    """One shard's answer to a crossover round (see :meth:`PlanShard.crossover_part`)."""

    fixed_obj: float
    fixed_shares: np.ndarray  # (K,)
    n_marginal: int
    marginal_weight: float
    row: np.ndarray  # (n_p,) marginal user of each near-best pair, 0..n_marginal-1
    weight: np.ndarray  # (n_p,)
    value: np.ndarray  # (n_p,)
    exposure: np.ndarray  # (n_p, K)


class ShardMap(Protocol):
    """Where the shards live: ``map`` calls one :class:`PlanShard` method on every shard, in order."""

    @property
    def n_shards(self) -> int: ...

    def map(self, method: str, *args: Any) -> list[Any]: ...


class LocalShards:
    """Shards held in this process (tests, a single machine); the reference for other ShardMaps.

    Parameters
    ----------
    shards
        The shards (:class:`PlanShard` or :class:`ChunkedShard`), or callables that build one
        (called once, here).
    """

    def __init__(self, shards: Sequence[PlanShard | ChunkedShard | Callable[[], PlanShard | ChunkedShard]]) -> None:
        if len(shards) == 0:
            raise ValueError("shards must hold at least one shard; got none")
        self.shards = [s if isinstance(s, (PlanShard, ChunkedShard)) else s() for s in shards]

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def map(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]


@dataclass(frozen=True, eq=False)
class ShardedPlan:
    """A plan solved over shards: :class:`allocator.Plan` without ``x`` (it stays in the shards;
    serving recomputes each user's choice from the prices), plus the shard count.

    Attributes are those of :class:`allocator.Plan`; ``n_users`` and ``n_shards`` count the users
    and shards, ``iterations`` the passes over the shards.
    """

    prices: np.ndarray
    objective: float
    shares: np.ndarray
    status: str
    gap: float
    violation: float
    dual_bound: float
    n_vars: int
    n_users: int
    n_shards: int
    build_s: float
    solve_s: float
    iterations: int
    method: str
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for arr in (self.prices, self.shares):
            arr.setflags(write=False)


class _ShardedDual(_DualProblem):
    """The smoothed dual whose passes run on the shards (K prices out, K + 2 sums back per shard)."""

    def __init__(self, bounds: _Problem, shards: ShardMap, value_floor: float, scale: float,
                 float32: bool) -> None:
        super().__init__(bounds, value_floor, scale)
        self.shards = shards
        rel = 1e-5 if float32 else 1e-9
        self.margin = rel * (abs(value_floor) + scale) if math.isfinite(value_floor) else 0.0
        self.last_y = np.zeros(self.n_mult)

    def __call__(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        self.last_y = np.array(y, dtype=np.float64)
        lam = self.prices(y)
        tot = _add(self.shards.map("smoothed", lam, self.tau))
        self.n_passes += 1
        smooth, hard, shares = float(tot[0]), float(tot[1]), tot[2:]
        lin = self.linear(y)
        if self.mult_cap is None and hard + lin < self.value_floor - self.margin:
            raise _Infeasible
        grad = np.concatenate(
            [shares[self.floors] - self.p.lower[self.floors], self.p.upper[self.caps] - shares[self.caps]]
        )
        return smooth + lin, grad


def _add(parts: Sequence[np.ndarray]) -> np.ndarray:
    out = np.array(parts[0], dtype=np.float64, copy=True)
    for x in parts[1:]:
        out += x
    return out


def _bounds_problem(lower: np.ndarray, upper: np.ndarray, names: tuple[str, ...],
                    reach_lo: np.ndarray, reach_hi: np.ndarray) -> _Problem:
    """A one-user stand-in carrying the bounds; its two candidates span the shards' reachable range,
    so the single-machine pre-check applies unchanged."""
    k = lower.size
    exposure = np.stack([reach_lo, reach_hi])[None]  # (1, 2, K)
    return _Problem(np.zeros((1, 2)), exposure, np.ones(1), lower, upper, None, names, 1, 2, k, 2)


def _check_bounds(lower: object, upper: object, k: int, names: Sequence[str] | None
                  ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    # the single-machine validation, on a one-user problem of the same K
    p = _validate(np.zeros((1, 1)), np.zeros((1, 1, k)), np.ones(1), lower, upper, None, names)
    return p.lower, p.upper, p.names


def plan_dual_sharded(
    shards: ShardMap,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    names: Sequence[str] | None = None,
    tol: float = 1e-6,
    temperature: float | None = None,
    max_iter: int = 500,
    time_limit: float | None = None,
    start: np.ndarray | None = None,
) -> ShardedPlan:
    """Solve the planning LP over users held in shards, by the dual method of :func:`plan_dual`.

    Parameters
    ----------
    shards
        A :class:`ShardMap` of :class:`PlanShard` (their weights together sum to 1).
    lower, upper, names, tol, temperature, max_iter, time_limit
        As in :func:`allocator.plan_dual`.
    start
        Shape (K,): prices to start from (a warm start), e.g. the plan of a random sample of the
        same users or the last plan's. The plan is then crossed over at once around these prices
        (a band of near-best pairs wide enough for their error, as the reduced LP takes; see
        ``_warm_crossover``): 3–5 passes instead of dozens when they are close. When that does not
        certify the plan, the dual is minimised at the last temperature from ``start``. Either way
        the result is the same optimum (the Lagrangian bound certifies it). With ``temperature``,
        the softmax plan's minimisation starts from ``start``.

    Returns
    -------
    ShardedPlan
        Equal to ``plan_dual`` on the concatenated users (shards in order) up to floating-point
        summation order; ``x`` is not gathered. When no crossover at the last temperature certifies
        the plan (with many users the band can hold more pairs than the reduced LP takes), up to two
        colder temperatures are tried before falling back to the softmax plan.

    Raises
    ------
    InfeasiblePlan
        When the pre-check fails, or the dual bound proves that no plan meets the bounds (the
        diagnosis then names the constraints whose multipliers grew; no relaxation is computed).

    Examples
    --------
    >>> s = LocalShards([PlanShard(np.array([[3.0, 1.0]]), np.array([[[0.0], [1.0]]]), np.array([1.0]))])
    >>> plan = plan_dual_sharded(s, np.array([1 / 3]), np.array([np.inf]))
    >>> round(plan.objective, 9), plan.prices.round(9).tolist(), plan.status
    (2.333333333, [2.0], 'optimal')
    """
    _check_args(tol, temperature, max_iter)
    t0 = time.perf_counter()
    sizes = shards.map("sizes")
    ks = {int(k) for _, k in sizes}
    if len(ks) != 1:
        raise ValueError(f"every shard must have the same number of constraints K; got {sorted(ks)}")
    k = ks.pop()
    lo, hi, nm = _check_bounds(lower, upper, k, names)
    summ = shards.map("summary")
    tot = _add(summ)
    w_total, n_vars, value_floor, spread = float(tot[0]), int(round(tot[1])), float(tot[2]), float(tot[3])
    if abs(w_total - 1.0) > 1e-6:
        raise ValueError(f"weight must sum to 1 over all shards (traffic shares); got sum {w_total!r}")
    n_users = int(sum(n for n, _ in sizes))
    f32 = any(shards.map("float32"))
    bp = _bounds_problem(lo, hi, nm, tot[4 : 4 + k], tot[4 + k :])
    pre = _precheck(bp)
    if pre is not None:
        raise InfeasiblePlan(pre)
    scale = spread if spread > 0 else 1.0
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dp = _ShardedDual(bp, shards, value_floor, scale, f32)

    def refuse() -> None:
        raise InfeasiblePlan(_dual_diagnosis(bp, dp)) from None

    def done(prices: np.ndarray, obj: float, shares: np.ndarray, status: str, gap: float, viol: float,
             bound: float, method: str) -> ShardedPlan:
        return ShardedPlan(prices=prices, objective=obj, shares=shares, status=status, gap=gap, violation=viol,
                           dual_bound=bound, n_vars=n_vars, n_users=n_users, n_shards=shards.n_shards,
                           build_s=build_s, solve_s=time.perf_counter() - t0, iterations=dp.n_passes,
                           method=method, names=nm)

    def lagrangian(prices: np.ndarray) -> float:
        dp.n_passes += 1
        return float(sum(shards.map("bound", prices))) + _bound_term(bp, np.asarray(prices, dtype=np.float64))

    def cross(center: np.ndarray, delta: float) -> _Cross | None:
        dp.n_passes += 1  # the count pass before the gather
        return _crossover(bp, shards, center, delta, time_limit)

    if start is not None:
        start = _check_start(start, k)
        if temperature is None:
            warm = _warm_crossover(bp, dp, shards, start, scale, tol, time_limit, lagrangian)
            if warm is not None:
                gap, viol, cx, bound = warm
                return done(cx.prices if cx.prices is not None else start, cx.objective, cx.shares, "optimal",
                            gap, viol, bound, "sharded-dual-warm-crossover")
    y0 = None if start is None else _multipliers(dp, start)
    prices, tau = _anneal(dp, scale, temperature, tol, max_iter, refuse, y0)

    def softmax(exact: bool) -> ShardedPlan:
        tot = _add(shards.map("softmax_totals", prices, tau))
        bound = lagrangian(prices)
        dp.n_passes += 1
        obj, shares = float(tot[0]), tot[1:]
        viol = _violation(bp, shares)
        gap = _rel_gap(bound, obj)
        ok = viol <= tol and (gap <= tol or not exact)
        return done(prices, obj, shares, "optimal" if ok else "iteration_limit", gap, viol, bound,
                    f"sharded-dual-lbfgs-softmax(tau={tau:.3g})")

    if temperature is not None:
        return softmax(exact=False)

    best, bound = _crossover_rounds(bp, dp, prices, tau, tol, cross, lagrangian)
    for _ in range(_COLDER_DECADES):
        if best is not None and best[0] <= tol and best[1] <= tol:
            break
        # many users: the crossover band at this temperature can hold more pairs than the reduced LP
        # takes; a colder temperature narrows the band (and shrinks the softmax plan's gap with it)
        tau /= 10.0
        try:
            y = dp.minimise(_multipliers(dp, prices), tau, gtol=1e-6, max_iter=max_iter)
        except _Infeasible:
            refuse()
        prices = dp.prices(y)
        best, bound = _crossover_rounds(bp, dp, prices, tau, tol, cross, lagrangian)
    if best is not None and best[1] <= tol:
        gap, viol, cx = best
        return done(cx.prices if cx.prices is not None else prices, cx.objective, cx.shares,
                    "optimal" if gap <= tol else "iteration_limit", gap, viol, bound,
                    "sharded-dual-lbfgs+crossover")
    return softmax(exact=True)


#: Colder temperatures (each a tenth of the last) tried when no crossover certifies the plan.
_COLDER_DECADES = 2

#: Bands tried for a warm start's crossover, in units of the value spread (one counting pass).
_WARM_BANDS = 10.0 ** np.arange(-8.0, -0.5, 0.125)
#: Crossover rounds from a warm start before falling back to the dual's minimisation.
_WARM_ROUNDS = 4
#: Near-best pairs a warm start's reduced LP may take: its band must cover the start's error, so it
#: takes more than the cold crossover's (HiGHS solves ~10^6 such pairs in about half a minute here).
_MAX_WARM_CROSSOVER_VARS = 2_000_000


def _warm_crossover(bp: _Problem, dp: _ShardedDual, shards: ShardMap, start: np.ndarray, scale: float, tol: float,
                    time_limit: float | None, lagrangian: Callable[[np.ndarray], float]
                    ) -> tuple[float, float, _Cross, float] | None:
    """Cross over straight from warm-start prices: the widest band of ``_WARM_BANDS`` whose near-best
    pairs the reduced LP takes (one pass counts them for every band), first at the cold crossover's
    size; when that does not certify the plan, from the start again with a band of up to
    ``_MAX_WARM_CROSSOVER_VARS`` pairs (the start is further from the optimum than the narrow band),
    then recentred on the reduced LP's prices until the Lagrangian bound certifies the gap.
    ``(gap, violation, crossover, bound)``, or None when no round certifies the plan (the caller
    minimises the dual from ``start``)."""
    deltas = scale * _WARM_BANDS
    counts = np.sum(shards.map("crossover_counts", start, deltas), axis=0)
    dp.n_passes += 1
    center = start
    bound = math.inf
    for cap in (_MAX_CROSSOVER_VARS, *[_MAX_WARM_CROSSOVER_VARS] * (_WARM_ROUNDS - 1)):
        # a recentred round keeps the last count (the band barely moves): a margin for the change
        fits = np.flatnonzero(counts <= (cap if center is start else cap / 1.5))
        if fits.size == 0:
            return None
        cx = _crossover(bp, shards, center, float(deltas[fits[-1]]), time_limit, counted=True, cap=cap)
        dp.n_passes += 1
        if cx is not None:  # no marginal user at all: the start's own bound certifies the argmax plan
            bound = min(bound, lagrangian(center if cx.prices is None else cx.prices))
            gap, viol = _rel_gap(bound, cx.objective), _violation(bp, cx.shares)
            if gap <= tol and viol <= tol:
                return gap, viol, cx, bound
        if cap == _MAX_WARM_CROSSOVER_VARS:
            if cx is None or cx.prices is None:
                return None
            center = cx.prices  # recentre a wide band's round; a narrow band's prices can be far off
    return None


def _check_start(start: object, k: int) -> np.ndarray:
    s = np.asarray(start, dtype=np.float64)
    if s.shape != (k,) or not np.isfinite(s).all():
        raise ValueError(f"start must hold K = {k} finite prices; got {s.tolist()!r}")
    return s


def _multipliers(dp: _ShardedDual, prices: np.ndarray) -> np.ndarray:
    """Multipliers ``y`` (floors, then caps; all >= 0) whose prices are ``prices``."""
    return np.concatenate([np.maximum(prices[dp.floors], 0.0), np.maximum(-prices[dp.caps], 0.0)])


class _Cross(NamedTuple):
    objective: float
    shares: np.ndarray
    prices: np.ndarray | None


def _crossover(bp: _Problem, shards: ShardMap, prices: np.ndarray, delta: float,
               time_limit: float | None, counted: bool = False, cap: int = _MAX_CROSSOVER_VARS) -> _Cross | None:
    """The single-machine crossover's reduced LP over the marginal users gathered from the shards.

    The shards first count their near-best pairs (unless the caller has: ``counted``); past the
    reduced LP's size nothing is gathered (a wide band over many users would otherwise ship most of
    their candidates)."""
    if not counted and sum(shards.map("crossover_count", prices, delta)) > cap:
        return None
    parts: list[CrossoverPart] = shards.map("crossover_part", prices, delta)
    k = bp.n_constraints
    fixed_obj = float(sum(pt.fixed_obj for pt in parts))
    fixed_shares = _add([pt.fixed_shares for pt in parts])
    n_users = sum(pt.n_marginal for pt in parts)
    if n_users == 0:
        return _Cross(fixed_obj, fixed_shares, None) if _violation(bp, fixed_shares) == 0.0 else None
    offsets = np.cumsum([0] + [pt.n_marginal for pt in parts[:-1]])
    ui = np.concatenate([pt.row + o for pt, o in zip(parts, offsets, strict=True)])
    n_p = ui.size
    if n_p > cap:
        return None
    w = np.concatenate([pt.weight for pt in parts])
    val = np.concatenate([pt.value for pt in parts])
    expo = np.concatenate([pt.exposure for pt in parts]).reshape(n_p, k)
    red = _reduced_lp(bp, ui, n_users, w, val, expo, float(sum(pt.marginal_weight for pt in parts)), fixed_shares,
                      time_limit)
    if red is None:
        return None
    z, lp_prices = red
    obj = fixed_obj + float((w * z) @ val)
    shares = fixed_shares + (w * z) @ expo
    return _Cross(obj, shares, lp_prices)


def _dual_diagnosis(bp: _Problem, dp: _ShardedDual) -> InfeasibilityDiagnosis:
    """The dual bound fell below every plan's value: name the constraints whose multipliers grew
    (the support of the certificate)."""
    ks = np.concatenate([dp.floors, dp.caps])[dp.last_y > 0]
    names = tuple(bp.names[i] for i in ks.tolist())
    return InfeasibilityDiagnosis(conflicting=tuple(dict.fromkeys(names)), relaxations=(), alternatives=(),
                                  relaxed_lower=bp.lower.copy(), relaxed_upper=bp.upper.copy(),
                                  total_relaxation=math.inf, method="sharded-dual-bound")
