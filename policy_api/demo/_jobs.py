"""The jobs the demo runs between phases, as production would: each publishes a version and the
serving workers swap to it (the demo waits until they have)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy.engine import Engine
from tqdm import tqdm

from allocator import HomepageConfig
from simulator import World

from .. import jobs, registry
from ..errors import Infeasible
from ..log import Catalog, load_items
from ..reports import write_train_report

__all__ = ["FIRST_JOBS", "JOBS", "DemoContext", "Pacing", "between_phases"]


class VersionWaiter(Protocol):
    def wait_versions(self, want: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]: ...


@dataclass
class DemoContext:
    """What the demo's jobs share: the database, the config, the simulated world, the server, the report."""

    db: Engine
    config: HomepageConfig
    world: World
    server: VersionWaiter
    progress: bool
    report_dir: Path
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _plan(phase: str, ctx: DemoContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = jobs.plan(ctx.db, users=1500, seed=0)
    except Infeasible as e:
        return {"title": "Plan", "infeasible": e.message}
    return {"title": "Plan (LP prices for the exposure constraints)", "plan_version": res.plan_version,
            "seconds": time.perf_counter() - t0, "prices": res.prices, "projected": res.projected,
            "solver": res.solver, "wait_versions": {"plan": res.plan_version}}


def _learn(phase: str, ctx: DemoContext) -> dict[str, Any]:
    # the demo's feedback arrives within the second: close every window now rather than waiting an hour
    out = jobs.learn(ctx.db, until=datetime.now(tz=UTC) + timedelta(seconds=ctx.config.learning.reward_window_s))
    if out is None:
        return {"title": "Bandit learner", "skipped": "not enough decisions"}
    return {"title": "Bandit learner (VW cb_explore_adf on the Lagrangian reward)", **out.metrics(),
            "bandit_version": out.bandit_version, "wait_versions": {"bandit": out.bandit_version}}


def _train(phase: str, ctx: DemoContext) -> dict[str, Any]:
    db, world = ctx.db, ctx.world
    catalog = Catalog.from_arrays(load_items(db))
    items = np.asarray(catalog.item_ids, dtype=str)
    w_item = {iid: i for i, iid in enumerate(world.item_ids.tolist())}
    w_user = {uid: i for i, uid in enumerate(world.user_ids.tolist())}
    cat_to_world = np.array([w_item[i] for i in items.tolist()])
    # the user index space the ranker is trained in
    user_ids: list[str] = jobs.log_training_arrays(db, catalog)["user_ids"]

    def truth(user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        u = np.array([w_user.get(user_ids[k], 0) for k in np.asarray(user_idx).tolist()])
        return world.true_preference(u, cat_to_world[np.asarray(item_idx)])

    with tqdm(desc="train rankers", unit="epoch", disable=not ctx.progress) as bar:
        # as the loop does: published only if it also beats every baseline on the held-out test split
        res = jobs.train_ranker(db, registry.require_active_config(db), true_relevance=truth,
                                on_epoch=lambda epoch, total, m: bar.update(1), require_test=True)
    # its own folder: `homepage train` writes train.txt/train.png into the report folder and must not
    # overwrite the demo's
    write_train_report(ctx.report_dir / "demo-train", res)
    out = {"title": "Rankers (trained on the exploration phase's log)", **res.metrics,
           "published": res.published, "figures": ["demo-train/train.png"],
           "table_html": "<pre>" + res.text.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"}
    if res.published is not None:
        out["wait_versions"] = {"ranker": res.published}
    return out


#: (name, job) pairs run in order between phases; each job returns a dict for the report and may
#: return "wait_versions" naming the versions the server must load before traffic resumes.
JOBS: list[tuple[str, Callable[[str, DemoContext], dict[str, Any]]]] = [
    ("train", _train), ("plan", _plan), ("learn", _learn)]

#: before the first phase only the plan runs: the engine serves its exposure goals from the start
FIRST_JOBS = ("plan",)


def between_phases(phase: str, ctx: DemoContext, first: bool = False) -> None:
    want: dict[str, Any] = {}
    for name, job in JOBS:
        if first and name not in FIRST_JOBS:
            continue
        out = job(phase, ctx)
        out.setdefault("job", name)
        out.setdefault("before_phase", phase)
        want.update(out.pop("wait_versions", {}) or {})
        ctx.jobs.append(out)
    if want:
        ctx.server.wait_versions(want)


class Pacing:
    """Online pacing while a phase runs: every ``every_s`` seconds, realised exposure over the last
    ``window_s`` moves the prices (a new plan version the workers swap to). Keeps the trajectory."""

    def __init__(self, ctx: DemoContext, every_s: float = 2.0, window_s: float = 6.0, step: float = 0.5) -> None:
        self.ctx, self.every_s, self.window_s, self.step = ctx, every_s, window_s, step
        self.history: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-pacing", daemon=True)

    def __enter__(self) -> Pacing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        t0 = time.time()
        while not self._stop.wait(self.every_s):
            out = jobs.pace(self.ctx.db, window_s=self.window_s, step_size=self.step, min_decisions=30)
            if out is not None:
                self.history.append({"plan_version": out.plan_version, "prices": out.prices,
                                     "realised": out.realised, "n_decisions": out.n_decisions,
                                     "t": time.time() - t0})
