"""What the analyst reads from a replay: thin-overlap warnings (ESS, max weight), the what-if config's
own targets, and no empty bootstrap columns with ``--n-boot 0``; on the logged world of
``test_jobs_bandit`` (its fixtures are shared)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from policy_api.jobs import replay
from policy_api.jobs._replay import overlap_warnings
from policy_api.reports import write_replay_report

from .test_jobs_bandit import chosen_exposure, log, logged  # noqa: F401  (fixtures)


def test_overlap_warnings_closed_form():
    assert overlap_warnings(np.ones(1000)) == ()  # ESS = n
    w = np.ones(1000)
    w[0] = 1000.0  # ESS = 1999^2 / (999 + 10^6) = 3.99...
    got = overlap_warnings(w)
    assert len(got) == 3
    assert got[0].startswith("effective sample size 4 of 1000 logged decisions (0.40%, below 1%)")
    assert got[1].startswith("max importance weight 1000 (above 100)")
    assert "do not trust these estimates" in got[2]
    # only the weight is extreme: ESS = (n - 1 + 150)^2 / (n - 1 + 150^2) = 9.7k of 10k... passes; max does not
    w = np.ones(10_000)
    w[0] = 150.0
    got = overlap_warnings(w)
    assert len(got) == 2 and got[0].startswith("max importance weight 150")
    assert overlap_warnings(np.zeros(10))[0].startswith("effective sample size 0 of 10")


@pytest.mark.slow  # the logged world of test_jobs_bandit takes ~12 s to build
def test_replay_warns_from_its_own_weights_and_the_report_shows_it(log, logged, tmp_path):  # noqa: F811
    dlog, rw = logged
    res = replay(dlog, rw.reward, "uniform", log.cfg, log.db, n_boot=0)
    # the weights, by hand: uniform over the logged candidates / the logged propensity
    ref = np.array([(1.0 / len(r["candidates"])) / r["propensity"] for r in log.serving])
    np.testing.assert_allclose(res.weights, ref, rtol=1e-12)
    assert res.warnings == overlap_warnings(ref)
    # the report of a replay with warnings puts them first; n_boot=0 leaves no bootstrap column
    thin = type(res)(**{**res.__dict__, "warnings": overlap_warnings(np.r_[ref, 1e4])})
    page = write_replay_report(tmp_path / "r", thin).read_text()
    assert page.index("Overlap too thin") < page.index("Estimates")
    assert "max importance weight 10000" in page and "boot_low" not in page and "nan" not in page


@pytest.mark.slow  # the logged world of test_jobs_bandit takes ~12 s to build
def test_what_if_config_is_measured_against_its_own_targets(log, logged, tmp_path):  # noqa: F811
    dlog, rw = logged
    text = (log.dir / "homepage.toml").read_text()
    block = re.search(r'name = "live_floor"\nkind = "category_share"\ncategory = "live"\nmin = ([0-9.]+)\n', text)
    assert block and float(block.group(1)) != 0.3
    whatif = tmp_path / "whatif.toml"
    whatif.write_text(text.replace(block.group(0), block.group(0).replace(f"min = {block.group(1)}", "min = 0.3")))
    res = replay(dlog, rw.reward, str(whatif), log.cfg, log.db, n_boot=0)
    shares = {s["constraint"]: s for s in res.shares}
    assert shares["live_floor"]["min"] == 0.3 and res.targets_of == "what-if config whatif.toml"
    # the logged shares under the what-if's constraints equal what serving logged (same constraints)
    k = log.cfg.constraint_names.index("live_floor")
    # (the log rounds exposures to 1e-6; the what-if recomputes them from the logged slots)
    assert shares["live_floor"]["logged"] == pytest.approx(chosen_exposure(log.serving)[:, k].mean(), abs=1e-6)
    page = write_replay_report(tmp_path / "w", res).read_text()
    assert "against the what-if config whatif.toml&#x27;s bounds" in page or "what-if config whatif.toml" in page


@pytest.mark.slow  # the logged world of test_jobs_bandit takes ~12 s to build
def test_replay_cli_prints_no_nan_with_n_boot_0_and_the_max_weight(log, monkeypatch, capsys, tmp_path):  # noqa: F811
    from policy_api import cli

    monkeypatch.chdir(log.dir)
    monkeypatch.setenv("DATABASE_URL", log.url)
    assert cli.main(["replay", "--policy", "uniform", "--n-boot", "0", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"\bnan\b", out) and "bootstrap CI" not in out and "max weight" in out
    assert "exposure shares against the bounds of the logged config" in out
    ips = re.search(r"^IPS .*$", out, re.M)
    assert ips is not None


@pytest.mark.slow  # the logged world of test_jobs_bandit takes ~12 s to build
def test_parquet_export_has_rewards_and_named_exposure(log, tmp_path):  # noqa: F811
    import pyarrow.parquet as pq

    from policy_api.jobs import export_parquet_with_rewards
    from policy_api.log import EXPORT_COLUMNS, read_parquet

    from .test_jobs_bandit import slow_rewards

    out = tmp_path / "log.parquet"
    n, version = export_parquet_with_rewards(log.db, out)
    assert n == len(log.rows) and version == 1
    got = read_parquet(out)
    assert list(got) == [*EXPORT_COLUMNS, "reward", "exposure"]
    ref, _ = slow_rewards(log, log.serving)  # the reference: rewards joined with a plain loop
    want = dict(zip([r["request_id"] for r in log.serving], ref.tolist(), strict=True))
    row = {rid: i for i, rid in enumerate(got["request_id"].tolist())}
    np.testing.assert_allclose([got["reward"][row[r]] for r in want], list(want.values()), rtol=1e-12, atol=1e-12)
    fallback = [i for i, rid in enumerate(got["request_id"].tolist()) if rid not in want]
    assert fallback and np.isnan(got["reward"][fallback]).all()  # safe defaults have no candidates to reward
    names = log.cfg.constraint_names
    exp = chosen_exposure(log.serving)
    for j, r in enumerate(log.serving):
        assert got["exposure"][row[r["request_id"]]] == dict(zip(names, exp[j].tolist(), strict=True))
    assert all(got["exposure"][i] is None for i in fallback)
    meta = pq.read_schema(out).metadata
    assert meta[b"homepage.reward_config_version"] == b"1"
    assert float(meta[b"homepage.reward_window_s"]) == log.cfg.learning.reward_window_s
    assert read_parquet(out, columns=["reward"])["reward"].shape == (n,)
