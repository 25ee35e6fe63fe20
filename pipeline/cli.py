"""The ``attnrec`` command line. User errors print one line and exit 1; no tracebacks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipeline.config import load_settings
from pipeline.errors import UserError
from pipeline.registry.tracking import MLFLOW_UI_PORT

INTERRUPTED = 130  # exit code of a command stopped by Ctrl-C
app = typer.Typer(
    name="attnrec", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from pipeline import __version__

        out.print(f"attnrec {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="print attnrec's version and exit")] = False) -> None:
    """Attention-based content-filtering recommender: ingest, features, train, evaluate, index, recommend, serve."""


HomeOpt = Annotated[Path | None, typer.Option("--home", help="state folder (default $ATTNREC_HOME or ./.attnrec)")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="models:/attnrec@champion (default), models:/attnrec/VERSION, 'latest' (newest local run) or a bundle folder")]


EngineOpt = Annotated[str | None, typer.Option("--engine", help="local | ray (default: the engine setting, local)")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="engine ray: auto | host:port | ray://host:port (default: a private local Ray)")]


def _echo_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="files, folders or globs of user-item events")],
    format: Annotated[str, typer.Option("--format", help="auto|csv|tsv|parquet|ndjson|sasrec|sequences|movielens-100k|movielens-1m|movielens-csv")] = "auto",
    user_col: Annotated[str | None, typer.Option(help="user id column (name, or 1-based position without header)")] = None,
    item_col: Annotated[str | None, typer.Option(help="item id column")] = None,
    time_col: Annotated[str | None, typer.Option(help="time column (unix s/ms/us or ISO-8601)")] = None,
    event_col: Annotated[str | None, typer.Option(help="event type column")] = None,
    weight_col: Annotated[str | None, typer.Option(help="weight / rating column")] = None,
    event_id_col: Annotated[str | None, typer.Option(help="event id column: identity of an event for exactly-once")] = None,
    delimiter: Annotated[str | None, typer.Option(help="field delimiter (default: detected)")] = None,
    header: Annotated[bool | None, typer.Option("--header/--no-header", help="first line is a header (default: detected)")] = None,
    event_type: Annotated[str | None, typer.Option(help="event type for files without an event column")] = None,
    time_unit: Annotated[str, typer.Option(help="unit of numeric times: auto|s|ms|us|ns")] = "auto",
    encoding: Annotated[str | None, typer.Option(help="encoding of text files (default utf-8: lines with other bytes are quarantined), e.g. latin-1, cp1252")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="reject a whole file with any bad row")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print reports as JSON")] = False,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    home: HomeOpt = None,
) -> None:
    """Load event logs into the warehouse (exactly once; bad rows quarantined). Engine ray:
    the files are read and checked in parallel, one Ray task each, and committed in order."""
    from pipeline.app.steps import ingest_events
    from pipeline.data.ingest import TIME_UNITS, IngestOptions
    from pipeline.data.ingest_formats import ColumnFlags

    if time_unit not in TIME_UNITS:
        raise UserError(f"--time-unit must be one of {', '.join(TIME_UNITS)}")
    opts = IngestOptions(
        format=format, columns=ColumnFlags(user_col, item_col, time_col, event_col, weight_col, event_id_col),
        delimiter=delimiter, has_header=header, event_type=event_type, time_unit=time_unit, strict=strict,
        encoding=encoding,
    )

    def show(report: Any) -> None:
        if as_json:
            return
        err.print(f"[dim]{report.path}: read as {report.description}[/dim]", highlight=False)
        out.print(report.summary(), highlight=False)
        for line, column, reason in report.examples:
            where = f"line {line}" + (f", column {column!r}" if column else "")
            out.print(f"  quarantined {where}: {reason}", highlight=False)
        if report.quarantined > len(report.examples):
            out.print(f"  ... {report.quarantined - len(report.examples):,} more in the quarantine table", highlight=False)

    settings = load_settings(home=home, engine=engine, ray_address=ray_address)
    reports = ingest_events(settings, paths, opts, progress=not as_json, on_report=show)
    if as_json:
        _echo_json([r.as_dict() for r in reports])


@app.command("ingest-items")
def ingest_items_cmd(
    paths: Annotated[list[Path], typer.Argument(help="item files: movies.dat, movies.csv, u.item, tags.csv, a JSON attribute map, or a table")],
    format: Annotated[str, typer.Option("--format", help="auto|movielens-movies-dat|movielens-movies-csv|movielens-u-item|movielens-tags|attribute-map|table")] = "auto",
    id_map: Annotated[Path | None, typer.Option(help="two columns: id used in the events, id used in the item file")] = None,
    item_col: Annotated[str | None, typer.Option(help="item id column of a generic table")] = None,
    numeric_cols: Annotated[str | None, typer.Option(help="comma-separated numeric columns (default: all numeric)")] = None,
    strict: Annotated[bool, typer.Option("--strict")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: HomeOpt = None,
) -> None:
    """Load item content (titles, categories, text, numeric fields)."""
    from pipeline.app.steps import ingest_catalog

    nums = [c.strip() for c in numeric_cols.split(",")] if numeric_cols else None
    reports = ingest_catalog(load_settings(home=home), list(paths), format, id_map, item_col, nums, strict,
                             on_report=None if as_json else lambda r: out.print(r.summary(), highlight=False))
    if as_json:
        _echo_json([r.as_dict() for r in reports])


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    home: HomeOpt = None,
) -> None:
    """Counts of the warehouse: events, users, items, time span, sources, quarantine."""
    from pipeline.app.steps import warehouse_summary

    s = load_settings(home=home)
    st = warehouse_summary(s)
    if as_json:
        _echo_json(st.as_dict())
        return
    out.print(f"warehouse   {s.duckdb_path}", highlight=False)
    out.print(f"events      {st.events:,}", highlight=False)
    out.print(f"users       {st.users:,}", highlight=False)
    out.print(f"items       {st.items:,} with events, {st.catalog_items:,} in the catalog", highlight=False)
    span = f"{st.time_min} .. {st.time_max}" if st.time_min else "no timestamps"
    out.print(f"time        {st.time_kind}: {span}", highlight=False)
    out.print(f"quarantined {st.quarantined:,}", highlight=False)
    for src in st.sources:
        out.print(
            f"  #{src['source_id']} {src['kind']:6} {src['format']:14} loaded {src['loaded']:>10,}  dup {src['duplicates']:>9,}"
            f"  quarantined {src['quarantined']:>7,}  {src['path']}", highlight=False,
        )


@app.command()
def features(
    split: Annotated[str | None, typer.Option(help="loo (leave-one-out) | temporal")] = None,
    split_time: Annotated[str | None, typer.Option(help="temporal: test events at/after this ISO time")] = None,
    valid_time: Annotated[str | None, typer.Option(help="temporal: validation events at/after this ISO time")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="temporal without --split-time: last share of events")] = None,
    cold_item_fraction: Annotated[float | None, typer.Option(help="hold this share of items out of training (cold-start report)")] = None,
    min_user_events: Annotated[int | None, typer.Option(help="keep only users with at least this many events")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if an identical feature set exists")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    home: HomeOpt = None,
) -> None:
    """Build the versioned feature set (vocabularies, content features, histories, splits).
    The histories are built one user bucket at a time (event_buckets); engine ray: one Ray task per bucket."""
    from pipeline.app.steps import build_features

    if split is not None and split not in ("loo", "temporal"):
        raise UserError("--split must be loo or temporal")
    s = load_settings(home=home, engine=engine, ray_address=ray_address, **{"features.split": split, "features.split_time": split_time,
                               "features.valid_time": valid_time, "features.test_fraction": test_fraction,
                               "features.cold_item_fraction": cold_item_fraction,
                               "features.min_user_events": min_user_events})
    result = build_features(s, force=force)
    path, built, manifest = result["path"], result["built"], result["manifest"]
    if as_json:
        _echo_json({"path": path, "built": built, **manifest})
        return
    c = manifest["counts"]
    out.print(f"feature set {manifest['version']} ({'built' if built else 'unchanged warehouse: reused'}) at {path}", highlight=False)
    out.print(f"  {c['users']:,} users, {c['items']:,} items, {c['events']:,} events; split {manifest['split']['kind']}: "
              f"{c['train_events']:,} training events, {c['valid_targets']:,} validation / {c['test_targets']:,} test targets", highlight=False)
    out.print(f"  content: {c['categories']} categories, {manifest['text_buckets']:,} text buckets, "
              f"numeric {manifest['numeric_fields'] or 'none'}; {c['cold_items']} cold items held out", highlight=False)


@app.command()
def train(
    epochs: Annotated[int | None, typer.Option(help="maximum epochs, the cosine's length (early stopping on the validation selection metric, NDCG@10 by default; default: fitted to the data)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per step")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (AdamW, warm-up + cosine; default: fitted to the data)")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="item / state vector size")] = None,
    blocks: Annotated[int | None, typer.Option(help="self-attention blocks")] = None,
    heads: Annotated[int | None, typer.Option(help="attention heads")] = None,
    max_len: Annotated[int | None, typer.Option(help="history length read by the encoder (default: fitted to the data)")] = None,
    dropout: Annotated[float | None, typer.Option(help="dropout rate (default: fitted to the data)")] = None,
    content: Annotated[bool | None, typer.Option("--content/--no-content", help="mix content features into item vectors")] = None,
    text_encoder: Annotated[str | None, typer.Option(
        "--text-encoder", help="item text in the item tower: hashed (words, trained) | minilm (frozen sentence "
                               "vectors, encoded once per feature set) | none")] = None,
    negatives: Annotated[int | None, typer.Option(help="0 = full softmax; N = sampled softmax with logQ correction")] = None,
    exclude_history: Annotated[bool | None, typer.Option(
        "--exclude-history/--no-exclude-history",
        help="never use the items of a training window as its negatives (as ranking leaves seen items out)")] = None,
    group_by_length: Annotated[bool | None, typer.Option(
        "--group-by-length/--no-group-by-length",
        help="batch windows of similar length together: faster steps (1.25x on ML-1M), lower NDCG on ML-100K (-9%)")] = None,
    patience: Annotated[int | None, typer.Option(help="epochs without improvement before stopping (default: fitted to the data)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (recorded with the run)")] = None,
    valid_users: Annotated[int | None, typer.Option(
        help="validate on a fixed random sample of this many users (default: all)")] = None,
    test_users: Annotated[int | None, typer.Option(
        help="rank a fixed random sample of this many users in the test report (default: all)")] = None,
    table_updates: Annotated[str | None, typer.Option(
        help="how AdamW updates the item tables under a sampled softmax: dense (every row, every step) | rows "
             "(only the rows the step read: far less memory traffic at large catalogues)")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    resume: Annotated[Path | None, typer.Option(help="resume the run in this folder from its last checkpoint")] = None,
    index_kind: Annotated[str, typer.Option("--index-kind", help="FAISS index of the bundle: auto | flat | hnsw | ivf")] = "auto",
    workers: Annotated[int | None, typer.Option(help="training processes: N > 1 runs torch DDP on Ray Train (the engine's cluster)")] = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    home: HomeOpt = None,
) -> None:
    """Train the content-aware SASRec on the current feature set (defaults: full-softmax SASRec+ with window items left out of the negatives; epochs, learning rate, length, dropout and patience fitted to the histories)."""
    from pipeline.app.steps import train as train_step

    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise UserError("--device must be auto, cpu or cuda")
    s = load_settings(home=home, device=device, engine=engine, ray_address=ray_address, **{"train.workers": workers,
        "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr, "train.negatives": negatives,
        "train.exclude_history": exclude_history, "train.group_by_length": group_by_length,
        "train.patience": patience, "train.seed": seed, "train.valid_users": valid_users, "train.test_users": test_users,
        "train.table_updates": table_updates,
        "model.hidden_size": hidden_size, "model.num_blocks": blocks,
        "model.num_heads": heads, "model.max_len": max_len, "model.dropout": dropout, "model.use_content": content,
        "model.text_encoder": text_encoder,
    })

    def show(rec: Any) -> None:
        if not as_json:
            v = rec.valid.get("ndcg@10")
            out.print(f"epoch {rec.epoch:3d}  loss {rec.loss:.4f}  {rec.samples_per_s:,.0f} seq/s"
                      + (f"  valid ndcg@10 {v:.4f}" if v is not None else ""), highlight=False)

    def note(line: str) -> None:
        if not as_json:
            out.print(line, highlight=False)

    result = train_step(s, resume=resume, progress=not as_json, on_epoch=show, index_kind=index_kind, on_note=note)
    if as_json:
        _echo_json({**result, "registered_version": result["version"]})
        return
    out.print(f"best epoch {result['best_epoch']} of {result['epochs_run']}: valid ndcg@10 {result['valid']['ndcg@10']:.4f}, "
              f"test ndcg@10 {result['test']['ndcg@10']:.4f} hr@10 {result['test']['hr@10']:.4f} ({result['seconds']:.0f} s)",
              highlight=False)
    role = "champion" if result["promoted"] else "challenger"
    out.print(f"registered {s.registry.model_name} v{result['version']} as {role}: {result['gate_reason']}", highlight=False)
    for name, m in result["report"].items():
        out.print(f"  {name:<28} test ndcg@10 {m['ndcg@10']:.4f}  hr@10 {m['hr@10']:.4f}", highlight=False)
    served = "" if s.mlflow_tracking_uri.startswith(("http://", "https://")) else " (after `attnrec ui`)"
    out.print(f"MLflow run: {result['mlflow_run_url']}{served}", highlight=False)


@app.command()
def evaluate(
    split: Annotated[str, typer.Option(help="valid | test")] = "test",
    baseline: Annotated[str | None, typer.Option(help="evaluate a baseline instead: popularity | itemknn")] = None,
    model: ModelOpt = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    keep_seen: Annotated[bool, typer.Option("--keep-seen", help="also rank seen items (repeat consumption), beside the default")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print metrics as JSON")] = False,
    partitions: Annotated[int | None, typer.Option(help="engine ray: the users in this many shares, one Ray task each (default: the cluster's CPUs)")] = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    home: HomeOpt = None,
) -> None:
    """Full-ranking HR/NDCG/MRR/coverage@K on the validation or test split (seen items excluded)."""
    from pipeline.app.steps import evaluate as evaluate_step

    s = load_settings(home=home, device=device, engine=engine, ray_address=ray_address, partitions=partitions)
    report = evaluate_step(s, split, baseline, model, keep_seen=keep_seen)
    name = report["model"]
    if as_json:
        _echo_json(report)
        return
    out.print(f"{name} on {split} of feature set {report['feature_set']}, {report['feature_set_note']} "
              f"({report['users']:,} users, full ranking, seen items excluded; ranked in {report['scored_on']}):",
              highlight=False)
    for k in (5, 10, 20, 50):
        out.print(f"  @{k:<3} hr {report[f'hr@{k}']:.4f}  ndcg {report[f'ndcg@{k}']:.4f}  mrr {report[f'mrr@{k}']:.4f}"
                  f"  coverage {report[f'coverage@{k}']:.4f}", highlight=False)
    if report.get("keep_seen"):
        ks = report["keep_seen"]
        out.print("  seen items ranked too (--keep-seen):", highlight=False)
        for k in (5, 10, 20, 50):
            out.print(f"  @{k:<3} hr {ks[f'hr@{k}']:.4f}  ndcg {ks[f'ndcg@{k}']:.4f}  mrr {ks[f'mrr@{k}']:.4f}"
                      f"  coverage {ks[f'coverage@{k}']:.4f}", highlight=False)
    if report.get("cold_start"):
        c = report["cold_start"]
        out.print(f"  held-out items, scored from content alone ({c['users']} targets): whole catalogue hr@10 "
                  f"{c['hr@10']:.4f}  ndcg@10 {c['ndcg@10']:.4f}", highlight=False)
        if c.get("among_held_out"):
            h = c["among_held_out"]
            out.print(f"    among the held-out items only: hr@10 {h['hr@10']:.4f}  ndcg@10 {h['ndcg@10']:.4f}", highlight=False)


@app.command()
def index(
    kind: Annotated[str, typer.Option(help="auto | flat (exact) | hnsw | ivf")] = "auto",
    param: Annotated[list[str] | None, typer.Option(
        help="FAISS parameter NAME=INT, repeatable: M, efConstruction, efSearch (hnsw); nlist, nprobe (ivf); "
             "shards (any kind: split the items over that many indexes, one per GPU when there are GPUs)")] = None,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """(Re)build the FAISS index of a model's item vectors, saved next to the model."""
    from pipeline.app.steps import build_index

    known = {"M", "efConstruction", "efSearch", "nlist", "nprobe", "shards"}
    params: dict[str, int] = {}
    for item in param or []:
        name, _, value = item.partition("=")
        if name not in known or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"--param {item!r}: expected NAME=positive integer with NAME one of {', '.join(sorted(known))}")
        params[name] = int(value)
    meta = build_index(load_settings(home=home), kind, model, params)
    shards = meta["params"].get("shards", 1)
    out.print(f"{meta['kind']} index of {meta['num_items']:,} items (D={meta['dim']}"
              f"{f', {shards} shards' if shards > 1 else ''}) for model {meta['model_sha256'][:12]} "
              f"at {Path(meta['bundle']) / 'index'}; recall@10 vs exact {meta['recall_at_10']:.4f}; built in "
              f"{meta['build_seconds']:.2f} s", highlight=False)


@app.command()
def recommend(
    user: Annotated[str | None, typer.Option("--user", help="user id in the warehouse")] = None,
    items: Annotated[str | None, typer.Option("--items", help="ad-hoc history: comma-separated item ids, oldest first")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="how many items")] = 10,
    explain: Annotated[bool, typer.Option("--explain", help="show the history items each recommendation rests on")] = False,
    include_seen: Annotated[bool, typer.Option("--include-seen", help="allow items already in the history")] = False,
    category: Annotated[str | None, typer.Option(help="only these categories (comma-separated)")] = None,
    exclude_category: Annotated[str | None, typer.Option(help="never these categories (comma-separated)")] = None,
    exclude: Annotated[str | None, typer.Option(help="never these item ids (comma-separated)")] = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    home: HomeOpt = None,
) -> None:
    """Top-k recommendations for a user or an ad-hoc history, with reasons."""
    from pipeline.data.identity import split_list as split
    from pipeline.serving.recommender import Recommender

    if (user is None) == (items is None):
        raise UserError("give exactly one of --user ID or --items ID,ID,...")
    s = load_settings(home=home)
    recommender = Recommender.load(model, settings=s, threads=s.serve.threads)
    response = recommender.recommend(user=user, items=(split(items) or []) if items is not None else None, k=k, explain=explain,
                                     exclude_seen=not include_seen, include_categories=split(category),
                                     exclude_categories=split(exclude_category), exclude_items=split(exclude))
    if as_json:
        _echo_json(response.as_dict())
    else:
        if response.known_user is False:
            err.print(f"user {user} is not in the warehouse {s.duckdb_path}: the most popular items follow", highlight=False)
        _print_recommendations(response, f"user {user}" if user is not None else f"history {items}")
    _end_read_only_command()


def _end_read_only_command() -> None:
    """Exit now, skipping the interpreter's teardown of torch, FAISS and the rest (0.3-0.5 s of
    a 2 s query). Only for commands that wrote nothing and leave nothing to finish."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_recommendations(response: Any, who: str) -> None:
    from rich.table import Table

    note = " (no usable history: most popular)" if response.fallback else f" from {response.history_length} history items"
    table = Table(title=f"top {len(response.recommendations)} for {who}{note} - model {response.model_version}",
                  title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("title")
    table.add_column("score", justify="right")
    table.add_column("because you interacted with")
    for rank, rec in enumerate(response.recommendations, 1):
        reasons = "; ".join(f"{r.title or r.item_id} ({r.weight:.1%})" for r in rec.reasons)
        table.add_row(str(rank), rec.item_id, rec.title or "", f"{rec.score:.3f}", reasons)
    out.print(table)


@app.command("recommend-all")
def recommend_all_cmd(
    k: Annotated[int, typer.Option("-k", "--k", help="items per user")] = 50,
    out_path: Annotated[Path, typer.Option("--out", help="file to write: .parquet, .csv or .ndjson")] = Path("recs.parquet"),
    table: Annotated[str, typer.Option(help="DuckDB table to (re)write in the warehouse")] = "recommendations",
    partitions: Annotated[int | None, typer.Option(help="engine ray: user partitions, one Ray task each (default: the cluster's CPUs)")] = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """Top-k for every user of the warehouse, to Parquet and a DuckDB table (on Ray: split by user partition)."""
    from pipeline.app.steps import recommend_everyone

    settings = load_settings(home=home, engine=engine, ray_address=ray_address, partitions=partitions)
    report = recommend_everyone(settings, k, out_path, model, table)
    parts = f" ({report['partitions']['count']} partitions on Ray)" if report["partitions"] else ""
    out.print(f"{report['rows']:,} recommendations for {report['users']:,} users ({report['fallback_users']} by popularity) "
              f"in {report['seconds']:.2f} s{parts} -> {report['file']} and table {report['table']}", highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    from pipeline.app.steps import serve as serve_step

    s = load_settings(home=home, **{"serve.host": host, "serve.port": port})
    serve_step(s, model, announce=lambda line: err.print(line, highlight=False))


@app.command()
def deploy(
    host: Annotated[str, typer.Option(help="Prefect server address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    no_server: Annotated[bool, typer.Option("--no-server", help="use the server at PREFECT_API_URL instead of starting one")] = False,
    cron: Annotated[str, typer.Option(help="schedule of attnrec-pipeline/nightly")] = "0 2 * * *",
    home: HomeOpt = None,
) -> None:
    """Start a local Prefect server and serve the attnrec deployments (Ctrl-C or SIGTERM stops both)."""
    from pipeline.app.prefect_setup import configure_prefect, serve_deployments, start_server, stop_server

    s = load_settings(home=home)
    server = None
    if no_server:
        url = s.prefect_api_url or os.environ.get("PREFECT_API_URL")
        if not url:
            raise UserError("--no-server needs PREFECT_API_URL (or ATTNREC_PREFECT_API_URL) set to a running Prefect server")
    else:
        err.print(f"starting the Prefect server on http://{host}:{port} (database in {s.prefect_home}) ...", highlight=False)
        server = start_server(s, host, port)
        url = f"http://{host}:{port}/api"
    configure_prefect(s, url)
    from flows.deployments import deployments

    err.print(f"Prefect UI: {url.removesuffix('/api')}   runs: PREFECT_API_URL={url} prefect deployment run "
              "'attnrec-pipeline/nightly'", highlight=False)
    try:
        serve_deployments(deployments(str(s.home), cron))
    finally:
        if server is not None:
            stop_server(server)
    err.print("stopped", highlight=False)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="port of the MLflow UI")] = MLFLOW_UI_PORT,
    workers: Annotated[int, typer.Option(min=1, help="MLflow server processes (MLflow's own default is 4; one "
                                                     "starts in about half the time and serves one person)")] = 1,
    home: HomeOpt = None,
) -> None:
    """Open the MLflow UI on attnrec's tracking store (http://127.0.0.1:PORT)."""
    import shutil

    s = load_settings(home=home)
    from pipeline.registry.tracking import configure

    configure(s)  # creates the store and experiment if this is a fresh installation
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    args = [mlflow_bin, "ui", "--backend-store-uri", str(s.mlflow_tracking_uri), "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]
    if s.mlflow_tracking_uri.startswith("sqlite"):
        args += ["--default-artifact-root", s.mlflow_artifact_root.as_uri()]
    from pipeline.app.steps import check_port_free

    check_port_free("127.0.0.1", port, "is the MLflow UI already running? (choose another with --port)")
    err.print(f"MLflow UI on http://127.0.0.1:{port} (store {s.mlflow_tracking_uri})", highlight=False)
    os.execv(args[0], args)


DEMO_DATA = Path(__file__).resolve().parents[1] / "datasets" / "ml-latest-small"
DEMO_OVERRIDES: dict[str, Any] = {
    "train.epochs": 20, "train.patience": 5, "model.max_len": 50, "model.hidden_size": 64, "train.batch_size": 64,
    "train.negatives": 512,  # sampled softmax: 5x cheaper steps over the 9.7k-item catalogue on a CPU
}


@app.command()
def demo(
    user: Annotated[str, typer.Option(help="whose recommendations to print at the end")] = "42",
    home: HomeOpt = None,
) -> None:
    """Run the whole attnrec-pipeline flow on the bundled ml-latest-small, then print recommendations."""
    import time

    from pipeline.app.prefect_setup import configure_prefect

    s = load_settings(home=home)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # show each task and training epoch as it runs
    configure_prefect(s)
    from flows.pipeline_flows import attnrec_pipeline

    started = time.perf_counter()
    err.print(f"attnrec demo: ml-latest-small ({DEMO_DATA}) -> pipeline flow in {s.home}", highlight=False)
    result = attnrec_pipeline(
        event_files=[str(DEMO_DATA / "ratings.csv")],
        item_files=[str(DEMO_DATA / "movies.csv"), str(DEMO_DATA / "tags.csv")],
        k=10, home=str(s.home), overrides=DEMO_OVERRIDES,
    )
    trained = result["trained"]
    from pipeline.serving.recommender import Recommender

    _print_recommendations(Recommender.load(settings=s).recommend(user=user, k=10, explain=True), f"user {user}")
    if trained:
        out.print(f"model {s.registry.model_name} v{trained['version']} ({'champion' if trained['promoted'] else 'challenger'}): "
                  f"test NDCG@10 {trained['test_ndcg@10']:.4f}, HR@10 {trained['test_hr@10']:.4f}", highlight=False)
        out.print(f"MLflow run {trained['mlflow_run_url']}", highlight=False)
    else:
        out.print("warehouse unchanged since the last run: the champion model was kept (no retraining)", highlight=False)
    rec = result["recommendations"]
    out.print(f"batch recommendations: {rec['rows']:,} rows for {rec['users']} users -> {rec['file']} "
              f"and DuckDB table {rec['table']}", highlight=False)
    out.print(f"see the runs: attnrec ui --home {s.home}  (then http://127.0.0.1:{MLFLOW_UI_PORT}); whole demo "
              f"{time.perf_counter() - started:.0f} s", highlight=False)


def main() -> None:
    """Run the CLI: a user error, or a usage error Typer finds in the arguments, is one
    ``error:`` line on stderr (exit 1, usage errors 2), never a traceback or a box."""
    if not sys.argv[1:]:
        sys.argv.append("--help")  # a bare `attnrec`: the help
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # Typer's usage errors: a bad option value, a missing argument
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path.split()[-1] if ctx is not None and ctx.parent is not None else None
        hint = f" (see attnrec {command} --help)" if command else " (see attnrec --help)"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err.print(f"error: {message}{hint if ctx is not None else ''}", highlight=False, markup=False)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except typer.Abort:
        err.print("error: aborted", highlight=False)
        raise SystemExit(1) from None
    except UserError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        raise SystemExit(1) from None
    if code == INTERRUPTED:  # Typer turns Ctrl-C into this exit code
        err.print("interrupted", highlight=False)
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
