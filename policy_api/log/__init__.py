"""The SQL log and the catalog: schema and engine factory, row reads and writes, the batched writer
with its spill file, the log as arrays (the reference reader and the bulk Arrow reader), Parquet
export, and catalog files.

Everything here takes an SQLAlchemy ``Engine`` (or a ``Connection`` inside the caller's transaction)
and returns columns or dataclasses; nothing here decides or learns.
"""

from ._arrays import DecisionLog, Rewards, decision_log, join_rewards, pad_candidates, to_epoch
from ._bulk import read_decision_log
from ._catalog import Catalog, CatalogError, read_catalog_csv
from ._export import EXPORT_COLUMNS, export_parquet, read_parquet
from ._rows import (
    DECISION_COLUMNS,
    FEEDBACK_COLUMNS,
    existing_event_ids,
    feedback_first_seen,
    insert_decisions,
    insert_feedback,
    iter_decisions,
    load_items,
    read_decisions,
    read_feedback,
    upsert_items,
)
from ._schema import (
    CONFIG_STATUSES,
    MODEL_STATUSES,
    PLAN_STATUSES,
    Bind,
    UTCDateTime,
    alembic_config,
    begin,
    configs,
    decisions,
    downgrade,
    feedback,
    items,
    json_dumps,
    json_loads,
    make_engine,
    metadata,
    migrations_dir,
    models,
    normalize_url,
    plans,
    reading,
    upgrade,
    utcnow,
)
from ._writer import LogWriter, decode_spill_line, encode_spill_line

__all__ = [
    "CONFIG_STATUSES",
    "DECISION_COLUMNS",
    "MODEL_STATUSES",
    "PLAN_STATUSES",
    "EXPORT_COLUMNS",
    "FEEDBACK_COLUMNS",
    "Bind",
    "Catalog",
    "CatalogError",
    "DecisionLog",
    "LogWriter",
    "Rewards",
    "UTCDateTime",
    "alembic_config",
    "begin",
    "configs",
    "decision_log",
    "decisions",
    "decode_spill_line",
    "downgrade",
    "encode_spill_line",
    "existing_event_ids",
    "export_parquet",
    "feedback",
    "feedback_first_seen",
    "insert_decisions",
    "insert_feedback",
    "items",
    "iter_decisions",
    "join_rewards",
    "json_dumps",
    "json_loads",
    "load_items",
    "make_engine",
    "metadata",
    "migrations_dir",
    "models",
    "normalize_url",
    "pad_candidates",
    "plans",
    "read_catalog_csv",
    "read_decision_log",
    "read_decisions",
    "read_feedback",
    "read_parquet",
    "reading",
    "to_epoch",
    "upgrade",
    "upsert_items",
    "utcnow",
]
