"""The analyst's and the ML engineer's reports: replay estimates and ranker training, as HTML/PNG."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..jobs import ReplayResult, TrainResult
from ._html import html_page, pyplot, table_html

__all__ = ["write_replay_report", "write_train_report"]


def write_replay_report(out: Path, res: ReplayResult, truth: float | None = None) -> Path:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["estimator"] for r in res.rows]
    est = np.array([r["value"] for r in res.rows])
    lo = np.array([r.get("boot_low", r["ci_low"]) for r in res.rows])
    hi = np.array([r.get("boot_high", r["ci_high"]) for r in res.rows])
    ax.errorbar(names, est, yerr=[est - lo, hi - est], fmt="o", capsize=4)
    ax.axhline(res.logged_mean, color="#888", ls="--", label="logged mean reward")
    if truth is not None:
        ax.axhline(truth, color="#c33", ls=":", label="true value (simulator)")
    ax.set_title(f"estimates of {res.label}")
    ax.set_xlabel("estimator")
    ax.set_ylabel("value per decision (reward units)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "estimates.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    x = np.arange(len(res.shares))
    axes[0].bar(x - 0.2, [s["logged"] for s in res.shares], 0.4, label="logged")
    axes[0].bar(x + 0.2, [s["target"] for s in res.shares], 0.4, label="target policy (projected)")
    for i, s in enumerate(res.shares):
        for b in (s["min"], s["max"]):
            if b is not None:
                axes[0].hlines(b, i - 0.4, i + 0.4, colors="k", linestyles="--")
    axes[0].set_xticks(x, [s["constraint"] for s in res.shares])
    axes[0].set_title(f"exposure shares (dashed: bounds of the {res.targets_of})")
    axes[0].set_ylabel("share of exposure")
    axes[0].legend(fontsize=8)
    axes[1].hist(res.weights[res.weights > 0], bins=50, color="#58a")
    axes[1].set_yscale("log")
    axes[1].set_title("importance weights pi_target / pi_logged (served action)")
    axes[1].set_xlabel("weight")
    axes[1].set_ylabel("decisions (log scale)")
    fig.tight_layout()
    fig.savefig(out / "shares_weights.png", dpi=110)
    plt.close(fig)
    keep = ("estimator", "value", "ci_low", "ci_high", "boot_low", "boot_high", "relative_to_logged", "ess",
            "max_weight")
    shown = [k for k in keep if any(r.get(k) is not None for r in res.rows)]  # no empty bootstrap columns
    table = [{k: r.get(k) for k in shown} for r in res.rows]
    warn = res.warnings
    sections = [("Overlap too thin: do not trust these estimates",
                 "<ul>" + "".join(f"<li class=bad>{html.escape(w)}</li>" for w in warn) + "</ul>")] if warn else []
    sections += [("Estimates", f"<p>{res.n} logged decisions; logged mean reward {res.logged_mean:.4g}."
                 + (f" True value (simulator): {truth:.4g}." if truth is not None else "") + "</p>"
                 + table_html(table) + '<img src="estimates.png">'),
                (f"Projected exposure against the {res.targets_of}'s bounds, and overlap",
                 table_html(res.shares) + '<img src="shares_weights.png">')]
    if res.info:
        sections.append(("Target details", "<pre>" + json.dumps(res.info, indent=1, default=str) + "</pre>"))
    (out / "index.html").write_text(html_page(f"Replay: {res.label}", sections))
    return out / "index.html"


def write_train_report(out_dir: Path, result: TrainResult) -> Path:
    """``train.txt`` (the table) and ``train.png`` in the report folder: the learning curves of the
    torch ranker, or the publish gate's served-page recall and NDCG per scorer (the residual ranker)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text(result.text + "\n")
    h = result.history
    plt = pyplot()
    if h is None:  # the residual ranker has no epochs: the gate's table instead
        rows = result.metrics.get("gate", {}).get("scorers", [])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["recall"] for r in rows], width=0.4, label="recall")
        ax.bar(x + 0.2, [r["ndcg"] for r in rows], width=0.4, label="NDCG")
        ax.set_xticks(x, [r["scorer"] for r in rows], rotation=20, fontsize=8)
        served = result.metrics.get("served", {})
        ax.set_title(f"publish gate, temporal holdout (served: {served.get('kind', '?')} {served.get('scorer', '')})",
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "train.png", dpi=110)
        plt.close(fig)
        return out_dir / "train.txt"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(h.train_loss) + 1), h.train_loss, marker="o", label="train loss")
    ax2 = ax.twinx()
    ax2.plot(range(1, len(h.valid_logloss) + 1), h.valid_logloss, marker="s", color="#c50", label="valid logloss")
    ax.axvline(h.best_epoch, color="#999", ls="--")  # best_epoch is 1-based, like the x axis
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (weighted BCE)")
    ax2.set_ylabel("validation logloss")
    ax.set_title("ranker training (dashed: kept epoch)")
    fig.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "train.png", dpi=110)
    plt.close(fig)
    return out_dir / "train.txt"
