"""SQL log schema (SQLAlchemy Core), engine factory and programmatic Alembic.

The six tables of the decision log live in one :data:`metadata` whose naming convention gives every
index and constraint a deterministic name, so that the hand-written Alembic revision
(``migrations/versions/0001_initial.py``) and the metadata compare equal (``alembic check``).

Timestamps are timezone-aware UTC everywhere (:class:`UTCDateTime`): PostgreSQL stores
``timestamptz``; SQLite stores the UTC wall clock as text and the UTC zone is re-attached on read.
JSON columns are ``JSON`` on SQLite and ``JSONB`` on PostgreSQL, except ``decisions.candidates``,
``decisions.pmf`` (migration 0005) and ``decisions.layout`` (0006): ``JSON`` there too, stored as
sent, and compressed with lz4 where the server has it (0006).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import StaticPool

__all__ = [
    "Bind",
    "begin",
    "reading",
    "json_loads",
    "migrations_dir",
    "alembic_config",
    "CONFIG_JOB_KINDS",
    "CONFIG_JOB_STATUSES",
    "CONFIG_STATUSES",
    "IMPORT_POLICY",
    "MODEL_STATUSES",
    "NAMING_CONVENTION",
    "PLAN_STATUSES",
    "UTCDateTime",
    "config_jobs",
    "configs",
    "decisions",
    "downgrade",
    "feedback",
    "items",
    "loop_lease",
    "json_dumps",
    "make_engine",
    "metadata",
    "models",
    "normalize_url",
    "plans",
    "upgrade",
    "utcnow",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CONFIG_STATUSES = ("active", "superseded", "rejected")
PLAN_STATUSES = ("active", "superseded", "rejected")
MODEL_STATUSES = ("published", "rejected")
CONFIG_JOB_KINDS = ("dry_run", "apply", "rollback")
CONFIG_JOB_STATUSES = ("queued", "running", "done", "failed", "lost")

DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_STATEMENT_TIMEOUT_S = 5.0
DEFAULT_BUSY_TIMEOUT_S = 5.0
SQLITE_PAGE_SIZE = 16384
CONNECT_TIMEOUT_ENV = "HOMEPAGE_DB_CONNECT_TIMEOUT"
STATEMENT_TIMEOUT_ENV = "HOMEPAGE_DB_STATEMENT_TIMEOUT"


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC timestamp on every backend.

    Binds only aware datetimes (converted to UTC; a naive value is an error, because its zone is
    unknown) and always returns aware UTC datetimes. On SQLite the UTC wall clock is stored, so text
    order is time order.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"timestamp must be a datetime; got {type(value).__name__} {value!r}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"timestamp must be timezone-aware (UTC); got naive {value!r}")
        as_utc = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return as_utc.replace(tzinfo=None)
        return as_utc

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        stamp: datetime = value
        if stamp.tzinfo is None:
            return stamp.replace(tzinfo=UTC)
        return stamp.astimezone(UTC)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"JSON column value must be JSON-serialisable; got {type(obj).__name__} {obj!r}")


_OPTS = orjson.OPT_SERIALIZE_NUMPY


def json_dumps(obj: Any) -> str:
    """JSON text for the JSON/JSONB columns (orjson: numpy scalars and arrays allowed).

    The log's rows are dominated by JSON encoding (a decision with 16 candidates is ~10 KB), so the
    encoder is orjson, several times faster than the standard library's. It writes NaN/inf as null;
    the engine never logs non-finite numbers (it checks scores before deciding).
    """
    return orjson.dumps(obj, default=_json_default, option=_OPTS).decode()


def json_loads(text: str | bytes) -> Any:
    return orjson.loads(text)


def _json() -> sa.types.TypeEngine[Any]:
    # none_as_null: Python None is SQL NULL (a nullable column), never the JSON text 'null'
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _json_text() -> sa.types.TypeEngine[Any]:
    # json, not jsonb, on PostgreSQL: stored as sent, not parsed and re-encoded by the server on
    # every insert; for the bulky columns written once and read whole (migration 0005)
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSON(none_as_null=True), "postgresql")


metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def _status_check(statuses: tuple[str, ...]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{s}'" for s in statuses)
    return sa.CheckConstraint(f"status IN ({allowed})", name="status")


#: ``decisions.policy`` of imported history (``homepage import``): logged like served traffic, not served
IMPORT_POLICY = "import"

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("request_id", sa.String(), primary_key=True),
    sa.Column("ts", UTCDateTime(), nullable=False, index=True),
    sa.Column("user_id", sa.String(), nullable=False, index=True),
    sa.Column("context", _json(), nullable=True),
    sa.Column("versions", _json(), nullable=True),
    sa.Column("policy", sa.String(), nullable=False),
    # list of {"modules": [module_id, ...], "tilt": f, "value": f, "exposure": [f, ...], "score": f},
    # stored columnar ({"$n": n, "modules": [[...], ...], "tilt": [...], ...}; policy_api.log's
    # encode_candidates / decode_candidates); rows written before that as the list itself
    sa.Column("candidates", _json_text(), nullable=False),
    sa.Column("pmf", _json_text(), nullable=False),
    sa.Column("chosen", sa.Integer(), nullable=False),
    sa.Column("propensity", sa.Double(), nullable=False),
    sa.Column("layout", _json_text(), nullable=True),
    sa.Column("fallback_reason", sa.String(), nullable=True),
)
# when serving began: its first decision that is not an import (policy_api.engine.serving_since)
sa.Index("ix_decisions_policy_ts", decisions.c.policy, decisions.c.ts)

# No foreign key to decisions: feedback may be flushed before its decision (another worker's queue).
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(), nullable=False, unique=True),
    sa.Column("request_id", sa.String(), nullable=False, index=True),
    sa.Column("slot", sa.Integer(), nullable=True),
    sa.Column("item_id", sa.String(), nullable=True),
    sa.Column("type", sa.String(), nullable=False),
    sa.Column("value", sa.Double(), nullable=True),
    sa.Column("ts", UTCDateTime(), nullable=False, index=True),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", sa.String(), primary_key=True),
    sa.Column("category", sa.String(), nullable=False),
    sa.Column("popularity", sa.Double(), nullable=False),
    sa.Column("features", _json(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False, index=True),  # workers poll its newest value
    # when the item first entered the catalog (a reload keeps it; NULL for items older than migration 0007)
    sa.Column("added_at", UTCDateTime(), nullable=True),
)

configs = sa.Table(
    "configs",
    metadata,
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("author", sa.String(), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
    sa.Column("projection", _json(), nullable=True),
    _status_check(CONFIG_STATUSES),
)

plans = sa.Table(
    "plans",
    metadata,
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("config_version", sa.Integer(), nullable=True),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("prices", _json(), nullable=False),
    sa.Column("projected", _json(), nullable=True),
    sa.Column("solver", _json(), nullable=True),
    _status_check(PLAN_STATUSES),
)

# One row per background loop name: which process holds it until when, and what it last did (for
# /readyz and /ops). Times are the holder's clock (UTC); a lease expires unless renewed.
loop_lease = sa.Table(
    "loop_lease",
    metadata,
    sa.Column("name", sa.String(), primary_key=True),
    sa.Column("holder", sa.String(), nullable=False),
    sa.Column("acquired_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("status", _json(), nullable=True),
)

# Config changes run as jobs off the request threads (policy_api.serving): one row per job, written
# by the worker that runs it (``owner``: host:pid), which renews ``heartbeat_at`` while the job is queued
# or running; a job whose heartbeat stops is reported lost. ``apply_slot`` is 'config' while an apply
# or rollback is queued or running (NULL otherwise): its unique constraint admits one per database.
config_jobs = sa.Table(
    "config_jobs",
    metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("kind", sa.String(), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("body", sa.Text(), nullable=True),
    sa.Column("target_version", sa.BigInteger(), nullable=True),
    sa.Column("author", sa.String(), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("owner", sa.String(), nullable=False),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    sa.Column("apply_slot", sa.String(), nullable=True, unique=True),
    sa.Column("result", _json(), nullable=True),
    sa.Column("error", _json(), nullable=True),
    _status_check(CONFIG_JOB_STATUSES),
    sa.CheckConstraint("kind IN ('dry_run', 'apply', 'rollback')", name="kind"),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("metrics", _json(), nullable=True),
    sa.Column("artifact", sa.LargeBinary(), nullable=True),
    sa.UniqueConstraint("name", "version"),
    _status_check(MODEL_STATUSES),
)

# The live state (policy_api.live): one row per user, the state as orjson text (opaque to SQL, numbers
# round-trip exactly); item trends as decayed engagement as of each row's own `updated` (epoch seconds).
user_state = sa.Table(
    "user_state",
    metadata,
    sa.Column("user_id", sa.String(), primary_key=True),
    sa.Column("state", sa.Text(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

item_stats = sa.Table(
    "item_stats",
    metadata,
    sa.Column("item_id", sa.String(), primary_key=True),
    sa.Column("engagement", sa.Double(), nullable=False),
    sa.Column("updated", sa.Double(), nullable=False),
)


# --------------------------------------------------------------------------------------------- engine


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; ``postgresql://`` and ``postgres://`` map to the psycopg 3 driver.

    Raises
    ------
    ValueError
        For a backend other than SQLite or PostgreSQL/psycopg.
    """
    parsed = sa.make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    shown = parsed.render_as_string(hide_password=True)
    raise ValueError(
        f"url must be sqlite:///<path> or postgresql[+psycopg]://...; got {shown!r}"
    )


def _seconds(value: float | None, name: str, env: str, default: float) -> float:
    if value is None:
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{env} must be a positive number of seconds; got {raw!r}") from None
        if not value > 0:
            raise ValueError(f"{env} must be a positive number of seconds; got {raw!r}")
        return value
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return float(value)


def _is_memory_sqlite(url: URL) -> bool:
    db = url.database or ""
    return db in ("", ":memory:") or (db.startswith("file:") and "mode=memory" in db)


def make_engine(
    url: str | URL,
    *,
    connect_timeout_s: float | None = None,
    statement_timeout_s: float | None = None,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    **engine_kwargs: Any,
) -> Engine:
    """Engine for the decision log, configured so that a slow or frozen database cannot hang a caller.

    Parameters
    ----------
    url
        ``sqlite:///path/to/log.db`` (the parent folder is created), ``sqlite://`` (in-memory, one
        shared connection; tests only), or ``postgresql[+psycopg]://user@host/db``.
    connect_timeout_s, statement_timeout_s
        PostgreSQL only. Default: env ``HOMEPAGE_DB_CONNECT_TIMEOUT`` /
        ``HOMEPAGE_DB_STATEMENT_TIMEOUT`` (seconds), else 2 s / 5 s. The statement timeout is enforced
        by the server (``statement_timeout``); TCP keepalives and ``tcp_user_timeout`` (statement
        timeout + 2 s) detect a peer that stopped answering.
    busy_timeout_s
        SQLite only: how long a writer waits for the database lock.
    **engine_kwargs
        Passed to :func:`sqlalchemy.create_engine`.

    Notes
    -----
    SQLite connections run ``journal_mode=WAL`` (readers never block the writer), a new file gets
    16 KiB pages (``page_size``),
    ``synchronous=NORMAL`` (durable at checkpoints, safe with WAL) and ``busy_timeout``.
    PostgreSQL uses ``pool_pre_ping`` so a restarted server costs one reconnect, not an error.
    """
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {"json_serializer": json_dumps, "json_deserializer": json_loads}
    if parsed.get_backend_name() == "sqlite":
        if not busy_timeout_s > 0:
            raise ValueError(f"busy_timeout_s must be > 0; got {busy_timeout_s!r}")
        memory = _is_memory_sqlite(parsed)
        connect_args: dict[str, Any] = {"timeout": busy_timeout_s}
        if memory:
            connect_args["check_same_thread"] = False
            kwargs["poolclass"] = StaticPool
        elif parsed.database:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = connect_args
        kwargs.update(engine_kwargs)
        engine = sa.create_engine(parsed, **kwargs)
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                if not memory:
                    # a new file only (no effect on an existing one): a decision row of several KB
                    # fits a 16 KiB page instead of a chain of overflow pages
                    cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            finally:
                cur.close()

        return engine

    connect_s = _seconds(connect_timeout_s, "connect_timeout_s", CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S)
    statement_s = _seconds(statement_timeout_s, "statement_timeout_s", STATEMENT_TIMEOUT_ENV, DEFAULT_STATEMENT_TIMEOUT_S)
    options = f"-c statement_timeout={max(1, round(statement_s * 1000))}"
    url_options = parsed.query.get("options")
    if isinstance(url_options, str) and url_options:
        options = f"{url_options} {options}"
    kwargs.update(
        pool_pre_ping=True,
        pool_timeout=connect_s,
        connect_args={
            # libpq takes whole seconds (and treats anything below 2 as 2)
            "connect_timeout": max(1, round(connect_s)),
            "options": options,
            "application_name": "homepage",
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            # data unacknowledged this long breaks the connection (a peer that vanished without a
            # reset); a server that is frozen but whose kernel still acknowledges is not caught by
            # any socket setting: callers on the request path bound their wait themselves
            "tcp_user_timeout": round((statement_s + 2.0) * 1000),
        },
    )
    kwargs.update(engine_kwargs)
    return sa.create_engine(parsed, **kwargs)


Bind = Engine | Connection


@contextmanager
def begin(bind: Bind) -> Iterator[Connection]:
    """A transaction: the Engine's own (committed on exit), or the caller's when given a Connection."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.begin() as conn:
            yield conn


@contextmanager
def reading(bind: Bind) -> Iterator[Connection]:
    """A connection for reads: a new one from an Engine, or the caller's Connection."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.connect() as conn:
            yield conn


@contextmanager
def _connection(bind: Engine | Connection | str | URL) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    engine = bind if isinstance(bind, Engine) else make_engine(bind)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        if engine is not bind:
            engine.dispose()


# ------------------------------------------------------------------------------------------- alembic


def migrations_dir() -> Path:
    """Folder of the installed ``migrations`` package (Alembic ``script_location``), from any cwd."""
    return Path(str(resources.files("migrations")))


def alembic_config(url: str | URL | None = None) -> Any:
    """An :class:`alembic.config.Config` pointing at the installed migrations (no ini file needed)."""
    from alembic.config import Config  # here: only migrations need Alembic

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        # '%' is the ini interpolation character
        shown = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", shown.replace("%", "%%"))
    cfg.attributes["target_metadata"] = metadata
    return cfg


def _run_alembic(bind: Engine | Connection | str | URL, fn: Callable[[Any], None]) -> None:
    cfg = alembic_config()
    with _connection(bind) as conn:
        cfg.attributes["connection"] = conn
        fn(cfg)


def upgrade(bind: Engine | Connection | str | URL, revision: str = "head") -> None:
    """Run Alembic ``upgrade`` programmatically (in one transaction where the backend allows).

    ``bind`` is a URL, an Engine, or a Connection whose transaction the caller commits.
    """
    from alembic import command

    _run_alembic(bind, lambda cfg: command.upgrade(cfg, revision))


def downgrade(bind: Engine | Connection | str | URL, revision: str = "base") -> None:
    """Run Alembic ``downgrade`` programmatically; ``base`` drops every log table."""
    from alembic import command

    _run_alembic(bind, lambda cfg: command.downgrade(cfg, revision))
