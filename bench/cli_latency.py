"""Wall time of one CLI query, cold and warm: `attnrec recommend --user 42` as a user types it.

    python bench/cli_latency.py --home .attnrec            # an installation with a champion (make demo)
    python bench/cli_latency.py --home .attnrec --runs 7

The first run, with the state folder's ``model_cache`` removed (a cache, fetched again from
the registry), resolves the champion through MLflow and caches its bundle (cold); the next
``--runs`` reuse the cache (warm: the alias is read from the SQLite store, MLflow is not
imported). Beside them, for scale: the interpreter starting and `import torch`, the floor any
torch inference pays. Printed: the command, the machine, and the median and range of each.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import machine  # noqa: E402


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="an attnrec state folder with a champion")
    parser.add_argument("--user", default="42")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("command:", " ".join(sys.argv))
    print("machine:", machine())
    shutil.rmtree(args.home / "model_cache", ignore_errors=True)  # a cache: the cold run fetches it again
    query = [sys.executable, "-m", "pipeline.cli", "recommend", "--user", args.user, "--home", str(args.home)]
    cold = wall(query)
    warm = [wall(query) for _ in range(args.runs)]
    floor = [wall([sys.executable, "-c", "import torch"]) for _ in range(args.runs)]
    python = [wall([sys.executable, "-c", "pass"]) for _ in range(args.runs)]
    print(f"{'what':<44} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, times in (("attnrec recommend, cold (MLflow, download)", [cold]),
                        ("attnrec recommend, warm (cached bundle)", warm),
                        ("python -c 'import torch'", floor), ("python -c pass", python)):
        print(f"{name:<44} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}")


if __name__ == "__main__":
    main()
