"""Items loaded while the engine serves: are they shown, and do the good ones rise?

A world of its own (not the simulator's): three categories of 300 items each, whose quality falls with
their popularity rank (plus noise), 300 users with a Dirichlet taste over the categories, five slots of
eight items, a long-tail floor of 0.15. A client that only calls the API (``homepage db upgrade``,
``homepage catalog load``, ``homepage serve``, then ``GET /layout`` and ``POST /feedback``): each item
of a page is examined with its slot's weight times 0.85 per position within the module, and played
with its quality times 3 times the user's taste for its category (examined items are sent as
``impression`` events, plays as ``play``). After ``--before`` requests the client loads ten new songs
with popularity 0: five hits (quality 0.45, above the catalog's best) and five duds (0.02), then sends
``--after`` more requests.

Prints JSON lines: per window of ``--window`` requests the mean expected reward of the pages served
(the world's truth), how often hits and duds were shown and at which position within their module,
and the pages' long-tail share; then how many requests after the load the first new item was shown,
and each new item's examined impressions and plays. Progress on stderr.

    .venv/bin/python bench/new_items.py [--before 2000] [--after 4000] [--window 500] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_loop import Server, note  # noqa: E402

CATEGORIES = ("songs", "videos", "live")
VALUE = (1.0, 1.2, 1.5)
SLOT_WEIGHTS = (1.0, 0.8, 0.6, 0.45, 0.35)
CONFIG = """[homepage]
slots = 5
position_weights = [1.0, 0.8, 0.6, 0.45, 0.35]
items_per_module = 8

[[categories]]
name = "songs"
value_per_engagement = 1.0

[[categories]]
name = "videos"
value_per_engagement = 1.2

[[categories]]
name = "live"
value_per_engagement = 1.5

[[modules]]
id = "songs_for_you"
category = "songs"

[[modules]]
id = "new_songs"
category = "songs"

[[modules]]
id = "videos_for_you"
category = "videos"

[[modules]]
id = "trending_videos"
category = "videos"

[[modules]]
id = "live_now"
category = "live"

[events]
play = 1.0
full_play = 2.0
favorite = 3.0
share = 4.0
skip = -0.3

[tilt]
levels = [0.0, 0.25, 0.5]
head_share = 0.8

[[constraints]]
name = "long_tail"
kind = "long_tail_share"
min = 0.15
"""


def emit(**kw: Any) -> None:
    print(json.dumps({"bench": "new_items", **kw, "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


class World:
    """The catalog's truth: each item's quality and category, each user's taste."""

    def __init__(self, seed: int, n_per: int = 300, n_users: int = 300) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.quality: dict[str, float] = {}
        self.category: dict[str, int] = {}
        self.rows: list[tuple[str, str, float]] = []
        rank = np.arange(n_per) / n_per
        for c, name in enumerate(CATEGORIES):
            pop = np.sort(rng.pareto(1.2, n_per) * 100 + 1)[::-1]
            quality = np.clip(0.30 * (1 - rank) ** 2 + 0.03 + rng.normal(0, 0.03, n_per), 0.01, 0.5)
            for k in range(n_per):
                iid = f"{name}-{k:04d}"
                self.rows.append((iid, name, round(float(pop[k]), 3)))
                self.quality[iid], self.category[iid] = float(quality[k]), c
        self.taste = rng.dirichlet(np.full(len(CATEGORIES), 0.7), size=n_users)
        self.hits = [f"new-hit-{k}" for k in range(5)]
        self.duds = [f"new-dud-{k}" for k in range(5)]

    def add_new(self) -> list[tuple[str, str, float]]:
        for iid in self.hits:
            self.quality[iid], self.category[iid] = 0.45, 0
        for iid in self.duds:
            self.quality[iid], self.category[iid] = 0.02, 0
        return [(iid, "songs", 0.0) for iid in self.hits + self.duds]

    def respond(self, user: int, body: dict[str, Any]) -> tuple[float, list[dict[str, Any]], list[tuple[str, int]], float]:
        """(expected reward, events, new items shown with their position, long-tail share) of one page."""
        events: list[dict[str, Any]] = []
        new: list[tuple[str, int]] = []
        expected, tail, shown = 0.0, 0, 0
        rid = body["request_id"]
        for m in body["modules"]:
            w = SLOT_WEIGHTS[m["slot"]]
            for j, it in enumerate(m["items"]):
                iid = it["item_id"]
                shown += 1
                tail += bool(it["long_tail"])
                if iid.startswith("new-"):
                    new.append((iid, j))
                c = self.category[iid]
                examine = w * 0.85**j
                play = min(0.95, self.quality[iid] * 3.0 * self.taste[user, c])
                expected += examine * play * VALUE[c]
                if self.rng.random() < examine:
                    events.append({"event_id": f"{rid}/i{m['slot']}.{j}", "slot": m["slot"], "item_id": iid,
                                   "type": "impression"})
                    if self.rng.random() < play:
                        events.append({"event_id": f"{rid}/p{m['slot']}.{j}", "slot": m["slot"], "item_id": iid,
                                       "type": "play"})
        return expected, events, new, tail / max(shown, 1)


def write_catalog(path: Path, rows: list[tuple[str, str, float]]) -> None:
    path.write_text("item_id,category,popularity\n" + "".join(f"{i},{c},{p}\n" for i, c, p in rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=int, default=2000, help="requests before the new items are loaded")
    ap.add_argument("--after", type=int, default=4000, help="requests after")
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    world = World(args.seed)
    with tempfile.TemporaryDirectory(prefix="homepage-new-items-") as tmp:
        folder = Path(tmp)
        (folder / "homepage.toml").write_text(CONFIG)
        write_catalog(folder / "items.csv", world.rows)
        srv = Server(folder, args.workers)
        srv.cli("db", "upgrade")
        srv.cli("catalog", "load", "items.csv", "--config", "homepage.toml")
        srv.start()
        try:
            note(f"ready in {srv.wait_ready():.1f} s")
            sess = requests.Session()
            n = args.before + args.after
            reward, tail_share = np.zeros(n), np.zeros(n)
            shown: list[list[tuple[str, int]]] = [[] for _ in range(n)]
            for r in range(n):
                if r == args.before:
                    write_catalog(folder / "new.csv", world.add_new())
                    srv.cli("catalog", "load", "new.csv", "--config", "homepage.toml")
                    note(f"loaded {len(world.hits) + len(world.duds)} new items at request {r}")
                user = int(world.rng.integers(world.taste.shape[0]))
                body = sess.get(srv.url + "/layout", params={"user_id": f"u{user}"}, timeout=10).json()
                reward[r], events, shown[r], tail_share[r] = world.respond(user, body)
                if events:
                    sess.post(srv.url + "/feedback", json={"request_id": body["request_id"], "events": events},
                              timeout=10).raise_for_status()
                if (r + 1) % args.window == 0:
                    note(f"{r + 1} requests")
            for a in range(0, n, args.window):
                part = shown[a:a + args.window]
                hits = [j for page in part for iid, j in page if "hit" in iid]
                duds = [j for page in part for iid, j in page if "dud" in iid]
                emit(requests=[a, min(a + args.window, n)], after_load=a >= args.before,
                     expected_reward=round(float(reward[a:a + args.window].mean()), 4),
                     reward_se=round(float(reward[a:a + args.window].std(ddof=1) / np.sqrt(len(part))), 4),
                     hits_shown=len(hits), hit_position=round(float(np.mean(hits)), 2) if hits else None,
                     duds_shown=len(duds), long_tail_share=round(float(tail_share[a:a + args.window].mean()), 4))
            first = next((r - args.before for r in range(args.before, n) if shown[r]), None)
            time.sleep(1.0)  # the last feedback reaches the log
            import sqlalchemy as sa

            eng = sa.create_engine(f"sqlite:///{folder / 'homepage.db'}")
            with eng.connect() as conn:
                got = conn.execute(sa.text(
                    "SELECT item_id, SUM(type = 'impression'), SUM(type = 'play') FROM feedback "
                    "WHERE item_id LIKE 'new-%' GROUP BY item_id ORDER BY item_id")).all()
            eng.dispose()
            emit(summary=True, first_new_item_after_requests=first,
                 new_items={str(i): {"examined": int(e), "plays": int(p)} for i, e, p in got},
                 reward_before_load=round(float(reward[:args.before].mean()), 4),
                 reward_last_half_after=round(float(reward[args.before + args.after // 2:].mean()), 4))
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
