"""What a user's taste before a population shift says about it after: a linear map, fitted on the users
seen on both sides of the shift.

After a shift (:class:`~policy_api.live.Forget`) each live state keeps its category sums from before it
(``before_*``) and starts new ones. A user's rate before it, per category, is
``o_c = (U_c + k r_c) / (I_c + k)`` (``r`` the population's rates before the shift, ``k`` prior
impressions). What users take now is modelled per category as ``b_c + a_c . o``: a ridge regression of
each user's new rate on their old rates, weighted by the user's new evidence. The map says how tastes
moved: the identity with new levels when every category just got more or less popular, a permutation
when the audiences of categories swapped, nothing but ``b`` (the population's new rate) when the old
taste says nothing. Serving shrinks each user's new evidence toward ``b + A o`` instead of toward the
population's rate, so a user's first pages after the shift are already personal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInput

__all__ = ["ShiftMap", "fit_shift_map"]

#: users with new evidence on a category that its row of the map needs (fewer: the population's rate)
MIN_USERS = 30
#: ridge penalty on the map's slopes, in users of full weight (on standardised old rates)
RIDGE = 10.0
#: examined impressions of new evidence at which a user weighs half as much as one measured exactly
EVIDENCE_HALF = 20.0


@dataclass(frozen=True)
class ShiftMap:
    """``prior(U, I) = intercept + coef @ o(U, I)``, per category; NaN intercepts mark categories without
    a fitted row (the caller keeps the population's rate there).

    Attributes
    ----------
    before_rate
        (C,) the population's rate of each category before the shift (the old rates' shrinkage target).
    coef
        (C, C) row c: how each old rate moves category c's new rate.
    intercept
        (C,) NaN where the row was not fitted.
    k
        Prior impressions of the old rates.
    users
        (C,) users each row was fitted on.
    """

    before_rate: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    k: float = 20.0
    users: np.ndarray | None = None

    def __post_init__(self) -> None:
        C = self.before_rate.shape[0]
        if self.coef.shape != (C, C) or self.intercept.shape != (C,):
            raise InvalidInput(f"a shift map needs coef ({C}, {C}) and intercept ({C},) for {C} categories; got "
                               f"{self.coef.shape} and {self.intercept.shape}", field="map")
        if not (np.isfinite(self.before_rate).all() and np.isfinite(self.coef).all()):
            raise InvalidInput("a shift map's before_rate and coef must be finite", field="map")

    def old_rates(self, engagement: np.ndarray, impressions: np.ndarray) -> np.ndarray:
        """(..., C) ``(U + k r) / (I + k)``."""
        return (engagement + self.k * self.before_rate) / (impressions + self.k)

    def prior(self, engagement: np.ndarray, impressions: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """(C,) the user's expected rate per category now, from the sums before the shift; ``fallback``
        where the map has no row."""
        p = self.intercept + self.coef @ self.old_rates(engagement, impressions)
        return np.where(np.isfinite(self.intercept), p, fallback)

    def to_dict(self) -> dict[str, Any]:
        return {"before_rate": self.before_rate.tolist(), "coef": self.coef.tolist(),
                "intercept": [None if not np.isfinite(v) else float(v) for v in self.intercept],
                "k": self.k, "users": None if self.users is None else [int(u) for u in self.users]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiftMap:
        try:
            return cls(np.asarray(d["before_rate"], dtype=np.float64), np.asarray(d["coef"], dtype=np.float64),
                       np.array([np.nan if v is None else float(v) for v in d["intercept"]]), float(d.get("k", 20.0)),
                       None if d.get("users") is None else np.asarray(d["users"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"a shift map must be {{before_rate, coef, intercept[, k, users]}}; got {d!r}",
                               field="map") from e


def fit_shift_map(before_eng: np.ndarray, before_imp: np.ndarray, eng: np.ndarray, imp: np.ndarray,
                  before_rate: np.ndarray, *, k: float = 20.0, ridge: float = RIDGE,
                  min_users: int = MIN_USERS) -> ShiftMap:
    """Fit the map on ``n`` users' category sums before the shift (``before_*``, (n, C)) and since it
    (``eng``, ``imp``, (n, C)).

    Row ``c``: the users with new impressions of ``c``; target their new rate ``eng / imp``, weight
    ``imp / (imp + EVIDENCE_HALF)``; features their old rates, standardised (weighted); ridge ``ridge``
    on the standardised slopes, none on the intercept. Closed form (a ``C + 1`` linear solve per row).
    """
    before_rate = np.asarray(before_rate, dtype=np.float64)
    C = before_rate.size
    coef = np.zeros((C, C))
    intercept = np.full(C, np.nan)
    users = np.zeros(C, dtype=np.int64)
    o = (before_eng + k * before_rate) / (before_imp + k)
    for c in range(C):  # one row per category (C is a handful)
        m = imp[:, c] > 0
        users[c] = int(m.sum())
        if users[c] < min_users:
            continue
        y = eng[m, c] / imp[m, c]
        w = imp[m, c] / (imp[m, c] + EVIDENCE_HALF)
        x = o[m]
        mu = np.average(x, axis=0, weights=w)
        sd = np.sqrt(np.average((x - mu) ** 2, axis=0, weights=w))
        sd = np.where(sd > 1e-9, sd, 1.0)
        z = (x - mu) / sd
        ybar = float(np.average(y, weights=w))
        a = np.linalg.solve((z * w[:, None]).T @ z + ridge * np.eye(C), (z * w[:, None]).T @ (y - ybar))
        coef[c] = a / sd
        intercept[c] = ybar - float(coef[c] @ mu)
    return ShiftMap(before_rate, coef, intercept, k, users)
