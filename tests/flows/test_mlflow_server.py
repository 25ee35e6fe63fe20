"""The MLflow UI checked for real: `attnrec ui` on the SQLite store, read back over REST."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline.config import load_settings

pytestmark = pytest.mark.slow


def test_mlflow_server_serves_the_run_metrics_and_registered_model(pipeline_run: tuple[Path, dict, dict], tmp_path: Path) -> None:
    home, first, _ = pipeline_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNREC_")}
    env["ATTNREC_HOME"] = str(home)
    # the README's command: `attnrec ui` (it execs `mlflow ui` on the state folder's store)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-2000:]
            time.sleep(0.5)
        run_id = first["mlflow_run_id"]
        run = httpx.get(f"{base}/api/2.0/mlflow/runs/get", params={"run_id": run_id}).json()["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["test_ndcg_at_10"] == pytest.approx(first["trained"]["test_ndcg@10"])
        history = httpx.get(f"{base}/api/2.0/mlflow/metrics/get-history", params={"run_id": run_id, "metric_key": "loss"}).json()
        assert len(history["metrics"]) >= 1
        model = httpx.get(f"{base}/api/2.0/mlflow/registered-models/get", params={"name": "attnrec"}).json()["registered_model"]
        assert any(a["alias"] == "champion" for a in model.get("aliases", []))
        assert httpx.get(base + "/").status_code == 200  # the UI itself
        # with the store behind this server, a run's link is the server's page of that run
        from pipeline.registry.tracking import run_url

        experiment = run["info"]["experiment_id"]
        assert run_url(load_settings(home=home, mlflow_tracking_uri=base), run_id) == f"{base}/#/experiments/{experiment}/runs/{run_id}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
