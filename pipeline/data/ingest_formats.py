"""Event-log formats: detection, column mapping, and streaming text files into DuckDB.

Every text format (CSV/TSV with any delimiter, MovieLens ``u.data`` / ``ratings.dat`` /
``ratings.csv``, the SASRec ``user item`` file, one sequence per line ``user item1 item2 ...``,
NDJSON) is read lazily by Polars with its 1-based line number and streamed, batch by batch, as Arrow batches of *string* columns
into a DuckDB temporary table. Typing and validation then happen once, in SQL
(``pipeline.data.ingest``), for streamed text and native Parquet alike.
"""

from __future__ import annotations

import csv
import glob as globmod
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputFileError, UserError

SAMPLE_BYTES = 1 << 16       # bytes read to detect a file's layout
MAX_LINE_BYTES = 1 << 20     # a longer line is no event: quarantined (the first line: the file is refused)
FORMATS = ("auto", "csv", "tsv", "parquet", "ndjson", "sasrec", "sequences", "movielens-100k", "movielens-1m",
           "movielens-csv")
DATA_SUFFIXES = {".csv", ".tsv", ".txt", ".dat", ".data", ".parquet", ".pq", ".ndjson", ".jsonl", ".json"}

# Names we recognise for each role, compared after lower-casing and dropping non-alphanumerics.
ALIASES: dict[str, tuple[str, ...]] = {
    "user": ("userid", "user", "uid", "customerid", "customer", "visitorid", "visitor", "memberid", "sessionid", "accountid"),
    "item": ("itemid", "item", "iid", "movieid", "movie", "productid", "product", "trackid", "articleid", "asin", "sku", "videoid", "bookid", "isbn", "contentid"),
    "time": ("timestamp", "ts", "time", "eventtime", "datetime", "date", "createdat", "eventtimestamp", "unixtime", "time_stamp"),
    "event": ("eventtype", "event", "action", "type", "interaction", "behavior", "behaviour", "eventname"),
    "weight": ("rating", "weight", "value", "score", "count", "quantity", "playcount", "stars"),
}
ROLES = ("user", "item", "time", "event", "weight", "event_id")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class ColumnFlags:
    """Column names (or 1-based positions for files without a header) given on the command line."""

    user: str | None = None
    item: str | None = None
    time: str | None = None
    event: str | None = None
    weight: str | None = None
    event_id: str | None = None

    def get(self, role: str) -> str | None:
        return getattr(self, role)


@dataclass
class SourceSpec:
    """What detection chose for one file: format, layout and which column plays which role."""

    path: Path
    format: str
    columns: list[str]
    mapping: dict[str, str | None]
    delimiter: str | None = None
    has_header: bool = False
    quoted: bool = True
    default_event_type: str = "interaction"
    notes: list[str] = field(default_factory=list)

    @property
    def time_kind(self) -> str:
        return "time" if self.mapping.get("time") else "order"

    def describe(self) -> str:
        parts = [self.format]
        if self.delimiter is not None:
            parts.append(f"delimiter {self.delimiter!r}")
            parts.append("header" if self.has_header else "no header")
        roles = ", ".join(f"{r}={c}" for r, c in self.mapping.items() if c)
        text = f"{' / '.join(parts)}; {roles}"
        if self.time_kind == "order":
            text += "; no time column: line order is the event order"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text

    def options_key(self) -> str:
        """The options that change what a file's rows mean (part of its fingerprint)."""
        return json.dumps(
            {"format": self.format, "mapping": self.mapping, "delimiter": self.delimiter,
             "header": self.has_header, "event_type": self.default_event_type},
            sort_keys=True,
        )


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by paths, globs and folders (folders: data files inside, recursively, sorted)."""
    out: list[Path] = []
    for p in paths:
        text = str(p)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in globmod.glob(text, recursive=True))
            if not matches:
                raise UserError(f"{text}: no file matches this pattern")
            out.extend(m for m in matches if m.is_file())
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*")
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in DATA_SUFFIXES
            )
            if not found:
                raise UserError(f"{path}: the folder holds no data files ({', '.join(sorted(DATA_SUFFIXES))})")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise InputFileError(path, "no such file")
    return out


def _sample_lines(path: Path, n: int = 50) -> list[str]:
    """The first ``n`` non-blank lines (decoded leniently: detection only reads structure).

    Raises ``InputFileError`` for an unreadable or binary file, or a first line longer than
    ``MAX_LINE_BYTES`` (no event log has one; a 10 MB line is not "an empty file").
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(SAMPLE_BYTES)
            if b"\n" not in head and len(head) == SAMPLE_BYTES:
                head += fh.read(MAX_LINE_BYTES + 1 - SAMPLE_BYTES)
                if b"\n" not in head and len(head) > MAX_LINE_BYTES:
                    raise InputFileError(path, f"line 1 is longer than {MAX_LINE_BYTES:,} bytes: not an event log line")
    except OSError as exc:
        raise InputFileError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    if head.count(b"\x00") > 40 and path.suffix.lower() not in {".parquet", ".pq"}:
        raise InputFileError(path, "looks binary, not a text event log (use --format parquet for Parquet files)")
    text = head.decode("utf-8-sig", errors="replace")  # a leading BOM is no part of the header
    lines = text.splitlines()
    if len(head) >= SAMPLE_BYTES and lines:
        lines = lines[:-1]  # last line may be cut
    return [ln for ln in lines if ln.strip()][:n]


def _json_object(line: str) -> dict | None:
    """The JSON object on ``line``, or None when it holds no object (bad JSON, another value,
    nesting too deep for the parser)."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _sniff_delimiter(lines: list[str]) -> tuple[str, int]:
    """The delimiter giving the same field count (> 1) on every sample line."""
    if lines and all("::" in ln for ln in lines):
        return "::", len(lines[0].split("::"))
    best: tuple[str, int] | None = None
    for cand in ("\t", ",", ";", "|", " "):
        counts = {len(row) for row in csv.reader(io.StringIO("\n".join(lines)), delimiter=cand)}
        if len(counts) == 1:
            n = counts.pop()
            if n > 1:
                return cand, n
        elif best is None and counts and min(counts) > 1:
            best = (cand, max(counts))
    if best:
        return best
    return ",", 1


def _looks_like_header(first: list[str], rest: list[list[str]]) -> bool:
    known = {a for names in ALIASES.values() for a in names}
    if any(_norm(f) in known for f in first):
        return True
    for j, value in enumerate(first):
        col = [r[j] for r in rest if j < len(r)]
        if col and not _is_number(value) and all(_is_number(v) for v in col if v):
            return True
    return False


def _resolve(role: str, flag: str | None, columns: list[str], path: Path) -> str | None:
    if flag is None:
        return None
    if flag in columns:
        return flag
    if flag.isdigit() and 1 <= int(flag) <= len(columns):
        return columns[int(flag) - 1]
    low = {c.lower(): c for c in columns}
    if flag.lower() in low:
        return low[flag.lower()]
    raise InputFileError(path, f"column {flag!r} (--{role.replace('_', '-')}-col) is not in the file; columns: {', '.join(columns)}")


def _map_columns(columns: list[str], flags: ColumnFlags, path: Path, positional: dict[str, int] | None) -> dict[str, str | None]:
    mapping: dict[str, str | None] = {}
    used: set[str] = set()
    for role in ROLES:
        chosen = _resolve(role, flags.get(role), columns, path)
        if chosen is None and role in ALIASES:
            if positional is not None:
                idx = positional.get(role)
                chosen = columns[idx] if idx is not None and idx < len(columns) else None
            else:
                for alias in ALIASES[role]:
                    hit = next((c for c in columns if _norm(c) == alias and c not in used), None)
                    if hit:
                        chosen = hit
                        break
        if chosen:
            used.add(chosen)
        mapping[role] = chosen
    for role in ("user", "item"):
        if not mapping[role]:
            raise InputFileError(
                path,
                f"no {role} column found (columns: {', '.join(columns)}); name it with --{role}-col",
            )
    return mapping


def _is_movielens_ratings(columns: list[str]) -> bool:
    """MovieLens ``ratings.csv`` columns (``userId, movieId, rating, timestamp``), in any order,
    any spelling (``user_id``, ``MovieID``) and any format.

    Such rows are ``rating`` events, so a reordered, renamed, Parquet or NDJSON copy of a
    ``ratings.csv`` has the same event identity as the CSV itself.
    """
    return sorted(_norm(c) for c in columns) == ["movieid", "rating", "timestamp", "userid"]


def _default_event_type(columns: list[str]) -> str:
    return "rating" if _is_movielens_ratings(columns) else "interaction"


def _looks_like_sequences(lines: list[str]) -> bool:
    """One sequence per line (``user item1 item2 ...``): space-separated tokens, no other
    delimiter, lines of different lengths (a fixed count is a space-delimited table) and some
    with at least two items. A line with a user alone is read, and quarantined at load."""
    counts = [len(ln.split()) for ln in lines]
    return len(set(counts)) > 1 and max(counts) >= 3 and not any(c in ln for ln in lines for c in ",|;\t")


def _positional_roles(n: int) -> dict[str, int]:
    """Roles of columns in a file without header: user item [weight] [time] (MovieLens order)."""
    if n == 2:
        return {"user": 0, "item": 1}
    if n == 3:
        return {"user": 0, "item": 1, "time": 2}
    return {"user": 0, "item": 1, "weight": 2, "time": 3}


# MovieLens item catalogues known by file name: name -> (their `ingest-items` format, the data set)
MOVIELENS_CATALOGUES = {"u.item": ("movielens-u-item", "MovieLens-100K"), "movies.dat": ("movielens-movies-dat", "MovieLens-1M")}


def detect(path: Path, fmt: str = "auto", flags: ColumnFlags | None = None,
           delimiter: str | None = None, has_header: bool | None = None) -> SourceSpec:
    """Decide how to read ``path``. Raises ``InputFileError`` with the reason when it cannot."""
    flags = flags or ColumnFlags()
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    name = path.name.lower()
    suffix = path.suffix.lower()
    if fmt == "auto":
        if suffix in {".parquet", ".pq"}:
            fmt = "parquet"
        elif suffix in {".ndjson", ".jsonl"}:
            fmt = "ndjson"
        elif suffix == ".json":
            first = next(iter(_sample_lines(path, 1)), "").lstrip()
            if first.startswith("["):
                raise InputFileError(path, "a JSON array is not streamable; convert it to NDJSON (one object per line)")
            fmt = "ndjson"
        elif name == "u.data":
            fmt = "movielens-100k"
        elif name == "ratings.dat":
            fmt = "movielens-1m"
        elif name in MOVIELENS_CATALOGUES:
            raise InputFileError(path, f"{path.name} is the {MOVIELENS_CATALOGUES[name][1]} item catalogue, not an event log: "
                                       f"load it with `attnrec ingest-items {path}` (or give --format to read it as events)")
    if fmt == "parquet":
        try:
            schema = pq.read_schema(path)
        except Exception as exc:
            raise InputFileError(path, f"not a readable Parquet file ({exc})") from exc
        cols = list(schema.names)
        return SourceSpec(path, "parquet", cols, _map_columns(cols, flags, path, None),
                          default_event_type=_default_event_type(cols))
    if fmt == "ndjson":
        lines = _sample_lines(path, 20)
        cols: list[str] = []
        first_error = ""
        for i, ln in enumerate(lines, 1):
            obj = _json_object(ln)
            if obj is None:  # the line is quarantined at load; keep sniffing
                first_error = first_error or f" (non-blank line {i} holds no JSON object)"
                continue
            cols.extend(k for k in obj if k not in cols)
        if not cols:
            raise InputFileError(path, "no JSON objects found in the first lines" + first_error)
        return SourceSpec(path, "ndjson", cols, _map_columns(cols, flags, path, None),
                          default_event_type=_default_event_type(cols))

    lines = _sample_lines(path)
    if not lines:
        raise InputFileError(path, "the file is empty")
    if fmt == "movielens-100k":
        cols = ["user_id", "item_id", "rating", "timestamp"]
        return SourceSpec(path, fmt, cols, _map_columns(cols, flags, path, None), "\t", False, False, "rating")
    if fmt == "movielens-1m":
        cols = ["UserID", "MovieID", "Rating", "Timestamp"]
        return SourceSpec(path, fmt, cols, _map_columns(cols, flags, path, None), "::", False, False, "rating")
    if fmt == "sasrec" or (fmt == "auto" and all(re.fullmatch(r"\S+ \S+", ln) for ln in lines)
                           and not _looks_like_header(lines[0].split(" "), [ln.split(" ") for ln in lines[1:]])):
        cols = ["user", "item"]
        spec = SourceSpec(path, "sasrec", cols, _map_columns(cols, flags, path, None), " ", False, False)
        return spec
    if fmt == "sequences" or (fmt == "auto" and _looks_like_sequences(lines)):
        cols = ["user", "item"]
        return SourceSpec(path, "sequences", cols, {"user": "user", "item": "item"}, " ", False, False,
                          notes=["one sequence per line: the user, then the items, oldest first"])

    sep, n = (delimiter, 0) if delimiter else _sniff_delimiter(lines)
    if fmt == "tsv":
        sep = "\t"
    quoted = any('"' in ln for ln in lines)
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=sep)) if sep != "::" else [ln.split("::") for ln in lines]
    n = len(rows[0])
    if n < 2:
        raise InputFileError(path, "cannot find a delimiter: every line has one field (give --delimiter)")
    header = has_header if has_header is not None else _looks_like_header(rows[0], rows[1:])
    if header:
        cols = [c.strip() or f"column_{i + 1}" for i, c in enumerate(rows[0])]
        repeated = next((c for i, c in enumerate(cols) if c in cols[:i]), None)
        if repeated is not None:
            raise InputFileError(path, f"column {repeated!r} appears twice in the header: rename one of them")
        mapping = _map_columns(cols, flags, path, None)
    else:
        cols = [f"column_{i + 1}" for i in range(n)]
        mapping = _map_columns(cols, flags, path, _positional_roles(n))
    is_ml_csv = header and _is_movielens_ratings(cols)
    spec = SourceSpec(
        path, "movielens-csv" if is_ml_csv else ("tsv" if sep == "\t" else "csv"), cols, mapping, sep, header, quoted,
        "rating" if is_ml_csv else "interaction",
    )
    if not header and n >= 4 and not any(getattr(flags, r) for r in ROLES):
        spec.notes.append("no header: columns read as user, item, weight, time")
    return spec


STAGE_COLUMNS = ("user", "item", "time", "event", "weight", "event_id")


def _text_frame(spec: SourceSpec) -> pl.LazyFrame:
    """A lazy frame of string columns ``line``, ``raw`` and one per mapped role."""
    path = spec.path
    header_lines = 1 if spec.has_header else 0
    if spec.delimiter == "::" or not spec.quoted:
        # Line mode: one string per line, split on the delimiter. Exact line numbers, no quoting.
        lf = pl.scan_csv(
            path, has_header=False, separator="\x1f", quote_char=None, infer_schema=False,
            new_columns=["raw"], encoding="utf8-lossy", skip_rows=header_lines,
        ).with_row_index("__row")
        parts = pl.col("raw").str.split(spec.delimiter or ",")
        fields = {c: parts.list.get(i, null_on_oob=True) for i, c in enumerate(spec.columns)}
        return lf.filter(pl.col("raw").is_not_null() & (pl.col("raw").str.strip_chars() != "")).select(
            (pl.col("__row").cast(pl.Int64) + 1 + header_lines).alias("line"),
            pl.col("raw"),
            parts.list.len().cast(pl.Int64).alias("nfields"),
            pl.lit(None, pl.String).alias("nested"),
            *[_staged(r, fields[spec.mapping[r]] if spec.mapping.get(r) else None) for r in STAGE_COLUMNS],
        )
    lf = pl.scan_csv(
        path, has_header=spec.has_header, separator=spec.delimiter or ",", infer_schema=False,
        truncate_ragged_lines=True, encoding="utf8-lossy",
        new_columns=None if spec.has_header else spec.columns,
    ).with_row_index("__row")
    cols = [pl.col(c) for c in spec.columns]
    # Drop blank lines first: after the select, the file's own column names are gone.
    return lf.filter(pl.any_horizontal([c.is_not_null() for c in cols])).select(
        (pl.col("__row").cast(pl.Int64) + 1 + header_lines).alias("line"),
        pl.concat_str([c.fill_null("") for c in cols], separator=spec.delimiter or ",").alias("raw"),
        pl.lit(None, pl.Int64).alias("nfields"),
        pl.lit(None, pl.String).alias("nested"),
        *[_staged(r, pl.col(spec.mapping[r]) if spec.mapping.get(r) else None) for r in STAGE_COLUMNS],
    )


def _sequence_frame(spec: SourceSpec) -> pl.LazyFrame:
    """One sequence per line, exploded to one row per event: ``user`` is the line's first token,
    ``item`` each of the others in turn, ``order`` the event's position in the file (the time
    order: a line's items are oldest first, and the file has no times). ``raw`` is the
    ``user item`` pair, so a quarantined event names its line and what it held."""
    lf = pl.scan_csv(
        spec.path, has_header=False, separator="\x1f", quote_char=None, infer_schema=False,
        new_columns=["raw"], encoding="utf8-lossy",
    ).with_row_index("__row")
    tokens = pl.col("raw").str.extract_all(r"\S+")
    lf = (lf.filter(pl.col("raw").is_not_null() & (pl.col("raw").str.strip_chars() != ""))
          .select((pl.col("__row").cast(pl.Int64) + 1).alias("line"), tokens.list.first().alias("user"),
                  tokens.list.slice(1).alias("item"))
          # a line with a user and no item keeps one row, item null: quarantined as such
          .with_columns(pl.when(pl.col("item").list.len() == 0).then(pl.lit([None], pl.List(pl.String)))
                        .otherwise(pl.col("item")).alias("item"))
          .explode("item")
          .with_row_index("__order"))
    return lf.select(
        "line",
        pl.concat_str([pl.col("user"), pl.col("item").fill_null("")], separator=" ").alias("raw"),
        pl.lit(None, pl.Int64).alias("nfields"),
        pl.lit(None, pl.String).alias("nested"),
        *[pl.col(r) if r in ("user", "item") else pl.lit(None, pl.String).alias(r) for r in STAGE_COLUMNS],
        (pl.col("__order").cast(pl.Int64) + 1).alias("order"),
    )


def _staged(role: str, value: pl.Expr | None) -> pl.Expr:
    """The staged column of ``role``: ids as read (the identity rule trims them in SQL), other
    fields without surrounding whitespace, NULL for a role the file does not have."""
    if value is None:
        return pl.lit(None, pl.String).alias(role)
    return (value if role in ("user", "item") else value.str.strip_chars()).alias(role)


def _staged_frame(spec: SourceSpec) -> pl.LazyFrame:
    if spec.format == "ndjson":
        return _ndjson_frame(spec)
    return _sequence_frame(spec) if spec.format == "sequences" else _text_frame(spec)


NOT_JSON = -1  # ``nfields`` of an NDJSON line that is not a JSON object (quarantined as such)


def _decode_json_objects(raw: pl.Series, fields: list[str]) -> pl.Series:
    """``raw`` lines decoded to a struct of the mapped ``fields`` (as text) and ``__status``.

    Fields that are not mapped are ignored, whatever their type. ``__status`` is null for a
    good line, "" for a line that holds no JSON object, and the field's name for a line whose
    mapped field is an object or a list (its fields are then null). Fast path: Polars decodes
    the whole batch; only a batch that fails is checked line by line in Python, so one broken
    line costs its batch a slower pass, not the file its load.
    """
    dtype = pl.Struct({c: pl.String for c in fields})
    try:
        decoded = raw.str.json_decode(dtype)
        status = pl.Series([None] * len(raw), dtype=pl.String).zip_with(decoded.is_not_null(), pl.Series([""] * len(raw)))
    except pl.exceptions.PolarsError:
        lines, statuses = [], []
        for line in raw.to_list():
            obj = _json_object(line) if line is not None else None
            bad = "" if obj is None else next((f for f in fields if isinstance(obj.get(f), (dict, list))), None)
            lines.append(line if bad is None else None)
            statuses.append(bad)
        decoded = pl.Series(lines, dtype=pl.String).str.json_decode(dtype)
        status = pl.Series(statuses, dtype=pl.String)
    frame = pl.DataFrame({f: decoded.struct.field(f) for f in fields}).with_columns(status.alias("__status"))
    return frame.to_struct("__record")


def _ndjson_frame(spec: SourceSpec) -> pl.LazyFrame:
    """NDJSON read line by line (blank lines skipped but counted), so ``line`` is the file line.

    A line that holds no JSON object gets ``nfields = NOT_JSON``, one whose mapped field is an
    object or a list gets ``nested`` = that field: the load quarantines such lines with their
    line number and keeps the rest of the file.
    """
    fields = [c for c in dict.fromkeys(spec.mapping.values()) if c]
    dtype = pl.Struct({**{c: pl.String for c in fields}, "__status": pl.String})
    record = pl.col("raw").map_batches(lambda s: _decode_json_objects(s, fields), return_dtype=dtype,
                                       is_elementwise=True)
    lf = pl.scan_csv(
        spec.path, has_header=False, separator="\x1f", quote_char=None, infer_schema=False,
        new_columns=["raw"], encoding="utf8-lossy",
    ).with_row_index("__row")
    lf = lf.filter(pl.col("raw").is_not_null() & (pl.col("raw").str.strip_chars() != ""))
    status = pl.col("__record").struct.field("__status")
    return lf.with_columns(record.alias("__record")).select(
        (pl.col("__row").cast(pl.Int64) + 1).alias("line"),
        pl.col("raw"),
        pl.when(status == "").then(pl.lit(NOT_JSON, pl.Int64)).otherwise(pl.lit(None, pl.Int64)).alias("nfields"),
        pl.when(status != "").then(status).otherwise(pl.lit(None, pl.String)).alias("nested"),
        *[_staged(r, pl.col("__record").struct.field(spec.mapping[r]) if spec.mapping.get(r) else None) for r in STAGE_COLUMNS],
    )


def text_batches(spec: SourceSpec, on_rows: Callable[[int], None] | None = None,
                 batch_rows: int = 500_000, failures: list[InputFileError] | None = None) -> pa.RecordBatchReader:
    """Stream a text file as Arrow batches of string columns (+ ``line``, ``raw``, ``nfields``,
    ``nested``, and ``order``: an event's position in a file without times where a line holds
    several events, else null).

    Read once, lazily: memory stays bounded by ``batch_rows`` whatever the file size. A file
    Polars cannot parse raises ``InputFileError``, also appended to ``failures``: the reader's
    consumer (DuckDB) reports it wrapped in its own error, without the cause.
    """
    lf = _staged_frame(spec)
    if spec.format != "sequences":
        lf = lf.with_columns(pl.lit(None, pl.Int64).alias("order"))
    schema = pa.schema([("line", pa.int64()), ("raw", pa.large_string()), ("nfields", pa.int64()),
                        ("nested", pa.large_string())] + [(r, pa.large_string()) for r in STAGE_COLUMNS]
                       + [("order", pa.int64())])

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for frame in lf.collect_batches(chunk_size=batch_rows):
                yield from frame.to_arrow().cast(schema).to_batches()
                if on_rows:
                    on_rows(frame.height)
        except pl.exceptions.PolarsError as exc:
            error = InputFileError(spec.path, f"cannot parse as {spec.format}: {str(exc).splitlines()[0]}")
            if failures is not None:
                failures.append(error)
            raise error from exc

    return pa.RecordBatchReader.from_batches(schema, batches())


TIME_MAX_US = 7_258_118_400_000_000  # 2200-01-01: event times lie in [1970-01-01, 2200-01-01)
UNIT_FACTORS = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}  # unit -> microseconds


def unit_from_values(values: np.ndarray) -> str:
    """The unix time unit that puts the most of ``values`` in the valid time range.

    A unit is chosen by the majority, so a few outliers (``1e23``, ``-1``) cannot flip it: they
    are out of range in the chosen unit and quarantined. Ties go to the coarser unit.
    """
    values = values[np.isfinite(values) & (np.abs(values) < 1e30)]  # beyond any unit's range: no vote
    counts = {u: int(np.count_nonzero((values * f >= 0) & (values * f < TIME_MAX_US))) for u, f in UNIT_FACTORS.items()}
    return max(counts, key=lambda u: (counts[u], -list(UNIT_FACTORS).index(u)))


def infer_time_unit(spec: SourceSpec, rows: int = 10_000) -> str:
    """Unit of the numeric times in the first ``rows`` rows of a text file."""
    lf = _staged_frame(spec)
    try:
        values = lf.head(rows).select(pl.col("time").str.strip_chars().cast(pl.Float64, strict=False)).collect()["time"]
    except pl.exceptions.PolarsError as exc:
        raise InputFileError(spec.path, f"cannot parse as {spec.format}: {str(exc).splitlines()[0]}") from exc
    return unit_from_values(values.drop_nulls().to_numpy())


def estimate_rows(path: Path) -> int | None:
    """Rough line count from the file size and the mean length of the first lines (progress bars)."""
    lines = _sample_lines(path, 200)
    if not lines:
        return None
    mean = sum(len(ln) + 1 for ln in lines) / len(lines)
    return max(1, int(path.stat().st_size / mean))
