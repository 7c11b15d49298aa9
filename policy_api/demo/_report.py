"""The demo's report: ``summary.json`` + ``index.html`` with PNG plots."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from allocator import HomepageConfig
from simulator import World

from ..reports import html_page, mean_se, pyplot, table_html
from ._phases import PhaseLog

__all__ = ["write_demo_report"]


def _rolling_share(values: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.r_[0.0, values])
    w = min(window, values.size)
    return (c[w:] - c[:-w]) / w


def write_demo_report(out: Path, cfg: HomepageConfig, world: World, phases: list[PhaseLog], uniform: np.ndarray,
                      oracle: np.ndarray, jobs: list[dict[str, Any]],
                      elapsed_s: float) -> dict[str, Any]:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    wn = np.asarray(cfg.position_weights) / np.sum(cfg.position_weights)
    cat_names = list(world.categories)
    phase_rows: list[dict[str, Any]] = []
    for p in phases:
        m, se = mean_se(p.expected_reward)
        shares = {c: float((wn[None, :] * (p.slot_category == k)).sum(1).mean()) for k, c in enumerate(cat_names)}
        phase_rows.append({
            "phase": p.name, "requests": int(p.user.size),
            "mean_reward": m, "mean_reward_se": se,
            "mean_reward_realised": float(p.realised_reward.mean()),
            "fallback_rate": float(p.fallback.mean()),
            "latency_p50_ms": float(np.percentile(p.latency_s, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(p.latency_s, 99) * 1e3),
            "category_shares": shares, "long_tail_share": float(p.long_tail.mean()),
        })
    final = phase_rows[-1]
    um, use = mean_se(uniform)
    om, ose = mean_se(oracle)
    targets = []
    last = phases[-1]
    for c in cfg.constraints:
        if c.kind == "category_share":
            k = cat_names.index(c.category or "")
            realised = float((wn[None, :] * (last.slot_category == k)).sum(1).mean())
        elif c.kind == "long_tail_share":
            realised = float(last.long_tail.mean())
        else:
            realised = None  # module shares: see the engine's /exposure endpoint
        ok = None if realised is None else bool((c.min is None or realised >= c.min - 0.01)
                                                and (c.max is None or realised <= c.max + 0.01))
        targets.append({"constraint": c.name, "kind": c.kind, "min": c.min, "max": c.max,
                        "realised": realised, "holds_within_1pp": ok})
    lat = np.concatenate([p.latency_s for p in phases])
    summary: dict[str, Any] = {
        "requests_served": int(sum(p.user.size for p in phases)),
        "phases": phase_rows,
        "engine_mean_reward": final["mean_reward"],
        "uniform_mean_reward": um, "uniform_mean_reward_se": use,
        "oracle_mean_reward": om, "oracle_mean_reward_se": ose,
        "engine_beats_uniform": final["mean_reward"] > um,
        "share_of_oracle": final["mean_reward"] / om if om else None,
        "targets": targets,
        "latency_ms": {"p50": float(np.percentile(lat, 50) * 1e3), "p99": float(np.percentile(lat, 99) * 1e3)},
        "jobs": jobs,
        "elapsed_s": elapsed_s,
    }
    summary["ok"] = bool(summary["engine_beats_uniform"])
    summary["failures"] = [] if summary["ok"] else [
        f"the engine's mean reward {final['mean_reward']:.4f} (± {1.96 * final['mean_reward_se']:.4f}) did not beat "
        f"a uniform-random policy's {um:.4f} (± {1.96 * use:.4f}) in the final phase: with few requests the "
        "rankers and the bandit have too little data (try the default --requests, --users and --items)"]
    summary["notes"] = [f"constraint {t['constraint']}: realised {t['realised']:.4f} outside "
                        f"[{t['min']}, {t['max']}] by more than 1 pp" for t in targets if t["holds_within_1pp"] is False]
    for j in jobs:
        if j.get("job") == "replay":
            summary["replay"] = {"rows": j["rows"], "dr_snips_within_5pct": j["dr_snips_within_5pct"]}

    # -- plots --------------------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["uniform"] + [f"engine: {r['phase']}" for r in phase_rows] + ["oracle\n(unconstrained)"]
    means = [um] + [r["mean_reward"] for r in phase_rows] + [om]
    ses = [use] + [r["mean_reward_se"] for r in phase_rows] + [ose]
    ax.bar(labels, means, yerr=[1.96 * s for s in ses], color=["#999"] + ["#3a7"] * len(phase_rows) + ["#36c"],
           capsize=4)
    ax.set_ylabel("mean reward per request (ground truth)")
    ax.set_title("Engine vs uniform-random vs oracle")
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=110)
    plt.close(fig)

    all_cat = np.concatenate([p.slot_category for p in phases])
    all_tail = np.concatenate([p.long_tail for p in phases])
    window = max(50, all_cat.shape[0] // 40)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(window, all_cat.shape[0] + 1)
    for k, name in enumerate(cat_names):
        axes[0].plot(x, _rolling_share((wn[None, :] * (all_cat == k)).sum(1), window), label=name)
    for c in cfg.constraints:
        if c.kind == "category_share":
            for bound in (c.min, c.max):
                if bound is not None:
                    axes[0].axhline(bound, ls="--", color="k", lw=1)
                    axes[0].text(x[0], bound, f" {c.name}", va="bottom", fontsize=8)
    axes[0].set_title(f"realised slot-weighted category shares (rolling {window} requests)")
    axes[0].set_xlabel("request")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, _rolling_share(all_tail, window), color="#a50", label="long-tail share")
    for c in cfg.constraints:
        if c.kind == "long_tail_share":
            for bound in (c.min, c.max):
                if bound is not None:
                    axes[1].axhline(bound, ls="--", color="k", lw=1, label=f"{c.name} target")
    bounds = np.cumsum([p.user.size for p in phases])[:-1]
    for ax in axes:
        for b in bounds:
            ax.axvline(b, color="#bbb", lw=1)
    axes[1].set_title("realised long-tail share of shown items")
    axes[1].set_xlabel("request")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exposure.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lat * 1e3, bins=60, color="#58a")
    for q, ls in ((50, "-"), (99, "--")):
        v = np.percentile(lat, q) * 1e3
        ax.axvline(v, color="k", ls=ls, label=f"p{q} = {v:.1f} ms")
    ax.set_xlabel("GET /layout latency seen by the client (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    for j in jobs:
        if j.get("job") == "pacing" and j.get("history"):
            h = j["history"]
            names = list(h[0]["prices"])
            t = [x["t"] for x in h]
            fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
            for n_ in names:
                axes[0].plot(t, [x["prices"][n_] for x in h], marker=".", label=n_)
                axes[1].plot(t, [x["realised"][n_] for x in h], marker=".", label=f"{n_} realised")
            for c in cfg.constraints:
                for bound in (c.min, c.max):
                    if bound is not None:
                        axes[1].axhline(bound, ls="--", lw=1, color="k")
                        axes[1].text(t[0], bound, f" {c.name} target", va="bottom", fontsize=8)
            axes[0].set_title(f"prices moved by pacing ({j.get('during_phase', '')} phase)")
            axes[1].set_title("realised share in each pacing window vs target")
            for ax in axes:
                ax.set_xlabel("seconds into the phase")
                ax.legend(fontsize=8)
            fig.tight_layout()
            fname = f"pacing-{j.get('during_phase', 'phase')}.png"
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            j["figures"] = [fname]
            final = h[-1]
            j["table_html"] = table_html([{"constraint": n_, "final price": final["prices"][n_],
                                           "realised (last window)": final["realised"][n_]} for n_ in names])
    extra_sections = []
    for j in jobs:
        for fig_name in j.get("figures", []):
            extra_sections.append((j.get("title", j.get("job", "job")), f'<img src="{html.escape(fig_name)}">'))
        if j.get("table_html"):
            extra_sections.append((j.get("title", j.get("job", "job")), j["table_html"]))

    verdict = ('<p class="good">The engine earns more than uniform-random.</p>' if summary["engine_beats_uniform"]
               else '<p class="bad">The engine does NOT beat uniform-random in the final phase.</p>')
    sections = [
        ("Summary", verdict + table_html([
            {"policy": "uniform-random", "mean reward": um, "95% CI ±": 1.96 * use},
            *({"policy": f"engine ({r['phase']})", "mean reward": r["mean_reward"], "95% CI ±": 1.96 * r["mean_reward_se"]}
              for r in phase_rows),
            {"policy": "oracle (unconstrained)", "mean reward": om, "95% CI ±": 1.96 * ose},
        ]) + f"<p>{summary['requests_served']} requests served in {elapsed_s:.0f} s.</p>"
         '<img src="rewards.png">'),
        ("Phases", table_html([{k: v for k, v in r.items() if k != "category_shares"} for r in phase_rows])),
        ("Exposure against the operator's targets (final phase)", table_html(targets) + '<img src="exposure.png">'),
        ("Latency", table_html([summary["latency_ms"]]) + '<img src="latency.png">'),
        *extra_sections,
        ("Jobs between phases", "<pre>" + html.escape(json.dumps(
            [{k: v for k, v in j.items() if k not in ("table_html", "figures")} for j in jobs], indent=1,
            default=str)) + "</pre>"),
    ]
    (out / "index.html").write_text(html_page("Homepage engine — demo report", sections))
    return summary
