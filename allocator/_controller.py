"""Online pacing with memory: a PI controller on the exponentially weighted share deficit.

:class:`DualPacer` takes one projected step ``step_size * (lower - share)`` per batch, with the
step in price units.  Whether that overshoots depends on the plant: on a share curve with slope
``g = d share / d price`` the error after one batch of a linear plant is multiplied by
``1 - step_size * g``, so any ``step_size * g > 1`` overshoots (and ``> 2`` oscillates); a step
tuned on one plant overshoots on a steeper one (a 0.30 floor driven to 0.53).  :class:`PIPacer`
states its gain relative to the plant's sensitivity, keeps an exponentially weighted (EW) window
of the last few hundred decisions, aims a margin inside each bound and bounds its integral.

The law, per constraint ``k`` and side (the floor side is shown; a cap is its mirror image with
``aim = upper - margin``, deficit ``a - aim`` and multiplier ``beta``).  Each served decision
``j`` (weight ``w_j``, exposure ``a_j``) adds a deficit ``delta_j = w_j * (aim - a_j)``, where
``aim = lower + margin``; with ``gamma = 2 ** (-1 / half_life)`` and ``kappa = gain / response``::

    F_j   = gamma * F_{j-1} + delta_j                    EW deficit: the recent window
    I_j   = I_{j-1} + kappa * (1 - gamma) * F_{j-1}      integral: the deficit aged out of it
    alpha = clip(I + kappa * F, 0, max_price)            floor multiplier; price = alpha - beta

Since ``delta_j = (F_j - F_{j-1}) + (1 - gamma) F_{j-1}``, the proportional part holds
``kappa`` times the deficit still inside the window and the integral ``kappa`` times the deficit
that has left it; between clamps ``I + kappa F = kappa * sum_j delta_j``.  In terms of the EW
share error ``e = F / W`` (``W`` the EW decision count, ``1 / (1 - gamma)`` at steady state)
this is a PI controller with proportional gain ``kappa / (1 - gamma)`` and integral gain
``kappa`` per decision: its integral time equals the time constant of the EW filter, so the PI
zero cancels the filter's pole and no lag enters the loop.  On a batch of ``n`` decisions the
sums have closed forms, which :meth:`PIPacer.update` evaluates::

    F_n = gamma^n F_0 + sum_j gamma^(n-j) delta_j
    I_n = I_0 + kappa * [(1 - gamma^n) F_0 + sum_j (1 - gamma^(n-j)) delta_j]

Why this law.  On a linear plant ``share = s0 + g * price`` (the shares of a batch served at the
price set after the previous one) the unclamped recursion is first order::

    price_{t+1} = price_t + kappa * n * (aim - s0 - g * price_t)
    price_t - price* = (1 - kappa * g * n)^t (price_0 - price*),   price* = (aim - s0) / g

so the share approaches its aim monotonically, without overshoot, exactly when
``kappa * g * n <= 1``; with ``response = g`` that is ``gain * n <= 1`` whatever the value scale,
and ``gain * n = 1`` is deadbeat.  Feeding back the raw realised deficit (not a filtered share) is
what keeps the windowed share tight: with deadbeat gain the deficit of a window of ``m`` batches
telescopes to the sampling noise of its first and last batch.  An integral of the EW share alone
(or dual averaging on it) puts the filter's pole inside the loop: second order, it overshoots
unless its gain is cut by an order of magnitude, and a decaying step cannot follow drifting
traffic.  Between the clamps the law therefore moves prices exactly as :class:`DualPacer` does
with ``step_size = kappa * n`` (batches of ``n``) and floor ``lower + margin``: a DualPacer whose
step happens to be ``1 / (g * n)`` does as well.  What removes the overshoot is the gain being
stated per unit of sensitivity (so it stays right when the value scale or the plant changes) and
the aim sitting ``margin`` inside the bound; the clamps act on the split state:

* anti-windup: the integral stays in ``[0, max_price]`` and is held (not increased) on a batch
  where the multiplier would exceed ``max_price`` and the aged-out deficit is positive; the
  proportional part is an EW sum, bounded by ``max(aim - a) / (1 - gamma)``.  However long a
  target stays unreachable, the multiplier leaves ``max_price`` as soon as ``I + kappa * F``
  drops below it, after a number of batches that does not grow with the length of the spell.
* a slack floor (share above its aim) has ``F < 0`` and its integral clipped at 0, so its price
  is exactly 0.

References
----------
Astrom, K. J. and Hagglund, T. (2006). Advanced PID Control (integrator windup, conditional
integration). ISA.
Balseiro, S., Lu, H. and Mirrokni, V. (2020). Dual mirror descent for online allocation problems.
ICML.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._pacing import _check_bounds, _check_start

__all__ = ["PIPacer", "PIPacerConfig"]


def _finite(name: str, value: object, *, zero_ok: bool = False) -> float:
    x = float(value) if isinstance(value, numbers.Real) else math.nan
    if not (math.isfinite(x) and (x >= 0 if zero_ok else x > 0)):
        raise ValueError(f"{name} must be a finite float {'>=' if zero_ok else '>'} 0; got {value!r}")
    return x


@dataclass(frozen=True, slots=True)
class PIPacerConfig:
    """Configuration of :class:`PIPacer`.

    Parameters
    ----------
    lower, upper
        K floors and caps on the exposure shares; ``-inf`` / ``+inf`` (``None`` in
        :meth:`PIPacer.from_dict`) where absent.
    max_price
        Finite bound on each multiplier, so ``|prices| <= max_price``; it is also the level at
        which the integral stops (anti-windup), so it has no infinite default.
    gain
        Loop gain per decision, ``kappa * response``: the fraction of the share error removed
        per served decision when ``response`` is the plant's true ``d share / d price``.  The
        closed loop's time constant is ``1 / gain`` decisions; batches of ``n`` decisions
        approach the aim without overshoot while ``gain * n <= 1`` (deadbeat at ``= 1``).
        Without ``response`` the sensitivity is taken as 1 share per unit price, i.e. ``gain``
        is then in price units per unit share per decision.
    half_life
        Half-life, in decisions, of the EW window behind ``shares_``, ``overshoot_`` and the
        proportional part: ``gamma = 2 ** (-1 / half_life)``, window ``~ half_life / ln 2``.
    margin
        Share the controller aims inside each bound: ``lower + margin`` for a floor,
        ``upper - margin`` for a cap, so noise around the aim stays within the bounds.  At most
        half the gap of a constraint with both bounds.
    names
        Optional K constraint names (for logs); empty for none.
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    max_price: float
    gain: float = 0.01
    half_life: float = 300.0
    margin: float = 0.0
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        lo, hi = _check_bounds(self)
        object.__setattr__(self, "max_price", _finite("max_price", self.max_price))
        object.__setattr__(self, "gain", _finite("gain", self.gain))
        object.__setattr__(self, "half_life", _finite("half_life", self.half_life))
        m = _finite("margin", self.margin, zero_ok=True)
        object.__setattr__(self, "margin", m)
        for k, (a, b) in enumerate(zip(lo, hi, strict=True)):
            if math.isfinite(a) and math.isfinite(b) and a + m > b - m:
                raise ValueError(
                    f"margin must be <= (upper - lower) / 2 for every constraint with both bounds; "
                    f"got margin = {m!r} with lower[{k}] = {a!r}, upper[{k}] = {b!r}"
                )
        if self.names and len(self.names) != len(lo):
            raise ValueError(f"names must be empty or hold K = {len(lo)} names; got {list(self.names)!r}")

    @property
    def n_constraints(self) -> int:
        return len(self.lower)

    @property
    def decay(self) -> float:
        """Per-decision EW factor ``gamma = 2 ** (-1 / half_life)``."""
        return float(2.0 ** (-1.0 / self.half_life))


class PIPacer:
    """Online pacing of the K prices by a PI controller on the EW share deficit.

    The law and why it is chosen are in the module docstring: per side, the multiplier is
    ``clip(I + kappa * F, 0, max_price)`` with ``F`` the EW deficit of the last
    ``~half_life / ln 2`` decisions against ``aim`` and ``I`` the deficit aged out of that
    window, ``kappa = gain / response``.

    Parameters
    ----------
    config
        Bounds, gain, half-life, margin and price bound.
    prices
        Shape (K,). Starting prices, e.g. ``Plan.prices`` (positive only on floors, negative only
        on caps), clipped to ``[-max_price, max_price]``; zeros by default.  They start in the
        integral, so the first update moves them by the first batch's deficit only.

    Attributes
    ----------
    prices_
        Shape (K,). Current signed prices for serving: ``argmax value + exposure @ prices_``.
    floor_multipliers_, cap_multipliers_
        Shape (K,). ``alpha, beta`` in ``[0, max_price]``; ``prices_ = alpha - beta``.
    floor_integral_, cap_integral_
        Shape (K,). The integral parts ``I`` in ``[0, max_price]`` (price units).
    shares_
        Shape (K,). EW share of the served exposure, ``S / W`` with ``S = sum_j gamma^age w_j a_j``
        and ``W = sum_j gamma^age w_j`` over all decisions seen; NaN before the first update.
    n_effective_
        ``W``: the EW decision count behind ``shares_`` (``~ 1 / (1 - gamma)`` at steady state).
    overshoot_
        Shape (K,). EW mean, over the decisions of the window, of the share bought beyond the aim:
        after each batch, ``max(shares_ - (lower + margin), 0)`` if the floor's multiplier was
        > 0 while the batch was served, plus ``max((upper - margin) - shares_, 0)`` if the cap's
        was; each batch weighted by its decisions' EW weight.  The counterfactual value is not
        observable; to first order the value given up per decision is
        ``|prices_| * overshoot_`` (a price is the marginal value of a unit of share).
    n_updates_
        Number of batches seen.

    Examples
    --------
    >>> cfg = PIPacerConfig(lower=(0.5,), upper=(float("inf"),), max_price=5.0, gain=0.25)
    >>> pacer = PIPacer(cfg)
    >>> pacer.update(np.array([[0.0], [0.5]])).tolist()  # deficit 0.5 + 0: kappa * 0.5
    [0.125]
    >>> pacer.update(np.array([[1.0], [1.0]]), response=np.array([0.5])).tolist()  # kappa = 0.5
    [0.0]
    >>> PIPacer.from_dict(pacer.to_dict()).prices_.tolist()
    [0.0]
    """

    def __init__(self, config: PIPacerConfig, prices: np.ndarray | None = None) -> None:
        self.config = config
        self.reset(prices)

    def reset(self, prices: np.ndarray | None = None) -> None:
        """Forget the window, the integrals and the overshoot; start again from ``prices``.

        Parameters
        ----------
        prices
            Shape (K,). As in the constructor (zeros by default), e.g. a new plan's prices.
        """
        cfg = self.config
        start = _check_start(cfg, prices)
        k = start.size
        m = cfg.max_price
        self.floor_integral_ = np.clip(start, 0.0, m)
        self.cap_integral_ = np.clip(-start, 0.0, m)
        self.floor_multipliers_ = self.floor_integral_.copy()
        self.cap_multipliers_ = self.cap_integral_.copy()
        self.prices_ = self.floor_multipliers_ - self.cap_multipliers_
        self.shares_ = np.full(k, np.nan)
        self.n_effective_ = 0.0
        self.overshoot_ = np.zeros(k)
        self.n_updates_ = 0

    def update(
        self,
        realised_exposure: np.ndarray,
        weights: np.ndarray | None = None,
        response: np.ndarray | None = None,
    ) -> np.ndarray:
        """Re-price from the decisions served since the last update.

        Parameters
        ----------
        realised_exposure
            Shape (n, K). Exposure vector of the layout served to each request, in serving order
            (later rows are more recent in the EW window).
        weights
            Shape (n,). Non-negative request weights (default equal); rescaled to mean 1, so a
            row counts as ``weights / mean(weights)`` decisions.
        response
            Shape (K,). Estimate of ``d share_k / d price_k`` at the current prices (> 0), e.g.
            from the plan's candidates; the gain becomes ``kappa = gain / response``.  Default 1.
            An underestimate over-steps: on an S-shaped share curve, prefer the slope near the
            operating point (the plan's prices) to the slope on a flat stretch.

        Returns
        -------
        numpy.ndarray
            Shape (K,). The new prices (a copy of ``prices_``).
        """
        cfg = self.config
        k = cfg.n_constraints
        a = np.asarray(realised_exposure, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != k or a.shape[0] < 1:
            raise ValueError(f"realised_exposure must have shape (n, K) = (n >= 1, {k}); got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("realised_exposure must be finite")
        n = a.shape[0]
        if weights is None:
            w = np.ones(n)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"weights must be finite, >= 0, not all 0, of shape (n,) = ({n},); got shape {w.shape}"
                )
            w = w * (n / w.sum())
        if response is None:
            kappa = np.full(k, cfg.gain)
        else:
            r = np.asarray(response, dtype=np.float64)
            if r.shape != (k,) or not np.isfinite(r).all() or (r <= 0).any():
                raise ValueError(
                    f"response must be a finite array of shape (K,) = ({k},) with every entry > 0; got {r!r}"
                )
            kappa = cfg.gain / r

        gamma = cfg.decay
        decay_n = gamma**n
        recent = gamma ** np.arange(n - 1, -1, -1, dtype=np.float64) * w  # gamma^(n-j) w_j
        aged = w - recent  # (1 - gamma^(n-j)) w_j
        w_old = self.n_effective_
        s_old = self.shares_ * w_old if w_old > 0 else np.zeros(k)
        w_new = decay_n * w_old + recent.sum()
        s_new = decay_n * s_old + recent @ a
        aged_w = aged.sum()
        aged_s = aged @ a
        shares = s_new / w_new

        lo = np.array(cfg.lower)
        hi = np.array(cfg.upper)
        floors = np.isfinite(lo)
        caps = np.isfinite(hi)
        aim_lo = np.where(floors, lo + cfg.margin, 0.0)  # 0 on absent sides keeps the sums finite
        aim_hi = np.where(caps, hi - cfg.margin, 0.0)
        # deficits are "positive = the price should rise": aim - share for floors, share - aim for caps
        f_lo = w_new * aim_lo - s_new
        g_lo = (1.0 - decay_n) * (w_old * aim_lo - s_old) + aim_lo * aged_w - aged_s
        f_hi = s_new - w_new * aim_hi
        g_hi = (1.0 - decay_n) * (s_old - w_old * aim_hi) + aged_s - aim_hi * aged_w
        m = cfg.max_price
        alpha, i_lo = self._side(self.floor_integral_, f_lo, g_lo, kappa, floors, m)
        beta, i_hi = self._side(self.cap_integral_, f_hi, g_hi, kappa, caps, m)

        # share bought beyond the aim by the prices in force while this batch was served
        excess = np.where(floors & (self.floor_multipliers_ > 0), np.maximum(shares - aim_lo, 0.0), 0.0)
        excess += np.where(caps & (self.cap_multipliers_ > 0), np.maximum(aim_hi - shares, 0.0), 0.0)
        self.overshoot_ = (decay_n * w_old * self.overshoot_ + recent.sum() * excess) / w_new

        self.floor_integral_ = i_lo
        self.cap_integral_ = i_hi
        self.floor_multipliers_ = alpha
        self.cap_multipliers_ = beta
        self.prices_ = alpha - beta
        self.shares_ = shares
        self.n_effective_ = float(w_new)
        self.n_updates_ += 1
        return self.prices_.copy()

    @staticmethod
    def _side(
        integral: np.ndarray,
        deficit: np.ndarray,
        aged: np.ndarray,
        kappa: np.ndarray,
        active: np.ndarray,
        max_price: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One side's multiplier and integral: ``I' = I + kappa * aged`` (held while the output is
        over ``max_price`` and ``aged > 0``), clipped to ``[0, max_price]``;
        ``clip(I' + kappa * deficit, 0, max_price)``."""
        moved = integral + kappa * aged
        hold = (moved + kappa * deficit > max_price) & (aged > 0)
        new_i = np.where(active, np.where(hold, integral, np.minimum(np.maximum(moved, 0.0), max_price)), 0.0)
        mult = np.where(active, np.minimum(np.maximum(new_i + kappa * deficit, 0.0), max_price), 0.0)
        return mult, new_i

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) state; absent bounds and NaN shares are ``None``."""

        def enc(x: float) -> float | None:
            return None if math.isinf(x) else float(x)

        c = self.config
        return {
            "config": {
                "lower": [enc(x) for x in c.lower],
                "upper": [enc(x) for x in c.upper],
                "max_price": c.max_price,
                "gain": c.gain,
                "half_life": c.half_life,
                "margin": c.margin,
                "names": list(c.names),
            },
            "floor_multipliers": self.floor_multipliers_.tolist(),
            "cap_multipliers": self.cap_multipliers_.tolist(),
            "floor_integral": self.floor_integral_.tolist(),
            "cap_integral": self.cap_integral_.tolist(),
            "shares": [None if math.isnan(x) else x for x in self.shares_.tolist()],
            "n_effective": self.n_effective_,
            "overshoot": self.overshoot_.tolist(),
            "n_updates": self.n_updates_,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PIPacer:
        """Rebuild a pacer saved with :meth:`to_dict`; it continues exactly where that one stopped."""
        try:
            c = state["config"]
            config = PIPacerConfig(
                lower=tuple(-math.inf if x is None else float(x) for x in c["lower"]),
                upper=tuple(math.inf if x is None else float(x) for x in c["upper"]),
                max_price=float(c["max_price"]),
                gain=float(c["gain"]),
                half_life=float(c["half_life"]),
                margin=float(c["margin"]),
                names=tuple(c["names"]),
            )
            arrays = {
                key: np.array(state[key], dtype=np.float64)
                for key in (
                    "floor_multipliers",
                    "cap_multipliers",
                    "floor_integral",
                    "cap_integral",
                    "overshoot",
                )
            }
            shares = np.array([math.nan if x is None else x for x in state["shares"]], dtype=np.float64)
            n_effective = float(state["n_effective"])
            n_updates = int(state["n_updates"])
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"state must be a dict written by PIPacer.to_dict; missing or bad key: {exc}"
            ) from None
        k = config.n_constraints
        for key, arr in arrays.items():
            top = math.inf if key == "overshoot" else config.max_price
            if arr.shape != (k,) or not (np.isfinite(arr) & (arr >= 0) & (arr <= top)).all():
                raise ValueError(
                    f"state[{key!r}] must hold K = {k} values in [0, {top!r}]; got {arr.tolist()!r}"
                )
        if (
            shares.shape != (k,)
            or not (n_effective >= 0 and math.isfinite(n_effective))
            or np.isnan(shares).any() != (n_effective == 0)
        ):
            raise ValueError(
                f"state['shares'] must hold K = {k} values, NaN exactly when state['n_effective'] is 0; "
                f"got shares = {state['shares']!r} and n_effective = {n_effective!r}"
            )
        pacer = cls(config)
        pacer.floor_multipliers_ = arrays["floor_multipliers"]
        pacer.cap_multipliers_ = arrays["cap_multipliers"]
        pacer.floor_integral_ = arrays["floor_integral"]
        pacer.cap_integral_ = arrays["cap_integral"]
        pacer.overshoot_ = arrays["overshoot"]
        pacer.prices_ = pacer.floor_multipliers_ - pacer.cap_multipliers_
        pacer.shares_ = shares
        pacer.n_effective_ = n_effective
        pacer.n_updates_ = n_updates
        return pacer
