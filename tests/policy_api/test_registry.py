"""The registry on SQLite and PostgreSQL: configs, plans and models as typed records, one publish rule,
rollback, history, and gap-free model versions under concurrent publishers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import sqlalchemy as sa

from allocator import parse_config_text
from policy_api.errors import InvalidConfig, InvalidInput, NotFound, NotReady
from policy_api.log import make_engine, models, upgrade
from policy_api.registry import (
    RankerArtifact,
    Versions,
    activate_config,
    activate_version,
    active_config,
    config_history,
    latest_plan,
    latest_versions,
    model,
    model_history,
    pack_ranker,
    plan_history,
    prices,
    publish_model,
    publish_plan,
    require_active_config,
    unpack_ranker,
)

from ..allocator.test_config import EXAMPLE


@pytest.fixture
def engine(database_url):
    upgrade(database_url)
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def _cfg(budget: float) -> str:
    body = EXAMPLE.replace("budget = 0.05 ", f"budget = {budget} ")
    assert body != EXAMPLE or budget == 0.05
    return body


def test_config_and_plan_registry(engine):
    assert active_config(engine) is None and latest_plan(engine) is None
    assert latest_versions(engine) == Versions(config=None, plan=None, models={})
    with pytest.raises(NotReady, match=r"no active config in the database; apply one with `homepage config apply"):
        require_active_config(engine)
    a, b = _cfg(0.05), _cfg(0.2)
    v1 = activate_config(engine, a, author="ops", note="first")
    v2 = activate_config(engine, b, author="ops", projection={"value": 1.5, "shares": [0.2, 0.3]})
    rec = active_config(engine)
    assert (v1, v2) == (1, 2) and rec is not None and (rec.version, rec.body) == (2, b)
    assert rec.projection == {"value": 1.5, "shares": [0.2, 0.3]} and rec.author == "ops"
    assert rec.config == parse_config_text(b)  # the record carries the parsed config
    v3 = activate_version(engine, 1, author="ops")  # roll back to the first: a new, audited version
    rec = active_config(engine)
    assert v3 == 3 and rec is not None and (rec.version, rec.body) == (3, a) and "rollback to version 1" in rec.note
    with engine.connect() as conn:
        status = dict(conn.execute(sa.text("SELECT version, status FROM configs")).all())
    assert status == {1: "superseded", 2: "superseded", 3: "active"}
    assert [c.version for c in config_history(engine)] == [3, 2, 1]
    with pytest.raises(NotFound, match=r"config version must exist in the registry; got 42"):
        activate_version(engine, 42, author="ops")
    with pytest.raises(InvalidConfig, match=r"exploration.budget"):  # an invalid config is never stored
        activate_config(engine, _cfg(2.0), author="ops")
    assert active_config(engine).version == 3
    with pytest.raises(InvalidInput, match=r"status must be one of \('active', 'superseded', 'rejected'\); got 'live'"):
        publish_plan(engine, 3, {"live_floor": 0.1}, status="live")
    p1 = publish_plan(engine, 3, {"live_floor": 0.4}, projected={"value": 1.0}, solver={"iterations": 12})
    p2 = publish_plan(engine, 3, {"live_floor": 0.7, "long_tail": -0.1}, projected={"value": 0.9, "shares": [0.3]},
                      solver={"gap": 1e-7})
    plan = latest_plan(engine)
    assert (p1, p2) == (1, 2) and plan is not None
    assert plan.version == 2 and plan.prices == {"live_floor": 0.7, "long_tail": -0.1}
    assert plan.solver == {"gap": 1e-7} and plan.created_at is not None and plan.created_at.tzinfo is not None
    assert latest_plan(engine, config_version=2) is None  # the active plan belongs to config 3
    cfg = active_config(engine)
    vec, used = prices(engine, cfg)
    # in the config's constraint order: (live_floor, long_tail)
    np.testing.assert_array_equal(vec, [0.7, -0.1])
    assert used is not None and used.version == 2
    assert [p.version for p in plan_history(engine)] == [2, 1]
    publish_model(engine, "bandit", {"loss": 0.2}, b"b1")
    publish_model(engine, "ranker", {"auc": 0.7}, b"r1", status="rejected")
    assert latest_versions(engine) == Versions(config=3, plan=2, models={"bandit": 1})
    assert model(engine, "ranker") is None
    assert [(m.name, m.version, m.status, m.artifact) for m in model_history(engine)] == [
        ("ranker", 1, "rejected", None), ("bandit", 1, "published", None)]
    got = model(engine, "bandit", 1)
    assert got is not None and got.artifact == b"b1" and got.metrics == {"loss": 0.2}


def test_a_plan_for_a_config_no_longer_active_never_replaces_the_active_configs_plan(engine):
    # a pacer that started a step under config 1 publishes after config 2 and its plan were applied
    v1 = activate_config(engine, _cfg(0.05), author="ops")
    publish_plan(engine, v1, {"live_floor": 0.1})
    v2 = activate_config(engine, _cfg(0.2), author="ops")
    p2 = publish_plan(engine, v2, {"live_floor": 0.5})
    late = publish_plan(engine, v1, {"live_floor": 0.2})
    plan = latest_plan(engine, config_version=v2)
    assert plan is not None and plan.version == p2 and plan.prices == {"live_floor": 0.5}
    np.testing.assert_array_equal(prices(engine, active_config(engine))[0], [0.5, 0.0])
    with engine.connect() as conn:
        status = dict(conn.execute(sa.text("SELECT version, status FROM plans")).all())
    assert status == {1: "superseded", p2: "active", late: "superseded"}  # recorded, not in force
    assert latest_versions(engine).plan == p2
    # a plan for the active config still supersedes, and one for no config in particular too
    p4 = publish_plan(engine, v2, {"live_floor": 0.6})
    assert latest_plan(engine, config_version=v2).version == p4
    p5 = publish_plan(engine, None, {"live_floor": 0.7})
    assert latest_plan(engine).version == p5


def test_ranker_artifact_round_trip():
    art = RankerArtifact(scorer=b"\x00torch bytes\xff", user_ids=["u1", "u2"], item_ids=["i9"],
                         categories=["songs", "live"])
    packed = pack_ranker(art)
    assert packed.startswith(b"HPRANKER1\n") and unpack_ranker(packed) == art
    with pytest.raises(InvalidInput, match=r"ranker artifact must start with the HPRANKER1 header; got b'PK"):
        unpack_ranker(b"PK\x03\x04 a zip file")


def test_publish_model_versions_increase_per_name_under_concurrency(engine):
    n_per_thread = 12
    errors: list[BaseException] = []
    got: dict[str, list[int]] = {"ranker": [], "bandit": []}

    def publisher(name: str, tag: str) -> None:
        try:
            for i in range(n_per_thread):
                v = publish_model(engine, name, {"tag": tag, "i": i}, f"{tag}-{i}".encode())
                got[name].append(v)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=args) for args in
               (("ranker", "a"), ("ranker", "b"), ("bandit", "c"))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(got["ranker"]) == list(range(1, 2 * n_per_thread + 1))
    assert sorted(got["bandit"]) == list(range(1, n_per_thread + 1))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(models.c.name, models.c.version, models.c.artifact)).all()
    newest = max((r for r in rows if r.name == "ranker"), key=lambda r: r.version)
    rec = model(engine, "ranker")
    assert rec is not None
    version, metrics, artifact = rec.version, rec.metrics, rec.artifact
    assert (version, artifact) == (2 * n_per_thread, bytes(newest.artifact))
    assert f"{metrics['tag']}-{metrics['i']}".encode() == artifact


