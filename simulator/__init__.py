"""A synthetic homepage world with known ground truth (numpy only).

Used by the demo, the tests and the benchmarks: users with latent tastes, category affinities and
skewed activity; items with Zipf popularity; clicks with position bias and popularity conformity;
engagement events with known expected units; an exact oracle layout per user.
"""

from ._config import DEFAULT_MODULES
from ._log import exposure_log
from ._world import (
    CATEGORIES,
    DEFAULT_EVENT_WEIGHTS,
    DEFAULT_SLOT_EXAMINATION,
    EVENT_TYPES,
    FEEDBACK_TYPES,
    ITEM_FEATURE_NAMES,
    Feedback,
    World,
    make_world,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_EVENT_WEIGHTS",
    "DEFAULT_MODULES",
    "DEFAULT_SLOT_EXAMINATION",
    "EVENT_TYPES",
    "FEEDBACK_TYPES",
    "ITEM_FEATURE_NAMES",
    "Feedback",
    "World",
    "exposure_log",
    "make_world",
]
