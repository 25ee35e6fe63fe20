"""Item catalog ingest (``attnrec ingest-items``): MovieLens formats, id maps, generic tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.config import load_settings
from pipeline.data.feature_store import current_feature_set, load_feature_set
from tests.support import Attnrec, assert_one_line_error


def catalog(cli: Attnrec, *keys: int) -> dict[int, tuple]:
    """item_key -> (title, categories, text, numeric) as resolved by ``items_v``."""
    rows = cli.query(
        "SELECT item_key, title, categories, text, numeric FROM items_v WHERE item_key IN (SELECT unnest(?::BIGINT[]))",
        [list(keys)],
    )
    return {r[0]: tuple(r[1:]) for r in rows}


def sas_id_of(shared_data: Path, original: int) -> int:
    for line in (shared_data / "ml-1m" / "sas_to_original_items.txt").read_text().splitlines():
        sas, orig = line.split()
        if int(orig) == original:
            return int(sas)
    raise AssertionError(f"original id {original} not in the map")


def test_ml1m_movies_dat_keyed_by_sasrec_ids(cli: Attnrec, shared_data: Path) -> None:
    ml1m = shared_data / "ml-1m"
    cli.ingest(ml1m / "ml-1m.txt")
    [report] = cli.ingest_items(ml1m / "movies.dat", "--id-map", ml1m / "sas_to_original_items.txt")
    assert report["format"] == "movielens-movies-dat"
    assert report["rows"] == 3_883
    assert report["loaded"] == 3_416
    assert report["unmapped"] == 3_883 - 3_416  # movies nobody rated in ml-1m.txt

    stats = cli.stats()
    assert stats["catalog_items"] == 3_416
    assert stats["items"] == 3_416
    # every event item has its content, under the id the events use
    assert cli.query("SELECT count(DISTINCT item_key) FROM events WHERE item_key NOT IN (SELECT item_key FROM items_v)") == [(0,)]

    toy, les_mis = sas_id_of(shared_data, 1), sas_id_of(shared_data, 73)
    assert toy != 1  # the map really renames
    got = catalog(cli, toy, les_mis, 1)
    assert got[toy][:2] == ("Toy Story (1995)", ["Animation", "Children's", "Comedy"])
    assert got[les_mis][:2] == ("Mis\u00e9rables, Les (1995)", ["Drama", "Musical"])  # ISO-8859-1 decoded
    assert got[1][0] != "Toy Story (1995)"

    # the features carry the titles and genres through to the model inputs
    cli.features()
    fs = load_feature_set(current_feature_set(load_settings()))
    row = fs.items.filter(pl.col("item_id") == str(toy)).row(0, named=True)
    assert row["title"] == "Toy Story (1995)"
    names = dict(zip(fs.categories["category_id"].to_list(), fs.categories["name"].to_list(), strict=True))
    assert [names[c] for c in fs.item_categories.row(row["item_idx"])] == ["Animation", "Children's", "Comedy"]
    assert fs.categories.height == 18
    assert fs.manifest["numeric_fields"] == ["year"]
    assert len(fs.item_tokens.row(row["item_idx"])) > 0


def test_ml_latest_small_movies_and_tags(cli: Attnrec, ml_small: Path) -> None:
    cli.ingest(ml_small / "ratings.csv")
    movies, tags = cli.ingest_items(ml_small / "movies.csv", ml_small / "tags.csv")
    assert (movies["format"], movies["loaded"]) == ("movielens-movies-csv", 9_742)
    assert tags["format"] == "movielens-tags"
    assert tags["loaded"] == 1_572  # movies with at least one tag
    stats = cli.stats()
    assert stats["catalog_items"] == 9_742
    assert stats["items"] == 9_724

    got = catalog(cli, 1, 60756, 114335)
    title, cats, text, _ = got[1]
    assert title == "Toy Story (1995)"
    assert cats == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert "pixar" in text.split()
    # tags and titles from different files merge into one item
    assert got[60756][0] == "Step Brothers (2008)"
    assert "funny" in got[60756][2].split(" ")
    assert "Highly quotable" in got[60756][2]
    assert got[114335][1] is None  # "(no genres listed)" is no category

    features = cli.features()
    assert features["counts"]["items"] == 9_742
    assert features["counts"]["catalog_only_items"] == 9_742 - 9_724
    fs = load_feature_set(current_feature_set(load_settings()))
    assert fs.items.filter(~pl.col("in_events")).height == 18
    assert "(no genres listed)" not in fs.categories["name"].to_list()


def test_ml100k_u_item_genres_from_flags(cli: Attnrec, shared_data: Path) -> None:
    [report] = cli.ingest_items(shared_data / "ml-100k" / "u.item")
    assert (report["format"], report["loaded"]) == ("movielens-u-item", 1_682)
    got = catalog(cli, 1, 2, 267)
    assert got[1] == ("Toy Story (1995)", ["Animation", "Children's", "Comedy"], None, {"release_year": 1995.0})
    assert got[2][1] == ["Action", "Adventure", "Thriller"]
    assert got[267][:2] == ("unknown", ["unknown"])
    assert got[267][3] is None  # no release date: no numeric field


def test_reingesting_an_identical_catalog_is_a_no_op(cli: Attnrec, ml_small: Path) -> None:
    [first] = cli.ingest_items(ml_small / "movies.csv")
    [second] = cli.ingest_items(ml_small / "movies.csv")
    assert second["identical_to"] is not None
    assert second["loaded"] == 0
    assert cli.query("SELECT count(*) FROM items") == [(first["loaded"],)]
    assert len(cli.stats()["sources"]) == 1


def test_generic_table_and_later_updates(cli: Attnrec, tmp_path: Path) -> None:
    v1 = tmp_path / "catalog.csv"
    v1.write_text("product_id,name,category,description,price,stock\n"
                  "p1,Red Shoe,shoes|red,A bright red shoe,19.5,3\n"
                  "p2,Blue Hat,hats,,5,10\n")
    [report] = cli.ingest_items(v1)
    assert (report["format"], report["loaded"]) == ("table", 2)
    [(key1,)] = cli.query("SELECT item_key FROM item_dict WHERE item_id = 'p1'")
    [(key2,)] = cli.query("SELECT item_key FROM item_dict WHERE item_id = 'p2'")
    got = catalog(cli, key1, key2)
    assert got[key1] == ("Red Shoe", ["shoes", "red"], "A bright red shoe", {"price": 19.5, "stock": 3.0})
    assert got[key2] == ("Blue Hat", ["hats"], None, {"price": 5.0, "stock": 10.0})

    # a later file with new content for p1 only: p1 takes it, p2 keeps its content
    pl.DataFrame({"item_id": ["p1"], "title": ["Crimson Shoe"], "price": [21.0]}).write_parquet(tmp_path / "update.parquet")
    cli.ingest_items(tmp_path / "update.parquet", "--numeric-cols", "price")
    got = catalog(cli, key1, key2)
    assert got[key1][0] == "Crimson Shoe"
    assert got[key1][1] == ["shoes", "red"]  # not in the update: kept
    assert got[key1][3] == {"price": 21.0}
    assert got[key2][0] == "Blue Hat"

    # the same external id in events resolves to the catalog's key
    events = tmp_path / "events.csv"
    events.write_text("user,item,time\nu1,p1,100\nu1,p3,200\n")
    cli.ingest(events)
    stats = cli.stats()
    assert (stats["items"], stats["catalog_items"]) == (2, 2)
    assert cli.query("SELECT count(*) FROM item_dict") == [(3,)]


def test_catalog_errors_are_one_line(cli: Attnrec, tmp_path: Path) -> None:
    no_id = tmp_path / "noid.csv"
    no_id.write_text("name,colour\nshoe,red\n")
    assert_one_line_error(cli.run("ingest-items", no_id, ok=False), "noid.csv", "no item id column", "--item-col")
    assert_one_line_error(cli.run("ingest-items", tmp_path / "missing.csv", ok=False), "missing.csv", "no such file")
    bad_map = tmp_path / "map.txt"
    bad_map.write_text("1 2 3\n")
    good = tmp_path / "good.csv"
    good.write_text("item_id,title\n1,A\n")
    assert_one_line_error(cli.run("ingest-items", good, "--id-map", bad_map, ok=False), "map.txt", "line 1")
    assert cli.query("SELECT count(*) FROM items") == [(0,)]


def test_rows_without_item_id_are_quarantined_or_rejected(cli: Attnrec, tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\n1,One\n,Nobody\n3,Three\n")
    proc = cli.run("ingest-items", path, "--strict", ok=False)
    assert_one_line_error(proc, "items.csv", "--strict", "lines 3")
    assert cli.query("SELECT count(*) FROM items") == [(0,)]
    [report] = cli.ingest_items(path)
    assert (report["loaded"], report["quarantined"]) == (2, 1)
    assert cli.query("SELECT line, reason FROM quarantine") == [(3, "missing item id")]


def test_a_json_attribute_map_gives_categories(cli: Attnrec, tmp_path: Path, shared_data: Path) -> None:
    [report] = cli.ingest_items(shared_data / "amazon-toys" / "Toys_and_Games_item2attributes.json")
    assert (report["format"], report["loaded"], report["quarantined"]) == ("attribute-map", 11_924, 0)
    key = cli.query("SELECT item_key FROM item_ids_v WHERE item_id = '145'")[0][0]
    assert catalog(cli, key)[key][1] == ["1", "2", "6", "7", "8"]
    bad = tmp_path / "attrs.json"
    bad.write_text('{"a": ["x", "y"], "b": {"nested": 1}, "c": [3]}')
    [report] = cli.ingest_items(bad)
    assert (report["loaded"], report["quarantined"]) == (2, 1)
    assert report["examples"] == [[2, "the attributes of item 'b' are not a list of plain values"]]
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": [1,')
    assert_one_line_error(cli.run("ingest-items", broken, ok=False), "broken.json", "not valid JSON")
