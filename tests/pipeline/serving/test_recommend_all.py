"""Batch and online answers are one answer: ``recommend_all`` equals ``Recommender.recommend`` for
every MovieLens-100K user, with an exact (flat) and with an approximate (HNSW) index; batch
scoring in chunks of users writes what one piece gives."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import Recommender
from pipeline.config import load_settings
from pipeline.data.histories import HistoryStore, UserRange
from pipeline.registry.model_store import Bundle, rebuild_index
from tests.pipeline.conftest import seeded_flat_bundle

K = 10
TIE = 1e-4  # two scores closer than this are a tie: float rounding (batch vs single matmuls) may order them either way


@pytest.fixture(scope="module")
def ml100k_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(warehouse file, bundle folder with a flat index) of a seeded random-weight model on ML-100K."""
    home = tmp_path_factory.mktemp("ml100k") / "home"
    bundle = seeded_flat_bundle(home, shared_data / "ml-100k" / "u.data", shared_data / "ml-100k" / "u.item")
    return load_settings(home=home).duckdb_path, bundle


def assert_same_answers(recommender: Recommender, frame: pl.DataFrame) -> int:
    """Every user's batch rows equal the online answer, rank by rank (ties within ``TIE`` may swap).
    Returns how many users' lists differ only by such ties."""
    tied = 0
    users = frame.partition_by("user_id", as_dict=True, maintain_order=True)
    assert len(users) == 943
    for (user,), rows in users.items():
        online = recommender.recommend(user=user, k=K).recommendations
        rows = rows.sort("rank")
        assert rows["rank"].to_list() == list(range(1, len(online) + 1)) and len(online) == K
        online_ids, batch_ids = [r.item_id for r in online], rows["item_id"].to_list()
        # rank by rank the same score: where the items differ, they are a tie swapped by float rounding
        for rank, (a, b) in enumerate(zip(online, rows["score"].to_list(), strict=True)):
            assert a.score == pytest.approx(b, abs=TIE), (user, rank)
        tied += online_ids != batch_ids
    return tied


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_recommend_all_equals_the_online_answer_for_every_user(kind: str, ml100k_bundle: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    db, source = ml100k_bundle
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    if kind != "flat":  # a deliberately rough graph: the index really is approximate
        assert rebuild_index(folder, kind, {"M": 4, "efConstruction": 32, "efSearch": 16}).recall_at_10 < 0.9
    recommender = Recommender(Bundle.load(folder), HistoryStore(db, cache=True))
    assert recommender.bundle.index_meta.kind == kind
    frame = recommender.recommend_all(k=K)
    assert frame.height == 943 * K and frame["fallback"].null_count() == frame.height
    tied = assert_same_answers(recommender, frame)
    assert tied <= 5, f"{tied} users' lists differ by more than a rare float tie"


def test_batch_scoring_holds_one_chunk_of_users_at_a_time_and_writes_what_one_piece_gives(
        ml100k_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured at 50M events: a `recommend-all` partition held all its users' histories and
    answers at once (5.4 and 8.5 GB for about 497,000 users each; the local run 10.3 GB), and
    the driver read every partition's answers back into one frame. Now the users are read and
    scored `CHUNK_USERS` at a time (here 100 of ML-100K's 943), streamed into Parquet, and the
    file and the DuckDB table are written from there: the same rows as one piece."""
    import duckdb

    from pipeline.app import steps
    from pipeline.data.warehouse import query_frame
    from pipeline.serving import recommender as recommender_module

    db, bundle = ml100k_bundle
    whole = Recommender(Bundle.load(bundle), HistoryStore(db)).recommend_all(k=K)  # 943 users: one piece
    held: list[int] = []
    read = HistoryStore.all_histories

    def spy(store: HistoryStore, users: UserRange | None = None) -> tuple[list[str], list[Any]]:
        ids, keys = read(store, users)
        held.append(len(ids))
        return ids, keys

    monkeypatch.setattr(HistoryStore, "all_histories", spy)
    monkeypatch.setattr(recommender_module, "CHUNK_USERS", 100)
    settings = load_settings(home=db.parent)
    report = steps.recommend_everyone(settings, K, tmp_path / "recs.parquet", str(bundle), "recs_in_chunks")
    assert len(held) == 10 and max(held) <= 100 and sum(held) == 943
    assert (report["users"], report["rows"], report["fallback_users"]) == (943, 943 * K, 0)
    assert pl.read_parquet(tmp_path / "recs.parquet").equals(whole)
    with duckdb.connect(str(db), read_only=True) as con:
        table = query_frame(con, "SELECT * EXCLUDE (created_at) FROM recs_in_chunks")
    assert table.equals(whole)
    assert not list(settings.tmp_dir.glob("recommendations-*"))  # the staged Parquet is gone


def test_writing_pieces_needs_one_and_leaves_no_file_when_scoring_fails(tmp_path: Path) -> None:
    from pipeline.app.steps import write_parquet_pieces

    with pytest.raises(ValueError, match="at least one frame"):
        write_parquet_pieces([], tmp_path / "none.parquet")

    def pieces() -> Any:
        yield pl.DataFrame({"user_id": ["1"], "rank": [1]})
        raise RuntimeError("scoring failed half-way")

    with pytest.raises(RuntimeError):
        write_parquet_pieces(pieces(), tmp_path / "half.parquet")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_an_empty_warehouse_gets_an_empty_file_and_table_with_the_columns(ml100k_bundle: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """Found in review: cutting no users into ranges raised numpy's "number sections must be
    larger than 0" (the Ray path since it was built, the local path since it read in chunks)."""
    from pipeline.app import steps
    from pipeline.data.warehouse import connect

    _, bundle = ml100k_bundle
    settings = load_settings(home=tmp_path / "empty")
    connect(settings.duckdb_path).close()  # the schema, no events
    assert HistoryStore(settings.duckdb_path).user_ranges(4) == []
    report = steps.recommend_everyone(settings, K, tmp_path / "recs.csv", str(bundle))
    assert (report["users"], report["rows"], report["fallback_users"]) == (0, 0, 0)
    assert (tmp_path / "recs.csv").read_text().strip() == "user_id,rank,item_id,score,fallback,model_version"
    with pytest.raises(ValueError, match="most = 0"):
        HistoryStore(settings.duckdb_path).user_ranges(1, most=0)
