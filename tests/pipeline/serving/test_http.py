"""The HTTP API served for real: uvicorn on 127.0.0.1, real requests."""

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Attnrec, _clean_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cli: Attnrec, token: str | None = None, env: dict[str, str] | None = None,
                 wait_for: str = "/health", model: str | None = "runs/model-a") -> None:
        self.port = free_port()
        env = {**_clean_env(cli.home), **(env or {})}
        if token:
            env["ATTNREC_API_TOKEN"] = token
        chosen = ("--model", str(cli.home / model)) if model else ()
        self.proc = subprocess.Popen(cli.command("serve", "--port", str(self.port), *chosen), cwd=cli.cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + wait_for, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not come up in 90 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(small_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve")
    srv = Server(Attnrec(small_home, work))
    yield srv
    srv.stop()


def test_health_and_docs(server: Server) -> None:
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["index"] == "flat" and health["items"] > 9000
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/users/{user_id}/recommendations" in spec["paths"] and "/recommendations" in spec["paths"]


def test_user_recommendations_with_reasons(server: Server) -> None:
    r = httpx.get(server.url + "/users/42/recommendations", params={"k": 5, "explain": "true"})
    assert r.status_code == 200
    body = r.json()
    assert body["fallback"] is None and len(body["recommendations"]) == 5
    for rec in body["recommendations"]:
        assert set(rec) == {"item_id", "score", "title", "reasons"}
        assert rec["reasons"] and sum(x["weight"] for x in rec["reasons"]) <= 1.0 + 1e-6
        assert all(set(x) == {"item_id", "title", "weight"} for x in rec["reasons"])
    assert body["model_version"]


def test_unknown_user_gets_popular(server: Server) -> None:
    body = httpx.get(server.url + "/users/no-such-user/recommendations").json()
    assert body["fallback"] == "popular" and len(body["recommendations"]) == 10


def test_post_history_for_a_user_that_does_not_exist(server: Server) -> None:
    r = httpx.post(server.url + "/recommendations", json={"items": [1, "260", 1196], "k": 4, "explain": True})
    assert r.status_code == 200
    body = r.json()
    assert len(body["recommendations"]) == 4 and body["history_length"] == 3
    assert not {"1", "260", "1196"} & {x["item_id"] for x in body["recommendations"]}
    filtered = httpx.post(server.url + "/recommendations",
                          json={"items": [1], "k": 5, "include_categories": ["Horror"]}).json()
    assert len(filtered["recommendations"]) == 5


def test_similar_items(server: Server) -> None:
    body = httpx.get(server.url + "/items/1/similar", params={"k": 3}).json()
    assert len(body["recommendations"]) == 3 and "1" not in {x["item_id"] for x in body["recommendations"]}
    assert httpx.get(server.url + "/items/not-an-item/similar").status_code == 404


@pytest.mark.parametrize("method,path,kwargs,needle", [
    ("post", "/recommendations", {"json": {"items": [1, "zzz", "yyy"], "k": 5}}, "zzz"),
    ("post", "/recommendations", {"json": {"items": [1], "k": 0}}, "k"),
    ("post", "/recommendations", {"json": {"items": [1], "k": 1001}}, "k"),
    ("post", "/recommendations", {"json": {"k": 5}}, "items"),
    ("post", "/recommendations", {"content": b"{not json", "headers": {"content-type": "application/json"}}, "JSON"),
    ("get", "/users/42/recommendations?k=0", {}, "k"),
    ("get", "/users/42/recommendations?k=abc", {}, "k"),
])
def test_bad_requests_get_4xx_with_a_message(server: Server, method: str, path: str, kwargs: dict, needle: str) -> None:
    r = getattr(httpx, method)(server.url + path, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert needle.lower() in r.json()["error"].lower()


def test_metrics_count_requests_and_latency(server: Server) -> None:
    httpx.get(server.url + "/users/1/recommendations")
    text = httpx.get(server.url + "/metrics").text
    assert 'attnrec_requests_total{endpoint="/users/{user_id}/recommendations",status="200"}' in text
    assert "attnrec_request_seconds_bucket" in text


def test_bearer_token(small_home: Path, tmp_path: Path) -> None:
    srv = Server(Attnrec(small_home, tmp_path), token="s3cret")
    try:
        url = srv.url + "/users/1/recommendations"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(srv.url + "/recommendations", json={"items": [1]}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


def test_ids_are_read_by_the_identity_rule_never_a_500(server: Server) -> None:
    for path in ("%C2%B2", "%D9%A4%D9%A2", "042"):  # '²', Arabic-Indic 42, a leading zero: text ids nobody has
        r = httpx.get(f"{server.url}/users/{path}/recommendations")
        assert r.status_code == 404, (path, r.text)
        assert "unknown user" in r.json()["error"] and r.json()["fallback"] == "popular"
    padded = httpx.get(server.url + "/users/%2042%09/recommendations").json()  # ' 42\t' is user 42
    assert padded["known_user"] is True
    assert padded["recommendations"] == httpx.get(server.url + "/users/42/recommendations").json()["recommendations"]
    for path in ("%20", "u" * 1100):  # empty after stripping; longer than the rule allows
        r = httpx.get(f"{server.url}/users/{path}/recommendations")
        assert r.status_code == 422 and "user id" in r.json()["error"], r.text


def test_http_answers_equal_the_batch_answers(server: Server, small_home: Path) -> None:
    from pipeline import Recommender
    from pipeline.data.histories import HistoryStore
    from pipeline.registry.model_store import Bundle

    recommender = Recommender(Bundle.load(small_home / "runs" / "model-a"), HistoryStore(small_home / "warehouse.duckdb", cache=True))
    batch = recommender.recommend_all(k=10).partition_by("user_id", as_dict=True)
    for user in ["1", "42", "68", "414", "599", "610"] + [str(u) for u in range(100, 140)]:
        online = httpx.get(f"{server.url}/users/{user}/recommendations", params={"k": 10}).json()["recommendations"]
        assert [r["item_id"] for r in online] == batch[(user,)].sort("rank")["item_id"].to_list(), user


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_a_busy_port_fails_with_exit_1_before_anything_says_serving(small_cli: Attnrec, command: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = small_cli.run(command, "--port", str(port), "--model", str(small_cli.home / "runs" / "model-a"),
                             ok=False) if command == "serve" else small_cli.run(command, "--port", str(port), ok=False)
    said = done.stdout + done.stderr
    assert done.returncode == 1 and f"error: 127.0.0.1:{port} is in use" in said, said
    assert "serving" not in said and "MLflow UI on" not in said and "Traceback" not in said
