"""Building SASRec from a feature set, and saving / loading trained models.

A saved model is one ``torch.save`` file of plain tensors and primitives (loaded with
``weights_only=True``): the state dict, the model settings it was built with, and the
identity of the feature set it was trained on (version + item count), so a model is never
paired with the wrong catalogue.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.item_tower import ItemTower
from models.sasrec import SASRec
from pipeline.config import ModelSettings
from pipeline.errors import UserError
from pipeline.data.feature_store import FeatureSet, Ragged

MODEL_FILE_VERSION = 1


def padded(ragged: Ragged, width: int | None = None) -> torch.Tensor:
    """A ragged int column as a (R, width) long tensor padded with 0 (width >= 1)."""
    lengths = ragged.lengths()
    w = max(1, int(lengths.max()) if len(lengths) else 1) if width is None else width
    out = np.zeros((len(lengths), w), dtype=np.int64)
    for r in range(len(lengths)):
        row = ragged.row(r)[:w]
        out[r, :len(row)] = row
    return torch.from_numpy(out)


def content_tensors(fs: FeatureSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(category ids (N+1, Kc), token ids (N+1, Kt), numeric (N+1, F)) of the catalogue."""
    return padded(fs.item_categories), padded(fs.item_tokens), torch.from_numpy(np.ascontiguousarray(fs.item_numeric))


def build_sasrec(fs: FeatureSet, ms: ModelSettings) -> SASRec:
    """A fresh model shaped for ``fs``: content buffers loaded, cold items marked."""
    cats, toks, nums = content_tensors(fs)
    tower = ItemTower(
        num_items=fs.num_items, dim=ms.hidden_size, num_categories=int(fs.manifest["counts"]["categories"]),
        text_buckets=int(fs.manifest["text_buckets"]), num_numeric=nums.shape[1], use_content=ms.use_content,
        id_dropout=ms.id_dropout, max_categories=cats.shape[1], max_tokens=toks.shape[1],
    )
    tower.set_content(cats, toks, nums)
    tower.set_cold(torch.from_numpy(fs.cold_mask))
    return SASRec(tower, max_len=ms.max_len, num_blocks=ms.num_blocks, num_heads=ms.num_heads,
                  dropout=ms.dropout, ff_mult=ms.ff_mult)


def save_model(path: Path, model: SASRec, ms: ModelSettings, fs: FeatureSet, extra: dict[str, Any] | None = None) -> str:
    """Write the model file atomically; returns its sha256 (the model's identity).

    The file carries the item vocabulary (warehouse item keys in index order), so the model
    can map any history from the warehouse without the feature set it was trained on.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": MODEL_FILE_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_settings": ms.model_dump(mode="json"),
        "feature_version": fs.version,
        "item_keys": torch.from_numpy(fs.items["item_key"].to_numpy().copy()),
        "extra": extra or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[SASRec, dict[str, Any]]:
    """Load a saved model (shapes come from the file itself). Returns (model in eval mode, metadata)."""
    if not path.exists():
        raise UserError(f"no model file at {path}: run `attnrec train` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    sd = payload["state_dict"]
    ms = ModelSettings(**payload["model_settings"])
    num_items = int(payload["item_keys"].shape[0])
    content = ms.use_content
    tower = ItemTower(
        num_items=num_items, dim=ms.hidden_size,
        num_categories=sd["item_tower.category_bag.weight"].shape[0] - 1 if content else 0,
        text_buckets=sd["item_tower.text_bag.weight"].shape[0] if content else 0,
        num_numeric=sd["item_tower.numeric"].shape[1] if content else 0,
        use_content=content, id_dropout=ms.id_dropout,
        max_categories=sd["item_tower.category_ids"].shape[1] if content else 1,
        max_tokens=sd["item_tower.token_ids"].shape[1] if content else 1,
    )
    model = SASRec(tower, max_len=ms.max_len, num_blocks=ms.num_blocks, num_heads=ms.num_heads,
                   dropout=ms.dropout, ff_mult=ms.ff_mult)
    model.load_state_dict(sd)
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["sha256"] = file_sha256(path)
    return model, meta


def check_vocabulary(meta: dict[str, Any], fs: FeatureSet) -> None:
    """Refuse to evaluate a model on a feature set whose item indices mean other items."""
    keys = meta["item_keys"].numpy()
    if len(keys) != fs.num_items or not np.array_equal(keys, fs.items["item_key"].to_numpy()):
        raise UserError(
            f"the model (trained on feature set {meta.get('feature_version')}, {len(keys)} items) does not match "
            f"feature set {fs.version} ({fs.num_items} items): retrain with `attnrec train`"
        )
