"""The collector paused around a worker's bulk loads (``serving._gcpause``) and the worker's loaded
objects left out of collections (``serving._gunicorn``'s post-init hook)."""

from __future__ import annotations

import gc

import pytest

from policy_api.serving._gcpause import no_collections
from policy_api.serving._gunicorn import _post_worker_init


@pytest.fixture
def collector():
    was = gc.isenabled()
    gc.unfreeze()
    yield
    gc.unfreeze()
    if was:
        gc.enable()
    else:
        gc.disable()


def test_no_collection_runs_inside_and_the_collector_comes_back(collector):
    gc.enable()
    runs: list[int] = []

    def seen(phase, info):  # noqa: ANN001
        if phase == "start":
            runs.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with no_collections():
            assert not gc.isenabled()
            kept = [[i] for i in range(200_000)]  # ~285 gen-0 thresholds' worth of new containers
            assert runs == []
        assert gc.isenabled()
        more = [[i] for i in range(50_000)]
        assert runs  # collections run again once it is over
    finally:
        gc.callbacks.remove(seen)
    assert len(kept) + len(more) == 250_000
    assert gc.get_freeze_count() == 0  # nothing frozen without being asked


def test_freeze_leaves_what_the_load_kept_out_of_collections(collector):
    with no_collections(freeze=True):
        kept = [[i] for i in range(10_000)]
    assert gc.get_freeze_count() >= 10_000 + 1
    assert gc.isenabled()
    gc.disable()
    with no_collections():
        pass
    assert not gc.isenabled()  # a disabled collector stays disabled
    assert len(kept) == 10_000


def test_a_worker_freezes_what_its_app_loaded(collector):
    _post_worker_init(object())
    assert gc.get_freeze_count() > 1000  # the imports' objects, at least
