"""``homepage demo``: a closed loop over real HTTP on a simulated world, with a report.

The simulator's users ask the served API for layouts and report what they did (drawn from the
simulator's ground truth). Between phases the offline jobs run as they would in production (train
rankers, learn the bandit, plan prices, pace). The report compares the engine with a uniform-random
policy and the oracle, shows realised exposure against the operator's targets and the API latency.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

from allocator import HomepageConfig, LayoutSpace, block_table, load_config, long_tail
from simulator import make_world

from ..log import make_engine, read_catalog_csv, upgrade, upsert_items
from ._jobs import DemoContext, Pacing, between_phases
from ._phases import PhaseLog
from ._replay import validate_replay
from ._report import write_demo_report

__all__ = ["DemoSettings", "run_demo", "PhaseLog", "next_steps", "summary_lines"]


@dataclass(frozen=True)
class DemoSettings:
    n_users: int = 2000
    n_items: int = 3000
    requests: int = 4000  # per phase
    out_dir: Path = Path("homepage-data")
    seed: int = 0
    workers: int = 2
    concurrency: int = 8
    phases: tuple[str, ...] = ("explore", "serve")
    progress: bool | None = None  # None: a bar when stderr is a terminal
    pacing: bool = True  # online pacing during the phases after the first
    replay: bool = True  # replay the final phase's log and compare with the simulator's truth

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "requests", "workers", "concurrency"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``homepage serve`` as a child process (real gunicorn, real HTTP)."""

    def __init__(self, config: Path, data_dir: Path, database_url: str, workers: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, DATABASE_URL=database_url, HOMEPAGE_DATA_DIR=str(data_dir),
                   HOMEPAGE_RELOAD_S="0.5", HOMEPAGE_OPERATOR_TOKEN=os.environ.get("HOMEPAGE_OPERATOR_TOKEN", "demo"))
        self.log_path = data_dir / "server.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "policy_api.cli", "serve", "--config", str(config), "--port", str(self.port),
             # the demo runs the jobs itself between phases, so each phase is served by known versions
             "--workers", str(workers), "--no-loop"], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-2000:])
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f} s; see {self.log_path}")

    def wait_versions(self, want: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every worker reports the wanted versions (they poll the registry)."""
        t0 = time.time()
        seen: dict[str, Any] = {}
        hits = 0
        while time.time() - t0 < timeout:
            seen = requests.get(self.url + "/readyz", timeout=2).json().get("versions") or {}
            if all(seen.get(k) == v for k, v in want.items()):
                hits += 1
                if hits >= 6:  # several answers in a row: both workers have swapped
                    return seen
            else:
                hits = 0
            time.sleep(0.1)
        raise TimeoutError(f"server did not load versions {want} within {timeout:.0f} s (seen {seen})")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


class World:
    """The simulator plus the catalog mappings the demo needs."""

    def __init__(self, s: DemoSettings) -> None:
        self.world = make_world(n_users=s.n_users, n_items=s.n_items, seed=s.seed)
        self.item_index = {iid: i for i, iid in enumerate(self.world.item_ids.tolist())}
        self.cat_index = {c: i for i, c in enumerate(self.world.categories)}


def run_phase(server: Server, w: World, name: str, n: int, rng: np.random.Generator, concurrency: int,
              progress: bool) -> PhaseLog:
    """Send n layout requests and their feedback; return what happened."""
    world = w.world
    S, K = world.n_slots, world.items_per_module
    users = world.sample_users(n, rng)
    seeds = rng.integers(0, 2**63 - 1, size=n)
    slot_items = np.full((n, S, K), -1, dtype=np.int64)
    slot_cat = np.full((n, S), -1, dtype=np.int64)
    tail = np.zeros(n)
    realised = np.zeros(n)
    latency = np.zeros(n)
    fallback = np.zeros(n, dtype=bool)
    prop = np.zeros(n)
    t_end = np.zeros(n)
    rids = np.empty(n, dtype=object)
    local = threading.local()
    weights = world.event_weights
    bar = tqdm(total=n, desc=f"demo {name}", unit="req", disable=not progress, mininterval=0.5)
    lock = threading.Lock()
    errors: list[str] = []

    def one(i: int) -> None:
        sess = getattr(local, "s", None)
        if sess is None:
            sess = local.s = requests.Session()
        uid = str(world.user_ids[users[i]])
        t0 = time.perf_counter()
        r = sess.get(f"{server.url}/layout", params={"user_id": uid}, timeout=10)
        latency[i] = time.perf_counter() - t0
        if r.status_code != 200:
            with lock:
                errors.append(f"GET /layout {r.status_code}: {r.text[:200]}")
            return
        body = r.json()
        rids[i] = body["request_id"]
        fallback[i] = body["fallback"]
        prop[i] = body["propensity"]
        n_tail = n_items = 0
        for m in body["modules"]:
            s = m["slot"]
            slot_cat[i, s] = w.cat_index[m["category"]]
            idx = [w.item_index[it["item_id"]] for it in m["items"]][:K]
            slot_items[i, s, :len(idx)] = idx
            n_tail += sum(it["long_tail"] for it in m["items"])
            n_items += len(m["items"])
        tail[i] = n_tail / max(n_items, 1)
        events = world.sample_feedback(int(users[i]), slot_items[i], np.random.default_rng(int(seeds[i])))
        cat = world.item_category
        realised[i] = sum(weights.get(e, 0.0) * world.category_value[cat[it]] for _, it, e in events)
        payload = {"request_id": body["request_id"], "events": [
            {"event_id": f"{body['request_id']}:{k}", "slot": s, "item_id": str(world.item_ids[it]), "type": e}
            for k, (s, it, e) in enumerate(events)]}
        if payload["events"]:
            fr = sess.post(f"{server.url}/feedback", json=payload, timeout=10)
            if fr.status_code != 202:
                with lock:
                    errors.append(f"POST /feedback {fr.status_code}: {fr.text[:200]}")
        t_end[i] = time.time()
        bar.update(1)

    with ThreadPoolExecutor(max_workers=concurrency) as ex:
        list(ex.map(one, range(n)))
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in phase {name}; first: {errors[0]}")
    expected = world.expected_reward_batch(users, slot_items)
    return PhaseLog(name, users, slot_items, slot_cat, tail, realised, expected, latency, fallback, prop, t_end, rids)


def uniform_reward(w: World, cfg: HomepageConfig, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth value of a uniformly random layout per request: a random module in each slot
    (distinct), a random tilt level, items by the popularity ranking (same block rule as the engine)."""
    world = w.world
    n = users.size
    space = LayoutSpace.from_config(cfg)
    cats = np.array([w.cat_index[c] for c in cfg.category_names])  # config -> world category
    item_cat_cfg = np.array([cfg.category_names.index(world.categories[c]) for c in world.item_category])
    is_tail, tail = long_tail(world.popularity, item_cat_cfg, cfg.tilt.head_share)
    tbl = block_table(space, world.popularity[None, :] / world.popularity.max(), item_cat_cfg, is_tail, tail)
    M, S, K = len(cfg.modules), cfg.slots, cfg.items_per_module
    perm = np.argsort(rng.random((n, M)), axis=1)[:, :S]  # random distinct modules per request
    mod_cat = cfg.module_category()[perm]  # (n, S)
    # block of each slot = occurrences of its category in earlier slots
    block = np.zeros((n, S), dtype=np.int64)
    for s in range(1, S):
        block[:, s] = (mod_cat[:, :s] == mod_cat[:, s:s + 1]).sum(1)
    beta = rng.integers(0, space.tilt_levels.size, size=n)
    slot_items = np.full((n, S, K), -1, dtype=np.int64)
    order, rank, cs = tbl.order[0], tbl.rank[0], tbl.cat_sorted[0]
    for b in range(space.tilt_levels.size):
        for c in range(len(cfg.categories)):
            items_c = order[b][cs[b] == c]  # the category's ranking at this tilt
            for r in range(int(space.n_blocks[c])):
                blk = items_c[r * K:(r + 1) * K]
                sel = (beta[:, None] == b) & (mod_cat == c) & (block == r)
                ii, ss = np.nonzero(sel)
                slot_items[ii, ss, :blk.size] = blk
    del cats, rank
    return world.expected_reward_batch(users, slot_items)


def run_demo(s: DemoSettings, between: Callable[[str, DemoContext], None] | None = None) -> dict[str, Any]:
    """Run the closed loop; write ``<out>/report/summary.json`` and ``index.html``. Returns the summary."""
    t_start = time.time()
    progress = sys.stderr.isatty() if s.progress is None else s.progress
    data = s.out_dir / "demo"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    url = f"sqlite:///{(data / 'homepage.db').resolve()}"
    w = World(s)
    cfg_path = data / "homepage.toml"
    cfg_path.write_text(w.world.default_config_toml())
    w.world.to_catalog_csv(data / "items.csv")
    cfg = load_config(cfg_path)
    upgrade(url)
    db = make_engine(url)
    upsert_items(db, read_catalog_csv(data / "items.csv", cfg.category_names).rows())
    rng = np.random.default_rng(s.seed)
    server = Server(cfg_path, data, url, s.workers)
    phases: list[PhaseLog] = []
    jobs: list[dict[str, Any]] = []
    ctx = DemoContext(db=db, config=cfg, world=w.world, server=server, progress=progress,
                      report_dir=s.out_dir / "report", jobs=jobs)
    try:
        server.wait_ready()
        for k, name in enumerate(s.phases):
            if between is None:
                between_phases(name, ctx, first=k == 0)
            elif k > 0:
                between(name, ctx)
            if cfg.constraints and s.pacing:
                with Pacing(ctx) as pacing:
                    phases.append(run_phase(server, w, name, s.requests, rng, s.concurrency, progress))
                jobs.append({"job": "pacing", "during_phase": name, "title": "Online pacing",
                             "history": pacing.history})
            else:
                phases.append(run_phase(server, w, name, s.requests, rng, s.concurrency, progress))
    finally:
        server.stop()
    if s.replay:
        served = {str(r): float(v) for p in phases for r, v in zip(p.request_id, p.expected_reward, strict=True)}
        jobs.append(validate_replay(db, w.world, served=served))
    uniform = uniform_reward(w, cfg, phases[-1].user, np.random.default_rng(s.seed + 1))
    oracle = w.world.oracle_batch(phases[-1].user, w.world.default_modules_per_category)[1]
    summary = write_demo_report(s.out_dir / "report", cfg, w.world, phases, uniform, oracle, jobs,
                                elapsed_s=time.time() - t_start)
    summary["database_url"] = url
    summary["next_steps"] = next_steps(url, cfg_path)
    (s.out_dir / "report" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def next_steps(database_url: str, config: Path) -> list[str]:
    """The commands to run next on the demo's database (every command reads ``DATABASE_URL``)."""
    cfg = config.resolve()
    return [
        f"export DATABASE_URL={database_url}",
        "homepage versions list",
        f"homepage replay --policy {cfg} --n-boot 200     # a what-if replay of the demo's config",
        "HOMEPAGE_OPERATOR_TOKEN=change-me homepage serve --port 8000"
        "     # then open http://127.0.0.1:8000/ops",
    ]


def summary_lines(summary: dict[str, Any], report: Path) -> list[str]:
    """What ``homepage demo`` prints: the verdict and its reason, the key figures, the report, and
    the commands to run next."""
    ok = bool(summary.get("ok", True))
    lines = [f"demo {'OK' if ok else 'FAILED'}: {summary.get('requests_served', 0)} requests in "
             f"{summary.get('elapsed_s', 0.0):.0f} s"]
    lines += [f"  reason: {r}" for r in summary.get("failures", [])]
    if "engine_mean_reward" in summary:
        lines.append(f"  mean reward per request: engine {summary['engine_mean_reward']:.4f}, uniform "
                     f"{summary['uniform_mean_reward']:.4f}, oracle {summary['oracle_mean_reward']:.4f}")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    lines.append(f"report: {report}")
    if summary.get("next_steps"):
        lines.append("next, on the demo's database:")
        lines += [f"  {c}" for c in summary["next_steps"]]
    return lines
