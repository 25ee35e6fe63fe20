"""Scaling curve: the pipeline's steps on a synthetic log, locally and on Ray with 1 and 2 workers.

For each size (``--sizes``, events) a deterministic synthetic log shaped like a real one is
written once as Parquet: users and items drawn from Zipf-like laws (user activity exponent
1.0 over ``events / 20`` users, item popularity exponent 1.0 over ``events / 100`` items, at
least 1,000 and at most 1M), times in time order over one year, and once more as
``CSV_FILES`` CSV files (consecutive slices, as a log delivered day by day). Then each step runs:

* ``ingest``: ``steps.ingest_events`` of the CSV files into a fresh warehouse: locally (one
  file after the other), and on Ray (``ray-2``: each file read and checked by a Ray task,
  two at a time on the 2-CPU cluster, committed in order by the driver, then copied into
  the partitioned event dataset, 16 buckets; into a state folder of its own, removed after);
* ``features``: ``steps.build_features``, locally, and on Ray (``ray-2``: the histories as one
  Ray task per user bucket of the partitioned event dataset, 16 buckets, the dataset's copy
  from the warehouse included in the time);
* ``train epoch``: one epoch of the training recipe plus its validation, ``train_sasrec``
  in this process (``local``), or on Ray Train with 1 and with 2 DDP workers
  (``train_sasrec_on_ray``); model: hidden size 64, max_len 50, full softmax (``--negatives N``:
  a sampled softmax over N negatives, for catalogues where the full one does not fit the time);
* ``test report``: ``evaluation_report`` of the bundle's model (below) on every test user,
  ranking the whole catalogue: in this process (``local``), or in 2 Ray tasks of one share
  of the users' batches each (``ray-2``, ``shares_on_ray``: what ``attnrec train`` does
  with ``train.workers = 2`` on the CPU); the JSON adds NDCG@10, equal on both;
* ``recommend-all``: top 10 for every user through ``steps.recommend_everyone``, locally, and
  on Ray with 1 and with 2 user partitions (one Ray task each), with the bundle the local
  training epoch wrote, or, where that step did not run, one of the untrained model (same
  shapes, same scoring work; written before the clock starts). Its index is ``--index``
  (default ``flat``, exact; ``auto`` is what ``attnrec train`` builds: HNSW above 50,000
  items), built before the clock starts where the bundle holds another kind.

Every run is its own child process (``--one``). Seconds are the wall clock of the step call
alone (imports outside), Ray's start-up of workers included; for training that is model
set-up, the epoch and validation. Rows/s: events (ingest, features), training windows per
second of the epoch's training pass alone (train epoch; the JSON adds the epoch's and its
validation's seconds), users (test report, recommend-all). Peak RSS is the
child's own ``ru_maxrss`` (the driver) and, for Ray, the largest resident size sampled every
0.2 s of each Ray worker process that ran the step (``ray::`` processes other than idle
ones). Ray runs use one ``ray start --head`` cluster on 127.0.0.1 (``--num-cpus 2``) per size.

    python bench/scale.py --sizes 1M --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SETTINGS = {"model.hidden_size": 64, "model.max_len": 50, "train.epochs": 1, "train.batch_size": 128,
            "registry.popularity_floor": False}
STEPS = (("ingest", "local"), ("ingest", "ray-2"), ("features", "local"), ("features", "ray-2"), ("train epoch", "local"),
         ("train epoch", "ray-1"), ("train epoch", "ray-2"), ("test report", "local"), ("test report", "ray-2"), ("recommend-all", "local"), ("recommend-all", "ray-1"),
         ("recommend-all", "ray-2"))
K = 10
CSV_FILES = 8  # the log as this many CSV files, for ingest


def parse_size(text: str) -> int:
    """``1M`` -> 1_000_000, ``250k`` -> 250_000."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def synthetic_log(events: int, path: Path, seed: int = 0) -> dict[str, int]:
    """Write ``events`` rows (user_id, item_id, timestamp) to ``path`` (Parquet); its shape."""
    import numpy as np
    import polars as pl

    users, items = max(1_000, min(1_000_000, events // 20)), max(1_000, min(1_000_000, events // 100))
    rng = np.random.default_rng(seed)

    def zipf(n: int, exponent: float, size: int) -> np.ndarray:
        weights = 1.0 / np.arange(1, n + 1) ** exponent
        return rng.choice(n, size=size, p=weights / weights.sum()) + 1

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        times = np.sort(rng.integers(1_704_067_200, 1_704_067_200 + 365 * 86_400, size=events))
        pl.DataFrame({"user_id": zipf(users, 1.0, events), "item_id": zipf(items, 1.0, events),
                      "timestamp": times}).write_parquet(path)
    parts = csv_folder(path)
    if not parts.exists():
        log = pl.read_parquet(path)
        staging = parts.with_name(parts.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        size = -(-len(log) // CSV_FILES)
        for i in range(CSV_FILES):
            log.slice(i * size, size).write_csv(staging / f"part-{i:03d}.csv")
        staging.rename(parts)
    return {"events": events, "users": users, "items": items}


def csv_folder(path: Path) -> Path:
    """The folder of the log's CSV files beside its Parquet file."""
    return path.with_name(path.stem + "-csv")


def run_step(step: str, engine: str, home: Path, data: Path, address: str, index_kind: str) -> dict[str, Any]:
    """One step in this process; (seconds, what it produced)."""
    from pipeline.app import steps
    from pipeline.config import load_settings

    workers = int(engine.split("-")[1]) if engine.startswith("ray") else 1
    ray = {"engine": "ray", "ray_address": address} if engine.startswith("ray") else {}
    settings = load_settings(home=home, **SETTINGS, **ray)
    if step == "ingest":
        files = sorted(csv_folder(data).glob("part-*.csv"))
        if engine != "local":  # a warehouse of its own: the local one feeds the later steps
            settings = load_settings(home=home.with_name(f"{home.name}-ingest-{engine}"), **SETTINGS, **ray)
            subprocess.run(["rm", "-rf", str(settings.home)], check=True)
        started = time.perf_counter()
        reports = steps.ingest_events(settings, files)
        seconds = time.perf_counter() - started
        if engine != "local":
            subprocess.run(["rm", "-rf", str(settings.home)], check=True)
        return {"seconds": seconds, "rows": sum(r.loaded for r in reports)}
    if step == "features":
        started = time.perf_counter()
        built = steps.build_features(settings, force=True)
        return {"seconds": time.perf_counter() - started, "rows": built["manifest"]["counts"]["events"]}
    if step == "train epoch":
        from pipeline.data.feature_store import current_feature_set, load_feature_set
        from pipeline.registry.model_store import write_bundle
        from pipeline.scale.training import train_sasrec_on_ray
        from pipeline.training.data_defaults import fit_to_data
        from pipeline.training.recipe import train_sasrec, validation_queries

        fs = load_feature_set(current_feature_set(settings))
        settings = fit_to_data(load_settings(home=home, **SETTINGS, **ray, **{"train.workers": workers}), fs)[0]
        started = time.perf_counter()
        if engine == "local":
            outcome = train_sasrec(settings, fs, progress=False)
        else:
            outcome = train_sasrec_on_ray(settings, fs)
        seconds = time.perf_counter() - started
        if engine == "local":  # the bundle recommend-all scores
            write_bundle(home / "bundle", outcome.model, outcome.shape, fs.items, fs.version,
                         validation_queries(outcome.model, fs), "flat")
        record = outcome.fit.history[0]  # the epoch itself: windows per second of the training pass
        return {"seconds": seconds, "rows": int(record.samples_per_s * record.seconds), "rows_per_s": record.samples_per_s,
                "epoch_seconds": record.seconds, "valid_seconds": record.valid_seconds,
                "valid_ndcg@10": outcome.valid["ndcg@10"]}
    if step == "test report":
        import torch

        from pipeline.data.feature_store import current_feature_set, load_feature_set
        from pipeline.registry.model_store import MODEL_FILE, load_model
        from pipeline.scale.cluster import ray_connection
        from pipeline.scale.evaluation import shares_on_ray
        from pipeline.training.evaluation import evaluation_report
        from pipeline.training.recipe import SasrecScorer

        if not (home / "bundle").exists():
            untrained_bundle(load_settings(home=home, **SETTINGS), home / "bundle")
        fs = load_feature_set(current_feature_set(settings))
        model, _ = load_model(home / "bundle" / MODEL_FILE, torch.device("cpu"))
        started = time.perf_counter()
        with ray_connection(settings) if ray else contextlib.nullcontext():
            report = evaluation_report(SasrecScorer(model), fs, "test", model.max_len, torch.device("cpu"),
                                       shares=(shares_on_ray, workers) if ray else None)
        return {"seconds": time.perf_counter() - started, "rows": report["users"], "test_ndcg@10": report["ndcg@10"]}
    if step == "recommend-all":
        from pipeline.registry.index import choose_kind, read_index_meta
        from pipeline.registry.model_store import INDEX_DIR

        settings = load_settings(home=home, **SETTINGS, **ray, **({"partitions": workers} if ray else {}))
        if not (home / "bundle").exists():  # no local training epoch ran at this size: an untrained model
            untrained_bundle(load_settings(home=home, **SETTINGS), home / "bundle")
        kind = choose_kind(read_index_meta(home / "bundle" / INDEX_DIR).num_items, index_kind)  # auto: by catalogue size
        index = steps.ensure_index(settings, kind, str(home / "bundle"))
        started = time.perf_counter()
        report = steps.recommend_everyone(settings, K, home / f"recs-{engine}.parquet", str(home / "bundle"), "recs")
        return {"seconds": time.perf_counter() - started, "rows": report["users"],
                "index": {"kind": index["kind"], "recall_at_10": index["recall_at_10"], "build_seconds": index["build_seconds"]}}
    raise ValueError(step)


def untrained_bundle(settings: Any, folder: Path) -> None:
    """A bundle (flat index) of the recipe's model as built, before any training step: the
    same shapes, so the same scoring work, as a trained one."""
    import torch

    from pipeline.data.feature_store import current_feature_set, load_feature_set
    from pipeline.registry.model_store import write_bundle
    from pipeline.training.recipe import training_setup, validation_queries

    fs = load_feature_set(current_feature_set(settings))
    setup = training_setup(settings, fs, torch.device("cpu"))
    write_bundle(folder, setup.model, setup.shape, fs.items, fs.version, validation_queries(setup.model, fs), "flat")


WORK_TITLES = ("ray::recommend_partition", "ray::RayTrainWorker", "ray::bucket_piece", "ray::stage_file",
               "ray::score_one_share")  # Ray worker processes that run a step's work


class RaySampler:
    """Largest resident size (MB) of each Ray worker process running a step's work (a task or
    a Ray Train worker, by ``WORK_TITLES``), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            out = subprocess.run(["ps", "-eo", "pid=,rss=,args="], capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, rss, args = line.split(None, 2)
                if args.startswith(WORK_TITLES):
                    self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0.0), int(rss) / 1024)

    def __enter__(self) -> RaySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def measure(step: str, engine: str, home: Path, data: Path, address: str, index_kind: str) -> dict[str, Any]:
    """``step`` on ``engine`` in a child process: its report, driver peak RSS and Ray worker peaks."""
    cmd = [sys.executable, __file__, "--one", step, engine, str(home), str(data), address, index_kind]
    with RaySampler() as sampler:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{step} on {engine} failed:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report["workers_peak_mb"] = sorted(round(v) for v in sampler.peaks.values())
    return report


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "bench/scale.py"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem / 1024 ** 2:.1f} GB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}; attnrec at {commit}"
            + (" (uncommitted changes)" if dirty else "") + f"; load average before: {os.getloadavg()[0]:.1f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        step, engine, home, data, address, index_kind = sys.argv[2:8]
        report = run_step(step, engine, Path(home), Path(data), address, index_kind)
        report["driver_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(report))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1M", help="comma-separated event counts, e.g. 1M,10M,50M")
    ap.add_argument("--work", type=Path, default=Path("/tmp/attnrec-scale"), help="data and state folders")
    ap.add_argument("--steps", default=",".join(dict.fromkeys(step for step, _ in STEPS)),
                    help="comma-separated steps to run (each needs the ones before it in the list)")
    ap.add_argument("--engines", default="local,ray-1,ray-2", help="comma-separated engines to run")
    ap.add_argument("--negatives", type=int, default=0,
                    help="train epoch: sampled softmax with this many negatives (train.negatives; 0: full softmax)")
    ap.add_argument("--index", default="flat", choices=("auto", "flat", "hnsw", "ivf"),
                    help="recommend-all: the bundle's FAISS index kind (rebuilt, untimed, where it differs)")
    ap.add_argument("--keep-home", action="store_true",
                    help="reuse the state folder of an earlier run (its warehouse, feature set and bundle)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.negatives:  # the children read it as a setting
        os.environ["ATTNREC_TRAIN__NEGATIVES"] = str(args.negatives)
    from pipeline.scale.cluster import local_cluster

    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {machine()}")
    rows = []
    header = ("| events | users | items | step | engine | seconds | rows/s | driver peak MB | Ray worker peaks MB |\n"
              "|-------:|------:|------:|------|--------|--------:|-------:|---------------:|---------------------|")
    print(header)
    for size in (parse_size(s) for s in args.sizes.split(",")):
        data = args.work / f"events-{size}.parquet"
        shape = synthetic_log(size, data)
        home = args.work / f"home-{size}"
        if not args.keep_home:
            subprocess.run(["rm", "-rf", str(home)], check=True)
        with local_cluster(num_cpus=2, object_store_bytes=500_000_000) as address:
            for step, engine in [(step, engine) for step, engine in STEPS
                                 if step in args.steps.split(",") and engine in args.engines.split(",")]:
                r = measure(step, engine, home, data, address, args.index)
                rate = r.get("rows_per_s") or (r["rows"] / r["seconds"] if r["seconds"] else 0.0)
                row = {**shape, "step": step, "engine": engine, **r, "rows_per_s": rate}
                rows.append(row)
                print(f"| {shape['events']:,} | {shape['users']:,} | {shape['items']:,} | {step} | {engine} | "
                      f"{r['seconds']:.1f} | {rate:,.0f} | {r['driver_peak_mb']:,} | "
                      f"{', '.join(map(str, r['workers_peak_mb'])) or '-'} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
