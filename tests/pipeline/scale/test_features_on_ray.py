"""The feature build on Ray, one task per user bucket of the event dataset, each writing its
piece of the histories, equals the local build: same feature-set version and the same files,
byte for byte, on MovieLens-100K (leave-one-out; and a temporal split, whose split times are
quantiles over every piece, with users below ``min_user_events`` left out in the tasks)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.steps import build_features, ingest_catalog, ingest_events
from pipeline.config import load_settings
from tests.support import Attnrec, assert_one_line_error


@pytest.mark.parametrize("cut", [{}, {"features.split": "temporal", "features.min_user_events": 100,
                                      "features.cold_item_fraction": 0.1}], ids=["loo", "temporal-min100"])
def test_features_built_on_ray_by_user_bucket_equal_the_local_build(ray_cluster: str, shared_data: Path,
                                                                     tmp_path: Path, cut: dict[str, Any]) -> None:
    ml100k = shared_data / "ml-100k"
    built = {}
    for engine in ("local", "ray"):
        settings = load_settings(home=tmp_path / engine, engine=engine, ray_address=ray_cluster, event_buckets=5, **cut)
        ingest_events(settings, [ml100k / "u.data"])
        ingest_catalog(settings, [ml100k / "u.item"])
        built[engine] = build_features(settings)
    local, on_ray = Path(built["local"]["path"]), Path(built["ray"]["path"])
    assert built["ray"]["version"] == built["local"]["version"] and built["ray"]["built"]
    assert built["ray"]["manifest"]["counts"] == built["local"]["manifest"]["counts"]
    assert built["ray"]["manifest"]["split"] == built["local"]["manifest"]["split"]
    assert built["ray"]["manifest"]["counts"]["events"] == (100_000 if not cut else 74_522)  # 364 users of 943 kept
    for name in ("histories.arrow", "splits.parquet", "items.parquet", "item_features.arrow"):
        assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name
    # ingest under engine = ray wrote the dataset; the local home has none
    assert len(list((tmp_path / "ray" / "events").glob("bucket=*/source-*.parquet"))) == 5
    assert not (tmp_path / "local" / "events").exists()
    assert {p.name for p in on_ray.parent.iterdir()} == {"CURRENT", on_ray.name}  # no pieces left


def test_an_unreadable_file_of_the_event_dataset_is_one_error_line_naming_it(ray_cluster: str, shared_data: Path,
                                                                             cli: Attnrec) -> None:
    """A damaged bucket file used to end the Ray build in a 74-line traceback, the file unnamed."""
    ml100k = shared_data / "ml-100k"
    ray = ("--engine", "ray", "--ray-address", ray_cluster)
    cli.run("ingest", ml100k / "u.data", *ray)
    built = cli.features(*ray)
    damaged = sorted((cli.home / "events" / "bucket=3").glob("source-*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    line = assert_one_line_error(cli.run("features", "--force", *ray, ok=False), str(damaged),
                                 "cannot be read", f"remove {cli.home / 'events'}")
    assert "PAR1" in line  # the reader's own words, first line only
    assert {p.name for p in (cli.home / "features").iterdir()} == {"CURRENT", built["version"]}  # nothing half-written
    # the remedy the line gives works: the dataset is written again from the warehouse
    shutil.rmtree(cli.home / "events")
    again = cli.features("--force", *ray)
    assert again["version"] == built["version"] and again["counts"] == built["counts"]
