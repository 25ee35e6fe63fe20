"""Many event files ingested in parallel on a real Ray cluster: each file read and checked by a
Ray task, committed in file order by the driver. The warehouse equals the local ingest's, row
for row, and a file that fails stops the run at its turn with one ``error:`` line.

The cluster is the session's ``ray start --head`` on 127.0.0.1 (2 CPUs).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.app.steps import ingest_events
from pipeline.config import load_settings
from pipeline.data.event_dataset import done_sources
from tests.pipeline.data.test_ingest_staged import warehouse_rows
from tests.support import Attnrec, assert_one_line_error


def test_many_files_on_ray_give_the_local_warehouse_and_dataset(ray_cluster: str, shared_data: Path, ml_small: Path,
                                                                tmp_path: Path) -> None:
    lines = (shared_data / "ml-1m" / "ml-1m.txt").read_text().splitlines(keepends=True)
    quarter = len(lines) // 4 + 1
    files = []
    for i in range(4):  # the SASRec file in four order-only parts: the source id orders their times
        files.append(tmp_path / f"ml-1m-{i}.txt")
        files[-1].write_text("".join(lines[i * quarter:(i + 1) * quarter]))
    files += [shared_data / "ml-100k" / "u.data", ml_small / "ratings.csv", files[0]]  # and a repeat
    results = {}
    for engine in ("local", "ray"):
        settings = load_settings(home=tmp_path / engine, engine=engine, ray_address=ray_cluster, event_buckets=4)
        reports = ingest_events(settings, files)
        results[engine] = ([{**r.as_dict(), "seconds": None} for r in reports], warehouse_rows(settings.duckdb_path))
    (local_reports, local), (ray_reports, on_ray) = results["local"], results["ray"]
    assert on_ray == local
    assert ray_reports == local_reports
    assert len(on_ray["events"]) == 999_611 + 100_000 + 100_836
    assert [r["identical_to"] for r in ray_reports] == [None] * 6 + [1]
    assert done_sources(tmp_path / "ray" / "events") == [1, 2, 3, 4, 5, 6]  # the dataset: every committed file
    assert list((tmp_path / "ray" / "tmp").glob("staged-*")) == []


def test_a_file_that_fails_on_a_ray_worker_is_one_error_line_and_the_files_before_it_stay(
        ray_cluster: str, tmp_path: Path) -> None:
    cli = Attnrec(tmp_path / "home", tmp_path)
    good = tmp_path / "good.csv"
    good.write_text("user,item,time\na,1,1600000000\nb,2,1600000001\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,time\nJosé,1,1600000000\n")
    later = tmp_path / "later.csv"
    later.write_text("user,item,time\nc,3,1600000002\n")
    proc = cli.run("ingest", good, bad, later, "--encoding", "ascii", "--engine", "ray", "--ray-address", ray_cluster,
                   "--json", ok=False)
    assert_one_line_error(proc, "bad.csv", "not ascii text at byte")
    assert cli.query("SELECT path FROM sources") == [(str(good),)]
    assert cli.query("SELECT count(*) FROM events") == [(2,)]
    assert list((tmp_path / "home" / "tmp").glob("staged-*")) == []
