"""``recommend-all`` on a real Ray cluster equals the local run for every user.

The cluster is the session's ``ray start --head`` on 127.0.0.1; the users are split into
partitions of user keys, each scored by a Ray task that loads the bundle once. The frames
are compared whole (users, ranks, items, scores to the bit), on MovieLens-100K here and on
MovieLens-1M in the slow test.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.app.steps import recommend_everyone
from pipeline.config import load_settings
from pipeline.data.warehouse import connect
from pipeline.scale.cluster import free_port
from tests.pipeline.conftest import seeded_flat_bundle
from tests.support import Attnrec, assert_one_line_error


def scored_home(home: Path, events: Path, items: Path, id_map: Path | None = None) -> Path:
    """``home`` with a seeded random-weight bundle (flat index) at ``home/bundle``, which batch
    scoring is pointed at."""
    seeded_flat_bundle(home, events, items, id_map)
    return home


def local_and_ray(home: Path, address: str, partitions: int, k: int = 10) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """The local frame, the Ray frame and the Ray run's report."""
    bundle = str(home / "bundle")
    local = recommend_everyone(load_settings(home=home), k, home / "local.parquet", bundle, "local_recs")
    on_ray = recommend_everyone(load_settings(home=home, engine="ray", ray_address=address, partitions=partitions),
                                k, home / "ray.parquet", bundle, "ray_recs")
    assert local["engine"] == "local" and local["partitions"] is None
    return pl.read_parquet(local["file"]), pl.read_parquet(on_ray["file"]), on_ray


def test_recommend_all_on_ray_equals_the_local_run_on_ml100k(ray_cluster: str, shared_data: Path, tmp_path: Path) -> None:
    home = scored_home(tmp_path / "home", shared_data / "ml-100k" / "u.data", shared_data / "ml-100k" / "u.item")
    local, on_ray, report = local_and_ray(home, ray_cluster, partitions=3)
    assert local.height == 943 * 10 and local["user_id"].n_unique() == 943
    assert on_ray.equals(local), "the Ray frame differs from the local one"
    parts = sorted((home / "ray.parts").glob("part-*.parquet"))
    assert report["partitions"]["count"] == len(parts) == 3
    sizes = [pl.read_parquet(p)["user_id"].n_unique() for p in parts]
    assert sum(sizes) == 943 and max(sizes) - min(sizes) <= 1  # equal shares of users, each user in one part
    with connect(home / "warehouse.duckdb", read_only=True) as con:
        assert con.execute("SELECT count(*) FROM ray_recs").fetchone()[0] == local.height


@pytest.mark.slow
def test_recommend_all_on_ray_equals_the_local_run_on_ml1m(ray_cluster: str, shared_data: Path, tmp_path: Path) -> None:
    ml1m = shared_data / "ml-1m"
    home = scored_home(tmp_path / "home", ml1m / "ml-1m.txt", ml1m / "movies.dat", ml1m / "sas_to_original_items.txt")
    local, on_ray, _ = local_and_ray(home, ray_cluster, partitions=4)
    assert local["user_id"].n_unique() == 6040 and local.height == 6040 * 10
    assert on_ray.equals(local), "the Ray frame differs from the local one"


def test_an_unreachable_ray_address_is_one_error_line(small_cli: Attnrec) -> None:
    proc = small_cli.run("recommend-all", "--model", "latest", "--engine", "ray", "--ray-address",
                         f"127.0.0.1:{free_port()}", ok=False, timeout=60)
    assert_one_line_error(proc, "ray_address", "no Ray cluster answers there")
