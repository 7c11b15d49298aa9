"""`homepage versions list|diff|rollback` on a real SQLite database, through the CLI's entry point
(in-process: the same argparse, jobs and exit codes as the `homepage` command)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

from policy_api import registry
from policy_api.cli import build_parser, main
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


# ---- the same by kind: config history|diff|rollback, models list|show|rollback, plans list --------
def real_cli(*args: str, env: dict[str, str]) -> str:
    """The `homepage` command in its own process; its stdout (a failure shows its stderr)."""
    r = subprocess.run([sys.executable, "-m", "policy_api.cli", *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **{k: v for k, v in env.items() if not k.startswith("_")}})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def rows_of(out: str) -> list[list[str]]:
    """The table rows of a listing: lines that start with a version number."""
    return [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s", line)]


def test_config_history_lists_the_registry(env):
    out = real_cli("config", "history", "--limit", "50", env=env)
    e = db(env)
    try:
        want = registry.config_history(e, limit=50)
        active = registry.require_active_config(e).version
    finally:
        e.dispose()
    assert f"configs (active: {active})" in out
    rows = rows_of(out)
    assert [int(r[0]) for r in rows] == [c.version for c in want]
    assert [r[1] for r in rows] == [c.status for c in want]
    lines = [line for line in out.splitlines() if re.match(r"^\s+\d+\s", line)]
    for line, c in zip(lines, want, strict=True):
        assert line.rstrip().endswith(c.note) and c.author[:12] in line
    assert rows_of(homepage("config", "history", "--limit", "1", env=env).stdout) == rows[:1]


def test_config_diff_and_rollback_by_name(env):
    e = db(env)
    try:
        one, two = registry.config_version(e, 1), registry.config_version(e, 2)
        before = registry.require_active_config(e).version
    finally:
        e.dispose()
    want = [f"{k}  {a} -> {b}" for k, a, b in registry.mapping_diff(one.config.to_dict(), two.config.to_dict())]
    assert homepage("config", "diff", "1", "2", env=env).stdout.strip().splitlines() == want
    assert homepage("config", "diff", "1", "2", env=env).stdout == homepage("versions", "diff", "config", "1", "2",
                                                                            env=env).stdout
    text = homepage("config", "diff", "1", env["_V2"], "--text", env=env).stdout
    assert "-min = 0.1\n+min = 0.2\n" in text and want[0] in text
    out = homepage("config", "rollback", "2", "--users", "50", "--author", "ops", env=env).stdout
    m = re.search(rf"config version 2 active again as version (\d+) \(was {before}\); plan version (\d+)", out)
    assert m, out
    e = db(env)
    try:
        active = registry.require_active_config(e)
        assert active.version == int(m.group(1)) == before + 1
        assert active.body == two.body and active.author == "ops" and active.note == "rollback to version 2"
        assert registry.latest_plan(e).version == int(m.group(2))
    finally:
        e.dispose()
    bad = homepage("config", "rollback", "99", env=env, check=False)
    assert bad.returncode == 2 and "got 99" in bad.stderr


def test_models_list_show_and_rollback(env):
    e = db(env)
    try:
        registry.publish_model(e, "ranker", {"auc": 0.71, "served": {"kind": "debiased"}}, b"ranker-one")
        registry.publish_model(e, "ranker", {"auc": 0.69}, None, status="rejected")
        back_to = registry.publish_model(e, "bandit", {"rounds": 30}, b"model-three")
        registry.publish_model(e, "bandit", {"rounds": 40}, b"model-four")
        want = {k: registry.model_history(e, k, limit=50) for k in ("ranker", "bandit")}
        served = registry.latest_versions(e).models
    finally:
        e.dispose()
    out = real_cli("models", "list", env=env)
    blocks = dict(re.findall(r"^(ranker|bandit) models \(served: (\S+)\)$", out, re.M))
    assert blocks == {k: str(served.get(k)) if k in served else "None" for k in ("ranker", "bandit")}
    ranker_part, bandit_part = out.split("bandit models")
    for kind, part in (("ranker", ranker_part), ("bandit", bandit_part)):
        assert [(int(r[0]), r[1]) for r in rows_of(part)] == [(m.version, m.status) for m in want[kind]]
    only = homepage("models", "list", "bandit", "--limit", "2", env=env).stdout
    assert "ranker" not in only and [int(r[0]) for r in rows_of(only)] == [m.version for m in want["bandit"][:2]]

    ranker = want["ranker"][-1]  # the first one published here
    show = homepage("models", "show", "ranker", str(ranker.version), env=env).stdout
    assert f"ranker version {ranker.version}\n" in show
    assert f"  artifact  {len(b'ranker-one')} bytes" in show and "  status    published" in show
    assert re.search(r"^\s+auc\s+0\.71$", show, re.M) and re.search(r"^\s+served\.kind\s+debiased$", show, re.M)
    rejected = homepage("models", "show", "ranker", str(want["ranker"][0].version), env=env).stdout
    assert "  status    rejected" in rejected and "  artifact  (none)" in rejected
    missing = homepage("models", "show", "bandit", "999", env=env, check=False)
    assert missing.returncode == 2 and "got 999" in missing.stderr

    out = homepage("models", "rollback", "bandit", str(back_to), env=env).stdout
    new = int(re.search(rf"bandit version {back_to} served again as version (\d+)", out).group(1))
    e = db(env)
    try:
        m = registry.model(e, "bandit")
        assert m is not None and m.version == new == want["bandit"][0].version + 1
        assert m.artifact == b"model-three" and m.metrics == {"rounds": 30, "rollback_of": back_to}
    finally:
        e.dispose()
    # a rejected version has nothing to serve
    r = homepage("models", "rollback", "ranker", str(want["ranker"][0].version), env=env, check=False)
    assert r.returncode == 2 and "must be a published ranker" in r.stderr


def test_plans_list_shows_versions_configs_and_prices(env):
    out = real_cli("plans", "list", "--limit", "5", env=env)
    e = db(env)
    try:
        want = registry.plan_history(e, limit=5)
        active = registry.latest_versions(e).plan
    finally:
        e.dispose()
    assert f"plans (active: {active})" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert want and len(rows) == len(want)
    for line, p in zip(rows, want, strict=True):
        version, config = line.split()[:2]
        assert int(version) == p.version and config == str(p.config_version)
        prices = dict(kv.split("=") for kv in line.split(None, 5)[5].split(", "))
        assert {k: float(v) for k, v in prices.items()} == pytest.approx(p.prices, rel=1e-3, abs=1e-9)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("homepage",)):
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from walk(sub, (*path, name))


def test_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapped lines
    seen = set()
    for path, parser in walk(build_parser()):
        seen.add(" ".join(path[1:]))
        text = parser.format_help()
        for a in parser._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{' '.join(path)} {a.option_strings[0]} has no help text"
            if a.required or a.default == "":  # said in words in the help text instead
                continue
            shown = f"(default: {a.default})"
            assert shown in text, f"`{' '.join(path)} --help` does not show {a.option_strings[0]}'s {shown}"
        assert "(default: )" not in text, " ".join(path)
    assert {"config history", "config diff", "config rollback", "models list", "models show", "models rollback",
            "plans list", "versions list"} <= seen
    # and the installed command says the same
    out = real_cli("config", "rollback", "--help", env={"COLUMNS": "2000"})
    assert "recent users to dry-run the plan on (default: 500)" in out and "(default: cli)" in out
