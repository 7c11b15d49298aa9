"""Serving speed with the engine a user actually runs: the trained ranker, the bandit and a plan.

One run on one machine measures:

1. the in-process decision (1 thread) with the trained ranker + bandit + plan on the simulator's
   3,000-item catalog (600-item pool), with the time of each stage: live state in, pool, scoring,
   block table, candidates, pmf, draw, response, log row; and the popularity engine beside it;
2. the cost of one metrics update (Prometheus in-process, Prometheus multiprocess files, and the
   per-worker counters the service uses);
3. HTTP ``GET /layout`` under ``wrk`` (gunicorn, 2 workers): ``homepage serve`` with the trained engine
   (live loop running), ``homepage serve`` with the popularity engine, and a bare Flask app that does
   a small numpy scoring and returns a 6x10 layout. Each: the capacity (closed loop), then p50/p99 at
   fixed rates (200 req/s and 80 % of its capacity) from a one-thread open-loop client (latency from
   each request's scheduled time). The trained engine is measured once the loop's start-up training is
   done, with 1 and 2 request threads per worker (``--threads``).

The trained engine is built the way a user gets one: the catalog and config loaded, a plan, traffic
served by the popularity engine with simulated feedback logged, then ``train`` (the ranker), ``plan``
and ``learn`` (the bandit) on that log.

Prints JSON lines. Usage: python bench/serving.py [--decisions N] [--duration S] [--skip-http]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np


def emit(**kw: Any) -> None:
    kw["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(kw), flush=True)


LOOP_TOML = "\n[loop]\nlearn_every_s = 3600\ntrain_every_s = 36000\n"


def build_trained(d: Path, n_log: int = 3000, seed: int = 0) -> tuple[str, Any]:
    """A SQLite database with a catalog, an active config, a plan, a trained ranker and a bandit."""
    from policy_api import jobs, registry
    from policy_api.engine import DecisionEngine, RequestIds, load_state
    from policy_api.log import (
        insert_decisions,
        insert_feedback,
        make_engine,
        read_catalog_csv,
        upgrade,
        upsert_items,
    )
    from simulator import make_world

    world = make_world(n_users=2000, n_items=3000, seed=seed)
    url = f"sqlite:///{d / 'h.db'}"
    upgrade(url)
    db = make_engine(url)
    body = world.default_config_toml() + LOOP_TOML
    (d / "homepage.toml").write_text(body)
    world.to_catalog_csv(d / "items.csv")
    registry.activate_config(db, body, author="bench")
    upsert_items(db, read_catalog_csv(d / "items.csv").rows())
    jobs.plan(db, users=500, seed=seed)
    eng = DecisionEngine(load_state(db))
    ids = RequestIds(b"bench-serving")
    w_item = {str(i): k for k, i in enumerate(world.item_ids.tolist())}
    rng = np.random.default_rng(seed)
    users = world.sample_users(n_log, rng)
    dec_rows, fb_rows = [], []
    S, K = world.n_slots, world.items_per_module
    t0 = time.time() - 3600
    for k, u in enumerate(users.tolist()):  # bench setup, not a hot path: one simulated visit per row
        rid = ids.issue()
        dec = eng.decide(str(world.user_ids[u]), rid)
        row = dec.row()
        ts = t0 + k * 0.5
        row["ts"] = datetime.fromtimestamp(ts, tz=UTC)
        dec_rows.append(row)
        slot_items = np.full((S, K), -1, dtype=np.int64)
        for m in dec.modules:
            idx = [w_item[it["item_id"]] for it in m["items"]][:K]
            slot_items[m["slot"], : len(idx)] = idx
        for j, (s, it, e) in enumerate(world.sample_feedback(u, slot_items, rng)):
            at = datetime.fromtimestamp(ts + 1.0, tz=UTC)
            fb_rows.append({"event_id": f"{rid}:{j}", "request_id": rid, "slot": s, "item_id": str(world.item_ids[it]),
                            "type": e, "value": None, "ts": at, "received_at": at})
    insert_decisions(db, dec_rows)
    insert_feedback(db, fb_rows)
    cfg = registry.require_active_config(db)
    t = time.perf_counter()
    res = jobs.train_ranker(db, cfg, force=True, max_epochs=4, seed=seed)
    emit(bench="serving_fixture", decisions=n_log, events=len(fb_rows), ranker_version=res.published,
         train_s=round(time.perf_counter() - t, 1))
    jobs.plan(db, users=500, seed=seed)
    jobs.learn(db, until=datetime.now(tz=UTC) + timedelta(seconds=cfg.config.learning.reward_window_s))
    return url, world


# ------------------------------------------------------------------------------------ in process


def in_process(url: str, world: Any, n: int) -> dict[str, float]:
    from policy_api.engine import DecisionEngine, LiveSignals, RequestIds, load_state
    from policy_api.log import make_engine

    db = make_engine(url)
    state = load_state(db)
    assert state.versions["ranker"] is not None and state.versions["bandit"] is not None, state.versions
    assert state.versions["plan"] is not None, state.versions
    eng = DecisionEngine(state)
    ids = RequestIds(b"bench")
    cat = state.catalog
    rng = np.random.default_rng(1)
    C = len(state.config.category_names)
    # half the requests carry a live state (recent plays and skips, examined impressions per category, as
    # the loop writes it)
    lives: list[LiveSignals | None] = []
    for k in range(64):
        if k % 2:
            lives.append(None)
            continue
        pos = rng.choice(cat.n_items, 8, replace=False)
        lives.append(LiveSignals("hit", rng.gamma(1.0, 2.0, C), rng.choice(cat.n_items, 4, replace=False),
                                 12, positives=pos, positive_types=rng.integers(0, 4, 8), n_positive=8, n_negative=4,
                                 impressions=rng.gamma(2.0, 20.0, C)))
    users = [str(u) for u in world.user_ids[:400]] + [f"new-{k}" for k in range(100)]
    for k in range(300):
        eng.decide(users[k % 500], ids.issue(), live=lives[k % 64])
    stages: dict[str, list[float]] = {}
    t = np.empty(n)
    cpu = np.empty(n)
    for k in range(n):
        rid = ids.issue()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        dec = eng.decide(users[k % 500], rid, live=lives[k % 64])
        t1 = time.perf_counter()
        dec.response_json()
        t2 = time.perf_counter()
        dec.row()
        t3 = time.perf_counter()
        cpu[k] = time.thread_time() - c0
        t[k] = t3 - t0
        assert not dec.fallback, dec.fallback_reason
        for name, s in dec.stages.items():
            stages.setdefault(name, []).append(s)
        stages.setdefault("response", []).append(t2 - t1)
        stages.setdefault("log_row", []).append(t3 - t2)
    out = {"p50_ms": float(np.percentile(t, 50) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3),
           "cpu_p50_ms": float(np.percentile(cpu, 50) * 1e3), "cpu_p99_ms": float(np.percentile(cpu, 99) * 1e3)}
    emit(bench="decision_in_process", engine="trained", versions=state.versions, n=n, pool_size=state.config.pool_size,
         n_candidates=len(dec.pmf), **{k: round(v, 3) for k, v in out.items()},
         note_cpu="cpu = the thread's CPU time (what the decision costs, without waiting for a core)",
         mean_ms=round(float(t.mean() * 1e3), 3), target_p99_ms=2.0,
         stages_us={k: {"p50": round(float(np.percentile(v, 50) * 1e6), 1),
                        "p99": round(float(np.percentile(v, 99) * 1e6), 1)} for k, v in stages.items()},
         note="decide + response JSON + log row; half the requests with a live state, 20 % users new to the model")
    # the same engine with the popularity scorer
    from dataclasses import replace

    from policy_api.engine import build_state
    pop = build_state(state.config, cat, prices=state.prices, bandit=state.bandit, versions=state.versions)
    eng2 = DecisionEngine(replace(state, scorer=pop.scorer))
    for k in range(200):
        eng2.decide(users[k % 500], ids.issue())
    t = np.empty(n)
    for k in range(n):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        dec = eng2.decide(users[k % 500], ids.issue(), live=lives[k % 64])
        dec.response_json()
        dec.row()
        t[k] = time.perf_counter() - t0
        cpu[k] = time.thread_time() - c0
    emit(bench="decision_in_process", engine="popularity+bandit+plan", n=n,
         p50_ms=round(float(np.percentile(t, 50) * 1e3), 3), p99_ms=round(float(np.percentile(t, 99) * 1e3), 3),
         cpu_p50_ms=round(float(np.percentile(cpu, 50) * 1e3), 3), cpu_p99_ms=round(float(np.percentile(cpu, 99) * 1e3), 3))
    # the torch model as it scored before (per-category forward passes), for the same pools
    sc = state.scorer
    pools = [eng.pool(state, np.random.default_rng(k)) for k in range(50)]
    tt, tf = np.empty(300), np.empty(300)
    for k in range(300):
        u = sc.user_idx(users[k % 400])
        c0 = time.thread_time()
        sc.score(u, pools[k % 50])
        sc.category_preferences(u)
        c1 = time.thread_time()
        sc.score_user(u, pools[k % 50])
        tt[k], tf[k] = c1 - c0, time.thread_time() - c1
    emit(bench="ranker_scoring", pool=int(pools[0].size), torch_cpu_p50_ms=round(float(np.median(tt) * 1e3), 3),
         fast_cpu_p50_ms=round(float(np.median(tf) * 1e3), 3), note="scores + category preferences, 1 thread")
    return out


def metrics_cost(n: int = 20000) -> None:
    """One layout's metrics update (a counter and two histograms), thread CPU time: Prometheus
    in-process vs multiprocess files, and the service's own ``observe_layout`` in both modes."""
    code = r"""
import os, sys, time, json
import numpy as np
mode = sys.argv[1]
if mode == "multiprocess":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[2]
if mode.startswith("service"):
    if mode == "service_multiprocess":
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[2]
    from policy_api.engine import Decision
    from policy_api.serving import _metrics
    d = Decision("r", "u", 0.0, "bandit", {}, {}, [], [1.0], 0, 1.0, [], elapsed_s=0.0012)
    obs = lambda: _metrics.observe_layout(d, 0.0031)
else:
    from prometheus_client import Counter, Histogram
    b = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
    ctr = Counter("x_requests", "x", ["policy", "fallback"]); h1 = Histogram("x_s", "x", buckets=b)
    h2 = Histogram("x_d", "x", buckets=b)
    def obs():
        ctr.labels(policy="bandit", fallback="false").inc(); h1.observe(0.0031); h2.observe(0.0012)
n = int(sys.argv[3])
for _ in range(1000): obs()
t = np.empty(n)
for k in range(n):
    t0 = time.thread_time(); obs(); t[k] = time.thread_time() - t0
print(json.dumps({"p50_us": float(np.percentile(t, 50) * 1e6), "p99_us": float(np.percentile(t, 99) * 1e6)}))
"""
    for mode in ("in_process", "multiprocess", "service", "service_multiprocess"):
        with tempfile.TemporaryDirectory() as mp:
            out = subprocess.run([sys.executable, "-c", code, mode, mp, str(n)], capture_output=True, text=True,
                                 check=True).stdout
        emit(bench="metrics_update", mode=mode, **json.loads(out))


# ----------------------------------------------------------------------------------------- HTTP


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 120.0) -> None:
    import requests

    end = time.time() + timeout
    while time.time() < end:
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout} s")


_LUA = """
local users = {%s}
local k = math.random(1, #users)
request = function()
  k = k + 1
  return wrk.format("GET", "/layout?user_id=" .. users[(k %% #users) + 1])
end
"""

FLASK_APP = r'''
import numpy as np, orjson
from flask import Flask, Response, request
app = Flask(__name__)
rng = np.random.default_rng(0)
emb = rng.normal(size=(600, 16))
ids = [f"item-{i}" for i in range(600)]
@app.get("/layout")
def layout():
    u = np.random.default_rng(abs(hash(request.args["user_id"])) % 2**32).normal(size=16)
    s = emb @ u
    top = np.argsort(-s)[:60].reshape(6, 10)
    body = {"modules": [{"slot": k, "items": [{"item_id": ids[i], "long_tail": False} for i in row.tolist()]}
                        for k, row in enumerate(top)]}
    return Response(orjson.dumps(body), mimetype="application/json")
@app.get("/readyz")
def readyz():
    return {"ready": True}
'''


def _parse_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def _cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds used so far by the server's processes, by role: ``workers`` (the gunicorn workers:
    children with the master's command line), ``loop`` (``homepage worker``) and ``master``."""
    tick = os.sysconf("SC_CLK_TCK")
    own = Path(f"/proc/{root}/cmdline").read_bytes()
    out = {"workers": 0.0, "loop": 0.0, "master": 0.0, "n_workers": 0.0}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            ppid, cpu = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
            cmd = (p / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if int(p.name) == root:
            out["master"] += cpu
        elif ppid == root and cmd == own:
            out["workers"] += cpu
            out["n_workers"] += 1
        elif ppid == root and b"worker" in cmd:
            out["loop"] += cpu
    return out


def wrk_capacity(url: str, script: Path, duration: float, server_pid: int | None = None) -> dict[str, float]:
    """Closed loop: wrk -t2 -c4 for ``duration`` seconds; with ``server_pid``, also the server's CPU
    time per request by role (what a request costs, whatever share of the cores the run got)."""
    before = _cpu_by_role(server_pid) if server_pid else None
    out = subprocess.run(["wrk", "-t2", "-c4", f"-d{int(duration)}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    got: dict[str, float] = {"req_per_s": rps, "p50_ms": _parse_ms(lat.get("50", "")),
                             "p99_ms": _parse_ms(lat.get("99", "")), "non_2xx": int(errors.group(1)) if errors else 0}
    if before is not None and server_pid is not None and n:
        after = _cpu_by_role(server_pid)
        for role in ("workers", "loop"):
            got[f"cpu_ms_per_req_{role}"] = round((after[role] - before[role]) / n * 1e3, 3)
    return got


def fixed_rate(url: str, users: list[str], rate: float, duration: float, max_conns: int = 32,
               server_pid: int | None = None) -> dict[str, float]:
    """Open loop at ``rate`` req/s from one thread (non-blocking sockets, kept-alive connections, no HTTP
    library): latency counted from each request's scheduled send time, so a server that falls behind is
    charged for the requests waiting to be sent. A request due while every connection is busy opens
    another (at most ``max_conns``) or waits for one; its wait counts. The client costs ~0.1 ms of CPU per
    request, several times less than 16 threads of a Python HTTP library (the earlier client), so at
    200 req/s it takes little of the cores the server shares with it. With ``server_pid``, also the
    server's CPU time per request by role."""
    import selectors
    from urllib.parse import quote, urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reqs = [f"GET /layout?user_id={quote(u)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for u in users]
    n = max(int(rate * duration), 1)
    lat = np.full(n, np.nan)
    sel = selectors.DefaultSelector()
    idle: list[socket.socket] = []
    busy: dict[socket.socket, list[Any]] = {}  # sock -> [k, buffer]
    n_conns = 0
    bad = 0
    before = _cpu_by_role(server_pid) if server_pid else None
    start = time.perf_counter() + 0.2
    stop = start + 2 * duration + 5
    k = 0  # next request to send
    done = 0

    def connect() -> socket.socket:
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        return s

    while done < n:
        now = time.perf_counter()
        if now > stop:
            break
        while k < n and start + k / rate <= now:
            if not idle and n_conns < max_conns:
                idle.append(connect())
                n_conns += 1
            if not idle:
                break
            s = idle.pop()
            s.send(reqs[k % len(reqs)])  # ~80 bytes into an empty socket buffer
            busy[s] = [k, bytearray()]
            sel.register(s, selectors.EVENT_READ)
            k += 1
        wait = max(0.0, start + k / rate - time.perf_counter()) if k < n and (idle or n_conns < max_conns) else 0.05
        for key, _ in sel.select(min(wait, 0.05)):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            st = busy[s]
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:  # closed by the server
                sel.unregister(s)
                del busy[s]
                s.close()
                if st[1] or len(st) > 2:  # mid-answer, or already resent once: the request failed
                    n_conns -= 1
                    bad += 1
                    done += 1
                    continue
                # a kept-alive connection the server had closed while idle (its keepalive timeout): send
                # again on a new one, as an HTTP client does; the wait still counts
                s = connect()
                s.send(reqs[st[0] % len(reqs)])
                busy[s] = [st[0], bytearray(), "resent"]
                sel.register(s, selectors.EVENT_READ)
                continue
            buf = st[1]
            buf += chunk
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", bytes(buf[:head_end]), re.I)
            size = int(m.group(1)) if m else 0
            if len(buf) < head_end + 4 + size:
                continue
            lat[st[0]] = time.perf_counter() - (start + st[0] / rate)
            if not buf.startswith(b"HTTP/1.1 200"):
                bad += 1
            done += 1
            sel.unregister(s)
            del busy[s]
            if re.search(rb"\r\nconnection:\s*close", bytes(buf[:head_end]), re.I):  # e.g. gunicorn's sync worker
                s.close()
                n_conns -= 1
            else:
                idle.append(s)
    for s in [*idle, *busy]:
        s.close()
    sel.close()
    wall = time.perf_counter() - start
    got = int(np.isfinite(lat).sum())
    out = {"offered": rate, "achieved": got / wall, "p50_ms": float(np.nanpercentile(lat, 50) * 1e3),
           "p90_ms": float(np.nanpercentile(lat, 90) * 1e3), "p99_ms": float(np.nanpercentile(lat, 99) * 1e3),
           "max_ms": float(np.nanmax(lat) * 1e3), "non_200": bad, "not_sent": n - k, "connections": n_conns}
    if before is not None and server_pid is not None and got:
        after = _cpu_by_role(server_pid)
        for role in ("workers", "loop"):
            out[f"cpu_ms_per_req_{role}"] = (after[role] - before[role]) / got * 1e3
    return out


def _wait_loop_settled(url: str, since: float, timeout: float = 240.0) -> float:
    """Seconds waited until the loop's start-up work is done: at its first tick the loop trains a ranker
    on every behaviour event it has not seen (all of them, in a fresh process; minutes of CPU at the
    lowest priority), which is not the steady state the rates below measure."""
    import requests

    t0 = time.time()
    while time.time() - t0 < timeout:
        loop = requests.get(url + "/readyz", timeout=5).json().get("loop") or {}
        if loop.get("updated") is None or datetime.fromisoformat(loop["updated"]).timestamp() < since:
            time.sleep(1.0)  # the lease row still holds the status of an earlier loop process
            continue
        train = (loop.get("steps") or {}).get("train") or {}
        started = train.get("runs", 0) > 0
        if (started and not str(train.get("detail") or "").startswith("training started")) or (
                not started and time.time() - t0 > 30):
            break
        time.sleep(1.0)
    return time.time() - t0


def http_target(name: str, cmd: list[str], env: dict[str, str], url: str, users: list[str], d: Path,
                duration: float, loop: bool = False, threads: int = 1) -> dict[str, float]:
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(d))
    try:
        _wait(url)
        script = d / f"{name}.lua"
        script.write_text(_LUA % ", ".join(f'"{u}"' for u in users))
        wrk_capacity(url, script, 3)  # warm-up
        if loop:
            emit(bench="http_loop_settled", target=name, waited_s=round(_wait_loop_settled(url, started), 1))
        cap = wrk_capacity(url, script, duration, proc.pid)
        emit(bench="http_capacity", target=name, tool="wrk -t2 -c4", duration_s=duration, workers=2,
             threads=threads, **cap,
             note_cpu="cpu_ms_per_req_*: the server's CPU time per request (workers summed; the loop beside them)")
        for rate in (200.0, round(0.8 * cap["req_per_s"])):
            got = fixed_rate(url, users, rate, duration, server_pid=proc.pid)
            emit(bench="http_fixed_rate", target=name, workers=2, threads=threads,
                 **{k: round(v, 3 if k.startswith("cpu") else 2) for k, v in got.items()},
                 note="open loop from one client thread on the same 2 cores")
        return cap
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def http(url: str, world: Any, d: Path, duration: float, threads: tuple[int, ...] = (1, 2)) -> None:
    env = dict(os.environ, DATABASE_URL=url, HOMEPAGE_DATA_DIR=str(d), PYTHONPATH=os.getcwd())
    serve = [sys.executable, "-m", "policy_api.cli", "serve", "--config", str(d / "homepage.toml"), "--workers", "2"]
    # the simulator's users (known to the ranker or not) and a fifth never seen before
    users = [str(u) for u in world.user_ids[:1600]] + [f"new-{k}" for k in range(400)]
    caps = {}
    for n in threads:  # request threads per worker: with more than one, a request computes while another
        port = _port()  # waits for its journal fsync, and their rows are group-committed
        cap = http_target("engine_trained", [*serve, "--threads", str(n), "--port", str(port)], env,
                          f"http://127.0.0.1:{port}", users, d, duration, loop=True, threads=n)
        if "full" not in caps or cap["req_per_s"] > caps["full"]["req_per_s"]:
            caps["full"] = cap
    # the popularity engine: a database with the same catalog and config, nothing trained
    from policy_api import registry
    from policy_api.log import make_engine, read_catalog_csv, upgrade, upsert_items

    pd = d / "pop"
    shutil.rmtree(pd, ignore_errors=True)
    pd.mkdir()
    purl = f"sqlite:///{pd / 'h.db'}"
    upgrade(purl)
    pdb = make_engine(purl)
    registry.activate_config(pdb, (d / "homepage.toml").read_text(), author="bench")
    upsert_items(pdb, read_catalog_csv(d / "items.csv").rows())
    shutil.copy(d / "homepage.toml", pd / "homepage.toml")
    port = _port()
    penv = dict(env, DATABASE_URL=purl, HOMEPAGE_DATA_DIR=str(pd))
    caps["popularity"] = http_target("engine_popularity", [*serve, "--no-loop", "--port", str(port)], penv,
                                     f"http://127.0.0.1:{port}", users, pd, duration)
    (d / "bare_app.py").write_text(FLASK_APP)
    port = _port()
    caps["flask"] = http_target("bare_flask", [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                                               "bare_app:app"], env, f"http://127.0.0.1:{port}", users, d, duration)
    emit(bench="http_summary", full_over_flask=round(caps["full"]["req_per_s"] / caps["flask"]["req_per_s"], 3),
         popularity_over_flask=round(caps["popularity"]["req_per_s"] / caps["flask"]["req_per_s"], 3),
         target_ratio=0.4)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=3000, help="in-process decisions timed")
    ap.add_argument("--log", type=int, default=3000, help="simulated visits logged to train on")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per HTTP measurement")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="request threads per worker to measure the trained engine with (homepage serve --threads)")
    ap.add_argument("--data-dir", help="keep the trained fixture here, and reuse it when it exists")
    a = ap.parse_args()
    os.environ.setdefault("HOMEPAGE_TORCH_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.data_dir) if a.data_dir else Path(tmp)
        if a.data_dir and (d / "h.db").exists():  # a fixture built by an earlier run: reuse it
            from simulator import make_world

            url, world = f"sqlite:///{d / 'h.db'}", make_world(n_users=2000, n_items=3000, seed=0)
        else:
            d.mkdir(parents=True, exist_ok=True)
            url, world = build_trained(d, n_log=a.log)
        in_process(url, world, a.decisions)
        metrics_cost()
        if not a.skip_http:
            http(url, world, d, a.duration, tuple(a.threads))
