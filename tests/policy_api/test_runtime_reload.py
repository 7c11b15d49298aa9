"""What a serving worker reloads when something is published (a real SQLite database, the real VW
bandit): new prices and a new bandit are swapped into the state it holds, without reading the catalog
or the ranker again; a changed catalog or a new ranker or config loads the state anew."""

from __future__ import annotations

import numpy as np

from policy_api import registry
from policy_api.jobs import new_bandit
from policy_api.log import make_engine, read_catalog_csv, upgrade, upsert_items
from policy_api.serving._runtime import Runtime
from policy_api.settings import Settings
from simulator import make_world


def _database(tmp_path):
    """A migrated SQLite log holding a small world's catalog and its config (active), a runtime on it
    that reloads only when told, its engine, the config's version and the catalog."""
    world = make_world(n_users=30, n_items=200, seed=3)
    url = f"sqlite:///{tmp_path / 'homepage.db'}"
    upgrade(url)
    world.to_catalog_csv(tmp_path / "items.csv")
    rt = Runtime(Settings(database_url=url, data_dir=tmp_path, reload_s=0, journal=False))
    db = make_engine(url)
    version = registry.activate_config(db, world.default_config_toml(), author="test")
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    return rt, db, version, cat


def test_prices_and_a_new_bandit_are_swapped_in_without_a_reload(tmp_path):
    rt, db, version, cat = _database(tmp_path)
    try:
        cfg = registry.require_active_config(db).config
        names = cfg.constraint_names
        registry.publish_plan(db, version, {n: 0.1 for n in names})
        rt.start()
        first = rt.engine.state
        assert rt.reload() is False  # nothing new

        # a new bandit and new prices: both in the state, the catalog and the scorer the same objects
        bandit = new_bandit(cfg)
        artifact = bandit.save()
        registry.publish_model(db, "bandit", {"rounds": 1}, artifact)
        prices = {n: 0.2 * (k + 1) for k, n in enumerate(names)}
        registry.publish_plan(db, version, prices)
        assert rt.reload() is True
        st = rt.engine.state
        assert st.catalog is first.catalog and st.scorer is first.scorer
        assert st.bandit is not None and st.bandit.save() == artifact
        assert st.versions["bandit"] == registry.model(db, "bandit").version
        assert st.versions["plan"] == registry.latest_plan(db, version).version
        np.testing.assert_allclose(st.prices, [prices[n] for n in names])

        # the catalog changed (an item's popularity), then a bandit is published: the state is loaded anew
        rows = cat.rows()
        rows[0] = {**rows[0], "popularity": float(rows[0]["popularity"]) + 1000.0}
        upsert_items(db, rows[:1])
        registry.publish_model(db, "bandit", {"rounds": 2}, artifact)
        assert rt.reload() is True
        st2 = rt.engine.state
        assert st2.catalog is not first.catalog
        row = st2.catalog.index_of()[str(rows[0]["item_id"])]
        assert st2.catalog.popularity[row] == float(rows[0]["popularity"])
        assert st2.versions["bandit"] == registry.model(db, "bandit").version
    finally:
        rt.close()
        db.dispose()


def test_a_catalog_loaded_while_serving_is_taken_up_with_nothing_else_published(tmp_path):
    """Items loaded while a worker serves, with no model, plan or config published after them: the
    worker's next poll loads the catalog (it used to wait for the next model it loaded), and only then."""
    rt, db, _, cat = _database(tmp_path)
    try:
        rt.start()
        first = rt.engine.state
        assert rt.reload() is False
        row = {**cat.rows()[0], "item_id": "loaded-later", "popularity": 0.0}
        upsert_items(db, [row])
        assert rt.reload() is True
        st = rt.engine.state
        assert "loaded-later" in st.catalog.index_of() and st.catalog.n_items == first.catalog.n_items + 1
        assert st.scorer is not first.scorer  # the scorer's item rows follow the catalog
        assert rt.reload() is False
    finally:
        rt.close()
        db.dispose()
