"""A real local Prefect server, the served deployments, and `prefect deployment run` through the CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
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
from tests.flows.conftest import DATA, REPO, TINY

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


def readme_prefect_commands() -> list[list[str]]:
    """The `prefect` command lines of the README's deployment example, as written."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"Deployments are served by one process:\n\n```bash\n(.*?)```", text, re.S)
    assert block, "the README's Prefect section has no deployment example"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith(".venv/bin/prefect ")]
    assert len(commands) == 3, commands
    return [[sys.executable, "-m", "prefect", *c[1:]] for c in commands]


def test_the_readme_deployment_example_through_a_real_prefect_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "inbox").mkdir(parents=True)
    shutil.copy(DATA / "ratings.csv", home / "inbox" / "ratings.csv")  # what the nightly run picks up
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
        # the installation's own settings, tiny so that the README's commands run in a test
        tiny_env = {f"ATTNREC_{k.upper().replace('.', '__')}": str(v).lower() if isinstance(v, bool) else str(v)
                    for k, v in TINY.items()}
        serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
        served = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "deploy", "--no-server"],
                                  env={**client_env, **tiny_env}, cwd=tmp_path, stdout=serve_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        wait_for(lambda: "(Ctrl-C stops)" in (tmp_path / "serve.log").read_text(), 120, "the deployments to be served")
        listed, nightly_run, adhoc_run = readme_prefect_commands()

        def run(command: list[str]) -> subprocess.CompletedProcess:
            done = subprocess.run(command, env=client_env, capture_output=True, text=True, timeout=700)
            assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            return done

        shown = run(listed).stdout
        assert "nightly" in shown and "adhoc" in shown and "manual" in shown
        nightly = [d for d in httpx.post(f"{api}/deployments/filter", json={}).json() if d["name"] == "nightly"][0]
        assert any(s.get("schedule", {}).get("cron") == "0 2 * * *" for s in nightly.get("schedules", [])), nightly

        # the nightly run: the inbox ingested, a model trained and promoted; its logs reached the API at INFO
        assert "Completed" in run(nightly_run).stdout
        messages = run_logs(api, newest_flow_run(api)["id"])
        assert any("epoch 1/2: loss" in m for m in messages), messages[:20]
        assert any("100836 loaded" in m for m in messages) and any("promoted" in m for m in messages)

        # the ad-hoc example: changed training settings train on an unchanged warehouse
        assert "Completed" in run(adhoc_run).stdout
        messages = run_logs(api, newest_flow_run(api)["id"])
        assert any("training: the training settings differ from champion v1's" in m for m in messages), messages[:20]
        assert any("epoch 5/5: loss" in m for m in messages)

        # a typo in an override fails the run at once, naming the setting it is close to
        typo = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "attnrec-pipeline/adhoc", "--params",
             json.dumps({"overrides": {"train.epoch": 3}}), "--watch", "--watch-timeout", "300"],
            env=client_env, capture_output=True, text=True, timeout=400)
        failed = newest_flow_run(api)
        assert typo.returncode != 0 and failed["state_type"] == "FAILED", typo.stdout + typo.stderr
        assert any("unknown setting train.epoch (did you mean train.epochs?)" in m for m in run_logs(api, failed["id"]))
        # so does a value outside a parameter's choices, before the flow starts
        wrong = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "attnrec-pipeline/adhoc", "--param", "index_kind=hnws"],
            env=client_env, capture_output=True, text=True, timeout=100)
        assert wrong.returncode != 0 and "hnws" in wrong.stdout + wrong.stderr

        settings = load_settings(home=home)
        client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("attnrec").experiment_id], "tags.type = 'train'",
                                  order_by=["attributes.start_time ASC"])
        assert len(runs) == 2 and "test_ndcg_at_10" in runs[0].data.metrics and "valid_ndcg_at_10" in runs[0].data.metrics
        assert runs[0].data.params["train.epochs"] == "2" and runs[1].data.params["train.epochs"] == "5"
        chosen = "2" if runs[1].data.tags["promoted"] == "True" else "1"  # as the gate decided for v2
        assert str(client.get_model_version_by_alias("attnrec", "champion").version) == chosen
        con = duckdb.connect(str(settings.duckdb_path), read_only=True)
        try:
            assert con.execute("SELECT count(*) FROM recommendations").fetchall()[0][0] == 610 * 20
        finally:
            con.close()

        # SIGTERM (what a service manager sends) ends `attnrec deploy` cleanly within 10 s
        logged_before = len((tmp_path / "serve.log").read_text())  # the typo run's failure has its traceback
        stopped_at = time.monotonic()
        os.kill(served.pid, signal.SIGTERM)
        assert served.wait(10) == 0
        assert time.monotonic() - stopped_at < 10
        log = (tmp_path / "serve.log").read_text()[logged_before:]
        assert "Traceback" not in log and "never awaited" not in log and log.rstrip().endswith("stopped"), log[-2000:]
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    assert server.poll() is not None and (served is None or served.poll() is not None)


def test_ctrl_c_stops_deploy_and_its_own_server(tmp_path: Path) -> None:
    """`attnrec deploy` with its own Prefect server: SIGINT stops both within 10 s, exit 0, no traceback."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNREC_", "PREFECT_"))}
    env.update({"ATTNREC_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "deploy.log"
    with open(log_path, "w") as log:
        deploy = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "deploy", "--port", str(port)], env=env,
                                  cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "(Ctrl-C stops)" in log_path.read_text(), 180, "the deployments to be served")
        paused = httpx.post(f"http://127.0.0.1:{port}/api/deployments/filter", json={}).json()
        assert {d["name"] for d in paused} >= {"nightly", "adhoc"} and not any(d["paused"] for d in paused)
        stopped_at = time.monotonic()
        os.kill(deploy.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert deploy.wait(10) == 0
        assert time.monotonic() - stopped_at < 10
    finally:
        if deploy.poll() is None:  # SIGTERM first: its Prefect server runs in its own session and stops with it
            os.kill(deploy.pid, signal.SIGTERM)
            try:
                deploy.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(deploy.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "Traceback" not in text and "never awaited" not in text and text.rstrip().endswith("stopped"), text[-2000:]
    with pytest.raises(httpx.ConnectError):  # its Prefect server is gone too
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
