"""Event-log formats through the real CLI: detection, column mapping, times, ids, folders and globs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.config import load_settings
from pipeline.data.feature_store import current_feature_set, load_feature_set
from pipeline.data.ingest_formats import ColumnFlags, detect
from tests.support import Attnrec


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def us(iso: str) -> int:
    dt = datetime.fromisoformat(iso)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def events(cli: Attnrec) -> list[tuple]:
    """(user id, item id, ts, event_type, weight) in file order, ids as text."""
    return cli.query(
        """SELECT u.user_id, i.item_id, e.ts, e.event_type, e.weight
           FROM events e JOIN users_v u USING (user_key) JOIN item_ids_v i USING (item_key)
           ORDER BY e.source_id, e.line"""
    )


def test_headerless_tsv_is_user_item_weight_time(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "log.tsv", "1\t10\t5\t978300760\n1\t11\t3.5\t978300761\n2\t10\t4\t978300762\n")
    [report] = cli.ingest(path)
    assert report["format"] == "tsv"
    assert "no header" in report["description"]
    assert report["loaded"] == 3
    assert events(cli) == [
        ("1", "10", 978300760_000000, "interaction", 5.0),
        ("1", "11", 978300761_000000, "interaction", 3.5),
        ("2", "10", 978300762_000000, "interaction", 4.0),
    ]
    stats = cli.stats()
    assert stats["time"] == {"kind": "time", "min": "2000-12-31T22:12:40+00:00", "max": "2000-12-31T22:12:42+00:00"}


def test_headerless_three_columns_are_user_item_time(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "log.txt", "u1,i1,1600000000\nu2,i1,1600000060\n")
    cli.ingest(path)
    assert events(cli) == [("u1", "i1", 1600000000_000000, "interaction", None),
                           ("u2", "i1", 1600000060_000000, "interaction", None)]


def test_semicolon_csv_with_header_and_event_types(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "shop.csv", "visitor;product;action;ts;quantity\n"
                                        "7;100;view;1600000000;\n7;100;purchase;1600000100;2\n8;101;;1600000200;1\n")
    [report] = cli.ingest(path, "--event-type", "click")
    assert report["description"].startswith("csv / delimiter ';' / header")
    assert events(cli) == [
        ("7", "100", 1600000000_000000, "view", None),
        ("7", "100", 1600000100_000000, "purchase", 2.0),
        ("8", "101", 1600000200_000000, "click", 1.0),  # empty event column: the --event-type default
    ]


def test_movielens_100k_u_data(cli: Attnrec, shared_data: Path) -> None:
    [report] = cli.ingest(shared_data / "ml-100k" / "u.data")
    assert report["format"] == "movielens-100k"
    assert (report["loaded"], report["quarantined"]) == (100_000, 0)
    stats = cli.stats()
    assert (stats["events"], stats["users"], stats["items"]) == (100_000, 943, 1_682)
    assert stats["time"]["min"] == "1997-09-20T03:05:10+00:00"
    assert stats["time"]["max"] == "1998-04-22T23:10:38+00:00"
    assert cli.query("SELECT DISTINCT event_type FROM events") == [("rating",)]
    assert cli.query("SELECT min(weight), max(weight) FROM events") == [(1.0, 5.0)]


def test_movielens_1m_ratings_dat(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300000\n")
    [report] = cli.ingest(path)
    assert report["format"] == "movielens-1m"
    assert events(cli) == [
        ("1", "1193", 978300760_000000, "rating", 5.0),
        ("1", "661", 978302109_000000, "rating", 3.0),
        ("2", "1193", 978300000_000000, "rating", 4.0),
    ]


def test_parquet_with_native_types(cli: Attnrec, tmp_path: Path) -> None:
    frame = pl.DataFrame({
        "customer_id": ["alice", "bob", "alice"],
        "sku": ["B00X", "B00Y", "B00Y"],
        "event_time": [datetime(2021, 3, 4, 5, 6, 7), datetime(2021, 3, 5), datetime(2021, 3, 6, 10)],
        "score": [1.5, None, 3.0],
        "event_type": ["view", "cart", "view"],
    })
    frame.write_parquet(tmp_path / "events.parquet")
    [report] = cli.ingest(tmp_path / "events.parquet")
    assert report["format"] == "parquet"
    assert report["loaded"] == 3
    assert events(cli) == [
        ("alice", "B00X", us("2021-03-04T05:06:07"), "view", 1.5),
        ("bob", "B00Y", us("2021-03-05T00:00:00"), "cart", None),
        ("alice", "B00Y", us("2021-03-06T10:00:00"), "view", 3.0),
    ]
    assert cli.query("SELECT line FROM events ORDER BY line") == [(1,), (2,), (3,)]


def test_parquet_with_integer_ids_and_millisecond_times(cli: Attnrec, tmp_path: Path) -> None:
    pl.DataFrame({"user": [1, 2], "item": [5, 6], "ts": [1_600_000_000_123, 1_600_000_001_456]}).write_parquet(
        tmp_path / "ms.parquet")
    [report] = cli.ingest(tmp_path / "ms.parquet")
    assert "unix ms" in report["description"]
    assert [e[2] for e in events(cli)] == [1_600_000_000_123_000, 1_600_000_001_456_000]


def test_ndjson_with_iso_times_and_string_ids(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "log.ndjson",
                 '{"user": "alice", "item": "B00X", "time": "2021-03-04T05:06:07Z", "event": "click"}\n'
                 '\n'
                 '{"user": "bob", "item": 42, "time": "2021-03-05T00:00:00+02:00"}\n'
                 '{"user": "carol", "time": "2021-03-05T00:00:00"}\n'
                 '{"user": "dan", "item": "B00X", "time": "2021-03-06 10:00:00.5", "event": "buy", "rating": 4}\n')
    [report] = cli.ingest(path)
    assert report["format"] == "ndjson"
    assert (report["loaded"], report["quarantined"]) == (3, 1)
    assert events(cli) == [
        ("alice", "B00X", us("2021-03-04T05:06:07+00:00"), "click", None),
        ("bob", "42", us("2021-03-04T22:00:00+00:00"), "interaction", None),  # +02:00 converted to UTC
        ("dan", "B00X", us("2021-03-06T10:00:00.500000"), "buy", 4.0),
    ]
    # the blank line counts: carol's record is on line 4 of the file
    assert cli.query("SELECT line, column_name, reason, raw FROM quarantine") == [
        (4, "item", "missing item id", '{"user": "carol", "time": "2021-03-05T00:00:00"}')]


def test_ndjson_lines_that_are_not_objects_are_quarantined_and_the_rest_loads(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl",
                 '{"user": "u1", "item": "a", "time": 1600000000}\n'
                 '{"user": "u1", "item": "b", "time": 1600000001\n'   # cut-off object
                 '[1, 2]\n'
                 '{"user": "u2", "item": "a", "time": 1600000002}\n'
                 'null\n')
    [report] = cli.ingest(path)
    assert (report["loaded"], report["quarantined"]) == (2, 3)
    assert [(e[0], e[1]) for e in events(cli)] == [("u1", "a"), ("u2", "a")]
    assert cli.query("SELECT line, column_name, reason, raw FROM quarantine ORDER BY line") == [
        (2, None, "not a JSON object", '{"user": "u1", "item": "b", "time": 1600000001'),
        (3, None, "not a JSON object", "[1, 2]"),
        (5, None, "not a JSON object", "null"),
    ]


def test_iso_times_in_csv(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "iso.csv", "user,item,time\n"
                                       "1,1,2021-03-04T05:06:07Z\n"
                                       "1,2,2021-03-04T07:06:07+02:00\n"
                                       "2,1,2021-03-04\n"
                                       "2,2,2021-03-04 23:59:59.250\n")
    cli.ingest(path)
    assert [e[2] for e in events(cli)] == [
        us("2021-03-04T05:06:07"), us("2021-03-04T05:06:07"), us("2021-03-04T00:00:00"), us("2021-03-04T23:59:59.250000"),
    ]
    stats = cli.stats()
    assert stats["time"]["min"] == "2021-03-04T00:00:00+00:00"
    assert stats["time"]["max"] == "2021-03-04T23:59:59.250000+00:00"


def test_millisecond_unix_times_give_the_right_time_span(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "ms.csv", "user_id,item_id,timestamp\n1,2,1600000000000\n1,3,1600000001000\n2,3,1600086400500\n")
    [report] = cli.ingest(path)
    assert "unix ms" in report["description"]
    stats = cli.stats()
    assert stats["time"] == {"kind": "time", "min": "2020-09-13T12:26:40+00:00",
                             "max": "2020-09-14T12:26:40.500000+00:00"}


def test_explicit_time_unit_wins_over_the_guess(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "user_id,item_id,timestamp\n1,2,1600000000\n")
    cli.ingest(path, "--time-unit", "ms")
    assert cli.stats()["time"]["min"] == "1970-01-19T12:26:40+00:00"


def test_column_flags_map_any_names(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "odd.csv", "who,what,when,how_much,kind\n"
                                       "u1,i1,1600000000,2,view\nu1,i2,1600000100,,buy\n")
    proc = cli.run("ingest", path, ok=False)
    assert proc.returncode != 0 and "--user-col" in proc.stderr
    [report] = cli.ingest(path, "--user-col", "who", "--item-col", "what", "--time-col", "when",
                          "--weight-col", "how_much", "--event-col", "kind")
    assert "user=who, item=what, time=when, event=kind, weight=how_much" in report["description"]
    assert events(cli) == [("u1", "i1", 1600000000_000000, "view", 2.0), ("u1", "i2", 1600000100_000000, "buy", None)]


def test_column_flags_by_position_without_header(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "swapped.tsv", "10\t1\t1600000000\n11\t1\t1600000100\n")  # item, user, time
    cli.ingest(path, "--user-col", "2", "--item-col", "1", "--time-col", "3")
    assert events(cli) == [("1", "10", 1600000000_000000, "interaction", None),
                           ("1", "11", 1600000100_000000, "interaction", None)]


def test_folder_input_takes_data_files_recursively_in_order(cli: Attnrec, tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    write(folder / "b.csv", "user,item,time\n2,20,200\n")
    write(folder / "a.csv", "user,item,time\n1,10,100\n")
    write(folder / "sub" / "c.tsv", "user\titem\ttime\n3\t30\t300\n")
    write(folder / ".hidden.csv", "user,item,time\n9,90,900\n")
    write(folder / "notes.md", "not data\n")
    reports = cli.ingest(folder)
    assert [Path(r["path"]).name for r in reports] == ["a.csv", "b.csv", "c.tsv"]
    assert sorted(e[0] for e in events(cli)) == ["1", "2", "3"]


def test_glob_input(cli: Attnrec, tmp_path: Path) -> None:
    for day in (1, 2, 3):
        write(tmp_path / "logs" / f"day{day}.csv", f"user,item,time\n{day},{day * 10},{day * 100}\n")
    write(tmp_path / "logs" / "other.tsv", "user\titem\ttime\n9\t90\t900\n")
    reports = cli.ingest(str(tmp_path / "logs" / "day*.csv"))
    assert [Path(r["path"]).name for r in reports] == ["day1.csv", "day2.csv", "day3.csv"]
    assert cli.stats()["events"] == 3
    proc = cli.run("ingest", str(tmp_path / "logs" / "nothing*.csv"), ok=False)
    assert proc.returncode != 0 and "no file matches" in proc.stderr


def test_string_ids_round_trip_into_the_feature_set(cli: Attnrec, tmp_path: Path) -> None:
    write(tmp_path / "a.csv", "user,item,time\nalice,B00X,100\nalice,B00Y,200\nalice,42,300\nbob,B00X,150\n")
    write(tmp_path / "b.csv", "user,item,time\nbob,B00Z,400\nalice,B00X,500\n007,B00X,600\n")
    cli.ingest(tmp_path / "a.csv", tmp_path / "b.csv")
    assert cli.stats()["users"] == 3
    # the same string id from two files maps to one key
    assert cli.query("SELECT count(*) FROM user_dict WHERE user_id = 'alice'") == [(1,)]
    cli.features()
    fs = load_feature_set(current_feature_set(load_settings()))
    assert sorted(fs.user_ids) == ["007", "alice", "bob"]  # "007" is not a canonical integer: kept as text
    item_id = dict(zip(fs.items["item_idx"].to_list(), fs.items["item_id"].to_list(), strict=True))
    seqs = {fs.user_ids[u]: [item_id[int(i)] for i in fs.sequences.row(u)] for u in range(fs.num_users)}
    assert seqs == {"alice": ["B00X", "B00Y", "42", "B00X"], "bob": ["B00X", "B00Z"], "007": ["B00X"]}
    assert sorted(fs.items["item_id"].to_list()) == ["42", "B00X", "B00Y", "B00Z"]


def test_detect_reports_roles_without_writing(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "userId,movieId,rating,timestamp\n1,2,3.0,4\n")
    spec = detect(path)
    assert spec.format == "movielens-csv"
    assert spec.mapping == {"user": "userId", "item": "movieId", "time": "timestamp", "event": None,
                            "weight": "rating", "event_id": None}
    assert spec.default_event_type == "rating"
    spec = detect(path, flags=ColumnFlags(time="rating"))
    assert spec.mapping["time"] == "rating"


def test_byte_order_mark_and_crlf_line_ends(cli: Attnrec, tmp_path: Path) -> None:
    bom = "\ufeff"
    (tmp_path / "excel.csv").write_bytes(f'{bom}user,item,time\r\n1,"2",100\r\n1,,200\r\n'.encode())
    (tmp_path / "plain.tsv").write_bytes(f"{bom}1\t3\t300\r\n2\t3\t400\r\n".encode())
    excel, plain = cli.ingest(tmp_path / "excel.csv", tmp_path / "plain.tsv")
    assert "user=user, item=item, time=time" in excel["description"]
    assert (excel["loaded"], excel["quarantined"]) == (1, 1)
    assert plain["loaded"] == 2
    assert [e[:3] for e in events(cli)] == [("1", "2", 100_000_000), ("1", "3", 300_000_000), ("2", "3", 400_000_000)]
    assert cli.query("SELECT count(*) FROM user_dict") == [(0,)]  # no id polluted by the BOM or a CR
    assert cli.query("SELECT line, reason FROM quarantine") == [(3, "missing item id")]


def test_explicit_delimiter_and_header_flags(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "pipes.txt", "1|10|100\n2|20|200\n")
    [report] = cli.ingest(path, "--delimiter", "|", "--no-header")
    assert report["description"].startswith("csv / delimiter '|' / no header")
    assert [e[:3] for e in events(cli)] == [("1", "10", 100_000_000), ("2", "20", 200_000_000)]


def test_one_sequence_per_line_is_read_in_line_and_position_order(cli: Attnrec, tmp_path: Path) -> None:
    path = write(tmp_path / "seqs.txt", "u1 a b a c\nu2 x\nu3\n\nu2 y z\n")
    [report] = cli.ingest(path)
    assert report["format"] == "sequences" and "one sequence per line" in report["description"]
    assert (report["loaded"], report["quarantined"]) == (7, 1)
    assert report["examples"] == [[3, "item", "missing item id"]]  # the user alone: line 3, named
    got = events(cli)
    assert [(u, i) for u, i, *_ in sorted(got, key=lambda e: e[2])] == [
        ("u1", "a"), ("u1", "b"), ("u1", "a"), ("u1", "c"), ("u2", "x"), ("u2", "y"), ("u2", "z")]
    assert len({ts for _, _, ts, *_ in got}) == 7  # a repeat (u1 a) is its own event
    assert cli.stats()["time"]["kind"] == "order"
    [again] = cli.ingest(path)  # exactly once
    assert again["loaded"] == 0 and cli.query("SELECT count(*) FROM events") == [(7,)]
    assert detect(path).format == "sequences"


def test_a_space_delimited_table_is_not_taken_for_sequences(tmp_path: Path) -> None:
    path = write(tmp_path / "table.txt", "1 10 5 978300760\n1 11 3 978300761\n2 10 4 978300762\n")
    spec = detect(path)
    assert spec.format != "sequences" and spec.mapping["time"] is not None


def test_the_amazon_toys_sequences_file(cli: Attnrec, shared_data: Path) -> None:
    [report] = cli.ingest(shared_data / "amazon-toys" / "Toys_and_Games.txt")
    assert (report["format"], report["loaded"], report["quarantined"]) == ("sequences", 167_597, 0)
    stats = cli.stats()
    assert (stats["users"], stats["items"]) == (19_412, 11_924)
    history = cli.query("""SELECT string_agg(i.item_id, ' ' ORDER BY e.ts) FROM events e
                           JOIN users_v u USING (user_key) JOIN item_ids_v i USING (item_key) WHERE u.user_id = '3'""")
    assert history == [("9 10 11 12 4 5 13 14 15",)]  # line 3 of the file, in its order
