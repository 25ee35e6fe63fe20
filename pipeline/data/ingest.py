"""Exactly-once ingest of event logs into the DuckDB warehouse.

One file is one transaction: the file's events, its quarantined rows, new dictionary ids
and its ``sources`` row are committed together or not at all, so an interrupted ingest
leaves the warehouse as it was before that file.

Identity: an event is its (user, item, time, event type), or its ``--event-id-col`` value
when one is given. Duplicates inside the file and against the warehouse are found by
sorting 64-bit hashes of the identity (numpy), and only hash matches are checked exactly
in SQL, so the common case (new data) is a plain streaming ``INSERT``.

Many files in parallel: ``stage_file`` does a file's reading, parsing and checking without
the warehouse, in any process that sees the file (on Ray: ``pipeline.scale.ingest``), and
writes its canonical rows as Parquet; ``commit_staged`` then commits them in file order,
each file still one transaction. Both paths share the canonical SQL and the commit.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.data.identity import (
    MAX_ID_CHARS,
    id_text_sql,
    integer_column_key_sql,
    integer_key_sql,
    not_whole_sql,
    too_long_sql,
    typed_id_text_sql,
)
from pipeline.data.ingest_formats import (
    MAX_LINE_BYTES,
    NOT_JSON,
    STAGE_COLUMNS,
    TIME_MAX_US,
    UNIT_FACTORS,
    ColumnFlags,
    SourceSpec,
    detect,
    estimate_rows,
    infer_time_unit,
    text_batches,
    unit_from_values,
)
from pipeline.data.warehouse import next_source_id, register_ids, transaction
from pipeline.errors import InputFileError

TIME_UNITS = ("auto", "s", "ms", "us", "ns")
INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}
TIME_TYPES = ("TIMESTAMP", "DATE")
ORDER_SOURCE_SHIFT = 40  # order-only files: ts = source_id << 40 | line (lines below 2**40)


@dataclass
class IngestReport:
    """What one file's ingest did. ``examples`` are the first quarantined rows: (line, column, reason)."""

    path: str
    format: str
    description: str
    rows: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    source_id: int | None = None
    identical_to: int | None = None
    seconds: float = 0.0
    examples: list[tuple[int, str | None, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        head = f"{self.path}: {self.loaded:,} loaded, {self.duplicates:,} duplicate, {self.quarantined:,} quarantined"
        if self.identical_to is not None:
            head += f" (identical to source #{self.identical_to}, already ingested)"
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return head + f" in {self.seconds:.2f} s ({rate:,.0f} rows/s)"


@dataclass(frozen=True)
class IngestOptions:
    """How to read event files; everything a user can set on ``attnrec ingest``."""

    format: str = "auto"
    columns: ColumnFlags = ColumnFlags()
    delimiter: str | None = None
    has_header: bool | None = None
    event_type: str | None = None
    time_unit: str = "auto"
    strict: bool = False
    encoding: str | None = None  # of text files; None: UTF-8, lines with other bytes are quarantined


def _encoding_name(encoding: str | None, path: Path) -> str:
    """The codec's canonical name ('utf-8' when none is given); an unknown name is a user error."""
    try:
        return codecs.lookup(encoding or "utf-8").name
    except LookupError:
        raise InputFileError(path, f"unknown encoding {encoding!r} (for example utf-8, latin-1, cp1252, utf-16)") from None


def _is_utf8(path: Path) -> bool:
    """Whether the whole file is valid UTF-8 (read in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _utf8_copy(path: Path, encoding: str, tmp_dir: Path) -> Path:
    """A UTF-8 copy of a text file in ``encoding`` (in ``tmp_dir``; the caller removes it)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out = tmp_dir / f"{path.name}.{os.getpid()}.{time.time_ns()}.utf8"
    try:
        with open(path, encoding=encoding, newline="") as src, open(out, "w", encoding="utf-8", newline="") as dst:
            for chunk in iter(lambda: src.read(1 << 20), ""):
                dst.write(chunk)
    except UnicodeDecodeError as exc:
        out.unlink(missing_ok=True)
        raise InputFileError(path, f"not {encoding} text at byte {exc.start:,}: {exc.reason}") from None
    return out


def file_fingerprint(path: Path, options_key: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(options_key.encode())
    return h.hexdigest()


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column_types(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}


def _is_numeric(dtype: str) -> bool:
    return dtype in INT_TYPES or dtype in FLOAT_TYPES or dtype.startswith("DECIMAL")


def _id_exprs(col: str, dtype: str) -> tuple[str, str, str, str, str]:
    """(key, id text for the dictionary, missing, too long, not a whole number) SQL for an id
    column of type ``dtype``, by the identity rule (``pipeline.data.identity``)."""
    if dtype in INT_TYPES:
        key = integer_column_key_sql(col)
        return key, f"CASE WHEN {key} IS NULL THEN {col}::VARCHAR END", f"{col} IS NULL", "false", "false"
    if dtype in FLOAT_TYPES or dtype.startswith("DECIMAL"):
        text = typed_id_text_sql(col)
        key = integer_key_sql(text)
        return key, f"CASE WHEN {key} IS NULL THEN {text} END", f"{col} IS NULL", "false", not_whole_sql(col)
    text = id_text_sql(col)
    key = integer_key_sql(text)
    return key, f"CASE WHEN {key} IS NULL THEN {text} END", f"{text} IS NULL", too_long_sql(text), "false"


def _column_sql(name: str | None) -> str:
    """SQL for the quarantine's column name: a file column's name, the staged ``nested`` column
    (which holds the name of an NDJSON field), or NULL for the line as a whole."""
    if name is None:
        return "NULL"
    return name if name == "nested" else _sql_str(name)


def _unit_scale(unit: str, value: str) -> str:
    """SQL: a numeric time in ``unit`` as microseconds (DOUBLE: out-of-range values stay checkable)."""
    return f"(({value})::DOUBLE * {UNIT_FACTORS[unit]})"


def _infer_unit(con: duckdb.DuckDBPyConnection, relation: str, col: str) -> str:
    """Unix time unit of a Parquet column from its first values (``unit_from_values``)."""
    values = con.execute(f"SELECT TRY_CAST(t AS DOUBLE) AS t FROM (SELECT {col} AS t FROM {relation} LIMIT 10000)").fetchnumpy()["t"]
    return unit_from_values(np.asarray(values, dtype=np.float64))


@dataclass
class _Canonical:
    sql: str               # SELECT producing the canonical columns
    time_unit: str | None  # chosen unit of numeric times (None: typed or order-only)


def _canonical_sql(con: duckdb.DuckDBPyConnection, spec: SourceSpec, relation: str, staged: bool,
                   opts: IngestOptions, source_id: int, valid_utf8: bool = True) -> _Canonical:
    """SQL over ``relation`` giving: line, user_key, user_raw, item_key, item_raw, ts, event_type,
    weight, event_id, reason, bad_column, raw. ``reason`` is NULL for good rows.

    An order-only file's ``ts`` is ``source_id * 2**40 + line`` (``+ order``, the event's position
    in the file, for one sequence per line): its events follow the earlier files' in time, and
    two such files never share an event identity by their line numbers."""
    types = {} if staged else _column_types(con, relation)
    if staged:
        col = {r: _ident(r) for r in STAGE_COLUMNS if spec.mapping.get(r)}
        names = {r: spec.mapping.get(r) for r in STAGE_COLUMNS}
        line, raw, nfields = "line", "raw", "nfields"
    else:
        col = {r: _ident(spec.mapping[r]) for r in STAGE_COLUMNS if spec.mapping.get(r)}
        names = {r: spec.mapping.get(r) for r in STAGE_COLUMNS}
        line = "file_row_number + 1"
        raw = "concat_ws(',', " + ", ".join(f"coalesce({_ident(c)}::VARCHAR, '')" for c in spec.columns) + ")"
        nfields = "NULL::BIGINT"
    ctype = {r: types.get(spec.mapping[r] if not staged else r, "VARCHAR") for r in col}

    invalid_utf8 = "false" if valid_utf8 else "true"  # Polars read the file leniently: U+FFFD marks bad bytes
    ukey, uraw, umiss, ulong, ufrac = _id_exprs(col["user"], ctype["user"])
    ikey, iraw, imiss, ilong, ifrac = _id_exprs(col["item"], ctype["item"])

    unit: str | None = None
    if spec.mapping.get("time"):
        t, tt = col["time"], ctype["time"]
        t_text = f"nullif(trim({t}::VARCHAR), '')"
        if tt.startswith(TIME_TYPES):
            ts = f"epoch_us({t})::DOUBLE"
            tmiss = f"{t} IS NULL"
        else:
            if opts.time_unit != "auto":
                unit = opts.time_unit
            else:
                unit = infer_time_unit(spec) if staged else _infer_unit(con, relation, t)
            if _is_numeric(tt):
                ts = _unit_scale(unit, t)
                tmiss = f"{t} IS NULL"
            else:
                ts = (f"coalesce({_unit_scale(unit, f'TRY_CAST({t_text} AS BIGINT)')}, "
                      f"{_unit_scale(unit, f'TRY_CAST({t_text} AS DOUBLE)')}, "
                      f"epoch_us(TRY_CAST({t_text} AS TIMESTAMPTZ))::DOUBLE)")
                tmiss = f"{t_text} IS NULL"
        in_range = f"(({ts}) >= 0 AND ({ts}) < {TIME_MAX_US})"
        t_bad = f"({ts}) IS NOT NULL AND NOT {in_range}"
        ts = f"CASE WHEN {in_range} THEN round({ts})::BIGINT END"
    else:
        order = 'coalesce("order", line)' if staged else line  # events in a line: their position in the file
        ts, tmiss, t_text = f"({order})::BIGINT + {source_id << ORDER_SOURCE_SHIFT}", "false", "NULL"
        t_bad = "false"

    default_type = _sql_str(opts.event_type or spec.default_event_type)
    et = f"coalesce(nullif(trim({col['event']}::VARCHAR), ''), {default_type})" if "event" in col else default_type
    if "weight" in col and _is_numeric(ctype["weight"]):
        weight, wbad, w_text = f"{col['weight']}::DOUBLE", "false", "NULL"
    elif "weight" in col:
        w_text = f"nullif(trim({col['weight']}::VARCHAR), '')"
        weight = f"TRY_CAST({w_text} AS DOUBLE)"
        wbad = f"({w_text} IS NOT NULL AND {weight} IS NULL)"
    else:
        weight, wbad, w_text = "NULL::DOUBLE", "false", "NULL"
    if "event_id" in col:
        eid = f"nullif(trim({col['event_id']}::VARCHAR), '')"
        eidmiss = f"{eid} IS NULL"
    else:
        eid, eidmiss = "NULL::VARCHAR", "false"

    nexpected = len(spec.columns)
    line_checks = [  # what is wrong with a text line as a whole (staged text only)
        (f"{invalid_utf8} AND contains(raw, chr(65533))", None, "'not valid UTF-8 (name the file''s encoding with --encoding)'"),
        ("contains(raw, chr(0))", None, "'the line holds a NUL byte'"),
        (f"strlen(raw) > {MAX_LINE_BYTES}", None, f"'line longer than {MAX_LINE_BYTES:,} bytes'"),
        ("nested IS NOT NULL", "nested", "'not a single value (an object or a list)'"),
    ] if staged else []
    checks = line_checks + [
        (f"{nfields} IS NOT NULL AND {nfields} = {NOT_JSON}", None, "'not a JSON object'"),
        (f"{nfields} IS NOT NULL AND {nfields} <> {nexpected}", None,
         f"'expected {nexpected} fields, found ' || {nfields}"),
        (umiss, names["user"], "'missing user id'"),
        (imiss, names["item"], "'missing item id'"),
        (ulong, names["user"], f"'user id longer than {MAX_ID_CHARS:,} characters'"),
        (ilong, names["item"], f"'item id longer than {MAX_ID_CHARS:,} characters'"),
        (ufrac, names["user"], "'user id is a number that is not whole'"),
        (ifrac, names["item"], "'item id is a number that is not whole'"),
        (tmiss, names["time"], "'missing time'"),
        (t_bad, names["time"], f"'time out of range (1970-01-01 to 2200-01-01): ''' || {t_text} || ''''"),
        (f"({ts}) IS NULL", names["time"], f"'unparseable time ''' || {t_text} || ''''"),
        (wbad, names["weight"], f"'unparseable weight ''' || {w_text} || ''''"),
        (eidmiss, names["event_id"], "'missing event id'"),
    ]
    reason = "CASE " + " ".join(f"WHEN {c} THEN {r}" for c, _, r in checks) + " END"
    bad_col = "CASE " + " ".join(f"WHEN {c} THEN {_column_sql(n)}" for c, n, _ in checks) + " END"
    sql = f"""
        SELECT * EXCLUDE (raw_all), CASE WHEN reason IS NOT NULL THEN raw_all END AS raw FROM (
        SELECT ({line})::BIGINT AS line, {ukey} AS user_key, {uraw} AS user_raw, {ikey} AS item_key, {iraw} AS item_raw,
               {ts} AS ts, {et} AS event_type, {weight} AS weight, {eid} AS event_id,
               {reason} AS reason, {bad_col} AS bad_column, {raw} AS raw_all
        FROM {relation})"""
    return _Canonical(sql, unit)


@contextmanager
def _progress_bar(path: Path, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = estimate_rows(path)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(f"reading {path.name}", total=total)
        yield lambda n: bar.advance(task, n)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Distinct values of a sorted array (numpy's ``unique`` hashes, which is slower here)."""
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _members(sorted_haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``needles`` occur in ``sorted_haystack``."""
    idx = np.searchsorted(sorted_haystack, needles)
    idx[idx == len(sorted_haystack)] = 0
    return sorted_haystack[idx] == needles


def _identity_hash(spec: SourceSpec, user: str = "ukey", item: str = "item_key") -> str:
    """SQL hashing an event's identity: its id column, else (user, item, time, type)."""
    if spec.mapping.get("event_id"):
        return "hash(event_id)"
    return f"hash({user}, {item}, ts, event_type)"


def _identity_equal(spec: SourceSpec) -> str:
    """SQL: warehouse event ``e`` is the same event as new row ``c``."""
    if spec.mapping.get("event_id"):
        return "e.event_id = c.event_id"
    return "e.user_key = c.ukey AND e.item_key = c.ikey AND e.ts = c.ts AND e.event_type = c.event_type"


def _fingerprint(spec: SourceSpec, opts: IngestOptions) -> str:
    """The file's identity for exactly-once: its bytes, the detected layout and the encoding."""
    encoding = _encoding_name(opts.encoding, spec.path)
    return file_fingerprint(spec.path, spec.options_key() + (f"|encoding={encoding}" if encoding != "utf-8" else ""))


def _identical(con: duckdb.DuckDBPyConnection, spec: SourceSpec, opts: IngestOptions, fingerprint: str,
               report: IngestReport) -> bool:
    """Whether an identical file was ingested before (then ``report`` says so); under ``--strict``
    one that had quarantined rows is refused."""
    prior = con.execute(
        "SELECT source_id, rows_read, loaded + duplicates, quarantined FROM sources WHERE fingerprint = ? AND kind = 'events'",
        [fingerprint],
    ).fetchall()
    if not prior:
        return False
    source_id, rows, seen, quarantined = prior[0]
    if opts.strict and quarantined:
        raise InputFileError(spec.path, f"--strict: identical to source #{source_id}, ingested earlier with "
                                        f"{quarantined:,} quarantined rows (in the quarantine table); nothing written")
    report.identical_to, report.rows, report.duplicates = source_id, rows, int(seen)
    return True


def _input_error(exc: duckdb.Error, failures: list[InputFileError], path: Path) -> InputFileError:
    """The ``InputFileError`` behind a DuckDB error: the text reader's own, else DuckDB's first line."""
    cause = exc.__cause__ if isinstance(exc.__cause__, InputFileError) else next(iter(failures), None)
    return cause or InputFileError(path, f"ingest failed, nothing written: {str(exc).splitlines()[0]}")


@contextmanager
def _canonical_rows(con: duckdb.DuckDBPyConnection, spec: SourceSpec, opts: IngestOptions, tmp_dir: Path,
                    source_id: int, failures: list[InputFileError],
                    on_rows: Callable[[int], None] | None = None) -> Iterator[tuple[_Canonical, str]]:
    """The file's canonical SELECT (``_canonical_sql``) over a reader registered on ``con``, and
    what reading found for the report's description, for the block. Text streams through
    Polars (a UTF-8 copy first when another encoding is named); Parquet is read by DuckDB."""
    encoding = _encoding_name(opts.encoding, spec.path)
    staged = spec.format != "parquet"
    read, valid_utf8, notes = spec, True, ""  # read: the file, or its UTF-8 copy
    if staged and encoding != "utf-8":
        read = dataclasses.replace(spec, path=_utf8_copy(spec.path, encoding, tmp_dir))
    elif staged:
        valid_utf8 = _is_utf8(spec.path)
        if not valid_utf8:
            notes += "; not valid UTF-8: lines with other bytes quarantined (name the encoding with --encoding)"
    reader = f"reader_{os.getpid()}_{time.time_ns()}"
    try:
        if staged:
            con.register(reader, text_batches(read, on_rows, failures=failures))
            relation = reader
        else:
            relation = f"read_parquet({_sql_str(str(spec.path))}, file_row_number = true)"
        canon = _canonical_sql(con, read, relation, staged, opts, source_id, valid_utf8)
        if canon.time_unit and opts.time_unit == "auto":
            notes += f"; numeric times read as unix {canon.time_unit}"
        yield canon, notes
    finally:
        if read.path != spec.path:
            read.path.unlink(missing_ok=True)
        if staged:
            con.unregister(reader)


def ingest_file(con: duckdb.DuckDBPyConnection, spec: SourceSpec, opts: IngestOptions, tmp_dir: Path,
                progress: bool = False) -> IngestReport:
    """Ingest one detected file in one transaction. Raises ``InputFileError`` (nothing written) on
    a strict-mode reject or an unreadable file."""
    started = time.perf_counter()
    report = IngestReport(str(spec.path), spec.format, spec.describe())
    fingerprint = _fingerprint(spec, opts)
    if _identical(con, spec, opts, fingerprint, report):
        report.seconds = time.perf_counter() - started
        return report

    view = f"canon_{os.getpid()}_{time.time_ns()}"
    failures: list[InputFileError] = []  # what the text reader raised inside DuckDB's scan
    kind = "VIEW" if spec.format == "parquet" else "TABLE"  # text: streamed once into a temp table
    source_id = next_source_id(con)  # one writer at a time: still free when the transaction starts
    try:
        with _progress_bar(spec.path, progress and kind == "TABLE") as on_rows, \
                _canonical_rows(con, spec, opts, tmp_dir, source_id, failures, on_rows) as (canon, notes):
            report.description += notes
            with transaction(con):
                con.execute(f"CREATE TEMP {kind} {view} AS {canon.sql}")
                _load(con, spec, opts, view, fingerprint, report, source_id)
    except duckdb.Error as exc:
        raise _input_error(exc, failures, spec.path) from None
    finally:
        con.execute(f"DROP {kind} IF EXISTS {view}")
    report.seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True)
class StagedFile:
    """One file read, checked and written as canonical rows by ``stage_file``, ready to commit."""

    spec: SourceSpec
    fingerprint: str
    notes: str              # what reading found, for the report's description
    canonical: Path | None  # Parquet of ``_canonical_sql``'s rows, ``ts`` without the source id of
                            # an order-only file; None: an identical file was known, nothing read
    seconds: float          # spent staging


def stage_file(spec: SourceSpec, opts: IngestOptions, tmp_dir: Path, out: Path, known: frozenset[str]) -> StagedFile:
    """Read, parse and check one file without the warehouse: its canonical rows (good and bad,
    with their reasons) written to ``out`` (Parquet), so that reading runs in parallel, in any
    process that sees the file, and only the commit (``commit_staged``) is serial. A file
    whose fingerprint is in ``known`` is not read. Raises ``InputFileError`` like ``ingest_file``."""
    started = time.perf_counter()
    fingerprint = _fingerprint(spec, opts)
    if fingerprint in known:
        return StagedFile(spec, fingerprint, "", None, time.perf_counter() - started)
    failures: list[InputFileError] = []
    partial = out.with_name(out.name + ".partial")
    with duckdb.connect(config={"threads": 1}) as con:  # one task, one CPU: files run side by side
        con.execute("SET TimeZone = 'UTC'")
        try:
            with _canonical_rows(con, spec, opts, tmp_dir, 0, failures) as (canon, notes):
                con.execute(f"COPY ({canon.sql}) TO {_sql_str(str(partial))} (FORMAT parquet)")
        except duckdb.Error as exc:
            partial.unlink(missing_ok=True)
            raise _input_error(exc, failures, spec.path) from None
    os.replace(partial, out)
    return StagedFile(spec, fingerprint, notes, out, time.perf_counter() - started)


def commit_staged(con: duckdb.DuckDBPyConnection, staged: StagedFile, opts: IngestOptions) -> IngestReport:
    """Commit a staged file into the warehouse in one transaction (``_load``, as ``ingest_file``
    does), unless an identical file is there by now; its canonical rows file is removed."""
    started = time.perf_counter()
    spec = staged.spec
    report = IngestReport(str(spec.path), spec.format, spec.describe())
    view = f"staged_{os.getpid()}_{time.time_ns()}"
    try:
        if not _identical(con, spec, opts, staged.fingerprint, report):
            assert staged.canonical is not None, "a file not in the warehouse was not staged"
            report.description += staged.notes
            source_id = next_source_id(con)
            shift = "" if spec.mapping.get("time") else f" REPLACE (ts + {source_id << ORDER_SOURCE_SHIFT} AS ts)"
            with transaction(con):
                con.execute(f"CREATE TEMP VIEW {view} AS SELECT *{shift} FROM read_parquet({_sql_str(str(staged.canonical))})")
                _load(con, spec, opts, view, staged.fingerprint, report, source_id)
    except duckdb.Error as exc:
        raise _input_error(exc, [], spec.path) from None
    finally:
        con.execute(f"DROP VIEW IF EXISTS {view}")
        if staged.canonical is not None:
            staged.canonical.unlink(missing_ok=True)
    report.seconds = staged.seconds + time.perf_counter() - started
    return report


def _load(con: duckdb.DuckDBPyConnection, spec: SourceSpec, opts: IngestOptions, view: str,
          fingerprint: str, report: IngestReport, source_id: int) -> None:
    rows, bad, raw_users, raw_items, ts_lo, ts_hi = con.execute(
        f"""SELECT count(*), count(*) FILTER (reason IS NOT NULL),
                   count(user_raw) FILTER (reason IS NULL), count(item_raw) FILTER (reason IS NULL),
                   min(ts) FILTER (reason IS NULL), max(ts) FILTER (reason IS NULL) FROM {view}"""
    ).fetchall()[0]
    report.rows, report.quarantined = int(rows), int(bad)
    if bad:
        report.examples = [
            (int(r[0]), r[1], r[2]) for r in con.execute(
                f"SELECT line, bad_column, reason FROM {view} WHERE reason IS NOT NULL ORDER BY line LIMIT 5"
            ).fetchall()
        ]
        if opts.strict:
            shown = "; ".join(f"line {ln}" + (f", column {c!r}" if c else "") + f": {r}" for ln, c, r in report.examples)
            raise InputFileError(spec.path, f"--strict: {bad:,} bad rows, file rejected, nothing written ({shown})")

    report.source_id = source_id
    if raw_users:
        register_ids(con, "user", f"(SELECT user_raw AS id FROM {view} WHERE reason IS NULL)")
    if raw_items:
        register_ids(con, "item", f"(SELECT item_raw AS id FROM {view} WHERE reason IS NULL)")
    joins = ""
    ukey, ikey = "v.user_key", "v.item_key"
    if raw_users:
        joins += " LEFT JOIN user_dict du ON v.user_raw IS NOT NULL AND du.user_id = v.user_raw"
        ukey = "coalesce(v.user_key, du.user_key)"
    if raw_items:
        joins += " LEFT JOIN item_dict di ON v.item_raw IS NOT NULL AND di.item_id = v.item_raw"
        ikey = "coalesce(v.item_key, di.item_key)"
    keyed = (f"(SELECT {ukey} AS ukey, {ikey} AS ikey, v.ts, v.event_type, v.weight, v.event_id, v.line "
             f"FROM {view} v{joins} WHERE v.reason IS NULL)")

    good = rows - bad
    inserted = 0
    if good:
        hash_sql = _identity_hash(spec, "ukey", "ikey")
        hash_wh = _identity_hash(spec, "user_key", "item_key")
        new_h = np.sort(con.execute(f"SELECT {hash_sql} AS h FROM {keyed}").fetchnumpy()["h"])
        repeated = _sorted_unique(new_h[1:][new_h[1:] == new_h[:-1]])  # hashes seen twice inside the file
        where = "event_id IS NOT NULL" if spec.mapping.get("event_id") else f"ts BETWEEN {int(ts_lo)} AND {int(ts_hi)}"
        old_h = np.sort(con.execute(f"SELECT {hash_wh} AS h FROM events WHERE {where}").fetchnumpy()["h"])
        in_warehouse = np.zeros(0, dtype=new_h.dtype)
        if len(old_h):
            new_u = _sorted_unique(new_h)
            in_warehouse = new_u[_members(old_h, new_u)]
            in_warehouse = in_warehouse[~_members(repeated, in_warehouse)] if len(repeated) else in_warehouse
        inserted = _insert_new_events(con, spec, keyed, hash_sql, where, source_id, repeated, in_warehouse)
    report.loaded = int(inserted)
    report.duplicates = int(good - inserted)
    if bad:
        con.execute(
            f"""INSERT INTO quarantine SELECT {source_id}, {_sql_str(str(spec.path))}, line, bad_column, reason, raw
                FROM {view} WHERE reason IS NOT NULL"""
        )
    con.execute(
        "INSERT INTO sources VALUES (?, 'events', ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
        [source_id, str(spec.path), fingerprint, spec.format, spec.time_kind, report.rows, report.loaded,
         report.duplicates, report.quarantined],
    )


def _insert_new_events(con: duckdb.DuckDBPyConnection, spec: SourceSpec, keyed: str, hash_sql: str, where: str,
                       source_id: int, repeated: np.ndarray, in_warehouse: np.ndarray) -> int:
    """Insert the file's new events; returns how many.

    Rows whose identity hash is in neither set are new for sure (a plain insert). Rows whose
    hash is already in the warehouse (once in the file) need an exact anti-join. Rows whose
    hash repeats inside the file are grouped (first line wins), then anti-joined.
    """
    out = f"ukey, ikey, ts, event_type, weight, event_id, {source_id}, line"
    if len(repeated) == 0 and len(in_warehouse) == 0:
        return int(con.execute(f"INSERT INTO events SELECT {out} FROM {keyed}").fetchall()[0][0])
    con.register("ingest_hashes", pa.table({
        "h": np.concatenate([repeated, in_warehouse]),
        "repeated": np.concatenate([np.ones(len(repeated), bool), np.zeros(len(in_warehouse), bool)]),
    }))
    con.execute("CREATE OR REPLACE TEMP TABLE ingest_candidates AS SELECT h, repeated FROM ingest_hashes")
    con.unregister("ingest_hashes")
    if spec.mapping.get("event_id"):
        group = ("event_id, arg_min(ukey, line) AS ukey, arg_min(ikey, line) AS ikey, arg_min(ts, line) AS ts, "
                 "arg_min(event_type, line) AS event_type")
        by = "event_id"
    else:
        group, by = "ukey, ikey, ts, event_type, arg_min(event_id, line) AS event_id", "ukey, ikey, ts, event_type"
    warehouse = f"(SELECT * FROM events WHERE {where}) e ON {_identity_equal(spec)}"
    try:
        tagged = f"(SELECT c.*, k.repeated FROM {keyed} c LEFT JOIN ingest_candidates k ON k.h = {hash_sql})"
        plain = con.execute(f"INSERT INTO events SELECT {out} FROM {tagged} WHERE repeated IS NULL").fetchall()[0][0]
        known = con.execute(
            f"INSERT INTO events SELECT {out} FROM (SELECT * FROM {tagged} WHERE repeated = false) c ANTI JOIN {warehouse}"
        ).fetchall()[0][0]
        grouped = con.execute(
            f"""INSERT INTO events SELECT {out} FROM (
                    SELECT {group}, arg_min(weight, line) AS weight, min(line) AS line
                    FROM {tagged} WHERE repeated GROUP BY {by}) c ANTI JOIN {warehouse}"""
        ).fetchall()[0][0]
    finally:
        con.execute("DROP TABLE IF EXISTS ingest_candidates")
    return int(plain + known + grouped)


def detect_all(paths: list[Path], opts: IngestOptions) -> list[SourceSpec]:
    """Detect every file before writing anything, so a bad file stops the run up front."""
    return [detect(p, opts.format, opts.columns, opts.delimiter, opts.has_header) for p in paths]


Stager = Callable[[list[SourceSpec], IngestOptions, Path, frozenset[str]], Generator[StagedFile, None, None]]
"""Stages files (``stage_file`` each, into the given folder, skipping the known fingerprints),
in parallel where it likes, and yields them in file order; a file that fails raises its
``InputFileError`` when its turn comes. ``pipeline.scale.ingest.stage_on_ray`` is one."""


def ingest_paths(con: duckdb.DuckDBPyConnection, paths: list[Path], opts: IngestOptions, tmp_dir: Path,
                 progress: bool = False, on_report: Callable[[IngestReport], None] | None = None,
                 stage: Stager | None = None) -> list[IngestReport]:
    """Ingest files in order, one transaction each; stops at the first file that fails (the
    files before it stay committed). With ``stage``, the files are read and checked by it, in
    parallel, while this connection commits them in order."""
    con.execute("SET TimeZone = 'UTC'")
    specs = detect_all(paths, opts)
    reports: list[IngestReport] = []

    def done(report: IngestReport) -> None:
        reports.append(report)
        if on_report:
            on_report(report)

    if stage is None:
        for spec in specs:
            done(ingest_file(con, spec, opts, tmp_dir, progress))
        return reports
    known = frozenset(f for (f,) in con.execute("SELECT fingerprint FROM sources WHERE kind = 'events'").fetchall())
    folder = tmp_dir / f"staged-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(parents=True)
    try:
        with closing(stage(specs, opts, folder, known)) as staged_files:
            for staged in staged_files:
                done(commit_staged(con, staged, opts))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return reports
