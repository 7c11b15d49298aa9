// The ops console's config page: dry run, apply and roll back through the operator API.
//
// Every change is a job: the API answers 202 with {job_id, status, status_url} (or 200 with the final
// answer when it finished within the `Prefer: wait` we send); the page follows the job to its end and
// renders its result. API errors ({"error": {code, message, field}, ...}) are shown as answered.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let state = JSON.parse($("console-state").dataset.state);
  const root = state.root || "";
  const TOKEN_KEY = "homepage.operatorToken";
  const FINAL = new Set(["done", "failed", "lost"]);
  const token = $("token");
  let busy = false;

  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token.value));
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token.value = "";
  });

  class ApiError extends Error {
    constructor(status, body, text) {
      const err = (body && body.error) || {};
      super(err.message || text || `HTTP ${status}`);
      this.status = status;
      this.body = body || {};
      this.err = err;
    }
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    const t = token.value.trim();
    if (t) h.Authorization = "Bearer " + t;
    return h;
  }

  async function answer(resp) {
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!resp.ok) throw new ApiError(resp.status, body, text.slice(0, 300));
    if (body === null) throw new ApiError(resp.status, null, "the answer is not JSON: " + text.slice(0, 300));
    return body;
  }

  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

  function status(text) {
    $("job-status").textContent = text;
  }

  // The final result of a change: a 200 is the final answer (a synchronous one, or the job's result
  // when it finished within `Prefer: wait`); a 202 is a job, followed until it ends.
  async function follow(resp, label) {
    let body = await answer(resp);
    if (resp.status !== 202) return body;
    const where = body.status_url || resp.headers.get("Location") ||
      `${root}/config/jobs/${encodeURIComponent(body.job_id)}`;
    const url = new URL(where, window.location.href).toString();
    const t0 = Date.now();
    let delay = 250;
    while (!FINAL.has(body.status)) {
      status(`${label}: job ${body.job_id} ${body.status} (${Math.round((Date.now() - t0) / 1000)} s)`);
      await sleep(delay);
      delay = Math.min(delay * 1.5, 2000);
      body = await answer(await fetch(url, { headers: headers(), cache: "no-store" }));
    }
    if (body.status !== "done") {
      // a failed job's error is the API's error body: {"error": {code, message, field}, ...details}
      const failed = body.error && body.error.error ? body.error : {
        error: { code: body.status, message: `job ${body.job_id} ended as ${body.status} without a result; try again` },
      };
      throw new ApiError(0, failed, failed.error.message);
    }
    return body.result || {};
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of [].concat(children === undefined ? [] : children)) {
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function fmt(v) {
    if (v === undefined || v === null) return "(none)";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function table(id, head, rows) {
    const thead = el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h))));
    const tbody = el("tbody", {}, rows.map((r) => el("tr", r.cls ? { class: r.cls } : {},
      r.cells.map((c, i) => el("td", i === 0 ? { class: "key" } : {}, c)))));
    return el("table", { id }, [thead, tbody]);
  }

  function showError(e, what) {
    const box = $("error");
    box.textContent = "";
    if (!(e instanceof ApiError)) {
      box.append(el("p", {}, `${what} failed: the server could not be reached (${e.message})`));
      return;
    }
    const err = e.err || {};
    const head = `${what} failed: ` + (e.status >= 400 ? `HTTP ${e.status}` : "the job failed") +
      (err.code ? ` ${err.code}` : "");
    box.append(el("p", {}, [el("b", { class: "error-code" }, head), " — ",
      el("span", { class: "error-message" }, err.message || e.message)]));
    if (err.field) box.append(el("p", {}, ["field: ", el("code", { class: "error-field" }, err.field)]));
    const details = e.body || {};
    const lists = [["errors", details.errors || err.errors], ["conflicting", details.conflicting || err.conflicting],
      ["relaxations", details.relaxations || err.relaxations]];
    for (const [name, items] of lists) {
      if (!Array.isArray(items) || !items.length) continue;
      box.append(el("p", {}, name + ":"), el("ul", {}, items.map((x) =>
        el("li", {}, typeof x === "object" && x !== null ? `${x.field || ""}: ${x.message || fmt(x)}` : String(x)))));
    }
  }

  function diffRows(diff) {
    if (!diff) return [];
    if (Array.isArray(diff)) {
      return diff.map((d) => Array.isArray(d) ? { key: d[0], old: d[1], new: d[2] }
        : { key: d.key ?? d.path ?? d.field, old: d.old ?? d.active, new: d.new ?? d.proposed });
    }
    if (typeof diff === "object") {
      if (Array.isArray(diff.changes)) return diffRows(diff.changes);
      return Object.entries(diff).filter(([k]) => k !== "text").map(([k, v]) => Array.isArray(v)
        ? { key: k, old: v[0], new: v[1] } : { key: k, old: v && v.old, new: v && v.new });
    }
    return [];
  }

  // Targets of the config a result is about: those the result names, else the active config's with
  // the diff's changes to constraints.<name>.min / .max applied.
  function targetsOf(res, rows) {
    if (res.targets && typeof res.targets === "object") return res.targets;
    const t = JSON.parse(JSON.stringify(state.targets || {}));
    for (const r of rows) {
      const m = /^constraints\.(.+)\.(min|max)$/.exec(String(r.key));
      if (m) {
        t[m[1]] = t[m[1]] || { min: null, max: null };
        t[m[1]][m[2]] = r.new === undefined ? null : r.new;
      }
    }
    return t;
  }

  function projectionTable(res, targets) {
    const proj = res.projection || {};
    const shares = proj.shares || {};
    const prices = res.prices || {};
    const current = (res.current && res.current.projection && res.current.projection.shares) || null;
    const names = Array.from(new Set([...Object.keys(targets), ...Object.keys(shares)]));
    const rows = names.map((n) => {
      const t = targets[n] || {};
      const s = shares[n];
      const ok = typeof s !== "number" ? null
        : (t.min == null || s >= t.min - 1e-9) && (t.max == null || s <= t.max + 1e-9);
      const bound = (b) => (b == null ? "—" : fmt(b));
      const cells = [n, bound(t.min), bound(t.max), fmt(s), ok === null ? "" : ok ? "yes" : "no", fmt(prices[n])];
      if (current) cells.push(fmt(current[n]));
      return { cls: ok === false ? "miss" : "", cells };
    });
    const head = ["constraint", "min", "max", "projected share", "within target", "price"];
    if (current) head.push(`active config's projected share (version ${res.current.version})`);
    const out = [el("h3", {}, "Projection"), table("projection", head, rows)];
    if (typeof proj.value === "number") {
      const was = res.current && res.current.projection && typeof res.current.projection.value === "number"
        ? ` (active config: ${fmt(res.current.projection.value)})` : "";
      out.push(el("p", {}, ["projected value per request: ", el("span", { id: "projected-value" }, fmt(proj.value)),
        ` config value units per layout served${was}`]));
    }
    return out;
  }

  function warnings(res) {
    const w = res.warnings || [];
    return w.length ? [el("h3", {}, "Warnings"), el("ul", { id: "warnings" }, w.map((x) => el("li", {}, x)))] : [];
  }

  function renderDryRun(res) {
    const rows = diffRows(res.diff);
    const out = $("result");
    out.textContent = "";
    const feasible = res.feasible !== false;
    out.append(el("p", { id: "feasibility", class: feasible ? "good" : "bad" }, feasible
      ? "Feasible: every constraint of the proposed config can hold."
      : "Infeasible: the proposed config would not be applied."));
    const why = res.infeasible || null;
    if (why) {
      const err = why.error || {};
      // the message names the constraints in conflict and the relaxations that would make it feasible
      out.append(el("pre", { id: "infeasible" }, err.message || JSON.stringify(why)));
    }
    out.append(el("h3", {}, "Diff against the active config" +
      (state.active_version ? ` (version ${state.active_version})` : "")));
    out.append(rows.length
      ? table("diff", ["key", "active", "proposed"], rows.map((r) => ({ cells: [r.key, fmt(r.old), fmt(r.new)] })))
      : el("p", { id: "diff", class: "hint" }, "no difference"));
    const text = (res.diff && res.diff.text) || res.text_diff;
    if (typeof text === "string" && text) out.append(el("pre", { id: "text-diff" }, text));
    if (feasible) out.append(...projectionTable(res, targetsOf(res, rows)));
    out.append(...warnings(res));
  }

  function renderApplied(res, what) {
    const out = $("result");
    out.textContent = "";
    const back = res.rolled_back_to ? ` (the text of version ${res.rolled_back_to})` : "";
    out.append(el("p", { id: "applied", class: "good" },
      `${what}: config version ${res.version}${back} is active (was ${fmt(res.previous_version)}); ` +
      `plan version ${fmt(res.plan_version)}. Serving workers swap it in within seconds.`));
    out.append(...projectionTable(res, state.targets || {}), ...warnings(res));
  }

  // The active config and the history again, from the server (the proposal being edited stays).
  async function refresh() {
    const resp = await fetch(window.location.pathname,
      { headers: headers({ Accept: "text/html" }), cache: "no-store" });
    if (!resp.ok) {
      throw new ApiError(resp.status, null, "the change was made, but reloading this page's figures failed");
    }
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    for (const id of ["active", "history"]) $(id).replaceChildren(...doc.getElementById(id).childNodes);
    state = JSON.parse(doc.getElementById("console-state").dataset.state);
  }

  async function run(label, request, render) {
    if (busy) return;
    busy = true;
    for (const b of document.querySelectorAll("button")) b.disabled = true;
    $("error").textContent = "";
    $("result").textContent = "";
    const t0 = Date.now();
    status(`${label}: sent`);
    try {
      const res = await follow(await request(), label);
      await render(res);
      status(`${label}: done in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    } catch (e) {
      status(`${label}: failed`);
      showError(e, label);
    } finally {
      busy = false;
      for (const b of document.querySelectorAll("button")) b.disabled = false;
    }
  }

  const proposal = () => ({
    body: $("proposed").value,
    headers: headers({ "Content-Type": "application/toml", Prefer: "wait=10", "X-Operator": "ops-console" }),
  });

  $("dry-run").addEventListener("click", () => run("Dry run", () => {
    const p = proposal();
    return fetch(`${root}/config/dry-run`, { method: "POST", headers: p.headers, body: p.body });
  }, renderDryRun));

  $("apply").addEventListener("click", () => run("Apply", () => {
    const p = proposal();
    p.headers["X-Change-Note"] = "applied from the ops console";
    return fetch(`${root}/config`, { method: "PUT", headers: p.headers, body: p.body });
  }, async (res) => {
    renderApplied(res, "Applied");
    await refresh();
    renderApplied(res, "Applied");
  }));

  $("history").addEventListener("click", (ev) => {
    const b = ev.target.closest("button.rollback");
    if (!b) return;
    const version = Number(b.dataset.version);
    run(`Roll back to version ${version}`, () => fetch(`${root}/config/rollback`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Prefer: "wait=10", "X-Operator": "ops-console" }),
      body: JSON.stringify({ version }),
    }), async (res) => {
      renderApplied(res, `Rolled back to version ${version}`);
      await refresh();
      renderApplied(res, `Rolled back to version ${version}`);
    });
  });
})();
