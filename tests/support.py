"""Helpers shared by the tests: the real CLI as a subprocess, its error contract, and page faults in a thread."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

# Debian's Chromium, driven headless through Playwright (its own browser download cannot run here);
# without the background-networking flags its connections are refused by a closed network.
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _clean_env(home: Path) -> dict[str, str]:
    """The environment for a CLI run: ours, minus any ATTNREC_* leaking in, plus ATTNREC_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNREC_")}
    env["ATTNREC_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Attnrec:
    """Runs the real ``attnrec`` CLI against one state folder."""

    def __init__(self, home: Path, cwd: Path) -> None:
        self.home = home
        self.cwd = cwd

    @property
    def db(self) -> Path:
        return self.home / "warehouse.duckdb"

    def command(self, *args: str | Path, python_flags: tuple[str, ...] = ()) -> list[str]:
        return [sys.executable, *python_flags, "-m", "pipeline.cli", *map(str, args)]

    def popen(self, *args: str | Path, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), cwd=self.cwd, env=_clean_env(self.home), **kwargs)

    def run(self, *args: str | Path, ok: bool = True, timeout: float = 300,
            python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.command(*args, python_flags=python_flags), cwd=self.cwd, env=_clean_env(self.home),
            capture_output=True, text=True, timeout=timeout,
        )
        if ok and proc.returncode != 0:
            raise AssertionError(
                f"attnrec {' '.join(map(str, args))} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def ingest(self, *args: str | Path) -> list[dict[str, Any]]:
        """``attnrec ingest ... --json``: one report per file."""
        return self.json("ingest", *args)

    def ingest_items(self, *args: str | Path) -> list[dict[str, Any]]:
        return self.json("ingest-items", *args)

    def stats(self) -> dict[str, Any]:
        return self.json("stats")

    def features(self, *args: str | Path) -> dict[str, Any]:
        return self.json("features", *args)

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        """Read the warehouse read-only (after the CLI has exited)."""
        con = duckdb.connect(str(self.db), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()


def assert_one_line_error(proc: subprocess.CompletedProcess, *must_contain: str) -> str:
    """A user error: exit code != 0, one ``error:`` line on stderr naming what it must, no traceback."""
    assert proc.returncode != 0, f"expected a failure, got rc=0\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr should be one line, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    for text in must_contain:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def page_faults_in_a_thread(measured: Callable[[], object], times: int,
                            before_each: Callable[[int], object] = lambda i: None) -> list[int]:
    """The minor page faults of the whole process during each of ``times`` calls of
    ``measured``, run in a new thread (as Ray Train runs training and validation) after
    ``before_each(i)``, which is not counted. The process's, not the thread's: torch's intra-op
    workers write most of a kernel's output, so the calling thread alone sees a share of the
    faults that depends on the thread count (CI saw 7 of 18,750). On Linux, glibc gives the new
    thread its own malloc arena, which maps any block over 64 MB afresh on every allocation."""
    faults: list[int] = []

    def calls() -> None:
        for i in range(times):
            before_each(i)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            measured()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    thread = threading.Thread(target=calls)
    thread.start()
    thread.join()
    return faults


def fresh_block_faults(shape: tuple[int, ...]) -> int:
    """The page faults of writing a new float32 block of ``shape`` in a new thread (the fewer of
    two tries): what a block mapped afresh costs on this machine, in pages of its kernel's size
    (about bytes / 4 KiB; far fewer where transparent huge pages back it)."""
    import torch

    return min(page_faults_in_a_thread(lambda: torch.ones(shape), times=2))


@contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """A real file system of ``size_bytes`` at ``path`` (a tmpfs, mounted for the block and
    unmounted after): where a write runs out of space. Skips the test where this machine does
    not let it mount one (not root, or no mount capability in the container)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
