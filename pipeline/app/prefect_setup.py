"""Prefect's environment for attnrec: a local API whose database lives in the state folder,
unless ``prefect_api_url`` (or ``PREFECT_API_URL``) points at a real server.

Prefect reads its settings when imported, so call ``configure_prefect`` first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipeline.app.steps import check_port_free
from pipeline.config import Settings
from pipeline.errors import UserError


def configure_prefect(settings: Settings, api_url: str | None = None) -> dict[str, str]:
    """Set the PREFECT_* variables for this process (and return them for child processes)."""
    env = {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(settings.prefect_home)),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        # Prefect's own chatter stays at WARNING; the flow and task run logs (epoch lines, counts,
        # the gate decision) go to the API at INFO, deployment runs included.
        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": os.environ.get("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO"),
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": os.environ.get("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "INFO"),
    }
    url = api_url or settings.prefect_api_url or os.environ.get("PREFECT_API_URL")
    if url:
        env["PREFECT_API_URL"] = url
    os.environ.update(env)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def start_server(settings: Settings, host: str = "127.0.0.1", port: int = 4200, timeout: float = 120) -> subprocess.Popen:
    """Start ``prefect server start`` (database in the state folder) and wait until it answers."""
    check_port_free(host, port, "is a Prefect server already running? (use --no-server, or --port)")
    env = {**os.environ, **configure_prefect(settings)}
    env.pop("PREFECT_API_URL", None)
    log = open(settings.prefect_home / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the Prefect server exited (code {proc.returncode}); see {settings.prefect_home / 'server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the Prefect server did not answer within {timeout:.0f} s; see {settings.prefect_home / 'server.log'}")
