"""Human-readable run artefacts: evaluation report (JSON, Markdown, HTML), training curve and
attention heatmaps (PNG), written to a folder for MLflow to keep."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.sasrec import SASRec  # noqa: E402
from pipeline.data.feature_store import FeatureSet  # noqa: E402

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


@torch.no_grad()
def plot_attention(path: Path, model: SASRec, fs: FeatureSet, users: list[int], top_k: int = 5, last: int = 15) -> Path:
    """For each user: the weights (``explain``) their top-k items put on their last history items."""
    titles = fs.items["title"].to_list()
    fig, axes = plt.subplots(len(users), 1, figsize=(11, 3.2 * len(users)), squeeze=False)
    table = model.item_vectors()
    for ax, u in zip(axes[:, 0], users, strict=True):
        pos = int(fs.test_pos[u]) if fs.test_pos[u] >= 0 else len(fs.sequences.row(u))
        hist = fs.sequences.row(u)[:pos][-model.max_len:].astype(np.int64)
        seq = torch.from_numpy(hist).unsqueeze(0)
        scores = model.user_vectors(seq, table) @ table.T  # (1, N+1)
        scores[0, 0] = float("-inf")
        scores[0, torch.from_numpy(hist)] = float("-inf")
        top = torch.topk(scores, top_k).indices  # (1, K)
        weights = model.explain(seq, top)[0, :, -last:].numpy()  # (K, last)
        ax.imshow(weights, aspect="auto", cmap="viridis")
        short = lambda i: (titles[i - 1] or str(i))[:22]  # noqa: E731
        ax.set_yticks(range(top_k), [short(int(i)) for i in top[0]])
        ax.set_xticks(range(weights.shape[1]), [short(int(i)) for i in hist[-last:]], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"user {fs.user_ids[u]}: which recent items each recommendation rests on", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
