"""Jobs: plain functions that read one snapshot (the registry and the log), compute with the core
packages and return a frozen result. No argparse, no printing: the CLI, the demo and the server's
operator routes call the same functions.
"""

from ._importing import ImportResult, import_file, import_rows, read_interactions
from ._learn import LearnResult, catalog_categories, learn, load_log, log_features, new_bandit
from ._plan import (
    ApplyResult,
    ConfigCheck,
    HeadRefresh,
    PaceResult,
    PlanResult,
    apply_config,
    calibration,
    check_config,
    dry_run,
    exposure_report,
    pace,
    plan,
    refresh_head,
    sample_users,
    user_candidates,
)
from ._replay import (
    TARGETS,
    ReplayResult,
    config_candidates,
    export_dsjson,
    log_from_parquet,
    parse_target,
    replay,
    target_distribution,
)
from ._train import TrainResult, log_training_arrays, train_ranker
from ._valuation import Refit, refit_valuation, with_values

__all__ = [
    "TARGETS",
    "ApplyResult",
    "ConfigCheck",
    "HeadRefresh",
    "ImportResult",
    "LearnResult",
    "PaceResult",
    "PlanResult",
    "Refit",
    "ReplayResult",
    "TrainResult",
    "apply_config",
    "calibration",
    "catalog_categories",
    "check_config",
    "config_candidates",
    "dry_run",
    "export_dsjson",
    "exposure_report",
    "import_file",
    "import_rows",
    "learn",
    "load_log",
    "log_features",
    "log_from_parquet",
    "log_training_arrays",
    "new_bandit",
    "pace",
    "parse_target",
    "plan",
    "read_interactions",
    "refit_valuation",
    "refresh_head",
    "replay",
    "sample_users",
    "target_distribution",
    "train_ranker",
    "user_candidates",
    "with_values",
]
