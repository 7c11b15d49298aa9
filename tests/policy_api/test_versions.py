"""`homepage versions list|diff|rollback` on a real SQLite database, through the CLI's entry point
(in-process: the same argparse, jobs and exit codes as the `homepage` command)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess

import pytest

from policy_api import registry
from policy_api.cli import main
from policy_api.log import make_engine
from simulator import make_world


def homepage(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if not k.startswith("_")})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    res = subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())
    if check:
        assert rc == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    world = make_world(n_users=30, n_items=200, seed=5)
    env = {"DATABASE_URL": f"sqlite:///{tmp / 'homepage.db'}", "HOMEPAGE_DATA_DIR": str(tmp)}
    v1 = tmp / "v1.toml"
    v1.write_text(world.default_config_toml())
    text = v1.read_text()
    assert 'category = "live"\nmin = 0.1\n' in text
    v2 = tmp / "v2.toml"
    v2.write_text(text.replace('category = "live"\nmin = 0.1\n', 'category = "live"\nmin = 0.2\n'))
    world.to_catalog_csv(tmp / "items.csv")
    homepage("db", "upgrade", env=env)
    homepage("catalog", "load", str(tmp / "items.csv"), "--config", str(v1), env=env)
    homepage("config", "apply", str(v1), "--users", "50", env=env)
    homepage("config", "apply", str(v2), "--users", "50", env=env)
    env["_V1"], env["_V2"] = str(v1), str(v2)
    return env


def db(env):
    return make_engine(env["DATABASE_URL"])


def test_list_shows_every_kind_newest_first(env):
    out = homepage("versions", "list", env=env).stdout
    assert "configs (active: 2)" in out and "plans (active:" in out and "ranker models" in out
    versions = [int(m) for m in re.findall(r"^\s+(\d+)\s+(?:active|superseded)\s", out, re.M)]
    assert versions[:2] == [2, 1]


def test_diff_names_exactly_the_changed_key(env):
    out = homepage("versions", "diff", "config", "1", "2", env=env).stdout
    assert out.strip().splitlines() == ["constraints.live_floor.min  0.1 -> 0.2"]
    # against a proposed file: the TOML diff and the pointer to its dry run
    out = homepage("versions", "diff", "config", "2", env["_V1"], "--text", env=env).stdout
    assert "-min = 0.2\n+min = 0.1\n" in out and "homepage config check" in out
    assert "constraints.live_floor.min  0.2 -> 0.1" in out
    assert homepage("versions", "diff", "config", "1", "1", env=env).stdout.strip() == "no difference"
    bad = homepage("versions", "diff", "config", "one", "2", env=env, check=False)
    assert bad.returncode == 2 and "A must be a version number" in bad.stderr and "'one'" in bad.stderr
    missing = homepage("versions", "diff", "config", "1", "99", env=env, check=False)
    assert missing.returncode == 2 and "got 99" in missing.stderr


def test_rollback_config_republishes_the_old_text_with_a_plan(env):
    out = homepage("versions", "rollback", "config", "1", "--users", "50", env=env).stdout
    m = re.search(r"active again as version (\d+) \(was 2\); plan version (\d+)", out)
    assert m, out
    new, plan = int(m.group(1)), int(m.group(2))
    e = db(env)
    try:
        active = registry.require_active_config(e)
        assert active.version == new and active.body == registry.config_version(e, 1).body
        assert active.note == "rollback to version 1"
        p = registry.latest_plan(e)
        assert p is not None and p.version == plan and p.config_version == new
        # the old plan of config 1 cannot be rolled back onto config 3 (a different version)
        old_plan = [x for x in registry.plan_history(e) if x.config_version == 1][0]
    finally:
        e.dispose()
    r = homepage("versions", "rollback", "plan", str(old_plan.version), env=env, check=False)
    assert r.returncode != 0 and f"made for config version 1, but config version {new} is active" in r.stderr


def test_rollback_plan_and_model(env):
    e = db(env)
    try:
        active = registry.require_active_config(e)
        names = active.config.constraint_names
        first = registry.publish_plan(e, active.version, {n: 0.5 for n in names})
        registry.publish_plan(e, active.version, {n: -0.25 for n in names})
        registry.publish_model(e, "bandit", {"rounds": 10}, b"model-one")
        registry.publish_model(e, "bandit", {"rounds": 20}, b"model-two")
    finally:
        e.dispose()
    out = homepage("versions", "rollback", "plan", str(first), env=env).stdout
    new_plan = int(re.search(r"active again as version (\d+)", out).group(1))
    diff = homepage("versions", "diff", "bandit", "1", "2", env=env).stdout
    assert diff.strip().splitlines() == ["rounds  10 -> 20"]
    out = homepage("versions", "rollback", "bandit", "1", env=env).stdout
    assert "bandit version 1 served again as version 3" in out
    e = db(env)
    try:
        p = registry.latest_plan(e)
        assert p is not None and p.version == new_plan and p.prices == {n: 0.5 for n in names}
        m = registry.model(e, "bandit")
        assert m is not None and m.version == 3 and m.artifact == b"model-one" and m.metrics["rollback_of"] == 1
        assert registry.latest_versions(e).models["bandit"] == 3
    finally:
        e.dispose()
    listed = homepage("versions", "list", "bandit", env=env).stdout
    assert "bandit models (served: 3)" in listed and "rollback to version 1" in listed
