"""Online pacing of the plan's prices: dual (mirror) descent on realised exposure.

The offline plan fixes prices on a sample of users; on live traffic the realised shares drift
(other users, bandit exploration, tilts).  After each batch of served requests the pacer takes one
projected step on the Lagrangian dual, whose gradient for the batch is ``shares - lower`` for a
floor multiplier and ``upper - shares`` for a cap multiplier::

    alpha_k <- clip(alpha_k - step_size * (shares_k - lower_k), 0, max_price)   (finite floors)
    beta_k  <- clip(beta_k  - step_size * (upper_k - shares_k), 0, max_price)   (finite caps)
    prices  =  alpha - beta

so a floor's price rises while the realised share is under its minimum and a cap's price falls
(more negative) while the share is over its maximum; the projection keeps floors' multipliers and
caps' multipliers non-negative.  With the Euclidean mirror map this is projected subgradient
descent, the setting of Balseiro et al. for online allocation with a constant step.

References
----------
Balseiro, S., Lu, H. and Mirrokni, V. (2020). Dual mirror descent for online allocation problems.
ICML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DualPacer", "PacerConfig"]


def _bound_tuple(name: str, values: Any) -> tuple[float, ...]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of K bounds; got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(
            f"{name} must not contain NaN (use -inf/+inf for an absent bound); got {arr.tolist()}"
        )
    return tuple(float(x) for x in arr)


def _check_bounds(config: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalise and check a pacer config's ``lower``, ``upper`` and ``names`` (frozen: set in place)."""
    lo = _bound_tuple("lower", config.lower)
    hi = _bound_tuple("upper", config.upper)
    object.__setattr__(config, "lower", lo)
    object.__setattr__(config, "upper", hi)
    object.__setattr__(config, "names", tuple(str(n) for n in config.names))
    if len(lo) != len(hi):
        raise ValueError(f"upper must have the same length as lower ({len(lo)}); got {len(hi)}")
    for k, (a, b) in enumerate(zip(lo, hi, strict=True)):
        if a > b:
            raise ValueError(
                f"lower must be <= upper for every constraint; got lower[{k}] = {a!r} > upper[{k}] = {b!r}"
            )
        if a == math.inf or b == -math.inf:
            raise ValueError(f"lower must be < +inf and upper > -inf; got ({a!r}, {b!r}) at index {k}")
    return lo, hi


def _check_start(config: Any, prices: np.ndarray | None) -> np.ndarray:
    """A pacer's start prices (zeros by default): (K,), finite, > 0 only on floors and < 0 only on caps."""
    k = config.n_constraints
    lo = np.array(config.lower)
    hi = np.array(config.upper)
    start = np.zeros(k) if prices is None else np.array(prices, dtype=np.float64)
    if start.shape != (k,) or not np.isfinite(start).all():
        raise ValueError(f"prices must be a finite array of shape (K,) = ({k},); got {start!r}")
    bad_pos = np.flatnonzero((start > 0) & ~np.isfinite(lo))
    bad_neg = np.flatnonzero((start < 0) & ~np.isfinite(hi))
    if bad_pos.size or bad_neg.size:
        k_bad = int(np.concatenate([bad_pos, bad_neg])[0])
        raise ValueError(
            "prices may be > 0 only on a constraint with a floor and < 0 only on one with a cap; "
            f"got prices[{k_bad}] = {float(start[k_bad])!r} with bounds ({float(lo[k_bad])!r}, {float(hi[k_bad])!r})"
        )
    return start


@dataclass(frozen=True, slots=True)
class PacerConfig:
    """Configuration of :class:`DualPacer`.

    Parameters
    ----------
    lower, upper
        K floors and caps on the traffic-weighted exposure shares; ``-inf`` / ``+inf`` (or
        ``None`` in :meth:`DualPacer.from_dict`) where absent.
    step_size
        Price change per unit of share error per update (value units per share). Larger reacts
        faster and oscillates more; about ``(value spread) / (share response)`` is a good start.
    max_price
        Bound on each multiplier (and so on ``|prices|``); keeps a target that traffic cannot
        reach from driving a price to infinity.
    names
        Optional K constraint names (for logs); empty for none.
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    step_size: float = 0.5
    max_price: float = math.inf
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        lo, hi = _check_bounds(self)
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"step_size must be a finite float > 0; got {self.step_size!r}")
        if not self.max_price > 0:
            raise ValueError(f"max_price must be > 0; got {self.max_price!r}")
        if self.names and len(self.names) != len(lo):
            raise ValueError(f"names must be empty or hold K = {len(lo)} names; got {list(self.names)!r}")

    @property
    def n_constraints(self) -> int:
        return len(self.lower)


class DualPacer:
    """Online dual descent on the K prices from realised exposure.

    Parameters
    ----------
    config
        The bounds and step size.
    prices
        Shape (K,). Starting prices, e.g. ``Plan.prices`` (positive only on floors, negative only
        on caps); zeros by default.

    Attributes
    ----------
    prices_
        Shape (K,). Current signed prices for serving: ``argmax value + exposure @ prices_``.
    floor_multipliers_, cap_multipliers_
        Shape (K,). The multipliers ``alpha >= 0`` and ``beta >= 0``; ``prices_ = alpha - beta``.
    shares_
        Shape (K,). Realised shares of the last batch (NaN before the first update).
    n_updates_
        Number of batches seen.

    Examples
    --------
    >>> pacer = DualPacer(PacerConfig(lower=(0.5,), upper=(float("inf"),), step_size=1.0))
    >>> pacer.update(np.array([[0.0], [0.5]])).tolist()   # share 0.25 < 0.5: the floor price rises
    [0.25]
    >>> DualPacer.from_dict(pacer.to_dict()).prices_.tolist()
    [0.25]
    """

    def __init__(self, config: PacerConfig, prices: np.ndarray | None = None) -> None:
        self.config = config
        start = _check_start(config, prices)
        k = start.size
        cap = config.max_price
        self.floor_multipliers_ = np.minimum(np.maximum(start, 0.0), cap)
        self.cap_multipliers_ = np.minimum(np.maximum(-start, 0.0), cap)
        self.prices_ = self.floor_multipliers_ - self.cap_multipliers_
        self.shares_ = np.full(k, np.nan)
        self.n_updates_ = 0

    def update(self, realised_exposure: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """One dual step from a batch of served requests.

        Parameters
        ----------
        realised_exposure
            Shape (n, K). Exposure vector of the layout actually served to each request.
        weights
            Shape (n,). Non-negative request weights (default equal).

        Returns
        -------
        numpy.ndarray
            Shape (K,). The new prices (a copy of ``prices_``).
        """
        k = self.config.n_constraints
        a = np.asarray(realised_exposure, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != k or a.shape[0] < 1:
            raise ValueError(f"realised_exposure must have shape (n, K) = (n >= 1, {k}); got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("realised_exposure must be finite")
        if weights is None:
            shares = a.mean(axis=0)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (a.shape[0],) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"weights must be finite, >= 0, not all 0, of shape (n,) = ({a.shape[0]},); got shape {w.shape}"
                )
            shares = (w @ a) / w.sum()
        lo = np.array(self.config.lower)
        hi = np.array(self.config.upper)
        eta = self.config.step_size
        cap = self.config.max_price
        floors = np.isfinite(lo)
        caps = np.isfinite(hi)
        alpha = self.floor_multipliers_.copy()
        beta = self.cap_multipliers_.copy()
        alpha[floors] = np.clip(alpha[floors] - eta * (shares[floors] - lo[floors]), 0.0, cap)
        beta[caps] = np.clip(beta[caps] - eta * (hi[caps] - shares[caps]), 0.0, cap)
        self.floor_multipliers_ = alpha
        self.cap_multipliers_ = beta
        self.prices_ = alpha - beta
        self.shares_ = shares
        self.n_updates_ += 1
        return self.prices_.copy()

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) state; absent bounds and an unbounded price are ``None``."""

        def enc(x: float) -> float | None:
            return None if math.isinf(x) else float(x)

        c = self.config
        return {
            "config": {
                "lower": [enc(x) for x in c.lower],
                "upper": [enc(x) for x in c.upper],
                "step_size": c.step_size,
                "max_price": enc(c.max_price),
                "names": list(c.names),
            },
            "floor_multipliers": self.floor_multipliers_.tolist(),
            "cap_multipliers": self.cap_multipliers_.tolist(),
            "shares": [None if math.isnan(x) else x for x in self.shares_.tolist()],
            "n_updates": self.n_updates_,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> DualPacer:
        """Rebuild a pacer saved with :meth:`to_dict`."""
        try:
            c = state["config"]
            config = PacerConfig(
                lower=tuple(-math.inf if x is None else float(x) for x in c["lower"]),
                upper=tuple(math.inf if x is None else float(x) for x in c["upper"]),
                step_size=float(c["step_size"]),
                max_price=math.inf if c["max_price"] is None else float(c["max_price"]),
                names=tuple(c["names"]),
            )
            alpha = np.array(state["floor_multipliers"], dtype=np.float64)
            beta = np.array(state["cap_multipliers"], dtype=np.float64)
            shares = np.array([math.nan if x is None else x for x in state["shares"]], dtype=np.float64)
            n_updates = int(state["n_updates"])
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"state must be a dict written by DualPacer.to_dict; missing or bad key: {exc}"
            ) from None
        k = config.n_constraints
        if alpha.shape != (k,) or beta.shape != (k,) or (alpha < 0).any() or (beta < 0).any():
            raise ValueError(f"floor_multipliers and cap_multipliers must be K = {k} values >= 0")
        pacer = cls(config)
        pacer.floor_multipliers_ = alpha
        pacer.cap_multipliers_ = beta
        pacer.prices_ = alpha - beta
        pacer.shares_ = shares
        pacer.n_updates_ = n_updates
        return pacer
