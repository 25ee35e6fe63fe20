"""Web page weight and speed on ML-1M: what a first visit downloads, and how long a user page takes.

    python bench/web_page.py                         # ML-1M state in bench/out/web-ml-1m (made once)
    python bench/web_page.py --users 100 --browser-users 20

The state folder gets ML-1M ingested with its titles, LOO features and a champion trained by
``attnrec train``'s own step for ``--epochs`` epochs (default 1: render time does not depend
on the model's quality, only on its shape, which is the default one). Then the real server
(``python -m pipeline.cli serve`` in a child process, on 127.0.0.1) is measured:

* **weight**: the bytes of a first load (the HTML plus every stylesheet and script it names,
  as served, uncompressed) of the start page and of a user page;
* **server**: wall time of ``GET /ui/users/{id}`` (history, top-10, reasons, rendered HTML)
  over loopback for ``--users`` users spread over the user table, the longest history
  included, after a warm-up;
* **browser**: in headless Chromium (``--chromium``, through Playwright), the user page's
  navigation from request to the load event (``PerformanceNavigationTiming.loadEventEnd``)
  for ``--browser-users`` of them, the assets cached after the first, as a person clicking
  from user to user gets them.

Printed: the command, the machine, the load average, and the medians, 95th percentiles and maxima.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import machine, prepare  # noqa: E402
from pipeline.app.steps import train  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.data.histories import HistoryStore  # noqa: E402
from tests.support import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

PORT = 8766


def champion_home(home: Path, epochs: int) -> None:
    """ML-1M ingested, featurised and a champion trained, once (kept in ``home``)."""
    if (home / "mlflow.db").exists():
        return
    if not (home / "features" / "CURRENT").exists():
        prepare(home, "ml-1m")
    started = time.perf_counter()
    result = train(load_settings(home=home, **{"train.epochs": epochs, "registry.popularity_floor": False}), baselines=False)
    print(f"trained {result['version']} in {time.perf_counter() - started:.0f} s ({epochs} epoch(s)), "
          f"test NDCG@10 {result['test_ndcg@10']:.4f}")


def first_load(client: httpx.Client, path: str) -> tuple[int, int]:
    """(bytes of the page and the assets it names, number of requests)."""
    page = client.get(path)
    page.raise_for_status()
    assets = re.findall(r'(?:src|<link[^>]*href)="(/[^"]+)"', page.text)
    return len(page.content) + sum(len(client.get(a).content) for a in assets), 1 + len(assets)


def summary(name: str, values_ms: list[float]) -> str:
    ordered = sorted(values_ms)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{name:<44} {len(ordered):>5} {statistics.median(ordered):9.1f} {p95:9.1f} {ordered[-1]:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=ROOT / "bench" / "out" / "web-ml-1m")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--browser-users", type=int, default=20)
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args()
    print(f"command: python bench/web_page.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    home = args.home.resolve()
    champion_home(home, args.epochs)

    user_ids, histories = HistoryStore(load_settings(home=home).duckdb_path).all_histories()
    longest = max(range(len(user_ids)), key=lambda i: len(histories[i]))
    step = max(1, len(user_ids) // args.users)
    chosen = sorted({*range(0, len(user_ids), step), longest})[:args.users]
    users = [user_ids[i] for i in chosen]
    print(f"users: {len(users)} of {len(user_ids):,}, histories {min(len(histories[i]) for i in chosen)}.."
          f"{len(histories[longest])} items (user {user_ids[longest]} the longest)")

    env = {**os.environ, "ATTNREC_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(PORT)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{PORT}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
            print(f"load average before: {os.getloadavg()[0]:.2f}")
            print(f"{'first load (HTML + CSS + JS, uncompressed)':<44} {'bytes':>9} {'requests':>9}")
            for name, path in (("start page /", "/"), (f"user page /ui/users/{users[0]}", f"/ui/users/{users[0]}"),
                               (f"user page /ui/users/{user_ids[longest]}", f"/ui/users/{user_ids[longest]}")):
                weight, requests = first_load(client, path)
                print(f"{name:<44} {weight:9,} {requests:9}")
            for user in users[:10]:  # warm-up
                client.get(f"/ui/users/{user}")
            server_ms = []
            for user in users:
                started = time.perf_counter()
                client.get(f"/ui/users/{user}").raise_for_status()
                server_ms.append((time.perf_counter() - started) * 1000)
        browser_ms = browser_load_times(url, users[:args.browser_users], args.chromium)
        print(f"{'user page, ms':<44} {'n':>5} {'median':>9} {'p95':>9} {'max':>9}")
        print(summary("server: GET /ui/users/{id} (loopback)", server_ms))
        print(summary("Chromium: request to load event", browser_ms))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        server.terminate()
        server.wait(10)


def browser_load_times(url: str, users: list[str], chromium: str) -> list[float]:
    """Request-to-load-event times of the user pages in one headless Chromium tab."""
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            for user in users:
                page.goto(f"{url}/ui/users/{user}", wait_until="load")
                times.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
        finally:
            browser.close()
    return times


if __name__ == "__main__":
    main()
