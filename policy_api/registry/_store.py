"""The registry on SQL: configs, plans and models in the log's database.

Every function takes ``bind``: an Engine (it runs its own transaction) or a Connection (it runs in
the caller's transaction, so e.g. a config and its plan land together or not at all).

Publishing a version is one pattern, written once (:func:`_publish`): take the registry's lock for
that table (a PostgreSQL advisory lock; SQLite serialises writers already), supersede the active row
when the new one is active, insert, return the new version.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from allocator import ConfigError, HomepageConfig, parse_config_text

from ..errors import InvalidInput, NotFound, NotReady, from_config_error
from ..log import (
    MODEL_STATUSES,
    PLAN_STATUSES,
    Bind,
    begin,
    configs,
    models,
    plans,
    reading,
    utcnow,
)
from ._records import ConfigRecord, ModelRecord, PlanRecord, Versions

__all__ = [
    "activate_config",
    "activate_version",
    "active_config",
    "config_history",
    "config_version",
    "latest_plan",
    "latest_versions",
    "model",
    "model_history",
    "parse_body",
    "plan_history",
    "prices",
    "publish_model",
    "publish_plan",
    "require_active_config",
]

_LOCKS = {"configs": 0x6F6E66, "plans": 0x706C6E, "models": 0x6D646C}
_RETRIES = 8


def _check_status(status: str, allowed: tuple[str, ...]) -> None:
    if status not in allowed:
        raise InvalidInput(f"status must be one of {allowed}; got {status!r}", field="status")


def _lock(conn: Connection, table: sa.Table) -> None:
    # Serialises publishers on PostgreSQL, so "supersede + insert" and max(version) + 1 never race.
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCKS[table.name])))


def _publish(conn: Connection, table: sa.Table, values: dict[str, Any], *, supersede: bool,
             version: sa.ScalarSelect[Any] | None = None, only_if: sa.ColumnElement[bool] | None = None) -> int:
    """Lock, supersede the active row (when ``supersede``), insert; the new row's version.

    With ``only_if`` (an SQL condition, evaluated by the same statements as the write) the active row is
    superseded and the new row inserted as active only where it holds; otherwise the new row is
    inserted as ``superseded`` and the active one stays."""
    _lock(conn, table)
    if supersede:
        active = table.c.status == "active"
        conn.execute(table.update().where(active if only_if is None else sa.and_(active, only_if))
                     .values(status="superseded"))
        if only_if is not None:
            values = {**values, "status": sa.case((only_if, "active"), else_="superseded")}
    if version is not None:
        values = {**values, "version": version}
    res = conn.execute(table.insert().values(created_at=utcnow(), **values).returning(table.c.version))
    return int(res.scalar_one())


# ------------------------------------------------------------------------------------------- configs


def parse_body(body: str, version: int | None = None) -> HomepageConfig:
    """The config in ``body``; :class:`~policy_api.errors.InvalidInput` naming every bad key."""
    source = "config" if version is None else f"configs.version={version}"
    try:
        return parse_config_text(body, source=source)
    except ConfigError as e:
        raise from_config_error(e) from None


@lru_cache(maxsize=16)
def _stored_config(body: str, version: int) -> HomepageConfig:
    # a stored version never changes and the parsed config is frozen: parsed once per process (the loop
    # reads the active config every tick, and parsing the TOML was a fifth of its CPU)
    return parse_body(body, version)


def _config_record(row: Row[Any]) -> ConfigRecord:
    m = row._mapping
    return ConfigRecord(version=int(m["version"]), body=str(m["body"]),
                        config=_stored_config(str(m["body"]), int(m["version"])),
                        status=str(m["status"]), author=str(m["author"]), note=str(m["note"]),
                        created_at=m["created_at"], projection=m["projection"])


def active_config(bind: Bind) -> ConfigRecord | None:
    """The active config, or None before any config was applied."""
    with reading(bind) as conn:
        row = conn.execute(sa.select(configs).where(configs.c.status == "active")
                           .order_by(configs.c.version.desc()).limit(1)).first()
    return None if row is None else _config_record(row)


def require_active_config(bind: Bind) -> ConfigRecord:
    """The active config; :class:`~policy_api.errors.NotReady` with what to run when there is none."""
    rec = active_config(bind)
    if rec is None:
        raise NotReady("no active config in the database; apply one with `homepage config apply FILE` "
                       "(or start `homepage serve --config FILE`)", field="config")
    return rec


def config_version(bind: Bind, version: int) -> ConfigRecord:
    """The config stored as ``version`` (any status)."""
    with reading(bind) as conn:
        row = conn.execute(sa.select(configs).where(configs.c.version == version)).first()
    if row is None:
        raise NotFound(f"config version must exist in the registry; got {version!r}", field="version")
    return _config_record(row)


def activate_config(bind: Bind, body: str, *, author: str, note: str = "",
                    projection: Mapping[str, Any] | None = None) -> int:
    """Store ``body`` as the new active config (superseding the active one) and return its version.

    The text is validated first: an invalid config is never stored.
    """
    parse_body(body)
    with begin(bind) as conn:
        return _publish(conn, configs, {"author": author, "status": "active", "body": body, "note": note,
                                        "projection": None if projection is None else dict(projection)},
                        supersede=True)


def activate_version(bind: Bind, version: int, *, author: str, note: str = "") -> int:
    """Make a stored config active again (a rollback) as a new version with the same text."""
    old = config_version(bind, version)
    return activate_config(bind, old.body, author=author, note=note or f"rollback to version {version}",
                           projection=old.projection)


def config_history(bind: Bind, limit: int = 50) -> list[ConfigRecord]:
    """The newest ``limit`` configs, newest first."""
    with reading(bind) as conn:
        rows = conn.execute(sa.select(configs).order_by(configs.c.version.desc()).limit(limit)).all()
    return [_config_record(r) for r in rows]


# --------------------------------------------------------------------------------------------- plans


def _plan_record(row: Row[Any]) -> PlanRecord:
    m = row._mapping
    return PlanRecord(version=int(m["version"]), config_version=m["config_version"], status=str(m["status"]),
                      prices={str(k): float(v) for k, v in (m["prices"] or {}).items()},
                      projected=m["projected"], solver=m["solver"], created_at=m["created_at"])


def publish_plan(bind: Bind, config_version: int | None, prices: Mapping[str, float], *,
                 projected: Mapping[str, Any] | None = None, solver: Mapping[str, Any] | None = None,
                 status: str = "active") -> int:
    """Store a plan (constraint name -> price) for ``config_version`` and return its version.

    An active plan supersedes the active one, unless it was made for a config that is no longer the
    active one: then it is stored as ``superseded`` and the active plan stays (a pacer that finished a
    step for the old config after a config change would otherwise leave the new config without a plan,
    its constraints unpriced until the next re-plan). The check is part of the same statements as the
    write, so a config applied meanwhile is seen.
    """
    _check_status(status, PLAN_STATUSES)
    values: dict[str, Any] = {"config_version": config_version, "status": status,
                              "prices": {str(k): float(v) for k, v in prices.items()},
                              "projected": None if projected is None else dict(projected),
                              "solver": None if solver is None else dict(solver)}
    fresh = None
    if config_version is not None:
        current = sa.select(configs.c.version).where(configs.c.status == "active").scalar_subquery()
        fresh = sa.or_(current.is_(None), current == config_version)
    with begin(bind) as conn:
        return _publish(conn, plans, values, supersede=status == "active", only_if=fresh)


def latest_plan(bind: Bind, config_version: int | None = None) -> PlanRecord | None:
    """The active plan; with ``config_version``, only if it was made for that config."""
    with reading(bind) as conn:
        row = conn.execute(sa.select(plans).where(plans.c.status == "active")
                           .order_by(plans.c.version.desc()).limit(1)).first()
    if row is None:
        return None
    rec = _plan_record(row)
    if config_version is not None and rec.config_version != config_version:
        return None
    return rec


def prices(bind: Bind, config: ConfigRecord) -> tuple[np.ndarray, PlanRecord | None]:
    """Shape (K,) prices in force for ``config`` (zeros without a plan for it), and that plan."""
    plan = latest_plan(bind, config.version)
    if plan is None:
        return np.zeros(len(config.config.constraints)), None
    return plan.price_vector(config.config), plan


def plan_history(bind: Bind, limit: int = 50) -> list[PlanRecord]:
    """The newest ``limit`` plans, newest first."""
    with reading(bind) as conn:
        rows = conn.execute(sa.select(plans).order_by(plans.c.version.desc()).limit(limit)).all()
    return [_plan_record(r) for r in rows]


# -------------------------------------------------------------------------------------------- models


def publish_model(bind: Bind, name: str, metrics: Mapping[str, Any] | None, artifact: bytes | None,
                  status: str = "published") -> int:
    """Store a model as the next version for ``name`` (1, 2, ...) and return that version.

    The version is computed and inserted in one statement (``INSERT ... SELECT max(version) + 1``)
    under the registry's lock; on SQLite a rare collision on the unique (name, version) is retried.
    With a Connection there is a single attempt (the caller owns the transaction).
    """
    _check_status(status, MODEL_STATUSES)
    if not name:
        raise InvalidInput(f"name must be a non-empty string; got {name!r}", field="name")
    next_version = (sa.select(sa.func.coalesce(sa.func.max(models.c.version), 0) + 1)
                    .where(models.c.name == name).scalar_subquery())
    values = {"name": name, "status": status, "metrics": None if metrics is None else dict(metrics),
              "artifact": artifact}
    if isinstance(bind, Connection):
        return _publish(bind, models, values, supersede=False, version=next_version)
    for attempt in range(_RETRIES):
        try:
            with bind.begin() as conn:
                return _publish(conn, models, values, supersede=False, version=next_version)
        except sa.exc.IntegrityError:
            if attempt == _RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _model_record(row: Row[Any], with_artifact: bool = True) -> ModelRecord:
    m = row._mapping
    art = m.get("artifact") if with_artifact else None
    return ModelRecord(name=str(m["name"]), version=int(m["version"]), status=str(m["status"]),
                       metrics=dict(m["metrics"] or {}), artifact=None if art is None else bytes(art),
                       created_at=m["created_at"])


def model(bind: Bind, name: str, version: int | None = None) -> ModelRecord | None:
    """Published model ``name`` at ``version`` (default: the newest), or None."""
    q = sa.select(models).where(models.c.name == name, models.c.status == "published")
    q = q.where(models.c.version == version) if version is not None else q.order_by(models.c.version.desc()).limit(1)
    with reading(bind) as conn:
        row = conn.execute(q).first()
    return None if row is None else _model_record(row)


def model_history(bind: Bind, name: str | None = None, limit: int = 50) -> list[ModelRecord]:
    """The newest ``limit`` model versions (published and rejected, without artifacts), newest first."""
    cols = [c for c in models.c if c.name != "artifact"]
    q = sa.select(*cols).order_by(models.c.id.desc()).limit(limit)
    if name is not None:
        q = q.where(models.c.name == name)
    with reading(bind) as conn:
        rows = conn.execute(q).all()
    return [_model_record(r, with_artifact=False) for r in rows]


def latest_versions(bind: Bind) -> Versions:
    """One round trip reading only version numbers; compare with the previous answer to reload."""
    q = sa.union_all(
        sa.select(sa.literal("config").label("kind"), sa.null().label("name"), sa.func.max(configs.c.version))
        .where(configs.c.status == "active"),
        sa.select(sa.literal("plan"), sa.null(), sa.func.max(plans.c.version)).where(plans.c.status == "active"),
        sa.select(sa.literal("model"), models.c.name, sa.func.max(models.c.version))
        .where(models.c.status == "published").group_by(models.c.name),
    )
    found: dict[str, int | None] = {"config": None, "plan": None}
    named: dict[str, int] = {}
    with reading(bind) as conn:
        for kind, name, version in conn.execute(q):
            if kind == "model":
                named[str(name)] = int(version)
            else:
                found[str(kind)] = None if version is None else int(version)
    return Versions(config=found["config"], plan=found["plan"], models=named)

