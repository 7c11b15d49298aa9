"""Request threads of one worker (``homepage serve --threads N``) share its process-wide state."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = r"""
import threading
from policy_api.engine import Decision
from policy_api.serving import _metrics

d = Decision("r", "u", 0.0, "bandit", {}, {}, [], [1.0], 0, 1.0, [], elapsed_s=0.001)
n = 16
start = threading.Barrier(n)
errors = []

def first_request():
    start.wait()
    try:
        _metrics.observe_layout(d, 0.002)
    except Exception as e:
        errors.append(repr(e))

threads = [threading.Thread(target=first_request) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
from prometheus_client import REGISTRY
count = REGISTRY.get_sample_value("homepage_layout_requests_total", {"policy": "bandit", "fallback": "false"})
print(len(errors), count, errors[:1])
"""


@pytest.mark.slow
def test_the_first_requests_of_several_threads_register_the_metrics_once():
    # before: each racing thread registered the metrics anew and all but one failed with a 500
    # (DuplicateTimeseries); a fresh interpreter, so the metrics do not exist yet
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.split()
        assert out[:2] == ["0", "16.0"], out
