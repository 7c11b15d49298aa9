"""Alembic environment for the homepage decision log.

Works three ways:

* programmatically, from :func:`policy_api.log.upgrade` / ``downgrade``: the caller puts an open
  ``Connection`` (and the target ``MetaData``) in ``config.attributes``;
* from the ``alembic`` CLI with an ini file whose ``script_location`` is this folder; the URL comes
  from ``-x url=...``, else env ``DATABASE_URL``, else ``sqlalchemy.url`` in the ini;
* offline (``alembic upgrade head --sql``), emitting SQL for the URL's dialect.

SQLite runs in batch mode (``render_as_batch``) so later revisions can ALTER its tables.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection


def _target_metadata() -> Any:
    metadata = context.config.attributes.get("target_metadata")
    if metadata is None:
        # imported lazily: the CLI only needs it for autogenerate / `alembic check`
        from policy_api.log import metadata
    return metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("DATABASE_URL")
    url = url or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise ValueError(
            "database url must be given: alembic -x url=..., env DATABASE_URL or sqlalchemy.url; got none"
        )
    return str(url)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=_target_metadata(),
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    from policy_api.log import normalize_url

    url = normalize_url(_url())
    context.configure(
        url=url,
        target_metadata=_target_metadata(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    from policy_api.log import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
