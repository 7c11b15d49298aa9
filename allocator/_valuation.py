"""Refitting category values (money per engagement unit) from observed revenue, with shrinkage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ValueRefit", "refit_values"]


@dataclass(frozen=True, slots=True)
class ValueRefit:
    """Per category (config order): the evidence and the refit value.

    Attributes
    ----------
    units, revenue : (C,) engagement units and revenue observed per category
    raw : (C,) revenue / units (NaN where no units)
    value : (C,) the shrunk value, ``(R + kappa * v0) / (U + kappa)``
    weight : (C,) the weight on the data, ``U / (U + kappa)``
    """

    units: np.ndarray
    revenue: np.ndarray
    raw: np.ndarray
    value: np.ndarray
    weight: np.ndarray


def refit_values(category: np.ndarray, units: np.ndarray, revenue: np.ndarray, configured: np.ndarray,
                 prior_units: float = 500.0) -> ValueRefit:
    """Money per engagement unit by category, shrunk toward the configured value.

    ``value_c = (R_c + kappa * v0_c) / (U_c + kappa)``, with ``R_c`` the revenue and ``U_c`` the
    engagement units of category ``c``'s events, ``v0_c`` the configured value and ``kappa =
    prior_units`` (the evidence, in units, that counts as much as the configured value).

    Parameters
    ----------
    category
        Shape (n_events,) int: the event's category index into ``configured`` (-1 = none: ignored).
    units, revenue
        Shape (n_events,): the event's engagement units (its configured event weight) and revenue
        (0 where the event carried none).
    configured
        Shape (C,): the configured values.

    Examples
    --------
    >>> r = refit_values(np.array([0, 0, 1]), np.array([1.0, 1.0, 2.0]), np.array([3.0, 1.0, 0.0]),
    ...                  np.array([1.0, 1.0]), prior_units=2.0)
    >>> r.value.tolist(), r.weight.tolist()
    ([1.5, 0.5], [0.5, 0.5])
    """
    if not prior_units > 0:
        raise ValueError(f"prior_units must be > 0; got {prior_units!r}")
    cat = np.asarray(category, dtype=np.int64)
    u = np.asarray(units, dtype=np.float64)
    r = np.asarray(revenue, dtype=np.float64)
    v0 = np.asarray(configured, dtype=np.float64)
    if not (cat.shape == u.shape == r.shape and cat.ndim == 1):
        raise ValueError(f"category, units and revenue must be 1-d of one length; got shapes {cat.shape}, "
                         f"{u.shape}, {r.shape}")
    if not np.isfinite(r).all() or not np.isfinite(u).all():
        raise ValueError("units and revenue must be finite; got NaN or inf (pass 0 for no revenue)")
    C = v0.size
    ok = (cat >= 0) & (cat < C)
    U = np.maximum(np.bincount(cat[ok], weights=u[ok], minlength=C), 0.0)
    R = np.bincount(cat[ok], weights=r[ok], minlength=C)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(U > 0, R / np.where(U > 0, U, 1.0), np.nan)
    return ValueRefit(units=U, revenue=R, raw=raw, value=(R + prior_units * v0) / (U + prior_units),
                      weight=U / (U + prior_units))
