"""Users' histories in pieces on disk, and the feature set's ``histories.arrow`` assembled from them.

The feature build writes its histories as pieces, one per user bucket (``user_key mod
event_buckets``): built one after the other from the warehouse, or each by the Ray task that
built it under ``engine = "ray"``. A piece is an Arrow file of some users' histories in
vocabulary order (``write_history_piece``); the builder gets back only its users' vocabulary
indices and lengths (``HistoryPiece``). The builder then reads one piece at a time
(``read_history_piece``) and scatters its rows into ``histories.arrow`` (``HistoriesFile``):
the columns are laid out in scratch files mapped into memory, so no process holds every
user's history at once, and the file is the one a build from a single frame writes, byte for
byte. The scratch files take as much disk as the events of ``histories.arrow`` while it is
written (the build's disk peak is about twice the file).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc


@dataclass
class HistoryPiece:
    """Where a piece is and which users it holds (what its writer sends back)."""

    path: Path
    user_idx: np.ndarray  # (u,) int32: vocabulary indices of its users (``min_events`` met), ascending
    lengths: np.ndarray   # (u,) int64: their event counts


def write_history_piece(histories: pl.DataFrame, min_events: int, path: Path) -> HistoryPiece:
    """Keep the users of ``histories`` (``features.histories.user_histories``'s frame, in
    ``user_idx`` order) with at least ``min_events`` events and write them to ``path``."""
    kept = histories.filter(pl.col("items").list.len() >= min_events)
    table = kept.select("user_idx", "items", "times").to_arrow()
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return HistoryPiece(path, kept["user_idx"].to_numpy().astype(np.int32),
                        kept["items"].list.len().to_numpy().astype(np.int64))


def read_history_piece(piece: HistoryPiece) -> pl.DataFrame:
    """The piece's frame (``user_idx``, ``items``, ``times``), read into memory."""
    with pa.OSFile(str(piece.path)) as f:
        return pl.from_arrow(ipc.open_file(f).read_all())  # type: ignore[return-value]


def piece_times(pieces: list[HistoryPiece]) -> Iterator[np.ndarray]:
    """Every event time of the pieces (int64), one array per piece, read one piece at a time."""
    for piece in pieces:
        yield read_history_piece(piece)["times"].explode().drop_nulls().to_numpy()


def final_user_order(pieces: list[HistoryPiece], num_users: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dense ``user_idx`` 0..U-1 for the kept users, in vocabulary order.

    Returns (kept, finals): ``kept`` (U,) int32 the vocabulary indices of the kept users,
    ascending; ``finals[p]`` (u_p,) int64 the new index of each user of piece p.
    """
    kept_mask = np.zeros(num_users, dtype=bool)
    for piece in pieces:
        kept_mask[piece.user_idx] = True
    kept = np.flatnonzero(kept_mask).astype(np.int32)
    return kept, [np.searchsorted(kept, piece.user_idx) for piece in pieces]


class HistoriesFile:
    """``histories.arrow`` filled piece by piece: ``items`` and ``times`` are laid out in the
    scratch files ``<path>.items`` / ``<path>.times`` (mapped into memory, removed by
    ``write``; their blocks are allocated up front, so a full disk is an ``OSError`` here, not
    a SIGBUS on a mapped page), the offsets in memory, so the writer holds one piece, not
    every history.

    Usage: ``f = HistoriesFile(path, lengths)``; ``f.put(piece_frame, finals)`` for every piece;
    ``f.write(users)`` with the user columns.
    """

    def __init__(self, path: Path, lengths: np.ndarray) -> None:
        """``lengths`` (U,) int64: the event count of each user, in the file's order."""
        self.path = path
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (U+1,)
        np.cumsum(lengths, out=self.offsets[1:])
        self.events = int(self.offsets[-1])
        self._files = {name: path.with_name(f"{path.name}.{name}") for name in ("items", "times")}
        for name, dtype in (("items", np.int32), ("times", np.int64)):
            with open(self._files[name], "wb") as f:
                if self.events:
                    os.posix_fallocate(f.fileno(), 0, self.events * np.dtype(dtype).itemsize)

    def _columns(self, mode: str) -> tuple[np.ndarray, np.ndarray]:
        if self.events == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return (np.memmap(self._files["items"], np.int32, mode, shape=(self.events,)),
                np.memmap(self._files["times"], np.int64, mode, shape=(self.events,)))

    def put(self, piece: pl.DataFrame, finals: np.ndarray) -> None:
        """Scatter one piece's ``items`` and ``times`` to the rows ``finals`` (u,), ascending, of the file."""
        lengths = piece["items"].list.len().to_numpy().astype(np.int64)                 # (u,)
        values = {name: piece[name].to_arrow().flatten().to_numpy() for name in ("items", "times")}  # (nnz,) each
        if not len(finals):
            return
        columns = dict(zip(("items", "times"), self._columns("r+"), strict=True))
        if finals[-1] - finals[0] + 1 == len(finals):  # consecutive rows (one bucket of all): one slice
            start, stop = self.offsets[finals[0]], self.offsets[finals[-1] + 1]
            for name, column in columns.items():
                column[start:stop] = values[name]
        else:
            dest = np.repeat(self.offsets[finals] - (np.cumsum(lengths) - lengths), lengths)  # (nnz,) row start - piece start
            dest += np.arange(len(dest), dtype=np.int64)                                   # (nnz,) file positions
            for name, column in columns.items():
                column[dest] = values[name]
        del columns  # unmapped: the piece's pages leave this process (written back by the kernel; no msync)

    def write(self, users: pl.DataFrame) -> None:
        """Write the file: ``users`` (``user_idx``, ``user_key``, ``user_id``; U rows in order)
        then ``items`` and ``times``, one record batch, 64-bit offsets (memory-mappable)."""
        items, times = self._columns("r")
        offsets = pa.py_buffer(self.offsets)
        columns = users.select(
            pl.col("user_idx").cast(pl.Int32), pl.col("user_key").cast(pl.Int64), pl.col("user_id").cast(pl.String)
        ).to_arrow()
        arrays = [columns.column("user_idx").combine_chunks(), columns.column("user_key").combine_chunks(),
                  columns.column("user_id").combine_chunks().cast(pa.large_string())]
        for values, value_type in ((items, pa.int32()), (times, pa.int64())):
            child = pa.Array.from_buffers(value_type, self.events, [None, pa.py_buffer(values)])
            arrays.append(pa.Array.from_buffers(pa.large_list(value_type), len(self.offsets) - 1,
                                                [None, offsets], children=[child]))
        batch = pa.RecordBatch.from_arrays(arrays, names=["user_idx", "user_key", "user_id", "items", "times"])
        with ipc.new_file(str(self.path), batch.schema) as writer:
            writer.write_batch(batch)
        del batch, arrays, items, times
        for file in self._files.values():
            file.unlink()
