"""Shared fixtures: a fresh attnrec installation per test and the real data sets.

Every test that writes gets its own ``ATTNREC_HOME`` under ``tmp_path``; the CLI is run
for real, as a subprocess (``python -m pipeline.cli``), against real DuckDB files
(helpers in ``tests/support.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Attnrec

REPO = Path(__file__).resolve().parents[1]

# `make test` runs the suite in one pytest-xdist worker per core. Each worker, and every CLI,
# server and Ray process it starts, then computes on one thread: two workers with two threads
# each would contend for the two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests that share a costly session fixture, or start Ray on this machine, run in one worker.
# (pytest-xdist's own xdist_group marks do nothing under pytest 9: xdist 3.8 renames a node
# through an attribute pytest 9 no longer reads, so the groups are given by path here.)
XDIST_GROUPS = {
    "ray": ("tests/pipeline/scale/", "tests/flows/test_pipeline_on_ray.py"),
    "pipeline-run": ("tests/flows/test_pipeline_flow.py", "tests/flows/test_mlflow_server.py"),
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``--dist loadgroup``: xdist's group scheduler with ``XDIST_GROUPS`` as the groups
    (every other test is a group of its own)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class PathGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((group for group, paths in XDIST_GROUPS.items() if nodeid.startswith(paths)), nodeid)

    return PathGroups(config, log)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty ATTNREC_HOME; the working directory is a clean folder (no attnrec.toml)."""
    for key in list(os.environ):
        if key.startswith("ATTNREC_"):
            monkeypatch.delenv(key)
    path = tmp_path / "home"
    monkeypatch.setenv("ATTNREC_HOME", str(path))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return path


@pytest.fixture
def cli(home: Path) -> Attnrec:
    """The real CLI bound to the ``home`` fixture's state folder."""
    return Attnrec(home, Path.cwd())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets. CI checks the repository out with ``shared/`` beside it."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "ml-1m" / "ml-1m.txt").is_file():
        pytest.fail(
            f"real data not found at {path}: the tests need the shared data folder "
            "(ml-1m/, ml-100k/, ml-latest-small/) checked out beside the repository",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def ml_small() -> Path:
    """ml-latest-small as shipped inside the repository."""
    path = REPO / "datasets" / "ml-latest-small"
    if not (path / "ratings.csv").is_file():
        pytest.fail(f"{path}/ratings.csv is missing from the repository", pytrace=False)
    return path


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real Ray head node on 127.0.0.1 (`ray start --head`, 2 CPUs, 200 MB object store) for
    the session; its address. Stopped at the end of the session, also when a test fails."""
    from pipeline.scale.cluster import local_cluster

    with local_cluster(num_cpus=2, object_store_bytes=200_000_000) as address:
        yield address
