"""A real local Prefect server, the served deployments, and `prefect deployment run` through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest
from mlflow import MlflowClient

from pipeline.config import load_settings
from tests.flows.conftest import DATA, TINY

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def newest_flow_run(api: str) -> dict:
    runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
    return {**runs[0], "state_type": runs[0]["state"]["type"]}


def run_logs(api: str, flow_run_id: str) -> list[str]:
    got = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()
    return [entry["message"] for entry in got]


def test_deployment_run_through_a_real_prefect_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNREC_", "PREFECT_"))}
    env.update({"ATTNREC_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
    server_log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    served = None
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 180, "the Prefect server")
        client_env = {**env, "PREFECT_API_URL": api}
        serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
        served = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "deploy", "--no-server"], env=client_env,
                                  cwd=tmp_path, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)

        def deployed() -> bool:
            r = httpx.post(f"{api}/deployments/filter", json={}, timeout=5)
            names = {d["name"] for d in r.json()} if r.status_code == 200 else set()
            return {"nightly", "adhoc", "manual"} <= names

        wait_for(deployed, 120, "the deployments to register")
        nightly = [d for d in httpx.post(f"{api}/deployments/filter", json={}).json() if d["name"] == "nightly"][0]
        assert any(s.get("schedule", {}).get("cron") == "0 2 * * *" for s in nightly.get("schedules", [])), nightly

        params = {"event_files": [str(DATA / "ratings.csv")], "item_files": [str(DATA / "movies.csv")], "k": 5,
                  "overrides": TINY}
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "attnrec-pipeline/adhoc", "--params", json.dumps(params),
             "--watch", "--watch-timeout", "600"],
            env=client_env, capture_output=True, text=True, timeout=700)
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert "Completed" in run.stdout + run.stderr

        # the deployment run's own logs reached the API at INFO: epochs, counts, the gate decision
        messages = run_logs(api, newest_flow_run(api)["id"])
        assert any("epoch 1/2: loss" in m for m in messages), messages[:20]
        assert any("100836 loaded" in m for m in messages) and any("promoted" in m for m in messages)

        # a typo in an override fails the run at once, naming the setting it is close to
        typo = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "attnrec-pipeline/adhoc", "--params",
             json.dumps({"overrides": {"train.epoch": 3}}), "--watch", "--watch-timeout", "300"],
            env=client_env, capture_output=True, text=True, timeout=400)
        failed = newest_flow_run(api)
        assert typo.returncode != 0 and failed["state_type"] == "FAILED", typo.stdout + typo.stderr
        assert any("unknown setting train.epoch (did you mean train.epochs?)" in m for m in run_logs(api, failed["id"]))

        # the README's ad-hoc example: changed training settings train on an unchanged warehouse
        again = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "attnrec-pipeline/adhoc", "--params",
             json.dumps({"overrides": {**TINY, "train.epochs": 3}, "k": 5}), "--watch", "--watch-timeout", "600"],
            env=client_env, capture_output=True, text=True, timeout=700)
        assert again.returncode == 0, again.stdout + again.stderr
        assert any("training: the training settings differ from champion v1's" in m
                   for m in run_logs(api, newest_flow_run(api)["id"]))

        settings = load_settings(home=home)
        client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("attnrec").experiment_id], "tags.type = 'train'",
                                  order_by=["attributes.start_time ASC"])
        assert len(runs) == 2 and "test_ndcg_at_10" in runs[0].data.metrics and "valid_ndcg_at_10" in runs[0].data.metrics
        assert runs[1].data.params["train.epochs"] == "3"
        chosen = "2" if runs[1].data.tags["promoted"] == "True" else "1"  # as the gate decided for v2
        assert str(client.get_model_version_by_alias("attnrec", "champion").version) == chosen
        con = duckdb.connect(str(settings.duckdb_path), read_only=True)
        try:
            assert con.execute("SELECT count(*) FROM recommendations").fetchall()[0][0] == 610 * 5
        finally:
            con.close()
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    assert server.poll() is not None and (served is None or served.poll() is not None)
