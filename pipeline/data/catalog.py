"""Item catalog ingest: titles, categories, free text and numeric fields into ``items``.

Formats: MovieLens ``movies.dat`` (``::``, ISO-8859-1), ``movies.csv``, ``u.item`` (``|``,
19 genre flags named by ``u.genre``), MovieLens ``tags.csv`` (free-text tags become item
text), a JSON attribute map ``{"item id": [attribute, ...]}`` (the attributes become
categories, as in the S3-Rec Amazon files), and any CSV/TSV/Parquet/NDJSON with an item id
column plus any of title, categories, text and numeric columns. ``--id-map FILE`` (two columns: id used in the events, id used in
the item file) renames catalog ids to event ids, so ``ml-1m.txt``'s items get their titles.

Catalog rows are appended per source; ``items_v`` resolves each field to its latest value.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from pipeline.data.identity import MAX_ID_CHARS, id_text_expr, key_sql, not_whole_expr
from pipeline.data.ingest import file_fingerprint
from pipeline.data.ingest_formats import MOVIELENS_CATALOGUES
from pipeline.data.warehouse import next_source_id, register_ids, transaction
from pipeline.errors import InputFileError, UserError

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
TITLE_NAMES = ("title", "name", "itemname", "moviename", "productname")
CATEGORY_NAMES = ("genres", "genre", "categories", "category", "tagslist", "labels")
TEXT_NAMES = ("text", "description", "overview", "summary", "plot", "tag", "tags", "keywords")
ITEM_NAMES = ("itemid", "item", "movieid", "productid", "id", "iid", "asin", "sku", "trackid", "articleid")
ITEM_FORMATS = ("auto", "movielens-movies-dat", "movielens-movies-csv", "movielens-u-item", "movielens-tags",
                "attribute-map", "table")



@dataclass
class CatalogReport:
    path: str
    format: str
    rows: int = 0
    loaded: int = 0
    unmapped: int = 0
    quarantined: int = 0
    identical_to: int | None = None
    seconds: float = 0.0
    examples: list[tuple[int, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = f"{self.path} ({self.format}): {self.loaded:,} items loaded"
        if self.unmapped:
            text += f", {self.unmapped:,} not in the id map (skipped)"
        if self.quarantined:
            text += f", {self.quarantined:,} quarantined"
        if self.identical_to is not None:
            text += f" (identical to source #{self.identical_to}, already ingested)"
        return text


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # MovieLens .dat / u.item are ISO-8859-1


def _detect(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ITEM_FORMATS:
            raise UserError(f"unknown item format {fmt!r}; choose one of {', '.join(ITEM_FORMATS)}")
        return fmt
    name = path.name.lower()
    if name in MOVIELENS_CATALOGUES:
        return MOVIELENS_CATALOGUES[name][0]
    if path.suffix.lower() == ".json":
        with path.open("rb") as fh:
            if fh.read(4096).lstrip()[:1] == b"{":
                return "attribute-map"
    if path.suffix.lower() == ".csv":
        head = path.open("rb").readline().decode("utf-8", "replace").strip().lower()
        if head.startswith("movieid,title,genres"):
            return "movielens-movies-csv"
        if head.startswith("userid,movieid,tag"):
            return "movielens-tags"
    return "table"


def _frame(path: Path, fmt: str, item_col: str | None, numeric_cols: list[str] | None) -> pl.DataFrame:
    """Catalog rows as: line, item_id, title, categories (list), text, num_keys, num_values."""
    empty_num = [pl.lit([], pl.List(pl.String)).alias("num_keys"), pl.lit([], pl.List(pl.Float64)).alias("num_values")]
    if fmt == "movielens-movies-dat":
        lines = _read_text(path).splitlines()
        df = pl.DataFrame({"raw": lines}).with_row_index("line", 1)
        parts = pl.col("raw").str.splitn("::", 3)
        return df.select(
            pl.col("line").cast(pl.Int64), parts.struct.field("field_0").alias("item_id"),
            parts.struct.field("field_1").alias("title"),
            parts.struct.field("field_2").str.split("|").alias("categories"), pl.lit(None, pl.String).alias("text"),
            *empty_num,
        ).filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
    if fmt == "movielens-u-item":
        genre_file = path.with_name("u.genre")
        genres = ML100K_GENRES
        if genre_file.exists():
            names = [ln.split("|")[0] for ln in _read_text(genre_file).splitlines() if "|" in ln]
            genres = names or genres
        rows = [ln.split("|") for ln in _read_text(path).splitlines() if ln.strip()]
        ids, titles, cats, years = [], [], [], []
        for parts in rows:
            ids.append(parts[0])
            titles.append(parts[1] if len(parts) > 1 else None)
            flags = parts[5:5 + len(genres)]
            cats.append([g for g, f in zip(genres, flags, strict=False) if f.strip() == "1"])
            m = re.search(r"(\d{4})$", parts[2].strip()) if len(parts) > 2 else None
            years.append(float(m.group(1)) if m else None)
        return pl.DataFrame({
            "line": list(range(1, len(rows) + 1)), "item_id": ids, "title": titles, "categories": cats,
            "text": [None] * len(rows),
            "num_keys": [["release_year"] if y is not None else [] for y in years],
            "num_values": [[y] if y is not None else [] for y in years],
        }, schema_overrides={"text": pl.String, "line": pl.Int64, "num_values": pl.List(pl.Float64)})
    if fmt == "movielens-movies-csv":
        df = pl.read_csv(io.StringIO(_read_text(path)), infer_schema=False).with_row_index("line", 2)
        return df.select(
            pl.col("line").cast(pl.Int64), pl.col("movieId").alias("item_id"), pl.col("title"),
            pl.when(pl.col("genres") == "(no genres listed)").then(pl.lit([], pl.List(pl.String)))
              .otherwise(pl.col("genres").str.split("|")).alias("categories"),
            pl.lit(None, pl.String).alias("text"), *empty_num,
        )
    if fmt == "attribute-map":
        return _attribute_map(path)
    if fmt == "movielens-tags":
        df = pl.read_csv(io.StringIO(_read_text(path)), infer_schema=False).with_row_index("line", 2)
        return (
            df.group_by(pl.col("movieId").alias("item_id"), maintain_order=True)
            .agg(pl.col("line").min().cast(pl.Int64), pl.col("tag").drop_nulls().unique(maintain_order=True).str.join(" ").alias("text"))
            .select("line", "item_id", pl.lit(None, pl.String).alias("title"),
                    pl.lit([], pl.List(pl.String)).alias("categories"), "text", *empty_num)
        )
    # generic table
    suffix = path.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            df = pl.read_parquet(path)
        elif suffix in {".ndjson", ".jsonl"}:
            df = pl.read_ndjson(path)
        else:
            text = _read_text(path)
            sep = "\t" if suffix == ".tsv" or text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else ","
            header = pl.read_csv(io.StringIO(text), separator=sep, n_rows=0).columns
            id_col = _id_column(header, item_col)
            # ids are text in a text file: "0042" stays "0042" (the identity rule), never the number 42
            df = pl.read_csv(io.StringIO(text), separator=sep, infer_schema_length=10000,
                             schema_overrides={id_col: pl.String} if id_col else None)
    except Exception as exc:  # polars raises many types for malformed files
        raise InputFileError(path, f"cannot read as a table: {str(exc).splitlines()[0]}") from exc
    df = df.with_row_index("line", 2 if suffix not in {".parquet", ".pq"} else 1)
    cols = {_norm(c): c for c in df.columns}
    idc = _id_column(df.columns, item_col)
    if idc is None:
        raise InputFileError(path, f"no item id column (columns: {', '.join(df.columns[1:])}); name it with --item-col")
    title = next((cols[n] for n in TITLE_NAMES if n in cols), None)
    catc = next((cols[n] for n in CATEGORY_NAMES if n in cols), None)
    textc = next((cols[n] for n in TEXT_NAMES if n in cols and cols[n] != catc), None)
    if numeric_cols is None:
        numeric_cols = [c for c in df.columns if c not in {"line", idc} and df.schema[c].is_numeric()]
    missing = [c for c in numeric_cols if c not in df.columns]
    if missing:
        raise InputFileError(path, f"numeric column(s) {', '.join(missing)} not in the file")
    if catc is None:
        cat_expr = pl.lit([], pl.List(pl.String))
    elif df.schema[catc] == pl.List(pl.String):
        cat_expr = pl.col(catc)
    else:
        cat_expr = pl.col(catc).cast(pl.String).str.split("|").list.eval(pl.element().str.strip_chars())
    return df.select(
        pl.col("line").cast(pl.Int64), pl.col(idc).alias("item_id"),
        (pl.col(title).cast(pl.String) if title else pl.lit(None, pl.String)).alias("title"),
        cat_expr.alias("categories"),
        (pl.col(textc).cast(pl.String) if textc else pl.lit(None, pl.String)).alias("text"),
        pl.lit(numeric_cols, pl.List(pl.String)).alias("num_keys"),
        pl.concat_list([pl.col(c).cast(pl.Float64) for c in numeric_cols]).alias("num_values")
        if numeric_cols else pl.lit([], pl.List(pl.Float64)).alias("num_values"),
    )


def _attribute_map(path: Path) -> pl.DataFrame:
    """``{"item id": [attribute, ...]}`` as catalog rows: the attributes (as text) are the item's
    categories; ``line`` is the entry's position in the object (1-based). An entry whose value is
    not a list of plain values is kept out, with its reason in ``problem``."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InputFileError(path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(data, dict):
        raise InputFileError(path, "an attribute map is one JSON object: {\"item id\": [attribute, ...]}")
    ids, cats, problems = [], [], []
    for item, value in data.items():
        ids.append(item)
        plain = isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
        cats.append([str(v) for v in value] if plain else [])
        problems.append(None if plain else f"the attributes of item {item!r} are not a list of plain values")
    n = len(ids)
    return pl.DataFrame({
        "line": list(range(1, n + 1)), "item_id": ids, "title": [None] * n, "categories": cats, "text": [None] * n,
        "num_keys": [[] for _ in range(n)], "num_values": [[] for _ in range(n)], "problem": problems,
    }, schema={"line": pl.Int64, "item_id": pl.String, "title": pl.String, "categories": pl.List(pl.String),
               "text": pl.String, "num_keys": pl.List(pl.String), "num_values": pl.List(pl.Float64), "problem": pl.String})


def _id_column(columns: list[str], item_col: str | None) -> str | None:
    """The item id column of a generic table: ``--item-col``, else the first recognised name."""
    if item_col is not None:
        return item_col if item_col in columns else None
    names = {_norm(c): c for c in columns}
    return next((names[n] for n in ITEM_NAMES if n in names), None)


def read_id_map(path: Path) -> pl.DataFrame:
    """Two columns (event id, item-file id), whitespace- or comma-separated, no header."""
    pairs = []
    for i, ln in enumerate(_read_text(path).splitlines(), 1):
        parts = [p for p in re.split(r"[ \t\r\x0b\x0c,]+", ln) if p]  # ASCII whitespace: the identity rule's
        if not parts or parts == [""]:
            continue
        if len(parts) != 2:
            raise InputFileError(path, f"line {i}: expected two ids (event id, item-file id), found {len(parts)} fields")
        pairs.append(parts)
    if not pairs:
        raise InputFileError(path, "the id map is empty")
    return pl.DataFrame(pairs, schema=["event_id", "file_id"], orient="row")


def ingest_items(con: duckdb.DuckDBPyConnection, path: Path, fmt: str = "auto", id_map: Path | None = None,
                 item_col: str | None = None, numeric_cols: list[str] | None = None, strict: bool = False) -> CatalogReport:
    """Load one item file in one transaction."""
    started = time.perf_counter()
    if not path.is_file():
        raise InputFileError(path, "no such file")
    fmt = _detect(path, fmt)
    report = CatalogReport(str(path), fmt)
    key = f"items|{fmt}|{item_col}|{numeric_cols}|" + (file_fingerprint(id_map, "") if id_map else "")
    fingerprint = file_fingerprint(path, key)
    prior = con.execute("SELECT source_id, loaded FROM sources WHERE fingerprint = ? AND kind = 'items'", [fingerprint]).fetchall()
    if prior:
        prior = prior[0]
        report.identical_to, report.rows = int(prior[0]), int(prior[1])
        report.seconds = time.perf_counter() - started
        return report
    df = _frame(path, fmt, item_col, numeric_cols)
    id_type = df.schema["item_id"]
    df = df.with_columns(id_text_expr(pl.col("item_id"), id_type).alias("item_id"),
                         not_whole_expr(pl.col("item_id"), id_type).alias("not_whole"))
    report.rows = df.height
    problem = pl.col("problem") if "problem" in df.columns else pl.lit(None, pl.String)  # a format's own finding
    df = df.with_columns(
        pl.when(pl.col("not_whole")).then(pl.lit("item id is a number that is not whole"))
        .when(pl.col("item_id").is_null()).then(pl.lit("missing item id"))
        .when(pl.col("item_id").str.len_chars() > MAX_ID_CHARS).then(pl.lit(f"item id longer than {MAX_ID_CHARS:,} characters"))
        .otherwise(problem)
        .alias("reason"))
    if "problem" in df.columns:
        df = df.drop("problem")
    bad = df.filter(pl.col("reason").is_not_null())
    if bad.height:
        report.quarantined = bad.height
        report.examples = [(int(line), reason) for line, reason in bad.select("line", "reason").head(5).iter_rows()]
        if strict:
            raise InputFileError(path, f"--strict: {bad.height} rows with a bad item id (lines {', '.join(str(x) for x, _ in report.examples)}); nothing written")
    good = df.filter(pl.col("reason").is_null()).drop("reason", "not_whole")
    if id_map is not None:
        mapping = read_id_map(id_map).with_columns(id_text_expr(pl.col("event_id")), id_text_expr(pl.col("file_id")))
        joined = good.join(mapping, left_on="item_id", right_on="file_id", how="inner")
        report.unmapped = good.height - joined.height
        good = joined.drop("item_id").rename({"event_id": "item_id"})
    good = good.unique("item_id", keep="last", maintain_order=True)
    with transaction(con):
        source_id = next_source_id(con)
        con.register("catalog_rows", good.to_arrow())
        try:
            register_ids(con, "item", "(SELECT item_id AS id FROM catalog_rows)")
            con.execute(
                f"""INSERT INTO items
                    SELECT {key_sql("c.item_id", "d", "item")},
                           c.title, c.categories, c.text, map(c.num_keys, c.num_values), {source_id}
                    FROM catalog_rows c LEFT JOIN item_dict d ON d.item_id = c.item_id"""
            )
            if bad.height:
                con.register("catalog_bad", bad.select("line", "reason").to_arrow())
                con.execute(
                    "INSERT INTO quarantine SELECT ?, ?, line, 'item id', reason, NULL FROM catalog_bad",
                    [source_id, str(path)],
                )
                con.unregister("catalog_bad")
        finally:
            con.unregister("catalog_rows")
        con.execute(
            "INSERT INTO sources VALUES (?, 'items', ?, ?, ?, NULL, ?, ?, 0, ?, now()::TIMESTAMP)",
            [source_id, str(path), fingerprint, fmt, report.rows, good.height, report.quarantined],
        )
    report.loaded = good.height
    report.seconds = time.perf_counter() - started
    return report
