"""pipeline/warehouse.py: schema, id keys and dictionaries, transactions, stats (in-process, real DuckDB files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import (
    DICT_KEY_BASE,
    connect,
    lookup_keys,
    open_warehouse,
    register_ids,
    transaction,
    warehouse_stats,
)
from pipeline.errors import UserError

TABLES = {"sources", "events", "user_dict", "item_dict", "items", "quarantine", "users_v", "item_ids_v", "items_v"}


def test_schema_is_created_once_and_read_only_needs_a_file(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "w.duckdb"
    with pytest.raises(UserError, match="no warehouse"):
        connect(db, read_only=True)
    assert not db.exists()
    with open_warehouse(db) as con:
        names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert TABLES <= names
    with open_warehouse(db) as con:  # idempotent on an existing file
        assert con.execute("SELECT count(*) FROM events").fetchall() == [(0,)]
    with open_warehouse(db, read_only=True) as con:
        with pytest.raises(duckdb.Error):
            con.execute("INSERT INTO user_dict VALUES (1, 'x')")


def test_a_second_writer_gets_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    connect(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ok', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        with pytest.raises(UserError, match="busy"):
            connect(db, retries=3)
    finally:
        holder.kill()
        holder.wait()


def test_keys_integers_are_their_own_key_others_get_dictionary_keys(tmp_path: Path) -> None:
    with open_warehouse(tmp_path / "w.duckdb") as con:
        con.execute("CREATE TEMP TABLE ids AS SELECT unnest(['42', '0', '042', 'alice', '-1', '1e3', 'alice']) AS id")
        register_ids(con, "user", "ids")
        assert register_ids(con, "user", "ids") == 0  # idempotent: nothing new the second time
        rows = dict(con.execute("SELECT user_id, user_key FROM user_dict").fetchall())
        assert set(rows) == {"042", "alice", "-1", "1e3"}  # canonical integers need no dictionary
        assert all(k >= DICT_KEY_BASE for k in rows.values())
        assert len(set(rows.values())) == 4
        # lookups only know ids that are in events or the catalog
        assert lookup_keys(con, "user", ["42", "alice"]) == {}
        con.execute("INSERT INTO events VALUES (42, 1, 0, 'x', NULL, NULL, 1, 1), (?, 1, 0, 'x', NULL, NULL, 1, 2)",
                    [rows["alice"]])
        assert lookup_keys(con, "user", ["42", "alice", "042", "nobody"]) == {"42": 42, "alice": rows["alice"]}
        assert sorted(con.execute("SELECT user_id FROM users_v").fetchall()) == [("42",), ("alice",)]


def test_transaction_rolls_back_on_any_exception(tmp_path: Path) -> None:
    with open_warehouse(tmp_path / "w.duckdb") as con:
        with pytest.raises(KeyboardInterrupt):
            with transaction(con):
                con.execute("INSERT INTO user_dict VALUES (1, 'a')")
                raise KeyboardInterrupt
        assert con.execute("SELECT count(*) FROM user_dict").fetchall() == [(0,)]
        with transaction(con):
            con.execute("INSERT INTO user_dict VALUES (1, 'a')")
        assert con.execute("SELECT count(*) FROM user_dict").fetchall() == [(1,)]


def test_stats_time_kinds(tmp_path: Path) -> None:
    timed = tmp_path / "timed.csv"
    timed.write_text("user,item,time\n1,1,1600000000\n2,1,1600000100\n")
    ordered = tmp_path / "ordered.txt"
    ordered.write_text("1 1\n1 2\n3 3\n")
    with open_warehouse(tmp_path / "w.duckdb") as con:
        empty = warehouse_stats(con)
        assert (empty.events, empty.time_kind, empty.time_min) == (0, "none", None)
        ingest_paths(con, [timed], IngestOptions(), tmp_path)
        st = warehouse_stats(con)
        assert (st.events, st.users, st.items, st.time_kind) == (2, 2, 1, "time")
        assert (st.time_min, st.time_max) == ("2020-09-13T12:26:40+00:00", "2020-09-13T12:28:20+00:00")
        ingest_paths(con, [ordered], IngestOptions(), tmp_path)
        st = warehouse_stats(con)
        assert (st.events, st.users, st.items, st.time_kind) == (5, 3, 3, "mixed")
        # the span only covers sources with real times (order-only ts are line numbers)
        assert (st.time_min, st.time_max) == ("2020-09-13T12:26:40+00:00", "2020-09-13T12:28:20+00:00")
        assert [s["format"] for s in st.as_dict()["sources"]] == ["csv", "sasrec"]


def test_a_warehouse_keyed_by_the_old_identity_rule_is_upgraded_on_open(tmp_path: Path) -> None:
    """Rule 1 gave 19-digit integer ids dictionary keys; opening the file moves them to their own key."""
    from pipeline.data.histories import HistoryStore

    db = tmp_path / "w.duckdb"
    snowflake, old_key = "1000000000000000000", DICT_KEY_BASE + 7
    with open_warehouse(db) as con:  # what the old rule wrote: the id in the dictionary, events under its key
        con.execute("DELETE FROM meta")
        con.execute("INSERT INTO user_dict VALUES (?, ?), (?, 'alice')", [old_key, snowflake, DICT_KEY_BASE + 8])
        con.execute("INSERT INTO item_dict VALUES (?, ?)", [old_key, snowflake])
        con.execute("INSERT INTO events VALUES (?, ?, 1, 'x', NULL, NULL, 1, 1), (?, 5, 2, 'x', NULL, NULL, 1, 2)",
                    [old_key, old_key, DICT_KEY_BASE + 8])
        con.execute("INSERT INTO items VALUES (?, 'a title', [], NULL, NULL, 1)", [old_key])
    with open_warehouse(db, read_only=True) as con:  # a reader upgrades it first
        assert con.execute("SELECT value FROM meta WHERE key = 'identity_rule'").fetchall() == [("2",)]
        assert con.execute("SELECT user_key, item_key FROM events ORDER BY line").fetchall() == [
            (10**18, 10**18), (DICT_KEY_BASE + 8, 5)]
        assert con.execute("SELECT item_key FROM items").fetchall() == [(10**18,)]
        assert con.execute("SELECT user_id FROM user_dict").fetchall() == [("alice",)]
        assert con.execute("SELECT count(*) FROM item_dict").fetchall() == [(0,)]
    assert HistoryStore(db).history(snowflake).tolist() == [10**18]
    assert HistoryStore(db, cache=True).history(snowflake).tolist() == [10**18]
