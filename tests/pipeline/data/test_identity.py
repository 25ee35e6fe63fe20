"""The one identity rule: Python and SQL agree, every format gives one key, cached and uncached histories agree."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.histories import HistoryStore
from pipeline.data.identity import (
    DICT_KEY_BASE,
    MAX_ID_CHARS,
    InvalidId,
    canonical_id,
    id_text_expr,
    id_text_sql,
    integer_key,
    integer_key_sql,
    not_whole_expr,
    split_list,
    typed_id_text_sql,
)
from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import open_warehouse

# The kinds of ids the rule must give one stable meaning: snowflake ids, leading zeros,
# surrounding whitespace, non-ASCII digits, integers at and above 2**62, very long ids, any text.
SNOWFLAKE = "1000000000000000000"
digits = st.text(alphabet="0123456789", min_size=1, max_size=21)
ids = st.one_of(
    st.integers(min_value=0, max_value=2**64).map(str),
    st.just(SNOWFLAKE), st.just(str(DICT_KEY_BASE)), st.just(str(DICT_KEY_BASE - 1)),
    digits.map(lambda d: "0" + d),
    st.tuples(st.sampled_from([" ", "\t", "  ", "\r", "\x0b", "\u00a0"]), digits).map(lambda p: p[0] + p[1] + p[0]),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),
    st.text(alphabet="ab1", min_size=MAX_ID_CHARS - 2, max_size=MAX_ID_CHARS + 2),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), min_size=1, max_size=12),
)


def python_rule(raw: object) -> tuple[str, int | None] | None:
    try:
        text = canonical_id(raw)
    except InvalidId:
        return None
    return text, integer_key(text)


def test_examples_of_the_rule() -> None:
    assert python_rule(" 42\t") == ("42", 42)
    assert python_rule(SNOWFLAKE) == (SNOWFLAKE, 10**18)
    assert python_rule("042") == ("042", None)
    assert python_rule("٤٢") == ("٤٢", None)  # Arabic-Indic digits are text, never the number 42
    assert python_rule("²") == ("²", None)
    assert python_rule(str(DICT_KEY_BASE)) == (str(DICT_KEY_BASE), None)  # too big to be its own key
    assert python_rule(" ") is None and python_rule("x" * (MAX_ID_CHARS + 1)) is None
    assert python_rule("\u00a042") == ("\u00a042", None)  # only ASCII whitespace is stripped
    assert python_rule(42.0) == ("42", 42) and python_rule(-5.0) == ("-5", None)  # typed numbers (rule 4)
    assert python_rule(4.5) is None and python_rule(float("nan")) is None
    assert python_rule("42.0") == ("42.0", None)  # text is never a number
    assert split_list(" 1, 260 ,,\t1196\u00a0") == ["1", "260", "1196\u00a0"]


@settings(max_examples=300, deadline=None)
@given(st.lists(ids, min_size=1, max_size=30))
def test_python_polars_and_sql_apply_the_same_rule(raws: list[str]) -> None:
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT {id_text_sql('r')} AS t, {integer_key_sql(id_text_sql('r'))} AS k FROM (SELECT unnest(?::VARCHAR[]) AS r)",
        [raws]).fetchall()
    polars_texts = pl.DataFrame({"r": raws}, schema={"r": pl.String}).select(id_text_expr(pl.col("r")))["r"].to_list()
    for raw, (text, key), polars_text in zip(raws, rows, polars_texts, strict=True):
        assert polars_text == text, raw
        expected = python_rule(raw)
        if expected is None and text is not None:  # refused for its length: SQL quarantines it the same way
            assert len(text) > MAX_ID_CHARS
            continue
        assert (text, key) == (expected or (None, None)), raw


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1).map(float),
                          st.floats(allow_nan=True, allow_infinity=True, width=64)), min_size=1, max_size=20))
def test_typed_numbers_are_read_alike_by_every_engine(numbers: list[float]) -> None:
    """Rule 4: a whole number is its integer's text, anything else is no id, in Python, Polars and SQL."""
    con = duckdb.connect()
    sql = [r[0] for r in con.execute(
        f"SELECT {typed_id_text_sql('r')} FROM (SELECT unnest(?::DOUBLE[]) AS r)", [numbers]).fetchall()]
    frame = pl.DataFrame({"r": numbers}, schema={"r": pl.Float64})
    polars_texts = frame.select(id_text_expr(pl.col("r"), pl.Float64))["r"].to_list()
    polars_bad = frame.select(not_whole_expr(pl.col("r"), pl.Float64))["r"].to_list()
    for number, from_sql, from_polars, bad in zip(numbers, sql, polars_texts, polars_bad, strict=True):
        expected = python_rule(number)
        assert from_sql == from_polars == (expected[0] if expected else None), number
        assert bad == (expected is None), number


def _warehouse_with_users(folder: Path, users: list[str]) -> Path:
    """A warehouse whose events are, for user i, items 1..(i % 3 + 1), read from a Parquet file of string ids."""
    rows = [(u, str(item), 1_600_000_000 + 10 * n + item) for n, u in enumerate(users) for item in range(1, n % 3 + 2)]
    path = folder / "events.parquet"
    pq.write_table(pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows], "time": [r[2] for r in rows]}), path)
    db = folder / "w.duckdb"
    with open_warehouse(db) as con:
        ingest_paths(con, [path], IngestOptions(), folder)
    return db


def _history(store: HistoryStore, user: str) -> list[int] | None | str:
    try:
        keys = store.history(user)
    except InvalidId:
        return "invalid"
    return None if keys is None else keys.tolist()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ids, min_size=1, max_size=24))
def test_cached_and_uncached_histories_are_identical_for_every_kind_of_id(users: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = _warehouse_with_users(Path(tmp), users)
        cached, uncached = HistoryStore(db, cache=True), HistoryStore(db)
        for raw in users:
            for asked in (raw, f" {raw}\t", "0" + raw, raw + "x"):
                assert _history(cached, asked) == _history(uncached, asked), asked
            rule = python_rule(raw)
            got = _history(uncached, raw)
            if rule is None:
                assert got == "invalid"
            else:  # every event of every spelling of this id is in its one history
                expected = sum(n % 3 + 1 for n, u in enumerate(users) if python_rule(u) == rule)
                assert isinstance(got, list) and len(got) == expected, (raw, got)


def test_csv_parquet_and_ndjson_give_the_same_keys(tmp_path: Path) -> None:
    """The same events in every format: the second and later copies add nothing."""
    events = [(SNOWFLAKE, "7", 1_600_000_000), ("42", "0042", 1_600_000_001), ("٤٢", "²", 1_600_000_002),
              ("alice", SNOWFLAKE, 1_600_000_003), ("9223372036854775807", "1", 1_600_000_004), ("-5", "8", 1_600_000_005)]
    csv = tmp_path / "events.csv"
    csv.write_text("user,item,time\n" + "".join(f" {u} ,{i}\t,{t}\n" for u, i, t in events), encoding="utf-8")
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"user": [u for u, _, _ in events], "item": [i for _, i, _ in events],
                             "time": [t for *_, t in events]}), strings)
    numeric = [(int(u), int(i), t) for u, i, t in events if u.lstrip("-").isascii() and u.lstrip("-").isdigit()
               and i.isascii() and i.isdigit() and not i.startswith("0")]
    integers = tmp_path / "integers.parquet"
    pq.write_table(pa.table({"user": pa.array([u for u, _, _ in numeric], pa.int64()),
                             "item": pa.array([i for _, i, _ in numeric], pa.int64()), "time": [t for *_, t in numeric]}),
                   integers)
    ndjson = tmp_path / "events.ndjson"

    def value(text: str) -> object:
        return int(text) if text.lstrip("-").isascii() and text.lstrip("-").isdigit() and not text.startswith("0") else text

    ndjson.write_text("".join(json.dumps({"user": value(u), "item": value(i), "time": t}) + "\n" for u, i, t in events))
    with open_warehouse(tmp_path / "w.duckdb") as con:
        first = ingest_paths(con, [csv], IngestOptions(), tmp_path)[0]
        again = ingest_paths(con, [strings, integers, ndjson], IngestOptions(), tmp_path)
        users = dict(con.execute("SELECT user_id, user_key FROM users_v").fetchall())
        items = dict(con.execute("SELECT item_id, item_key FROM item_ids_v").fetchall())
    assert (first.loaded, first.quarantined) == (len(events), 0)
    assert [(r.loaded, r.duplicates, r.quarantined) for r in again] == [
        (0, len(events), 0), (0, len(numeric), 0), (0, len(events), 0)]
    assert set(users) == {u for u, _, _ in events} and set(items) == {i for _, i, _ in events}
    assert users[SNOWFLAKE] == 10**18 and items[SNOWFLAKE] == 10**18 and users["42"] == 42
    assert users["٤٢"] >= DICT_KEY_BASE and users["9223372036854775807"] >= DICT_KEY_BASE and users["-5"] >= DICT_KEY_BASE
    assert items["0042"] >= DICT_KEY_BASE and items["²"] >= DICT_KEY_BASE


def test_float_ids_and_catalogue_ids_follow_the_rule(tmp_path: Path) -> None:
    """pandas writes integer ids with a missing value as floats: 42.0 is user 42, 4.5 is no id;
    a catalogue's "0042" stays the text id "0042" (never the number 42)."""
    from pipeline.data.catalog import ingest_items

    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"user": pa.array([42.0, 4.5, None, 7.0], pa.float64()), "item": ["1", "1", "1", "0042"],
                             "time": [1_600_000_000, 1_600_000_001, 1_600_000_002, 1_600_000_003]}), floats)
    ndjson = tmp_path / "events.ndjson"
    ndjson.write_text('{"user": 42.0, "item": "1", "time": 1600000000}\n')
    catalogue = tmp_path / "items.csv"
    catalogue.write_text("itemId,title\n0042,Leading Zeros\n42,Forty-Two\n")
    with open_warehouse(tmp_path / "w.duckdb") as con:
        report = ingest_paths(con, [floats], IngestOptions(), tmp_path)[0]
        again = ingest_paths(con, [ndjson], IngestOptions(), tmp_path)[0]
        ingest_items(con, catalogue)
        users = sorted(con.execute("SELECT user_id FROM users_v").fetchall())
        titles = dict(con.execute("SELECT i.item_id, v.title FROM items_v v JOIN item_ids_v i USING (item_key)").fetchall())
    assert (report.loaded, report.quarantined) == (2, 2)
    assert [(ln, col, why) for ln, col, why in report.examples] == [
        (2, "user", "user id is a number that is not whole"), (3, "user", "missing user id")]
    assert (again.loaded, again.duplicates) == (0, 1)  # JSON 42.0 is the same user 42
    assert users == [("42",), ("7",)]
    assert titles == {"0042": "Leading Zeros", "42": "Forty-Two"}


def test_ids_longer_than_the_limit_are_quarantined(tmp_path: Path) -> None:
    long_id = "u" * (MAX_ID_CHARS + 1)
    path = tmp_path / "events.csv"
    path.write_text(f"user,item,time\n{long_id},1,1600000000\nbob,1,1600000001\n")
    with open_warehouse(tmp_path / "w.duckdb") as con:
        report = ingest_paths(con, [path], IngestOptions(), tmp_path)[0]
    assert (report.loaded, report.quarantined) == (1, 1)
    assert report.examples == [(2, "user", f"user id longer than {MAX_ID_CHARS:,} characters")]
    with pytest.raises(InvalidId, match="longer than"):
        HistoryStore(tmp_path / "w.duckdb").history(long_id)

