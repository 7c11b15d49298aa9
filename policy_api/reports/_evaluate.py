"""The served-page evaluation report: the scorers' table, their differences with the best baseline
and plots (HTML + PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..jobs import EvaluationResult
from ._html import html_page, pyplot, table_html

__all__ = ["write_evaluation_report"]


def write_evaluation_report(out: Path, res: EvaluationResult) -> Path:
    """``index.html``, ``metrics.png`` (each scorer's HR, recall and NDCG with the paired-bootstrap CI of its
    difference with the best baseline) and ``recall_users.png`` (the distribution of per-user recall)."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    names = [r["scorer"] for r in res.rows]
    k = res.page_size
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in zip(axes, ("hr", "recall", "ndcg"), (f"HR@{k}", f"Recall@{k}", f"NDCG@{k}"),
                                 strict=True):
        val = np.array([res.row(n)[metric] for n in names])
        lo = np.zeros(len(names))
        hi = np.zeros(len(names))
        for j, n in enumerate(names):
            if n != res.best_baseline:  # the CI of the difference, drawn around the scorer's mean
                d = res.diff(n, metric)
                lo[j], hi[j] = d["mean_diff"] - d["ci_low"], d["ci_high"] - d["mean_diff"]
        colors = ["#c50" if n == res.best_baseline else "#58a" for n in names]
        ax.bar(names, val, color=colors)
        ax.errorbar(names, val, yerr=[lo, hi], fmt="none", ecolor="k", capsize=4)
        ax.set_ylabel(f"mean {label} over held-out users")
        ax.set_xlabel("scorer")
        ax.set_title(f"{label} (orange: best baseline)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for n in names:
        r = np.sort(res.per_user[n]["recall"])
        ax.plot(r, np.arange(1, r.size + 1) / r.size, label=n)
    ax.set_xlabel(f"per-user Recall@{k}")
    ax.set_ylabel("share of held-out users with recall <= x")
    ax.set_title("distribution of per-user recall (lower curve = better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall_users.png", dpi=110)
    plt.close(fig)
    intro = (f"<p>{res.n_users} held-out users, page of {k} items (the engine's untilted greedy layout), "
             f"{res.n_train_events} past positive events; best baseline: <b>{res.best_baseline}</b>.</p>")
    sections = [("Scorers", intro + table_html(res.rows) + '<img src="metrics.png">'),
                (f"Differences with {res.best_baseline} (paired bootstrap, 95% CI)", table_html(res.diffs)),
                ("Per-user recall", '<img src="recall_users.png">')]
    if res.info:
        sections.append(("Settings", table_html([{k_: str(v) for k_, v in res.info.items()}])))
    (out / "index.html").write_text(html_page("Served-page evaluation", sections))
    return out / "index.html"
