"""features/item_content.py: category ids, hashed text tokens, z-scored numeric fields."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from features.item_content import category_ids, category_vocabulary, numeric_fields, text_tokens

SCHEMA = {
    "item_idx": pl.Int32, "title": pl.String, "categories": pl.List(pl.String), "text": pl.String,
    "num_keys": pl.List(pl.String), "num_values": pl.List(pl.Float64),
}


def content(rows: list[dict]) -> pl.DataFrame:
    full = [{"item_idx": i + 1, "title": None, "categories": None, "text": None, "num_keys": None, "num_values": None} | r
            for i, r in enumerate(rows)]
    return pl.DataFrame(full, schema=SCHEMA)


# --- categories --------------------------------------------------------------------------


def test_category_vocabulary_sorted_from_one() -> None:
    c = content([
        {"categories": ["Drama", "Comedy"]}, {"categories": ["Action", "Drama"]}, {"categories": None}, {"categories": []},
    ])
    vocab = category_vocabulary(c)
    assert vocab["name"].to_list() == ["Action", "Comedy", "Drama"]
    assert vocab["category_id"].to_list() == [1, 2, 3]  # 0 is padding
    assert vocab["category_id"].dtype == pl.Int32


def test_category_ids_map_truncate_and_pad() -> None:
    c = content([
        {"categories": ["Drama", "Comedy", "Action", "War"]},
        {"categories": ["Comedy"]},
        {"categories": None},
        {"categories": []},
        {"categories": ["Unknown genre", "Action"]},
    ])
    vocab = pl.DataFrame({"category_id": [1, 2, 3, 4], "name": ["Action", "Comedy", "Drama", "War"]},
                         schema={"category_id": pl.Int32, "name": pl.String})
    ids = category_ids(c, vocab, max_categories=3)
    assert ids.dtype == pl.List(pl.Int32)
    assert ids.to_list() == [[3, 2, 1], [2], [], [], [1]]  # file order kept, cut at 3, unknown dropped


# --- text tokens -------------------------------------------------------------------------


def expected_tokens(grams: list[str], buckets: int, seed: int = 17) -> list[int]:
    return (pl.Series(grams).hash(seed) % (buckets - 1) + 1).cast(pl.Int32).to_list()


def test_text_tokens_unigrams_then_bigrams_of_title_and_text() -> None:
    c = content([{"title": "Toy Story (1995)", "text": "Pixar"}])
    got = text_tokens(c, buckets=1 << 15, max_tokens=32).to_list()[0]
    assert got == expected_tokens(["toy", "story", "pixar", "toy story", "story pixar"], 1 << 15)


def test_text_tokens_ignore_year_case_and_punctuation() -> None:
    c = content([
        {"title": "Toy Story (1995)"},
        {"title": "TOY story"},
        {"title": "toy, story!"},
        {"title": "Toy Story (1999)  "},
    ])
    rows = text_tokens(c, buckets=1 << 15, max_tokens=32).to_list()
    assert rows[0] == rows[1] == rows[2] == rows[3]
    assert len(rows[0]) == 3


def test_text_tokens_range_and_cap() -> None:
    words = [f"w{i}" for i in range(400)]
    c = content([{"title": " ".join(words[k:k + 40])} for k in range(0, 400, 40)] + [{"title": None, "text": None}])
    buckets = 16
    tokens = text_tokens(c, buckets=buckets, max_tokens=10)
    assert tokens.dtype == pl.List(pl.Int32)
    flat = tokens.explode().drop_nulls()
    assert flat.min() >= 1  # 0 is padding, never a token
    assert flat.max() <= buckets - 1
    assert flat.n_unique() > 8  # spread over the buckets
    assert all(len(t) == 10 for t in tokens.to_list()[:-1])
    assert tokens.to_list()[-1] == []  # no text at all: no tokens


def test_text_tokens_deterministic_within_and_across_processes() -> None:
    titles = ["Heat (1995)", "Sabrina (1995)", "Casino (1995)", "Mis\u00e9rables, Les (1995)"]
    c = content([{"title": t, "text": "great heist movie"} for t in titles])
    first = text_tokens(c, buckets=1 << 15, max_tokens=32).to_list()
    assert text_tokens(c, buckets=1 << 15, max_tokens=32).to_list() == first
    code = (
        "import json, polars as pl\n"
        "from features.item_content import text_tokens\n"
        f"c = pl.DataFrame({{'title': {titles!r}, 'text': ['great heist movie'] * 4}})\n"
        "print(json.dumps(text_tokens(c, 1 << 15, 32).to_list()))\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == first
    # a different seed gives different buckets
    assert text_tokens(c, buckets=1 << 15, max_tokens=32, seed=18).to_list() != first


# --- numeric fields ----------------------------------------------------------------------


def test_numeric_year_from_title_is_z_scored() -> None:
    c = content([{"title": "A (1990)"}, {"title": "B (2000)"}, {"title": "C (2010) "}, {"title": "No year"}])
    names, values = numeric_fields(c)
    assert names == ["year"]
    assert values.dtype == pl.List(pl.Float32)
    got = [v[0] for v in values.to_list()]
    # mean 2000, sample std 10; the item without a year gets the mean (0)
    assert got == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)


def test_numeric_fields_from_catalog_map() -> None:
    c = content([
        {"num_keys": ["budget", "runtime"], "num_values": [10.0, 90.0]},
        {"num_keys": ["budget"], "num_values": [20.0]},
        {"num_keys": ["budget", "runtime"], "num_values": [30.0, 90.0]},
        {},
    ])
    names, values = numeric_fields(c)
    assert names == ["budget", "runtime"]
    rows = values.to_list()
    budget = [r[0] for r in rows]
    assert budget == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # constant field: no division by zero, everything at the mean
    assert [r[1] for r in rows] == [0.0, 0.0, 0.0, 0.0]
    assert all(len(r) == 2 for r in rows)


def test_release_year_merges_into_year() -> None:
    c = content([
        {"title": "A (1990)"},
        {"title": "B", "num_keys": ["release_year"], "num_values": [2010.0]},
        {"title": "C (2000)", "num_keys": ["release_year"], "num_values": [1800.0]},  # the title wins
    ])
    names, values = numeric_fields(c)
    assert names == ["year"]
    assert [v[0] for v in values.to_list()] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_no_numeric_fields_gives_one_empty_list_per_item() -> None:
    c = content([{"title": "No year"}, {"title": None}, {"text": "words"}])
    names, values = numeric_fields(c)
    assert names == []
    assert values.len() == c.height
    assert values.to_list() == [[], [], []]
