"""FAISS inner-product index over a model's item vectors, saved next to the model.

Kinds: ``flat`` (exact, ``IndexFlatIP``) by default up to ``FLAT_MAX_ITEMS`` items, ``hnsw``
above that, ``ivf`` on request (or on a GPU for large catalogues). Index ids are the
model's item indices (1..N). The index runs on the GPU when ``faiss.get_num_gpus() > 0``
(flat and IVF; HNSW is CPU-only in FAISS) and on the CPU otherwise.

A catalogue too large for one device is split into ``shards`` (a parameter of every kind):
contiguous ranges of item indices, one FAISS index each, searched together by
``faiss.IndexShards`` (the per-shard top-k merged). On GPUs shard s goes to GPU s mod G, so G
GPUs hold 1/G of the catalogue each and search at once (a thread per shard); on the CPU the
shards are searched one after the other, as fast as one index: a thread per shard was 1.7x
slower at 1M items on 2 cores, its OpenMP pools competing (docs/benchmarks.md). A sharded flat
index is still exact.

On disk (``<model dir>/index/``): ``items.faiss`` (``items-<s>.faiss`` per shard; always the
CPU form), ``index.json`` with the model's sha256, the kind and parameters, and recall@10
against exact search measured at build time. Loading an index next to a different model is
refused.
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


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, end) ranges of rows 0..n-1, sizes within one of each other."""
    if not 1 <= shards <= max(n, 1):
        raise UserError(f"index parameter shards={shards}: must be between 1 and the number of items ({n:,})")
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def index_parts(index: faiss.Index) -> list[faiss.Index]:
    """The shards of a sharded index (``faiss.IndexShards``), or ``[index]``."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(s)) for s in range(index.count())]
    return [index]


def _joined(parts: list[faiss.Index], threaded: bool = False) -> faiss.Index:
    """One index searching ``parts`` (whose ids are already the item indices): the index itself
    when there is one, else an ``IndexShards`` that merges each part's top-k (``threaded``: a
    thread per part, for parts on separate GPUs)."""
    if len(parts) == 1:
        return parts[0]
    shards = faiss.IndexShards(parts[0].d, threaded, False)  # ids kept as given (not renumbered)
    for part in parts:
        shards.add_shard(part)  # the Python wrapper keeps a reference to ``part``
    return shards


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
    against exact search; without them, item vectors serve as queries. ``params["shards"]``
    (default 1) splits the items into that many shards, each an index of ``kind``.
    """
    started = time.perf_counter()
    vecs = np.ascontiguousarray(item_vectors[1:], dtype=np.float32)
    n, dim = vecs.shape
    kind = choose_kind(n, kind)
    params = dict(params or {})
    ranges = shard_ranges(n, params.setdefault("shards", 1))
    ids = np.arange(1, n + 1, dtype=np.int64)
    parts = []
    for start, end in ranges:
        part = _make(kind, dim, end - start, params)  # IVF's nlist: from the first shard's size, the same for all
        if kind == "ivf":
            part.train(vecs[start:end])
        part.add_with_ids(vecs[start:end], ids[start:end])
        parts.append(part)
    index = _joined(parts)
    meta = IndexMeta(kind, dim, n, model_sha256, params)
    meta.build_seconds = time.perf_counter() - started
    if kind != "flat" or len(parts) > 1:
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
    """Move a flat or IVF index to the GPUs when FAISS sees any (shard s to GPU s mod G; one
    shard: GPU 0); HNSW and every index without a GPU stay on the CPU."""
    if gpu_available() and meta.kind in ("flat", "ivf"):
        parts = index_parts(index)
        gpus = min(faiss.get_num_gpus(), len(parts))
        resources = [faiss.StandardGpuResources() for _ in range(gpus)]
        moved = [faiss.index_cpu_to_gpu(resources[s % gpus], s % gpus, part) for s, part in enumerate(parts)]
        meta.device = "cuda:" + ",".join(str(g) for g in range(gpus))
        return _joined(moved, threaded=True)
    meta.device = "cpu"
    return index


def save_index(directory: Path, index: faiss.Index, meta: IndexMeta) -> None:
    """Write ``items.faiss`` + ``index.json`` atomically (folder renamed into place)."""
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    parts = [faiss.index_gpu_to_cpu(part) if meta.device != "cpu" else part for part in index_parts(index)]
    for name, part in zip(shard_files(len(parts)), parts, strict=True):
        faiss.write_index(part, str(tmp / name))
    (tmp / "index.json").write_text(json.dumps(asdict(meta), indent=2))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)


def shard_files(shards: int) -> list[str]:
    """File names of an index of ``shards`` shards in its folder."""
    return ["items.faiss"] if shards == 1 else [f"items-{s}.faiss" for s in range(shards)]


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
    parts = [_read_part(directory / name) for name in shard_files(int(meta.params.get("shards", 1)))]
    index = _joined(parts)
    if index.ntotal != meta.num_items:
        where = directory / "items.faiss" if len(parts) == 1 else directory
        raise UserError(f"{where} holds {index.ntotal:,} items, not {meta.num_items:,}: rebuild it with "
                        f"`attnrec index --model {directory.parent}`")
    return to_device(index, meta), meta


def _read_part(path: Path) -> faiss.Index:
    """One saved index file (a whole index or one shard); a missing or damaged file is a ``UserError``."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unreadable"
        raise UserError(f"{path} is a damaged FAISS index ({reason}): rebuild it with `attnrec index --model {path.parent.parent}`") from None
