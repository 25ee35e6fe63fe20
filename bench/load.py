"""Load benchmark: N clients for S seconds of mixed requests against a real `attnrec serve`.

    python bench/load.py --clients 200 --seconds 60                # ML-1M, trained or random weights
    python bench/load.py --clients 50 --seconds 10 --hostile 4      # and four 50 MB bodies meanwhile

The server is the real one (``python -m pipeline.cli serve`` in a child process on 127.0.0.1)
over an ML-1M bundle (``--model DIR``, or seeded random weights as in ``bench/serving.py``,
whose preparation and HTTP client this script reuses) and the ML-1M warehouse. The mix, per
client, in turn: ``GET /users/{id}/recommendations`` (4 in 10), the same with
``explain=true`` (2 in 10), ``POST /recommendations`` with a real user's history (3 in 10),
and with ``explain`` (1 in 10). Closed loop: each client sends its next request as soon as the
last is answered, so requests/s is the throughput and latency is mostly queueing.

With ``--hostile N`` the same load runs twice, side by side: alone, then with N bodies of
``--hostile-mb`` MB each sent meanwhile (the server must answer them 413 without stalling the
others). Printed: the command and the machine, requests/s, p50 / p99 latency, errors and 5xx,
status counts, and the server's RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.quality import machine  # noqa: E402
from bench.serving import ML1M, Request, Server, build_kind, closed_loop, ml1m_case  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200, help="closed-loop clients = connections (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds per run (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (default: %(default)s)")
    ap.add_argument("--hostile", type=int, default=0, help="bodies of --hostile-mb MB sent during a second run")
    ap.add_argument("--hostile-mb", type=int, default=50)
    ap.add_argument("--kind", default="flat", help="index kind of the bundle (default: %(default)s)")
    ap.add_argument("--model", type=Path, default=None, help="a trained ML-1M bundle instead of random weights")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "serving",
                    help="state folders and bundles, shared with bench/serving.py (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.workdir = args.workdir.expanduser().resolve()
    args.queries = 2000  # histories drawn for the POSTs (bench/serving.py's name)
    return args


def mixed_requests(user_ids: list[str], histories: list[list[str]], n: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        slot = i % 10
        if slot < 6:
            path = f"/users/{user_ids[rng.integers(len(user_ids))]}/recommendations?k=10" + ("&explain=true" if slot >= 4 else "")
            out.append(Request("GET", path))
        else:
            body = {"items": histories[rng.integers(len(histories))], "k": 10, "explain": slot == 9}
            out.append(Request("POST", "/recommendations", json.dumps(body).encode()))
    return out


def hostile_bodies(url: str, count: int, megabytes: int, results: list[tuple[int | str, float]],
                   folder: Path) -> list[threading.Thread]:
    """Threads that each run ``curl`` to POST a body of ``megabytes`` MB (a long history) and record
    (status, seconds). Separate processes, written to a file before the run: the hostile clients
    cost the load generator's process nothing."""
    body = folder / f"hostile-{megabytes}mb.json"
    if not body.exists() or body.stat().st_size < megabytes * 1_000_000:
        body.write_bytes(b'{"items": [' + b",".join([b'"1"'] * (megabytes * 1_000_000 // 4)) + b"]}")

    def post() -> None:
        started = time.perf_counter()
        proc = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
                               "--data-binary", f"@{body}", url + "/recommendations"], capture_output=True, text=True)
        status: int | str = int(proc.stdout) if proc.stdout.isdigit() else f"curl exit {proc.returncode}"
        results.append((status, time.perf_counter() - started))

    return [threading.Thread(target=post) for _ in range(count)]


def run(server: Server, reqs: list[Request], args: argparse.Namespace, hostile: int) -> dict[str, object]:
    rss_before = server.rss_mb()
    bodies: list[tuple[int | str, float]] = []
    threads = hostile_bodies(server.url, hostile, args.hostile_mb, bodies, args.workdir) if hostile else []
    if threads:
        timer = threading.Timer(args.warmup + args.seconds / 3, lambda: [t.start() for t in threads])
        timer.start()
    result = asyncio.run(closed_loop(server.url, reqs, args.clients, args.seconds, args.warmup))
    for t in threads:
        t.join()
    latencies = np.array([end - start for start, end, _ in result.records]) * 1e3
    errors = collections.Counter((err or "200").split(":")[0] for _, _, err in result.records)
    return {
        "hostile_bodies": hostile, "requests": len(result.records), "requests_per_s": len(result.records) / args.seconds,
        "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
        "errors": sum(n for status, n in errors.items() if status != "200"),
        "server_errors": sum(n for status, n in errors.items() if status.startswith("HTTP 5")),
        "statuses": dict(errors), "rss_before_mb": rss_before, "rss_after_mb": server.rss_mb(),
        "hostile_answers": bodies,
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    print(f"command: python bench/load.py {shlex.join(argv)}")
    print(f"machine: {machine()}")
    case = ml1m_case(args)
    build = build_kind(case, args.kind)
    ids = np.array(__import__("polars").read_parquet(build.path / "items.parquet")["item_id"].to_list(), dtype=object)
    histories = [list(ids[h[-200:] - 1]) for h in case.queries]
    reqs = mixed_requests(case.user_ids, histories, 20_000, args.seed)
    rows = []
    with Server(build.path, case.home, args.workdir / "logs" / "load-server.log") as server:
        for hostile in ([0, args.hostile] if args.hostile else [0]):
            row = run(server, reqs, args, hostile)
            rows.append(row)
            growth = (row["rss_after_mb"] / row["rss_before_mb"] - 1) * 100
            print(f"{ML1M} {args.kind}, {args.clients} clients, {args.seconds:.0f} s"
                  + (f", {hostile} bodies of {args.hostile_mb} MB meanwhile" if hostile else "") + ":")
            print(f"  {row['requests_per_s']:,.0f} requests/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                  f"{row['errors']} errors ({row['server_errors']} 5xx); statuses {row['statuses']}")
            print(f"  server RSS {row['rss_before_mb']:,.0f} -> {row['rss_after_mb']:,.0f} MB ({growth:+.1f}%)")
            if hostile:
                print(f"  hostile bodies answered: {[(s, round(t, 2)) for s, t in row['hostile_answers']]}")
    if len(rows) == 2:
        print(f"p99 with hostile bodies / without: {rows[1]['p99_ms'] / rows[0]['p99_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"command": argv, "machine": machine(), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
