"""The MLflow UI checked for real: `mlflow server` on the SQLite store, read back over REST."""

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
    settings = load_settings(home=home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", settings.mlflow_tracking_uri, "--default-artifact-root",
         settings.mlflow_artifact_root.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
