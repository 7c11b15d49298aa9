"""The garbage collector paused around a worker's bulk loads.

A load that allocates a few hundred thousand objects (an engine state: the catalog, the model, the
calibration; the ops console's first read of its window) triggers the collector again and again as they
pile up, and each full collection scans every object of the process: 90-190 ms on this engine, during
which the worker's requests wait for the interpreter. The load's own garbage goes with reference
counting; what it keeps can be frozen, left out of later collections.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["no_collections"]


@contextmanager
def no_collections(*, freeze: bool = False) -> Iterator[None]:
    """No automatic collection inside; with ``freeze``, every object alive at the end is left out of
    later collections (:func:`gc.freeze`: for what lives until the next load; anything in a reference
    cycle it froze stays until the process ends)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()
