"""`homepage serve` as users run it: the loop plans before the first request, and what a user does is
seen by that user's next request on any worker within a fraction of a second (the live state)."""

from __future__ import annotations

import json
import time
import tomllib

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from .test_api import Server


@pytest.mark.slow
def test_serve_plans_first_and_personalises_from_live_feedback(tmp_path):
    srv = Server(tmp_path)
    try:
        first = requests.get(srv.url + "/layout", params={"user_id": "newcomer"}, timeout=5).json()
        # constraints hold from request 1: the first decision already carries the plan's prices
        assert first["versions"]["plan"] is not None and first["live_state"] in ("cold", "timeout")
        ready = requests.get(srv.url + "/readyz", timeout=5).json()
        deadline = time.time() + 10
        while (ready.get("loop") or {}).get("role") != "active" and time.time() < deadline:
            time.sleep(0.3)
            ready = requests.get(srv.url + "/readyz", timeout=5).json()
        assert ready["loop"]["role"] == "active" and ready["loop"]["live"] is True
        # the newcomer favourites everything in the page's least popular category among those whose
        # module shows a head item (the state's category sums count head items only: every user skips
        # most long-tail items, so tail events say more about the page's mix than about the user)
        world = srv.world
        head_share = tomllib.loads(srv.config.read_text())["tilt"]["head_share"]
        head: set[str] = set()  # per category, the most popular items until they hold head_share of it
        for c in range(len(world.categories)):
            members = [k for k in range(world.n_items) if int(world.item_category[k]) == c]
            members.sort(key=lambda k: (-float(world.popularity[k]), k))
            total, before = sum(float(world.popularity[k]) for k in members), 0.0
            for k in members:
                if before < head_share * total:
                    head.add(str(world.item_ids[k]))
                before += float(world.popularity[k])
        cats = [m["category"] for m in first["modules"] if any(it["item_id"] in head for it in m["items"])]
        assert cats, "the first page shows no head item at all"
        pop = {c: 0.0 for c in cats}
        for c, p in zip(world.item_category.tolist(), world.popularity.tolist(), strict=True):
            name = world.categories[c]
            if name in pop:
                pop[name] += p
        target = min(pop, key=pop.get)
        items = [(m["slot"], it["item_id"]) for m in first["modules"] if m["category"] == target for it in m["items"]]
        events = [{"event_id": f"{first['request_id']}/{k}", "slot": s, "item_id": i, "type": "favorite"}
                  for k, (s, i) in enumerate(items)]
        t_post = time.time()
        r = requests.post(srv.url + "/feedback", json={"request_id": first["request_id"], "events": events}, timeout=5)
        assert r.status_code == 202
        seen = None
        while time.time() - t_post < 3.0 and seen is None:
            # several requests: the two workers answer in turn, each must see the state
            got = [requests.get(srv.url + "/layout", params={"user_id": "newcomer"}, timeout=5).json()
                   for _ in range(4)]
            if all(g["live_state"] == "hit" for g in got):
                seen = time.time() - t_post
        assert seen is not None, "the live state never reached the workers"
        assert seen < 1.0  # the loop tails the log every 50 ms; the writer flushes every 50 ms
        # the decision rows reach the log (the writer's batches: a loaded machine may take a while)
        eng = sa.create_engine(f"sqlite:///{srv.db_path}")
        ctx: list[dict] = []
        t_log = time.time()
        while time.time() - t_log < 10.0 and not (ctx and ctx[-1]["live"] == "hit"):
            with eng.connect() as c:
                rows = c.execute(sa.text("SELECT context FROM decisions WHERE user_id = 'newcomer' ORDER BY ts")).all()
            ctx = [json.loads(r[0]) for r in rows]
            time.sleep(0.1)
        eng.dispose()
        names = [c for c in world.categories]
        cfg_names = [line.split('"')[1] for line in srv.config.read_text().splitlines()
                     if line.startswith("name = ") and '"' in line][: len(names)]
        k = cfg_names.index(target)
        before, after = np.array(ctx[0]["shared"][1:]), np.array(ctx[-1]["shared"][1:])
        # the user's preference for that category went up from the population's share (and sums to 1)
        assert ctx[-1]["live"] == "hit"
        assert after[k] > before[k] + 0.2 and abs(after.sum() - 1.0) < 1e-9
    finally:
        assert srv.stop() == 0
