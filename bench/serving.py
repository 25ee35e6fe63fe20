"""Serving benchmark: top-10 latency and throughput of the one query path, in process and over HTTP, exact vs HNSW.

    python bench/serving.py                                   # ML-1M, 100k and 1M items (minutes)
    python bench/serving.py --sizes 3416,5000 --duration 2 --queries 200 --clients 8 --max-seconds 5   # smoke test

Only product code is timed (``pipeline.serving.query`` and the shells over it); this file
writes bundles, generates load and times. For each catalogue (``--sizes``) and index kind
(``--kinds``, default exact ``flat`` and ``hnsw``; ``KIND@S`` is that kind split into S shards,
``flat@4``) one run measures:

* **in process**: ``recommend(bundle, [history], k=10)`` (a batch of one, as the HTTP API per
  request), one query at a time after a warm-up: p50 / p99 / mean / max latency, queries/s,
  CPU ms per query; ``Bundle.load`` time; the same with ``explain=True``; and a breakdown
  from the query path's public calls: ``exclusion_mask`` (seen items, no filters), the
  encoder pass (``encode``), ``top_k`` on that vector, the whole
  ``recommend`` call and the rest (padding, lock, answer objects). torch and FAISS run with
  ``--threads`` threads (default 1), plus a short row with the libraries' default: on a busy
  machine each OpenMP region of a multi-threaded query can wait for a time slice;
* **recall@10** of HNSW against exact search: the index's own figure (``rebuild_index`` on
  the bundle's ``recall_queries.npy``: validation users for ML-1M, as ``attnrec train``
  writes it; 1,000 histories drawn like the benchmark's for synthetic catalogues), and of
  the served answer (top-10, seen items removed) against the flat bundle's answer to the
  same history;
* **HTTP**: the real server (``python -m pipeline.cli serve`` in a child process on
  127.0.0.1) driven by an asyncio + httpx load generator in this process, over loopback only:
  - *open loop*: Poisson arrivals at ``--rate`` req/s; latency is measured from each
    request's scheduled send time (no coordinated omission), so while the server keeps up
    it is service time plus HTTP overhead;
  - *closed loop*: ``--clients`` clients each sending their next request as soon as the last
    one is answered: maximum throughput; latency here is mostly queueing
    (Little's law: mean latency ~= clients / throughput);
  both bounded by ``--duration`` seconds (plus a short warm-up and drain) and by a cap on
  requests in flight. ``POST /recommendations`` with ad-hoc histories for every catalogue,
  and ``GET /users/{id}/recommendations`` (history from the warehouse) for ML-1M; an answer
  counts when it is HTTP 200;
* **batch**: ``Recommender(bundle, HistoryStore(db)).recommend_all(50)`` for every ML-1M user
  (warehouse read and scoring into a Polars frame; writing it out is not timed).

Catalogues: ``3416`` (or ``ml-1m``) is MovieLens-1M from ``../shared/data/ml-1m``
(ingested and featurised once into ``--workdir``; model from ``build_sasrec`` with the
default ``ModelSettings``; queries are real warehouse histories); any other size is a
synthetic catalogue with a pure-ID SASRec (``SASRecShape(use_content=False)``), Zipf(0.8)
item popularity and random histories of 50-200 items drawn by popularity. Models have the
default shape (hidden 128, max_len 200, 2 blocks, 1 head) and seeded random weights, unless
``--model DIR`` names a trained ML-1M bundle; latency does not depend on the weights, HNSW
recall does. A catalogue's bundle is written once by ``write_bundle`` (flat index); each
other kind's bundle hard-links its files and gets its index from ``rebuild_index``. All is
cached in ``--workdir`` and rebuilt only when its spec changes.

The load generator shares the machine's cores with the server; its CPU time per request is
reported next to the server's, and the 1-minute load average is shown for every phase.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from bench.quality import machine, prepare  # noqa: E402
from models.sasrec import SASRec  # noqa: E402
from pipeline.config import ModelSettings, load_settings  # noqa: E402
from pipeline.data.feature_store import load_feature_set  # noqa: E402
from pipeline.data.histories import HistoryStore  # noqa: E402
from pipeline.registry.index import IndexMeta, choose_kind, read_index_meta  # noqa: E402
from pipeline.registry.model_store import (  # noqa: E402
    INDEX_DIR,
    ITEMS_FILE,
    MODEL_FILE,
    RECALL_QUERIES_FILE,
    Bundle,
    SASRecShape,
    rebuild_index,
    write_bundle,
)
from pipeline.serving.query import Filters, encode, exclusion_mask, recommend, set_threads, top_k  # noqa: E402
from pipeline.serving.recommender import Recommender  # noqa: E402
from pipeline.training.batches import left_pad  # noqa: E402
from pipeline.training.recipe import build_sasrec, validation_queries  # noqa: E402

K = 10
BATCH_K = 50
ML1M = "ml-1m"
ML1M_ITEMS = 3416
SYNTH_SPEC_VERSION = 2            # bump when the synthetic generator changes (invalidates caches)
SYNTH_ZIPF = 0.8                  # item popularity exponent of synthetic catalogues
SYNTH_HISTORY = (50, 200)         # synthetic history lengths, uniform, inclusive
RECALL_QUERIES = 1000             # histories (drawn like the benchmark's) whose vectors are a synthetic bundle's recall queries
DEFAULT_THREADS_QUERIES = 50      # queries of the extra in-process row with the libraries' default threads
DRAIN_S = 10.0                    # how long finished load runs wait for requests in flight
REQUEST_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 900.0         # server start (a 1M-item bundle loads in tens of seconds)
PACKAGES = ("torch", "faiss-gpu", "faiss-cpu", "numpy", "fastapi", "uvicorn", "httpx", "pydantic")


# --------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int | str:
    """``ml-1m`` / ``3416`` -> ``"ml-1m"``; ``100k`` -> 100_000; ``1M`` -> 1_000_000."""
    text = text.strip().lower()
    if text == ML1M:
        return ML1M
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    n = int(float(text[:-1] if scale != 1 else text) * scale)
    return ML1M if n == ML1M_ITEMS else n


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3416,100000,1000000",
                    help="comma-separated catalogue sizes (k/M suffixes); 3416 or ml-1m = MovieLens-1M (default: %(default)s)")
    ap.add_argument("--kinds", default="flat,hnsw",
                    help="index kinds to compare; KIND@S: that kind in S shards, e.g. flat@4 (default: %(default)s)")
    ap.add_argument("--queries", type=int, default=2000, help="histories per catalogue; in-process queries per kind (default: %(default)s)")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="time bound of each in-process measurement (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=50, help="in-process warm-up queries (default: %(default)s)")
    ap.add_argument("--profile-queries", type=int, default=200,
                    help="queries of the breakdown, of explain=True and of the default-threads row (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op and FAISS OpenMP threads of the in-process measurement; 0 = the libraries' "
                         "default (default: %(default)s)")
    ap.add_argument("--batch-threads", type=int, default=0,
                    help="torch + FAISS threads of the batch run; 0 = the libraries' default, as `attnrec recommend-all` "
                         "(default: %(default)s)")
    ap.add_argument("--server-threads", type=int, default=0,
                    help="torch + FAISS threads per query in the server (ATTNREC_SERVE__THREADS); 0 = the server's "
                         "setting, serve.threads (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=50, help="HTTP closed-loop clients = connections (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds measured per HTTP run (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=100.0, help="open-loop request rate, req/s (default: %(default)s)")
    ap.add_argument("--skip-http", action="store_true", help="in-process and batch only")
    ap.add_argument("--skip-batch", action="store_true", help="no recommend_all run")
    ap.add_argument("--model", type=Path, default=None,
                    help="a trained ML-1M bundle folder (model.pt, items.parquet, index/) instead of random weights")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "serving",
                    help="state folders, bundles and indexes, server logs (reused) (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    args = ap.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in args.kinds:
        name, _, shards = kind.partition("@")
        if name not in ("flat", "hnsw", "ivf") or (shards and not shards.isdigit()):
            ap.error(f"unknown index kind {kind!r} (flat, hnsw or ivf, optionally @SHARDS)")
    args.workdir = args.workdir.expanduser().resolve()
    return args


# --------------------------------------------------------------------------------------------
# Catalogues: a source bundle and query histories


@dataclass
class Case:
    """One catalogue under test."""

    name: str                       # "ml-1m" or "synthetic-100k"
    items: int
    source: Path                    # a complete bundle; the bundles of the index kinds link its files
    bundles: Path                   # folder of the per-kind bundles
    home: Path                      # state folder the server runs with (its warehouse serves /users)
    queries: list[np.ndarray]       # model item indices, oldest first, no zeros
    user_ids: list[str] = field(default_factory=list)  # warehouse ids of the query users (ML-1M)
    weights: str = "random (seeded)"
    content: bool = False
    written: bool = False           # the source bundle was written by this run (not cached)


def size_label(n: int) -> str:
    for suffix, scale in (("M", 1_000_000), ("k", 1_000)):
        if n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def cached(folder: Path, spec: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a complete bundle written for ``spec``."""
    path = folder / "spec.json"
    return path.exists() and json.loads(path.read_text()) == spec and (folder / INDEX_DIR / "index.json").exists()


def write_spec(folder: Path, spec: dict[str, Any]) -> None:
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))


def ml1m_case(args: argparse.Namespace) -> Case:
    """MovieLens-1M: a random-weight bundle (or ``--model``) and real warehouse histories."""
    home = args.workdir / ML1M
    if not (home / "features" / "CURRENT").exists():
        print(f"  preparing {ML1M} in {home} (ingest + features, once) ...", flush=True)
        if home.exists():
            shutil.rmtree(home)
        started = time.perf_counter()
        prepare(home, ML1M)
        print(f"  prepared in {time.perf_counter() - started:.1f} s", flush=True)
    written = False
    if args.model is not None:
        source, bundles, weights = args.model.expanduser().resolve(), args.workdir / "bundles" / f"{ML1M}-model", f"trained ({args.model})"
        if not all((source / name).exists() for name in (MODEL_FILE, ITEMS_FILE, INDEX_DIR)):
            raise SystemExit(f"--model {source}: not a bundle folder (needs {MODEL_FILE}, {ITEMS_FILE} and {INDEX_DIR}/)")
    else:
        fs = load_feature_set(home / "features" / (home / "features" / "CURRENT").read_text().strip())
        bundles, weights = args.workdir / "bundles" / ML1M, "random (seeded)"
        source = bundles / "flat"
        ms = ModelSettings(max_len=200, dropout=0.2)  # the ML-1M benchmark shape, not the environment: hidden 128, 2 blocks
        spec = {"case": ML1M, "feature_set": fs.version, "seed": args.seed, "model": ms.model_dump(mode="json")}
        written = not cached(source, spec)
        if written:
            print(f"  writing the {ML1M} bundle (random weights, flat index) ...", flush=True)
            torch.manual_seed(args.seed)
            model, shape = build_sasrec(fs, ms)
            model.eval()
            write_bundle(source, model, shape, fs.items, fs.version, validation_queries(model, fs), kind="flat",
                         extra={"bench": "serving, random weights"})
            write_spec(source, spec)
        del fs
    bundle = Bundle.load(source)
    user_ids, key_lists = HistoryStore(load_settings(home=home).duckdb_path).all_histories()
    histories = [bundle.indices_of_keys(keys) for keys in key_lists]
    known = sum(int((h > 0).sum()) for h in histories) / max(1, sum(len(h) for h in histories))
    if known < 0.5:
        raise SystemExit(f"the model at {source} knows only {known:.0%} of the ML-1M items: is it an ML-1M model?")
    rng = np.random.default_rng(args.seed)
    usable = [i for i, h in enumerate(histories) if (h > 0).any()]
    pick = rng.permutation(usable)[:args.queries]
    return Case(ML1M, bundle.num_items, source, bundles, home,
                [histories[i][histories[i] > 0].astype(np.int64) for i in pick], [user_ids[i] for i in pick], weights,
                bundle.meta["shape"].use_content, written)


def synthetic_items(n: int, rng: np.random.Generator) -> pl.DataFrame:
    """The item table of a synthetic catalogue: Zipf popularity in a random order, one genre each."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** SYNTH_ZIPF
    counts = np.maximum(1, np.round(weights / weights.sum() * 100 * n)).astype(np.int64)[rng.permutation(n)]
    genres = np.array([f"genre-{g:02d}" for g in range(20)])
    keys = np.arange(1, n + 1, dtype=np.int64)
    return pl.DataFrame({
        "item_idx": keys.astype(np.int32), "item_key": keys, "item_id": keys.astype(str),
        "title": [f"synthetic item {i}" for i in keys], "g": genres[rng.integers(0, len(genres), n)],
        "train_count": counts,
    }).with_columns(pl.concat_list("g").alias("categories"))


def synthetic_histories(counts: np.ndarray, n_queries: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random histories of 50-200 items, drawn by popularity (duplicates removed, order kept)."""
    lengths = rng.integers(SYNTH_HISTORY[0], SYNTH_HISTORY[1] + 1, n_queries)
    draws = rng.choice(len(counts), size=int(lengths.sum()), p=counts / counts.sum()) + 1
    out = []
    for chunk in np.split(draws, np.cumsum(lengths)[:-1]):
        _, first = np.unique(chunk, return_index=True)
        out.append(chunk[np.sort(first)].astype(np.int64))
    return out


@torch.no_grad()
def user_vectors(model: SASRec, histories: list[np.ndarray], batch: int = 256) -> np.ndarray:
    """(Q, D) float32 query vectors of histories (newest ``max_len`` items, ``left_pad``ded), as served."""
    out = [model.user_vectors(torch.from_numpy(left_pad([h[-model.max_len:] for h in histories[s:s + batch]]))).numpy()
           for s in range(0, len(histories), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.dim), np.float32)


def synthetic_case(n: int, args: argparse.Namespace) -> Case:
    """A synthetic catalogue of ``n`` items (bundle written once, cached) and random histories."""
    name = f"synthetic-{size_label(n)}"
    bundles = args.workdir / "bundles" / name
    source = bundles / "flat"
    ms = ModelSettings(use_content=False, max_len=200, dropout=0.2)  # the benchmark shape
    shape = SASRecShape(num_items=n, dim=ms.hidden_size, max_len=ms.max_len, num_blocks=ms.num_blocks,
                        num_heads=ms.num_heads, dropout=ms.dropout, ff_mult=ms.ff_mult, use_content=False,
                        id_dropout=ms.id_dropout)
    spec = {"case": name, "seed": args.seed, "version": SYNTH_SPEC_VERSION, "shape": asdict(shape)}
    reuse = cached(source, spec)
    items = pl.read_parquet(source / ITEMS_FILE) if reuse else synthetic_items(n, np.random.default_rng(args.seed))
    counts = items.sort("item_idx")["train_count"].to_numpy().astype(np.float64)
    queries = synthetic_histories(counts, args.queries, np.random.default_rng(args.seed + 1))
    if not reuse:
        print(f"  writing the synthetic {n:,}-item bundle (flat index) ...", flush=True)
        torch.manual_seed(args.seed)
        model = shape.build().eval()
        recall_histories = synthetic_histories(counts, RECALL_QUERIES, np.random.default_rng(args.seed + 2))
        write_bundle(source, model, shape, items, f"synthetic-{n}-seed{args.seed}", user_vectors(model, recall_histories),
                     kind="flat", extra={"bench": "serving, synthetic catalogue, random weights"})
        write_spec(source, spec)
        del model
    home = args.workdir / "synthetic-home"  # no warehouse: the server answers POST /recommendations only
    home.mkdir(parents=True, exist_ok=True)
    return Case(name, n, source, bundles, home, queries, [], "random (seeded)", False, not reuse)


# --------------------------------------------------------------------------------------------
# Bundles: one folder per (catalogue, index kind), model, items and recall queries hard-linked from the source


@dataclass
class Build:
    case: str
    items: int
    kind: str
    path: Path
    params: dict[str, Any]
    build_s: float                  # index build (IndexMeta.build_seconds, recall measurement not included)
    reused: bool
    recall_at_10: float             # of the index on the bundle's recall queries (1.0 for flat)
    recall_queries: int
    model_mb: float


def bundle_index_meta(folder: Path) -> IndexMeta | None:
    """The bundle's index description, or None when it has no index yet."""
    return read_index_meta(folder / INDEX_DIR) if (folder / INDEX_DIR / "index.json").exists() else None


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` (a hard link, else a copy); removed when there is no ``src``."""
    dst.unlink(missing_ok=True)
    if not src.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_kind(case: Case, kind: str) -> Build:
    """The bundle of ``case`` with a ``kind`` index: the source itself when its index is that
    kind, else a folder linking the source's files whose index ``rebuild_index`` builds (kept
    while it was built for the same model file and the source was not rewritten)."""
    source_meta = bundle_index_meta(case.source)
    assert source_meta is not None, case.source
    base_kind, _, shards_text = kind.partition("@")
    shards = int(shards_text or 1)
    folder = case.source if source_meta.kind == kind else case.bundles / kind
    meta = bundle_index_meta(folder)
    reused = (not case.written and meta is not None and meta.kind == base_kind and meta.params.get("shards", 1) == shards
              and meta.model_sha256 == source_meta.model_sha256)
    if folder != case.source:
        folder.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, ITEMS_FILE, RECALL_QUERIES_FILE):
            link_or_copy(case.source / name, folder / name)
        if not reused:
            print(f"  building the {kind} index of {case.name} ...", flush=True)
            meta = rebuild_index(folder, base_kind, params={"shards": shards})
            gc.collect()
    assert meta is not None
    return Build(case.name, case.items, kind, folder, meta.params, meta.build_seconds, reused, meta.recall_at_10,
                 meta.recall_queries, (folder / MODEL_FILE).stat().st_size / 1e6)


# --------------------------------------------------------------------------------------------
# In-process latency


def summarize(latencies_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / max in ms."""
    if not latencies_s:
        return {"n": 0, "p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(latencies_s) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": len(a), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(a.mean()), "max_ms": float(a.max())}


@dataclass
class InProcess:
    case: str
    items: int
    kind: str
    explain: bool
    threads: int
    latency: dict[str, float]
    qps: float
    cpu_ms_per_query: float
    load_s: float
    load_avg: float


def time_queries(bundle: Bundle, queries: list[np.ndarray], limit: int, max_seconds: float, warmup: int,
                 explain: bool) -> tuple[dict[str, float], float, float, list[list[str]]]:
    """Sequential ``recommend`` calls, one history each: (latency summary, queries/s, CPU ms/query, answers)."""
    for h in queries[-warmup:] if warmup else []:
        recommend(bundle, [h], K, explain=explain)
    latencies, answers = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = wall0 + max_seconds
    for h in queries[:limit]:
        t = time.perf_counter()
        if t >= deadline:
            break
        answer = recommend(bundle, [h], K, explain=explain)[0]
        latencies.append(time.perf_counter() - t)
        answers.append([r.item_id for r in answer.recommendations])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = max(1, len(latencies))
    return summarize(latencies), len(latencies) / wall, cpu / n * 1e3, answers


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op and FAISS OpenMP threads (0: leave as is)."""
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    if n:
        set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


@torch.no_grad()
def breakdown(bundle: Bundle, queries: list[np.ndarray], n: int) -> dict[str, float]:
    """Median ms of the public pieces of one query, timed one by one on the same history."""
    steps: dict[str, list[float]] = {"seen mask": [], "encoder": [], "top_k": [], "recommend": [], "rest": []}
    for h in queries[:n]:
        t0 = time.perf_counter()
        mask = exclusion_mask(bundle, h, Filters())
        t1 = time.perf_counter()
        _, states = encode(bundle, [h])
        user = np.ascontiguousarray(states[:, -1].cpu().numpy(), dtype=np.float32)
        t2 = time.perf_counter()
        top_k(bundle, user, [mask], K)
        t3 = time.perf_counter()
        recommend(bundle, [h], K)
        t4 = time.perf_counter()
        for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, (t4 - t3) - (t3 - t0)), strict=True):
            steps[name].append(dt)
    return {name: float(np.median(v) * 1e3) if v else float("nan") for name, v in steps.items()}


@dataclass
class Recall:
    case: str
    items: int
    kind: str
    index_recall_at_10: float
    index_queries: int
    served_recall_at_10: float
    served_queries: int


def served_recall(answers: list[list[str]], exact: list[list[str]]) -> tuple[float, int]:
    """Mean share of the exact answer's items in the approximate answer (same histories)."""
    pairs = [(a, e) for a, e in zip(answers, exact, strict=False) if e]
    if not pairs:
        return float("nan"), 0
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in pairs])), len(pairs)


def measure_in_process(case: Case, builds: list[Build], args: argparse.Namespace
                       ) -> tuple[list[InProcess], list[Recall], dict[str, dict[str, float]]]:
    """Latency per kind, explain latency, breakdown and recall against the flat answers.

    Measured with ``--threads`` torch + FAISS threads; when that is not the default, a
    short extra run (``--profile-queries``) with the default shows what the setting changes.
    """
    rows, recalls, stages = [], [], {}
    exact_answers: list[list[str]] | None = None
    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    n_prof = min(args.profile_queries, args.queries)
    for b in sorted(builds, key=lambda b: b.kind != "flat"):  # flat first: its answers are the truth
        gc.collect()
        t = time.perf_counter()
        bundle = Bundle.load(b.path)
        load_s = time.perf_counter() - t

        def row(bundle: Bundle, explain: bool, n_threads: int, limit: int, warmup: int, max_seconds: float) -> list[list[str]]:
            with compute_threads(n_threads):
                lat, qps, cpu, answers = time_queries(bundle, case.queries, limit, max_seconds, warmup, explain)
            rows.append(InProcess(case.name, case.items, b.kind, explain, n_threads, lat, qps, cpu, load_s, os.getloadavg()[0]))
            print(f"  in process {b.kind}{' explain' if explain else ''} (threads={n_threads}): p50 {lat['p50_ms']:.2f} ms "
                  f"p99 {lat['p99_ms']:.2f} ms over {lat['n']} queries ({qps:,.0f}/s)", flush=True)
            return answers

        answers = row(bundle, False, threads, args.queries, args.warmup, args.max_seconds)
        if threads != default_threads:  # bounded: on a busy machine this can take ~100x longer per query
            row(bundle, False, default_threads, min(n_prof, DEFAULT_THREADS_QUERIES), min(10, args.warmup), min(10.0, args.max_seconds))
        with compute_threads(threads):
            stages[b.kind] = breakdown(bundle, case.queries, n_prof)
        row(bundle, True, threads, n_prof, min(5, args.warmup), args.max_seconds)
        if b.kind == "flat":
            exact_answers = answers
        else:
            served, n_served = served_recall(answers, exact_answers) if exact_answers else (float("nan"), 0)
            recalls.append(Recall(case.name, case.items, b.kind, b.recall_at_10, b.recall_queries, served, n_served))
        del bundle
    gc.collect()
    return rows, recalls, stages


# --------------------------------------------------------------------------------------------
# Batch scoring


@dataclass
class Batch:
    case: str
    kind: str
    threads: int
    users: int
    fallback_users: int
    rows: int
    k: int
    seconds: float
    users_per_s: float
    load_avg: float


def measure_batch(case: Case, build: Build, args: argparse.Namespace) -> Batch:
    """``Recommender.recommend_all`` for every warehouse user (the frame ``attnrec recommend-all`` writes)."""
    recommender = Recommender(Bundle.load(build.path), HistoryStore(load_settings(home=case.home).duckdb_path))
    with compute_threads(args.batch_threads):
        threads = torch.get_num_threads()
        started = time.perf_counter()
        frame = recommender.recommend_all(BATCH_K)
        seconds = time.perf_counter() - started
    users = frame["user_id"].n_unique()
    fallback = frame.filter(pl.col("fallback").is_not_null())["user_id"].n_unique()
    del recommender
    gc.collect()
    return Batch(case.name, build.kind, threads, users, fallback, frame.height, BATCH_K, seconds, users / seconds,
                 os.getloadavg()[0])



# --------------------------------------------------------------------------------------------
# HTTP: the real server in a child process, an asyncio + httpx load generator here


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes | None = None


JSON_HEADERS = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``python -m pipeline.cli serve --model DIR`` on 127.0.0.1 (a context manager)."""

    def __init__(self, bundle: Path, home: Path, log: Path, threads: int = 0) -> None:
        self.bundle, self.home, self.log, self.threads = bundle, home, log, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if k not in ("ATTNREC_API_TOKEN", "ATTNREC_SERVE__API_TOKEN")}
        if self.threads:
            env["ATTNREC_SERVE__THREADS"] = str(self.threads)
        cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(self.bundle), "--home", str(self.home),
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(started)
        except BaseException:
            self.__exit__()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def _wait_ready(self, started: float) -> None:
        with httpx.Client(base_url=self.url, trust_env=False, timeout=2.0) as client:
            while time.perf_counter() - started < STARTUP_TIMEOUT_S:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}); log {self.log}:\n"
                                       + self.log.read_text()[-3000:])
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {STARTUP_TIMEOUT_S:.0f} s (log {self.log})")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def rss_mb(self) -> float:
        return proc_rss_mb(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


@dataclass
class LoadResult:
    """What one load run observed: (start, end, error or None) of every request sent in the window."""

    window: tuple[float, float] = (0.0, 0.0)          # measured window (perf_counter)
    records: list[tuple[float, float, str | None]] = field(default_factory=list)
    dropped: int = 0                                  # open loop: not sent, too many in flight
    total_sent: int = 0                               # including warm-up
    send_lags: list[float] = field(default_factory=list)  # open loop: how late sends left

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]


def make_client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S, trust_env=False)


async def send(client: httpx.AsyncClient, req: Request) -> str | None:
    """None when answered 200, else a short error text."""
    try:
        r = await client.request(req.method, req.path, content=req.body, headers=JSON_HEADERS if req.body else None)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:150]}"


async def closed_loop(url: str, reqs: list[Request], clients: int, duration: float, warmup: float) -> LoadResult:
    """``clients`` workers, each sending its next request when the last is answered."""
    res = LoadResult()
    counter = itertools.count()
    async with make_client(url, clients) as client:
        res.window = (time.perf_counter() + warmup, time.perf_counter() + warmup + duration)

        async def worker() -> None:
            while (t := time.perf_counter()) < res.window[1]:
                err = await send(client, reqs[next(counter) % len(reqs)])
                res.total_sent += 1
                if res.in_window(t):
                    res.records.append((t, time.perf_counter(), err))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return res


async def open_loop(url: str, reqs: list[Request], rate: float, duration: float, warmup: float, connections: int,
                    seed: int) -> LoadResult:
    """Poisson arrivals at ``rate``; latency from each request's scheduled time, not its send time."""
    res = LoadResult()
    rng = np.random.default_rng(seed)
    span = warmup + duration
    offsets = np.cumsum(rng.exponential(1.0 / rate, int(rate * span * 1.5) + 20))
    offsets = offsets[offsets < span]
    cap = 20 * connections
    inflight: set[asyncio.Task[None]] = set()
    async with make_client(url, connections) as client:
        start = time.perf_counter() + 0.01
        res.window = (start + warmup, start + span)

        async def one(req: Request, due: float) -> None:
            err = await send(client, req)
            if res.in_window(due):
                res.records.append((due, time.perf_counter(), err))

        for i, offset in enumerate(offsets):
            due = start + float(offset)
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= cap:
                res.dropped += res.in_window(due)
                continue
            res.total_sent += 1
            if res.in_window(due):
                res.send_lags.append(time.perf_counter() - due)
            task = asyncio.create_task(one(reqs[i % len(reqs)], due))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            _, pending = await asyncio.wait(set(inflight), timeout=DRAIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            now = time.perf_counter()
            res.records += [(res.window[0], now, f"not answered within {DRAIN_S:.0f} s after the run")] * len(pending)
    return res


@dataclass
class HttpRun:
    case: str
    items: int
    kind: str
    endpoint: str
    mode: str
    clients: int
    rate: float | None
    duration_s: float
    sent: int
    ok: int
    errors: int
    dropped: int
    latency: dict[str, float]
    throughput_rps: float             # answered (200) with the answer arriving inside the window, per second
    sent_rps: float
    send_lag_p99_ms: float | None
    client_cpu_ms_per_req: float
    server_cpu_ms_per_req: float
    server_rss_mb: float
    server_startup_s: float
    load_avg: float
    first_error: str | None

    @property
    def kept_up(self) -> bool:
        """Open loop: nothing dropped or failed, and answers left as fast as requests came."""
        return self.dropped == 0 and self.errors == 0 and self.throughput_rps >= 0.95 * self.sent_rps


def run_load(server: Server, case: Case, kind: str, endpoint: str, mode: str, reqs: list[Request],
             args: argparse.Namespace) -> HttpRun:
    """One bounded load run against ``server``, with client and server CPU accounted."""
    warmup = max(0.5, min(2.0, args.duration / 5))
    cpu_client, cpu_server = time.process_time(), server.cpu_seconds()
    if mode == "closed":
        res = asyncio.run(closed_loop(server.url, reqs, args.clients, args.duration, warmup))
    else:
        res = asyncio.run(open_loop(server.url, reqs, args.rate, args.duration, warmup, args.clients, args.seed))
    cpu_client, cpu_server = time.process_time() - cpu_client, server.cpu_seconds() - cpu_server
    total = max(1, res.total_sent)
    ok = [(s, e) for s, e, err in res.records if err is None]
    errors = [err for _, _, err in res.records if err is not None]
    lags = np.asarray(res.send_lags) * 1e3
    run = HttpRun(case.name, case.items, kind, endpoint, mode, args.clients, args.rate if mode == "open" else None,
                  args.duration, len(res.records), len(ok), len(errors), res.dropped, summarize([e - s for s, e in ok]),
                  sum(res.in_window(e) for _, e in ok) / args.duration, len(res.records) / args.duration,
                  float(np.percentile(lags, 99)) if len(lags) else None,
                  cpu_client / total * 1e3, cpu_server / total * 1e3, server.rss_mb(), server.startup_s,
                  os.getloadavg()[0], errors[0] if errors else None)
    print(f"  HTTP {kind} {endpoint} {mode}: p50 {run.latency['p50_ms']:.1f} ms p99 {run.latency['p99_ms']:.1f} ms "
          f"{run.throughput_rps:,.0f} req/s, {run.errors} errors, {run.dropped} dropped", flush=True)
    return run


def http_requests(case: Case, item_ids: list[str]) -> dict[str, list[Request]]:
    """Request mixes per endpoint: ad-hoc histories (POST) and, with a warehouse, users (GET)."""
    posts = [Request("POST", "/recommendations", json.dumps({"items": [item_ids[i - 1] for i in h.tolist()], "k": K}).encode())
             for h in case.queries]
    out = {"POST /recommendations": posts}
    if case.user_ids:
        out["GET /users/{id}/recommendations"] = [Request("GET", f"/users/{u}/recommendations?k={K}") for u in case.user_ids]
    return out


def measure_http(case: Case, builds: list[Build], args: argparse.Namespace) -> list[HttpRun]:
    """Open loop, then closed loop, per endpoint, with one server per index kind."""
    item_ids = pl.read_parquet(case.source / ITEMS_FILE, columns=["item_idx", "item_id"]).sort("item_idx")["item_id"].to_list()
    mixes = http_requests(case, item_ids)
    del item_ids
    runs = []
    for b in builds:
        try:
            with Server(b.path, case.home, args.workdir / "logs" / f"serve-{case.name}-{b.kind}.log", args.server_threads) as server:
                print(f"  server {b.kind} up in {server.startup_s:.1f} s ({server.rss_mb():,.0f} MB RSS)", flush=True)
                for endpoint, reqs in mixes.items():
                    for mode in ("open", "closed"):
                        runs.append(run_load(server, case, b.kind, endpoint, mode, reqs, args))
        except RuntimeError as exc:  # a server that did not start: report it, go on with the rest
            print(f"  HTTP {case.name} {b.kind} skipped: {exc}", file=sys.stderr, flush=True)
    return runs


# --------------------------------------------------------------------------------------------
# Report


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def package_versions() -> str:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_report(res: dict[str, Any], args: argparse.Namespace) -> None:
    """One Markdown table per section, then the goal lines."""
    print("\n## Bundles\n")
    print(markdown_table(
        ["catalogue", "items", "index", "params", "model MB", "index build s", "index recall@10 (recall queries)"],
        [[b.case, f"{b.items:,}", b.kind, ", ".join(f"{k}={v}" for k, v in b.params.items()) or "-", fmt(b.model_mb, 0),
          fmt(b.build_s, 1) + (" (cached)" if b.reused else ""),
          f"{fmt(b.recall_at_10, 4)} ({b.recall_queries})" if b.kind != "flat" else "exact"] for b in res["builds"]]))
    print(f"\n## In process: `recommend(bundle, [history], k={K})`, one caller, one query at a time\n")
    print(markdown_table(
        ["catalogue", "items", "index", "explain", "threads", "queries", "p50 ms", "p99 ms", "mean ms", "max ms",
         "queries/s", "CPU ms/query", "bundle load s", "load"],
        [[r.case, f"{r.items:,}", r.kind, "yes" if r.explain else "no", str(r.threads), str(r.latency["n"]), fmt(r.latency["p50_ms"]),
          fmt(r.latency["p99_ms"]), fmt(r.latency["mean_ms"]), fmt(r.latency["max_ms"]), fmt(r.qps, 0),
          fmt(r.cpu_ms_per_query), fmt(r.load_s, 1), fmt(r.load_avg, 1)] for r in res["in_process"]]))
    stage_names = next((list(st) for per in res["stages"].values() for st in per.values()), [])
    print(f"\n## In process: median ms of the public pieces of a query ({min(args.profile_queries, args.queries)} queries, "
          f"threads={args.threads or 'default'}; seen mask = `exclusion_mask`, encoder = `encode`, `top_k` on one "
          f"vector, the whole `recommend`, rest = recommend minus the three)\n")
    print(markdown_table(
        ["catalogue", "index", *stage_names],
        [[case, kind, *(fmt(v, 3) for v in st.values())] for case, per in res["stages"].items() for kind, st in per.items()]))
    if res["recall"]:
        print("\n## Recall@10 against exact search\n")
        print(markdown_table(
            ["catalogue", "items", "index", "index recall@10 (bundle's recall queries)", "queries",
             "served top-10 recall (seen removed)", "queries"],
            [[r.case, f"{r.items:,}", r.kind, fmt(r.index_recall_at_10, 4), str(r.index_queries), fmt(r.served_recall_at_10, 4),
              str(r.served_queries)] for r in res["recall"]]))
    if res["http"]:
        print(f"\n## HTTP over loopback ({args.duration:g} s per run; open loop: Poisson {args.rate:g} req/s, "
              f"latency from scheduled send; closed loop: {args.clients} clients back to back)\n")
        print(markdown_table(
            ["catalogue", "index", "endpoint", "load model", "sent", "errors", "dropped", "p50 ms", "p99 ms", "max ms",
             "answered/s", "send lag p99 ms", "client CPU ms/req", "server CPU ms/req", "server RSS MB", "load"],
            [[r.case, r.kind, r.endpoint, f"open {r.rate:g}/s" if r.mode == "open" else f"closed x{r.clients}", str(r.sent),
              str(r.errors), str(r.dropped), fmt(r.latency["p50_ms"], 1), fmt(r.latency["p99_ms"], 1),
              fmt(r.latency["max_ms"], 1), fmt(r.throughput_rps, 0), fmt(r.send_lag_p99_ms, 1), fmt(r.client_cpu_ms_per_req),
              fmt(r.server_cpu_ms_per_req), fmt(r.server_rss_mb, 0), fmt(r.load_avg, 1)] for r in res["http"]]))
        print("\nclosed loop, Little's law check (clients / answered per s vs mean latency): " + "; ".join(
            f"{r.case} {r.kind} {r.endpoint.split()[0]}: {r.clients / r.throughput_rps * 1e3:,.0f} ms vs "
            f"{r.latency['mean_ms']:,.0f} ms" for r in res["http"] if r.mode == "closed" and r.throughput_rps > 0))
        errs = [f"{r.case} {r.kind} {r.endpoint} {r.mode}: {r.first_error}" for r in res["http"] if r.first_error]
        if errs:
            print("first errors: " + " | ".join(errs))
    if res["batch"]:
        b = res["batch"]
        print(f"\n## Batch: `Recommender.recommend_all(k={b.k})`, every user (warehouse read + scoring into a frame)\n")
        print(markdown_table(["catalogue", "index", "threads", "users", "by popularity", "rows", "seconds", "users/s", "load"],
                             [[b.case, b.kind, str(b.threads), f"{b.users:,}", f"{b.fallback_users:,}", f"{b.rows:,}",
                               fmt(b.seconds), fmt(b.users_per_s, 0), fmt(b.load_avg, 1)]]))
    print("\n## Goals\n")
    for line in goal_lines(res, args):
        print(line)


def goal_lines(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """In process top-10 p99 <= 5 ms at 100k items; HTTP p99 <= 20 ms at 50 concurrent clients."""
    lines = []
    for r in res["in_process"]:
        if r.explain or r.threads != (args.threads or r.threads):
            continue
        default = " (the default index)" if choose_kind(r.items) == r.kind else ""
        scope = "" if r.items == 100_000 else " (goal stated at 100k)"
        ok = r.latency["p99_ms"] <= 5.0
        lines.append(f"in process p99 <= 5 ms, {r.case} {r.kind}{default}: {fmt(r.latency['p99_ms'])} ms, "
                     f"{'met' if ok else 'missed'}{scope}")
    for r in res["http"]:
        if r.mode == "closed":
            ok = r.latency["p99_ms"] <= 20.0 and r.errors == 0
            scope = "" if r.clients == 50 else f" (goal stated at 50 clients, ran {r.clients})"
            lines.append(f"HTTP p99 <= 20 ms at {r.clients} closed-loop clients, {r.case} {r.kind} {r.endpoint}: "
                         f"{fmt(r.latency['p99_ms'], 1)} ms, {'met' if ok else 'missed'}{scope}")
        else:
            lines.append(f"HTTP open loop at {r.rate:g} req/s, {r.case} {r.kind} {r.endpoint}: p99 {fmt(r.latency['p99_ms'], 1)} ms"
                         f" ({'server kept up' if r.kept_up else 'server did NOT keep up: latency includes a growing queue'})")
    return lines


def notes(cases: list[Case], args: argparse.Namespace) -> list[str]:
    """How the figures were taken: threads, models, histories, load generator."""
    default = torch.get_num_threads()
    out = [f"top-{K}, exclude_seen=true, no other filters; index on the CPU unless faiss sees a GPU",
           f"in process: {args.threads or default} torch intra-op + FAISS OpenMP thread(s) (--threads; the default "
           f"here is {default}, shown in an extra row with up to "
           f"{min(args.profile_queries, args.queries, DEFAULT_THREADS_QUERIES)} queries); one query "
           f"at a time from the main thread; Python's GC left on; with several threads on a busy machine every OpenMP "
           f"region of a query can wait for a scheduler time slice (compare the rows)",
           f"server: {args.server_threads or 'serve.threads (default 1)'} torch + FAISS thread(s) per query "
           f"(--server-threads); FastAPI runs each query in a worker thread, serialised by the bundle's lock"]
    for c in cases:
        lens = np.array([len(q) for q in c.queries] or [0])
        out.append(f"{c.name}: {c.items:,} items, weights {c.weights}, content features {'on' if c.content else 'off'}, "
                   f"{len(c.queries):,} query histories (length median {np.median(lens):.0f}, max {lens.max():,}; "
                   f"the encoder reads the newest 200)")
    out.append("random weights: latency does not depend on the weights, HNSW recall does (random item vectors are "
               "close to i.i.d. Gaussian, a hard case for graph search; a trained model's recall can differ)")
    out.append("synthetic catalogues use a pure-ID SASRec; the item table is computed once at load for every model, so "
               "content features change load time, not the query path")
    if not args.skip_http:
        out.append(f"HTTP: `python -m pipeline.cli serve` (uvicorn, 1 worker) on 127.0.0.1; load generator: asyncio + "
                   f"httpx in this process on the same {os.cpu_count()} cores, its CPU per request shown next to the "
                   f"server's; closed-loop latency with {args.clients} clients is queueing (Little's law), the open-loop "
                   f"run shows latency below saturation; server logs in {args.workdir / 'logs'}")
    return out


# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"command: python bench/serving.py {shlex.join(argv)}")
    print(f"machine: {machine()}; {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM; "
          f"1-min load average at start {os.getloadavg()[0]:.1f}")
    print(f"versions: {package_versions()}; attnrec at {git_commit()}")
    print(f"workdir: {args.workdir}", flush=True)
    res: dict[str, Any] = {"builds": [], "in_process": [], "stages": {}, "recall": [], "http": [], "batch": None}
    cases = []
    for size in args.sizes:
        print(f"\n# {size if size == ML1M else f'{size:,} items'}", flush=True)
        case = ml1m_case(args) if size == ML1M else synthetic_case(size, args)
        cases.append(case)
        builds = [build_kind(case, kind) for kind in args.kinds]
        res["builds"] += builds
        rows, recalls, stages = measure_in_process(case, builds, args)
        res["in_process"] += rows
        res["recall"] += recalls
        res["stages"][case.name] = stages
        if case.name == ML1M and not args.skip_batch:
            res["batch"] = measure_batch(case, builds[0], args)
            print(f"  batch: {res['batch'].users:,} users in {res['batch'].seconds:.1f} s", flush=True)
        if not args.skip_http:
            res["http"] += measure_http(case, builds, args)
        gc.collect()
    print("\n## Notes\n")
    for line in notes(cases, args):
        print(f"- {line}")
    print_report(res, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        write_json(args.json, argv, args, cases, res)
        print(f"results: {args.json}")


def write_json(path: Path, argv: list[str], args: argparse.Namespace, cases: list[Case], res: dict[str, Any]) -> None:
    """Everything printed, as JSON (dataclasses as dicts)."""
    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(v) for v in value]
        return asdict(value) if hasattr(value, "__dataclass_fields__") else value

    dump = {"command": ["python", "bench/serving.py", *argv], "machine": machine(), "versions": package_versions(),
            "commit": git_commit(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "notes": notes(cases, args), **{k: plain(v) for k, v in res.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dump, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
