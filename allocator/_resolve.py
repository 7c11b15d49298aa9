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

from dataclasses import dataclass, field, replace

import numpy as np

from ._layout import BlockTable, LayoutSpace, build_candidates, default_leads, stats_table
from ._softmax import exploitable, softmax_prices, softmax_response

__all__ = ["PaceTables", "ResolvePacer", "ResolvePacerConfig", "window_correction"]


@dataclass(frozen=True)
class PaceTables:
    """The block tables of some served decisions (what each module of the user's pool would show: see
    :func:`~allocator.stats_table`), from which the pacer rebuilds the candidates serving would build at
    other prices. ``mean_score``, ``n_tail``, ``n_shown``: (m, B, C, R); ``lead``: (m, N) the categories
    the decision led variants with (-1: the table's own best, :func:`~allocator.default_leads`);
    ``explore``: (m,) the category of its explore variant (-1: none); ``at``: (m,) each one's position in
    the batch of decisions it came with (in the pacer's window: its decision number)."""

    mean_score: np.ndarray
    n_tail: np.ndarray
    n_shown: np.ndarray
    lead: np.ndarray
    explore: np.ndarray
    at: np.ndarray

    def __len__(self) -> int:
        return int(self.at.size)

    def take(self, rows: np.ndarray) -> PaceTables:
        return PaceTables(self.mean_score[rows], self.n_tail[rows], self.n_shown[rows], self.lead[rows],
                          self.explore[rows], self.at[rows])

    @staticmethod
    def concat(parts: list[PaceTables]) -> PaceTables:
        """The tables of ``parts`` one after the other (one config's: the same shapes)."""
        return PaceTables(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("mean_score", "n_tail", "n_shown", "lead", "explore", "at")))

    def candidates(self, space: LayoutSpace, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(value, exposure, exploitable mask) of the candidates serving builds from these tables at
        ``prices`` (:func:`~allocator.build_candidates`, leads and explore variants as logged)."""
        tbl: BlockTable = stats_table(self.mean_score, self.n_tail, self.n_shown)
        lead = self.lead
        if (lead < 0).any():  # the table's own best: at most one per category, so no wider than C
            best = default_leads(space, tbl, n=lead.shape[1])
            lead = np.where(lead[:, :best.shape[1]] < 0, best, lead[:, :best.shape[1]])
        explore = self.explore if (self.explore >= 0).any() else None
        cand = build_candidates(space, tbl, prices, lead_categories=lead, explore=explore)
        return cand.value, cand.exposure, exploitable(space.tilt_levels[cand.tilt], cand.mask, space.tail_goal)


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


#: the fewest block tables in the window for :meth:`ResolvePacer.update` to re-solve on rebuilt sets
MIN_TABLES = 30


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

    def __init__(self, config: ResolvePacerConfig, prices: np.ndarray | None = None,
                 space: LayoutSpace | None = None) -> None:
        self.config = config
        #: the layout space serving builds candidates in; with it, :meth:`update` re-solves on candidates
        #: rebuilt from the served decisions' block tables at the prices it tries (see ``tables``)
        self.space = space
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
        # the window's block tables (see update's ``tables``; ``at``: their decision numbers), the first
        # ``_tables_stale`` of them valued under an older calibration
        self._tables: PaceTables | None = None
        self._tables_stale = 0
        #: what the last update solved on: "rebuilt" (the candidates rebuilt from the block tables at the
        #: prices tried), "served" (the window's served sets) or None (no update has solved yet)
        self.solved_on_: str | None = None

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
        self._tables, self._tables_stale = None, 0

    def retire(self) -> None:
        """A new calibration, the prices kept: the sets in the window were valued under the old one. They
        stay until ``min_fresh`` sets valued under the new one have come (then only those are kept), so
        that a re-solve never rests on a few dozen sets: dropped at once at every recalibration (every
        5-10 s in a wide world), the window held 10-60 sets, and a floor's price went to its trust
        region's edge at every step (0.89, 1.78, 3.56, 2.49, 1.37, 0.85...) with the share swinging
        1-22 % per 50 requests against a 10 % floor. Kept whole, it answered a recalibration that
        changed the values (the long tail's item rates) ten seconds late: the long-tail share reached
        0.45 against a floor of 0.25 over 250 requests. The block tables likewise."""
        self._stale = self._mask.shape[0]
        self._tables_stale = 0 if self._tables is None else len(self._tables)

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

    def _keep_tables(self, tables: PaceTables, first: int, n: int) -> None:
        """Add a batch's block tables (decision numbers ``first + tables.at``); keep those of the last
        ``window`` decisions, and once ``MIN_TABLES`` valued under a new calibration have come (see
        :meth:`retire`), only those: a table's block scores are the calibration's of its time."""
        tables = replace(tables, at=first + np.asarray(tables.at, dtype=np.int64))  # now decision numbers
        both = tables if self._tables is None or not len(self._tables) else PaceTables.concat([self._tables, tables])
        keep = both.at > first + n - 1 - self.config.window
        if self._tables_stale:
            stale = np.arange(len(both)) < self._tables_stale
            if int((~stale & keep).sum()) >= MIN_TABLES:
                keep &= ~stale
                self._tables_stale = 0
            else:
                self._tables_stale = int((stale & keep).sum())
        self._tables = both.take(np.flatnonzero(keep))

    def update(self, value: np.ndarray, exposure: np.ndarray, mask: np.ndarray,
               chosen_exposure: np.ndarray, bias: np.ndarray | None = None,
               tables: PaceTables | None = None) -> np.ndarray:
        """One batch: ``value`` (m, L), ``exposure`` (m, L, K), ``mask`` (m, L) of the served candidate
        sets the prices are re-solved on, ``chosen_exposure`` (n, K) of the layouts served (``m <= n``:
        sets valued under an older model may be left out of the former, never out of the latter).
        ``bias`` (b, K), per decision: the expected exposure of the served pmf minus the exploit
        softmax's on the same scores (both known exactly from the log, no sampling noise): what the
        exploration budget adds; the re-solve aims that much the other way. ``tables``: block tables of
        some of the batch's decisions (positions ``tables.at`` in the batch); with the pacer's ``space``
        and at least ``MIN_TABLES`` of them in the window, the prices are those at which the candidates
        rebuilt from them at those very prices meet the aims (:meth:`consistent_prices`), not a re-solve
        on the sets served at older prices. Returns the new prices (K,)."""
        cfg = self.config
        a = np.asarray(chosen_exposure, dtype=np.float64)
        n = a.shape[0]
        if n == 0:
            return self.prices_.copy()
        if bias is not None and np.shape(bias)[0]:
            b = np.asarray(bias, dtype=np.float64)
            g = 2.0 ** (-b.shape[0] / cfg.half_life) if self.decisions_ else 0.0
            self.bias_ = g * self.bias_ + (1.0 - g) * b.mean(axis=0)
        if tables is not None and len(tables) and self.space is not None:
            self._keep_tables(tables, self.decisions_, n)
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
        if self.solved_on_ == "rebuilt":
            # the last update solved on the sets serving builds at its prices, from the served decisions'
            # own tables: their shares at the prices they were served at are what serving gave them (less
            # the exploration's pull, aimed off exactly), so what the shares still miss is serving at prices
            # not yet moved, not a model error for the integral to wind in. Wound on it, the aims went 3-7 pp
            # below a floor in a world's first seconds (its first plan's prices served it far above), and
            # the share then held 1-3 pp under the floor: here the correction fades instead
            delta = -(1.0 - 2.0 ** (-n / cfg.half_life)) * self.correction_
        self.correction_ = np.clip(self.correction_ + delta, -cfg.max_correction, cfg.max_correction)
        self.overshoot_ = np.where(p > 0, np.maximum(self.shares_ - lo, 0.0), 0.0) \
            + np.where(p < 0, np.maximum(hi - self.shares_, 0.0), 0.0)
        lo, hi = self.aims
        if not self._mask.any():
            return self.prices_.copy()
        if self._tables is not None and len(self._tables) >= MIN_TABLES:
            self.prices_ = self.consistent_prices(lo, hi)
            self.solved_on_ = "rebuilt"
            return self.prices_.copy()
        self.solved_on_ = "served"
        self.prices_ = softmax_prices(self._value, self._exposure, lo, hi, cfg.temperature, mask=self._mask,
                                      start=self.prices_, max_price=cfg.max_price, box=self.trust_region())
        return self.prices_.copy()

    @property
    def tables_kept(self) -> int:
        """How many block tables the window holds."""
        return 0 if self._tables is None else len(self._tables)

    def rebuilt_shares(self, prices: np.ndarray, tables: PaceTables | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(shares, d share_k / d price_k at fixed sets) (K,) of softmax serving at ``prices`` over the
        candidates rebuilt at ``prices`` from ``tables`` (by default the window's block tables)."""
        tables = self._tables if tables is None else tables
        assert tables is not None and self.space is not None
        p = np.asarray(prices, dtype=np.float64)
        v, a, ok = tables.candidates(self.space, p)
        return softmax_response(v, a, p, self.config.temperature, mask=ok)

    def consistent_prices(self, lo: np.ndarray, hi: np.ndarray, iterations: int = 4, tol: float = 0.003) -> np.ndarray:
        """Prices at which serving meets the aims ``lo``/``hi`` with the candidates it builds at those
        prices: Newton steps on the shares of the candidates rebuilt from the window's block tables
        (:meth:`rebuilt_shares`). The bounds that act (missed, or priced) are solved together, their
        Jacobian's columns secants over a quarter of each price's trust region (so they count the
        layouts a higher price brings in, and how one bound's price moves another's share) on every
        other table, each diagonal at least the fixed-set slope; where the joint step would move a price
        against its own bound's miss, each bound is stepped alone; a step is halved (at most twice) until
        it reduces the sum of squared misses, and not taken otherwise; prices stay within the trust
        region, a floor's >= 0 and a cap's <= 0. Stops after ``iterations`` steps (the pacer steps again
        a second later, from the prices it reached: per step 1-3 rebuilds, and 1 + acting bounds of half
        the tables) or once no acting bound misses its aim by more than ``tol``.

        Re-solved on the sets served at older prices instead, a floor's price ran to its trust region's
        edge step after step (those sets held no layout a higher price builds), then, once such layouts
        came, fell to 0 while the window still held them: the share cycled between 1 and 30 % every
        1,500 requests."""
        cfg = self.config
        box = self.trust_region()
        tables = self._tables
        assert box is not None and tables is not None
        floor, cap = np.isfinite(self.lower), np.isfinite(self.upper)
        low = np.maximum(np.maximum(box[0], -cfg.max_price), np.where(floor & ~cap, 0.0, -np.inf))
        high = np.minimum(np.minimum(box[1], cfg.max_price), np.where(cap & ~floor, 0.0, np.inf))
        reach = 0.25 * (box[1] - box[0]) / 2.0

        def misses(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """(shares, fixed-set slopes, each acting bound's miss of its aim, 0 for the others)"""
            s, fixed = self.rebuilt_shares(p)
            miss_floor = np.where(floor & ((s < lo) | (p > 0)), lo - s, 0.0)
            miss_cap = np.where(cap & ((s > hi) | (p < 0)), hi - s, 0.0)
            miss = np.where(miss_floor != 0, miss_floor, miss_cap)
            # a priced bound can also be slack at its price's edge (a floor at 0): it no longer acts
            return s, fixed, np.where(((miss < 0) & (p <= low)) | ((miss > 0) & (p >= high)), 0.0, miss)

        p = np.clip(self.prices_, low, high)
        _, fixed, miss = misses(p)
        for _ in range(iterations):
            act = np.flatnonzero(miss != 0)
            if act.size == 0 or np.abs(miss[act]).max() <= tol:
                break
            # the secants on every other table: half the rebuilds' cost, for a Jacobian that only steers
            half = tables.take(np.arange(0, len(tables), 2))
            s_half = self.rebuilt_shares(p, half)[0]
            J = np.zeros((act.size, act.size))
            for col, k in enumerate(act):
                q = p.copy()
                q[k] = np.clip(p[k] + np.sign(miss[k]) * reach[k], low[k], high[k])
                if q[k] == p[k]:  # at the edge: the secant toward the inside
                    q[k] = np.clip(p[k] - np.sign(miss[k]) * reach[k], low[k], high[k])
                if q[k] != p[k]:
                    J[:, col] = (self.rebuilt_shares(q, half)[0][act] - s_half[act]) / (q[k] - p[k])
                J[col, col] = max(J[col, col], fixed[k], 1e-9)
            diagonal = miss[act] / np.diag(J)
            try:
                step = np.linalg.solve(J, miss[act])
            except np.linalg.LinAlgError:
                step = diagonal
            # the joint step moves a price against its own bound's miss only where the secants are off
            # (the layouts change in steps, and one price's secant can swamp another's): there, each bound
            # alone
            if not np.isfinite(step).all() or (step * miss[act] < 0).any():
                step = diagonal
            # backtracking: a step is taken only where it reduces the misses (halved at most twice)
            merit = float(miss @ miss)
            for scale in (1.0, 0.5, 0.25):
                trial = p.copy()
                trial[act] = np.clip(p[act] + scale * step, low[act], high[act])
                got = misses(trial)
                if float(got[2] @ got[2]) < merit:
                    break
            else:
                break
            p, (_, fixed, miss) = trial, got
        return p

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
