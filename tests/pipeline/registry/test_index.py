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
