"""`homepage import`: bad lines are named, rows become log entries, re-imports add nothing."""

from __future__ import annotations

import os
import subprocess
import sys

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
