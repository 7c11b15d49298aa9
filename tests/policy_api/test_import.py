"""`homepage import`: bad lines are named, rows become log entries, re-imports add nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import sqlalchemy as sa

from simulator import make_world


@pytest.fixture()
def env(tmp_path):
    world = make_world(n_users=5, n_items=60, seed=2)
    (tmp_path / "homepage.toml").write_text(world.default_config_toml())
    world.to_catalog_csv(tmp_path / "items.csv")
    e = dict(os.environ, DATABASE_URL=f"sqlite:///{tmp_path / 'h.db'}", HOMEPAGE_DATA_DIR=str(tmp_path),
             HOMEPAGE_CONFIG=str(tmp_path / "homepage.toml"))
    run(e, "catalog", "load", str(tmp_path / "items.csv"))
    return e, tmp_path, world


def run(env, *args):
    return subprocess.run([sys.executable, "-m", "policy_api.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=env["HOMEPAGE_DATA_DIR"])


def count(tmp, table, where=""):
    eng = sa.create_engine(f"sqlite:///{tmp / 'h.db'}")
    with eng.connect() as c:
        n = c.execute(sa.text(f"SELECT COUNT(*) FROM {table} {where}")).scalar_one()
    eng.dispose()
    return n


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("u1,NOPE,play,1700000000", r"line 3: item_id 'NOPE' is not in the catalog"),
        ("u1,{item},click,1700000000", r"line 3: event must be one of impression, play, full_play, favorite, share, skip; got 'click'"),
        ("u1,{item},play,yesterday", r"line 3: timestamp must be epoch seconds or ISO 8601; got 'yesterday'"),
        ("u1,{item},play,1700000000,lots", r"line 3: value must be a number; got 'lots'"),
        (",{item},play,1700000000", r"line 3: user_id must be non-empty"),
        ("u1,{item},play", r"line 3: expected 5 columns; got 3"),
        ("u1,{item},play,1,2,3", r"line 3: expected 5 columns; got 6"),
        ("u1,{item},play,-5", r"line 3: timestamp must be epoch seconds or ISO 8601; got '-5'"),
        ("u1,{item},play,inf", r"line 3: timestamp must be epoch seconds or ISO 8601; got 'inf'"),
        ("u1,{item},play,1700000000,nan", r"line 3: value must be finite; got 'nan'"),
    ],
)
def test_bad_lines_are_named(env, line, message):
    import re

    e, tmp, world = env
    item = str(world.item_ids[0])
    f = tmp / "interactions.csv"
    f.write_text(f"user_id,item_id,event,timestamp,value\nu0,{item},play,1700000000,\n" + line.format(item=item) + "\n")
    r = run(e, "import", str(f))
    assert r.returncode == 2 and re.search(message, r.stderr), r.stderr
    assert count(tmp, "feedback") == 0  # nothing half-imported


def test_header_is_checked(env):
    e, tmp, _ = env
    f = tmp / "i.csv"
    f.write_text("user,item,event,time\n")
    r = run(e, "import", str(f))
    assert r.returncode == 2 and "line 1: header must be user_id,item_id,event,timestamp[,value]" in r.stderr


def _interactions_file(path, rng, n, items, *, iso=False, short_lines=False, crlf=False):
    """A file of the format with what real exports hold: spaces around fields, quoted ids with commas,
    quotes and line breaks, blank lines, fractional and ISO times, values given and left empty."""
    users = ["u1", " u2 ", '"a, b"', '"say ""hi"""', '"two\nlines"', "7", "\u00e9l\u00e8ve"]
    events = ["play", "skip", " favorite", "full_play ", "impression", "share"]
    lines = ["user_id,item_id,event,timestamp,value"]
    for k in range(n):
        t = 1.6e9 + float(rng.integers(0, 10**6)) + (0.25 if k % 3 == 0 else 0.0)
        stamp = (f"{t:.2f}" if k % 5 else f" {int(t)} ") if not (iso and k % 4 == 0) else \
            np.datetime_as_string(np.datetime64(int(t), "s")) + ("Z" if k % 8 == 0 else "")
        value = "" if k % 3 else f"{rng.random():.6f}"
        row = f"{users[k % len(users)]},{items[rng.integers(len(items))]},{events[k % len(events)]},{stamp}"
        lines.append(row if short_lines and k % 7 == 0 else f"{row},{value}")
        if k % 50 == 0:
            lines.append("")
    path.write_bytes(("\r\n" if crlf else "\n").join(lines).encode() + b"\n")
    return path


@pytest.mark.parametrize(("iso", "short_lines", "crlf"), [(False, False, False), (True, False, True),
                                                          (False, True, False)])
def test_the_column_wise_reader_reads_what_the_line_by_line_reader_reads(tmp_path, iso, short_lines, crlf):
    """Every column, value by value, against the line-by-line reader (the reference): numeric and ISO
    times, quoted fields, blank lines, CRLF; a 4-column line in a 5-column file is read line by line."""
    from policy_api.jobs import _importing

    items = [f"i{k}" for k in range(30)] + ['"x,y"']
    f = _interactions_file(tmp_path / "i.csv", np.random.default_rng(3), 2000, items, iso=iso,
                           short_lines=short_lines, crlf=crlf)
    known = {i.strip('"') for i in items}
    columns = _importing._read_columns(f, ["user_id", "item_id", "event", "timestamp", "value"], known)
    assert (columns is None) == short_lines  # a short line: the column-wise reader declines
    got, ref = _importing.read_interactions(f, known), _importing.read_interactions_by_line(f, known)
    assert got.keys() == ref.keys() and ref["ts"].size == 2000
    for k in ("user_id", "item_id", "event"):
        assert got[k].dtype == object and got[k].tolist() == ref[k].tolist()
    for k in ("ts", "value"):
        assert got[k].dtype == np.float64 and np.array_equal(got[k], ref[k], equal_nan=True)
    assert {"a, b", 'say "hi"', "two\nlines", "u2", "\u00e9l\u00e8ve"} <= set(got["user_id"].tolist())
    given = sum(k % 3 == 0 and not (short_lines and k % 7 == 0) for k in range(2000))  # values written
    assert np.isfinite(got["value"]).sum() == given


def test_rows_become_log_entries_and_reimport_is_idempotent(env):
    e, tmp, world = env
    items = [str(i) for i in world.item_ids[:3]]
    lines = [f"u1,{items[0]},play,1700000000", f"u1,{items[0]},full_play,1700000000", f"u1,{items[1]},skip,1700000000",
             f"u2,{items[2]},favorite,2023-11-14T22:13:20Z,0.99", f"u2,{items[2]},play,1700000100"]
    f = tmp / "interactions.csv"
    f.write_text("user_id,item_id,event,timestamp,value\n" + "\n".join(lines) + "\n")
    r = run(e, "import", str(f))
    assert r.returncode == 0, r.stderr
    # (user, time) groups: u1@1700000000, u2@1700000000 (ISO of the same instant), u2@1700000100
    assert count(tmp, "decisions", "WHERE policy = 'import'") == 3
    assert count(tmp, "feedback") == 5
    assert count(tmp, "feedback", "WHERE value = 0.99") == 1
    again = run(e, "import", str(f))
    assert again.returncode == 0
    assert count(tmp, "decisions") == 3 and count(tmp, "feedback") == 5


def test_imported_history_is_not_serving(database_url, tmp_path):
    """Serving begins at its first decision that is not an import. An imported history carries the
    interactions' own times, years before the catalog was loaded: counted as serving, every catalog
    item was "added after serving began" and each module showed a random one of them in place of its
    last item half the time. The reference is a brute force over the decision rows."""
    import time
    from datetime import UTC, datetime

    from policy_api import jobs, registry
    from policy_api.engine import DecisionEngine, load_state, serving_since
    from policy_api.log import (
        IMPORT_POLICY,
        decisions,
        insert_decisions,
        make_engine,
        read_catalog_csv,
        reading,
        upgrade,
        upsert_items,
    )

    world = make_world(n_users=30, n_items=120, seed=2)
    # no long-tail bound: a new item would replace a module's last item whatever its kind
    toml = world.default_config_toml().split("[[constraints]]")[0]
    world.to_catalog_csv(tmp_path / "items.csv")
    users, picks = np.arange(200) % 30, np.arange(200) % world.n_items
    lines = [f"u{u},{world.item_ids[i]},play,{1.0e9 + 3600 * k}" for k, (u, i) in enumerate(zip(users, picks, strict=True))]
    (tmp_path / "inter.csv").write_text("user_id,item_id,event,timestamp\n" + "\n".join(lines) + "\n")
    upgrade(database_url)
    db = make_engine(database_url)
    try:
        registry.activate_config(db, toml, author="test")
        cfg = registry.require_active_config(db)
        upsert_items(db, read_catalog_csv(tmp_path / "items.csv", cfg.config.category_names).rows())
        jobs.import_file(db, tmp_path / "inter.csv")
        assert serving_since(db) is None
        st = load_state(db)
        assert st.fresh_items.size == 0 and st.new_items.size == 0
        eng = DecisionEngine(st)
        for k in range(60):
            d = eng.decide(f"u{k % 30}", f"after-import-{k}")
            assert "new_items" not in d.context

        # served decisions of several policies, and an import newer than all of them
        def row(rid, policy, ts):
            return {"request_id": rid, "ts": datetime.fromtimestamp(ts, tz=UTC), "user_id": "u0", "context": {},
                    "versions": {}, "policy": policy, "candidates": [], "pmf": [1.0], "chosen": 0, "propensity": 1.0,
                    "layout": [], "fallback_reason": None}

        t0 = datetime.now(tz=UTC).timestamp()  # serving begins after the catalog was loaded
        insert_decisions(db, [row("a", "vw", t0 + 0.05), row("b", "epsilon", t0 + 0.02), row("c", "vw", t0 + 0.01),
                              row("d", "fallback", t0 + 0.03), row("e", IMPORT_POLICY, t0 + 0.001)])
        with reading(db) as conn:
            got = conn.execute(sa.select(decisions.c.policy, decisions.c.ts)).all()
        want = min(ts for policy, ts in got if policy != IMPORT_POLICY).timestamp()
        assert serving_since(db) == pytest.approx(want, abs=1e-5) and want == pytest.approx(t0 + 0.01, abs=1e-5)
        # an item added now, after serving began, is fresh; the catalog loaded before it is not
        time.sleep(0.1)
        upsert_items(db, [{"item_id": "brand-new", "category": "songs", "popularity": 1.0, "features": [1.0, 1.0, 3.0]}])
        st = load_state(db)
        assert [st.catalog.id_list()[i] for i in st.fresh_items] == ["brand-new"]
    finally:
        db.dispose()


def _import_one_row_at_a_time(db, data, item_category, source):
    """The reference: one dict per decision and per event through insert_decisions / insert_feedback
    (how imports were written before they were built column-wise)."""
    import hashlib
    import math
    import struct
    from datetime import UTC, datetime

    from policy_api.log import insert_decisions, insert_feedback

    m64 = (1 << 64) - 1

    def mix(x):  # SplitMix64's finaliser on a Python int
        x = (x + 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        return x ^ (x >> 31)

    def sh(s):
        return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")

    def ident(ts, content):  # import:<microseconds + 2**62><content>, 16 hex digits each
        return f"import:{round(ts * 1e6) + (1 << 62):016x}{content:016x}"

    def bits(ts):
        return struct.unpack("<Q", struct.pack("<d", ts))[0]

    def dec_id(uid, ts):
        return ident(ts, mix(sh(uid) ^ mix(bits(ts))))

    def ev_id(uid, iid, ev, ts):
        return ident(ts, mix(mix(sh(uid) ^ mix(bits(ts))) ^ mix(sh(iid) ^ mix(sh(ev)))))

    groups: dict[tuple[str, float], list[int]] = {}
    for r in range(data["user_id"].size):
        groups.setdefault((str(data["user_id"][r]), float(data["ts"][r])), []).append(r)
    dec, fb = [], []
    for (uid, ts), rows in groups.items():
        rid = dec_id(uid, ts)
        shown = list(dict.fromkeys(str(data["item_id"][r]) for r in rows))
        when = datetime.fromtimestamp(ts, tz=UTC)
        dec.append({"request_id": rid, "ts": when, "user_id": uid, "context": {"source": source}, "versions": {},
                    "policy": "import", "candidates": [], "pmf": [1.0], "chosen": 0, "propensity": 1.0,
                    "layout": [{"slot": 0, "module_id": "import", "category": item_category[shown[0]], "tilt": 0.0,
                                "items": [{"item_id": i, "long_tail": False} for i in shown]}],
                    "fallback_reason": None})
        for r in rows:
            v = float(data["value"][r])
            fb.append({"event_id": ev_id(uid, str(data["item_id"][r]), str(data["event"][r]), ts),
                       "request_id": rid, "slot": 0, "item_id": str(data["item_id"][r]), "type": str(data["event"][r]),
                       "value": None if math.isnan(v) else v, "ts": when})
    insert_decisions(db, dec)
    insert_feedback(db, fb)


def test_import_stores_what_row_by_row_inserts_store(database_url, tmp_path):
    """The column-wise import writes exactly the rows a dict per row through insert_decisions and
    insert_feedback writes (every column but the feedback's receipt time), on SQLite and PostgreSQL;
    a second import of the same file adds nothing."""
    from policy_api import jobs
    from policy_api.log import decisions, feedback, make_engine, reading, upgrade

    rng = np.random.default_rng(5)
    world = make_world(n_users=40, n_items=80, seed=2)
    n = 3000
    ids = np.asarray(world.item_ids, dtype=object)
    cats = {str(i): world.categories[c] for i, c in zip(world.item_ids, world.item_category, strict=True)}
    # repeated (user, time) groups, an item twice in one group, fractional and whole seconds, values
    ts = 1.6e9 + rng.integers(0, 400, n) * np.where(rng.random(n) < 0.5, 1.0, 0.25)
    data = {"user_id": np.array([f"u{k}" for k in rng.integers(0, 40, n)], dtype=object),
            "item_id": ids[rng.integers(0, 80, n)], "event": np.array(["play", "skip", "favorite"], dtype=object)[
                rng.integers(0, 3, n)], "ts": ts, "value": np.where(rng.random(n) < 0.2, rng.random(n), np.nan)}
    upgrade(database_url)
    db = make_engine(database_url)

    def stored():
        with reading(db) as conn:
            dec = sorted(tuple(r) for r in conn.execute(sa.select(decisions)).all())
            fb = sorted(tuple(r)[1:-1] for r in conn.execute(sa.select(feedback)).all())  # less id, received_at
        return dec, fb

    try:
        groups = len(set(zip(data["user_id"].tolist(), ts.tolist(), strict=True)))
        seen = []
        assert jobs.import_rows(db, data, cats, "f.csv", progress=lambda r, t: seen.append((r, t)),
                                chunk_rows=500) == (groups, n)  # whole (user, time) groups, ~500 interactions at a time
        assert sum(r for r, _ in seen) == groups + n and {t for _, t in seen} == {groups + n}  # rows as written
        assert len(seen) >= 2 * (n // 500 - 1)  # chunk by chunk
        with reading(db) as conn:  # written in time order: each id index grew at its end
            written = conn.execute(sa.select(feedback.c.event_id, feedback.c.ts).order_by(feedback.c.id)).all()
        prefix = len("import:") + 16  # the time part of an id
        assert [e[:prefix] for e, _ in written] == sorted(e[:prefix] for e, _ in written)
        assert all(a[1] <= b[1] for a, b in zip(written, written[1:], strict=False)) and written[0][1] < written[-1][1]
        jobs.import_rows(db, data, cats, "f.csv")  # again: nothing added
        new = stored()
        with db.begin() as conn:
            conn.execute(sa.delete(decisions))
            conn.execute(sa.delete(feedback))
        _import_one_row_at_a_time(db, data, cats, "f.csv")
        ref = stored()
    finally:
        db.dispose()
    assert len(new[0]) == groups < n and len(new[1]) == n
    assert new == ref


def test_migration_0009_renames_what_an_earlier_import_wrote(database_url, tmp_path):
    """A log imported before ids led with their time (hash-only ids, revision 0008) is renamed by the
    upgrade to exactly the rows today's import writes, so importing the same file again adds nothing;
    the downgrade gives back the hash-only ids (computed here as the earlier import computed them)."""
    import hashlib

    from policy_api import jobs
    from policy_api.log import decisions, downgrade, feedback, make_engine, reading, upgrade

    def old(*parts):
        return "import:" + hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()

    rng = np.random.default_rng(9)
    world = make_world(n_users=20, n_items=50, seed=2)
    ids = np.asarray(world.item_ids, dtype=object)
    cats = {str(i): world.categories[c] for i, c in zip(world.item_ids, world.item_category, strict=True)}
    n = 600
    ts = 1.6e9 + rng.integers(0, 300, n) + np.where(rng.random(n) < 0.5, 0.0, 0.125)  # groups, fractions
    data = {"user_id": np.array([f"u{k}" for k in rng.integers(0, 20, n)], dtype=object),
            "item_id": ids[rng.integers(0, 50, n)], "event": np.array(["play", "skip", "favorite"], dtype=object)[
                rng.integers(0, 3, n)], "ts": ts, "value": np.full(n, np.nan)}

    def stored(db):
        with reading(db) as conn:
            return (sorted(tuple(r) for r in conn.execute(sa.select(decisions)).all()),
                    sorted(tuple(r)[1:-1] for r in conn.execute(sa.select(feedback)).all()))

    upgrade(database_url)
    db = make_engine(database_url)
    try:
        jobs.import_rows(db, data, cats, "f.csv")
        today = stored(db)
        downgrade(database_url, "0008")
        hash_only = stored(db)
        # the earlier import's names: a hash of (user, time) and of (user, item, event, time)
        by_new = {d[0]: old(d[2], repr(d[1].timestamp())) for d in today[0]}
        assert [d[0] for d in hash_only[0]] == sorted(by_new.values())
        user_of = {d[0]: d[2] for d in today[0]}
        assert sorted(f[0] for f in hash_only[1]) == sorted(
            old(user_of[f[1]], f[3], f[4], repr(f[6].timestamp())) for f in today[1])
        upgrade(database_url)
        assert stored(db) == today
        assert jobs.import_rows(db, data, cats, "f.csv")[1] == n and stored(db) == today  # nothing added
    finally:
        db.dispose()
    assert len(today[0]) < n and len(today[1]) == n
