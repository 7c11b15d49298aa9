"""The registry: one typed place for what is published — operator configs, plans (prices) and models.

Records are frozen (:class:`ConfigRecord`, :class:`PlanRecord`, :class:`ModelRecord`); publishing a
version supersedes the active one under one lock; the ranker's artifact format lives here too.
Serving, jobs and the CLI read and publish only through these functions.
"""

from ._artifacts import RankerArtifact, pack_ranker, unpack_ranker
from ._diff import Change, flatten, mapping_diff, text_diff
from ._records import ConfigRecord, ModelRecord, PlanRecord, Versions
from ._store import (
    activate_config,
    activate_version,
    active_config,
    config_history,
    config_version,
    latest_plan,
    latest_versions,
    model,
    model_history,
    parse_body,
    plan_history,
    prices,
    publish_model,
    publish_plan,
    require_active_config,
)

__all__ = [
    "Change",
    "ConfigRecord",
    "ModelRecord",
    "PlanRecord",
    "RankerArtifact",
    "Versions",
    "activate_config",
    "activate_version",
    "active_config",
    "config_history",
    "config_version",
    "flatten",
    "latest_plan",
    "latest_versions",
    "mapping_diff",
    "model",
    "model_history",
    "pack_ranker",
    "parse_body",
    "plan_history",
    "prices",
    "publish_model",
    "publish_plan",
    "require_active_config",
    "text_diff",
    "unpack_ranker",
]
