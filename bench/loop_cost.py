"""What the live loop costs the requests: ``GET /layout`` latency with the loop running against the same
engine without it (issue 9's target: p99 with the loop within 20 % of p99 without).

Setup as a user runs it (the simulator's catalog and config, ``homepage db upgrade``, ``homepage
catalog load``, ``homepage serve``); then a warm-up of ``--warmup`` requests from the simulator's
users (``GET /layout``, then ``POST /feedback`` with the events the simulator draws), so that the loop
has planned, paced, calibrated, learned and trained. Then three phases of the same traffic, an open
loop at ``--rate`` requests/s for ``--duration`` seconds each (every request followed by its
feedback, as a homepage service sends it):

1. ``loop``: the server as it ran the warm-up (the loop working on the traffic as it comes);
2. ``no_loop``: the same database served by ``homepage serve --no-loop`` (the same published plan,
   ranker and bandit; nothing learned meanwhile);
3. ``loop_again``: ``homepage serve`` again (so that a machine whose load moved shows it).

Latency is counted from each request's scheduled send time (a server that falls behind is charged
for the wait) by the client, and by the server's own ``homepage_layout_seconds`` histogram. Prints
JSON lines; progress on stderr.

    .venv/bin/python bench/loop_cost.py [--rate 80] [--duration 60] [--warmup 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_loop import Geometry, Server, drive, histogram_quantiles, layout_histogram, note  # noqa: E402

from allocator import parse_config_text  # noqa: E402
from simulator import make_world  # noqa: E402


def emit(**kw: Any) -> None:
    kw = {"bench": "loop_cost", **kw, "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(kw), flush=True)


def open_loop(server: Server, world: Any, geo: Geometry, users: np.ndarray, rate: float, seed: int,
              dump: str | None = None) -> dict[str, Any]:
    """``users.size`` requests at ``rate``/s, each ``GET /layout`` then ``POST /feedback``; client latency
    of ``GET /layout`` from each request's scheduled time (ms), errors, achieved rate."""
    n = users.size
    lat = np.full(n, np.nan)
    vers: list[Any] = [None] * n
    errors: list[str] = []
    lock = threading.Lock()
    local = threading.local()
    seeds = np.random.default_rng([seed, 3]).integers(0, 2**63 - 1, size=n)
    t0 = time.perf_counter() + 0.2

    def one(i: int) -> None:
        due = t0 + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sess = getattr(local, "s", None)
        if sess is None:
            sess = local.s = requests.Session()
        uid = str(world.user_ids[users[i]])
        try:
            r = sess.get(f"{server.url}/layout", params={"user_id": uid}, timeout=30)
            lat[i] = (time.perf_counter() - due) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"GET /layout {r.status_code}: {r.text[:200]}")
            body = r.json()
            vers[i] = body.get("versions")
            items = np.full((geo.S, geo.K), -1, dtype=np.int64)
            for m in body["modules"]:
                ids = [geo.item_index[it["item_id"]] for it in m["items"]][:geo.K]
                items[int(m["slot"]), :len(ids)] = ids
            events = world.sample_feedback(int(users[i]), items, np.random.default_rng(int(seeds[i])))
            if events:
                payload = {"request_id": body["request_id"], "events": [
                    {"event_id": f"{body['request_id']}:{k}", "slot": s, "item_id": str(world.item_ids[it]), "type": e}
                    for k, (s, it, e) in enumerate(events)]}
                fr = sess.post(f"{server.url}/feedback", json=payload, timeout=30)
                if fr.status_code != 202:
                    raise RuntimeError(f"POST /feedback {fr.status_code}: {fr.text[:200]}")
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=32) as ex:
        list(ex.map(one, range(n)))
    wall = time.perf_counter() - start
    ok = lat[np.isfinite(lat)]
    if dump:
        np.savez(dump, latency_ms=lat, versions=np.array([json.dumps(v) for v in vers]))
    return {"requests": n, "achieved_rps": round(n / wall, 1), "errors": len(errors), "first_error": errors[:1],
            "client_p50_ms": round(float(np.percentile(ok, 50)), 2), "client_p90_ms": round(float(np.percentile(ok, 90)), 2),
            "client_p99_ms": round(float(np.percentile(ok, 99)), 2), "client_max_ms": round(float(ok.max()), 2)}


def loop_cpu_s(server: Server) -> float | None:
    """CPU seconds of the loop's process (``homepage worker``) under ``server``, if it runs."""
    if server.proc is None:
        return None
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-g", str(server.proc.pid)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if " worker" in line and "policy_api.cli" in line:
            pid = line.split()[0]
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=80.0, help="requests/s of each measured phase")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of each measured phase")
    ap.add_argument("--warmup", type=int, default=3000, help="requests before the phases (closed loop, 4 threads)")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", metavar="PREFIX", help="save each phase's per-request latency and versions to PREFIX-<phase>.npz")
    a = ap.parse_args()
    world = make_world(n_users=a.users, n_items=a.items, seed=a.seed)
    config_text = world.default_config_toml()
    folder = Path(tempfile.mkdtemp(prefix="homepage_loop_cost_"))
    (folder / "homepage.toml").write_text(config_text)
    world.to_catalog_csv(folder / "items.csv")
    geo = Geometry(world, parse_config_text(config_text))
    rng = np.random.default_rng([a.seed, 1])
    emit(event="setup", folder=str(folder), rate=a.rate, duration_s=a.duration, warmup=a.warmup, cpus=os.cpu_count(),
         load_avg=os.getloadavg())
    server: Server = Server(folder, workers=2)
    n = int(a.rate * a.duration)
    try:
        server.cli("db", "upgrade")
        server.cli("catalog", "load", "items.csv", "--config", "homepage.toml")
        server.start()
        server.wait_ready()
        users = world.sample_users(a.warmup, rng)
        drive(server, [world], np.zeros(users.size, dtype=np.int64), users, geo, 4, a.seed, "warm-up")
        emit(event="warmed_up", readyz=server.get_json("/readyz").get("body", {}).get("versions"))
        results = {}
        for phase in ("loop", "no_loop", "loop_again"):
            if phase != "loop":
                server.stop()
                server = Server(folder, workers=2, extra=("--no-loop",) if phase == "no_loop" else ())
                server.start()
                server.wait_ready()
                time.sleep(5)  # the workers load the published versions; the loop takes its lease
            note(f"{phase}: {n} requests at {a.rate:g}/s")
            users = world.sample_users(n, rng)
            h0, cpu0 = layout_histogram(server), loop_cpu_s(server)
            got = open_loop(server, world, geo, users, a.rate, a.seed + len(results),
                            dump=f"{a.dump}-{phase}.npz" if a.dump else None)
            cpu1 = loop_cpu_s(server)
            got["server_side"] = histogram_quantiles(h0, layout_histogram(server))
            got["loop_cpu_s"] = None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2)
            got["versions"] = server.get_json("/readyz").get("body", {}).get("versions")
            results[phase] = got
            emit(phase=phase, **got)
        base = results["no_loop"]["client_p99_ms"]
        emit(summary=True, target="p99 with the loop <= 1.2 x p99 without",
             p99_ratio_loop=round(results["loop"]["client_p99_ms"] / base, 3),
             p99_ratio_loop_again=round(results["loop_again"]["client_p99_ms"] / base, 3))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
