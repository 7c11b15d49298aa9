"""Config changes as background jobs, against a real `homepage serve` (gunicorn, 2 workers) on SQLite and
on PostgreSQL: PUT /config, POST /config/rollback and POST /config/dry-run answer 202 at once while a
worker's job thread plans; any worker reports the job from the database; one apply at a time per
database; a job whose worker is killed is reported lost; layouts keep being served meanwhile.

The reference for every job's numbers is a direct call of the job functions (``jobs.apply_config``,
``jobs.check_config``) in the test process, on the same database."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from policy_api import jobs, registry
from policy_api.errors import Infeasible
from policy_api.log import config_jobs, decisions, make_engine
from simulator import make_world

from ..conftest import _postgres_admin_url
from .test_api import free_port, homepage

AUTH = {"Authorization": "Bearer sesame"}
LOST_S = 5.0  # HOMEPAGE_CONFIG_JOB_LOST_S given to the server
FINAL = ("done", "failed", "lost")
LIVE_MIN = re.compile(r'(name = "live_floor"\nkind = "category_share"\ncategory = "live"\nmin = )[0-9.]+')


class JobServer:
    """`homepage serve --no-loop` (nothing but these tests changes the registry) on ``url``."""

    def __init__(self, tmp: Path, url: str) -> None:
        world = make_world(n_users=50, n_items=400, seed=3)
        self.dir, self.url_db = tmp, url
        self.env = dict(os.environ, DATABASE_URL=url, HOMEPAGE_DATA_DIR=str(tmp), HOMEPAGE_RELOAD_S="0.5",
                        HOMEPAGE_OPERATOR_TOKEN="sesame", HOMEPAGE_CONFIG_JOB_LOST_S=str(LOST_S))
        self.env.pop("HOMEPAGE_OPS_TOKEN", None)
        self.config = tmp / "homepage.toml"
        self.config.write_text(world.default_config_toml())
        world.to_catalog_csv(tmp / "items.csv")
        homepage("db", "upgrade", env=self.env)
        homepage("catalog", "load", str(tmp / "items.csv"), "--config", str(self.config), env=self.env)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.logfile = tmp / "server.log"
        self.log = self.logfile.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--config", str(self.config),
                                      "--port", str(port), "--workers", "2", "--no-loop"],
                                     env=self.env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT)
        self.db = make_engine(url)
        deadline = time.time() + 120  # a loaded 2-core machine may take a while to start 3 processes
        while True:
            assert self.proc.poll() is None, self.logfile.read_text()[-3000:]
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, self.logfile.read_text()[-3000:]
            time.sleep(0.2)

    def body(self, live_min: float) -> str:
        text = LIVE_MIN.sub(rf"\g<1>{live_min}", self.config.read_text())
        assert f"min = {live_min}\n" in text
        return text

    def job(self, job_id: str, sess: Any = requests) -> dict[str, Any]:
        r = sess.get(f"{self.url}/config/jobs/{job_id}", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def wait_job(self, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in FINAL:
                return job
            assert time.time() < deadline, job
            time.sleep(0.2)

    def active_version(self) -> int:
        rec = registry.active_config(self.db)
        assert rec is not None
        return rec.version

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()
        self.db.dispose()
        log = self.logfile.read_text(errors="replace")
        for sign in ("unhandled error", "Error handling request", "bookkeeping failed"):
            assert sign not in log, log[-3000:]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobServer]:
    tmp = tmp_path_factory.mktemp(f"jobs-{request.param}")
    admin, schema = None, ""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'homepage.db'}"
    else:
        base = _postgres_admin_url()
        if base is None:
            pytest.skip("postgres tests need HOMEPAGE_TEST_POSTGRES_URL (unset)")
        admin = sa.create_engine(base)
        schema = f"jobs_{uuid.uuid4().hex[:10]}"
        with admin.begin() as c:
            c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    s = JobServer(tmp, url)
    try:
        sess = requests.Session()
        for k in range(60):  # some traffic to plan on
            assert sess.get(s.url + "/layout", params={"user_id": f"u{k % 30:05d}"}, timeout=10).status_code == 200
        _more_users(s.db, 1500)
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()
        if admin is not None:
            with admin.begin() as c:
                c.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
                c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def _more_users(db: sa.Engine, n: int) -> None:
    """Copies of a served decision for ``n`` other users: a config's dry run plans on 500 users drawn from
    traffic (about a second of work, as in production), not on the 30 users of the setup."""
    deadline = time.time() + 30
    while True:
        with db.connect() as c:
            row = c.execute(sa.select(decisions).limit(1)).first()
        if row is not None:
            break
        assert time.time() < deadline, "no decision was logged"
        time.sleep(0.2)
    base = dict(row._mapping)
    with db.begin() as c:
        c.execute(decisions.insert(), [{**base, "request_id": f"bulk-{k}", "user_id": f"bulk{k:05d}"}
                                       for k in range(n)])


def _approx_plan(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["value"] == pytest.approx(want["value"], rel=1e-6)
    assert got["shares"] == pytest.approx(want["shares"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_put_answers_202_at_once_and_its_job_matches_a_direct_apply(srv):
    body = srv.body(0.3)
    before = srv.active_version()
    time.sleep(1.0)  # the layouts of the setup are in the log: the job and the reference sample the same users
    t0 = time.perf_counter()
    r = requests.put(srv.url + "/config", data=body, headers={**AUTH, "X-Operator": "alice"}, timeout=30)
    took = time.perf_counter() - t0
    assert r.status_code == 202, r.text
    acc = r.json()
    assert set(acc) == {"job_id", "kind", "status", "status_url"} and acc["kind"] == "apply"
    assert acc["status"] in ("queued", "running")
    assert r.headers["Location"] == acc["status_url"] == f"/config/jobs/{acc['job_id']}"
    job = srv.wait_job(acc["job_id"])
    assert job["status"] == "done", job
    assert job["author"] == "alice" and job["owner"].rsplit(":", 1)[1].isdigit() and job["toml"] == body
    # answered while the job was still queued or running (its status above), within a small bound
    assert took < 2.0 and _ts(job["finished_at"]) > _ts(job["created_at"]), took
    res = job["result"]
    assert set(res) == {"version", "plan_version", "previous_version", "projection", "prices", "warnings"}
    assert res["previous_version"] == before and res["version"] > before
    # every worker serves the new config (GET /config logs no decision: the sample stays the same)
    deadline = time.time() + 15
    while {requests.get(srv.url + "/config", timeout=5).json()["version"] for _ in range(6)} != {res["version"]}:
        assert time.time() < deadline
        time.sleep(0.2)
    # the reference: the same apply, called directly on the same database, lands on top of it
    ref = jobs.apply_config(srv.db, body, author="reference", note="reference")
    assert ref.previous_version == res["version"] and ref.version == res["version"] + 1
    _approx_plan(res["projection"], ref.plan.projected)
    assert res["prices"] == pytest.approx(ref.plan.prices, rel=1e-6, abs=1e-9)
    assert res["warnings"] == list(ref.warnings)
    with srv.db.connect() as c:
        row = c.execute(sa.select(config_jobs).where(config_jobs.c.id == acc["job_id"])).one()._mapping
    assert row["status"] == "done" and row["apply_slot"] is None and row["kind"] == "apply"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_dry_run_diffs_and_projects_without_activating(srv):
    rec = registry.active_config(srv.db)
    assert rec is not None
    active = {"version": rec.version, "config": rec.config.to_dict()}
    old_min = next(c["min"] for c in active["config"]["constraints"] if c["name"] == "live_floor")
    body = srv.body(0.25)
    r = requests.post(srv.url + "/config/dry-run", data=body, headers={**AUTH, "Prefer": "wait=30"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["Preference-Applied"] == "wait=30"
    out = r.json()
    assert out["feasible"] is True and out["current"]["version"] == active["version"]
    assert out["diff"] == [{"key": "constraints.live_floor.min", "old": old_min, "new": 0.25}]
    assert "-min = " in out["text_diff"] and "+min = 0.25" in out["text_diff"]
    ref = jobs.check_config(srv.db, registry.parse_body(body), users=500, seed=0)
    _approx_plan(out["projection"], ref.proposed.projected)
    assert ref.current is not None
    _approx_plan(out["current"]["projection"], ref.current.projected)
    assert srv.active_version() == active["version"]  # never activates
    job = srv.job(out["job_id"])
    assert job["kind"] == "dry_run" and job["status"] == "done" and job["result"]["diff"] == out["diff"]
    # the JSON form of the body, without waiting: 202, then the job
    r = requests.post(srv.url + "/config/dry-run", json={"toml": body}, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    assert srv.wait_job(r.json()["job_id"])["result"]["diff"] == out["diff"]


def test_invalid_config_is_400_at_once_naming_the_key(srv):
    for path, method in (("/config", "put"), ("/config/dry-run", "post")):
        bad = srv.config.read_text().replace("budget = 0.05", "budget = 5")
        r = requests.request(method, srv.url + path, data=bad, headers=AUTH, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["field"] == "exploration.budget" and "got 5" in err["message"]
        r = requests.request(method, srv.url + path, data=srv.config.read_text(), timeout=30)
        assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"


def test_layouts_are_served_while_jobs_run_on_the_same_worker(srv):
    sess = requests.Session()  # one kept-alive connection: one worker
    body = srv.body(0.2)
    ids = []
    for _ in range(3):  # queued one after another on this worker's job thread
        r = sess.post(srv.url + "/config/dry-run", data=body, headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    owners = {srv.job(i, sess)["owner"] for i in ids}
    assert len(owners) == 1
    assert str(sess.get(srv.url + "/exposure", timeout=10).json()["aggregate"]["worker"]) == \
        owners.pop().rsplit(":", 1)[1]  # the layouts below go to the worker that runs the jobs
    during, worst = 0, 0.0
    while True:
        before = [srv.job(i, sess)["status"] for i in ids]
        if all(s in FINAL for s in before):
            break
        t0 = time.perf_counter()
        r = sess.get(srv.url + "/layout", params={"user_id": f"u{during % 30:05d}"}, timeout=30)
        took = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        after = [srv.job(i, sess)["status"] for i in ids]
        if any(b == "running" and a == "running" for b, a in zip(before, after, strict=True)):
            during += 1  # served while a job was running on this worker
            worst = max(worst, took)
    assert [srv.job(i)["status"] for i in ids] == ["done"] * 3
    assert during >= 3, during
    assert worst < 2.0, worst  # a layout never waits for a job (a dry run takes about a second or more)


def test_one_apply_at_a_time_per_database(srv):
    sess = requests.Session()  # a dry run first: the apply waits behind it on this worker's job thread
    assert sess.post(srv.url + "/config/dry-run", data=srv.body(0.2), headers=AUTH, timeout=30).status_code == 202
    first = sess.put(srv.url + "/config", data=srv.body(0.21), headers=AUTH, timeout=30)
    assert first.status_code == 202, first.text
    fid = first.json()["job_id"]
    for path, kw in (("/config", {"data": srv.body(0.22)}), ("/config/rollback", {"json": {"version": 1}})):
        r = requests.request("PUT" if path == "/config" else "POST", srv.url + path, headers=AUTH, timeout=30, **kw)
        assert r.status_code == 409, r.text
        out = r.json()
        assert out["error"]["code"] == "conflict" and out["error"]["field"] == "config"
        assert out["job_id"] == fid and fid in out["error"]["message"]
    # dry runs are not held up
    r = requests.post(srv.url + "/config/dry-run", data=srv.body(0.22), headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    done = srv.wait_job(fid)
    assert done["status"] == "done"
    # once it has finished the next one goes; Prefer: wait gives the final answer directly
    r = requests.post(srv.url + "/config/rollback", json={"version": 1}, headers={**AUTH, "Prefer": "wait=30"},
                      timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["rolled_back_to"] == 1 and out["previous_version"] == done["result"]["version"]
    assert srv.active_version() == out["version"]
    assert registry.config_version(srv.db, out["version"]).body == registry.config_version(srv.db, 1).body


def test_infeasible_apply_fails_and_changes_nothing(srv):
    before = srv.active_version()
    body = srv.body(0.97)
    with pytest.raises(Infeasible) as ref:  # the reference: a direct apply refuses it too
        jobs.apply_config(srv.db, body, author="reference", note="reference")
    r = requests.put(srv.url + "/config", data=body, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    job = srv.wait_job(r.json()["job_id"])
    assert job["status"] == "failed" and job["result"] is None
    err = job["error"]
    assert err["error"]["code"] == "infeasible" and err["error"]["field"] == "constraints"
    assert err["conflicting"] == ref.value.details["conflicting"] and "live_floor" in err["conflicting"]
    assert srv.active_version() == before
    # with Prefer: wait, the answer is the synchronous one: 409 infeasible, the diagnosis inside
    r = requests.put(srv.url + "/config", data=body, headers={**AUTH, "Prefer": "respond-async, wait=30"},
                     timeout=60)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "infeasible" and r.json()["relaxations"] == ref.value.details["relaxations"]
    assert srv.active_version() == before
    # every worker serves the active version (a worker picks up what another applied within its reload
    # interval, 0.5 s here: the module's earlier tests changed it)
    deadline = time.monotonic() + 10.0
    served = [requests.get(srv.url + "/config", timeout=5).json()["version"] for _ in range(4)]
    while set(served) != {before} and time.monotonic() < deadline:
        time.sleep(0.2)
        served = [requests.get(srv.url + "/config", timeout=5).json()["version"] for _ in range(4)]
    assert set(served) == {before}, served


def test_jobs_are_listed_unknown_ids_are_404_and_reads_need_a_token(srv):
    r = requests.get(srv.url + "/config/jobs/no-such-job", headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"
    r = requests.get(srv.url + "/config/jobs/no-such-job", timeout=10)
    assert r.status_code == 401
    r = requests.get(srv.url + "/config/jobs", params={"limit": 3}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    listed = r.json()["jobs"]
    with srv.db.connect() as c:
        want = c.execute(sa.select(config_jobs.c.id).order_by(config_jobs.c.created_at.desc(),
                                                              config_jobs.c.id).limit(3)).scalars().all()
    assert [j["job_id"] for j in listed] == want and "toml" not in listed[0]
    for bad in ("0", "101", "many"):
        r = requests.get(srv.url + "/config/jobs", params={"limit": bad}, headers=AUTH, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["field"] == "limit"


def test_a_job_whose_worker_is_killed_is_reported_lost_and_frees_the_slot(srv):
    sess = requests.Session()
    r = sess.post(srv.url + "/config/dry-run", data=srv.body(0.23), headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    r = sess.put(srv.url + "/config", data=srv.body(0.24), headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    job = srv.job(jid, sess)
    assert job["status"] in ("queued", "running"), job  # a dry run and an apply take a second or more
    pid = int(job["owner"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    sess.close()
    t0 = time.time()
    while (job := srv.job(jid))["status"] != "lost":  # answered by the other (or a new) worker
        assert job["status"] in ("queued", "running") and time.time() - t0 < LOST_S + 30, job
        time.sleep(0.5)
    assert time.time() - t0 >= LOST_S - 1.0 and job["error"]["error"]["code"] == "lost"
    # the next apply takes the slot over, and the dead job's row says lost
    r = requests.put(srv.url + "/config", data=srv.body(0.24), headers={**AUTH, "Prefer": "wait=30"}, timeout=60)
    assert r.status_code == 200, r.text
    with srv.db.connect() as c:
        row = c.execute(sa.select(config_jobs).where(config_jobs.c.id == jid)).one()._mapping
    assert row["status"] == "lost" and row["apply_slot"] is None
