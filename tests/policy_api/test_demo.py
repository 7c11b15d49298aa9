"""`homepage demo` at a small size: the closed loop over real HTTP, its report and its checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_demo_small(tmp_path):
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-m", "policy_api.cli", "demo", "--requests", "400",
                        "--concurrency", "4", "--out", str(tmp_path)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = tmp_path / "report"
    # rc 1 is also what an uncaught exception gives: then there is no summary, and its traceback says why
    assert (report / "summary.json").is_file(), r.stderr[-3000:]
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
    # stdout says what happened and what to run next, on the demo's own database
    out = r.stdout
    verdict = [x for x in out.splitlines() if x.startswith("demo ")]  # (the LP solver prints a banner too)
    assert len(verdict) == 1 and verdict[0].startswith(f"demo OK: {s['requests_served']} requests in ")
    assert f"export DATABASE_URL={s['database_url']}" in out and s["database_url"].endswith("/demo/homepage.db")
    assert f"report: {report / 'index.html'}" in out
    # the training report has its own folder, so `homepage train` cannot overwrite the demo's
    assert (report / "demo-train" / "train.png").stat().st_size > 1000 and not (report / "train.png").exists()
    assert 'src="demo-train/train.png"' in (report / "index.html").read_text()
    # the printed commands work: `homepage versions list` on that database sees the demo's versions
    env["DATABASE_URL"] = s["database_url"]
    listed = subprocess.run([sys.executable, "-m", "policy_api.cli", "versions", "list", "config"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "configs (active: 1)" in listed.stdout, listed.stderr


def test_failed_demo_prints_the_reason():
    from pathlib import Path

    from policy_api.demo import next_steps, summary_lines

    summary = {"ok": False, "requests_served": 80, "elapsed_s": 12.0,
               "failures": ["the engine's mean reward 0.1000 did not beat a uniform-random policy's 0.2000"],
               "engine_mean_reward": 0.1, "uniform_mean_reward": 0.2, "oracle_mean_reward": 0.5,
               "notes": ["constraint live_floor: realised 0.0500 outside [0.1, None] by more than 1 pp"],
               "next_steps": next_steps("sqlite:////tmp/x/demo/homepage.db", Path("/tmp/x/demo/homepage.toml"))}
    lines = summary_lines(summary, Path("/tmp/x/report/index.html"))
    assert lines[0] == "demo FAILED: 80 requests in 12 s"
    assert lines[1] == "  reason: the engine's mean reward 0.1000 did not beat a uniform-random policy's 0.2000"
    assert "  note: constraint live_floor: realised 0.0500 outside [0.1, None] by more than 1 pp" in lines
    assert "  export DATABASE_URL=sqlite:////tmp/x/demo/homepage.db" in lines
    assert any("--policy /tmp/x/demo/homepage.toml" in x for x in lines)
