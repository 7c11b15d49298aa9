"""The HTTP contract, against a real `homepage serve` process (gunicorn, 2 workers) on SQLite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from policy_api import registry
from simulator import make_world

from ..allocator.test_layout import slow_long_tail

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def homepage(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy_api.cli", *args], env=env, cwd=env["HOMEPAGE_DATA_DIR"],
                          capture_output=True, text=True, check=check, timeout=120)


class Server:
    def __init__(self, tmp: Path, workers: int = 2) -> None:
        self.world = make_world(n_users=50, n_items=400, seed=3)
        self.dir = tmp
        self.db_path = tmp / "homepage.db"
        self.env = dict(os.environ, DATABASE_URL=f"sqlite:///{self.db_path}", HOMEPAGE_DATA_DIR=str(tmp),
                        HOMEPAGE_RELOAD_S="0.5", HOMEPAGE_OPERATOR_TOKEN="sesame")
        self.config = tmp / "homepage.toml"
        self.config.write_text(self.world.default_config_toml())
        self.world.to_catalog_csv(tmp / "items.csv")
        homepage("db", "upgrade", env=self.env)
        homepage("catalog", "load", str(tmp / "items.csv"), "--config", str(self.config), env=self.env)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / "server.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--config", str(self.config),
                                      "--port", str(self.port), "--workers", str(workers)],
                                     env=self.env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < 60:
            assert self.proc.poll() is None, (tmp / "server.log").read_text()
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError((tmp / "server.log").read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.log.close()
        return rc

    def count(self, table: str) -> int:
        eng = sa.create_engine(f"sqlite:///{self.db_path}")
        with eng.connect() as c:
            n = c.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        eng.dispose()
        return int(n)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("api"))
    yield s
    if s.proc.poll() is None:
        s.stop()


def error_of(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    return body["error"]


def test_layout_contract(server):
    w = server.world
    r = requests.get(server.url + "/layout", params={"user_id": str(w.user_ids[0])}, timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"request_id", "user_id", "fallback", "propensity", "versions", "live_state", "modules"}
    assert body["user_id"] == str(w.user_ids[0]) and body["fallback"] is False
    assert 0 < body["propensity"] <= 1
    mods = body["modules"]
    assert [m["slot"] for m in mods] == list(range(w.n_slots))
    cat_of = dict(zip(w.item_ids.tolist(), (w.categories[c] for c in w.item_category), strict=True))
    # long-tail flags against an independent (slow) computation from the catalog
    is_tail, _ = slow_long_tail(np.asarray(w.popularity), np.asarray(w.item_category), 0.8)
    tail_of = dict(zip(w.item_ids.tolist(), is_tail.tolist(), strict=True))
    seen = []
    for m in mods:
        assert set(m) == {"slot", "module_id", "category", "tilt", "items"}
        assert len(m["items"]) == w.items_per_module
        for it in m["items"]:
            assert cat_of[it["item_id"]] == m["category"]
            assert it["long_tail"] == tail_of[it["item_id"]]
            seen.append(it["item_id"])
    assert len(seen) == len(set(seen)), "an item repeats on the page"
    assert len({m["module_id"] for m in mods}) == len(mods)


def test_unknown_user_gets_a_cold_start_layout(server):
    r = requests.get(server.url + "/layout", params={"user_id": "never-seen-before-ü"}, timeout=5)
    assert r.status_code == 200 and len(r.json()["modules"]) == server.world.n_slots


@pytest.mark.parametrize("params", [{}, {"user_id": ""}, {"user_id": "   "}, {"user_id": "x" * 500}])
def test_layout_bad_user_id_is_a_400_naming_the_field(server, params):
    err = error_of(requests.get(server.url + "/layout", params=params, timeout=5), 400)
    assert err["field"] == "user_id" and "user_id" in err["message"]


def test_feedback_is_idempotent_and_unknown_ids_are_404(server):
    r = requests.get(server.url + "/layout", params={"user_id": "u1"}, timeout=5).json()
    item = r["modules"][0]["items"][0]["item_id"]
    events = [{"event_id": f"{r['request_id']}-{k}", "slot": 0, "item_id": item, "type": t}
              for k, t in enumerate(["impression", "play", "full_play"])]
    first = requests.post(server.url + "/feedback", json={"request_id": r["request_id"], "events": events}, timeout=5)
    assert first.status_code == 202 and first.json() == {"accepted": 3, "duplicates": 0}
    # a retry can reach the other worker; once the first events are flushed (~50 ms) every worker
    # recognises them through the log (storage is idempotent either way: ON CONFLICT DO NOTHING)
    t0 = time.time()
    while server.count("feedback") < 3 and time.time() - t0 < 10:
        time.sleep(0.05)
    again = requests.post(server.url + "/feedback", json={"request_id": r["request_id"], "events": events + events[:1]},
                          timeout=5)
    assert again.status_code == 202 and again.json() == {"accepted": 0, "duplicates": 4}
    body, _, tag = r["request_id"].partition(".")
    forged = body + "." + ("0" * 16 if tag != "0" * 16 else "1" * 16)
    for rid in ("nope", forged):
        err = error_of(requests.post(server.url + "/feedback", json={"request_id": rid, "events": events}, timeout=5),
                       404)
        assert err["field"] == "request_id"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"events": []}, "request_id"),
        ({"request_id": "x", "events": []}, "events"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": 0, "item_id": "i", "type": "click"}]}, "events.0.type"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": -1, "item_id": "i", "type": "play"}]}, "events.0.slot"),
        ({"request_id": "x", "events": [{"event_id": "", "slot": 0, "item_id": "i", "type": "play"}]}, "events.0.event_id"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": 0, "item_id": "i", "type": "play", "value": "NaN"}]},
         "events.0.value"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": 0, "item_id": "i", "type": "play", "colour": 1}]},
         "events.0.colour"),
        ({"request_id": "x", "events": "play"}, "events"),
        # found by schemathesis against /openapi.json: an overflowing time was a 500, a boolean a number
        ({"request_id": "x", "events": [{"event_id": "e", "slot": 0, "item_id": "i", "type": "play", "ts": 1.6e92}]},
         "events.0.ts"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": 0, "item_id": "i", "type": "play", "value": False}]},
         "events.0.value"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": True, "item_id": "i", "type": "play"}]}, "events.0.slot"),
        ({"request_id": "x", "events": [{"event_id": "e", "slot": 1.5, "item_id": "i", "type": "play"}]}, "events.0.slot"),
    ],
)
def test_feedback_bad_input_is_a_400_naming_the_field(server, payload, field):
    err = error_of(requests.post(server.url + "/feedback", json=payload, timeout=5), 400)
    assert err["field"] == field, err


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b"", b"{\"request_id\": 5}"])
def test_feedback_garbage_is_never_a_500(server, data):
    r = requests.post(server.url + "/feedback", data=data, headers={"Content-Type": "application/json"}, timeout=5)
    assert 400 <= r.status_code < 500
    error_of(r, r.status_code)


def test_unknown_route_and_method_are_json_4xx(server):
    error_of(requests.get(server.url + "/nope", timeout=5), 404)
    r = requests.delete(server.url + "/layout", timeout=5)
    error_of(r, 405)
    assert "GET" in r.headers["Allow"]  # RFC 9110: a 405 lists what is allowed


def test_integral_slot_numbers_are_accepted(server):
    r = requests.get(server.url + "/layout", params={"user_id": "s"}, timeout=5).json()
    ev = [{"event_id": r["request_id"] + "-s", "slot": 2.0, "item_id": r["modules"][2]["items"][0]["item_id"],
           "type": "impression"}]
    got = requests.post(server.url + "/feedback", json={"request_id": r["request_id"], "events": ev}, timeout=5)
    assert got.status_code == 202 and got.json()["accepted"] == 1


def test_health_ready_metrics_openapi(server):
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["versions"]["config"] == 1
    before = requests.get(server.url + "/layout", params={"user_id": "m"}, timeout=5)
    assert before.status_code == 200
    text = requests.get(server.url + "/metrics", timeout=5).text
    served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("homepage_layout_requests_total{"))
    assert served >= 1
    spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    assert spec["openapi"].startswith("3.")
    assert {"/layout", "/feedback", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    layout_schema = spec["components"]["schemas"]["LayoutResponse"]
    assert set(layout_schema["required"]) == {"request_id", "user_id", "fallback", "propensity", "versions", "live_state", "modules"}


def test_every_decision_and_event_is_logged_with_its_propensity(tmp_path):
    """Nothing lost: N decisions and M events in, N and M rows out after a graceful stop; the logged
    propensity is pmf[chosen] and equals what the client saw."""
    s = Server(tmp_path, workers=2)
    try:
        seen = {}
        n_events = 0
        sess = requests.Session()
        for k in range(60):
            r = sess.get(s.url + "/layout", params={"user_id": f"u{k % 7}"}, timeout=5).json()
            seen[r["request_id"]] = r["propensity"]
            ev = [{"event_id": f"{r['request_id']}:{j}", "slot": j, "item_id": r["modules"][j]["items"][0]["item_id"],
                   "type": "impression"} for j in range(3)]
            assert sess.post(s.url + "/feedback", json={"request_id": r["request_id"], "events": ev},
                             timeout=5).status_code == 202
            n_events += len(ev)
    finally:
        assert s.stop() == 0
    assert s.count("decisions") == 60
    assert s.count("feedback") == n_events
    eng = sa.create_engine(f"sqlite:///{s.db_path}")
    with eng.connect() as c:
        rows = c.execute(sa.text("SELECT request_id, pmf, chosen, propensity FROM decisions")).all()
    eng.dispose()
    import json

    for rid, pmf, chosen, prop in rows:
        pmf = json.loads(pmf) if isinstance(pmf, str) else pmf
        assert prop == pytest.approx(pmf[chosen]) and prop == pytest.approx(seen[rid])
        assert sum(pmf) == pytest.approx(1.0)


def test_serve_refuses_an_invalid_config(tmp_path):
    env = dict(os.environ, DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", HOMEPAGE_DATA_DIR=str(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_text(make_world(n_users=5, n_items=50, seed=0).default_config_toml().replace("budget = 0.05",
                                                                                            "budget = 5"))
    out = homepage("serve", "--config", str(bad), "--port", str(free_port()), env=env, check=False)
    assert out.returncode == 2
    assert "exploration.budget: must be in [0, 1]; got 5" in out.stderr


@pytest.mark.slow
def test_serve_keeps_the_active_config_and_never_serves_an_infeasible_one(tmp_path):
    """A restart with --config FILE used to re-activate FILE, reverting a config applied since
    (PUT /config); activation is now explicit (--activate, dry-run and audited)."""
    world = make_world(n_users=50, n_items=400, seed=3)
    env = dict(os.environ, DATABASE_URL=f"sqlite:///{tmp_path / 'homepage.db'}", HOMEPAGE_DATA_DIR=str(tmp_path),
               HOMEPAGE_RELOAD_S="0.5")
    text = world.default_config_toml()
    a, b, bad = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "bad.toml"
    a.write_text(text)
    b.write_text(text.replace("budget = 0.05", "budget = 0.07"))
    # live has 2 of the 6 slots' modules: a 90 % floor cannot hold (the LP is infeasible)
    bad.write_text(text + '\n[[constraints]]\nname = "live_most"\nkind = "category_share"\ncategory = "live"\n'
                          "min = 0.9\n")
    world.to_catalog_csv(tmp_path / "items.csv")
    homepage("db", "upgrade", env=env)
    homepage("catalog", "load", str(tmp_path / "items.csv"), "--config", str(a), env=env)
    eng = sa.create_engine(env["DATABASE_URL"])
    registry.activate_config(eng, a.read_text(), author="serve")
    registry.activate_config(eng, b.read_text(), author="ops")  # what PUT /config does: version 2
    eng.dispose()

    def active() -> tuple[int, str]:
        eng = sa.create_engine(env["DATABASE_URL"])
        with eng.connect() as c:
            row = c.execute(sa.text("SELECT version, author FROM configs WHERE status = 'active'")).one()
        eng.dispose()
        return int(row[0]), str(row[1])

    out = homepage("serve", "--config", str(bad), "--activate", "--port", str(free_port()), env=env, check=False)
    assert out.returncode == 3, out.stdout + out.stderr  # infeasible: never applied, never served
    assert "not serving" in out.stderr and active() == (2, "ops")

    port = free_port()
    log = (tmp_path / "restart.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--config", str(a), "--port", str(port),
                             "--workers", "1", "--no-loop"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None and time.time() - t0 < 60, (tmp_path / "restart.log").read_text()
            try:
                r = requests.get(f"http://127.0.0.1:{port}/config", timeout=1)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        got = r.json()
        assert got["version"] == 2 and got["config"]["exploration"]["budget"] == 0.07
        assert active() == (2, "ops")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert "differs from the active config version 2" in (tmp_path / "restart.log").read_text()


def test_feedback_is_checked_against_the_page_whichever_worker_served_it(server):
    """Two workers: the page is known to both (a shared table), before its decision row is written."""
    for k in range(8):
        d = requests.get(server.url + "/layout", params={"user_id": f"pg{k}"}, timeout=5).json()
        mods = d["modules"]
        wrong = {"request_id": d["request_id"], "events": [
            {"event_id": f"pg{k}-w", "slot": 0, "item_id": mods[1]["items"][0]["item_id"], "type": "play"}]}
        err = error_of(requests.post(server.url + "/feedback", json=wrong, timeout=5), 400)
        assert err["field"] == "events.0.item_id" and "shown in slot 0" in err["message"]
        right = {"request_id": d["request_id"], "events": [
            {"event_id": f"pg{k}-{m['slot']}", "slot": m["slot"], "item_id": m["items"][-1]["item_id"],
             "type": "impression"} for m in mods]}
        r = requests.post(server.url + "/feedback", json=right, timeout=5)
        assert r.status_code == 202 and r.json()["accepted"] == len(mods)


def test_served_pages_never_refuse_on_a_torn_record(tmp_path):
    from policy_api.serving._pages import ServedPages

    a, b = ServedPages(tmp_path / "p.bin", capacity=64), ServedPages(tmp_path / "p.bin", capacity=64)
    mods = [{"slot": s, "items": [{"item_id": f"i{s}.{k}"} for k in range(10)]} for s in range(6)]
    a.add("r1", mods)
    n_slots, shown = b.check("r1", [0, 5, 0, 3], ["i0.3", "i5.9", "i1.0", "nope"])  # another process's view
    assert n_slots == 6 and shown.tolist() == [True, True, False, False]
    assert b.check("r2", [0], ["i0.0"]) == (None, None)
    at = a._key("r1")[1]
    a._table[at, 5] ^= np.uint64(1)  # one bit of the filter flipped under a reader: unknown, never refused
    assert b.check("r1", [0], ["nope"]) == (None, None)
