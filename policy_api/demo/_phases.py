"""What the demo observed in each phase."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PhaseLog"]


@dataclass
class PhaseLog:
    """What the demo observed in one phase (arrays, one row per request)."""

    name: str
    user: np.ndarray
    slot_items: np.ndarray  # (n, S, K) world item index, -1 empty
    slot_category: np.ndarray  # (n, S)
    long_tail: np.ndarray  # (n,) share of shown items that are long tail
    realised_reward: np.ndarray  # (n,)
    expected_reward: np.ndarray  # (n,) ground truth of the served layout
    latency_s: np.ndarray  # (n,)
    fallback: np.ndarray  # (n,) bool
    propensity: np.ndarray  # (n,)
    t_end: np.ndarray = field(default_factory=lambda: np.zeros(0))
    request_id: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
