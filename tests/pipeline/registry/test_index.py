"""FAISS index: exact equals brute force, ANN recall measured, mismatches refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.registry.index import build_index, load_index, recall_at_k
from pipeline.registry.model_store import load_model
from pipeline.training.batches import prefix_batch


def test_exact_index_equals_brute_force_torch_scores(small_home: Path, small_fs: FeatureSet) -> None:
    bundle = small_home / "runs" / "model-a"
    model, meta = load_model(bundle / "model.pt")
    index, imeta = load_index(bundle / "index", meta["sha256"])
    assert imeta.kind == "flat" and imeta.num_items == small_fs.num_items
    users = np.arange(50)
    seq = torch.from_numpy(prefix_batch(small_fs.sequences, users, small_fs.test_pos[users].astype(np.int64), model.max_len))
    with torch.no_grad():
        table = model.item_vectors()
        queries = model.user_vectors(seq, table)
        brute = queries @ table[1:].T  # (B, N)
    top_scores, top_idx = torch.topk(brute, 20, dim=1)
    scores, ids = index.search(queries.numpy(), 20)
    np.testing.assert_array_equal(ids, top_idx.numpy() + 1)
    np.testing.assert_allclose(scores, top_scores.numpy(), rtol=1e-4, atol=1e-4)


def test_mismatched_model_and_index_are_refused(small_home: Path) -> None:
    _, meta_b = load_model(small_home / "runs" / "model-b" / "model.pt")
    with pytest.raises(UserError, match="rebuild it with `attnrec index`"):
        load_index(small_home / "runs" / "model-a" / "index", meta_b["sha256"])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_is_measured(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_001, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    index, meta = build_index(vectors, "sha", kind, queries)
    assert meta.kind == kind and meta.recall_queries == 200
    exact = recall_at_k(index, vectors[1:], np.arange(1, 20_001), queries, 10)
    assert meta.recall_at_10 == pytest.approx(exact)
    assert meta.recall_at_10 > 0.5  # an ANN index that finds most true neighbours
    from pipeline.registry.index import save_index

    save_index(tmp_path / "idx", index, meta)
    stored = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert stored["recall_at_10"] == pytest.approx(meta.recall_at_10) and stored["kind"] == kind


def test_auto_kind_by_catalogue_size() -> None:
    from pipeline.registry.index import choose_kind

    assert choose_kind(3_416) == "flat"
    assert choose_kind(1_000_000) == "hnsw"
    with pytest.raises(UserError):
        choose_kind(10, "annoy")


def test_cli_index_takes_faiss_parameters_and_refuses_bad_ones(small_home: Path, tmp_path: Path) -> None:
    import shutil

    from tests.support import Attnrec, assert_one_line_error

    bundle = tmp_path / "bundle"
    shutil.copytree(small_home / "runs" / "model-a", bundle)
    cli = Attnrec(tmp_path / "home", Path.cwd())
    cli.run("index", "--model", bundle, "--kind", "hnsw", "--param", "efSearch=256", "--param", "M=16")
    stored = json.loads((bundle / "index" / "index.json").read_text())
    assert stored["kind"] == "hnsw" and stored["params"]["efSearch"] == 256 and stored["params"]["M"] == 16
    assert stored["params"]["efConstruction"] == 200  # not given: the default
    assert 0.0 < stored["recall_at_10"] <= 1.0
    index, _ = load_index(bundle / "index", stored["model_sha256"])
    import faiss

    assert faiss.downcast_index(index.index).hnsw.efSearch == 256

    before = (bundle / "index" / "index.json").read_bytes()
    assert_one_line_error(cli.run("index", "--model", bundle, "--kind", "hnsw", "--param", "efSerch=256", ok=False),
                          "efSerch", "efSearch")
    assert (bundle / "index" / "index.json").read_bytes() == before  # nothing rewritten


def test_sharded_flat_index_is_exact_and_reloads_shard_by_shard(small_home: Path, small_fs: FeatureSet,
                                                                 tmp_path: Path) -> None:
    from pipeline.registry.index import save_index

    model, meta = load_model(small_home / "runs" / "model-a" / "model.pt")
    users = np.arange(100)
    seq = torch.from_numpy(prefix_batch(small_fs.sequences, users, small_fs.test_pos[users].astype(np.int64), model.max_len))
    with torch.no_grad():
        table = model.item_vectors()
        queries = model.user_vectors(seq, table).numpy()
    whole, _ = build_index(table.numpy(), meta["sha256"], "flat")
    sharded, smeta = build_index(table.numpy(), meta["sha256"], "flat", queries, {"shards": 3})
    assert smeta.params["shards"] == 3 and smeta.recall_queries == 100 and smeta.recall_at_10 == 1.0
    want_scores, want_ids = whole.search(queries, 50)

    save_index(tmp_path / "idx", sharded, smeta)
    assert sorted(p.name for p in (tmp_path / "idx").glob("*.faiss")) == ["items-0.faiss", "items-1.faiss", "items-2.faiss"]
    loaded, lmeta = load_index(tmp_path / "idx", meta["sha256"])
    for index in (sharded, loaded):
        scores, ids = index.search(queries, 50)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # the shards hold disjoint, contiguous ranges of item indices that cover the catalogue
    from pipeline.registry.index import index_parts

    sizes = [part.ntotal for part in index_parts(loaded)]
    assert sum(sizes) == small_fs.num_items and max(sizes) - min(sizes) <= 1

    (tmp_path / "idx" / "items-1.faiss").unlink()
    with pytest.raises(UserError, match="items-1.faiss"):
        load_index(tmp_path / "idx", meta["sha256"])


def test_more_shards_than_items_is_refused() -> None:
    vectors = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)  # 4 items + padding
    with pytest.raises(UserError, match="shards=5"):
        build_index(vectors, "sha", "flat", params={"shards": 5})


def test_cli_shards_the_index_and_recommendations_do_not_change(small_home: Path, tmp_path: Path) -> None:
    import shutil

    from tests.support import Attnrec

    bundle = tmp_path / "bundle"
    shutil.copytree(small_home / "runs" / "model-a", bundle)
    cli = Attnrec(tmp_path / "home", Path.cwd())
    before = cli.json("recommend", "--model", bundle, "--items", "1,50,260,1196", "-k", "20")
    shown = cli.run("index", "--model", bundle, "--param", "shards=4").stdout
    assert "4 shards" in shown and "recall@10 vs exact 1.0000" in shown
    assert json.loads((bundle / "index" / "index.json").read_text())["params"]["shards"] == 4
    assert not (bundle / "index" / "items.faiss").exists()
    after = cli.json("recommend", "--model", bundle, "--items", "1,50,260,1196", "-k", "20")
    assert [r["item_id"] for r in after["recommendations"]] == [r["item_id"] for r in before["recommendations"]]
    assert [r["score"] for r in after["recommendations"]] == pytest.approx([r["score"] for r in before["recommendations"]], abs=1e-5)
