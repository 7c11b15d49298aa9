"""Pacing by re-solving the dual on the layouts actually served, with an integral correction.

A controller that only sees realised shares must guess how a share answers its price; guessed from
planning candidates, the guess misses what serving does (live state, calibration, the pool drawn per
request) by a factor of ten either way, and the controller either crawls or rings. The decision log
holds the exact candidate sets served, so the response need not be guessed: every step re-solves
:func:`~allocator.softmax_prices` on the last ``window`` served decisions, for aims set a ``margin``
inside each bound. What that model still misses (exploration, noise, drift since the window) is
corrected by an integral on the aims in share units:

    ``c_k <- clip(c_k + min(gain n / half_life, 1/2) * mean_i (aim_k - a_ik), -max_correction, max_correction)``

over the realised exposures ``a_ik`` of a batch, integrating a floor only while it binds (price > 0)
or is missed, and a cap likewise, so a slack bound does not wind up. Realised shares are averaged over
an exponential window of ``half_life`` decisions (``shares_``); ``overshoot_`` is how far past its aim
a share stood while its price was nonzero, and ``|price| * overshoot`` the value given up for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._softmax import softmax_prices, softmax_response

__all__ = ["ResolvePacer", "ResolvePacerConfig", "window_correction"]


def window_correction(shares: np.ndarray, lower: np.ndarray, upper: np.ndarray, prices: np.ndarray,
                      slope: np.ndarray, *, margin: float = 0.005, gain: float = 2.0, limit: float = 10.0
                      ) -> np.ndarray:
    """Price offsets (K,) that steer one server's recent shares back to the aims (each bound ``margin``
    inside): ``gain * miss / slope``, the price move that takes the expected share ``gain`` of the way
    back by the linear response ``slope`` (d share / d price, the pacer's :meth:`ResolvePacer.slope`).
    Only a bound that binds (its price nonzero) or is missed acts; a floor's price plus its offset stays
    >= 0 and a cap's <= 0, and an offset is at most ``limit`` times the price's own size (or the miss
    over the slope when the price is 0): a window's noise moves the next requests, never a bound that
    is slack. Independent draws at fixed prices leave a window of a few hundred requests a percentage
    point or more off its share by chance alone; steering each server's recent record makes the
    requests' draws correct one another.

    Examples
    --------
    >>> window_correction(np.array([0.20, 0.5]), np.array([0.25, -np.inf]), np.array([np.inf, 0.4]),
    ...                   np.array([1.0, -0.2]), np.array([0.1, 0.5]), margin=0.0, gain=0.5, limit=1.0
    ...                   ).round(3).tolist()
    [0.25, -0.1]
    """
    s = np.asarray(shares, dtype=np.float64)
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    p, d = np.asarray(prices, dtype=np.float64), np.asarray(slope, dtype=np.float64)
    ok = np.isfinite(s) & (d > 0)
    inv = np.divide(gain, d, out=np.zeros_like(d), where=ok)
    floor = np.isfinite(lo) & ((p > 0) | (s < lo + margin))
    cap = np.isfinite(hi) & ~floor & ((p < 0) | (s > hi - margin))
    miss = np.where(floor, lo + margin - s, 0.0) + np.where(cap, hi - margin - s, 0.0)
    delta = np.where(ok, inv * miss, 0.0)
    size = np.where(p != 0, limit * np.abs(p), np.abs(delta))
    delta = np.clip(delta, -size, size)
    delta = np.where(floor, np.maximum(delta, -p), delta)  # a floor's price stays >= 0
    return np.where(cap, np.minimum(delta, -p), delta)  # a cap's <= 0


@dataclass(frozen=True)
class ResolvePacerConfig:
    """Bounds (K,) with -inf/+inf where absent, the serving temperature and the controller's knobs."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    temperature: float
    window: int = 1000
    half_life: float = 300.0
    gain: float = 0.25
    margin: float = 0.005
    max_correction: float = 0.1
    max_price: float = 50.0
    max_step: float = 1.0
    min_fresh: int = 200
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.lower) != len(self.upper):
            raise ValueError(f"lower and upper must have one entry per constraint; got {len(self.lower)} "
                             f"and {len(self.upper)}")
        for name, v, ok in (("temperature", self.temperature, self.temperature > 0),
                            ("window", self.window, self.window >= 1),
                            ("min_fresh", self.min_fresh, self.min_fresh >= 1),
                            ("half_life", self.half_life, self.half_life > 0),
                            ("gain", self.gain, self.gain >= 0),
                            ("margin", self.margin, 0 <= self.margin < 0.5),
                            ("max_correction", self.max_correction, self.max_correction >= 0),
                            ("max_price", self.max_price, self.max_price > 0)):
            if not (np.isfinite(v) and ok):
                raise ValueError(f"{name} is out of range; got {v!r}")
        if not self.max_step > 0:  # math.inf: no trust region
            raise ValueError(f"max_step must be > 0 (inf: no limit); got {self.max_step!r}")


class ResolvePacer:
    """See the module docstring. ``update`` takes one batch of served decisions, returns new prices."""

    def __init__(self, config: ResolvePacerConfig, prices: np.ndarray | None = None) -> None:
        self.config = config
        K = len(config.lower)
        self.lower = np.asarray(config.lower, dtype=np.float64)
        self.upper = np.asarray(config.upper, dtype=np.float64)
        self.prices_ = np.zeros(K) if prices is None else np.asarray(prices, dtype=np.float64).copy()
        if self.prices_.shape != (K,):
            raise ValueError(f"prices must have shape ({K},); got {self.prices_.shape}")
        self.correction_ = np.zeros(K)
        #: (K,) what serving adds to the exploit softmax's shares (exploration budget, new-category share),
        #: averaged like the shares: the re-solve aims that much below (see :meth:`update`'s ``bias``)
        self.bias_ = np.zeros(K)
        self.shares_ = np.full(K, np.nan)
        self.overshoot_ = np.zeros(K)
        self.decisions_ = 0
        self._value = np.zeros((0, 1))
        self._exposure = np.zeros((0, 1, K))
        self._mask = np.zeros((0, 1), dtype=bool)
        self._stale = 0  # sets at the head of the window valued under an older calibration (see retire)

    def slope(self) -> np.ndarray:
        """(K,) d share_k / d price_k of softmax serving at the current prices over the window of served
        candidate sets (:func:`~allocator.softmax_response`); zeros while the window is empty."""
        if not self._mask.any():
            return np.zeros_like(self.prices_)
        return softmax_response(self._value, self._exposure, self.prices_, self.config.temperature,
                                mask=self._mask)[1]

    @property
    def aims(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) aims of the exploit softmax: each bound moved ``margin`` inside, plus the
        correction, less what serving adds beyond the softmax (``bias_``)."""
        m = self.config.margin
        lo = np.clip(self.lower + m + self.correction_ - self.bias_, 0.0, 1.0)
        hi = np.clip(self.upper - m + self.correction_ - self.bias_, 0.0, 1.0)
        return np.where(np.isfinite(self.lower), lo, -np.inf), np.where(np.isfinite(self.upper), hi, np.inf)

    def rebase(self, prices: np.ndarray) -> None:
        """Start again from ``prices`` (a new plan): the served candidates kept so far were valued under
        the old plan and are dropped; the realised shares and the correction are kept."""
        p = np.asarray(prices, dtype=np.float64)
        if p.shape != self.prices_.shape:
            raise ValueError(f"prices must have shape {self.prices_.shape}; got {p.shape}")
        self.prices_ = p.copy()
        self._value = np.zeros((0, 1))
        self._exposure = np.zeros((0, 1, self.prices_.size))
        self._mask = np.zeros((0, 1), dtype=bool)
        self._stale = 0

    def retire(self) -> None:
        """A new calibration, the prices kept: the sets in the window were valued under the old one. They
        stay until ``min_fresh`` sets valued under the new one have come (then only those are kept), so
        that a re-solve never rests on a few dozen sets: dropped at once at every recalibration (every
        5-10 s in a wide world), the window held 10-60 sets, and a floor's price went to its trust
        region's edge at every step (0.89, 1.78, 3.56, 2.49, 1.37, 0.85...) with the share swinging
        1-22 % per 50 requests against a 10 % floor. Kept whole, it answered a recalibration that
        changed the values (the long tail's item rates) ten seconds late: the long-tail share reached
        0.45 against a floor of 0.25 over 250 requests."""
        self._stale = self._mask.shape[0]

    def _keep(self, value: np.ndarray, exposure: np.ndarray, mask: np.ndarray) -> None:
        L = max(self._value.shape[1], value.shape[1])

        def pad(x: np.ndarray, fill: float | bool) -> np.ndarray:
            width = [(0, 0), (0, L - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            return np.pad(x, width, constant_values=fill)

        v = np.concatenate([pad(self._value, 0.0), pad(value, 0.0)])
        e = np.concatenate([pad(self._exposure, 0.0), pad(exposure, 0.0)])
        m = np.concatenate([pad(self._mask, False), pad(mask, False)])
        w = self.config.window
        cut = max(v.shape[0] - w, 0)
        stale = max(self._stale - cut, 0)
        if stale and v.shape[0] - cut - stale >= min(self.config.min_fresh, w):
            cut, stale = cut + stale, 0  # enough sets valued under the new calibration: the old ones go
        self._value, self._exposure, self._mask = v[cut:], e[cut:], m[cut:]
        self._stale = stale

    def update(self, value: np.ndarray, exposure: np.ndarray, mask: np.ndarray,
               chosen_exposure: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """One batch: ``value`` (m, L), ``exposure`` (m, L, K), ``mask`` (m, L) of the served candidate
        sets the prices are re-solved on, ``chosen_exposure`` (n, K) of the layouts served (``m <= n``:
        sets valued under an older model may be left out of the former, never out of the latter).
        ``bias`` (b, K), per decision: the expected exposure of the served pmf minus the exploit
        softmax's on the same scores (both known exactly from the log, no sampling noise): what the
        exploration budget adds; the re-solve aims that much the other way. Returns the new prices (K,)."""
        cfg = self.config
        a = np.asarray(chosen_exposure, dtype=np.float64)
        n = a.shape[0]
        if n == 0:
            return self.prices_.copy()
        if bias is not None and np.shape(bias)[0]:
            b = np.asarray(bias, dtype=np.float64)
            g = 2.0 ** (-b.shape[0] / cfg.half_life) if self.decisions_ else 0.0
            self.bias_ = g * self.bias_ + (1.0 - g) * b.mean(axis=0)
        m = np.asarray(mask, dtype=bool)
        real = m.any(axis=1)  # a fallback decision had no candidates: it counts as served, not as a model
        self._keep(np.asarray(value, dtype=np.float64)[real], np.asarray(exposure, dtype=np.float64)[real],
                   m[real])
        # realised shares: an exponential window of half_life decisions
        gamma = 2.0 ** (-1.0 / cfg.half_life)
        wts = gamma ** np.arange(n - 1, -1, -1)
        batch = wts @ a / wts.sum()
        keep = gamma ** n if self.decisions_ else 0.0
        self.shares_ = batch if not self.decisions_ else keep * self.shares_ + (1 - keep) * batch
        self.decisions_ += n
        # the integral on the aims, only where the bound binds or is missed
        # the error is taken against the bounds' own aims (margin inside), not the corrected ones
        lo = np.where(np.isfinite(self.lower), self.lower + cfg.margin, -np.inf)
        hi = np.where(np.isfinite(self.upper), self.upper - cfg.margin, np.inf)
        p = self.prices_
        # per decision gain / half_life, but never more than half the batch's mean miss in one step: the
        # re-solve already aims at the bounds, the integral only removes what it keeps missing
        step = min(cfg.gain * n / cfg.half_life, 0.5)
        floor_err = np.where(np.isfinite(lo), (lo - a).mean(0), 0.0)
        cap_err = np.where(np.isfinite(hi), (hi - a).mean(0), 0.0)
        use_floor = np.isfinite(lo) & ((p > 0) | (self.shares_ < lo))
        use_cap = np.isfinite(hi) & ((p < 0) | (self.shares_ > hi))
        # a floor passed (a cap undercut) where serving would hold it with its own price at 0 is passed by
        # choice: that says nothing of the model's error, and winding the aim down on it let the share
        # fall below the floor once the choice changed (a long-tail floor's aim wound 6 pp down while
        # pages took the tail of their own accord at a price of 0.001, then the share sat 2 pp under it)
        free = self._unpriced_shares()
        use_floor &= (floor_err > 0) | (free < lo)
        use_cap &= (cap_err < 0) | (free > hi)
        delta = step * (np.where(use_floor, floor_err, 0.0) + np.where(use_cap & ~use_floor, cap_err, 0.0))
        self.correction_ = np.clip(self.correction_ + delta, -cfg.max_correction, cfg.max_correction)
        self.overshoot_ = np.where(p > 0, np.maximum(self.shares_ - lo, 0.0), 0.0) \
            + np.where(p < 0, np.maximum(hi - self.shares_, 0.0), 0.0)
        lo, hi = self.aims
        if not self._mask.any():
            return self.prices_.copy()
        self.prices_ = softmax_prices(self._value, self._exposure, lo, hi, cfg.temperature, mask=self._mask,
                                      start=self.prices_, max_price=cfg.max_price, box=self.trust_region())
        return self.prices_.copy()

    def _unpriced_shares(self) -> np.ndarray:
        """(K,) each bound's share over the window served at the current prices with its own price at 0
        (NaN while the window is empty)."""
        K = self.prices_.size
        out = np.full(K, np.nan)
        if not self._mask.any():
            return out
        for k in range(K):
            p = self.prices_.copy()
            p[k] = 0.0
            out[k] = softmax_response(self._value, self._exposure, p, self.config.temperature, mask=self._mask)[0][k]
        return out

    def trust_region(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(low, high) (K,): how far one update may move each price, ``max_step`` times the larger of its
        size and a floor of a quarter of the window's typical value range per request (so a price at 0
        can start). Re-solved on the few dozen sets served since a new plan, a floor those few could
        barely reach took its price to ``max_price`` in one step; the live loop then served whole pages of
        live streams until the next. None when ``max_step`` is infinite or the window is empty."""
        step = self.config.max_step
        if not np.isfinite(step) or not self._mask.any():
            return None
        v = np.where(self._mask, self._value, np.nan)
        real = self._mask.any(axis=1)
        spread = np.nanmax(v[real], axis=1) - np.nanmin(v[real], axis=1)
        floor = 0.25 * float(np.median(spread))
        r = step * np.maximum(np.abs(self.prices_), floor)
        return self.prices_ - r, self.prices_ + r
