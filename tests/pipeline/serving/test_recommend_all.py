"""Batch and online answers are one answer: ``recommend_all`` equals ``Recommender.recommend`` for
every MovieLens-100K user, with an exact (flat) and with an approximate (HNSW) index."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from pipeline import Recommender
from pipeline.config import load_settings
from pipeline.data.histories import HistoryStore
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
