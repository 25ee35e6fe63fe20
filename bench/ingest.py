"""Ingest benchmark: attnrec's ``ingest_paths`` against a hand-written pandas load, same run.

For each size (``--sizes``) and format (``--formats``) this measures, on the same synthetic
event log:

* ``attnrec`` first load: ``pipeline.data.ingest.ingest_paths`` into a fresh warehouse in a fresh
  state folder (format detection, validation, quarantine, exactly-once dedup, one transaction);
* ``attnrec`` re-delivery: a second ``ingest_paths`` into that same warehouse of the *same rows*
  re-exported with the columns in another order (different bytes, so the identical-file
  shortcut does not apply and every row goes through the dedup-against-warehouse path);
* ``pandas``: what a user would write by hand: ``pd.read_csv`` / ``pd.read_parquet`` (pyarrow
  engine), drop rows missing user/item/time, ``drop_duplicates`` on (user, item, time), then
  ``CREATE TABLE events AS SELECT * FROM df`` in a fresh DuckDB file.

Every run is its own child process (``--one``), so its peak RSS (``ru_maxrss`` of the child
itself) belongs to that configuration only. The child reads its own ``RUSAGE_SELF``: the
parent's ``RUSAGE_CHILDREN`` would report the largest of all children reaped so far. Seconds are the wall clock of the load call alone:
imports, opening the database and data generation are outside the timer; the input file is read
once beforehand so every tool starts from a warm page cache. Events/s = rows in the file /
seconds.

Run ``python bench/ingest.py --help`` for the options; ``make bench`` runs the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("csv", "parquet")
KEY = ["user_id", "item_id", "timestamp"]          # the identity pandas deduplicates on
COLUMNS = ["user_id", "item_id", "timestamp", "rating"]
REEXPORT_COLUMNS = ["item_id", "user_id", "rating", "timestamp"]  # same rows, other bytes
N_USERS = 200_000
N_ITEMS = 100_000
T_START = 1_704_067_200                            # 2024-01-01T00:00:00Z
T_SPAN = 365 * 86_400
PARQUET_ROW_GROUP = 1_000_000
PACKAGES = ("duckdb", "polars", "pandas", "pyarrow", "numpy")
INGEST_CODE = ("pipeline/data/ingest.py", "pipeline/data/ingest_formats.py", "pipeline/data/warehouse.py", "pipeline/errors.py")
BUSY_LOAD = 0.5                                    # 1-minute load average above which we warn


# --------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """``1M`` -> 1_000_000, ``250k`` -> 250_000, ``5000`` -> 5000."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def size_label(n: int) -> str:
    """Inverse of ``parse_size`` for round numbers: 10_000_000 -> ``10M``."""
    for suffix, scale in (("M", 1_000_000), ("k", 1_000)):
        if n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ingest events/s and peak memory: attnrec against pandas, same run.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M", help="comma-separated event counts (k/M suffixes)")
    parser.add_argument("--formats", default="csv,parquet", help="comma-separated: csv, parquet")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="numpy seed of the synthetic data")
    parser.add_argument("--dup-rate", type=float, default=0.001,
                        help="share of rows that are exact re-sent copies of another event")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attnrec-bench"),
                        help="scratch folder: generated data (reused) and per-run state folders (removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measured run
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Synthetic data


@dataclass(frozen=True)
class Dataset:
    """The files of one synthetic event log: the main export and its column-reordered re-export."""

    rows: int
    files: dict[str, Path]       # format -> file
    reexports: dict[str, Path]   # format -> same rows, columns in another order


def _zipf_ids(rng: Any, n: int, n_ids: int, exponent: float) -> Any:
    """``n`` ids in 1..n_ids, id popularity Zipf(``exponent``) over a random popularity order."""
    import numpy as np

    weights = 1.0 / np.arange(1, n_ids + 1, dtype=np.float64) ** exponent
    ranks = rng.choice(n_ids, size=n, p=weights / weights.sum())
    return (rng.permutation(n_ids) + 1)[ranks].astype(np.int64)


def synthetic_events(n: int, seed: int, dup_rate: float) -> Any:
    """A time-ordered event log as an Arrow table: skewed users, Zipf items, unix-second times,
    half-star ratings, and ``dup_rate`` of rows being exact copies of other events (re-sends)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    users = _zipf_ids(rng, n, N_USERS, 0.6)
    items = _zipf_ids(rng, n, N_ITEMS, 1.0)
    ts = T_START + rng.integers(0, T_SPAN, size=n, dtype=np.int64)
    rating = rng.integers(1, 11, size=n).astype(np.float64) / 2.0
    n_dup = int(n * dup_rate)
    if n_dup:
        src, dst = rng.choice(n, size=n_dup, replace=False), rng.choice(n, size=n_dup, replace=False)
        for col in (users, items, ts, rating):
            col[dst] = col[src]
    order = np.argsort(ts, kind="stable")
    return pa.table({"user_id": users[order], "item_id": items[order], "timestamp": ts[order],
                     "rating": rating[order]})


def _write_atomically(table: Any, path: Path, fmt: str) -> None:
    """Write ``table`` as CSV (Polars: header unquoted, like most exports) or Parquet (pyarrow,
    snappy, 1M-row row groups) via a temporary name, so a killed run leaves no partial file."""
    import polars as pl
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".partial")
    if fmt == "csv":
        pl.from_arrow(table).write_csv(tmp)
    else:
        pq.write_table(table, tmp, row_group_size=PARQUET_ROW_GROUP, compression="snappy")
    tmp.replace(path)


def ensure_dataset(workdir: Path, n: int, seed: int, dup_rate: float, formats: list[str]) -> Dataset:
    """Generate the data files of size ``n`` unless they already exist (they are deterministic)."""
    folder = workdir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"events_{size_label(n)}_seed{seed}_dup{dup_rate:g}"
    files = {f: folder / f"{stem}.{f}" for f in formats}
    reexports = {f: folder / f"{stem}_reexport.{f}" for f in formats}
    missing = [(f, p, cols) for f in formats
               for p, cols in ((files[f], COLUMNS), (reexports[f], REEXPORT_COLUMNS)) if not p.exists()]
    if missing:
        log(f"generating {n:,} synthetic events (seed {seed}) -> {folder}")
        table = synthetic_events(n, seed, dup_rate)
        for fmt, path, cols in missing:
            _write_atomically(table.select(cols), path, fmt)
    return Dataset(n, files, reexports)


# --------------------------------------------------------------------------------------------
# One measured run (child process)


def rss_now_mb() -> float:
    """Current resident set size of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    """1-minute load average: how busy the machine was (other processes inflate wall times)."""
    return os.getloadavg()[0]


class Stopwatch:
    """Wall and CPU seconds of a ``with`` block."""

    def __init__(self) -> None:
        self.seconds = self.cpu_seconds = 0.0
        self._wall = self._cpu = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = cpu_seconds() - self._cpu


def run_attnrec(path: Path, state: Path) -> dict[str, Any]:
    """``ingest_paths`` of one file into the warehouse of ``state`` (created if new)."""
    from pipeline.data.ingest import IngestOptions, ingest_paths
    from pipeline.data.warehouse import connect

    con = connect(state / "warehouse.duckdb")
    base = rss_now_mb()
    with Stopwatch() as load:
        (report,) = ingest_paths(con, [path], IngestOptions(), state / "tmp")
    with Stopwatch() as close:
        con.close()
    if report.identical_to is not None:
        raise RuntimeError(f"{path}: took the identical-file shortcut; the benchmark needs different bytes")
    return {"seconds": load.seconds, "cpu_seconds": load.cpu_seconds, "close_seconds": close.seconds,
            "rows": report.rows, "kept": report.loaded, "duplicates": report.duplicates,
            "quarantined": report.quarantined, "rss_base_mb": base}


def run_pandas(path: Path, fmt: str, db_path: Path) -> dict[str, Any]:
    """The hand-written peer: read with pandas (pyarrow engine), clean, dedup, store in DuckDB."""
    import duckdb
    import pandas as pd

    con = duckdb.connect(str(db_path))
    base = rss_now_mb()
    with Stopwatch() as load:
        with Stopwatch() as read:
            if fmt == "csv":
                df = pd.read_csv(path, engine="pyarrow")
            else:
                df = pd.read_parquet(path, engine="pyarrow")
        rows = len(df)
        with Stopwatch() as clean:
            df = df.dropna(subset=KEY).drop_duplicates(subset=KEY)
        with Stopwatch() as write:
            con.register("df", df)
            con.execute("CREATE TABLE events AS SELECT * FROM df")
            con.unregister("df")
    with Stopwatch() as close:
        con.close()
    steps = {"read": read.seconds, "dropna_drop_duplicates": clean.seconds, "duckdb_write": write.seconds}
    return {"seconds": load.seconds, "cpu_seconds": load.cpu_seconds, "close_seconds": close.seconds,
            "rows": rows, "kept": len(df), "duplicates": rows - len(df), "quarantined": 0, "rss_base_mb": base,
            "steps": steps}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a child process: one tool, one file; adds the process's peak RSS."""
    path = Path(spec["path"])
    load_before = load_average()
    if spec["tool"] == "attnrec":
        result = run_attnrec(path, Path(spec["state"]))
    else:
        result = run_pandas(path, spec["format"], Path(spec["state"]) / "pandas.duckdb")
    result["rss_peak_mb"] = peak_rss_mb()
    result["load_average"] = max(load_before, load_average())
    return result


# --------------------------------------------------------------------------------------------
# Orchestration (parent process)


@dataclass
class Measurement:
    """The median of ``repeat`` runs of one (size, format, tool, phase)."""

    size: int
    format: str
    tool: str
    phase: str             # "first load" | "re-delivery"
    seconds: float
    seconds_all: list[float]
    cpu_seconds: float     # user + system CPU of the median run, all threads
    close_seconds: float
    rows: int
    kept: int
    duplicates: int
    quarantined: int
    rss_base_mb: float
    rss_peak_mb: float     # largest over the repeats
    load_average: float    # highest 1-minute load average seen around the runs
    steps: dict[str, float]  # pandas only: seconds of read / clean / write in the median run

    @property
    def events_per_s(self) -> float:
        return self.rows / self.seconds


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once so every measured run starts from the same (warm) page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter and return its result."""
    warm_page_cache(Path(spec["path"]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def measure_config(data: Dataset, fmt: str, repeat: int, workdir: Path) -> list[Measurement]:
    """pandas, attnrec first load and attnrec re-delivery of one file, ``repeat`` times each."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i in range(repeat):
        state = fresh_dir(workdir / "state" / f"{size_label(data.rows)}_{fmt}")
        plan = [("pandas", "first load", data.files[fmt]),
                ("attnrec", "first load", data.files[fmt]),
                ("attnrec", "re-delivery", data.reexports[fmt])]
        for tool, phase, path in plan:
            log(f"  {size_label(data.rows):>4} {fmt:8} {tool:8} {phase:12} run {i + 1}/{repeat}")
            result = spawn({"tool": tool, "format": fmt, "path": str(path), "state": str(state)})
            runs.setdefault((tool, phase), []).append(result)
        shutil.rmtree(state, ignore_errors=True)
    return [summarise(data.rows, fmt, tool, phase, results) for (tool, phase), results in runs.items()]


def summarise(size: int, fmt: str, tool: str, phase: str, results: list[dict[str, Any]]) -> Measurement:
    """Median seconds over the repeats; the counts of the median run; the largest peak RSS."""
    seconds = [r["seconds"] for r in results]
    mid = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    return Measurement(size, fmt, tool, phase, statistics.median(seconds), seconds, mid["cpu_seconds"],
                       mid["close_seconds"], mid["rows"], mid["kept"], mid["duplicates"], mid["quarantined"],
                       mid["rss_base_mb"], max(r["rss_peak_mb"] for r in results),
                       max(r["load_average"] for r in results), mid.get("steps", {}))


# --------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM and the versions that matter here."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
               platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal:")), 0)
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "missing"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gb": round(mem_kb / 1024 ** 2, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "versions": versions, "git": git_state()}


def git_state() -> str:
    """The commit measured, flagged when the ingest code differs from it."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *INGEST_CODE)
    return commit + (" (ingest code has uncommitted changes)" if dirty else "")


def pandas_peer(results: list[Measurement], m: Measurement) -> Measurement | None:
    return next((p for p in results if p.tool == "pandas" and p.size == m.size and p.format == m.format), None)


def ratio_text(results: list[Measurement], m: Measurement) -> str:
    """attnrec events/s over pandas events/s for first loads; blank where there is no peer."""
    peer = pandas_peer(results, m)
    if m.tool != "attnrec" or m.phase != "first load" or peer is None:
        return ""
    return f"{m.events_per_s / peer.events_per_s:.2f}x"


def results_table(results: list[Measurement]) -> str:
    """A Markdown table (readable as plain text, pasted as is into docs/benchmarks.md)."""
    head = ["events", "format", "tool", "run", "seconds", "events/s", "CPU s", "kept", "peak RSS MB",
            "RSS before MB", "load", "attnrec / pandas"]
    rows = [[size_label(m.size), m.format, m.tool, m.phase, f"{m.seconds:.2f}", f"{m.events_per_s / 1e6:.2f}M",
             f"{m.cpu_seconds:.2f}", f"{m.kept:,}", f"{m.rss_peak_mb:,.0f}", f"{m.rss_base_mb:,.0f}",
             f"{m.load_average:.1f}", ratio_text(results, m)]
            for m in results]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = set(range(4, len(head)))

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *[line(r) for r in rows]])


def header_text(command: str, machine: dict[str, Any], args: argparse.Namespace) -> str:
    v = machine["versions"]
    return "\n".join([
        f"command: {command}",
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, {machine['os']}",
        f"software: Python {machine['python']}, " + ", ".join(f"{k} {v[k]}" for k in PACKAGES)
        + f"; attnrec at {machine['git']}",
        f"data: seed {args.seed}, {N_USERS:,} users (Zipf 0.6), {N_ITEMS:,} items (Zipf 1.0), unix-second times "
        f"over one year, half-star ratings, {args.dup_rate:.1%} re-sent duplicate rows; CSV written by Polars, "
        f"Parquet by pyarrow (snappy, {PARQUET_ROW_GROUP:,}-row row groups)",
        f"pandas peer: read_csv/read_parquet engine='pyarrow', dropna + drop_duplicates on "
        f"({', '.join(KEY)}), CREATE TABLE in DuckDB",
        f"timing: median of {args.repeat} run(s), each in its own process from a warm page cache; CPU s = user + "
        "system time of that run (all threads); peak RSS = the process's ru_maxrss (interpreter and imports "
        "included; 'RSS before' is its RSS when the timer started); load = highest 1-minute load average around "
        f"the runs (above ~{BUSY_LOAD:g}, other processes were competing for the {os.cpu_count()} cores)",
    ])


def target_lines(results: list[Measurement]) -> list[str]:
    """The issue's targets for Parquet: >= 5M events/s and >= 10x pandas."""
    out = []
    for m in results:
        peer = pandas_peer(results, m)
        if m.tool == "attnrec" and m.phase == "first load" and m.format == "parquet" and peer:
            ratio = m.events_per_s / peer.events_per_s
            out.append(f"target, parquet {size_label(m.size)}: {m.events_per_s / 1e6:.2f}M events/s "
                       f"({'met' if m.events_per_s >= 5e6 else 'missed'}, goal >= 5M), {ratio:.2f}x pandas "
                       f"({'met' if ratio >= 10 else 'missed'}, goal >= 10x)")
    return out


def pandas_step_lines(results: list[Measurement]) -> list[str]:
    """Where the pandas peer spends its time (median run)."""
    return [f"pandas steps, {m.format} {size_label(m.size)}: "
            + ", ".join(f"{name.replace('_', ' ')} {sec:.2f} s" for name, sec in m.steps.items())
            for m in results if m.tool == "pandas" and m.steps]


def write_json(path: Path, command: str, machine: dict[str, Any], args: argparse.Namespace,
               results: list[Measurement]) -> None:
    params = {"sizes": args.sizes, "formats": args.formats, "repeat": args.repeat, "seed": args.seed,
              "dup_rate": args.dup_rate}
    rows = [{**asdict(m), "events_per_s": m.events_per_s} for m in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "machine": machine, "params": params, "results": rows},
                               indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]])
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    if unknown := set(formats) - set(FORMATS):
        raise SystemExit(f"unknown format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    machine = machine_info()
    started = time.perf_counter()
    results: list[Measurement] = []
    for n in sizes:
        data = ensure_dataset(args.workdir, n, args.seed, args.dup_rate, formats)
        for fmt in formats:
            results.extend(measure_config(data, fmt, args.repeat, args.workdir))
    print(header_text(command, machine, args))
    print()
    print(results_table(results))
    print()
    print("\n".join(pandas_step_lines(results)))
    print("\n".join(target_lines(results)))
    busiest = max(m.load_average for m in results)
    if busiest > BUSY_LOAD:
        print(f"warning: load average reached {busiest:.1f} during the runs: other processes shared the CPU, "
              "wall times are inflated (CPU s is less affected)")
    log(f"benchmark took {time.perf_counter() - started:.0f} s")
    if args.json:
        write_json(args.json, command, machine, args, results)


if __name__ == "__main__":
    main()
