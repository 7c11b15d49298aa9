"""`homepage demo` at a small size: the closed loop over real HTTP, its report and its checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def test_demo_small(tmp_path):
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-m", "policy_api.cli", "demo", "--requests", "400",
                        "--concurrency", "4", "--out", str(tmp_path)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = tmp_path / "report"
    s = json.loads((report / "summary.json").read_text())
    for name in ("index.html", "rewards.png", "exposure.png", "latency.png"):
        assert (report / name).stat().st_size > 1000, name
    # every request was served and answered by the engine, not by the safe default
    assert s["requests_served"] == 400 * len(s["phases"])
    assert all(p["fallback_rate"] == 0.0 for p in s["phases"])
    # the oracle is the ground truth's upper bound on every request: no policy may beat it on average
    assert s["oracle_mean_reward"] >= max(p["mean_reward"] for p in s["phases"])
    assert s["oracle_mean_reward"] >= s["uniform_mean_reward"]
    # each logged decision, rebuilt from its request id, shows exactly the page the client was served
    rec = [j["reconstruction"] for j in s["jobs"] if j.get("job") == "replay"][0]
    assert rec["decisions_checked"] == s["requests_served"] and rec["max_abs_diff"] == 0.0
    # replaying the logged policy on its own log gives the logged mean reward (IPS weights are all 1)
    logged = [row for row in s["replay"]["rows"] if row.get("target") == "logged policy"][0]
    assert np.isclose(logged["IPS"], logged["SNIPS"])
    # the engine earns more than uniform-random (ground truth), and the exit status says so
    assert s["engine_beats_uniform"] and r.returncode == 0
    assert s["engine_mean_reward"] > s["uniform_mean_reward"] + 2 * s["uniform_mean_reward_se"]
