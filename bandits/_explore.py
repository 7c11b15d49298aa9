"""Exploration within a budget: the pmf that is actually sampled, and the deterministic draw.

Every function here works on one request (``pmf`` of shape ``(n_cand,)``) and, for replay, on a batch
of requests at once (``pmf`` of shape ``(n_rounds, n_cand)``, rows padded with 0 where a request had
fewer candidates). The pmf returned by :func:`budget_pmf` is the distribution that gets sampled, so
its entries are the propensities written to the decision log.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._num import is_integral, is_real

__all__ = [
    "EpsilonGreedy",
    "budget_pmf",
    "sample",
    "sample_batch",
    "softmax_pmf",
    "uniform_from_seed",
]

#: pmfs must sum to 1 within this (float32 pmfs from VW are accepted and renormalised).
PMF_ATOL = 1e-5
_MASK64 = (1 << 64) - 1


def _r(x: object) -> str:
    """repr of a user value, numpy scalars shown as plain numbers."""
    return repr(x.item() if isinstance(x, np.generic) else x)


# -- validation helpers -------------------------------------------------------------------------
def _check_unit(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {_r(x)}")
    return float(x)


def _check_pmf(pmf: object, name: str = "pmf") -> np.ndarray:
    """Float64 copy of a pmf (1-D or a 2-D batch of rows), renormalised after checking its sums."""
    p = np.array(pmf, dtype=np.float64)  # copy: callers' arrays are never modified
    if p.ndim not in (1, 2) or p.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (n_cand,) or (n_rounds, n_cand) with n_cand >= 1; "
                         f"got shape {p.shape}")
    low = p.min()
    if not low >= 0:  # NaN fails too
        if np.isnan(low):
            raise ValueError(f"{name} must be finite; got {int(np.isnan(p).sum())} NaN entries")
        raise ValueError(f"{name} must be >= 0; got min {float(low)!r}")
    if p.ndim == 1:
        total = float(p.sum())
        if not abs(total - 1.0) <= PMF_ATOL:  # inf fails too
            raise ValueError(f"{name} must sum to 1 (within {PMF_ATOL}); got sum {total!r}")
        p /= total
        return p
    totals = p.sum(axis=1, keepdims=True)
    bad = ~(np.abs(totals - 1.0) <= PMF_ATOL)
    if bad.any():
        raise ValueError(f"{name} must sum to 1 (within {PMF_ATOL}); got sum {float(totals[bad][0])!r}")
    p /= totals
    return p


def _check_greedy(greedy: object, p: np.ndarray) -> np.ndarray:
    n_cand = p.shape[-1]
    g = np.asarray(greedy)
    if g.dtype.kind not in "iu" or g.shape != p.shape[:-1]:
        raise ValueError(f"greedy must be an integer index of shape {p.shape[:-1]}; got {_r(greedy)}")
    if ((g < 0) | (g >= n_cand)).any():
        raise ValueError(f"greedy must be in [0, {n_cand}); got {_r(greedy)}")
    return g.astype(np.intp)


def _at(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """x[..., g] for one row (x 1-D, g scalar) or a batch (x 2-D, g 1-D)."""
    return np.take_along_axis(x, g[..., None], axis=-1)[..., 0]


# -- the budget ---------------------------------------------------------------------------------
def budget_pmf(pmf: np.ndarray, greedy: int | np.ndarray, budget: float,
               value: np.ndarray | None = None, max_value_loss: float | None = None, *,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Mix an exploration pmf toward the greedy candidate until it fits the exploration budget.

    The result is ``q = s * pmf + (1 - s) * e_greedy`` with the largest ``s`` in [0, 1] such that

    - mass off greedy: ``sum_{j != g} q_j = s * (1 - pmf_g) <= budget``, and, if ``max_value_loss``
      is set,
    - expected value given up: ``value_g - q @ value = s * (value_g - pmf @ value)
      <= max_value_loss * |value_g|``.

    So ``s = min(1, budget / (1 - pmf_g), max_value_loss * |value_g| / (value_g - pmf @ value))``
    (terms with a non-positive denominator drop out). Candidates with zero probability stay at zero;
    the greedy candidate takes the remainder. ``q`` is the distribution that gets sampled: its entries
    are the logged propensities.

    Parameters
    ----------
    pmf
        Shape (n_cand,) or (n_rounds, n_cand). Any exploration pmf (VW's, softmax, uniform); rows must
        sum to 1 within 1e-5 (they are renormalised). Padding entries are 0.
    greedy
        Index of the greedy candidate: an int, or shape (n_rounds,) for a batch.
    budget
        In [0, 1]: the most probability mass allowed off the greedy candidate.
    value
        Same shape as ``pmf``: each candidate's expected value (finite; padding 0). Required when
        ``max_value_loss`` is set.
    max_value_loss
        In [0, 1], or None: the most expected value that may be given up, as a share of
        ``|value[greedy]|``.
    mask
        Same shape as ``pmf``, bool, or None: the real candidates of padded rows (a batch of logged
        decisions with different candidate counts). ``pmf`` and ``value`` are read as 0 outside it,
        so a target policy's pmf over padded logged candidates is budgeted as serving budgets it.

    Returns
    -------
    np.ndarray
        Same shape as ``pmf``, float64, rows summing to 1.

    Examples
    --------
    >>> budget_pmf(np.array([0.25, 0.25, 0.5]), 2, 0.1).round(3).tolist()
    [0.05, 0.05, 0.9]
    >>> budget_pmf(np.array([[0.5, 0.5, 0.0]]), np.array([0]), 0.2, mask=np.array([[True, True, False]])).tolist()
    [[0.8, 0.2, 0.0]]
    """
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != np.shape(pmf):
            raise ValueError(f"mask must have the shape of pmf {np.shape(pmf)}; got {m.shape}")
        pmf = np.where(m, pmf, 0.0)
        if value is not None:
            value = np.where(m, value, 0.0)
    p = _check_pmf(pmf)
    g = _check_greedy(greedy, p)
    budget = _check_unit("budget", budget)
    if max_value_loss is not None:
        max_value_loss = _check_unit("max_value_loss", max_value_loss)
        if value is None:
            raise ValueError("value is required when max_value_loss is set; got value=None")
    if p.ndim == 1:  # one request: scalar arithmetic, same formula
        return _budget_one(p, int(g), budget, value, max_value_loss)
    p_g = _at(p, g)
    off = np.maximum(p.sum(axis=-1) - p_g, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(off > budget, budget / off, 1.0)
    if max_value_loss is not None:
        v = _check_value(value, p.shape)
        v_g = _at(v, g)
        loss = v_g - np.einsum("...j,...j->...", p, v)  # value given up by pmf itself
        cap = max_value_loss * np.abs(v_g)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(scale * loss > cap, cap / loss, scale)
    q = p * scale[:, None]
    np.put_along_axis(q, g[:, None], 0.0, axis=1)
    np.put_along_axis(q, g[:, None], (1.0 - q.sum(axis=1))[:, None], axis=1)
    return q


def _check_value(value: object, shape: tuple[int, ...]) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    if v.shape != shape:
        raise ValueError(f"value must have the shape of pmf {shape}; got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("value must be finite; got non-finite entries")
    return v


def _budget_one(p: np.ndarray, g: int, budget: float, value: object, max_value_loss: float | None) -> np.ndarray:
    off = max(float(p.sum()) - float(p[g]), 0.0)
    scale = budget / off if off > budget else 1.0
    if max_value_loss is not None:
        v = _check_value(value, p.shape)
        v_g = float(v[g])
        loss = v_g - float(p @ v)  # value given up by pmf itself
        cap = max_value_loss * abs(v_g)
        if scale * loss > cap:
            scale = cap / loss
    q = p * scale
    q[g] = 0.0
    q[g] = 1.0 - float(q.sum())
    return q


@dataclass(frozen=True, slots=True)
class EpsilonGreedy:
    """Epsilon-greedy whose off-greedy mass equals the budget exactly.

    ``pmf = (1 - eps) e_greedy + eps / n_cand`` puts ``eps (n_cand - 1) / n_cand`` off greedy, so
    ``eps = budget n_cand / (n_cand - 1)``, capped at 1 (uniform) when the budget exceeds
    ``(n_cand - 1) / n_cand``.

    Parameters
    ----------
    budget
        In [0, 1]: the probability mass off the greedy candidate.

    Examples
    --------
    >>> EpsilonGreedy(0.1).pmf(0, 5).round(3).tolist()
    [0.9, 0.025, 0.025, 0.025, 0.025]
    """

    budget: float = 0.05

    def __post_init__(self) -> None:
        _check_unit("budget", self.budget)

    def epsilon(self, n_cand: int | np.ndarray) -> float | np.ndarray:
        """The uniform share ``eps`` for ``n_cand`` candidates (0 when there is a single one)."""
        n = np.asarray(n_cand, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = np.where(n > 1, np.minimum(1.0, self.budget * n / (n - 1.0)), 0.0)
        return float(eps) if eps.ndim == 0 else eps

    def pmf(self, greedy: int, n_cand: int) -> np.ndarray:
        """Shape (n_cand,): the epsilon-greedy pmf for one request."""
        if not is_integral(n_cand) or n_cand < 1:
            raise ValueError(f"n_cand must be an integer >= 1; got {_r(n_cand)}")
        return self.pmf_batch(np.array([greedy]), np.ones((1, int(n_cand)), dtype=bool))[0]

    def pmf_batch(self, greedy: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Shape (n_rounds, n_cand): one pmf per row over the candidates where ``mask`` is True.

        Parameters
        ----------
        greedy
            Shape (n_rounds,): the greedy index of each row (must be a real candidate).
        mask
            Shape (n_rounds, n_cand) bool: False marks padding, which gets probability 0.
        """
        m = np.asarray(mask)
        if m.dtype != bool or m.ndim != 2 or m.shape[1] == 0:
            raise ValueError(f"mask must be a bool array of shape (n_rounds, n_cand); got {m.dtype} "
                             f"{m.shape}")
        g = _check_greedy(greedy, m)
        if not _at(m, g).all():
            raise ValueError("greedy must index a real candidate (mask True); got a padded one")
        n = m.sum(axis=1)
        eps = np.asarray(self.epsilon(n))
        q = m * (eps / n)[:, None]
        np.put_along_axis(q, g[:, None], 0.0, axis=1)
        np.put_along_axis(q, g[:, None], (1.0 - q.sum(axis=1))[:, None], axis=1)
        return q


def softmax_pmf(scores: np.ndarray, temperature: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax of scores: ``pmf_j = exp(scores_j / T) / sum_k exp(scores_k / T)``.

    Parameters
    ----------
    scores
        Shape (n_cand,) or (n_rounds, n_cand). Finite where ``mask`` is True.
    temperature
        T > 0. Small T approaches the argmax, large T the uniform pmf.
    mask
        Same shape as ``scores``, bool, or None: False marks padding (probability 0).

    Examples
    --------
    >>> softmax_pmf(np.array([0.0, np.log(3.0)]), 1.0).round(6).tolist()
    [0.25, 0.75]
    """
    if not is_real(temperature) or not (0.0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a finite number > 0; got {_r(temperature)}")
    s = np.array(scores, dtype=np.float64)
    if s.ndim not in (1, 2) or s.shape[-1] == 0:
        raise ValueError(f"scores must have shape (n_cand,) or (n_rounds, n_cand); got {s.shape}")
    m = np.ones(s.shape, dtype=bool) if mask is None else np.asarray(mask)
    if m.dtype != bool or m.shape != s.shape:
        raise ValueError(f"mask must be a bool array of shape {s.shape}; got {m.dtype} {m.shape}")
    if not m.any(axis=-1).all():
        raise ValueError("mask must keep at least one candidate per row; got an all-False row")
    if not np.isfinite(s[m]).all():
        raise ValueError("scores must be finite where mask is True; got non-finite entries")
    z = np.where(m, s / float(temperature), -np.inf)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# -- the draw -----------------------------------------------------------------------------------
def uniform_from_seed(seed: int) -> float:
    """A uniform number in [0, 1) that is a pure function of a 64-bit seed.

    SplitMix64's output function (Steele, Lea & Flood 2014) mixes the seed; the top 53 bits give the
    uniform. Cheaper than building a ``np.random.Generator`` per request, and identical to
    :func:`sample_batch`'s vectorised version.

    References
    ----------
    G. L. Steele, D. Lea, C. H. Flood. "Fast splittable pseudorandom number generators." OOPSLA 2014.
    """
    if not is_integral(seed) or not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {_r(seed)}")
    z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


def _uniform_from_seeds(seeds: np.ndarray) -> np.ndarray:
    z = seeds.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # uint64 arrays wrap silently
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample(pmf: np.ndarray, seed: int) -> int:
    """Draw one candidate index from ``pmf``, deterministically given ``seed``.

    Inverse-CDF draw: the first ``j`` with ``cumsum(pmf)_j > u * sum(pmf)``, ``u`` =
    :func:`uniform_from_seed` (seed). Zero-probability candidates are never drawn, so the logged
    propensity ``pmf[j]`` is always > 0.

    Parameters
    ----------
    pmf
        Shape (n_cand,): sums to 1 within 1e-5.
    seed
        Integer in [0, 2**64), e.g. derived from the request id so any decision can be replayed.

    Examples
    --------
    >>> sample(np.array([0.0, 1.0, 0.0]), seed=7)
    1
    """
    p = _check_pmf(pmf)
    if p.ndim != 1:
        raise ValueError(f"pmf must have shape (n_cand,); got {p.shape} (use sample_batch)")
    c = np.cumsum(p)
    j = int(np.searchsorted(c, uniform_from_seed(seed) * c[-1], side="right"))
    return min(j, p.size - 1)


def sample_batch(pmf: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Vectorised :func:`sample`: row ``i`` drawn from ``pmf[i]`` with ``seeds[i]``.

    Parameters
    ----------
    pmf
        Shape (n_rounds, n_cand): rows sum to 1 within 1e-5 (padding 0).
    seeds
        Shape (n_rounds,), unsigned or non-negative integers.

    Returns
    -------
    np.ndarray
        Shape (n_rounds,), int64: ``sample_batch(pmf, seeds)[i] == sample(pmf[i], seeds[i])``.
    """
    p = _check_pmf(pmf)
    if p.ndim != 2:
        raise ValueError(f"pmf must have shape (n_rounds, n_cand); got {p.shape}")
    s = np.asarray(seeds)
    if s.dtype.kind not in "iu" or s.shape != p.shape[:1]:
        raise ValueError(f"seeds must be integers of shape {p.shape[:1]}; got {s.dtype} {s.shape}")
    if s.dtype.kind == "i" and (s < 0).any():
        raise ValueError(f"seeds must be >= 0; got min {int(s.min())}")
    c = np.cumsum(p, axis=1)
    x = _uniform_from_seeds(s) * c[:, -1]
    j = (c <= x[:, None]).sum(axis=1)
    return np.minimum(j, p.shape[1] - 1).astype(np.int64)
