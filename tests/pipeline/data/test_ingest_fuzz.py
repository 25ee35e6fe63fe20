"""Property-based fuzzing of the ingest parsers: whatever a file holds, ingest loads, counts as a
duplicate or quarantines every row, or refuses the file with one clear error; the warehouse stays
consistent, and a second delivery adds nothing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.ingest import IngestOptions, ingest_paths
from pipeline.data.warehouse import open_warehouse
from pipeline.errors import InputFileError

# values a hostile or careless producer writes into an id or a time field
scalars = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", " ", "NaN", "1e23", "-1", "2020-02-30", "1600000000", "0042", "٤٢"]),
    st.booleans(), st.none(),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)
rows = st.lists(st.fixed_dictionaries({"user": scalars, "item": scalars, "time": scalars},
                                      optional={"extra": json_values}), min_size=1, max_size=25)
encodings = st.sampled_from(["utf-8", "latin-1", "utf-16"])


def _csv_field(value: object) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def check_ingest(path: Path) -> None:
    """One delivery, then the same file again: every row accounted for, nothing twice."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with open_warehouse(Path(tmp) / "w.duckdb") as con:
                first = ingest_paths(con, [path], IngestOptions(), Path(tmp))[0]
                again = ingest_paths(con, [path], IngestOptions(), Path(tmp))[0]
                events, quarantine = con.execute(
                    "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM quarantine)").fetchall()[0]
                orphans = con.execute("""SELECT count(*) FROM events e WHERE e.user_key >= 4611686018427387904
                                         AND e.user_key NOT IN (SELECT user_key FROM user_dict)""").fetchall()[0][0]
        except InputFileError as exc:  # the file as a whole is refused: one line naming it
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
    assert first.loaded + first.duplicates + first.quarantined == first.rows
    assert (events, quarantine) == (first.loaded, first.quarantined)
    assert again.identical_to == first.source_id and events == first.loaded  # a re-delivery adds nothing
    assert orphans == 0  # every dictionary key has its id


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows)
def test_csv_of_any_values(data: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.csv"
        path.write_text("user,item,time\n" + "".join(
            ",".join(_csv_field(r[k]) for k in ("user", "item", "time")) + "\n" for r in data), encoding="utf-8")
        check_ingest(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows)
def test_ndjson_of_any_values(data: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        lines = [json.dumps({"user": "u", "item": "i", "time": 1600000000})]  # one good line names the fields
        lines += [json.dumps(r, default=str) for r in data]
        path.write_text("\n".join(lines) + "\n")
        check_ingest(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=400), encodings)
def test_random_bytes_and_other_encodings(noise: bytes, encoding: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.csv"
        good = "user,item,time\nJosé,1,1600000000\n".encode(encoding)
        path.write_bytes(good + noise + "\nZoë,2,1600000001\n".encode(encoding))
        check_ingest(path)
