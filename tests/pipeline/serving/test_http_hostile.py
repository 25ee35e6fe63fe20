"""A hostile client cannot take the server down (items 7-9 of the hardening issue), on a real uvicorn server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.pipeline.serving.test_http import Server
from tests.support import Attnrec

LIMITS = {"ATTNREC_SERVE__MAX_BODY_BYTES": "200000", "ATTNREC_SERVE__MAX_HISTORY_ITEMS": "500"}


@pytest.fixture(scope="module")
def limited(small_home: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    srv = Server(Attnrec(small_home, tmp_path_factory.mktemp("limited")), env=LIMITS)
    yield srv
    srv.stop()


def test_7_a_body_over_the_limit_is_a_413_and_does_not_stall_the_others(limited: Server) -> None:
    huge = b'{"items": [' + b",".join(b'"1"' for _ in range(2_000_000)) + b"]}"  # 8 MB
    results: list[int] = []

    def post() -> None:
        results.append(httpx.post(limited.url + "/recommendations", content=huge,
                                  headers={"content-type": "application/json"}, timeout=30).status_code)

    hostile = [threading.Thread(target=post) for _ in range(4)]
    for t in hostile:
        t.start()
    started = time.monotonic()
    normal = [httpx.get(limited.url + "/users/42/recommendations", timeout=10).status_code for _ in range(10)]
    normal_seconds = time.monotonic() - started
    for t in hostile:
        t.join()
    assert results == [413] * 4 and normal == [200] * 10
    assert normal_seconds < 10
    chunked = httpx.post(limited.url + "/recommendations", content=iter([huge[:150_000], huge[150_000:300_000]]),
                         headers={"content-type": "application/json"})  # no content-length: counted as it arrives
    assert chunked.status_code == 413 and "200,000 bytes" in chunked.json()["error"]


def test_7_history_length_and_echoed_unknown_ids_are_bounded(limited: Server) -> None:
    long = httpx.post(limited.url + "/recommendations", json={"items": ["1"] * 501})
    assert long.status_code == 422 and "items" in long.json()["error"] and "500" in long.json()["error"]
    unknown = httpx.post(limited.url + "/recommendations", json={"items": [f"nope-{i}" for i in range(400)]})
    body = unknown.json()
    assert unknown.status_code == 422 and body["unknown_count"] == 400
    assert len(body["unknown_items"]) == 20 and len(unknown.content) < 2_000


class BrokenIndex:
    """An index whose search fails, as a corrupt index file would at query time."""

    def search(self, *args: object) -> None:
        raise RuntimeError("corrupt index")


def test_9_every_response_is_counted_in_metrics_5xx_included(small_home: Path) -> None:
    """A real uvicorn server over the real app; its index is made to fail, so queries that reach it are 500s."""
    import socket

    import uvicorn

    from pipeline import Recommender
    from pipeline.config import ServeSettings
    from pipeline.serving.http import create_app

    recommender = Recommender.load(small_home / "runs" / "model-a", home=small_home)
    recommender.bundle.index = BrokenIndex()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(recommender, None, ServeSettings(max_body_bytes=100_000)),
                                           host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.05)
        popular = httpx.post(url + "/recommendations", json={"items": []})  # no history: the index is not asked
        broken = httpx.post(url + "/recommendations", json={"items": ["1"]})
        too_big = httpx.post(url + "/recommendations", content=b"x" * 200_000, headers={"content-type": "application/json"})
        text = httpx.get(url + "/metrics").text
    finally:
        server.should_exit = True
        thread.join(10)
    assert (popular.status_code, broken.status_code, too_big.status_code) == (200, 500, 413)
    for status in ("200", "500", "413"):
        assert f'attnrec_requests_total{{endpoint="/recommendations",status="{status}"}} 1.0' in text, text


def test_8_a_server_that_cannot_read_the_warehouse_is_not_ready_and_says_why(small_cli: Attnrec) -> None:
    holder = subprocess.Popen(  # an ingest holding the warehouse's write lock
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(small_cli.db)!r}); print('locked', flush=True); "
                               "sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    srv = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        srv = Server(small_cli, wait_for="/health")
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and "warehouse" in ready.json()["reason"]
        user = httpx.get(srv.url + "/users/42/recommendations")
        assert user.status_code == 503 and "warehouse" in user.json()["error"]
        assert httpx.post(srv.url + "/recommendations", json={"items": ["1"]}).status_code == 200  # no history needed
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        user = httpx.get(srv.url + "/users/42/recommendations").json()
        assert user["known_user"] is True and user["history_length"] > 0
    finally:
        holder.kill()
        if srv is not None:
            srv.stop()
