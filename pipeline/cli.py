"""The ``attnrec`` command line. User errors print one line and exit 1; no tracebacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipeline.config import Settings, load_settings
from pipeline.errors import UserError

app = typer.Typer(
    name="attnrec", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Attention-based content-filtering recommender: ingest, features, train, evaluate, index, recommend, serve.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[Path | None, typer.Option("--home", help="state folder (default $ATTNREC_HOME or ./.attnrec)")]


def settings_from(home: Path | None, **overrides: Any) -> Settings:
    return load_settings(home=home, **overrides)


def _echo_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="files, folders or globs of user-item events")],
    format: Annotated[str, typer.Option("--format", help="auto|csv|tsv|parquet|ndjson|sasrec|movielens-100k|movielens-1m|movielens-csv")] = "auto",
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
    strict: Annotated[bool, typer.Option("--strict", help="reject a whole file with any bad row")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print reports as JSON")] = False,
    home: HomeOpt = None,
) -> None:
    """Load event logs into the warehouse (exactly once; bad rows quarantined)."""
    from pipeline.ingest import TIME_UNITS, IngestOptions, ingest_paths
    from pipeline.ingest_formats import ColumnFlags, expand_paths
    from pipeline.warehouse import open_warehouse

    if time_unit not in TIME_UNITS:
        raise UserError(f"--time-unit must be one of {', '.join(TIME_UNITS)}")
    s = settings_from(home)
    opts = IngestOptions(
        format=format, columns=ColumnFlags(user_col, item_col, time_col, event_col, weight_col, event_id_col),
        delimiter=delimiter, has_header=header, event_type=event_type, time_unit=time_unit, strict=strict,
    )
    files = expand_paths(paths)

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

    with open_warehouse(s.duckdb_path) as con:
        reports = ingest_paths(con, files, opts, s.tmp_dir, progress=not as_json, on_report=show)
    if as_json:
        _echo_json([r.as_dict() for r in reports])


@app.command("ingest-items")
def ingest_items_cmd(
    paths: Annotated[list[Path], typer.Argument(help="item files: movies.dat, movies.csv, u.item, tags.csv, or a table")],
    format: Annotated[str, typer.Option("--format", help="auto|movielens-movies-dat|movielens-movies-csv|movielens-u-item|movielens-tags|table")] = "auto",
    id_map: Annotated[Path | None, typer.Option(help="two columns: id used in the events, id used in the item file")] = None,
    item_col: Annotated[str | None, typer.Option(help="item id column of a generic table")] = None,
    numeric_cols: Annotated[str | None, typer.Option(help="comma-separated numeric columns (default: all numeric)")] = None,
    strict: Annotated[bool, typer.Option("--strict")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: HomeOpt = None,
) -> None:
    """Load item content (titles, categories, text, numeric fields)."""
    from pipeline.catalog import ingest_items
    from pipeline.warehouse import open_warehouse

    s = settings_from(home)
    nums = [c.strip() for c in numeric_cols.split(",")] if numeric_cols else None
    reports = []
    with open_warehouse(s.duckdb_path) as con:
        for path in paths:
            report = ingest_items(con, path, format, id_map, item_col, nums, strict)
            reports.append(report)
            if not as_json:
                out.print(report.summary(), highlight=False)
    if as_json:
        _echo_json([r.as_dict() for r in reports])


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    home: HomeOpt = None,
) -> None:
    """Counts of the warehouse: events, users, items, time span, sources, quarantine."""
    from pipeline.warehouse import open_warehouse, warehouse_stats

    s = settings_from(home)
    with open_warehouse(s.duckdb_path, read_only=True) as con:
        st = warehouse_stats(con)
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
    force: Annotated[bool, typer.Option("--force", help="rebuild even if an identical feature set exists")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    home: HomeOpt = None,
) -> None:
    """Build the versioned feature set (vocabularies, content features, histories, splits)."""
    from pipeline.feature_store import build_feature_set
    from pipeline.warehouse import open_warehouse

    if split is not None and split not in ("loo", "temporal"):
        raise UserError("--split must be loo or temporal")
    s = settings_from(home, **{"features.split": split, "features.split_time": split_time,
                               "features.valid_time": valid_time, "features.test_fraction": test_fraction,
                               "features.cold_item_fraction": cold_item_fraction})
    with open_warehouse(s.duckdb_path, read_only=True) as con:
        path, built = build_feature_set(con, s, force=force)
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        _echo_json({"path": str(path), "built": built, **manifest})
        return
    c = manifest["counts"]
    out.print(f"feature set {manifest['version']} ({'built' if built else 'unchanged warehouse: reused'}) at {path}", highlight=False)
    out.print(f"  {c['users']:,} users, {c['items']:,} items, {c['events']:,} events; split {manifest['split']['kind']}: "
              f"{c['train_events']:,} training events, {c['valid_targets']:,} validation / {c['test_targets']:,} test targets", highlight=False)
    out.print(f"  content: {c['categories']} categories, {manifest['text_buckets']:,} text buckets, "
              f"numeric {manifest['numeric_fields'] or 'none'}; {c['cold_items']} cold items held out", highlight=False)


def main() -> None:
    try:
        app()
    except UserError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted: the file being ingested was rolled back", highlight=False)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
