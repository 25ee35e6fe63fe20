"""The server follows the registry's champion: a new champion, or a rebuilt index, is loaded in
the background and swapped in while clients keep sending requests, with no restart and no failed
request (a real uvicorn server over a real SQLite MLflow registry)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx

from pipeline.config import load_settings
from pipeline.registry import tracking
from pipeline.registry.model_store import Bundle
from tests.pipeline.serving.test_http import Server
from tests.support import Attnrec


def register(home: Path, bundle_dir: Path) -> str:
    """A bundle registered as a new version of the model (not promoted)."""
    settings = load_settings(home=home)
    with tracking.tracked_run(settings, None, {"type": "test"}):
        version = tracking.log_bundle_model(bundle_dir, settings.registry.model_name)
    tracking.set_version_tags(settings, version, {"model_sha256": Bundle.load(bundle_dir).meta["sha256"]})
    return version


def test_a_new_champion_is_swapped_in_while_requests_flow(champion_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(champion_home, home)
    server = Server(Attnrec(home, tmp_path), model=None, env={"ATTNREC_SERVE__FOLLOW_MODEL_S": "0.5"})
    statuses: list[int | str] = []
    versions: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                for request in (lambda: http.get("/users/1/recommendations?k=5&explain=true"),
                                lambda: http.post("/recommendations", json={"items": ["1", "260"], "k": 5})):
                    try:
                        answer = request()
                        statuses.append(answer.status_code)
                        versions.add(answer.json()["model_version"])
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)

    try:
        assert httpx.get(server.url + "/health").json()["model_version"] == "attnrec v1"
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        version = register(home, home / "runs" / "model-b")
        assert version == "2"
        assert httpx.get(server.url + "/health").json()["model_version"] == "attnrec v1"  # registered, not champion
        tracking.set_champion(load_settings(home=home), version)
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health").json()["model_version"] != "attnrec v2":
            assert time.monotonic() < deadline, "the server did not pick up the new champion in 60 s"
            time.sleep(0.2)
        time.sleep(1.0)  # requests keep flowing on the new model
        Attnrec(home, tmp_path).run("index", "--kind", "hnsw")  # the champion's index, rebuilt
        while httpx.get(server.url + "/health").json()["index"] != "hnsw":
            assert time.monotonic() < deadline, "the server did not pick up the rebuilt index"
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert versions == {"attnrec v1", "attnrec v2"}
    said = server.proc.stdout.read() if server.proc.stdout else ""
    assert "now serving model attnrec v2 (was attnrec v1)" in said and "now serving model attnrec v2 (was attnrec v2)" in said
