"""Prefect for the flow tests: its home in a temporary folder, analytics off.

Prefect reads its settings on import, so the environment is set here, before any test
module imports ``flows``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="attnrec-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # a test run leaves no Prefect home behind
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "datasets" / "ml-latest-small"
# Small, quick model settings for flow tests (the flows are what is under test here): a sampled
# softmax, because the full softmax over ml-latest-small's 9,724 items is most of a tiny model's
# step. (Tiny models do not beat most-popular, so the gate's popularity floor is off for them.)
TINY = {"train.epochs": 2, "model.max_len": 30, "model.hidden_size": 16, "train.batch_size": 128,
        "train.negatives": 256, "registry.popularity_floor": False}


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pipeline_run(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The pipeline run twice on ml-latest-small: (home, first result, second result with no new events)."""
    from flows.pipeline_flows import attnrec_pipeline

    home = tmp_path_factory.mktemp("flow") / "home"
    first = attnrec_pipeline(event_files=[str(DATA / "ratings.csv")],
                             item_files=[str(DATA / "movies.csv"), str(DATA / "tags.csv")],
                             k=10, home=str(home), overrides=TINY)
    features_dir = Path(first["features"]["path"])
    stamp = {p.name: p.stat().st_mtime_ns for p in features_dir.iterdir()}
    second = attnrec_pipeline(event_files=[str(DATA / "ratings.csv")], k=10, home=str(home), overrides=TINY)
    second["_stamp_before"] = stamp
    return home, first, second


