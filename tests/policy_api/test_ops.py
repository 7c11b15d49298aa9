"""Operator surface: PUT /config (token, validation, dry run and atomic apply in a job), GET /exposure,
`homepage config check` and `homepage plan`, against a real server and the real CLI."""

from __future__ import annotations

import os
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import requests

from .test_api import Server, homepage

AUTH = {"Authorization": "Bearer sesame"}
PEEK = {"Authorization": "Bearer peek"}  # HOMEPAGE_OPS_TOKEN: read access to the operator pages


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ["HOMEPAGE_OPS_TOKEN"] = "peek"
    try:
        s = Server(tmp_path_factory.mktemp("ops"))
    finally:
        del os.environ["HOMEPAGE_OPS_TOKEN"]
    sess = requests.Session()
    for k in range(150):  # some traffic to plan and measure on
        assert sess.get(s.url + "/layout", params={"user_id": f"u{k % 40:05d}"}, timeout=5).status_code == 200
    yield s
    if s.proc.poll() is None:
        s.stop()


def wait_for(fn, timeout=15.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_put_config_needs_the_token(server):
    body = server.config.read_text()
    r = requests.put(server.url + "/config", data=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = requests.put(server.url + "/config", data=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401
    # the scheme is case-insensitive: a lower-case "bearer" with a wrong token is a wrong token, not a missing one
    r = requests.put(server.url + "/config", data=body, headers={"Authorization": "bearer nope"}, timeout=30)
    assert r.status_code == 401 and "got a wrong one" in r.json()["error"]["message"]


def test_no_static_files_are_served(server, tmp_path):
    r = requests.get(server.url + "/static/homepage.toml", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_put_invalid_config_is_400_naming_the_key(server):
    body = server.config.read_text().replace("budget = 0.05", "budget = 5")
    r = requests.put(server.url + "/config", data=body, headers=AUTH, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["field"] == "exploration.budget" and "got 5" in err["message"]


def test_put_infeasible_config_is_409_and_not_applied(server):
    before = requests.get(server.url + "/config", timeout=5).json()["version"]
    body = re.sub(r'(name = "live_floor"\nkind = "category_share"\ncategory = "live"\nmin = )[0-9.]+', r"\g<1>0.97",
                  server.config.read_text())
    assert "min = 0.97" in body
    # Prefer: wait gives the job's final answer: the synchronous 409 with the diagnosis
    r = requests.put(server.url + "/config", data=body, headers={**AUTH, "Prefer": "wait=30"}, timeout=60)
    assert r.status_code == 409, r.text
    out = r.json()
    assert out["error"]["code"] == "infeasible" and out["job_id"]
    assert "live_floor" in out["conflicting"]
    assert any(x.startswith("live_floor: min 0.97 ->") for x in out["relaxations"])
    assert requests.get(server.url + "/config", timeout=5).json()["version"] == before


def test_put_valid_config_applies_atomically_and_workers_swap(server):
    body = re.sub(r'(name = "live_floor"\nkind = "category_share"\ncategory = "live"\nmin = )[0-9.]+', r"\g<1>0.3",
                  server.config.read_text())
    r = requests.put(server.url + "/config", data=body, headers={**AUTH, "X-Operator": "alice"}, timeout=30)
    assert r.status_code == 202, r.text  # the dry run and the apply run in a job of the worker
    job = wait_for(lambda: (j := requests.get(server.url + r.headers["Location"], headers=AUTH, timeout=10).json())
                   ["status"] in ("done", "failed", "lost") and j, timeout=60)
    assert job["status"] == "done" and job["author"] == "alice", job
    out = job["result"]
    assert out["projection"]["shares"]["live_floor"] >= 0.3 - 1e-6
    new = out["version"]
    # every worker serves the new config within a few polls, with the plan made for it
    def both_swapped():
        seen = [requests.get(server.url + "/layout", params={"user_id": "u1"}, timeout=5).json()["versions"]
                for _ in range(8)]
        last["seen"] = seen
        # the plan made with it, or a later one for it (the loop re-plans and paces a changed config)
        return all(v["config"] == new and v["plan"] >= out["plan_version"] for v in seen)

    last: dict = {}
    try:
        wait_for(both_swapped)
    except AssertionError:
        raise AssertionError(f"{last} {out}") from None
    cfg = requests.get(server.url + "/config", timeout=5).json()
    live = [c for c in cfg["config"]["constraints"] if c["name"] == "live_floor"][0]
    assert cfg["version"] == new and live["min"] == 0.3


def test_exposure_matches_the_served_pages(server):
    sess = requests.Session()
    time.sleep(1.0)
    ver = requests.get(server.url + "/config", timeout=5).json()["version"]
    cfg = requests.get(server.url + "/config", timeout=5).json()["config"]
    w = np.asarray(cfg["homepage"]["position_weights"])
    live, tail = [], []
    for k in range(80):
        r = sess.get(server.url + "/layout", params={"user_id": f"e{k}"}, timeout=5).json()
        assert r["versions"]["config"] == ver
        live.append(sum(w[m["slot"]] for m in r["modules"] if m["category"] == "live") / w.sum())
        tail.append(np.mean([it["long_tail"] for m in r["modules"] for it in m["items"]]))

    def read():
        return requests.get(server.url + "/exposure", params={"window_s": 3600}, headers=PEEK, timeout=10).json()

    def exposure():
        # all of the 80 flushed: the count has stopped moving (an earlier test's swap check logged
        # decisions under this config too; counting them with some of ours not yet written made 80)
        e = read()
        if e["decisions"] < 80:
            return None
        time.sleep(0.5)
        again = read()
        return again if again["decisions"] == e["decisions"] else None

    e = wait_for(exposure)
    got = {c["name"]: c["realised"] for c in e["constraints"]}
    # decisions logged under this config = the 80 above plus any made by the swap check
    assert e["decisions"] >= 80
    if e["decisions"] == 80:
        assert got["live_floor"] == pytest.approx(np.mean(live))
        assert got["long_tail"] == pytest.approx(np.mean(tail))
    r = requests.get(server.url + "/exposure", params={"window_s": "soon"}, headers=PEEK, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["field"] == "window_s"


def test_config_check_and_plan_cli(server, tmp_path):
    env = server.env
    ok = homepage("config", "check", str(server.config), env=env, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "projected value per request" in ok.stdout
    bad = tmp_path / "infeasible.toml"
    text = server.config.read_text()
    assert 'category = "live"\nmin = 0.1\n' in text
    bad.write_text(text.replace('category = "live"\nmin = 0.1\n', 'category = "live"\nmin = 0.9\n'))
    r = homepage("config", "check", str(bad), env=env, check=False)
    assert r.returncode == 1 and "INFEASIBLE" in r.stdout and "live_floor: min 0.9 ->" in r.stdout
    invalid = tmp_path / "invalid.toml"
    invalid.write_text(server.config.read_text().replace("slots = 6", "slots = 0"))
    r = homepage("config", "check", str(invalid), env=env, check=False)
    assert r.returncode == 2 and "homepage.slots" in r.stdout
    p = homepage("plan", env=env, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    version = int(re.search(r"published plan version (\d+)", p.stdout).group(1))
    wait_for(lambda: requests.get(server.url + "/readyz", timeout=5).json()["versions"]["plan"] == version)


# ---- the console and its aggregates ------------------------------------------------------------
def db_engine(server):
    from policy_api.log import make_engine

    return make_engine(f"sqlite:///{server.db_path}")


def brute_force_exposure(server, window_s=3600.0):
    """The reference: every decision of the window read and averaged (what /exposure did before)."""
    from policy_api import registry
    from policy_api.jobs import exposure_report

    db = db_engine(server)
    try:
        cfg = registry.require_active_config(db)
        return exposure_report(db, cfg.config, cfg.version, window_s)
    finally:
        db.dispose()


def exposure(server, **params):
    r = requests.get(server.url + "/exposure", params=params, headers=PEEK, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_operator_reads_need_the_ops_token(server):
    for path in ("/ops", "/ops/config", "/exposure", "/versions"):
        r = requests.get(server.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        assert "Basic" in r.headers["WWW-Authenticate"]  # a browser prompts
        assert requests.get(server.url + path, headers={"Authorization": "Bearer nope"},
                            timeout=10).status_code == 401
        assert requests.get(server.url + path, headers=PEEK, timeout=10).status_code == 200
        assert requests.get(server.url + path, headers=AUTH, timeout=10).status_code == 200  # operator token
        assert requests.get(server.url + path, auth=("ops", "peek"), timeout=10).status_code == 200
    # the layout API stays open
    assert requests.get(server.url + "/layout", params={"user_id": "u1"}, timeout=5).status_code == 200


def test_window_is_bounded(server):
    r = requests.get(server.url + "/exposure", params={"window_s": 7776000}, headers=PEEK, timeout=5)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["field"] == "window_s" and "(0, 21600]" in err["message"] and "7776000" in err["message"]
    r = requests.get(server.url + "/ops", params={"window_s": 0}, headers=PEEK, timeout=5)
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/json")


@pytest.mark.slow
def test_exposure_matches_a_full_scan_and_ops_cost_does_not_grow_with_the_log(server):
    """5,000 decisions are added to the log behind the server's back: the aggregates count them once
    (rows read grows by exactly what was added), and then any number of /ops and /exposure requests
    read no row at all; the shares equal a full scan of the window."""
    from policy_api.log import insert_decisions, read_decisions

    db = db_engine(server)
    ver = requests.get(server.url + "/config", timeout=5).json()["version"]
    base = read_decisions(db, since=datetime.now(tz=UTC) - timedelta(hours=1),
                          columns=["user_id", "context", "versions", "policy", "candidates", "pmf", "chosen",
                                   "propensity", "layout", "fallback_reason"])
    base = {k: v.tolist() if isinstance(v, np.ndarray) else list(v) for k, v in base.items()}
    same = [i for i, v in enumerate(base["versions"]) if (v or {}).get("config") == ver]
    assert same, "no decision under the active config"
    n_new = 5_000
    now = datetime.now(tz=UTC)
    rng = np.random.default_rng(0)
    pick = rng.choice(same, size=n_new)
    rows = [{"request_id": f"bulk-{uuid.uuid4().hex}", "ts": now - timedelta(seconds=float(s)),
             **{k: base[k][i] for k in base}} for i, s in zip(pick.tolist(), rng.uniform(0, 20, n_new).tolist(), strict=True)]
    before = {}

    def both_warm():  # both workers' aggregates past their first catch-up
        e = exposure(server)["aggregate"]
        if e["ticks"] >= 1:
            before[e["worker"]] = e["rows_read"]
        return len(before) == 2

    wait_for(both_warm, timeout=30)
    for k in range(0, n_new, 2000):
        insert_decisions(db, rows[k:k + 2000])
    db.dispose()
    ref = brute_force_exposure(server)

    def caught_up():
        e = exposure(server)
        return e if e["decisions"] == ref["decisions"] else None

    seen = {}
    for _ in range(12):  # both workers caught up
        e = wait_for(caught_up, timeout=60)
        seen[e["aggregate"]["worker"]] = e
    for pid, e in seen.items():
        got = {c["name"]: c["realised"] for c in e["constraints"]}
        want = {c["name"]: c["realised"] for c in ref["constraints"]}
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert [c["holds"] for c in e["constraints"]] == [c["holds"] for c in ref["constraints"]]
        if pid in before:  # the tail read what was added (plus the server's own new decisions), not the log
            assert n_new <= e["aggregate"]["rows_read"] - before[pid] <= n_new + 50
    # now requests: no row read, however many, while nothing new arrives
    reads = {pid: e["aggregate"]["rows_read"] for pid, e in seen.items()}
    for _ in range(6):
        assert requests.get(server.url + "/ops", headers=PEEK, timeout=10).status_code == 200
        e = exposure(server)
        assert e["aggregate"]["rows_read"] == reads.get(e["aggregate"]["worker"], e["aggregate"]["rows_read"])


def test_ops_console_shows_charts_holds_and_commands(server):
    requests.get(server.url + "/layout", params={"user_id": "u7"}, timeout=5)
    e = wait_for(lambda: exposure(server) if exposure(server)["decisions"] > 0 else None)
    names = [c["name"] for c in e["constraints"]]

    def page_with_data():  # each worker's aggregate catches up on its own: wait for the one answering
        r = requests.get(server.url + "/ops", params={"window_s": 900}, headers=PEEK, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        for n in names:  # one chart per constraint, with data and its target band
            m = re.search(r'<svg class=chart role="img" aria-label="' + re.escape(n) + r': realised share"[^>]*'
                          r'data-points="(\d+)"', r.text)
            assert m, n
            if int(m.group(1)) == 0:
                return None
        return r.text

    page = wait_for(page_with_data)
    e = exposure(server)
    assert page.count("class=band") >= sum(1 for c in e["constraints"] if c["min"] is not None or c["max"] is not None)
    # a constraint that fails is highlighted, one that holds is not
    fails = sum(1 for c in e["constraints"] if c["holds"] is False)
    assert page.count("holds: False") == fails and page.count("<tr class=alert>") == fails
    # copy-paste commands: double quotes so that the shell expands the token
    assert '-H "Authorization: Bearer $HOMEPAGE_OPERATOR_TOKEN"' in page
    assert "'Authorization" not in page
    assert "<b>15 min</b>" in page and "window_s=21600" in page and "window_s=86400" not in page
    assert "homepage versions rollback config" in page


@pytest.mark.slow
def test_metrics_expose_exposure_prices_and_versions(server):
    cfg = requests.get(server.url + "/config", timeout=5).json()
    last = {}

    def scrape():  # the reference is read again each time: a layout of the last test may flush late
        ref = brute_force_exposure(server, 900.0)
        want = last["want"] = {c["name"]: c["realised"] for c in ref["constraints"]}
        text = requests.get(server.url + "/metrics", timeout=10).text
        got = last["got"] = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^homepage_exposure_share\{constraint="([^"]+)"\} (\S+)$', text, re.M)}
        return text if got and got == pytest.approx(want, rel=1e-9) else None

    try:
        text = wait_for(scrape, timeout=30)
    except AssertionError:
        raise AssertionError(f"gauges {last.get('got')} != full scan {last.get('want')}") from None
    want = last["want"]
    assert re.search(r'^homepage_version\{kind="config"\} ' + str(float(cfg["version"])) + "$", text, re.M)
    prices = dict(re.findall(r'^homepage_price\{constraint="([^"]+)"\} (\S+)$', text, re.M))
    assert set(prices) == set(want)
    for c in cfg["config"]["constraints"]:
        if c.get("min") is not None:
            assert re.search(rf'^homepage_exposure_target_min\{{constraint="{c["name"]}"\}} {float(c["min"])!r}$',
                             text, re.M)


def test_rollback_over_the_api(server):
    target = requests.get(server.url + "/config", timeout=5).json()["version"]
    body = re.sub(r'(name = "live_floor"\nkind = "category_share"\ncategory = "live"\nmin = )[0-9.]+', r"\g<1>0.2",
                  server.config.read_text())
    r = requests.put(server.url + "/config", data=body, headers={**AUTH, "Prefer": "wait=30"}, timeout=60)
    assert r.status_code == 200, r.text
    current = r.json()
    hist = wait_for(lambda: (h := requests.get(server.url + "/versions", headers=PEEK, timeout=10).json())
                    ["configs"] and h["configs"][0]["version"] == current["version"] and h)
    assert target in [c["version"] for c in hist["configs"]]
    r = requests.post(server.url + "/config/rollback", json={"version": target}, timeout=60)
    assert r.status_code == 401
    r = requests.post(server.url + "/config/rollback", json={"version": "one"}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["field"] == "version"
    r = requests.post(server.url + "/config/rollback", json={"version": 999}, headers=AUTH, timeout=60)
    assert r.status_code == 404, r.text
    r = requests.post(server.url + "/config/rollback", json={"version": target}, headers=AUTH, timeout=60)
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "rollback"
    job = wait_for(lambda: (j := requests.get(server.url + r.headers["Location"], headers=AUTH, timeout=10).json())
                   ["status"] in ("done", "failed", "lost") and j, timeout=60)
    assert job["status"] == "done" and job["target_version"] == target, job
    out = job["result"]
    assert out["rolled_back_to"] == target and out["version"] > current["version"]
    db = db_engine(server)
    try:
        from policy_api import registry

        old_body = registry.config_version(db, target).body
        new_body = registry.config_version(db, out["version"]).body
    finally:
        db.dispose()
    assert new_body == old_body
    wait_for(lambda: requests.get(server.url + "/config", timeout=5).json()["version"] == out["version"])
    # (each worker keeps its own history, refreshed every few seconds: wait until the answer has it)
    hist = wait_for(lambda: (h := requests.get(server.url + "/versions", headers=PEEK, timeout=10).json())
                    ["configs"] and h["configs"][0]["version"] == out["version"] and h)
    assert hist["configs"][0]["note"] == f"rollback to version {target}"


@pytest.mark.slow  # waits for the loop's first steps
def test_alert_rules_and_dashboard_use_metrics_the_server_exposes(server):
    import json
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2] / "deploy"
    rules = yaml.safe_load((root / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((root / "grafana" / "homepage.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    wanted = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"\bhomepage_[a-z_]+", e)}
    page = requests.get(server.url + "/layout", params={"user_id": "u3"}, timeout=5).json()
    m = page["modules"][0]
    r = requests.post(server.url + "/feedback", timeout=5, json={"request_id": page["request_id"], "events": [
        {"event_id": f"alerts-{page['request_id']}", "slot": m["slot"], "item_id": m["items"][0]["item_id"],
         "type": "play"}]})
    assert r.status_code == 202, r.text
    cfg = requests.get(server.url + "/config", timeout=5).json()["config"]
    last = {}

    def scraped():
        text = requests.get(server.url + "/metrics", timeout=10).text
        names = set(re.findall(r"^(homepage_[a-z_]+?)(?:_bucket|_count|_sum|_created)?[{ ]", text, re.M))
        if not any(c.get("max") is not None for c in cfg["constraints"]):
            names.add("homepage_exposure_target_max")  # emitted only for constraints with a cap
        last["missing"] = sorted(wanted - names)
        last["text"] = text[:300]
        return names if wanted <= names else None

    try:
        wait_for(scraped, timeout=60)  # the business gauges come with the aggregates' first ticks
    except AssertionError:
        raise AssertionError(f"metrics named in deploy/ but not exposed: {last['missing']}; {last['text']}") from None


def test_a_workers_first_operator_reads_after_a_start_are_complete(tmp_path):
    """A server started on a log that already holds 10,000 decisions: the first /versions and
    /exposure answers of each worker hold the whole window (the aggregate of a worker starts on its
    first operator read; its first answers were empty, then partial, and looked final): the versions'
    lists are filled, and the exposure equals a full scan of the window, marked ``caught_up``. On a
    machine too loaded for the worker's first pass to end within FIRST_READ_WAIT_S, the first answer
    may instead come after that whole wait and say ``caught_up: false``; that worker's next answers
    then must become complete, and the first complete one equal the full scan."""
    from policy_api.log import insert_decisions, read_decisions
    from policy_api.serving._ops import FIRST_READ_WAIT_S

    os.environ["HOMEPAGE_OPS_TOKEN"] = "peek"
    try:
        first = Server(tmp_path)
        sess = requests.Session()
        for k in range(30):
            assert sess.get(first.url + "/layout", params={"user_id": f"u{k:05d}"}, timeout=5).status_code == 200
        first.stop()
        db = db_engine(first)
        base = read_decisions(db, since=datetime.now(tz=UTC) - timedelta(hours=1),
                              columns=["user_id", "context", "versions", "policy", "candidates", "pmf", "chosen",
                                       "propensity", "layout", "fallback_reason"])
        base = {k: v.tolist() if isinstance(v, np.ndarray) else list(v) for k, v in base.items()}
        n = len(base["policy"])
        now = datetime.now(tz=UTC)
        rows = [{"request_id": f"bulk-{j}", "ts": now - timedelta(seconds=j * 0.1), **{k: base[k][j % n] for k in base}}
                for j in range(10_000)]
        for k in range(0, len(rows), 2000):
            insert_decisions(db, rows[k:k + 2000])
        db.dispose()
        server = Server(tmp_path)
    finally:
        del os.environ["HOMEPAGE_OPS_TOKEN"]
    try:
        ref = brute_force_exposure(server)
        assert ref["decisions"] >= 10_000
        firsts: dict[int, dict] = {}
        waited: set[int] = set()
        t0 = time.time()
        while len(firsts) < 2 and time.time() - t0 < 90:  # a new connection each time: both workers answer
            v = requests.get(server.url + "/versions", headers={**PEEK, "Connection": "close"}, timeout=30).json()
            t_read = time.time()
            e = requests.get(server.url + "/exposure", headers={**PEEK, "Connection": "close"}, timeout=30).json()
            pid = e["aggregate"]["worker"]
            if pid in firsts:
                continue
            if not e["aggregate"]["caught_up"]:
                # only a worker whose first pass outlasted the whole wait may answer so, and once its
                # first answer has waited (the /versions read before it waited too, on the same worker
                # or the other)
                assert pid in waited or time.time() - t_read >= FIRST_READ_WAIT_S - 0.5 or \
                    t_read - t0 >= FIRST_READ_WAIT_S - 0.5, e["aggregate"]
                waited.add(pid)
                continue
            firsts[pid] = e
            assert v["plans"] and v["configs"], v
        assert len(firsts) == 2
        for e in firsts.values():
            assert e["aggregate"]["caught_up"] is True
            assert e["decisions"] == ref["decisions"]
            got = {c["name"]: c["realised"] for c in e["constraints"]}
            want = {c["name"]: c["realised"] for c in ref["constraints"]}
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    finally:
        server.stop()
