"""Fixtures shared by the serving tests that run on a simulator world."""

from __future__ import annotations

import numpy as np
import pytest

from allocator import parse_config_text
from policy_api.engine import build_state
from simulator import make_world
from tests.test_common import world_catalog


@pytest.fixture()
def world_state():
    """A small simulator world, its config and catalog, and the engine state built from them."""
    world = make_world(n_users=60, n_items=600, seed=2)
    cfg = parse_config_text(world.default_config_toml())
    cat = world_catalog(world)
    return world, cfg, cat, build_state(cfg, cat, prices=np.zeros(2))
