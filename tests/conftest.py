"""Shared fixtures.

``database_url``: an empty database, once per backend:

* ``sqlite``: a file in ``tmp_path``;
* ``postgres``: a fresh schema (``test_<random>``) in the database named by env
  ``HOMEPAGE_TEST_POSTGRES_URL``, selected through the URL's ``options=-csearch_path=...`` so every
  engine built from the URL sees only that schema; the schema is dropped after the test. Skipped
  (reason mentions postgres) only when the variable is unset; CI sets it and fails on such skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "HOMEPAGE_TEST_POSTGRES_URL"

#: the seeds of seeded tests: 42 by default; ``SEEDS=all pytest -k name`` runs 0..99
SEEDS = range(100) if os.environ.get("SEEDS") == "all" else [42]


@pytest.fixture(params=SEEDS)
def seed(request: pytest.FixtureRequest) -> int:
    """The one seed fixture every seeded test uses (house style: each test passes for seeds 0..99)."""
    return int(request.param)


def _postgres_admin_url() -> sa.URL | None:
    raw = os.environ.get(POSTGRES_ENV)
    if not raw:
        return None
    url = sa.make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


@pytest.fixture(scope="session")
def _postgres_admin() -> Iterator[sa.Engine]:
    url = _postgres_admin_url()
    if url is None:
        pytest.skip(f"postgres tests need {POSTGRES_ENV} (unset)")
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    yield engine
    engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """URL of an empty database (no tables); see the module docstring."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'log.sqlite'}"
        return
    admin: sa.Engine = request.getfixturevalue("_postgres_admin")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    base = _postgres_admin_url()
    assert base is not None
    options = base.query.get("options")
    search = f"-csearch_path={schema}"
    url = base.update_query_dict({"options": f"{options} {search}" if options else search})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            # other sessions of this test (e.g. a writer's pool) must not block the drop for long
            conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
