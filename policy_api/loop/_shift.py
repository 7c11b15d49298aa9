"""A population shift: what users take from the categories departs from what the engine predicted.

Each served page logs, per slot, the mean engagement the engine predicted for the module it showed
(``engagement``: units per examined impression, the user's own state and the plan's calibration
included). The slot's outcome is the engagement units its events brought, against the prediction
times its examined impressions (each weighted by the slot's examination weight over the mean, as the
calibration counts them). Per category, the ratio of the two sums is stable while the world is: the
calibration and each user's live state absorb slow changes. When what users like changes at once
(a season, an event, a catalog change, or a new audience), every user's stored evidence is wrong
together; one user learns it from a few pages, the population shows it in a few hundred.

:class:`ShiftDetector` keeps the outcomes of the last decisions, and compares the newest ``recent``
with the ones before them: a category whose ratio moved by at least ``ratio`` times (either way),
with a z-score of at least ``z`` for the recent slots' residuals under the reference ratio, is a
shift, if the reference itself was steady (its two halves' ratios within ``steady`` times of each
other: while the engine is still learning its calibration, the ratios move on their own). The same
test over every slot together (the whole page's units against its prediction, each category's part
scaled by the category's ratio over the reference, so that serving a different mix of categories
does not move it) finds a shift that moves several categories a little each sooner: its sums are far
less noisy than one category's, so it needs a ratio of ``page_ratio`` and a z-score of ``page_z``.
Only a fall counts: when tastes move, the pages the engine built from what users liked before do
worse than it predicted, so a category's move is a shift only with the whole page below its
prediction (z at most ``-page_confirm_z``); pages doing better than predicted (the engine learned
better items) are not a reason to forget. On a shift the loop forgets most of every user's category
evidence (the live state's ``epoch``) and recalibrates on what came after it; the map it fits after
it (:class:`~policy_api.live.ShiftMap`) carries users' tastes over, and after a false alarm says
that they did not move, but only through a map fitted on a few hundred users: a false alarm is not
free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy.engine import Engine

from allocator import HomepageConfig

from ..log import read_decision_log, read_feedback

__all__ = ["Shift", "ShiftDetector", "SlotOutcomes", "category_shift", "slot_outcomes"]


@dataclass(frozen=True)
class SlotOutcomes:
    """Per served decision and slot: its category, the engagement units its events brought and the
    units predicted (the logged engagement times the slot's weighted examined impressions).

    Shapes: ``ts`` (n,) epoch seconds, ascending; ``category`` (n, S) config index (-1: none);
    ``units`` and ``predicted`` (n, S)."""

    ts: np.ndarray
    category: np.ndarray
    units: np.ndarray
    predicted: np.ndarray

    @staticmethod
    def empty(slots: int) -> SlotOutcomes:
        z = np.zeros((0, slots))
        return SlotOutcomes(np.zeros(0), np.zeros((0, slots), dtype=np.int64), z, z.copy())

    def __len__(self) -> int:
        return int(self.ts.size)

    def concat(self, other: SlotOutcomes) -> SlotOutcomes:
        return SlotOutcomes(np.concatenate([self.ts, other.ts]), np.concatenate([self.category, other.category]),
                            np.concatenate([self.units, other.units]), np.concatenate([self.predicted, other.predicted]))

    def part(self, lo: int, hi: int) -> SlotOutcomes:
        """Decisions ``lo`` to ``hi`` (exclusive), oldest first."""
        return SlotOutcomes(self.ts[lo:hi], self.category[lo:hi], self.units[lo:hi], self.predicted[lo:hi])

    def tail(self, n: int) -> SlotOutcomes:
        """The newest ``n`` decisions."""
        return self.part(max(len(self) - n, 0), len(self))


def slot_outcomes(db: Engine, config: HomepageConfig, since: datetime, until: datetime,
                  config_version: int | None = None) -> SlotOutcomes:
    """:class:`SlotOutcomes` of the serving decisions made in [since, until) (under ``config_version``
    when given), with the feedback that has arrived for them. Two queries."""
    S = config.slots
    dl = read_decision_log(db, config, since, until, config_version)
    n = dl.request_id.size
    if n == 0:
        return SlotOutcomes.empty(S)
    rows = np.arange(n)
    category = dl.categories[rows, dl.action]
    engagement = dl.engagement[rows, dl.action]
    fb = read_feedback(db, columns=["request_id", "type", "slot"], request_ids=dl.request_id.tolist())
    units = np.zeros((n, S))
    shown = np.zeros((n, S))
    if fb["request_id"].size:
        order = np.argsort(dl.request_id)
        at = np.searchsorted(dl.request_id[order], fb["request_id"])
        at = np.minimum(at, n - 1)
        found = dl.request_id[order][at] == fb["request_id"]
        d = order[at]
        slot = np.asarray(fb["slot"], dtype=np.int64)
        ok = found & (slot >= 0) & (slot < S)
        kinds, kind = np.unique(fb["type"].astype(str), return_inverse=True)
        weight = np.array([float(config.events.get(k, 0.0)) for k in kinds.tolist()])
        impression = kinds[kind] == "impression"
        pw = config.impression_weights()
        flat = d[ok] * S + slot[ok]
        units = np.asarray(np.bincount(flat, weights=np.where(impression[ok], 0.0, weight[kind[ok]]),
                                       minlength=n * S), dtype=np.float64).reshape(n, S)
        shown = np.asarray(np.bincount(flat, weights=impression[ok] * pw[np.minimum(slot[ok], pw.size - 1)],
                                       minlength=n * S), dtype=np.float64).reshape(n, S)
    by_time = np.argsort(dl.ts, kind="stable")
    return SlotOutcomes(np.asarray(dl.ts, dtype=np.float64)[by_time], category[by_time], units[by_time],
                        (np.nan_to_num(engagement) * shown)[by_time])


def category_shift(ref: SlotOutcomes, recent: SlotOutcomes, n_categories: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per category: the recent ratio of observed to predicted units over the reference's, the z-score
    of the recent slots' residuals ``y - e_ref p`` (their sum over the root of their sum of squares),
    and the recent predicted units. NaN where the reference or the recent window predicted nothing.

    Examples
    --------
    >>> ref = SlotOutcomes(np.arange(4.0), np.array([[0], [0], [1], [1]]), np.array([[1.0], [1.0], [2.0], [2.0]]),
    ...                    np.array([[1.0], [1.0], [1.0], [1.0]]))
    >>> new = SlotOutcomes(np.arange(2.0), np.array([[0], [1]]), np.array([[3.0], [2.0]]), np.array([[1.0], [1.0]]))
    >>> [a.round(2).tolist() for a in category_shift(ref, new, 2)]
    [[3.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    C = n_categories

    def sums(o: SlotOutcomes) -> tuple[np.ndarray, np.ndarray]:
        c = o.category.ravel()
        ok = (c >= 0) & (c < C)
        return (np.bincount(c[ok], weights=o.units.ravel()[ok], minlength=C),
                np.bincount(c[ok], weights=o.predicted.ravel()[ok], minlength=C))

    y_ref, p_ref = sums(ref)
    y, p = sums(recent)
    e_ref = np.divide(y_ref, p_ref, out=np.full(C, np.nan), where=p_ref > 0)
    ratio = np.divide(np.divide(y, p, out=np.full(C, np.nan), where=p > 0), e_ref,
                      out=np.full(C, np.nan), where=np.isfinite(e_ref) & (e_ref != 0))
    c = recent.category.ravel()
    ok = (c >= 0) & (c < C)
    resid = recent.units.ravel()[ok] - np.nan_to_num(e_ref)[c[ok]] * recent.predicted.ravel()[ok]
    num = np.bincount(c[ok], weights=resid, minlength=C)
    den = np.sqrt(np.bincount(c[ok], weights=resid * resid, minlength=C))
    z = np.divide(num, den, out=np.zeros(C), where=den > 0)
    z = np.where(np.isfinite(e_ref) & (p > 0), z, np.nan)
    return ratio, z, p


@dataclass(frozen=True)
class Shift:
    """A detected shift: when the recent window began (``at``), per category the ratio and z-score,
    the categories that moved on their own, and the whole page's ratio and z-score."""

    at: float
    ratio: np.ndarray
    z: np.ndarray
    categories: tuple[int, ...]
    page_ratio: float = float("nan")
    page_z: float = float("nan")


@dataclass
class ShiftDetector:
    """The outcomes of the last ``recent + reference`` decisions and the test between the two windows.

    Parameters
    ----------
    recent
        Decisions in the recent window.
    reference
        The most decisions kept before it; the test runs once ``min_reference`` are there.
    ratio
        How many times a category's observed-to-predicted ratio must move (up or down).
    z
        The z-score its recent residuals must reach (under the reference's ratio).
    min_predicted
        Predicted units a category needs in the recent window to be tested.
    steady
        How far apart (times) the reference's two halves' ratios may be for the category to be tested.
    page_ratio, page_z
        The same two thresholds for the whole page (every slot together).
    page_confirm_z
        A shift is raised only when the whole page does worse than its prediction: by ``page_ratio``
        and ``page_z`` on its own, or with a z-score of at least ``page_confirm_z`` (below) behind a
        category that moved.
    """

    recent: int = 200
    reference: int = 2000
    min_reference: int = 600
    ratio: float = 1.5
    z: float = 5.0
    min_predicted: float = 100.0
    steady: float = 1.25
    page_ratio: float = 1.25
    page_z: float = 4.5
    page_confirm_z: float = 2.0
    slots: int = 1
    outcomes: SlotOutcomes = field(init=False)

    def __post_init__(self) -> None:
        self.outcomes = SlotOutcomes.empty(self.slots)

    def reset(self) -> None:
        self.outcomes = SlotOutcomes.empty(self.slots)

    def add(self, o: SlotOutcomes) -> None:
        self.outcomes = self.outcomes.concat(o).tail(self.recent + self.reference)

    def check(self, n_categories: int) -> Shift | None:
        """The shift between the reference and the recent window, or None."""
        n = len(self.outcomes)
        if n < self.recent + self.min_reference:
            return None
        o = self.outcomes
        half = (n - self.recent) // 2

        def test(o: SlotOutcomes, k: int, ratio_at: float, z_at: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            steady, _, _ = category_shift(o.part(0, half), o.part(half, n - self.recent), k)
            ratio, z, p = category_shift(o.part(0, n - self.recent), o.part(n - self.recent, n), k)
            big = np.isfinite(ratio) & ((ratio >= ratio_at) | (ratio <= 1.0 / ratio_at))
            calm = np.isfinite(steady) & (steady <= self.steady) & (steady >= 1.0 / self.steady)
            return big & calm & (np.abs(np.nan_to_num(z)) >= z_at) & (p >= self.min_predicted), ratio, z

        o = self.outcomes
        hit, ratio, z = test(o, n_categories, self.ratio, self.z)
        # the whole page with each slot's prediction scaled by its category's ratio over the reference:
        # a change in the categories served (the pacer's prices moved, a category the engine
        # under-predicts shown more) leaves the page's ratio at 1; only the categories' own ratios move it
        C = n_categories
        cat = np.where((o.category >= 0) & (o.category < C), o.category, C)
        ref = o.part(0, n - self.recent)
        rc = ref.category.ravel()
        rok = (rc >= 0) & (rc < C)
        y_ref = np.bincount(rc[rok], weights=ref.units.ravel()[rok], minlength=C)
        p_ref = np.bincount(rc[rok], weights=ref.predicted.ravel()[rok], minlength=C)
        e_ref = np.divide(y_ref, p_ref, out=np.ones(C), where=(p_ref > 0) & (y_ref > 0))
        scale = np.append(e_ref, 1.0)[cat]
        page = SlotOutcomes(o.ts, np.where(cat < C, 0, -1), o.units, o.predicted * scale)
        page_hit, page_ratio, page_z = test(page, 1, self.page_ratio, self.page_z)
        # what the shift response is for: the pages served do worse than predicted (users' stored
        # tastes misled them). Pages doing better (a new calibration or item rates serving better
        # items than the logged predictions knew of) are no reason to forget what users liked
        worse = bool(np.isfinite(page_ratio[0]) and page_ratio[0] < 1.0 and page_z[0] <= -self.page_confirm_z)
        if not ((hit.any() and worse) or (page_hit[0] and page_ratio[0] < 1.0)):
            return None
        return Shift(float(o.ts[n - self.recent]), ratio, z, tuple(np.flatnonzero(hit).tolist()),
                     float(page_ratio[0]), float(page_z[0]))
