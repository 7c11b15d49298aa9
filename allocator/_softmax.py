"""Serving the plan by a softmax of priced values, not their argmax.

Serving ``argmax_j (value_j + price . exposure_j)`` makes every constraint's realised share a step
function of its price: users whose best layouts are nearly tied (every user the engine knows nothing
about) all switch at the same price, so a share jumps from 0.05 to 0.45 and no controller can hold it at
0.10. The entropy-regularised allocation LP has the same prices as its dual and serves

    q_j  proportional to  exp((value_j + price . exposure_j) / tau),   tau = temperature * max_j |value_j|,

which mixes near-ties in the proportions that meet the constraints, keeps clearly better layouts
(the value given up is at most ``tau * log J`` per request, and much less where one layout stands out),
and makes each share a smooth function of the prices, with the closed-form sensitivity
``d share_k / d price_k = E_users[Var_q(exposure_k) / tau]`` that the pacer needs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exploit_pmf", "exploitable", "serving_pmf", "softmax_prices", "softmax_response"]


def exploitable(tilt: np.ndarray, mask: np.ndarray, tail_goal: bool) -> np.ndarray:
    """Which candidates the exploit softmax may serve: every real one where a long-tail constraint
    asks for tilted layouts; otherwise only each row's least tilted real candidates. A tilted layout
    trades value for long-tail exposure (it never scores above its untilted twin); without a goal for
    that exposure the softmax would still mix it in as a near-tie, so it is left to the exploration
    budget.

    ``tilt``: (J,) or (n, J) tilt level of each candidate; ``mask``: same shape, real candidates.
    Returns a bool array of that shape, inside ``mask``, with a candidate in every row that has one.
    """
    m = np.asarray(mask, dtype=bool)
    if tail_goal:
        return m.copy()
    t = np.where(m, np.asarray(tilt, dtype=np.float64), np.inf)
    return m & (t == t.min(axis=-1, keepdims=True))


def _tau(value: np.ndarray, mask: np.ndarray, temperature: float) -> np.ndarray:
    """(n, 1) temperatures: ``temperature`` times the largest |value| among each row's real candidates."""
    scale = np.max(np.where(mask, np.abs(value), 0.0), axis=1, keepdims=True)
    return temperature * np.maximum(scale, 1e-12)


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[None, :] if x.ndim == 1 else x


def exploit_pmf(priced: np.ndarray, value: np.ndarray, temperature: float,
                mask: np.ndarray | None = None) -> np.ndarray:
    """The layout distribution exploited at these prices: a softmax of ``priced`` at
    ``tau = temperature * max |value|`` (per row), or the argmax (lowest index on ties) at temperature 0.

    ``priced``, ``value``: shape (J,) or (n, J); ``mask`` (same shape, bool) marks real candidates of
    padded rows. Returns float64 of the same shape, rows summing to 1, 0 outside the mask.

    Examples
    --------
    >>> exploit_pmf(np.array([1.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0]), 0.0).tolist()
    [1.0, 0.0, 0.0]
    >>> exploit_pmf(np.array([1.0, 1.0, 1.0 - np.log(2) / 10]), np.full(3, 10.0), 0.01).round(3).tolist()
    [0.4, 0.4, 0.2]
    """
    one = np.ndim(priced) == 1
    s, v = _rows(priced), _rows(value)
    m = np.ones(s.shape, dtype=bool) if mask is None else _rows(mask).astype(bool)
    if not (s.shape == v.shape == m.shape):
        raise ValueError(f"priced, value and mask must have one shape; got {s.shape}, {v.shape}, {m.shape}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
    if not m.any(axis=1).all():
        raise ValueError("every row needs at least one real candidate")
    s = np.where(m, s, -np.inf)
    if temperature == 0:
        out = np.zeros(s.shape)
        out[np.arange(s.shape[0]), np.argmax(s, axis=1)] = 1.0
    else:
        z = (s - s.max(axis=1, keepdims=True)) / _tau(v, m, temperature)
        e = np.where(m, np.exp(z), 0.0)
        out = e / e.sum(axis=1, keepdims=True)
    return out[0] if one else out


def serving_pmf(base: np.ndarray, exploit: np.ndarray, budget: float, value: np.ndarray | None = None,
                max_value_loss: float | None = None) -> np.ndarray:
    """The served pmf: the exploration pmf ``base`` budgeted toward each exploited layout, mixed by
    ``exploit``: ``sum_j exploit_j * budget_pmf(base, j, ...)`` in closed form,

        ``pmf = (sum_j exploit_j s_j) base + exploit * (1 - s)``,

    with ``s_j = min(1, budget / (1 - base_j), max_value_loss |value_j| / (value_j - base . value))``
    (terms with a non-positive denominator drop out), as :func:`bandits.budget_pmf` mixes toward one
    greedy layout. Shapes (J,) or (n, J); padding entries are 0 in ``base`` and ``exploit``.

    Examples
    --------
    >>> serving_pmf(np.array([0.5, 0.5]), np.array([1.0, 0.0]), 0.1).round(3).tolist()
    [0.9, 0.1]
    """
    one = np.ndim(base) == 1
    b, q = _rows(base), _rows(exploit)
    if b.shape != q.shape:
        raise ValueError(f"base and exploit must have one shape; got {b.shape} and {q.shape}")
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1]; got {budget!r}")
    b = b / b.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        off = 1.0 - b
        s = np.where(off > 0, budget / off, np.inf)
        if max_value_loss is not None:
            if value is None:
                raise ValueError("value is required when max_value_loss is set")
            v = _rows(value)
            gap = v - (b * v).sum(axis=1, keepdims=True)
            s = np.minimum(s, np.where(gap > 0, max_value_loss * np.abs(v) / gap, np.inf))
    s = np.minimum(s, 1.0)
    out = (q * s).sum(axis=1, keepdims=True) * b + q * (1.0 - s)
    out = out / out.sum(axis=1, keepdims=True)
    return out[0] if one else out


def softmax_response(value: np.ndarray, exposure: np.ndarray, prices: np.ndarray, temperature: float,
                     weight: np.ndarray | None = None, mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Shares served at ``prices`` and their sensitivity to each constraint's own price.

    ``value`` (n, J), ``exposure`` (n, J, K), ``prices`` (K,), ``weight`` (n,) traffic weights (uniform
    if None), ``mask`` (n, J). Returns ``shares`` (K,) = ``sum_i w_i q_i . exposure_ik`` and
    ``d shares_k / d price_k`` (K,) = ``sum_i w_i Var_{q_i}(exposure_ik) / tau_i`` (exact for the softmax;
    0 at temperature 0, where the response is a step).
    """
    v = np.asarray(value, dtype=np.float64)
    a = np.asarray(exposure, dtype=np.float64)
    m = np.ones(v.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n = v.shape[0]
    w = np.full(n, 1.0 / n) if weight is None else np.asarray(weight, dtype=np.float64) / np.sum(weight)
    priced = v + a @ np.asarray(prices, dtype=np.float64)
    q = exploit_pmf(priced, v, temperature, m)
    mean = np.einsum("nj,njk->nk", q, a)
    shares = w @ mean
    if temperature == 0:
        return shares, np.zeros_like(shares)
    var = np.einsum("nj,njk->nk", q, a * a) - mean * mean
    return shares, w @ (var / _tau(v, m, temperature))


def softmax_prices(value: np.ndarray, exposure: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                   temperature: float, weight: np.ndarray | None = None, mask: np.ndarray | None = None,
                   start: np.ndarray | None = None, max_price: float = 1e6,
                   box: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The prices at which softmax serving meets every bound: the minimiser of the dual of the
    entropy-regularised allocation LP,

        ``D(p) = sum_i w_i tau_i logsumexp_j((value_ij + exposure_ij . p) / tau_i) - sum_k b_k(p_k)``,

    ``b_k(p) = p lower_k`` for ``p >= 0`` and ``p upper_k`` for ``p < 0`` (a floor's price is >= 0, a
    cap's <= 0). ``grad D = shares(p) - b'(p)``, so at the minimum every share is within its bounds and a
    price is nonzero only where its bound binds. Convex; solved with L-BFGS-B from ``start`` (e.g. the
    LP's prices). Shapes as in :func:`softmax_response`; ``lower``/``upper`` (K,) with -inf/+inf where
    absent. At temperature 0 this is the LP dual (use the LP). ``box``: (low, high) (K,) each price is
    kept within (a trust region around the last prices; the minimiser of D over that box).
    """
    import scipy.optimize

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    v = np.asarray(value, dtype=np.float64)
    a = np.asarray(exposure, dtype=np.float64)
    m = np.ones(v.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n, K = v.shape[0], a.shape[2]
    w = np.full(n, 1.0 / n) if weight is None else np.asarray(weight, dtype=np.float64) / np.sum(weight)
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    tau = _tau(v, m, temperature)  # (n, 1)
    vv = np.where(m, v, -np.inf)

    # p = P+ - P-: a nonnegative variable per finite floor and per finite cap keeps D smooth
    fl, cp = np.flatnonzero(np.isfinite(lo)), np.flatnonzero(np.isfinite(hi))
    L = np.zeros((K, fl.size + cp.size))
    L[fl, np.arange(fl.size)] = 1.0
    L[cp, fl.size + np.arange(cp.size)] = -1.0
    b = np.concatenate([lo[fl], -hi[cp]])

    def dual(x: np.ndarray) -> tuple[float, np.ndarray]:
        z = (vv + a @ (L @ x)) / tau
        top = z.max(axis=1, keepdims=True)
        e = np.where(m, np.exp(z - top), 0.0)
        tot = e.sum(axis=1, keepdims=True)
        lse = (top + np.log(tot))[:, 0]
        shares = w @ np.einsum("nj,njk->nk", e / tot, a)
        return float(w @ (tau[:, 0] * lse) - x @ b), L.T @ shares - b

    x0 = np.zeros(L.shape[1])
    if start is not None:
        p0 = np.asarray(start, dtype=np.float64)
        x0 = np.concatenate([np.maximum(p0[fl], 0.0), np.maximum(-p0[cp], 0.0)])
    xlo, xhi = np.zeros(L.shape[1]), np.full(L.shape[1], float(max_price))
    if box is not None:  # p = x_floor - x_cap: each part kept within the box's side of zero
        blo, bhi = (np.asarray(b, dtype=np.float64) for b in box)
        xlo = np.minimum(np.concatenate([np.maximum(blo[fl], 0.0), np.maximum(-bhi[cp], 0.0)]), max_price)
        xhi = np.clip(np.concatenate([np.maximum(bhi[fl], 0.0), np.maximum(-blo[cp], 0.0)]), xlo, max_price)
    res = scipy.optimize.minimize(dual, np.clip(x0, xlo, xhi), jac=True, method="L-BFGS-B",
                                  bounds=list(zip(xlo, xhi, strict=True)),
                                  options={"maxiter": 1000, "gtol": 1e-12, "ftol": 1e-15})
    return np.asarray(L @ res.x, dtype=np.float64)
