"""The feature build on Ray, one task per user bucket of the event dataset, equals the local
build: same feature-set version and the same files, byte for byte, on MovieLens-100K."""

from __future__ import annotations

from pathlib import Path

from pipeline.app.steps import build_features, ingest_catalog, ingest_events
from pipeline.config import load_settings


def test_features_built_on_ray_by_user_bucket_equal_the_local_build(ray_cluster: str, shared_data: Path,
                                                                     tmp_path: Path) -> None:
    ml100k = shared_data / "ml-100k"
    built = {}
    for engine in ("local", "ray"):
        settings = load_settings(home=tmp_path / engine, engine=engine, ray_address=ray_cluster, event_buckets=5)
        ingest_events(settings, [ml100k / "u.data"])
        ingest_catalog(settings, [ml100k / "u.item"])
        built[engine] = build_features(settings)
    local, on_ray = Path(built["local"]["path"]), Path(built["ray"]["path"])
    assert built["ray"]["version"] == built["local"]["version"] and built["ray"]["built"]
    assert built["ray"]["manifest"]["counts"] == built["local"]["manifest"]["counts"]
    assert built["ray"]["manifest"]["counts"]["events"] == 100_000
    for name in ("histories.arrow", "splits.parquet", "items.parquet", "item_features.arrow"):
        assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name
    # ingest under engine = ray wrote the dataset; the local home has none
    assert len(list((tmp_path / "ray" / "events").glob("bucket=*/source-*.parquet"))) == 5
    assert not (tmp_path / "local" / "events").exists()
