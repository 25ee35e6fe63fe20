"""The DuckDB warehouse: schema, connections, id keys and the ``stats`` summary.

Tables
------
``events``       one row per event: ``user_key``, ``item_key`` (BIGINT keys, see below),
                 ``ts`` (BIGINT: microseconds since the Unix epoch, or for order-only sources
                 ``source_id * 2**40 + line``), ``event_type``, ``weight`` (rating/value or NULL),
                 ``event_id`` (given id or NULL), ``source_id``, ``line`` (1-based line/row in
                 the source file).
``user_dict`` / ``item_dict``   external id <-> key for ids that are not plain integers.
``items``        item content: title, categories (list), free text, numeric fields (map).
``sources``      one row per ingested file: path, fingerprint, format, counts.
``quarantine``   rows that could not be loaded: source, file, line, column, reason, raw text.
``meta``         key/value facts about the file itself (``identity_rule``: the version of the
                 identity rule its keys were made by; an older warehouse is re-keyed on open).

Keys follow the one identity rule of ``pipeline.data.identity``: a canonical integer id
below 2**62 is its own key, any other id gets a dictionary key at or above 2**62.
``users_v`` and ``item_ids_v`` show the ids as text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from pipeline.data.identity import DICT_KEY_BASE, id_of_key_sql, id_text_sql, integer_key_sql, key_sql
from pipeline.errors import UserError

IDENTITY_RULE = "2"  # the version of pipeline.data.identity's rule the keys were made by

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    source_id INTEGER PRIMARY KEY,
    kind VARCHAR NOT NULL,            -- 'events' | 'items'
    path VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,     -- sha256 of the file bytes + the ingest options
    format VARCHAR NOT NULL,
    time_kind VARCHAR,                -- 'time' (ts is microseconds) | 'order' (ts is the line number)
    rows_read BIGINT NOT NULL,
    loaded BIGINT NOT NULL,
    duplicates BIGINT NOT NULL,
    quarantined BIGINT NOT NULL,
    ingested_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    user_key BIGINT NOT NULL,
    item_key BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    event_type VARCHAR NOT NULL,
    weight DOUBLE,
    event_id VARCHAR,
    source_id INTEGER NOT NULL,
    line BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS user_dict (user_key BIGINT NOT NULL, user_id VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS item_dict (item_key BIGINT NOT NULL, item_id VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_key BIGINT NOT NULL,
    title VARCHAR,
    categories VARCHAR[],
    text VARCHAR,
    numeric MAP(VARCHAR, DOUBLE),
    source_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    source_id INTEGER NOT NULL,
    path VARCHAR NOT NULL,
    line BIGINT NOT NULL,
    column_name VARCHAR,
    reason VARCHAR NOT NULL,
    raw VARCHAR
);
CREATE OR REPLACE VIEW users_v AS
    SELECT e.user_key, {id_of_key_sql("e.user_key", "d", "user")} AS user_id
    FROM (SELECT DISTINCT user_key FROM events) e LEFT JOIN user_dict d ON d.user_key = e.user_key;
CREATE OR REPLACE VIEW item_ids_v AS
    SELECT k.item_key, {id_of_key_sql("k.item_key", "d", "item")} AS item_id
    FROM (SELECT item_key FROM events UNION SELECT item_key FROM items) k
    LEFT JOIN item_dict d ON d.item_key = k.item_key;
CREATE OR REPLACE VIEW items_v AS
WITH ranked AS (
    SELECT i.*, s.path, row_number() OVER (PARTITION BY i.item_key, s.path ORDER BY i.source_id DESC) AS rn
    FROM items i JOIN sources s USING (source_id)
)
SELECT item_key,
       arg_max(title, source_id) FILTER (WHERE title IS NOT NULL) AS title,
       arg_max(categories, source_id) FILTER (WHERE categories IS NOT NULL AND len(categories) > 0) AS categories,
       string_agg(text, ' ' ORDER BY source_id) FILTER (WHERE text IS NOT NULL) AS text,
       arg_max(numeric, source_id) FILTER (WHERE numeric IS NOT NULL AND cardinality(numeric) > 0) AS numeric
FROM ranked WHERE rn = 1
GROUP BY item_key;
"""


def connect(db_path: Path, read_only: bool = False, retries: int = 50) -> duckdb.DuckDBPyConnection:
    """Open the warehouse (creating it and its schema when writable).

    DuckDB lets one process write a file at a time; a second writer waits here up to
    ``retries`` x 0.1 s for the lock, then gets a clear error.
    """
    if read_only and not db_path.exists():
        raise UserError(f"no warehouse at {db_path}: run `attnrec ingest` first")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for _ in range(max(1, retries)):
        try:
            con = duckdb.connect(str(db_path), read_only=read_only)
            break
        except duckdb.IOException as exc:  # lock held by another process
            last = exc
            time.sleep(0.1)
    else:
        raise UserError(f"the warehouse {db_path} is busy (another attnrec process holds it): {last}")
    if not read_only:
        con.execute(SCHEMA_SQL)
        _upgrade_identity_rule(con)
    elif _identity_rule(con) != IDENTITY_RULE:  # written by an older attnrec: upgrade it once, then read
        con.close()
        connect(db_path, retries=retries).close()
        return connect(db_path, read_only=True, retries=retries)
    return con


def _identity_rule(con: duckdb.DuckDBPyConnection) -> str | None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'identity_rule'").fetchall()
    except duckdb.CatalogException:  # no meta table: written before the rule was versioned
        return None
    return row[0][0] if row else None


def _upgrade_identity_rule(con: duckdb.DuckDBPyConnection) -> None:
    """Re-key a warehouse written under an older identity rule, in one transaction.

    Rule 1 gave dictionary keys to 19-digit integer ids below 2**62; rule 2 (today's,
    ``pipeline.data.identity``) makes them their own key, as a typed integer always was. Their
    events and catalogue rows move to the integer key and the dictionary entries go.
    """
    if _identity_rule(con) == IDENTITY_RULE:
        return
    with transaction(con):
        for kind, columns in (("user", [("events", "user_key")]), ("item", [("events", "item_key"), ("items", "item_key")])):
            now_integer = f"{integer_key_sql(f'{kind}_id')} IS NOT NULL"
            moved = f"(SELECT {kind}_key AS old_key, {integer_key_sql(f'{kind}_id')} AS new_key FROM {kind}_dict WHERE {now_integer})"
            for table, column in columns:
                con.execute(f"UPDATE {table} SET {column} = m.new_key FROM {moved} m WHERE {table}.{column} = m.old_key")
            con.execute(f"DELETE FROM {kind}_dict WHERE {now_integer}")
        con.execute("INSERT OR REPLACE INTO meta VALUES ('identity_rule', ?)", [IDENTITY_RULE])


@contextmanager
def open_warehouse(db_path: Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(db_path, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, rolled back on any exception (KeyboardInterrupt included)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def query_frame(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
    """Run a query and return its result as a Polars frame (via Arrow, no copy of numeric columns)."""
    table = con.sql(sql, params=params or None).to_arrow_table()
    frame = pl.from_arrow(table, rechunk=True)
    assert isinstance(frame, pl.DataFrame)
    return frame


def replace_table(db_path: Path, name: str, parquet_files: list[Path]) -> None:
    """(Re)write table ``name`` (a plain identifier) with the rows of ``parquet_files``, in
    order, plus ``created_at``, in one transaction (DuckDB streams the files: nothing holds
    them whole)."""
    con = connect(db_path)
    try:
        with transaction(con):
            con.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT *, now()::TIMESTAMP AS created_at FROM read_parquet(?)',
                        [[str(path) for path in parquet_files]])
    finally:
        con.close()


def next_source_id(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT coalesce(max(source_id), 0) + 1 FROM sources").fetchall()[0][0])


def register_ids(con: duckdb.DuckDBPyConnection, kind: str, ids_relation: str) -> int:
    """Give dictionary keys to the ids of ``ids_relation`` (one canonical VARCHAR column ``id``)
    that are not their own key and have none yet; returns how many were added."""
    table = f"{kind}_dict"
    row = con.execute(
        f"""
        INSERT INTO {table}
        SELECT (SELECT coalesce(max({kind}_key) + 1, {DICT_KEY_BASE}) FROM {table})
               + row_number() OVER (ORDER BY n.id) - 1, n.id
        FROM (SELECT DISTINCT id FROM {ids_relation}
              WHERE id IS NOT NULL AND {integer_key_sql('id')} IS NULL) n
        ANTI JOIN {table} d ON d.{kind}_id = n.id
        """
    ).fetchall()
    return int(row[0][0]) if row else 0


def lookup_keys(con: duckdb.DuckDBPyConnection, kind: str, ids: list[str]) -> dict[str, int]:
    """Ids as given -> keys, for the ids known to the warehouse (unknown and invalid ids are left out)."""
    if not ids:
        return {}
    known_table = "events" if kind == "user" else "(SELECT item_key FROM events UNION SELECT item_key FROM items)"
    rows = con.execute(
        f"""
        WITH q AS (SELECT given, {id_text_sql('given')} AS id FROM (SELECT unnest(?::VARCHAR[]) AS given))
        SELECT q.given, {key_sql('q.id', 'd', kind)} AS k
        FROM q LEFT JOIN {kind}_dict d ON d.{kind}_id = q.id
        WHERE k IN (SELECT {kind}_key FROM {known_table})
        """,
        [ids],
    ).fetchall()
    return {str(i): int(k) for i, k in rows if k is not None}


@dataclass(frozen=True)
class WarehouseStats:
    events: int
    users: int
    items: int
    catalog_items: int
    time_kind: str
    time_min: str | None
    time_max: str | None
    quarantined: int
    sources: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "users": self.users,
            "items": self.items,
            "catalog_items": self.catalog_items,
            "time": {"kind": self.time_kind, "min": self.time_min, "max": self.time_max},
            "quarantined": self.quarantined,
            "sources": self.sources,
        }


def warehouse_stats(con: duckdb.DuckDBPyConnection) -> WarehouseStats:
    """Counts over the whole warehouse; the time span covers sources with real timestamps."""
    events, users, items = con.execute(
        "SELECT count(*), count(DISTINCT user_key), count(DISTINCT item_key) FROM events"
    ).fetchall()[0]
    catalog = con.execute("SELECT count(DISTINCT item_key) FROM items").fetchall()[0][0]
    kinds = {r[0] for r in con.execute("SELECT DISTINCT time_kind FROM sources WHERE kind = 'events'").fetchall()}
    tmin, tmax = con.execute(
        """SELECT min(ts), max(ts) FROM events
           WHERE source_id IN (SELECT source_id FROM sources WHERE time_kind = 'time')"""
    ).fetchall()[0]

    def iso(us: int | None) -> str | None:
        return None if us is None else datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat()

    quarantined = con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0]
    cols = ["source_id", "kind", "path", "format", "time_kind", "rows_read", "loaded", "duplicates", "quarantined", "ingested_at"]
    sources = [
        dict(zip(cols, r, strict=True))
        for r in con.execute(f"SELECT {', '.join(cols)} FROM sources ORDER BY source_id").fetchall()
    ]
    for s in sources:
        s["ingested_at"] = s["ingested_at"].isoformat()
    time_kind = "time" if kinds == {"time"} else ("order" if kinds == {"order"} else ("mixed" if kinds else "none"))
    return WarehouseStats(
        events=int(events), users=int(users), items=int(items), catalog_items=int(catalog),
        time_kind=time_kind, time_min=iso(tmin), time_max=iso(tmax), quarantined=int(quarantined), sources=sources,
    )
