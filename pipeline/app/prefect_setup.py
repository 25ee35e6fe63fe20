"""Prefect's environment for attnrec: a local API whose database lives in the state folder,
unless ``prefect_api_url`` (or ``PREFECT_API_URL``) points at a real server; the local server's
process; and the long-running process that serves the deployments until SIGINT or SIGTERM.

Prefect reads its settings when imported, so call ``configure_prefect`` first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from pipeline.app.steps import check_port_free
from pipeline.config import Settings
from pipeline.errors import UserError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment


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
    # its own session: Ctrl-C in the terminal reaches only attnrec, which pauses the schedules
    # through this server before it stops it
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def serve_deployments(deployments: list[RunnerDeployment], stop_timeout_s: float = 8.0) -> None:
    """Serve ``deployments`` (scheduled and on-demand runs) until SIGINT or SIGTERM.

    Prefect's own ``serve`` cannot be stopped in 3.8 (its SIGTERM handler leaves ``Runner.astop``
    unawaited and hangs), so this process owns both signals: either one stops the runner, which
    cancels runs in progress and pauses the schedules, within ``stop_timeout_s`` seconds.
    """
    from prefect.runner import Runner

    async def run() -> None:
        runner = Runner(pause_on_shutdown=True)
        for deployment in deployments:
            await runner.add_deployment(deployment)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        serving = asyncio.create_task(runner.start())
        await asyncio.sleep(0)  # runner.start() has installed its SIGTERM handler; ours replace it
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # said only now that Ctrl-C is ours: a SIGINT before this line would end the process as an interrupt (130)
        names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
        print(f"serving {names} (Ctrl-C stops)", file=sys.stderr, flush=True)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            stopped.cancel()
            serving.result()  # the runner ended on its own: raise what ended it
            return
        print("stopping: cancelling runs in progress and pausing the schedules ...", file=sys.stderr, flush=True)
        await runner.astop()
        try:
            await asyncio.wait_for(serving, stop_timeout_s)
        except TimeoutError:
            print(f"the runner did not stop within {stop_timeout_s:.0f} s; leaving it", file=sys.stderr, flush=True)

    asyncio.run(run())


def stop_server(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Stop the local Prefect server started by ``start_server``: SIGTERM, then SIGKILL after ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
