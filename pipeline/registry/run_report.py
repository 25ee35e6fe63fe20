"""Human-readable run artefacts: evaluation report (JSON, Markdown, HTML), training curve and
attention heatmaps (PNG), written to a folder for MLflow to keep. Rendering only: the
numbers come from the evaluator and the query path (``pipeline.app.steps.train``)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPORT_METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "hr@20", "ndcg@20")


def write_evaluation_report(folder: Path, rows: dict[str, dict[str, Any]], context: dict[str, Any]) -> list[Path]:
    """``rows``: model name -> metrics on the test split. Writes report.json / .md / .html."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"context": context, "test": rows}, indent=2, default=str))
    header = "| model | " + " | ".join(REPORT_METRICS) + " |"
    lines = [f"# attnrec evaluation: {context.get('split_protocol', '')}", "",
             f"feature set `{context.get('feature_version')}`, {context.get('users')} users, "
             f"{context.get('items')} items; full ranking, seen items excluded.", "", header,
             "|" + " --- |" * (len(REPORT_METRICS) + 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in REPORT_METRICS) + " |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    cells = "".join(f"<th>{html.escape(k)}</th>" for k in REPORT_METRICS)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{m.get(k, float('nan')):.4f}</td>" for k in REPORT_METRICS) + "</tr>"
        for name, m in rows.items()
    )
    (folder / "report.html").write_text(
        f"<html><body><h2>attnrec evaluation</h2><p>feature set {html.escape(str(context.get('feature_version')))}; "
        f"full ranking, seen items excluded</p><table border='1' cellpadding='4'><tr><th>model</th>{cells}</tr>{body}</table>"
        "</body></html>\n")
    return [folder / "report.json", folder / "report.md", folder / "report.html"]


def plot_training_curve(path: Path, history: list[Any]) -> Path:
    epochs = [h.epoch for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(epochs, [h.loss for h in history], color="tab:blue", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss", color="tab:blue")
    ax2 = ax1.twinx()
    valid = [(h.epoch, h.valid["ndcg@10"]) for h in history if h.valid.get("ndcg@10") is not None]
    if valid:
        ax2.plot(*zip(*valid, strict=True), color="tab:red", label="validation NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:red")
    fig.suptitle("attnrec training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class AttentionExample:
    """One user's recommendations and the attention each puts on the user's newest history items."""

    user_id: str
    history_titles: list[str]      # (L,) the newest history items, oldest first
    recommended_titles: list[str]  # (K,)
    weights: np.ndarray            # (K, L) attention share of each history item, per recommendation


def plot_attention(path: Path, examples: list[AttentionExample]) -> Path:
    """One heatmap per user: which recent history items each recommendation rests on."""
    fig, axes = plt.subplots(len(examples), 1, figsize=(11, 3.2 * len(examples)), squeeze=False)
    for ax, ex in zip(axes[:, 0], examples, strict=True):
        ax.imshow(ex.weights, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(ex.recommended_titles)), [t[:22] for t in ex.recommended_titles])
        ax.set_xticks(range(len(ex.history_titles)), [t[:22] for t in ex.history_titles], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"user {ex.user_id}: which recent items each recommendation rests on", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
