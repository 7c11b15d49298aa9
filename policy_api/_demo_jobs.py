"""The offline jobs the demo runs between phases, as production would: each publishes a version and
the serving workers swap to it (the demo waits until they have)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["between_phases", "JOBS", "Pacing"]

#: (name, job) pairs run in order between phases; each job returns a dict for the report and may
#: return "wait_versions" naming the versions the server must load before traffic resumes.
def _plan(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from ._jobs_plan import plan_job

    return plan_job(phase, ctx)


def _learn(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    from ._jobs_bandit import learn_once

    # the demo's feedback arrives within the second: close every window now rather than waiting an hour
    out = learn_once(ctx["db"], until=datetime.now(tz=UTC) + timedelta(seconds=ctx["config"].learning.reward_window_s))
    if out is None:
        return {"title": "Bandit learner", "skipped": "not enough decisions"}
    return {"title": "Bandit learner (VW cb_explore_adf on the Lagrangian reward)", **out,
            "wait_versions": {"bandit": out["bandit_version"]}}


def _train(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from . import _store as store
    from ._jobs_train import train_ranker, write_train_report

    db, world, cfg = ctx["db"], ctx["world"], ctx["config"]
    items = np.asarray(store.load_items(db)["item_ids"], dtype=str)
    w_item = {iid: i for i, iid in enumerate(world.item_ids.tolist())}
    w_user = {uid: i for i, uid in enumerate(world.user_ids.tolist())}
    cat_to_world = np.array([w_item[i] for i in items.tolist()])
    user_ids: list[str] = []

    def truth(user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        u = np.array([w_user.get(user_ids[k], 0) for k in np.asarray(user_idx).tolist()])
        return world.true_preference(u, cat_to_world[np.asarray(item_idx)])

    from ._catalog import Catalog
    from ._jobs_train import log_training_arrays  # the user index space the ranker is trained in

    user_ids.extend(log_training_arrays(db, cfg, Catalog.from_arrays(store.load_items(db)))["user_ids"])
    res = train_ranker(db, cfg, true_relevance=truth, progress=ctx["progress"])
    write_train_report(ctx["report_dir"], res)
    out = {"title": "Rankers (trained on the exploration phase's log)", **res["metrics"],
           "published": res["published"], "figures": ["train.png"],
           "table_html": "<pre>" + res["text"].replace("&", "&amp;").replace("<", "&lt;") + "</pre>"}
    if res["published"] is not None:
        out["wait_versions"] = {"ranker": res["published"]}
    return out


JOBS: list[tuple[str, Callable[[str, dict[str, Any]], dict[str, Any]]]] = [
    ("train", _train), ("plan", _plan), ("learn", _learn)]


#: before the first phase only the plan runs: the engine serves its exposure goals from the start
FIRST_JOBS = ("plan",)


def between_phases(phase: str, ctx: dict[str, Any], first: bool = False) -> None:
    want: dict[str, Any] = {}
    for name, job in JOBS:
        if first and name not in FIRST_JOBS:
            continue
        out = job(phase, ctx)
        out.setdefault("job", name)
        out.setdefault("before_phase", phase)
        want.update(out.pop("wait_versions", {}) or {})
        ctx["jobs"].append(out)
    if want:
        ctx["server"].wait_versions(want)


class Pacing:
    """Online pacing while a phase runs: every ``every_s`` seconds, realised exposure over the last
    ``window_s`` moves the prices (a new plan version the workers swap to). Keeps the trajectory."""

    def __init__(self, ctx: dict[str, Any], every_s: float = 2.0, window_s: float = 6.0, step: float = 0.5) -> None:
        import threading

        self.ctx, self.every_s, self.window_s, self.step = ctx, every_s, window_s, step
        self.history: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-pacing", daemon=True)

    def __enter__(self) -> Pacing:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import time

        from ._jobs_plan import pace_once

        t0 = time.time()
        while not self._stop.wait(self.every_s):
            out = pace_once(self.ctx["db"], window_s=self.window_s, step_size=self.step, min_decisions=30)
            if out is not None:
                out["t"] = time.time() - t0
                self.history.append(out)
