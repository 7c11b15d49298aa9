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

from .test_api import Server, homepage


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
        # the page the newcomer acts on: the first that shows a head item (a page at the top tilt level
        # shows the long tail alone: about 1 first page in 100 at the catalog's prices)
        cats: list[str] = []
        for _ in range(20):
            cats = [m["category"] for m in first["modules"] if any(it["item_id"] in head for it in m["items"])]
            if cats:
                break
            first = requests.get(srv.url + "/layout", params={"user_id": "newcomer"}, timeout=5).json()
        assert cats, "twenty pages showed no head item at all"
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


@pytest.mark.slow
def test_items_loaded_while_serving_are_shown(tmp_path):
    """A catalog grows while `homepage serve` runs: items loaded after serving began, the least popular
    of their category (so no value-greedy module would ever show them), are shown by the next pages.
    With `new_item_share = 1` every live module showing a long-tail item shows exactly one of them, as
    its last long-tail item, and never one twice on a page; the modules of other categories none."""
    srv = Server(tmp_path)
    try:
        for k in range(20):
            requests.get(srv.url + "/layout", params={"user_id": f"u{k}"}, timeout=5).raise_for_status()
        text = srv.config.read_text().replace("[exploration]", "[exploration]\nnew_item_share = 1.0")
        applied = tmp_path / "applied.toml"
        applied.write_text(text)
        homepage("config", "apply", str(applied), env=srv.env)
        deadline = time.time() + 20
        while srv.count("decisions") == 0 and time.time() < deadline:
            time.sleep(0.2)
        assert srv.count("decisions") > 0
        new_ids = ["fresh-live-1", "fresh-live-2"]
        fresh = tmp_path / "fresh.csv"
        header = (tmp_path / "items.csv").read_text().splitlines()[0]
        n_features = len(header.split(",")) - 3
        fresh.write_text(header + "\n" + "".join(f"{i},live,0.0{',0.0' * n_features}\n" for i in new_ids))
        homepage("catalog", "load", str(fresh), "--config", str(applied), env=srv.env)
        k = 0
        deadline = time.time() + 20
        while time.time() < deadline:  # the first page that shows one: that worker has the new catalog
            body = requests.get(srv.url + "/layout", params={"user_id": f"v{k % 40}"}, timeout=5).json()
            k += 1
            if any(it["item_id"] in new_ids for m in body["modules"] for it in m["items"]):
                break
        else:
            pytest.fail("the new items were never shown")
        time.sleep(2.5)  # every worker polls the catalog every second: all have taken it up by now
        pages = [requests.get(srv.url + "/layout", params={"user_id": f"v{j % 40}"}, timeout=5).json()
                 for j in range(k, k + 130)]
        eligible, shown_ids = 0, set()
        for body in pages:
            page = [it["item_id"] for m in body["modules"] for it in m["items"]]
            assert len(page) == len(set(page))
            for m in body["modules"]:
                items = [it["item_id"] for it in m["items"]]
                fresh_at = [j for j, i in enumerate(items) if i in new_ids]
                tails = [j for j, it in enumerate(m["items"]) if it["long_tail"]]
                if m["category"] != "live":
                    assert not fresh_at
                elif tails and len(shown_ids & set(page)) < len(new_ids):
                    eligible += 1
                    assert len(fresh_at) == 1 and fresh_at[0] == tails[-1], m
                shown_ids.update(items[j] for j in fresh_at)
        assert eligible >= 10 and shown_ids == set(new_ids)
    finally:
        assert srv.stop() == 0
