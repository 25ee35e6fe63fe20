"""The connection to a Ray cluster, and a local Ray head node for tests and benchmarks.

``ray_connection`` connects this process to the cluster ``settings.ray_address`` names
(``auto``, ``host:port`` or ``ray://host:port``) or, when it is unset, starts a private Ray
for the block; an address nobody answers at is one ``UserError`` line naming the setting.
``local_cluster`` runs ``ray start --head --block`` on 127.0.0.1 as a child process and
stops it, with every Ray process it started, when the block ends (also on failure).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.config import Settings
from pipeline.errors import UserError

RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # written by Ray when a local ray.init() starts a cluster
RAY_MISSING = "engine = ray needs the ray extra: pip install 'attnrec[ray]' (`make install` includes it)"
CONNECT_TIMEOUT_S = 5.0    # a TCP connection to ray_address must open within this
HEAD_START_TIMEOUT_S = 120.0  # `ray start --head` must accept connections within this
NAMESPACE = "attnrec"
STOP_TIMEOUT_S = 60.0  # stop_tasks waits at most this long for cancelled tasks to end
AHEAD_PER_CPU = 2  # task_stream submits at most this many tasks per cluster CPU beyond the next result


def import_ray() -> ModuleType:
    """The ``ray`` module, or a ``UserError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for ``auto``."""
    if address == "auto":
        return None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"ray_address = {address!r}: give auto, host:port or ray://host:port")
    return host, int(port)


def follow_token_auth() -> None:
    """Use Ray's token authentication when this machine has a Ray token and ``RAY_AUTH_MODE``
    is unset, as ``ray start`` itself then does: a cluster started after any local
    ``ray.init()`` requires the token, and Ray 2.60's client only sends it in token mode."""
    if "RAY_AUTH_MODE" not in os.environ and RAY_TOKEN_FILE.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def check_reachable(address: str) -> None:
    """Refuse, in one line, a ``ray_address`` whose port does not accept a TCP connection
    (Ray itself would retry for minutes before failing)."""
    where = _host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"ray_address = {address!r}: no Ray cluster answers there ({exc.strerror or exc}); "
                        "start one with `ray start --head`, or unset ray_address for a private local Ray") from None


@contextmanager
def ray_connection(settings: Settings) -> Iterator[ModuleType]:
    """This process connected to the Ray cluster of ``settings`` for the block (yields ``ray``).

    Already connected: that connection is used and left open. Otherwise ``ray_address``
    is connected to, or with no address a private Ray is started on this machine (no
    dashboard); either is shut down when the block ends.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = settings.ray_address
    if address is not None:
        check_reachable(address)
        follow_token_auth()
    try:
        quiet = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}  # no INFO lines
        if address is None:
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ray_address = {address!r}: cannot connect to Ray ({first})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def task_stream(ray: ModuleType, task: Any, calls: Sequence[tuple[Any, ...]],
                ahead: int | None = None) -> Generator[Any, None, None]:
    """``task.remote(*args)`` for every ``args`` of ``calls``, their results yielded in call
    order, at most ``ahead`` tasks submitted beyond the result the caller takes next (default:
    2 per cluster CPU; it bounds what waits in the object store or a staging folder).

    On a failure no further task starts and the running ones finish before the error is
    raised, so that none writes into a folder its caller removes next: a task's ``UserError``
    as itself, one line (Ray's ``RayTaskError`` carries the remote traceback in its text),
    anything else as Ray raised it. The same when the caller stops taking results. Running
    tasks are not cancelled: in Ray 2.60 a cancel that crosses a task's completion aborts the
    driver (``RAY_CHECK`` in ``TaskManager::CompletePendingTask``) or kills the worker under
    the next task; the ``ahead`` window bounds the work left to finish instead. Only an
    interruption (Ctrl-C) while waiting cancels them (``stop_tasks``).
    """
    ahead = ahead or AHEAD_PER_CPU * cluster_cpus(ray)
    refs: list[Any] = []
    try:
        for i in range(len(calls)):
            while len(refs) < min(len(calls), i + ahead):
                refs.append(task.remote(*calls[len(refs)]))
            try:
                result = ray.get(refs[i])
            except KeyboardInterrupt:
                stop_tasks(ray, refs)
                raise
            except Exception as exc:
                error = user_error_in(exc)
                if error is None:
                    raise
                raise error from None
            yield result
    finally:
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)  # the running ones finish


def run_tasks(ray: ModuleType, task: Any, calls: Sequence[tuple[Any, ...]], ahead: int | None = None) -> list[Any]:
    """Every result of ``task_stream``, in call order."""
    return list(task_stream(ray, task, calls, ahead))


def user_error_in(exc: BaseException) -> UserError | None:
    """The ``UserError`` behind a Ray error, if one is: the cause of a task's ``RayTaskError``,
    or the lowest failed rank's of Ray Train's ``WorkerGroupError`` (``worker_failures``)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for error in [exc, *(failures[rank] for rank in sorted(failures))]:
        error = getattr(error, "cause", None) or error  # a RayTaskError around it
        if isinstance(error, UserError) and error is not exc:
            return error
    return None


def stop_tasks(ray: ModuleType, refs: list[Any]) -> None:
    """Cancel the tasks of ``refs`` that have not finished, a running one by stopping its worker
    (Ray leaves a running task alone otherwise), and wait until they have ended, so that none
    writes into a folder its caller removes next. Only where the user stops the run: a cancel
    that crosses a task's completion can abort this process (``run_tasks``)."""
    if not refs:
        return
    for ref in refs:
        ray.cancel(ref, force=True)
    ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S, fetch_local=False)


def cluster_cpus(ray: ModuleType) -> int:
    """The CPUs the connected cluster offers (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def partition_count(settings: Settings, ray: ModuleType) -> int:
    """How many Ray tasks batch scoring and evaluation split the users into: ``partitions``,
    or with ``auto`` one per CPU of the connected cluster."""
    return cluster_cpus(ray) if settings.partitions == "auto" else settings.partitions


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def local_cluster(num_cpus: int = 2, object_store_bytes: int = 200_000_000, port: int | None = None) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 for the block; yields its address (``127.0.0.1:PORT``).

    ``ray start --head --block`` runs in its own process group with its own temporary
    folder, so stopping that group stops exactly the Ray processes it started (never another
    cluster on the machine); the folder is removed afterwards.
    """
    port = port or free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        raise UserError(RAY_MISSING)
    follow_token_auth()  # the head and this process's clients agree on token authentication
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    log = (temp / "head.log").open("wb")
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={object_store_bytes}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                raise UserError(f"`ray start --head` exited with {head.returncode}: see {temp / 'head.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise UserError(f"`ray start --head` did not listen on 127.0.0.1:{port} within "
                                    f"{HEAD_START_TIMEOUT_S:.0f} s") from None
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(head: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the head's process group (the head, GCS, raylet, workers); SIGKILL to what
    is left of it after ``grace_s``."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    try:
        head.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline:
        try:
            os.killpg(head.pid, 0)  # is any process of the group left?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)
