"""FAISS inner-product index over a model's item vectors, saved next to the model.

Kinds: ``flat`` (exact, ``IndexFlatIP``) by default up to ``FLAT_MAX_ITEMS`` items, ``hnsw``
above that, ``ivf`` on request (or on a GPU for large catalogues). Index ids are the
model's item indices (1..N). The index runs on the GPU when ``faiss.get_num_gpus() > 0``
(flat and IVF; HNSW is CPU-only in FAISS) and on the CPU otherwise.

On disk (``<model dir>/index/``): ``items.faiss`` (always the CPU form), ``index.json``
with the model's sha256, the kind and parameters, and recall@10 against exact search
measured at build time. Loading an index next to a different model is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import faiss
import numpy as np

from pipeline.config import IndexKind
from pipeline.errors import UserError

FLAT_MAX_ITEMS = 50_000
KINDS: tuple[str, ...] = get_args(IndexKind)


@dataclass
class IndexMeta:
    kind: str
    dim: int
    num_items: int
    model_sha256: str
    params: dict[str, Any] = field(default_factory=dict)
    recall_at_10: float = 1.0
    recall_queries: int = 0
    build_seconds: float = 0.0
    device: str = "cpu"


def gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # a CPU-only faiss build
        return False


def choose_kind(num_items: int, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise UserError(f"index kind must be one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if num_items <= FLAT_MAX_ITEMS else "hnsw"


def _make(kind: str, dim: int, n: int, params: dict[str, Any]) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        m = params.setdefault("M", 32)
        base = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = params.setdefault("efConstruction", 200)
        base.hnsw.efSearch = params.setdefault("efSearch", 128)
        return faiss.IndexIDMap2(base)
    nlist = params.setdefault("nlist", max(1, min(4096, int(4 * np.sqrt(n)))))
    quantizer = faiss.IndexFlatIP(dim)
    base = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    base.nprobe = params.setdefault("nprobe", max(1, nlist // 16))
    return faiss.IndexIDMap2(base)


def build_index(item_vectors: np.ndarray, model_sha256: str, kind: str = "auto",
                recall_queries: np.ndarray | None = None, params: dict[str, Any] | None = None) -> tuple[faiss.Index, IndexMeta]:
    """Index rows 1..N of ``item_vectors`` (N+1, D) (row 0 = padding is left out).

    ``recall_queries`` (Q, D): real query vectors (user states) for measuring recall@10
    against exact search; without them, item vectors serve as queries.
    """
    started = time.perf_counter()
    vecs = np.ascontiguousarray(item_vectors[1:], dtype=np.float32)
    n, dim = vecs.shape
    kind = choose_kind(n, kind)
    params = dict(params or {})
    index = _make(kind, dim, n, params)
    ids = np.arange(1, n + 1, dtype=np.int64)
    if kind == "ivf":
        index.train(vecs)
    index.add_with_ids(vecs, ids)
    meta = IndexMeta(kind, dim, n, model_sha256, params)
    meta.build_seconds = time.perf_counter() - started
    if kind != "flat":
        queries = recall_queries if recall_queries is not None else vecs[np.random.default_rng(0).choice(n, min(n, 1000), replace=False)]
        meta.recall_at_10, meta.recall_queries = recall_at_k(index, vecs, ids, np.ascontiguousarray(queries, dtype=np.float32), 10), len(queries)
    return index, meta


def recall_at_k(index: faiss.Index, vecs: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k (by inner product) that ``index`` returns."""
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    exact.add_with_ids(vecs, ids)
    k = min(k, len(ids))
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    hits = sum(len(set(t) & set(g)) for t, g in zip(truth.tolist(), got.tolist(), strict=True))
    return hits / truth.size


def to_device(index: faiss.Index, meta: IndexMeta) -> faiss.Index:
    """Move a flat or IVF index to GPU 0 when FAISS sees a GPU; others stay on the CPU."""
    if gpu_available() and meta.kind in ("flat", "ivf"):
        res = faiss.StandardGpuResources()
        meta.device = "cuda:0"
        return faiss.index_cpu_to_gpu(res, 0, index)
    meta.device = "cpu"
    return index


def save_index(directory: Path, index: faiss.Index, meta: IndexMeta) -> None:
    """Write ``items.faiss`` + ``index.json`` atomically (folder renamed into place)."""
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cpu_index = faiss.index_gpu_to_cpu(index) if meta.device != "cpu" else index
    faiss.write_index(cpu_index, str(tmp / "items.faiss"))
    (tmp / "index.json").write_text(json.dumps(asdict(meta), indent=2))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)


def read_index_meta(directory: Path) -> IndexMeta:
    """The description (``index.json``) of the index saved in ``directory``, without loading it."""
    meta_path = directory / "index.json"
    if not meta_path.exists():
        raise UserError(f"no index at {directory}: rebuild it with `attnrec index --model {directory.parent}`")
    try:
        return IndexMeta(**json.loads(meta_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{meta_path} is damaged ({exc}): rebuild the index with `attnrec index --model {directory.parent}`") from None


def load_index(directory: Path, model_sha256: str) -> tuple[faiss.Index, IndexMeta]:
    """Load the index saved for the model whose file hashes to ``model_sha256``."""
    meta = read_index_meta(directory)
    if meta.model_sha256 != model_sha256:
        raise UserError(
            f"the index at {directory} was built for model {meta.model_sha256[:12]}, not for the loaded model "
            f"{model_sha256[:12]}: rebuild it with `attnrec index`"
        )
    path = directory / "items.faiss"
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unreadable"
        raise UserError(f"{path} is a damaged FAISS index ({reason}): rebuild it with `attnrec index --model {directory.parent}`") from None
    if index.ntotal != meta.num_items:
        raise UserError(f"{path} holds {index.ntotal:,} items, not {meta.num_items:,}: rebuild it with "
                        f"`attnrec index --model {directory.parent}`")
    return to_device(index, meta), meta
