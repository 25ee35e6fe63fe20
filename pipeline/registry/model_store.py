"""Model files and bundles: what a trained model is on disk, and how it is found again.

A *model file* (``model.pt``) is one ``torch.save`` of plain tensors and primitives (loaded
with ``weights_only=True``): the state dict, the model's shape (the constructor arguments,
so loading builds the model with the same constructor as training), the identity of the
feature set it was trained on and its item vocabulary (warehouse item keys in index
order), so a model is never paired with the wrong catalogue. Its sha256 is its identity.

A *bundle* is a folder with everything serving needs::

    model.pt             the model file
    items.parquet        item_idx, item_key, item_id, title, categories, train_count
    recall_queries.npy   (Q, D) float32 user vectors of real validation histories: every
                         index built for this model measures its recall@10 with them
    index/               the FAISS index (``pipeline.registry.index``)

``attnrec train`` writes it as ``<run>/bundle/`` next to the run's checkpoint; MLflow keeps
a copy as the registered model's artefact. ``resolve_bundle`` finds the bundle a command
uses: the registry champion by default, a registry URI, the newest local run, or a folder.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from models.item_tower import ItemTower
from models.sasrec import SASRec
from pipeline.config import Settings
from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.registry.index import IndexMeta, build_index, load_index, save_index, to_device

MODEL_FILE_VERSION = 2
REPAIR_MODEL = "retrain with `attnrec train`, or name another model with --model (a registry model is fetched again)"
BUNDLE_DIR = "bundle"
MODEL_FILE = "model.pt"
ITEMS_FILE = "items.parquet"
RECALL_QUERIES_FILE = "recall_queries.npy"
INDEX_DIR = "index"
ITEM_COLUMNS = ("item_idx", "item_key", "item_id", "title", "categories", "train_count")


@dataclass(frozen=True)
class SASRecShape:
    """Every argument that shapes a SASRec and its item tower: one constructor for training and loading."""

    num_items: int
    dim: int
    max_len: int
    num_blocks: int
    num_heads: int
    dropout: float
    ff_mult: int
    use_content: bool
    id_dropout: float
    num_categories: int = 0
    text_buckets: int = 0
    num_numeric: int = 0
    max_categories: int = 1
    max_tokens: int = 1
    text_dim: int = 0

    def build(self) -> SASRec:
        """A freshly initialised model of this shape (content buffers zero, no item cold)."""
        tower = ItemTower(
            num_items=self.num_items, dim=self.dim, num_categories=self.num_categories, text_buckets=self.text_buckets,
            num_numeric=self.num_numeric, use_content=self.use_content, id_dropout=self.id_dropout,
            max_categories=self.max_categories, max_tokens=self.max_tokens, text_dim=self.text_dim,
        )
        return SASRec(tower, max_len=self.max_len, num_blocks=self.num_blocks, num_heads=self.num_heads,
                      dropout=self.dropout, ff_mult=self.ff_mult)


def save_model(path: Path, model: SASRec, shape: SASRecShape, item_keys: np.ndarray, feature_version: str,
               extra: dict[str, Any] | None = None) -> str:
    """Write the model file atomically; returns its sha256 (hashed from the bytes written).

    ``item_keys`` (N,) int64: the warehouse key of each item index 1..N.
    """
    payload = {
        "format_version": MODEL_FILE_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "shape": asdict(shape),
        "feature_version": feature_version,
        "item_keys": torch.from_numpy(np.array(item_keys, dtype=np.int64)),  # a copy: the caller's array may be read-only
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[SASRec, dict[str, Any]]:
    """Load a model file. Returns (model in eval mode on ``device``, metadata with ``sha256``)."""
    if not path.exists():
        raise UserError(f"no model file at {path}: run `attnrec train` first")
    data = path.read_bytes()
    if not data.startswith(b"PK\x03\x04"):  # torch.save's zip archive (an empty file would abort torch.load)
        raise UserError(f"{path} is not a model file ({len(data):,} bytes, not a torch archive): {REPAIR_MODEL}")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        sd = payload["state_dict"]
        shape = SASRecShape(**payload["shape"]) if payload.get("format_version", 1) >= 2 else _shape_of_v1(payload)
        model = shape.build()
        model.load_state_dict(sd)
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways; all mean the same to the user
        raise UserError(f"{path} is a damaged model file ({_first_line(exc)}): {REPAIR_MODEL}") from None
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["shape"] = shape
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return model, meta


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _shape_of_v1(payload: dict[str, Any]) -> SASRecShape:
    """The shape of a format-1 model file (settings plus the content sizes its state dict implies)."""
    ms, sd = payload["model_settings"], payload["state_dict"]
    content = ms["use_content"]
    return SASRecShape(
        num_items=int(payload["item_keys"].shape[0]), dim=ms["hidden_size"], max_len=ms["max_len"],
        num_blocks=ms["num_blocks"], num_heads=ms["num_heads"], dropout=ms["dropout"], ff_mult=ms["ff_mult"],
        use_content=content, id_dropout=ms["id_dropout"],
        num_categories=sd["item_tower.category_bag.weight"].shape[0] - 1 if content else 0,
        text_buckets=sd["item_tower.text_bag.weight"].shape[0] if content else 0,
        num_numeric=sd["item_tower.numeric"].shape[1] if content else 0,
        max_categories=sd["item_tower.category_ids"].shape[1] if content else 1,
        max_tokens=sd["item_tower.token_ids"].shape[1] if content else 1,
    )


def model_label(folder: Path, sha256: str) -> str:
    """How answers and reports name a bundle's model: "attnrec v3" for a registry model (its
    ``VERSION`` file), else the first 12 hex digits of its file hash."""
    label = folder / "VERSION"
    return label.read_text().strip() if label.exists() else sha256[:12]


def check_vocabulary(meta: dict[str, Any], fs: FeatureSet) -> None:
    """Refuse to evaluate a model on a feature set whose item indices mean other items."""
    keys = meta["item_keys"].numpy()
    if len(keys) != fs.num_items or not np.array_equal(keys, fs.items["item_key"].to_numpy()):
        raise UserError(
            f"the model (trained on feature set {meta.get('feature_version')}, {len(keys)} items) does not match "
            f"feature set {fs.version} ({fs.num_items} items): retrain with `attnrec train`"
        )


# --------------------------------------------------------------------------------------
# Bundles


class Bundle:
    """A loaded bundle: the model, its item table (ids, titles, categories, popularity),
    the item vectors and the FAISS index. The serving core (``pipeline.serving.query``)
    answers queries over it."""

    def __init__(self, path: Path, model: SASRec, meta: dict[str, Any], items: pl.DataFrame,
                 index: Any, index_meta: IndexMeta, table: torch.Tensor | None = None) -> None:
        """``table``: the model's item vectors (N+1, D) when the caller has them (else computed)."""
        self.path = path
        self.model = model
        self.meta = meta
        self.device = next(model.parameters()).device
        self.stamp: tuple[int, ...] = ()  # bundle_stamp(path) when loaded from disk
        self.version = model_label(path, meta["sha256"])
        self.items = items.sort("item_idx")
        self.item_keys: np.ndarray = meta["item_keys"].numpy()  # (N,) warehouse key of item index 1..N
        if len(self.item_keys) != self.items.height:
            raise UserError(f"{path}: {ITEMS_FILE} does not match {MODEL_FILE} ({self.items.height} vs {len(self.item_keys)} items)")
        self.item_ids: list[str] = self.items["item_id"].to_list()
        self.titles: list[str | None] = self.items["title"].to_list()
        self.categories: list[list[str]] = [c or [] for c in self.items["categories"].to_list()]
        self.index_of_id = {iid: i + 1 for i, iid in enumerate(self.item_ids)}
        self.train_counts = self.items["train_count"].to_numpy()
        self.popular = np.argsort(-self.train_counts, kind="stable") + 1  # item indices, most popular first
        model.eval()
        with torch.no_grad():
            self.table = model.item_vectors() if table is None else table  # (N+1, D) on the model's device
        self.vectors = np.ascontiguousarray(self.table.cpu().numpy(), dtype=np.float32)  # (N+1, D)
        self.index = index
        self.index_meta = index_meta
        self.lock = threading.Lock()  # torch and FAISS calls are serialised per bundle
        self._by_category: dict[str, np.ndarray] | None = None

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> Bundle:
        """Load the bundle in folder ``path`` (its index must have been built for its model)."""
        stamp = bundle_stamp(path)
        model, meta = load_model(path / MODEL_FILE, device)
        items_path = path / ITEMS_FILE
        if not items_path.exists():
            raise UserError(f"{path} has no {ITEMS_FILE}: not a complete bundle: {REPAIR_MODEL}")
        try:
            items = pl.read_parquet(items_path)
        except Exception as exc:  # noqa: BLE001 - polars raises many types for a damaged file
            raise UserError(f"{items_path} is a damaged item table ({_first_line(exc)}): {REPAIR_MODEL}") from None
        index, index_meta = load_index(path / INDEX_DIR, meta["sha256"])
        bundle = cls(path, model, meta, items, index, index_meta)
        bundle.stamp = stamp
        return bundle

    @property
    def num_items(self) -> int:
        return len(self.item_keys)

    def items_in_category(self, name: str) -> np.ndarray:
        """Item indices (1..N) of the items in category ``name`` (empty for an unknown category)."""
        return self._categories().get(name, np.zeros(0, np.int64))

    def category_names(self) -> list[str]:
        """The catalogue's category names, sorted."""
        return sorted(self._categories())

    def _categories(self) -> dict[str, np.ndarray]:
        if self._by_category is None:
            groups: dict[str, list[int]] = {}
            for idx, cats in enumerate(self.categories, start=1):
                for c in cats:
                    groups.setdefault(c, []).append(idx)
            self._by_category = {c: np.asarray(v, dtype=np.int64) for c, v in groups.items()}
        return self._by_category

    def indices_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Warehouse item keys -> model item indices (0 for items the model does not know)."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_keys, keys), len(self.item_keys) - 1)
        return np.where(self.item_keys[pos] == keys, pos + 1, 0)


def write_bundle(folder: Path, model: SASRec, shape: SASRecShape, items: pl.DataFrame, feature_version: str,
                 recall_queries: np.ndarray, kind: str = "auto", params: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Bundle:
    """Write a bundle for a trained model and return it loaded (nothing is read back from disk).

    Args:
        items: the feature set's item table (``ITEM_COLUMNS``), one row per item index 1..N.
        recall_queries: (Q, D) real query vectors for measuring the index's recall@10.
        kind, params: the FAISS index (``pipeline.registry.index``).
    """
    model.eval()  # the index holds the vectors serving computes: no ID dropout
    folder.mkdir(parents=True, exist_ok=True)
    items = items.select(*ITEM_COLUMNS).sort("item_idx")
    sha = save_model(folder / MODEL_FILE, model, shape, items["item_key"].to_numpy(), feature_version, extra)
    items.write_parquet(folder / ITEMS_FILE)
    np.save(folder / RECALL_QUERIES_FILE, np.ascontiguousarray(recall_queries, dtype=np.float32))
    with torch.no_grad():
        table = model.item_vectors()  # (N+1, D)
    index, index_meta = build_index(table.cpu().numpy(), sha, kind, recall_queries, params)
    save_index(folder / INDEX_DIR, index, index_meta)
    meta = {"format_version": MODEL_FILE_VERSION, "shape": shape, "feature_version": feature_version,
            "item_keys": torch.from_numpy(items["item_key"].to_numpy().copy()), "extra": extra or {}, "sha256": sha}
    return Bundle(folder, model, meta, items, to_device(index, index_meta), index_meta, table)


def rebuild_index(folder: Path, kind: str = "auto", params: dict[str, Any] | None = None) -> IndexMeta:
    """(Re)build the index of the bundle in ``folder``, its recall measured with the bundle's queries.

    ``params``: FAISS parameters (HNSW ``M``, ``efConstruction``, ``efSearch``; IVF ``nlist``,
    ``nprobe``); the ones not given keep their defaults.
    """
    model, meta = load_model(folder / MODEL_FILE)
    queries_path = folder / RECALL_QUERIES_FILE
    queries = np.load(queries_path) if queries_path.exists() else None
    with torch.no_grad():
        vectors = model.item_vectors().numpy()
    index, index_meta = build_index(vectors, meta["sha256"], kind, queries, params)
    save_index(folder / INDEX_DIR, index, index_meta)
    return index_meta


def bundle_stamp(path: Path) -> tuple[int, ...]:
    """Changes when the bundle's model or index files are replaced: their sizes and mtimes (ns)."""
    out: list[int] = []
    for name in (MODEL_FILE, f"{INDEX_DIR}/index.json", f"{INDEX_DIR}/items.faiss"):
        try:
            st = (path / name).stat()
            out += [st.st_size, st.st_mtime_ns]
        except OSError:
            out += [-1, -1]
    return tuple(out)


def resolve_bundle(settings: Settings, ref: str | Path | None) -> Path:
    """The local bundle folder a command uses.

    ``ref``: None -> ``models:/attnrec@champion``; ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION`` -> downloaded from the MLflow registry (cached in the state
    folder); ``latest`` -> the newest local ``attnrec train`` run; otherwise a bundle
    folder, a run folder holding ``bundle/``, or a ``model.pt`` inside a bundle.
    """
    ref = str(ref) if ref is not None else f"models:/{settings.registry.model_name}@{settings.registry.champion_alias}"
    if ref.startswith("models:/"):
        from pipeline.registry.tracking import download_bundle

        return download_bundle(settings, ref)
    if ref == "latest":
        pointer = settings.runs_dir / "LATEST"
        if not pointer.exists():
            raise UserError(f"no trained model in {settings.runs_dir}: run `attnrec train` first")
        path = settings.runs_dir / pointer.read_text().strip()
    else:
        path = Path(ref).expanduser().resolve()
        if path.name == MODEL_FILE:
            path = path.parent
    if not (path / MODEL_FILE).exists() and (path / BUNDLE_DIR / MODEL_FILE).exists():
        path = path / BUNDLE_DIR
    if not (path / MODEL_FILE).exists():
        raise UserError(f"{path} is not a model bundle (no {MODEL_FILE})")
    return path
