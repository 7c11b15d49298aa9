"""The CLI's contract with the registry: jobs read the active config and never activate one; activating
is explicit (`homepage config apply`), audited, and refused for an infeasible config."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from policy_api import cli, registry
from policy_api.log import make_engine
from simulator import make_world


@pytest.fixture
def setup(tmp_path, monkeypatch):
    world = make_world(n_users=50, n_items=300, seed=0)
    cfg = tmp_path / "homepage.toml"
    cfg.write_text(world.default_config_toml())
    world.to_catalog_csv(tmp_path / "items.csv")
    url = f"sqlite:///{tmp_path / 'h.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("HOMEPAGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HOMEPAGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["catalog", "load", str(tmp_path / "items.csv"), "--config", str(cfg)]) == 0
    eng = make_engine(url)
    yield tmp_path, cfg, eng
    eng.dispose()


def _configs(eng: sa.Engine) -> list[tuple[int, str]]:
    with eng.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT version, status FROM configs ORDER BY version"))]


def test_jobs_never_activate_a_config(setup, capsys):
    tmp, cfg, eng = setup
    # no active config: the job says what to run and writes nothing (it used to activate ./homepage.toml)
    assert cli.main(["plan", "--users", "10"]) == 2
    assert "no active config in the database; apply one with `homepage config apply FILE`" in capsys.readouterr().err
    assert _configs(eng) == []
    assert cli.main(["config", "apply", str(cfg), "--note", "first"]) == 0
    assert "active as version 1" in capsys.readouterr().out
    rec = registry.active_config(eng)
    plan = registry.latest_plan(eng)
    assert rec is not None and rec.version == 1 and rec.note == "first" and rec.body == cfg.read_text()
    assert plan is not None and plan.config_version == 1 and set(plan.prices) == {"live_floor", "long_tail"}
    # a job given another config refuses; what is served does not change
    other = tmp / "other.toml"
    other.write_text(cfg.read_text().replace("budget = 0.05", "budget = 0.1"))
    for job in (["plan", "--users", "10"], ["train"], ["valuation", "refit"]):
        assert cli.main([*job, "--config", str(other)]) == 2
        err = capsys.readouterr().err
        assert f"--config {other} is not the active config (the active config is version 1)" in err, job
    assert _configs(eng) == [(1, "active")]
    # the active config itself is accepted
    assert cli.main(["plan", "--users", "10", "--config", str(cfg)]) == 0
    assert registry.latest_plan(eng).version == 2


def test_config_apply_refuses_an_infeasible_config(setup, capsys):
    tmp, cfg, eng = setup
    assert cli.main(["config", "apply", str(cfg)]) == 0
    bad = tmp / "bad.toml"
    # live at least 90 % of exposure and long tail at least 95 % cannot both hold on this catalog
    bad.write_text(cfg.read_text().replace("min = 0.1", "min = 0.9").replace("min = 0.25", "min = 0.95"))
    capsys.readouterr()
    assert cli.main(["config", "apply", str(bad)]) == 3
    assert "its constraints cannot all hold; nothing applied" in capsys.readouterr().err
    assert _configs(eng) == [(1, "active")]
    missing = tmp / "nope.toml"
    assert cli.main(["config", "apply", str(missing)]) == 2
    assert f"config file not found: {str(missing)!r}" in capsys.readouterr().err


def test_an_unreachable_or_unsupported_database_is_one_line(monkeypatch, capsys, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/test")
    monkeypatch.setenv("HOMEPAGE_DB_CONNECT_TIMEOUT", "2")
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"homepage: error: DATABASE_URL: cannot reach the database at postgresql://postgres@127.0.0.1:{port}/test")
    assert "Connection refused" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("DATABASE_URL", "mysql://x/y")
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("homepage: error: DATABASE_URL: url must be sqlite:///<path> or postgresql[+psycopg]://...; "
                           "got 'mysql://x/y'")
