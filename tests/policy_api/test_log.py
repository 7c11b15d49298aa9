"""SQL decision log: migrations, store helpers, LogWriter (batching, outage spill + replay, queue-full,
refused rows, cross-writer replay locking), model registry under concurrency, Parquet export.

Every test runs on SQLite and on PostgreSQL through the ``database_url`` fixture (conftest.py); the
reference for each check is computed independently of the code under test (the submitted rows, a
``SELECT COUNT``, a Python loop over plain rows).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from policy_api.log import (
    DECISION_COLUMNS,
    EXPORT_COLUMNS,
    SQLITE_BATCHES_PER_TRANSACTION,
    Journal,
    JournalUnavailable,
    LogWriter,
    decisions,
    decode_spill_line,
    downgrade,
    encode_spill_line,
    existing_event_ids,
    export_parquet,
    feedback,
    insert_decisions,
    insert_feedback,
    insert_stored,
    items,
    load_items,
    make_engine,
    metadata,
    normalize_url,
    read_decisions,
    read_feedback,
    read_parquet,
    stored_timestamps,
    upgrade,
    upsert_items,
)

LOG_TABLES = {"decisions", "feedback", "items", "configs", "plans", "models", "user_state", "item_stats", "loop_lease",
              "config_jobs"}
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(database_url):
    eng = make_engine(database_url)
    upgrade(eng)
    yield eng
    eng.dispose()


def count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def decision_row(i: int, rng: np.random.Generator, n_cand: int = 16, module_ids=None) -> dict:
    pmf = rng.dirichlet(np.ones(n_cand))
    chosen = int(rng.integers(n_cand))
    pool = module_ids if module_ids is not None else list(range(12))
    candidates = [
        {
            "modules": [pool[k] for k in rng.permutation(len(pool))[:5].tolist()],
            "tilt": float(rng.choice([0.0, 0.5, 1.0])),
            "value": float(rng.gamma(2.0)),
            "exposure": rng.random(6).round(6).tolist(),
            "score": float(rng.normal()),
            "engagement": rng.random(5).tolist(),  # the engine logs more than the export keeps
        }
        for _ in range(n_cand)
    ]
    return {
        "request_id": f"req-{i:06d}",
        "ts": T0 + timedelta(seconds=int(rng.integers(0, 3600)), microseconds=i),
        "user_id": f"u{int(rng.integers(40)):03d}",
        "context": {"country": "SE", "hour": int(rng.integers(24))},
        "versions": {"config": 1, "plan": 2, "ranker": None},
        "policy": "budgeted-vw",
        "candidates": candidates,
        "pmf": pmf,  # numpy: the engine hands arrays over
        "chosen": chosen,
        "propensity": float(pmf[chosen]),
        "layout": [{"module": c, "items": [f"i{k}" for k in range(3)]} for c in candidates[chosen]["modules"]],
        "fallback_reason": None if i % 7 else "ranker_timeout",
    }


def feedback_row(j: int, request_id: str, rng: np.random.Generator) -> dict:
    return {
        "event_id": f"ev-{j:06d}",
        "request_id": request_id,
        "slot": None if j % 5 == 0 else int(rng.integers(5)),
        "item_id": None if j % 11 == 0 else f"i{int(rng.integers(100))}",
        "type": str(rng.choice(["impression", "play", "full_play", "skip"])),
        "value": None if j % 3 == 0 else float(rng.normal()),
        "ts": T0 + timedelta(seconds=int(rng.integers(0, 4000))),
        "received_at": T0 + timedelta(seconds=4000 + j),
    }


def to_us(dt: datetime) -> np.datetime64:
    return np.datetime64(dt.astimezone(UTC).replace(tzinfo=None), "us")


def spill_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.jsonl") if not p.name.startswith("rejected-"))


# ------------------------------------------------------------------------------------------- engine


def test_make_engine_settings(database_url, monkeypatch):
    eng = make_engine(database_url)
    try:
        with eng.connect() as conn:
            if eng.dialect.name == "sqlite":
                assert Path(eng.url.database).parent.is_dir()  # parent folder created
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            else:
                assert eng.dialect.driver == "psycopg" and eng.pool._pre_ping
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
                params = conn.connection.dbapi_connection.info.get_parameters()
                assert params["connect_timeout"] == "2"
    finally:
        eng.dispose()
    if eng.dialect.name != "postgresql":
        return
    monkeypatch.setenv("HOMEPAGE_DB_STATEMENT_TIMEOUT", "0.3")
    monkeypatch.setenv("HOMEPAGE_DB_CONNECT_TIMEOUT", "3")
    fast = make_engine(database_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        assert fast.dialect.driver == "psycopg"
        with fast.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "300ms"
            assert conn.connection.dbapi_connection.info.get_parameters()["connect_timeout"] == "3"
            start = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                conn.exec_driver_sql("SELECT pg_sleep(5)")
            assert time.monotonic() - start < 3.0  # a stuck statement is cut off, not waited for
    finally:
        fast.dispose()


def test_make_engine_rejects_bad_input(monkeypatch):
    with pytest.raises(ValueError, match=r"url must be sqlite"):
        make_engine("mysql://u:secret@h/db")
    with pytest.raises(ValueError, match=r"url must be sqlite") as err:
        normalize_url("postgresql+psycopg2://u:secret@h/db")
    assert "secret" not in str(err.value)
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    monkeypatch.setenv("HOMEPAGE_DB_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"HOMEPAGE_DB_CONNECT_TIMEOUT must be a positive number"):
        make_engine("postgresql://u@127.0.0.1:1/db")
    monkeypatch.delenv("HOMEPAGE_DB_CONNECT_TIMEOUT")
    with pytest.raises(ValueError, match=r"statement_timeout_s must be > 0; got -1"):
        make_engine("postgresql://u@127.0.0.1:1/db", statement_timeout_s=-1)


# --------------------------------------------------------------------------------------- migrations


def _old_decisions_table() -> sa.Table:
    """``decisions`` as revision 0004 made it: every JSON column jsonb on PostgreSQL."""
    from sqlalchemy.dialects import postgresql

    jsonb = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
    return sa.Table("decisions", sa.MetaData(), *[
        sa.Column(c.name, jsonb if isinstance(c.type, sa.JSON) else c.type, primary_key=c.primary_key)
        for c in decisions.columns])


def test_migration_0005_keeps_the_rows_written_before_it(database_url, tmp_path):
    """A log at revision 0004 (candidates as one object per candidate; jsonb on PostgreSQL) upgrades
    to 0005 (json): its rows read and export exactly as before; columnar rows survive a downgrade."""
    upgrade(database_url, "0004")
    eng = make_engine(database_url)
    try:
        rng = np.random.default_rng(21)
        rows = [decision_row(i, rng, n_cand=int(rng.integers(1, 17))) for i in range(60)]
        with eng.begin() as conn:  # the old writer: the list itself, through the table's JSON type
            conn.execute(sa.insert(_old_decisions_table()), [{c: r[c] for c in DECISION_COLUMNS} for r in rows])
        before = read_decisions(eng)
        export_parquet(eng, tmp_path / "before.parquet")
        upgrade(eng, "0005")
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
            types = {c["name"]: type(c["type"]).__name__ for c in sa.inspect(conn).get_columns("decisions")}
            text = conn.execute(sa.select(sa.cast(decisions.c.candidates, sa.Text()))).scalars().all()
        if eng.dialect.name == "postgresql":
            assert (types["candidates"], types["pmf"], types["layout"]) == ("JSON", "JSON", "JSONB")
        assert all(t.startswith("[") for t in text)  # converted in place, not rewritten columnar
        after = read_decisions(eng)
        assert list(after) == list(before)
        for name in DECISION_COLUMNS:
            assert repr(list(after[name])) == repr(list(before[name])), name
        by_id = dict(zip(after["request_id"], after["candidates"], strict=True))
        assert [by_id[r["request_id"]] for r in rows] == [r["candidates"] for r in rows]
        export_parquet(eng, tmp_path / "after.parquet")
        assert pq.read_table(tmp_path / "after.parquet").equals(pq.read_table(tmp_path / "before.parquet"))
        # new rows are columnar; down to 0004 (jsonb again) every row still reads
        more = [decision_row(100 + i, rng) for i in range(20)]
        insert_decisions(eng, more)
        downgrade(eng, "0004")
        got = read_decisions(eng)
        by_id = dict(zip(got["request_id"], got["candidates"], strict=True))
        assert [by_id[r["request_id"]] for r in rows + more] == [r["candidates"] for r in rows + more]
        upgrade(eng)
    finally:
        eng.dispose()


def _big_layout(row: dict, n_items: int = 40) -> dict:
    """``row`` with a layout the size the engine logs (5 modules of 8 items, ~2 KB: over PostgreSQL's
    TOAST threshold, so the server compresses it)."""
    mods = row["candidates"][row["chosen"]]["modules"]
    items = [{"item_id": f"i{k:05d}", "long_tail": k % 3 == 0} for k in range(n_items)]
    per = n_items // len(mods)
    layout = [{"slot": s, "module_id": m, "category": "songs", "tilt": 0.5, "items": items[s * per:(s + 1) * per]}
              for s, m in enumerate(mods)]
    return {**row, "layout": layout}


def test_migration_0006_layout_json_and_lz4(database_url, tmp_path):
    """Revision 0006: on PostgreSQL ``decisions.layout`` becomes ``json`` and the bulky columns are
    compressed with lz4 (the server's own record of each stored value's compression says so); rows
    written at 0005 read and export exactly as before, and a downgrade to 0005 keeps every row."""
    upgrade(database_url, "0005")
    eng = make_engine(database_url)
    try:
        rng = np.random.default_rng(6)
        old = [_big_layout(decision_row(i, rng)) for i in range(40)]
        insert_decisions(eng, old)
        before = read_decisions(eng)
        export_parquet(eng, tmp_path / "before.parquet")
        upgrade(eng)
        new = [_big_layout(decision_row(100 + i, rng)) for i in range(40)]
        insert_decisions(eng, new)
        got = read_decisions(eng)
        by_id = {r: i for i, r in enumerate(got["request_id"])}
        for name in DECISION_COLUMNS:  # the rows stored before read as they did
            assert repr([got[name][by_id[r]] for r in before["request_id"]]) == repr(list(before[name])), name
        assert [got["layout"][by_id[r["request_id"]]] for r in new] == [r["layout"] for r in new]
        export_parquet(eng, tmp_path / "after.parquet")
        rows_before = pq.read_table(tmp_path / "before.parquet").to_pylist()
        rows_after = {r["request_id"]: r for r in pq.read_table(tmp_path / "after.parquet").to_pylist()}
        assert [rows_after[r["request_id"]] for r in rows_before] == rows_before
        if eng.dialect.name == "postgresql":
            with eng.connect() as conn:
                types = {c["name"]: type(c["type"]).__name__ for c in sa.inspect(conn).get_columns("decisions")}
                lz4 = "lz4" in conn.execute(sa.text(
                    "SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")).scalar_one()
                stored = dict(conn.execute(sa.text(
                    "SELECT request_id, pg_column_compression(layout) FROM decisions")).all())
            assert (types["candidates"], types["pmf"], types["layout"], types["context"]) == (
                "JSON", "JSON", "JSON", "JSONB")
            assert {stored[r["request_id"]] for r in old} == {"pglz"}  # compressed before, as they were
            assert {stored[r["request_id"]] for r in new} == ({"lz4"} if lz4 else {"pglz"})
        downgrade(eng, "0005")
        back = read_decisions(eng)
        by_id = dict(zip(back["request_id"], back["layout"], strict=True))
        assert [by_id[r["request_id"]] for r in old + new] == [r["layout"] for r in old + new]
        upgrade(eng)
    finally:
        eng.dispose()


def test_migrations_upgrade_check_downgrade(database_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # script_location comes from the installed package, not the cwd
    upgrade(database_url)
    eng = make_engine(database_url)
    try:
        with eng.connect() as conn:
            insp = sa.inspect(conn)
            assert set(insp.get_table_names()) == LOG_TABLES | {"alembic_version"}
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0009"
            mc = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(mc, metadata) == []  # `alembic check`
            # the comparison is not vacuous: a column the DB lacks is reported
            extra = sa.MetaData()
            for table in metadata.tables.values():
                table.to_metadata(extra)
            extra.tables["feedback"].append_column(sa.Column("extra", sa.Integer()))
            diff = compare_metadata(mc, extra)
            assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "feedback", "extra")]
            # every constraint carries the naming-convention name
            assert {u["name"] for u in insp.get_unique_constraints("feedback")} == {"uq_feedback_event_id"}
            assert {u["name"] for u in insp.get_unique_constraints("models")} == {"uq_models_name_version"}
            assert {i["name"] for i in insp.get_indexes("decisions")} == {"ix_decisions_ts", "ix_decisions_user_id",
                                                                          "ix_decisions_policy_ts"}
            assert {u["name"] for u in insp.get_unique_constraints("config_jobs")} == {"uq_config_jobs_apply_slot"}
            assert {c["name"] for c in insp.get_check_constraints("config_jobs")} == {
                "ck_config_jobs_status", "ck_config_jobs_kind"}
            assert insp.get_foreign_keys("feedback") == []
            if eng.dialect.name == "postgresql":
                assert insp.get_pk_constraint("decisions")["name"] == "pk_decisions"
                for name in ("user_state", "item_stats", "loop_lease", "config_jobs"):
                    assert insp.get_pk_constraint(name)["name"] == f"pk_{name}"
                cols = {c["name"]: c["type"] for c in insp.get_columns("decisions")}
                assert type(cols["candidates"]).__name__ == "JSON"  # stored as sent (0005)
                assert type(cols["context"]).__name__ == "JSONB"
                assert getattr(cols["ts"], "timezone", False) is True
        downgrade(database_url, "base")
        with eng.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) & LOG_TABLES == set()
        upgrade(eng)  # and back up again from base
        with eng.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= LOG_TABLES
    finally:
        eng.dispose()


def test_alembic_cli_upgrade_check_downgrade(database_url, tmp_path):
    from alembic.config import main as alembic_main

    from policy_api.log import migrations_dir

    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {migrations_dir()}\n")
    alembic_main(["-c", str(ini), "-x", f"url={database_url}", "upgrade", "head"])
    # `alembic check` raises AutogenerateDiffsDetected on any difference (the metadata is imported
    # by env.py itself here, as from the shell)
    alembic_main(["-c", str(ini), "-x", f"url={database_url}", "check"])
    eng = make_engine(database_url)
    try:
        with eng.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= LOG_TABLES
        alembic_main(["-c", str(ini), "-x", f"url={database_url}", "downgrade", "base"])
        with eng.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) & LOG_TABLES == set()
    finally:
        eng.dispose()


# -------------------------------------------------------------------------------------------- store


def test_decisions_and_feedback_round_trip(engine):
    rng = np.random.default_rng(1)
    rows = [decision_row(i, rng) for i in range(60)]
    fb = [feedback_row(j, rows[int(rng.integers(60))]["request_id"], rng) for j in range(150)]
    assert insert_decisions(engine, rows) == 60
    assert insert_feedback(engine, fb) == 150

    since, until = T0 + timedelta(minutes=10), T0 + timedelta(minutes=40)
    got = read_decisions(engine, since=since, until=until, chunk_size=7)
    ref = sorted((r for r in rows if since <= r["ts"] < until), key=lambda r: (r["ts"], r["request_id"]))
    assert len(ref) > 10 and list(got["request_id"]) == [r["request_id"] for r in ref]
    np.testing.assert_array_equal(got["ts"], [to_us(r["ts"]) for r in ref])
    np.testing.assert_array_equal(got["chosen"], [r["chosen"] for r in ref])
    np.testing.assert_array_equal(got["propensity"], [r["propensity"] for r in ref])
    assert got["chosen"].dtype == np.int64 and got["propensity"].dtype == np.float64
    for key in ("user_id", "policy", "fallback_reason"):
        assert list(got[key]) == [r[key] for r in ref]
    for key in ("context", "versions", "candidates", "layout"):
        assert got[key] == [r[key] for r in ref]
    assert got["pmf"] == [r["pmf"].tolist() for r in ref]

    only = read_decisions(engine, columns=["request_id", "propensity"])
    assert list(only) == ["request_id", "propensity"] and len(only["request_id"]) == 60

    wanted = {rows[3]["request_id"], rows[9]["request_id"]}
    f = read_feedback(engine, request_ids=sorted(wanted) + ["never-issued"])
    ref_fb = [r for r in fb if r["request_id"] in wanted]  # arrival order = insertion order
    assert list(f["event_id"]) == [r["event_id"] for r in ref_fb]
    np.testing.assert_array_equal(f["slot"], [-1 if r["slot"] is None else r["slot"] for r in ref_fb])
    np.testing.assert_array_equal(f["value"], [np.nan if r["value"] is None else r["value"] for r in ref_fb])
    np.testing.assert_array_equal(f["ts"], [to_us(r["ts"]) for r in ref_fb])
    np.testing.assert_array_equal(f["received_at"], [to_us(r["received_at"]) for r in ref_fb])
    assert list(f["item_id"]) == [r["item_id"] for r in ref_fb]

    fs = read_feedback(engine, since=T0 + timedelta(seconds=1000), until=T0 + timedelta(seconds=2000))
    ref_fs = [r["event_id"] for r in fb if T0 + timedelta(seconds=1000) <= r["ts"] < T0 + timedelta(seconds=2000)]
    assert list(fs["event_id"]) == ref_fs

    with pytest.raises(ValueError, match=r"columns must be among decisions columns"):
        read_decisions(engine, columns=["request_id", "reward"])


def test_insert_stored_writes_what_insert_feedback_writes(engine):
    """Rows handed over as stored (``insert_stored``, timestamps by ``stored_timestamps``) read back as
    the dict rows ``insert_feedback`` takes; inside a caller's transaction they go with it (rolled
    back: nothing), ``progress`` counts each batch, and SQLite's page cache is the connection's own
    again after."""
    rng = np.random.default_rng(7)
    rows = [feedback_row(j, f"req-{j % 9}", rng) for j in range(50)]
    rows[1]["ts"] = T0 + timedelta(seconds=0.25)  # a fraction of a second
    dialect = engine.dialect.name

    def stamp(dt):
        return stored_timestamps(np.array([dt.timestamp()]), dialect)[0]

    tuples = [(r["event_id"], r["request_id"], r["slot"], r["item_id"], r["type"], r["value"], stamp(r["ts"]),
               stamp(r["received_at"])) for r in rows]
    cache = None
    if dialect == "sqlite":
        with engine.connect() as conn:
            cache = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    with engine.connect() as conn:
        tx = conn.begin()
        insert_stored(conn, "feedback", tuples, batch=7)
        tx.rollback()
    assert count(engine, "feedback") == 0
    sent: list[int] = []
    assert insert_stored(engine, "feedback", tuples, batch=7, progress=sent.append) == 50
    assert sent == [7] * 7 + [1]
    got = read_feedback(engine)
    assert list(got["event_id"]) == [r["event_id"] for r in rows]
    np.testing.assert_array_equal(got["ts"], [to_us(r["ts"]) for r in rows])
    np.testing.assert_array_equal(got["received_at"], [to_us(r["received_at"]) for r in rows])
    np.testing.assert_array_equal(got["value"], [np.nan if r["value"] is None else r["value"] for r in rows])
    np.testing.assert_array_equal(got["slot"], [-1 if r["slot"] is None else r["slot"] for r in rows])
    assert list(got["item_id"]) == [r["item_id"] for r in rows] and list(got["type"]) == [r["type"] for r in rows]
    assert insert_stored(engine, "feedback", tuples) == 50 and count(engine, "feedback") == 50  # idempotent
    if cache is not None:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == cache
    with pytest.raises(ValueError, match=r"table must be one of \['decisions', 'feedback'\]; got 'items'"):
        insert_stored(engine, "items", tuples)


def test_timestamps_are_utc_aware(engine):
    rng = np.random.default_rng(2)
    row = decision_row(0, rng)
    row["ts"] = datetime(2024, 5, 1, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    insert_decisions(engine, [row])
    with engine.connect() as conn:
        ts = conn.execute(sa.select(decisions.c.ts)).scalar_one()
    assert ts.utcoffset() == timedelta(0) and ts == datetime(2024, 5, 1, 12, 30, 5, 123456, tzinfo=UTC)
    naive = decision_row(1, rng)
    naive["ts"] = datetime(2024, 5, 1, 12, 0)
    with pytest.raises(ValueError, match=r"decisions.ts must be a timezone-aware datetime; got datetime"):
        insert_decisions(engine, [naive])
    assert count(engine, "decisions") == 1


def test_feedback_idempotent_by_event_id(engine):
    rng = np.random.default_rng(3)
    first = feedback_row(1, "req-1", rng)
    twin = {**first, "value": 99.0, "type": "share"}  # same event id, different payload
    insert_feedback(engine, [first, twin])
    insert_feedback(engine, [twin])
    assert count(engine, "feedback") == 1
    got = read_feedback(engine)
    assert list(got["type"]) == [first["type"]]  # the first write wins
    many = [feedback_row(j, "req-2", rng) for j in range(2, 1902)]
    insert_feedback(engine, many[::2])
    asked = [r["event_id"] for r in many] + ["ev-000001", "nope"]
    assert existing_event_ids(engine, asked) == {r["event_id"] for r in many[::2]} | {"ev-000001"}


def test_decision_reinsert_is_idempotent(engine):
    rng = np.random.default_rng(4)
    rows = [decision_row(i, rng) for i in range(10)]
    insert_decisions(engine, rows)
    insert_decisions(engine, [{**r, "chosen": 0, "policy": "replayed"} for r in rows] + rows[:3])
    assert count(engine, "decisions") == 10
    got = read_decisions(engine, columns=["request_id", "policy", "chosen"])
    ref = sorted(rows, key=lambda r: (r["ts"], r["request_id"]))
    assert list(got["policy"]) == ["budgeted-vw"] * 10
    np.testing.assert_array_equal(got["chosen"], [r["chosen"] for r in ref])
    # batches large enough for COPY on PostgreSQL: new rows go straight in; a batch holding rows
    # already stored falls back to the duplicate-skipping insert, and nothing of it is lost
    more = [decision_row(i, rng) for i in range(10, 50)]
    insert_decisions(engine, more[:20])
    insert_decisions(engine, [{**r, "policy": "replayed"} for r in rows + more[:20]] + more[20:])
    assert count(engine, "decisions") == 50
    got = read_decisions(engine, columns=["request_id", "policy", "candidates"])
    assert "replayed" not in list(got["policy"])  # the first write wins
    by_id = dict(zip(got["request_id"], got["candidates"], strict=True))
    assert [by_id[r["request_id"]] for r in rows + more] == [r["candidates"] for r in rows + more]


def test_items_upsert_and_load(engine):
    upsert_items(engine, [
        {"item_id": "i2", "category": "songs", "popularity": 3.0, "features": np.array([1.0, 2.0])},
        {"item_id": "i1", "category": "videos", "popularity": 5.0, "features": [0.5, 0.25]},
    ])  # fmt: skip
    upsert_items(engine, [{"item_id": "i2", "category": "live", "popularity": 7.5, "features": [9.0, 8.0]}])
    cat = load_items(engine)
    assert list(cat["item_ids"]) == ["i1", "i2"] and list(cat["category"]) == ["videos", "live"]
    np.testing.assert_array_equal(cat["popularity"], [5.0, 7.5])
    np.testing.assert_array_equal(cat["features"], [[0.5, 0.25], [9.0, 8.0]])
    assert count(engine, "items") == 2
    upsert_items(engine, [{"item_id": "i3", "category": "live", "popularity": 1.0, "features": [1.0]}])
    with pytest.raises(ValueError, match=r"items.features must have one length for every item; got lengths \[1, 2\]"):
        load_items(engine)


def test_an_items_added_at_is_set_once_and_kept_by_a_reload(engine):
    """``added_at`` is when the item first entered the catalog: a later load of the same item (a new
    popularity, a new ``updated_at``) keeps it, a new item gets its load's time."""
    first = datetime(2026, 1, 1, 12, tzinfo=UTC)
    second = datetime(2026, 1, 2, 12, tzinfo=UTC)
    upsert_items(engine, [{"item_id": "a", "category": "songs", "popularity": 1.0, "updated_at": first}])
    upsert_items(engine, [{"item_id": "a", "category": "songs", "popularity": 9.0, "updated_at": second},
                          {"item_id": "b", "category": "songs", "popularity": 2.0, "updated_at": second}])
    cat = load_items(engine)
    assert list(cat["item_ids"]) == ["a", "b"]
    assert cat["updated_at"].tolist() == [to_us(second), to_us(second)]
    assert cat["added_at"].tolist() == [to_us(first), to_us(second)]


def test_migration_0007_leaves_the_items_before_it_without_an_added_at(database_url):
    """Items loaded before revision 0007 read ``added_at`` NaT (nothing tells when they came, so no
    item is taken for new); items loaded after it get theirs; a downgrade drops the column and keeps
    every item."""
    upgrade(database_url, "0006")
    eng = make_engine(database_url)
    try:
        t0 = datetime(2026, 3, 1, tzinfo=UTC)
        before = sa.Table("items", sa.MetaData(), *(c._copy() for c in items.columns if c.name != "added_at"))
        with eng.begin() as conn:  # the catalog as revision 0006 wrote it
            conn.execute(sa.insert(before), [{"item_id": "old", "category": "songs", "popularity": 1.0,
                                              "features": [], "updated_at": t0}])
        upgrade(eng)
        upsert_items(eng, [{"item_id": "new", "category": "songs", "popularity": 2.0, "features": [], "updated_at": t0}])
        cat = load_items(eng)
        assert list(cat["item_ids"]) == ["new", "old"]
        assert np.isnat(cat["added_at"][1]) and cat["added_at"][0] == to_us(t0)
        downgrade(eng, "0006")
        with eng.connect() as conn:
            assert "added_at" not in {c["name"] for c in sa.inspect(conn).get_columns("items")}
            assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar_one() == 2
        upgrade(eng)
    finally:
        eng.dispose()


# ---------------------------------------------------------------------------------------- LogWriter


def test_spill_line_round_trip():
    row = {"ts": datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "pmf": np.array([0.25, 0.75]),
           "chosen": np.int64(1), "blob": b"\x00\xff", "nested": {"a": [1, None]}}  # fmt: skip
    table, rows = decode_spill_line(encode_spill_line("decisions", [row]))
    assert table == "decisions"
    assert rows == [{"ts": row["ts"], "pmf": [0.25, 0.75], "chosen": 1, "blob": b"\x00\xff", "nested": {"a": [1, None]}}]
    assert rows[0]["ts"].tzinfo is not None
    with pytest.raises(ValueError, match=r"spill line must be"):
        decode_spill_line(b'{"table": "users", "rows": []}\n')


def test_logwriter_writes_every_row_in_batches(engine, tmp_path):
    rng = np.random.default_rng(5)
    n_dec, n_fb, batch = 1203, 300, 250
    rows = [decision_row(i, rng) for i in range(n_dec)]
    fb = [feedback_row(j, rows[j]["request_id"], rng) for j in range(n_fb)]
    inserts: list[tuple[str, bool, int]] = []
    commits: list[int] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def on_execute(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT"):
            n = len(parameters) if executemany else 1
            inserts.append((statement.split()[2].strip('"'), executemany, n))

    @sa.event.listens_for(engine, "commit")
    def on_commit(conn):
        commits.append(1)

    writer = LogWriter(engine, tmp_path / "spill", batch_size=batch, start=False)
    for r in rows:
        writer.submit_decision(r)
    writer.submit_feedback(fb)
    assert writer.stats()["queue_depth"] == n_dec + n_fb
    writer.start()
    assert writer.flush(timeout=30)
    stats = writer.stats()
    writer.close()
    assert count(engine, "decisions") == n_dec and count(engine, "feedback") == n_fb
    assert stats["submitted"] == stats["written"] == n_dec + n_fb
    assert (stats["spilled"], stats["rejected"], stats["queue_depth"], stats["healthy"]) == (0, 0, 0, True)
    # one transaction per batch; on SQLite a backlog takes several batches per transaction
    per_tx = SQLITE_BATCHES_PER_TRANSACTION if engine.dialect.name == "sqlite" else 1
    n_tx = math.ceil((n_dec + n_fb) / (batch * per_tx))
    assert len(commits) == n_tx
    if engine.dialect.name == "postgresql":  # COPY + INSERT ... SELECT on the driver's connection,
        assert all(n < 16 for _, _, n in inserts)  # except for a table's few rows in a batch
        return
    assert sum(n for t, _, n in inserts if t == "decisions") == n_dec
    assert sum(n for t, _, n in inserts if t == "feedback") == n_fb
    assert len(inserts) <= 2 * n_tx  # at most one executemany per table per transaction
    assert spill_files(tmp_path / "spill") == []


def test_writer_copy_path_stores_what_executemany_stores(engine, tmp_path):
    """On PostgreSQL the writer COPYs batches; the stored rows equal those of insert_decisions /
    insert_feedback (the executemany reference) field by field. On SQLite both are executemany."""
    rng = np.random.default_rng(14)
    rows = [decision_row(i, rng) for i in range(60)]
    fb = [feedback_row(j, rows[j]["request_id"], rng) for j in range(40)]
    twin = lambda r, key: {**r, key: "ref-" + r[key]}  # noqa: E731
    insert_decisions(engine, [twin(r, "request_id") for r in rows])
    insert_feedback(engine, [twin(r, "event_id") for r in fb])
    with LogWriter(engine, tmp_path / "spill", batch_size=100) as writer:
        for r in rows:
            writer.submit_decision(r)
        writer.submit_feedback(fb + fb[:5])  # repeats: kept once
        assert writer.flush(timeout=20)
    got = read_decisions(engine)
    by_id = {rid: k for k, rid in enumerate(got["request_id"])}
    for r in rows:
        a, b = by_id[r["request_id"]], by_id["ref-" + r["request_id"]]
        for col in got:
            if col != "request_id":
                assert repr(got[col][a]) == repr(got[col][b]), col
    got_fb = read_feedback(engine)
    assert len(got_fb["event_id"]) == 80
    by_ev = {e: k for k, e in enumerate(got_fb["event_id"])}
    for r in fb:
        a, b = by_ev[r["event_id"]], by_ev["ref-" + r["event_id"]]
        for col in got_fb:
            if col not in ("event_id", "id"):
                assert repr(got_fb[col][a]) == repr(got_fb[col][b]), col


def _bad_engine(database_url: str, tmp_path: Path) -> sa.Engine:
    if database_url.startswith("sqlite"):
        gone = tmp_path / "gone"
        eng = make_engine(f"sqlite:///{gone / 'log.sqlite'}")  # creates the folder ...
        shutil.rmtree(gone)  # ... which then disappears: every connect fails
        return eng
    return make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", connect_timeout_s=1)


def test_outage_spills_then_replays_exactly_once(database_url, engine, tmp_path):
    rng = np.random.default_rng(6)
    rows = [decision_row(i, rng) for i in range(600)]
    fb = [feedback_row(j, rows[j % 600]["request_id"], rng) for j in range(300)]
    replays = fb[:20]  # a client retrying: same event ids again
    spill = tmp_path / "spill"
    bad = _bad_engine(database_url, tmp_path)
    writer = LogWriter(bad, spill, batch_size=200, flush_interval_s=0.01)
    try:
        for r in rows:
            writer.submit_decision(r)
        writer.submit_feedback(fb)
        writer.submit_feedback(replays)
        assert writer.flush(timeout=20)
        stats = writer.stats()
        assert (stats["written"], stats["spilled"], stats["healthy"]) == (0, 920, False)
        assert stats["last_error"] and "OperationalError" in stats["last_error"]
        assert spill_files(spill) == [f"spill-{os.getpid()}.jsonl"]
        spilled: dict[str, list] = {"decisions": [], "feedback": []}
        for line in (spill / f"spill-{os.getpid()}.jsonl").read_bytes().splitlines():
            table, part = decode_spill_line(line)
            spilled[table].extend(part)
        assert [r["request_id"] for r in spilled["decisions"]] == [r["request_id"] for r in rows]
        assert [r["ts"] for r in spilled["decisions"]] == [r["ts"] for r in rows]  # datetimes restored
        assert [r["event_id"] for r in spilled["feedback"]] == [r["event_id"] for r in fb + replays]
        assert count(engine, "decisions") == 0

        insert_decisions(engine, rows[:100])  # some rows already made it earlier: no duplicates after
        writer.set_engine(engine)
        assert writer.flush(timeout=30, replay=True)
        stats = writer.stats()
    finally:
        writer.close()
        bad.dispose()
    assert count(engine, "decisions") == 600 and count(engine, "feedback") == 300
    assert (stats["replayed"], stats["healthy"], stats["rejected"]) == (920, True, 0)
    assert spill_files(spill) == []
    got = read_decisions(engine, columns=["request_id", "ts", "propensity"])
    ref = sorted(rows, key=lambda r: (r["ts"], r["request_id"]))
    assert list(got["request_id"]) == [r["request_id"] for r in ref]
    np.testing.assert_array_equal(got["ts"], [to_us(r["ts"]) for r in ref])
    np.testing.assert_array_equal(got["propensity"], [r["propensity"] for r in ref])


def test_sqlite_outage_recovers_when_the_database_comes_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'gone' / 'log.sqlite'}"
    eng = make_engine(url)
    shutil.rmtree(tmp_path / "gone")
    rng = np.random.default_rng(7)
    rows = [decision_row(i, rng) for i in range(250)]
    writer = LogWriter(eng, tmp_path / "spill", flush_interval_s=0.01, max_backoff_s=0.05)
    try:
        for r in rows:
            writer.submit_decision(r)
        assert writer.flush(timeout=10)
        assert writer.stats()["spilled"] == 250 and not writer.stats()["healthy"]
        upgrade(url)  # the database is back (same engine, nothing swapped)
        deadline = time.monotonic() + 20
        while writer.stats()["replayed"] < 250 and time.monotonic() < deadline:
            time.sleep(0.02)  # recovery is noticed by the writer's own probe, without new traffic
        stats = writer.stats()
    finally:
        writer.close()
    assert (stats["replayed"], stats["healthy"]) == (250, True)
    assert count(eng, "decisions") == 250
    assert spill_files(tmp_path / "spill") == []
    eng.dispose()


def test_queue_full_spills_instead_of_dropping(engine, tmp_path):
    rng = np.random.default_rng(8)
    rows = [decision_row(i, rng) for i in range(25)]
    spill = tmp_path / "spill"
    writer = LogWriter(engine, spill, max_queue=10, start=False)
    for r in rows:
        writer.submit_decision(r)
    stats = writer.stats()
    assert (stats["submitted"], stats["queue_depth"], stats["spilled"]) == (25, 10, 15)
    lines = (spill / f"spill-{os.getpid()}.jsonl").read_bytes().splitlines()
    assert [decode_spill_line(x)[1][0]["request_id"] for x in lines] == [r["request_id"] for r in rows[10:]]
    writer.start()
    assert writer.flush(timeout=20, replay=True)
    stats = writer.stats()
    writer.close()
    assert (stats["written"], stats["replayed"]) == (10, 15)
    assert count(engine, "decisions") == 25
    assert spill_files(spill) == []


def test_rows_the_database_refuses_are_kept_not_lost(engine, tmp_path):
    rng = np.random.default_rng(9)
    rows = [decision_row(i, rng) for i in range(40)]
    rows[7]["ts"] = datetime(2024, 5, 1, 12, 0)  # naive: zone unknown
    rows[23]["candidates"][0]["value"] = float("nan")  # not JSON: stored as null (orjson), not refused
    fb = [feedback_row(j, "req-000001", rng) for j in range(10)]
    del fb[4]["event_id"]  # no idempotency key
    spill = tmp_path / "spill"
    with LogWriter(engine, spill) as writer:
        for r in rows:
            writer.submit_decision(r)
        writer.submit_feedback(fb)
        assert writer.flush(timeout=20)
        stats = writer.stats()
    assert count(engine, "decisions") == 39 and count(engine, "feedback") == 9
    assert (stats["rejected"], stats["written"], stats["healthy"]) == (2, 48, True)
    nan_row = read_decisions(engine, columns=["request_id", "candidates"])
    k = list(nan_row["request_id"]).index(rows[23]["request_id"])
    assert nan_row["candidates"][k][0]["value"] is None
    rejected = [json.loads(x) for x in (spill / f"rejected-{os.getpid()}.jsonl").read_text().splitlines()]
    assert sorted((r["table"], r["row"].get("request_id")) for r in rejected) == [
        ("decisions", rows[7]["request_id"]), ("feedback", "req-000001")
    ]  # fmt: skip
    assert any("timezone-aware" in r["error"] for r in rejected)


def test_writers_sharing_a_spill_dir_replay_each_file_once(engine, tmp_path):
    rng = np.random.default_rng(10)
    spill = tmp_path / "spill"
    spill.mkdir()
    rows = [decision_row(i, rng) for i in range(600)]
    # 12 orphans of dead processes: spill files and an interrupted replay
    for k in range(12):
        name = f"spill-{900000 + k}.jsonl" if k % 3 else f"replay-{900000 + k}-abc.jsonl"
        part = rows[k * 40 : (k + 1) * 40]
        (spill / name).write_bytes(encode_spill_line("decisions", part[:20]) + encode_spill_line("decisions", part[20:]))
    # a live process owns this one (holds its lock): nobody else may take it
    live = spill / "spill-999999.jsonl"
    live.write_bytes(encode_spill_line("decisions", rows[480:600]))
    import fcntl

    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writers = [LogWriter(engine, spill, start=False) for _ in range(3)]
    try:
        barrier = threading.Barrier(len(writers))

        def go(w: LogWriter) -> None:
            w.start()
            barrier.wait()
            w.flush(timeout=20, replay=True)

        threads = [threading.Thread(target=go, args=(w,)) for w in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(w.stats()["replayed"] for w in writers) == 480  # each orphan exactly once
        assert count(engine, "decisions") == 480
        assert spill_files(spill) == ["spill-999999.jsonl"]
        os.close(fd)  # the owner exits
        fd = -1
        assert writers[0].flush(timeout=20, replay=True)
        assert sum(w.stats()["replayed"] for w in writers) == 600
        assert count(engine, "decisions") == 600 and spill_files(spill) == []
    finally:
        if fd >= 0:
            os.close(fd)
        for w in writers:
            w.close()


def test_writers_of_one_process_keep_separate_spill_files(database_url, engine, tmp_path):
    rng = np.random.default_rng(12)
    rows = [decision_row(i, rng, n_cand=4) for i in range(150)]
    spill = tmp_path / "spill"
    bad = _bad_engine(database_url, tmp_path)
    a, b = (LogWriter(bad, spill, flush_interval_s=0.01) for _ in range(2))
    try:
        for r in rows[:50]:
            a.submit_decision(r)
        for r in rows[50:100]:
            b.submit_decision(r)
        assert a.flush(timeout=10) and b.flush(timeout=10)
        assert len(spill_files(spill)) == 2  # each holds the lock on its own file
        a.set_engine(engine)
        assert a.flush(timeout=20, replay=True)
        assert count(engine, "decisions") == 50  # b is alive: its file is b's to replay
        b.close()
        for r in rows[100:]:  # after close: straight to the spill file, which is then released
            b.submit_decision(r)
        assert b.stats()["spilled"] == 100
        assert a.flush(timeout=20, replay=True)
        assert count(engine, "decisions") == 150 and spill_files(spill) == []
        assert a.stats()["replayed"] == 150
    finally:
        a.close()
        b.close()
        bad.dispose()


_CRASHING_CHILD = """
import os, pickle, signal, sys
from policy_api.log import LogWriter, make_engine
url, spill, data, sync = sys.argv[1:5]
rows, fb = pickle.loads(open(data, "rb").read())
writer = LogWriter(make_engine(url), spill, durable=True, flush_interval_s=0.01, batch_size=50,
                   journal_sync=sync == "fsync")
for r in rows:
    writer.submit_decision(r)
for k in range(0, len(fb), 10):
    writer.submit_feedback(fb[k:k + 10])
print(writer.stats()["journaled"], flush=True)  # every submission returned: all acknowledged
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("sync", ["fsync", "write"])
def test_journal_survives_kill_9_and_is_replayed_exactly_once(database_url, engine, tmp_path, sync):
    import pickle
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    rows = [decision_row(i, rng) for i in range(400)]
    fb = [feedback_row(j, rows[j % 400]["request_id"], rng) for j in range(200)]
    (tmp_path / "rows.pkl").write_bytes(pickle.dumps((rows, fb)))
    spill = tmp_path / "spill"
    child = subprocess.run([sys.executable, "-c", _CRASHING_CHILD, database_url, str(spill), str(tmp_path / "rows.pkl"),
                            sync],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -9 and child.stdout.strip() == "600", child.stderr[-2000:]
    assert any(p.name.startswith("journal-") for p in spill.glob("*.jsonl"))  # left by the dead process
    with LogWriter(engine, spill, durable=True) as writer:  # the next process replays what it finds
        assert writer.flush(timeout=30, replay=True)
    got = read_decisions(engine, columns=["request_id", "propensity"])
    assert sorted(got["request_id"]) == sorted(r["request_id"] for r in rows)  # 0 lost, 0 twice
    assert count(engine, "feedback") == 200
    assert sorted(read_feedback(engine)["event_id"]) == sorted(r["event_id"] for r in fb)
    assert spill_files(spill) == []


def test_durable_writer_bounds_memory_while_the_database_is_down(database_url, engine, tmp_path):
    rng = np.random.default_rng(12)
    rows = [decision_row(i, rng) for i in range(300)]
    spill = tmp_path / "spill"
    bad = _bad_engine(database_url, tmp_path)
    writer = LogWriter(bad, spill, durable=True, max_queue=40, batch_size=20, flush_interval_s=0.01)
    try:
        depth = 0
        for r in rows:
            writer.submit_decision(r)
            depth = max(depth, writer.stats()["queue_depth"])
        assert writer.flush(timeout=20)
        stats = writer.stats()
        assert depth <= 40 and stats["journaled"] == 300 and not stats["healthy"], (depth, stats)
        assert stats["spilled"] == 0  # journaled rows are not written twice to disk
        writer.set_engine(engine)
        deadline = time.monotonic() + 30
        while count(engine, "decisions") < 300 and time.monotonic() < deadline:
            writer.flush(timeout=5, replay=True)
    finally:
        writer.close()
        bad.dispose()
    assert sorted(read_decisions(engine, columns=["request_id"])["request_id"]) == [r["request_id"] for r in rows]
    assert spill_files(spill) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that really fills up (needs root to mount)."""
    import subprocess

    path = tmp_path / "tiny"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill_disk(path: Path) -> None:
    import errno

    with path.open("ab", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return


def test_journal_on_a_full_disk_refuses_and_leaves_no_torn_line(tiny_disk):
    journal = Journal(tiny_disk, encode_spill_line, deadline_s=0.5, retry_s=0.1)
    try:
        small = [{"request_id": f"r{i}", "n": i} for i in range(5)]
        seg = journal.append("decisions", small)
        _fill_disk(tiny_disk / "filler")
        big = [{"request_id": "x" * 2000, "n": i} for i in range(40)]  # 80 KB: cannot fit
        with pytest.raises(JournalUnavailable, match=r"journal not writable: OSError: No space left"):
            journal.append("decisions", big)
        assert not journal.ok and journal.stats()["failures"] >= 1
        files = sorted(tiny_disk.glob("journal-*.jsonl"))
        lines = files[0].read_bytes().splitlines()  # cut back: only whole lines, the first append
        assert [decode_spill_line(x)[1] for x in lines if x.strip()] == [small]
        (tiny_disk / "filler").unlink()
        deadline = time.monotonic() + 5
        while not journal.ok and time.monotonic() < deadline:  # the committer's probe notices
            time.sleep(0.05)
        assert journal.ok
        assert journal.append("decisions", big) == seg
    finally:
        journal.close()


def test_database_and_journal_disk_down_memory_stays_bounded(tiny_disk, tmp_path):
    """Nothing can be made durable: feedback is refused, decisions fill the bounded queue and the rest
    are dropped and counted with their propensity (reference: the submitted rows, in order)."""
    bad = _bad_engine("sqlite://", tmp_path)
    rng = np.random.default_rng(15)
    rows = [decision_row(i, rng) for i in range(100)]
    _fill_disk(tiny_disk / "filler")
    writer = LogWriter(bad, tiny_disk, durable=True, max_queue=20, journal_deadline_s=0.5, start=False)
    try:
        kept = [writer.submit_decision(r) for r in rows]
        with pytest.raises(JournalUnavailable, match=r"journal not writable"):
            writer.submit_feedback([feedback_row(0, rows[0]["request_id"], rng)])
        stats = writer.stats()
    finally:
        writer.close(timeout=0.5)
        bad.dispose()
    assert kept == [False] * 100 and not stats["durable"]
    assert (stats["queue_depth"], stats["unjournaled"], stats["dropped"], stats["refused"]) == (20, 20, 80, 1)
    assert stats["dropped_propensity"] == pytest.approx(sum(r["propensity"] for r in rows[20:]))


def test_replay_skips_a_torn_line_on_a_full_disk(tiny_disk, tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'log.sqlite'}")
    upgrade(eng)
    rng = np.random.default_rng(13)
    rows = [decision_row(i, rng) for i in range(6)]
    good = encode_spill_line("decisions", rows[:3]) + encode_spill_line("decisions", rows[3:])
    (tiny_disk / "journal-999999-dead-1.jsonl").write_bytes(good + b'{"table":"decisions","rows":[{"requ')
    _fill_disk(tiny_disk / "filler")  # the torn line's rejected record cannot be written
    with LogWriter(eng, tiny_disk) as writer:
        assert writer.flush(timeout=10, replay=True)
        stats = writer.stats()
    assert count(eng, "decisions") == 6 and (stats["replayed"], stats["rejected"]) == (6, 1)
    assert spill_files(tiny_disk) == []  # replayed and deleted, not retried forever
    eng.dispose()


def test_logwriter_rejects_bad_arguments(engine, tmp_path):
    with pytest.raises(ValueError, match=r"max_queue must be an int >= 1; got 0"):
        LogWriter(engine, tmp_path, max_queue=0)
    with pytest.raises(ValueError, match=r"flush_interval_s must be > 0; got 0"):
        LogWriter(engine, tmp_path, flush_interval_s=0)
    with pytest.raises(TypeError, match=r"engine must be a sqlalchemy Engine"):
        LogWriter("sqlite://", tmp_path)


# ------------------------------------------------------------------------------------------ parquet


@pytest.mark.parametrize("module_ids", ["int", "str"])
def test_parquet_export_round_trip_equals_db_rows(engine, tmp_path, module_ids):
    rng = np.random.default_rng(11)
    pool = None if module_ids == "int" else [f"songs_{k}" for k in range(12)]
    rows = [decision_row(i, rng, n_cand=int(rng.integers(8, 17)), module_ids=pool) for i in range(70)]
    fb = [feedback_row(j, rows[int(rng.integers(35))]["request_id"], rng) for j in range(90)]
    fb.append(feedback_row(999, "req-not-logged", rng))  # feedback whose decision is not in the log
    for r in rows[::2]:  # optional candidate fields, logged by the engine, absent from older rows
        for c in r["candidates"]:
            c.update(categories=["songs", "live"], tail=float(rng.random()))
    insert_decisions(engine, rows)
    insert_feedback(engine, fb)
    since, until = T0 + timedelta(minutes=5), T0 + timedelta(minutes=50)
    path = tmp_path / "out" / "log.parquet"
    n = export_parquet(engine, path, since, until, chunk_size=9)
    got = read_parquet(path)
    assert list(got) == list(EXPORT_COLUMNS)

    # reference: the DB rows, read back and joined with a plain Python loop
    db = read_decisions(engine, since=since, until=until)
    db_fb = read_feedback(engine)
    assert n == len(db["request_id"]) == len(got["request_id"]) > 20
    for key in ("request_id", "user_id", "policy", "fallback_reason"):
        assert list(got[key]) == list(db[key])
    np.testing.assert_array_equal(got["ts"], db["ts"])
    np.testing.assert_array_equal(got["chosen"], db["chosen"])
    np.testing.assert_array_equal(got["propensity"], db["propensity"])
    np.testing.assert_array_equal(got["n_candidates"], [len(c) for c in db["candidates"]])
    assert got["pmf"] == db["pmf"]
    for key in ("context", "versions", "layout"):
        assert got[key] == db[key]
    for field in ("modules", "tilt", "value", "exposure", "score", "engagement"):
        assert got[f"cand_{field}"] == [[c[field] for c in cands] for cands in db["candidates"]]
    for field in ("categories", "tail"):
        assert got[f"cand_{field}"] == [[c[field] for c in cands] if field in cands[0] else None
                                        for cands in db["candidates"]]  # fmt: skip
        assert any(v is None for v in got[f"cand_{field}"]) and any(v is not None for v in got[f"cand_{field}"])
    for i, rid in enumerate(db["request_id"]):
        ref = [
            {"event_id": db_fb["event_id"][k], "slot": None if db_fb["slot"][k] < 0 else int(db_fb["slot"][k]),
             "item_id": db_fb["item_id"][k], "type": db_fb["type"][k],
             "value": None if np.isnan(db_fb["value"][k]) else float(db_fb["value"][k]),
             "ts": db_fb["ts"][k]}
            for k in range(len(db_fb["id"])) if db_fb["request_id"][k] == rid
        ]  # fmt: skip
        mine = [{**e, "ts": to_us(e["ts"])} for e in got["feedback"][i]]
        assert mine == ref
    assert sum(len(x) for x in got["feedback"]) > 30

    empty = tmp_path / "empty.parquet"
    assert export_parquet(engine, empty, since=T0 - timedelta(days=2), until=T0 - timedelta(days=1)) == 0
    assert {k: len(v) for k, v in read_parquet(empty).items()} == dict.fromkeys(EXPORT_COLUMNS, 0)
    with pytest.raises(ValueError, match=r"columns must be among"):
        read_parquet(path, columns=["reward"])


def test_tables_match_the_documented_columns():
    assert [c.name for c in decisions.columns] == [
        "request_id", "ts", "user_id", "context", "versions", "policy", "candidates", "pmf", "chosen",
        "propensity", "layout", "fallback_reason",
    ]  # fmt: skip
    assert [c.name for c in feedback.columns] == [
        "id", "event_id", "request_id", "slot", "item_id", "type", "value", "ts", "received_at",
    ]  # fmt: skip
    assert not feedback.foreign_keys and feedback.c.event_id.unique
    assert set(metadata.tables) == LOG_TABLES


def test_new_journal_segments_are_never_claimed_by_a_sweeping_replayer(tmp_path):
    """A journal that opens a new segment on every append, beside a writer of another process that
    sweeps the same folder for orphans without pause: every append succeeds, every segment keeps
    exactly its rows, and the sweeper replays nothing (reference: the appended rows)."""
    eng = make_engine(f"sqlite:///{tmp_path / 'log.sqlite'}")
    upgrade(eng)
    spill = tmp_path / "spill"
    journal = Journal(spill, encode_spill_line, deadline_s=5.0, max_segment_bytes=1)
    stale, fresh = spill / ".journal-1-dead-1.jsonl.new", spill / ".journal-2-live-1.jsonl.new"
    stale.touch()
    fresh.touch()
    os.utime(stale, (time.time() - 120, time.time() - 120))  # left by a journal killed while opening
    sweeper = LogWriter(eng, spill, flush_interval_s=0.01)
    stop = threading.Event()

    def sweep() -> None:
        while not stop.is_set():
            sweeper.flush(timeout=5, replay=True)

    thread = threading.Thread(target=sweep)
    thread.start()
    appended: dict[int, list] = {}
    try:
        for i in range(300):
            rows = [{"request_id": f"r{i}", "n": i}]
            appended[journal.append("decisions", rows)] = rows
        stats = journal.stats()
        on_disk = {int(p.stem.rsplit("-", 1)[1]): [decode_spill_line(x)[1] for x in p.read_bytes().splitlines()]
                   for p in spill.glob("journal-*.jsonl")}
    finally:
        stop.set()
        thread.join()
        journal.close()
        sweeper.close()
    assert stats["failures"] == 0 and stats["rows"] == 300
    assert on_disk == {n: [rows] for n, rows in appended.items()}
    assert count(eng, "decisions") == 0 and list(spill.glob(".journal-*")) == [fresh]


# ------------------------------------------------------------------------- reward join in the database


def test_sql_reward_join_equals_the_reference_join(engine, seed):
    """read_rewards (one aggregate row per decision) against join_rewards over the raw events, on
    both backends; and the window's end to the microsecond."""
    from allocator import parse_config_text
    from policy_api.log import join_rewards, read_decision_log, read_rewards
    from simulator import make_world

    rng = np.random.default_rng(seed)
    world = make_world(n_users=10, n_items=80, seed=seed)
    cfg = parse_config_text(world.default_config_toml())
    S, K, window = cfg.slots, len(cfg.constraints), cfg.learning.reward_window_s
    names = np.array([world.categories[c] for c in world.item_category], dtype=object)
    upsert_items(engine, [{"item_id": str(i), "category": str(c), "popularity": 1.0}
                          for i, c in zip(world.item_ids.tolist(), names.tolist(), strict=True)])
    n = 60
    rows = []
    for k in range(n):
        mods = [cfg.modules[int(j)] for j in rng.integers(0, len(cfg.modules), S)]
        cand = {"modules": [m.id for m in mods], "categories": [m.category for m in mods], "tilt": 0.0,
                "value": 1.0, "exposure": [0.1] * K, "score": 1.0, "engagement": [0.5] * S, "tail": 0.0}
        rows.append({**decision_row(k, rng, n_cand=1), "candidates": [cand], "pmf": [1.0], "chosen": 0,
                     "propensity": 1.0, "ts": T0 + timedelta(seconds=10 * k, microseconds=int(rng.integers(10**6)))})
    insert_decisions(engine, rows)
    fb, j = [], 0
    for k in list(range(n)) + [n + 1, n + 2]:  # two orphans: request ids never logged
        base = rows[k]["ts"] if k < n else T0
        for _ in range(int(rng.integers(0, 6))):
            kind = str(rng.choice(["impression", "play", "full_play", "favorite", "share", "skip", "unknown"]))
            delay = timedelta(seconds=float(rng.exponential(window / 2)))
            fb.append({"event_id": f"e{j}", "request_id": rows[k]["request_id"] if k < n else f"orphan-{k}",
                       "slot": 0, "item_id": str(rng.choice(world.item_ids)), "type": kind, "value": None,
                       "ts": base + delay})
            j += 1
    insert_feedback(engine, fb)
    dlog = read_decision_log(engine, cfg)
    got = read_rewards(engine, dlog, cfg, default_reward=-3.0)
    ref_fb = read_feedback(engine, columns=["request_id", "item_id", "type", "ts"], exclude_types=("impression",))
    from policy_api.log import feedback_first_seen

    ref = join_rewards(dlog, ref_fb, cfg, world.item_ids, names, default_reward=-3.0,
                       first_seen=feedback_first_seen(engine))
    np.testing.assert_allclose(got.reward, ref.reward, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.has_feedback, ref.has_feedback)
    assert (got.n_events, got.n_late, got.n_orphan) == (ref.n_events, ref.n_late, ref.n_orphan)
    assert got.n_late > 0 and got.n_orphan >= 0 and (~got.has_feedback).any()
    # read with the decisions, the query running beside their parse: the same join
    from policy_api.log import read_log_rewards

    both_log, both = read_log_rewards(engine, cfg)
    np.testing.assert_array_equal(both_log.request_id, dlog.request_id)
    np.testing.assert_array_equal(both.reward, read_rewards(engine, dlog, cfg).reward)
    # the window's end: an event exactly at it is in, one microsecond later is late
    edge = rows[0]["ts"] + timedelta(seconds=window)
    first = rows[0]["request_id"]
    insert_feedback(engine, [
        {"event_id": "edge-in", "request_id": first, "item_id": str(world.item_ids[0]), "type": "play", "ts": edge},
        {"event_id": "edge-out", "request_id": first, "item_id": str(world.item_ids[0]), "type": "play",
         "ts": edge + timedelta(microseconds=1)}])
    after = read_rewards(engine, dlog, cfg, default_reward=-3.0)
    value = {c.name: c.value_per_engagement for c in cfg.categories}[str(names[0])] * cfg.events["play"]
    i = int(np.flatnonzero(dlog.request_id == first)[0])
    base_reward = got.reward[i] if got.has_feedback[i] else 0.0
    assert after.reward[i] == pytest.approx(base_reward + value, rel=1e-12, abs=1e-12)
    assert (after.n_events, after.n_late) == (got.n_events + 1, got.n_late + 1)
    # impressions alone: inside the window the decision has feedback (reward 0, not the default),
    # an impression after the window does not give it any
    imp_in, imp_late = rows[n - 2], rows[n - 1]
    insert_feedback(engine, [
        {"event_id": f"imp-{k}", "request_id": r["request_id"], "item_id": str(world.item_ids[0]),
         "type": "impression", "ts": r["ts"] + timedelta(seconds=window * f)}
        for k, (r, f) in enumerate([(imp_in, 1.0), (imp_late, 1.5)])])
    # ... on decisions left with these events only
    with engine.begin() as conn:
        conn.execute(sa.delete(feedback).where(feedback.c.request_id.in_([imp_in["request_id"], imp_late["request_id"]]),
                                               ~feedback.c.event_id.like("imp-%")))
    imp = read_rewards(engine, dlog, cfg, default_reward=-3.0)
    i_in, i_late = (int(np.flatnonzero(dlog.request_id == r["request_id"])[0]) for r in (imp_in, imp_late))
    assert (imp.has_feedback[i_in], imp.reward[i_in]) == (True, 0.0)
    assert (imp.has_feedback[i_late], imp.reward[i_late]) == (False, -3.0)
    # the stream (chunks of 7 decisions, each chunk's events found by request id) joins the same:
    # the window's edge, impressions alone in and after the window; all of it and from `since` on
    from policy_api.log import iter_log_rewards

    whole = read_rewards(engine, dlog, cfg)
    for since, rows_in in ((None, dlog), (rows[20]["ts"], read_decision_log(engine, cfg, rows[20]["ts"]))):
        chunks = list(iter_log_rewards(engine, cfg, since, chunk_size=7))
        ref_rw = whole if since is None else read_rewards(engine, rows_in, cfg, since)
        assert len(chunks) == -(-len(rows_in) // 7)
        np.testing.assert_array_equal(np.concatenate([d.request_id for d, _ in chunks]), rows_in.request_id)
        np.testing.assert_allclose(np.concatenate([r.reward for _, r in chunks]), ref_rw.reward, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.concatenate([r.has_feedback for _, r in chunks]), ref_rw.has_feedback)
        assert (sum(r.n_events for _, r in chunks), sum(r.n_late for _, r in chunks)) == (ref_rw.n_events, ref_rw.n_late)
    assert whole.reward[i_in] == 0.0 and whole.reward[i_late] == cfg.learning.default_reward


def test_readers_of_serving_decisions_skip_an_imported_history(engine):
    """On both backends: decisions imported before serving began (``policy = "import"``, made
    unreadable as serving rows: an object where the pmf's list belongs) are read by none of the readers
    of serving decisions, and their events are not the serving decisions' orphans: each reader gives
    what it gave before the import. ``serving_began`` is the first serving decision's time (a brute
    force over the rows)."""
    from allocator import parse_config_text
    from policy_api.log import (
        feedback_first_seen,
        iter_log_rewards,
        join_rewards,
        read_decision_log,
        read_log_rewards,
        serving_began,
    )
    from simulator import make_world

    rng = np.random.default_rng(3)
    world = make_world(n_users=10, n_items=80, seed=3)
    cfg = parse_config_text(world.default_config_toml())
    S, K = cfg.slots, len(cfg.constraints)
    names = np.array([world.categories[c] for c in world.item_category], dtype=object)
    upsert_items(engine, [{"item_id": str(i), "category": str(c), "popularity": 1.0}
                          for i, c in zip(world.item_ids.tolist(), names.tolist(), strict=True)])
    assert serving_began(engine) is None
    rows, fb = [], []
    for k in range(40):
        mods = [cfg.modules[int(j)] for j in rng.integers(0, len(cfg.modules), S)]
        cand = {"modules": [m.id for m in mods], "categories": [m.category for m in mods], "tilt": 0.0,
                "value": 1.0, "exposure": [0.1] * K, "score": 1.0, "engagement": [0.5] * S, "tail": 0.0}
        rows.append({**decision_row(k, rng, n_cand=1), "candidates": [cand], "pmf": [1.0], "chosen": 0,
                     "propensity": 1.0, "ts": T0 + timedelta(seconds=10 * k)})
        fb += [{"event_id": f"e{k}-{j}", "request_id": rows[-1]["request_id"], "slot": 0,
                "item_id": str(rng.choice(world.item_ids)), "type": str(rng.choice(["play", "skip", "impression"])),
                "ts": rows[-1]["ts"] + timedelta(seconds=float(rng.exponential(60.0)))} for j in range(3)]
    insert_decisions(engine, rows)
    insert_feedback(engine, fb)

    def reads():
        dlog = read_decision_log(engine, cfg)
        ref_fb = read_feedback(engine, since=serving_began(engine), columns=["request_id", "item_id", "type", "ts"],
                               exclude_types=("impression",))
        ref = join_rewards(dlog, ref_fb, cfg, world.item_ids, names,
                           first_seen=feedback_first_seen(engine, since=serving_began(engine)))
        both_log, both = read_log_rewards(engine, cfg)
        chunks = list(iter_log_rewards(engine, cfg, chunk_size=7))
        return (dlog.request_id.tolist(), both_log.request_id.tolist(), both.reward.tolist(), ref.reward.tolist(),
                (ref.n_events, ref.n_late, ref.n_orphan), [d.request_id.tolist() for d, _ in chunks],
                [r.reward.tolist() for _, r in chunks])

    before = reads()
    assert before[0] == [r["request_id"] for r in rows] and before[2] == before[3]
    imported = [{**decision_row(1000 + k, rng, n_cand=1), "request_id": f"import:{k:04d}", "policy": "import",
                 "candidates": [], "pmf": {"not": "a list"}, "chosen": 0, "propensity": 1.0, "layout": [],
                 "ts": T0 - timedelta(days=400) + timedelta(hours=k)} for k in range(60)]
    insert_decisions(engine, imported)
    insert_feedback(engine, [{"event_id": f"import-{k}", "request_id": f"import:{k:04d}", "slot": 0,
                              "item_id": str(world.item_ids[k % 80]), "type": "play",
                              "ts": T0 - timedelta(days=400) + timedelta(hours=k)} for k in range(60)])
    with engine.connect() as conn:  # the brute force: the earliest decision that is not an import
        got = conn.execute(sa.select(decisions.c.policy, decisions.c.ts)).all()
    assert serving_began(engine) == min(ts for policy, ts in got if policy != "import") == rows[0]["ts"]
    assert reads() == before


def test_new_sqlite_file_gets_large_pages_and_an_old_one_keeps_its_own(tmp_path):
    import sqlite3

    old = tmp_path / "old.sqlite"
    sqlite3.connect(old).execute("CREATE TABLE t (x)").connection.commit()  # 4 KiB pages, made elsewhere
    for path, want in ((tmp_path / "new.sqlite", 16384), (old, 4096)):
        eng = make_engine(f"sqlite:///{path}")
        upgrade(eng)
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA page_size").scalar() == want
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        eng.dispose()


@pytest.mark.parametrize("walk", [None, 7, "capped"])
def test_unpersonalised_window_and_item_engagement_equal_a_brute_force(engine, walk, monkeypatch):
    """``unpersonalised_since`` and ``item_engagement(..., unpersonalised=True)`` against the same figures
    computed here row by row: the newest decisions served without a personal live state (no ``live``
    in the context, or one other than "hit") until their feedback since ``since`` reaches ``n`` events,
    then every such event of those decisions; personal pages and feedback without a decision row are
    left out."""
    from policy_api.log import _rows, item_engagement, unpersonalised_since

    cap = None
    if walk == "capped":  # at most 40 unpersonalised decisions back, in pages of 9
        cap = 40
        monkeypatch.setattr(_rows, "_WALK", 9)
        monkeypatch.setattr(_rows, "_WALK_MAX", cap)
    elif walk is not None:  # pages of 7 decisions: the walk's keyset (ties at one instant included) is used
        monkeypatch.setattr(_rows, "_WALK", walk)
    rng = np.random.default_rng(8)
    lives = [None, "hit", "hit", "hit", "cold", "timeout"]
    rows, events = [], []
    for i in range(300):
        live = lives[int(rng.integers(len(lives)))]
        ctx = {"hour": 3} if live is None else {"hour": 3, "live": live}
        t = T0 + timedelta(seconds=int(rng.integers(0, 3600)))
        if i % 7 == 0:  # decisions at the same instant (43, over several of the walk's pages): its order
            t = T0 + timedelta(seconds=1800)  # breaks the tie
        rows.append({**decision_row(i, rng), "ts": t, "context": ctx})
        for k in range(int(rng.integers(0, 12))):
            kind = ["impression", "impression", "play", "skip", "favorite"][int(rng.integers(5))]
            events.append({"event_id": f"e{i}-{k}", "request_id": rows[-1]["request_id"], "slot": int(rng.integers(0, 5)),
                           "item_id": f"i{int(rng.integers(30))}", "type": kind, "value": None,
                           "ts": t + timedelta(seconds=int(rng.integers(0, 600)))})
    events += [{"event_id": f"orphan-{k}", "request_id": f"gone-{k}", "slot": 0, "item_id": "i1", "type": "play",
                "value": None, "ts": T0 + timedelta(seconds=3000)} for k in range(40)]
    insert_decisions(engine, rows)
    insert_feedback(engine, events)
    weights = [1.0, 0.9, 0.8, 0.7, 0.6]
    units_of = {"play": 1.0, "skip": -0.5, "favorite": 2.0}

    def reference(n: int | None, since: datetime | None) -> tuple[datetime | None, dict[str, tuple[float, float]]]:
        mine = [r for r in rows if r["context"].get("live") != "hit" and (since is None or r["ts"] >= since)]
        mine.sort(key=lambda r: (r["ts"], r["request_id"]), reverse=True)
        of = {r["request_id"]: [e for e in events if e["request_id"] == r["request_id"]
                                and (since is None or e["ts"] >= since)] for r in mine}
        cut, total = since, 0
        if n is not None:
            for k, r in enumerate(mine, start=1):
                total += len(of[r["request_id"]])
                if total >= n or k == cap:
                    cut = r["ts"] if since is None or r["ts"] > since else since
                    break
        agg: dict[str, list[float]] = {}
        for r in mine:
            if cut is not None and r["ts"] < cut:
                continue
            for e in of[r["request_id"]]:
                a = agg.setdefault(e["item_id"], [0.0, 0.0])
                if e["type"] == "impression":
                    a[1] += weights[e["slot"]] / np.mean(weights)
                else:
                    a[0] += units_of[e["type"]]
        return cut, {k: (v[0], v[1]) for k, v in agg.items()}

    for n, since in ((1, None), (150, None), (400, T0 + timedelta(minutes=20)), (10**6, None), (None, T0 + timedelta(minutes=40))):
        want_cut, want = reference(n, since)
        if n is not None:
            assert unpersonalised_since(engine, n, since) == want_cut, (n, since)
        ids, units, imps = item_engagement(engine, units_of, since, weights, n, unpersonalised=True)
        got = {str(i): (u, m) for i, u, m in zip(ids.tolist(), units.tolist(), imps.tolist(), strict=True)}
        assert got.keys() == want.keys(), (n, since)
        for k, (u, m) in want.items():
            assert got[k] == (pytest.approx(u), pytest.approx(m)), (n, since, k)
    assert want_cut is not None and len(want) > 5  # the cases are not empty
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        unpersonalised_since(engine, 0)
