"""The ops console in a real browser: Playwright drives Debian's chromium (``make install`` installs it)
against a real ``homepage serve`` that has served real traffic.

Every figure the page shows is checked against an independent reference: the charts' plotted numbers
against ``GET /exposure``, ``GET /versions`` and the decision log read directly; the config page's
dry run, apply and rollback against ``GET /config`` and the registry.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from playwright.sync_api import Browser, Page, sync_playwright

from policy_api import registry
from policy_api.log import make_engine, read_decisions
from simulator import make_world

from .test_api import free_port, homepage

CHROMIUM = "/usr/bin/chromium"  # Debian's package; playwright never downloads a browser here
TOKEN = "sesame"
N_LAYOUTS = 60
LIVE_MIN = re.compile(r'(name = "live_floor"\nkind = "category_share"\ncategory = "live"\nmin = )([0-9.]+)')


class Server:
    """``homepage serve`` with one worker and no loop: the figures only move when the test moves them."""

    def __init__(self, tmp: Path) -> None:
        self.world = make_world(n_users=40, n_items=300, seed=7)
        self.dir = tmp
        self.db_url = f"sqlite:///{tmp / 'homepage.db'}"
        env = {"DATABASE_URL": self.db_url, "HOMEPAGE_DATA_DIR": str(tmp), "HOMEPAGE_RELOAD_S": "0.5",
               "HOMEPAGE_OPERATOR_TOKEN": TOKEN}
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("HOMEPAGE_")}, **env}
        self.config = tmp / "homepage.toml"
        self.config.write_text(self.world.default_config_toml())
        self.world.to_catalog_csv(tmp / "items.csv")
        homepage("catalog", "load", str(tmp / "items.csv"), "--config", str(self.config), env=self.env)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (tmp / "server.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--config", str(self.config),
                                      "--port", self.url.rsplit(":", 1)[1], "--workers", "1", "--no-loop"],
                                     env=self.env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = tmp / "server.log"
        t0 = time.time()
        while time.time() - t0 < 90:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log_path.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def wait_for(fn, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("browser"))
    sess = requests.Session()
    s.fallbacks = 0
    for k in range(N_LAYOUTS):  # real traffic, so that the charts have data
        r = sess.get(s.url + "/layout", params={"user_id": str(s.world.user_ids[k % 40])}, timeout=10)
        assert r.status_code == 200, r.text
        s.fallbacks += bool(r.json()["fallback"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server):
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: None if r.url.startswith(server.url + "/") else elsewhere.append(r.url))
    yield pg
    ctx.close()
    assert not errors, f"script errors in the page: {errors}"
    assert not elsewhere, f"the console loaded something from elsewhere: {elsewhere}"


def exposure(server):
    r = requests.get(server.url + "/exposure", params={"window_s": 900}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def charts(page: Page) -> dict[str, dict]:
    """Each chart's title, point count and plotted numbers, read from the rendered SVG."""
    return page.eval_on_selector_all("svg.chart", """svgs => Object.fromEntries(svgs.map(s => [
        s.getAttribute('aria-label'),
        {points: Number(s.dataset.points), series: Object.fromEntries(Array.from(
            s.querySelectorAll('polyline.series'), p => [p.dataset.series, p.dataset.y.split(' ').map(Number)]))}]))""")


@pytest.mark.slow
def test_ops_charts_plot_what_the_api_reports(server, page):
    # the aggregate has read every decision of the traffic (the API's reference count)
    e = wait_for(lambda: (x := exposure(server))["decisions"] == N_LAYOUTS - server.fallbacks and x)
    assert page.goto(server.url + "/ops?window_s=900").status == 200
    assert page.title() == "homepage engine — ops"
    got = charts(page)
    names = [c["name"] for c in e["constraints"]]
    assert set(got) == {f"{n}: realised share" for n in names} | {
        "prices (λ)", "traffic", "fallback rate", "expected value per served request"}
    assert all(c["points"] > 0 for c in got.values()), {k: c["points"] for k, c in got.items()}
    bucket_s = e["aggregate"]["bucket_s"]
    decisions = np.array(got["traffic"]["series"]["decisions / min"]) * bucket_s / 60.0
    fallback = np.array(got["fallback rate"]["series"]["fallback"])
    served = decisions * (1.0 - fallback)
    assert decisions.sum() == pytest.approx(N_LAYOUTS)
    assert (decisions * fallback).sum() == pytest.approx(server.fallbacks, abs=1e-9)
    assert served.sum() == pytest.approx(e["decisions"])
    for c in e["constraints"]:  # bucket shares weighted by the bucket's traffic = the window's share
        share = np.array(got[f"{c['name']}: realised share"]["series"]["realised"])
        assert (share * served).sum() / served.sum() == pytest.approx(c["realised"], rel=1e-9)
    # expected value per served request against the decision log itself
    db = make_engine(server.db_url)
    try:
        log = read_decisions(db, columns=["candidates", "chosen"])
    finally:
        db.dispose()
    values = [c[int(k)]["value"] for c, k in zip(log["candidates"], log["chosen"], strict=True) if c]
    value = np.array(got["expected value per served request"]["series"]["value"])
    assert (value * served).sum() / served.sum() == pytest.approx(np.mean(values), rel=1e-9)
    # prices: the newest plan's prices are the chart's last points (GET /versions rounds to 4 digits)
    hist = wait_for(lambda: (v := requests.get(server.url + "/versions", timeout=10).json())["plans"] and v)
    newest = dict(kv.split("=") for kv in hist["plans"][0]["prices"].split(", "))
    assert hist["plans"][0]["version"] == hist["in_force"]["plan"]
    for n in names:
        assert got["prices (λ)"]["series"][n][-1] == pytest.approx(float(newest[n]), rel=1e-3, abs=1e-9)
    # the history table lists the configs of GET /versions
    rows = page.locator("table").filter(has_text="author").first.locator("tbody tr td:first-child").all_inner_texts()
    assert [int(x) for x in rows] == [c["version"] for c in hist["configs"]]


def run(page: Page, button: str) -> str:
    """Click a button of the config page and wait for its job to end; the status line."""
    page.click(button)
    page.wait_for_function("/(done in|failed)/.test(document.getElementById('job-status').textContent)",
                           timeout=90_000)
    return page.inner_text("#job-status")


def test_config_page_dry_run_apply_and_rollback(server, page):
    before = requests.get(server.url + "/config", timeout=10).json()
    db = make_engine(server.db_url)
    try:
        old_body = registry.config_version(db, before["version"]).body
    finally:
        db.dispose()
    page.goto(server.url + "/ops")
    page.click("text=config page")
    page.wait_for_url("**/ops/config")
    assert page.inner_text("#active-version") == str(before["version"])
    assert page.inner_text("#active-body") == old_body
    page.fill("#token", TOKEN)
    # a changed key: the dry run shows exactly that change and the projection, and applies nothing
    m = LIVE_MIN.search(old_body)
    assert m and float(m.group(2)) == 0.1
    proposed = LIVE_MIN.sub(r"\g<1>0.15", old_body)
    page.fill("#proposed", proposed)
    assert "done in" in run(page, "#dry-run"), page.inner_text("#error")
    diff = page.locator("#diff tbody tr").all()
    assert [r.locator("td").all_inner_texts() for r in diff] == [["constraints.live_floor.min", "0.1", "0.15"]]
    assert page.inner_text("#feasibility").startswith("Feasible")
    proj = {r.locator("td").nth(0).inner_text(): r.locator("td").all_inner_texts()
            for r in page.locator("#projection tbody tr").all()}
    assert set(proj) == {c["name"] for c in before["config"]["constraints"]}
    assert proj["live_floor"][1] == "0.15" and float(proj["live_floor"][3]) >= 0.15 - 1e-6
    assert all(row[4] == "yes" for row in proj.values())
    assert requests.get(server.url + "/config", timeout=10).json()["version"] == before["version"]
    # apply: a new version, served by GET /config with the changed key
    assert "done in" in run(page, "#apply"), page.inner_text("#error")
    applied = requests.get(server.url + "/config", timeout=10).json()
    assert applied["version"] > before["version"]
    assert {c["name"]: c.get("min") for c in applied["config"]["constraints"]}["live_floor"] == 0.15
    assert page.inner_text("#active-version") == str(applied["version"])
    assert f"config version {applied['version']} is active" in page.inner_text("#applied")
    # the dry run projected what apply then planned: same users, same config, so the same shares and prices
    db = make_engine(server.db_url)
    try:
        plan = registry.latest_plan(db)
    finally:
        db.dispose()
    assert plan is not None and plan.config_version == applied["version"]
    for n, row in proj.items():
        assert float(row[3]) == pytest.approx(plan.projected["shares"][n], rel=1e-5, abs=1e-9)
        assert float(row[5]) == pytest.approx(plan.prices[n], rel=1e-5, abs=1e-9)
    # roll back to the first version: its body is active again as a newer version. This request goes
    # without `Prefer: wait`, so the server answers 202 and the page follows the job until it is done
    seen: list[tuple[str, str, int]] = []
    page.on("response", lambda r: seen.append((r.request.method, r.url, r.status)))
    page.route("**/config/rollback", lambda route: route.continue_(headers={
        k: v for k, v in route.request.headers.items() if k.lower() != "prefer"}))
    assert "done in" in run(page, f"button.rollback[data-version='{before['version']}']"), page.inner_text("#error")
    assert ("POST", server.url + "/config/rollback", 202) in seen
    polls = [s for m, u, s in seen if m == "GET" and "/config/jobs/" in u]
    assert polls and set(polls) == {200}
    back = requests.get(server.url + "/config", timeout=10).json()
    assert back["version"] > applied["version"] and back["config"] == before["config"]
    db = make_engine(server.db_url)
    try:
        assert registry.config_version(db, back["version"]).body == old_body
    finally:
        db.dispose()
    assert page.inner_text("#active-version") == str(back["version"])
    assert page.inner_text("#active-body") == old_body
    versions = [int(v) for v in page.locator("#history-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.version)")]
    assert versions[:3] == [back["version"], applied["version"], before["version"]]


def test_config_page_shows_api_errors(server, page):
    version = requests.get(server.url + "/config", timeout=10).json()["version"]
    page.goto(server.url + "/ops/config")
    page.fill("#token", "not-the-token")
    assert run(page, "#apply").endswith("failed")
    err = page.inner_text("#error")
    assert "HTTP 401 unauthorized" in err and "got a wrong one" in err and "Authorization" in err
    assert requests.get(server.url + "/config", timeout=10).json()["version"] == version
    # the token is kept in this tab only: a reload keeps it, a new tab does not have it
    page.reload()
    assert page.input_value("#token") == "not-the-token"
    other = page.context.new_page()
    other.goto(server.url + "/ops/config")
    assert other.input_value("#token") == ""
    other.close()
    page.fill("#token", TOKEN)
    page.fill("#proposed", page.input_value("#proposed").replace("budget = 0.05", "budget = 5"))
    assert run(page, "#dry-run").endswith("failed")
    assert page.inner_text(".error-field") == "exploration.budget"
    assert "HTTP 400 invalid_config" in page.inner_text("#error") and "got 5" in page.inner_text(".error-message")
