"""Human-readable run artefacts: evaluation report (JSON, Markdown, HTML), training curve and
attention heatmaps (PNG), written to a folder for MLflow to keep. Rendering only: the
numbers come from the evaluator and the query path (``pipeline.app.steps.train``)."""

from __future__ import annotations

import html
import json
import textwrap
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPORT_METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "hr@20", "ndcg@20")
TITLE_WRAP = 28  # characters per line of a heatmap label: whole titles, wrapped


def write_evaluation_report(folder: Path, rows: dict[str, dict[str, Any]], context: dict[str, Any]) -> list[Path]:
    """``rows``: model name -> metrics on ``context['split']`` (this model first, then the
    champion and the baselines); ``context``: split, protocol, feature_version, users, items and
    the gate decision (or None). Writes report.json / .md / .html."""
    folder.mkdir(parents=True, exist_ok=True)
    split = context["split"]
    (folder / "report.json").write_text(json.dumps({"context": context, split: rows}, indent=2, default=str))
    title = f"attnrec evaluation on the {split} split"
    facts = [f"Split: {split} ({context['protocol']}); the checkpoint was chosen on the validation split.",
             f"Feature set {context['feature_version']}: {context['users']:,} users, {context['items']:,} items; "
             "full ranking over the whole catalogue, seen items excluded."]
    if context.get("gate"):
        facts.append(f"Promotion gate (on validation): {context['gate']}.")
    header = "| model | " + " | ".join(REPORT_METRICS) + " |"
    lines = [f"# {title}", "", *[f"{f}  " for f in facts], "", header, "|" + " --- |" * (len(REPORT_METRICS) + 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in REPORT_METRICS) + " |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    cells = "".join(f"<th>{html.escape(k)}</th>" for k in REPORT_METRICS)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{m.get(k, float('nan')):.4f}</td>" for k in REPORT_METRICS) + "</tr>"
        for name, m in rows.items()
    )
    paragraphs = "".join(f"<p>{html.escape(f)}</p>" for f in facts)
    (folder / "report.html").write_text(
        f"<html><body><h2>{html.escape(title)}</h2>{paragraphs}<table border='1' cellpadding='4'>"
        f"<tr><th>model</th>{cells}</tr>{body}</table></body></html>\n")
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
    """One user's recommendations and the attention each puts on the user's history items."""

    user_id: str
    history_titles: list[str]      # (L,) the history items shown, oldest first
    recommended_titles: list[str]  # (K,)
    weights: np.ndarray            # (K, L) attention share of each shown history item, per recommendation
    history_length: int            # how many history items the model read (L of them are shown)


def plot_attention(path: Path, examples: list[AttentionExample]) -> Path:
    """One heatmap per user: which history items each recommendation rests on, with a colour
    scale (share of the attention, from 0 to the largest share shown) and whole titles, wrapped."""
    label = partial(textwrap.fill, width=TITLE_WRAP)
    heights = [0.55 * max(len(ex.recommended_titles), 1) + 3.2 for ex in examples]
    fig, axes = plt.subplots(len(examples), 1, figsize=(13, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, ex in zip(axes[:, 0], examples, strict=True):
        image = ax.imshow(ex.weights, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(ex.weights.max()), 1e-6))
        ax.set_yticks(range(len(ex.recommended_titles)), [label(t) for t in ex.recommended_titles], fontsize=7)
        ax.set_xticks(range(len(ex.history_titles)), [label(t) for t in ex.history_titles], rotation=60, ha="right",
                      fontsize=6)
        held = float(ex.weights.sum(axis=1).mean())
        ax.set_xlabel(f"the {len(ex.history_titles)} of {ex.history_length} history items with the most attention, "
                      f"oldest to newest (they hold {held:.0%} of it)", fontsize=8)
        ax.set_title(f"user {ex.user_id}: which history items each recommendation rests on", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label("share of attention", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
