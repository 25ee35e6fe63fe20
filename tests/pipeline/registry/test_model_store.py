"""Model files and bundles: save/load round trips, one constructor, the legacy format, resolution."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.registry.model_store import (
    BUNDLE_DIR,
    Bundle,
    load_model,
    resolve_bundle,
    save_model,
    write_bundle,
)
from pipeline.training.recipe import build_sasrec, validation_queries


@pytest.fixture(scope="module")
def trained_like(small_fs: FeatureSet):  # noqa: ANN201
    """A content model shaped for ml-latest-small, with non-default weights and two cold items."""
    settings = load_settings(home=Path("/nonexistent"), **{"model.hidden_size": 16, "model.max_len": 20})
    torch.manual_seed(3)
    model, shape = build_sasrec(small_fs, settings.model)
    cold = torch.zeros(small_fs.num_items + 1, dtype=torch.bool)
    cold[[5, 7]] = True
    model.item_tower.set_cold(cold)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), shape


def test_model_file_round_trip(trained_like, small_fs: FeatureSet, tmp_path: Path) -> None:  # noqa: ANN001
    model, shape = trained_like
    sha = save_model(tmp_path / "model.pt", model, shape, small_fs.items["item_key"].to_numpy(), small_fs.version,
                     extra={"best_epoch": 3})
    assert sha == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["sha256"] == sha and meta["shape"] == shape and meta["extra"] == {"best_epoch": 3}
    assert meta["feature_version"] == small_fs.version
    np.testing.assert_array_equal(meta["item_keys"].numpy(), small_fs.items["item_key"].to_numpy())
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    seq = torch.tensor([[0, 0, 3, 9, 4], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq), model(seq), rtol=0, atol=0)
    assert not loaded.training


def test_format_1_files_still_load(trained_like, small_fs: FeatureSet, tmp_path: Path) -> None:  # noqa: ANN001
    """Model files written before the shape was stored (format 1) load into the same model."""
    model, shape = trained_like
    torch.save({
        "format_version": 1, "state_dict": model.state_dict(),
        "model_settings": {"hidden_size": shape.dim, "num_blocks": shape.num_blocks, "num_heads": shape.num_heads,
                           "max_len": shape.max_len, "dropout": shape.dropout, "ff_mult": shape.ff_mult,
                           "use_content": shape.use_content, "id_dropout": shape.id_dropout},
        "feature_version": small_fs.version, "item_keys": torch.from_numpy(small_fs.items["item_key"].to_numpy().copy()),
        "extra": {},
    }, tmp_path / "model.pt")
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["shape"] == shape
    seq = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq), model(seq), rtol=0, atol=0)


def test_bundle_written_equals_bundle_loaded(trained_like, small_fs: FeatureSet, tmp_path: Path) -> None:  # noqa: ANN001
    model, shape = trained_like
    queries = validation_queries(model, small_fs)
    assert queries.shape == (min(1000, int((small_fs.valid_pos >= 0).sum())), 16)
    written = write_bundle(tmp_path / "run" / BUNDLE_DIR, model, shape, small_fs.items, small_fs.version, queries, kind="hnsw")
    loaded = Bundle.load(tmp_path / "run" / BUNDLE_DIR)
    assert loaded.meta["sha256"] == written.meta["sha256"] and loaded.version == written.version
    np.testing.assert_array_equal(loaded.vectors, written.vectors)
    assert loaded.item_ids == written.item_ids and loaded.titles == written.titles
    assert loaded.index_meta.kind == "hnsw" and loaded.index_meta.recall_queries == len(queries)
    assert loaded.index_meta.recall_at_10 == pytest.approx(written.index_meta.recall_at_10)
    keys = small_fs.items["item_key"].to_numpy()
    np.testing.assert_array_equal(loaded.indices_of_keys(np.array([keys[4], -1, keys[0]])), [5, 0, 1])
    assert set(loaded.items_in_category("Documentary").tolist()) == {
        i + 1 for i, c in enumerate(loaded.categories) if "Documentary" in c}


def test_resolve_bundle_takes_run_folders_bundles_and_model_files(small_home: Path, tmp_path: Path) -> None:
    settings = load_settings(home=small_home)
    bundle = small_home / "runs" / "model-a"
    assert resolve_bundle(settings, bundle) == bundle
    assert resolve_bundle(settings, bundle / "model.pt") == bundle
    assert resolve_bundle(settings, "latest") == bundle
    run = tmp_path / "run"
    (run / BUNDLE_DIR).mkdir(parents=True)
    (run / BUNDLE_DIR / "model.pt").write_bytes((bundle / "model.pt").read_bytes())
    assert resolve_bundle(settings, run) == run / BUNDLE_DIR
    with pytest.raises(UserError, match="not a model bundle"):
        resolve_bundle(settings, tmp_path)


def test_a_bundle_written_from_a_model_in_training_mode_indexes_the_served_vectors(small_fs: FeatureSet,
                                                                                   tmp_path: Path) -> None:
    """ID dropout is a training-time mask: the index must hold the vectors serving computes."""
    import faiss

    settings = load_settings(home=tmp_path, **{"model.hidden_size": 16, "model.max_len": 20, "model.id_dropout": 0.5})
    torch.manual_seed(0)
    model, shape = build_sasrec(small_fs, settings.model)
    queries = validation_queries(model, small_fs)
    model.train()  # as fit() hands it over mid-run, or a caller forgets eval()
    write_bundle(tmp_path / "bundle", model, shape, small_fs.items, small_fs.version, queries, kind="flat")
    loaded = Bundle.load(tmp_path / "bundle")
    flat = faiss.downcast_index(loaded.index.index)
    np.testing.assert_array_equal(flat.reconstruct_n(0, loaded.num_items), loaded.vectors[1:])


@pytest.mark.parametrize("encoder", ["minilm", "none"])
def test_text_encoders_round_trip(encoder: str, tiny_fs: FeatureSet, tmp_path: Path) -> None:
    """A model with frozen sentence vectors (or no text path) saves and loads whole: the vectors
    travel in the model file, so serving needs no encoder."""
    settings = load_settings(home=tmp_path / "home", **{"model.hidden_size": 8, "model.max_len": 10,
                                                        "model.text_encoder": encoder})
    torch.manual_seed(0)
    model, shape = build_sasrec(tiny_fs, settings.model)
    assert shape.text_dim == (384 if encoder == "minilm" else 0) and shape.text_buckets == 0
    save_model(tmp_path / "model.pt", model.eval(), shape, tiny_fs.items["item_key"].to_numpy(), tiny_fs.version)
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["shape"] == shape
    if encoder == "minilm":
        torch.testing.assert_close(loaded.item_tower.text_vectors, model.item_tower.text_vectors, rtol=0, atol=0)
        assert loaded.item_tower.text_vectors.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(loaded.item_vectors(), model.item_vectors(), rtol=0, atol=0)
