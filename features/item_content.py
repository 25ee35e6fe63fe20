"""Item content features: category ids, hashed text tokens, the text a sentence encoder reads,
normalised numeric fields.

Input is the catalog aligned to the item vocabulary: ``item_idx``, ``title``, ``categories``
(list[str]), ``text``, ``num_keys`` (list[str]) and ``num_values`` (list[f64]). All
outputs are aligned to ``item_idx`` and padded with 0 ids, ready for ``nn.EmbeddingBag``.
"""

from __future__ import annotations

import polars as pl

YEAR_IN_TITLE = r"\((\d{4})\)\s*$"
TOKEN = r"[a-z0-9]+(?:'[a-z0-9]+)?"


def category_vocabulary(content: pl.DataFrame) -> pl.DataFrame:
    """``category_id`` (i32, from 1; 0 = padding) and ``name``, sorted by name."""
    names = content.select(pl.col("categories").explode().drop_nulls().unique().sort()).to_series()
    return pl.DataFrame({
        "category_id": pl.int_range(1, len(names) + 1, dtype=pl.Int32, eager=True), "name": names,
    })


def category_ids(content: pl.DataFrame, vocab: pl.DataFrame, max_categories: int) -> pl.Series:
    """Per item, the ids of its first ``max_categories`` categories (list[i32], maybe empty)."""
    lookup = dict(zip(vocab["name"].to_list(), vocab["category_id"].to_list(), strict=True))
    return content.select(
        pl.col("categories").list.eval(pl.element().replace_strict(lookup, default=None, return_dtype=pl.Int32))
        .list.drop_nulls().list.head(max_categories).fill_null(pl.lit([], pl.List(pl.Int32))).alias("category_ids")
    ).to_series()


def text_tokens(content: pl.DataFrame, buckets: int, max_tokens: int, seed: int = 17) -> pl.Series:
    """Hashed unigrams then bigrams of title (year removed) + free text, ids in 1..buckets-1.

    Hashing keeps the vocabulary open: an unseen item's words map into the same buckets.
    """
    words = (
        pl.concat_str([
            pl.col("title").fill_null("").str.replace(YEAR_IN_TITLE, ""),
            pl.col("text").fill_null(""),
        ], separator=" ")
        .str.to_lowercase().str.extract_all(TOKEN)
    )
    bigrams = words.list.eval((pl.element() + " " + pl.element().shift(-1)).drop_nulls())
    grams = pl.concat_list([words, bigrams]).list.unique(maintain_order=True)
    ids = grams.list.eval((pl.element().hash(seed) % (buckets - 1) + 1).cast(pl.Int32))
    return content.select(ids.list.head(max_tokens).fill_null(pl.lit([], pl.List(pl.Int32))).alias("text_tokens")).to_series()


def item_texts(content: pl.DataFrame) -> pl.Series:
    """The text a sentence encoder reads per item (str, maybe empty): title, categories, free text.

    "Toy Story (1995)", ["Animation", "Comedy"], "pixar fun" -> "Toy Story (1995). Animation, Comedy. pixar fun"
    """
    parts = [
        pl.col("title").fill_null("").str.strip_chars(),
        pl.col("categories").list.join(", ").fill_null("").str.strip_chars(),
        pl.col("text").fill_null("").str.strip_chars(),
    ]
    return content.select(
        pl.concat_list(parts).list.eval(pl.element().filter(pl.element() != "")).list.join(". ").alias("item_text")
    ).to_series()


def numeric_fields(content: pl.DataFrame) -> tuple[list[str], pl.Series]:
    """Z-scored numeric fields per item: the catalog's numeric map plus ``year`` from the title.

    Missing values become 0 (the mean). Returns (field names, list[f32] per item).
    """
    year = pl.col("title").str.extract(YEAR_IN_TITLE, 1).cast(pl.Float64, strict=False)
    frame = content.select("item_idx", year.alias("year"), "num_keys", "num_values")
    keys = sorted(set(frame["num_keys"].explode().drop_nulls().to_list()))
    cols: dict[str, pl.Expr] = {"year": pl.col("year")} if frame["year"].is_not_null().any() else {}
    for k in keys:
        value = pl.col("num_values").list.gather(pl.col("num_keys").list.eval(pl.arg_where(pl.element() == k))).list.first()
        name = "year" if k in {"year", "release_year"} and "year" in cols else k
        cols[name] = pl.coalesce(cols[name], value) if name in cols else value
    if not cols:
        return [], content.with_columns(pl.lit([], pl.List(pl.Float32)).alias("numeric"))["numeric"]
    table = frame.select(**{n: e.cast(pl.Float64) for n, e in cols.items()})
    scaled = table.select(
        ((pl.col(c) - pl.col(c).mean()) / pl.when(pl.col(c).std() > 0).then(pl.col(c).std()).otherwise(1.0))
        .fill_null(0.0).fill_nan(0.0).cast(pl.Float32).alias(c)
        for c in table.columns
    )
    return list(table.columns), scaled.select(pl.concat_list(pl.all()).alias("numeric")).to_series()
