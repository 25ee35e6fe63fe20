"""Histories in pieces: however the users are cut into pieces, ``histories.arrow`` assembled
from them is the file written from the whole frame at once, byte for byte."""

from __future__ import annotations

import errno
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.feature_store import _write_arrow
from pipeline.data.history_pieces import (HistoriesFile, final_user_order, piece_times, read_history_piece,
                                          write_history_piece)
from tests.support import small_disk


def whole_file(histories: pl.DataFrame, min_events: int, user_ids: pl.DataFrame, path: Path) -> bytes:
    """The file as one frame gives it (how the feature build wrote it before pieces). The kept
    rows are rebuilt from Python lists: a filtered Polars list column can keep the dropped
    users' values in its buffer, and the file from pieces holds only the kept ones."""
    kept = histories.filter(pl.col("items").list.len() >= min_events).with_columns(
        pl.int_range(0, pl.len(), dtype=pl.Int32).alias("user_idx"))
    kept = pl.DataFrame(kept.to_dict(as_series=False), schema=kept.schema)
    kept = kept.join(user_ids, on="user_key", how="left", maintain_order="left").select(
        "user_idx", "user_key", "user_id", "items", "times")
    _write_arrow(kept, path)
    return path.read_bytes()


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=40), pieces=st.integers(1, 5),
       min_events=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_any_cut_into_pieces_assembles_the_whole_frames_file(lengths: list[int], pieces: int, min_events: int,
                                                              seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = len(lengths)
    histories = pl.DataFrame({
        "user_idx": np.arange(n, dtype=np.int32),
        "user_key": np.sort(rng.choice(10_000, n, replace=False)).astype(np.int64) - 5_000,
        "items": [rng.integers(1, 50, k).astype(np.int32) for k in lengths],
        "times": [np.sort(rng.integers(-10**12, 10**12, k)) for k in lengths],
    }, schema={"user_idx": pl.Int32, "user_key": pl.Int64, "items": pl.List(pl.Int32), "times": pl.List(pl.Int64)})
    user_ids = pl.DataFrame({"user_key": histories["user_key"], "user_id": [f"u{k}" for k in histories["user_key"]]})
    piece_of_user = rng.integers(0, pieces, n)  # any cut, as user buckets give
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        expected = whole_file(histories, min_events, user_ids, folder / "whole.arrow")
        written = [write_history_piece(histories.filter(pl.Series(piece_of_user == p)), min_events, folder / f"{p}.arrow")
                   for p in range(pieces)]
        kept, finals = final_user_order(written, n)
        assert kept.tolist() == [u for u in range(n) if lengths[u] >= min_events]
        if not len(kept):
            return
        times = np.concatenate(list(piece_times(written)))
        assert sorted(times.tolist()) == sorted(t for u in kept for t in histories["times"][int(u)].to_list())
        lengths_now = np.zeros(len(kept), dtype=np.int64)
        for piece, rows in zip(written, finals, strict=True):
            lengths_now[rows] = piece.lengths
        out = HistoriesFile(folder / "histories.arrow", lengths_now)
        for piece, rows in reversed(list(zip(written, finals, strict=True))):  # in any order
            out.put(read_history_piece(piece), rows)
        users = pl.DataFrame({"user_idx": np.arange(len(kept), dtype=np.int32),
                              "user_key": histories["user_key"].to_numpy()[kept]}).join(
            user_ids, on="user_key", how="left", maintain_order="left")
        out.write(users)
        assert (folder / "histories.arrow").read_bytes() == expected
        assert sorted(p.name for p in folder.iterdir()) == sorted(["whole.arrow", "histories.arrow"]
                                                                  + [f"{p}.arrow" for p in range(pieces)])


def test_scratch_files_that_do_not_fit_are_an_os_error_not_a_bus_error(tmp_path: Path) -> None:
    """Sparse scratch files filled through a memory map killed the build with SIGBUS (exit 135,
    its temporary folder left) where the disk filled; their blocks are now allocated first."""
    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        with pytest.raises(OSError) as caught:
            HistoriesFile(disk / "histories.arrow", np.full(1_000, 1_000, dtype=np.int64))  # 12 MB of events
        assert caught.value.errno == errno.ENOSPC
