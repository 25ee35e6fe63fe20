"""The one query path: seen items, filters, ad-hoc histories, fallback, reasons, fresh events, batch."""

from pathlib import Path

import duckdb
import polars as pl
import pytest

from pipeline.data.histories import HistoryStore
from pipeline.errors import UserError
from pipeline.registry.model_store import Bundle
from pipeline.serving.query import Filters, Recommendations, indices_of_ids, recommend
from tests.support import Attnrec


def ask(bundle: Bundle, history, k: int = 10, **kw) -> Recommendations:  # noqa: ANN001
    """One query through the core (a batch of one)."""
    return recommend(bundle, [history], k, **kw)[0]


@pytest.fixture(scope="module")
def bundle(small_home: Path) -> Bundle:
    return Bundle.load(small_home / "runs" / "model-a")


@pytest.fixture(scope="module")
def store(small_home: Path) -> HistoryStore:
    return HistoryStore(small_home / "warehouse.duckdb")


def test_seen_items_are_never_returned(bundle: Bundle, store: HistoryStore) -> None:
    for user in ["1", "414", "599", "68"]:  # some of the longest histories in ml-latest-small
        keys = store.history(user)
        history = bundle.indices_of_keys(keys)
        recs = ask(bundle, history, k=100).recommendations
        seen = {bundle.item_ids[i - 1] for i in history}
        assert len(recs) == 100
        assert not seen & {r.item_id for r in recs}


def test_scores_are_sorted_and_match_the_model(bundle: Bundle, store: HistoryStore) -> None:
    import torch

    history = bundle.indices_of_keys(store.history("7"))
    recs = ask(bundle, history, k=10, filters=Filters(exclude_seen=False)).recommendations
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    seq = torch.from_numpy(history[-bundle.model.max_len:]).unsqueeze(0)
    with torch.no_grad():
        full = bundle.model(seq)[0, 1:]
    expected = [bundle.item_ids[i] for i in torch.topk(full, 10).indices.tolist()]
    assert [r.item_id for r in recs] == expected


def test_category_filters(bundle: Bundle, store: HistoryStore) -> None:
    history = bundle.indices_of_keys(store.history("1"))
    cats = {iid: set(c) for iid, c in zip(bundle.item_ids, bundle.categories, strict=True)}
    only = ask(bundle, history, 20, filters=Filters(include_categories=["Documentary"])).recommendations
    assert len(only) == 20 and all("Documentary" in cats[r.item_id] for r in only)
    without = ask(bundle, history, 50, filters=Filters(exclude_categories=["Comedy", "Drama"])).recommendations
    assert len(without) == 50 and not any({"Comedy", "Drama"} & cats[r.item_id] for r in without)
    first = ask(bundle, history, 5).recommendations
    banned = [r.item_id for r in first[:3]]
    after = ask(bundle, history, 5, filters=Filters(exclude_items=banned)).recommendations
    assert not set(banned) & {r.item_id for r in after}
    assert after[0].item_id == first[3].item_id


def test_adhoc_history_and_unknown_user(bundle: Bundle, store: HistoryStore) -> None:
    assert store.history("999999") is None  # no such user in the warehouse
    known, unknown = indices_of_ids(bundle, ["1", "260", "1196", "nope"])
    assert unknown == ["nope"] and len(known) == 3
    resp = ask(bundle, known, k=5, explain=True)
    assert resp.fallback is None and resp.history_length == 3 and len(resp.recommendations) == 5
    assert not {"1", "260", "1196"} & {r.item_id for r in resp.recommendations}
    single = ask(bundle, known[:1], k=3)
    assert len(single.recommendations) == 3


def test_no_history_gets_most_popular_and_says_so(bundle: Bundle) -> None:
    resp = ask(bundle, [], k=5)
    assert resp.fallback == "popular"
    counts = dict(zip(bundle.item_ids, bundle.items["train_count"].to_list(), strict=True))
    top = sorted(counts, key=lambda i: -counts[i])[:5]
    assert [r.item_id for r in resp.recommendations] == top


def test_reasons_are_real_history_items_with_weights_at_most_one(bundle: Bundle, store: HistoryStore) -> None:
    history = bundle.indices_of_keys(store.history("15"))
    window = {bundle.item_ids[i - 1] for i in history[-bundle.model.max_len:]}
    resp = ask(bundle, history, k=10, explain=True)
    for rec in resp.recommendations:
        assert 1 <= len(rec.reasons) <= 3
        assert {r.item_id for r in rec.reasons} <= window
        total = sum(r.weight for r in rec.reasons)
        assert 0 < total <= 1.0 + 1e-6
        assert [r.weight for r in rec.reasons] == sorted((r.weight for r in rec.reasons), reverse=True)


def test_warehouse_keys_are_not_taken_for_model_indices(bundle: Bundle) -> None:
    with pytest.raises(ValueError, match="model indices"):
        ask(bundle, [1, bundle.num_items + 1], k=5)


def test_bad_k_is_a_user_error(bundle: Bundle) -> None:
    with pytest.raises(UserError):
        ask(bundle, [1], k=0)
    with pytest.raises(UserError):
        ask(bundle, [1], k=1001)


def test_new_events_change_recommendations_without_retraining(small_cli: Attnrec, tmp_path: Path) -> None:
    store = HistoryStore(small_cli.db, cache=True, refresh_seconds=0.0)
    bundle = Bundle.load(small_cli.home / "runs" / "model-a")
    before_hist = store.history("5")
    before = ask(bundle, bundle.indices_of_keys(before_hist), k=10).recommendations
    new_items = [r.item_id for r in before[:3]]  # the user now watches the top three
    events = tmp_path / "new.csv"
    events.write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"5,{item},5.0,{1600000000 + i}\n" for i, item in enumerate(new_items)))
    small_cli.run("ingest", events)  # a separate writer process while the store is alive
    after_hist = store.history("5")
    assert len(after_hist) == len(before_hist) + 3
    after = ask(bundle, bundle.indices_of_keys(after_hist), k=10).recommendations
    assert not set(new_items) & {r.item_id for r in after}
    assert [r.item_id for r in after] != [r.item_id for r in before]


def test_cli_recommend_user_and_items(small_cli: Attnrec) -> None:
    model = ("--model", str(small_cli.home / "runs" / "model-a"))
    out = small_cli.json("recommend", "--user", "42", "-k", "5", "--explain", *model)
    assert len(out["recommendations"]) == 5 and out["fallback"] is None
    assert all(rec["reasons"] for rec in out["recommendations"])
    adhoc = small_cli.json("recommend", "--items", "1,2,3", "-k", "3", *model)
    assert len(adhoc["recommendations"]) == 3
    table = small_cli.run("recommend", "--user", "42", "-k", "3", "--explain", *model).stdout
    assert "because you interacted with" in table
    bad = small_cli.run("recommend", "--items", "1,notanitem", *model, ok=False)
    assert bad.returncode != 0 and "notanitem" in bad.stderr and "Traceback" not in bad.stderr


def test_recommend_all_writes_parquet_and_table(small_cli: Attnrec, tmp_path: Path) -> None:
    out = tmp_path / "recs.parquet"
    small_cli.run("recommend-all", "-k", "20", "--out", out, "--model", small_cli.home / "runs" / "model-a")
    recs = pl.read_parquet(out)
    assert recs["user_id"].n_unique() == 610
    assert recs.group_by("user_id").len()["len"].to_list() == [20] * 610
    con = duckdb.connect(str(small_cli.db), read_only=True)
    try:
        rows = con.execute("SELECT count(*), count(DISTINCT user_id) FROM recommendations").fetchall()[0]
        seen = con.execute(
            "SELECT count(*) FROM recommendations r JOIN events e ON e.user_key = r.user_id::BIGINT AND e.item_key = r.item_id::BIGINT"
        ).fetchall()[0][0]
    finally:
        con.close()
    assert rows == (12_200, 610)
    assert seen == 0


def test_recommend_all_table_name_is_never_sql(small_cli: Attnrec, tmp_path: Path) -> None:
    from tests.support import assert_one_line_error

    hostile = 'x" AS SELECT 1 AS a; DROP TABLE events CASCADE; CREATE TABLE "pwned'
    proc = small_cli.run("recommend-all", "-k", "5", "--out", tmp_path / "r.parquet", "--table", hostile,
                         "--model", small_cli.home / "runs" / "model-a", ok=False)
    assert_one_line_error(proc, "--table", "a table name is letters, digits and _")
    assert small_cli.query("SELECT count(*) FROM events")[0][0] == 100_836
    assert not (tmp_path / "r.parquet").exists()
