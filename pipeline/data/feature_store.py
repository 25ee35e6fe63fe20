"""Versioned feature sets on disk: built from the warehouse, memory-mapped by the trainer.

Layout of ``HOME/features/<version>/``::

    manifest.json        source fingerprint, parameters, counts, split times (no wall-clock times,
                         so the same warehouse and parameters give the same bytes)
    items.parquet        item_idx, item_key, item_id, title, categories, in_events, cold, train_count,
                         item_text (what a sentence encoder reads: title, categories, free text)
    item_features.arrow  one row per item_idx (row 0 = padding): category_ids, text_tokens, numeric
    histories.arrow      user_idx, user_key, user_id, items (oldest first), times
    splits.parquet       user_idx, train_end, valid_pos, test_pos
    categories.parquet   category_id, name
    text-<encoder>-<digest>.npy  sentence embeddings of item_text, written on first use
                         (``pipeline.data.text_vectors``), named by a digest of the texts

``version`` hashes the warehouse fingerprint with the parameters and the feature code
version, so an unchanged warehouse reuses its feature set instead of rebuilding it.
``HOME/features/CURRENT`` names the latest built version.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from functools import partial
from datetime import UTC, datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from features.histories import item_popularity, user_histories
from features.item_content import category_ids, category_vocabulary, item_texts, numeric_fields, text_tokens
from features.splits import cold_items, leave_one_out, quantile_lower, temporal, time_quantiles
from features.vocabulary import item_vocabulary, user_vocabulary
from pipeline.config import FeatureSettings, Settings
from pipeline.data.event_dataset import bucket_sql
from pipeline.data.history_pieces import (HistoriesFile, HistoryPiece, final_user_order, piece_times,
                                           read_history_piece, write_history_piece)
from pipeline.data.warehouse import query_frame
from pipeline.errors import UserError

FEATURES_CODE_VERSION = 2
# (item vocabulary, user vocabulary, min_user_events, folder) -> the pieces of every kept
# user's history, written into the folder (``pipeline.data.history_pieces``)
PiecesOf = Callable[[pl.DataFrame, pl.DataFrame, int, Path], list[HistoryPiece]]
COLD_SEED = 20240601


def feature_params(fs: FeatureSettings) -> dict[str, Any]:
    p = fs.model_dump(mode="json")
    p["code_version"] = FEATURES_CODE_VERSION
    p["polars"] = pl.__version__
    return p


def source_fingerprint(con: duckdb.DuckDBPyConnection, event_types: list[str] | None) -> dict[str, Any]:
    """Order-independent digest of the events (and catalog) the feature set is built from."""
    where = "WHERE event_type IN (SELECT unnest(?::VARCHAR[]))" if event_types else ""
    params = [event_types] if event_types else []
    n, digest = con.execute(
        f"SELECT count(*), coalesce(sum(hash(user_key, item_key, ts, event_type))::VARCHAR, '0') FROM events {where}",
        params,
    ).fetchall()[0]
    n_items, items_digest = con.execute(
        "SELECT count(*), coalesce(sum(hash(item_key, title, categories::VARCHAR, text, numeric::VARCHAR))::VARCHAR, '0') FROM items_v"
    ).fetchall()[0]
    fp = hashlib.sha256(f"{n}|{digest}|{n_items}|{items_digest}".encode()).hexdigest()
    return {"fingerprint": fp, "events": int(n), "catalog_items": int(n_items)}


def feature_version(source: dict[str, Any], params: dict[str, Any]) -> str:
    blob = json.dumps({"source": source["fingerprint"], "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_arrow(df: pl.DataFrame, path: Path) -> None:
    """One-record-batch Arrow IPC file, uncompressed, 64-bit list offsets: memory-mappable."""
    table = df.to_arrow()
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            t = pa.large_list(t.value_type)
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            t = pa.large_string()
        fields.append(pa.field(f.name, t))
    table = table.cast(pa.schema(fields)).combine_chunks()
    with ipc.new_file(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=max(1, table.num_rows)):
            writer.write_batch(batch)


def _split_times(times: Callable[[], Iterator[np.ndarray]], fs: FeatureSettings) -> tuple[int, int]:
    """(valid_time, test_time) in microseconds; ``times()`` yields every event time."""
    def us(dt: datetime) -> int:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return int(dt.timestamp() * 1_000_000)

    if fs.split_time is not None:
        test_time = us(fs.split_time)
        if fs.valid_time:
            if fs.valid_time > fs.split_time:
                raise UserError(f"features.valid_time {fs.valid_time.isoformat()} is after features.split_time "
                                f"{fs.split_time.isoformat()}: validation comes before the test")
            return us(fs.valid_time), test_time
        try:
            valid_time = quantile_lower(lambda: (t[t < test_time] for t in times()), 1.0 - fs.test_fraction)  # the last share before the test
        except ValueError:
            raise UserError(f"features.split_time {fs.split_time.isoformat()}: no event is before it, "
                            "so there is nothing to train on") from None
        return valid_time, test_time
    return time_quantiles(times, fs.test_fraction)


def warehouse_pieces(con: duckdb.DuckDBPyConnection, event_types: list[str] | None, buckets: int,
                     items: pl.DataFrame, users: pl.DataFrame, min_events: int, folder: Path) -> list[HistoryPiece]:
    """The default ``PiecesOf``: one piece per user bucket (``user_key mod buckets``, the
    buckets of ``pipeline.data.event_dataset``), each read from the warehouse and built here,
    one after the other, so that this process holds one bucket's events at a time."""
    where = "AND event_type IN (SELECT unnest(?::VARCHAR[]))" if event_types else ""
    pieces = []
    for b in range(buckets):
        events = query_frame(con, f"SELECT user_key, item_key, ts, source_id, line FROM events "
                                  f"WHERE {bucket_sql('user_key', buckets)} = {b} {where}", [event_types] if event_types else [])
        pieces.append(write_history_piece(user_histories(events, items, users), min_events, folder / f"bucket-{b}.arrow"))
    return pieces


def build_feature_set(con: duckdb.DuckDBPyConnection, settings: Settings, force: bool = False,
                      pieces_of: PiecesOf | None = None) -> tuple[Path, bool]:
    """Build (or reuse) the feature set for the warehouse as it is now.

    Returns (folder, built): ``built`` is False when an identical feature set already existed.
    The folder is written under a temporary name and renamed into place, so a crash never
    leaves a half-written feature set. The users' histories are written as pieces
    (``pipeline.data.history_pieces``), one per user bucket (``settings.event_buckets``), and
    assembled one piece at a time: by default built here from the warehouse, one bucket after
    the other (``warehouse_pieces``); ``pieces_of`` builds them elsewhere (on Ray, from the
    partitioned event dataset: ``pipeline.scale.features``). Both give the same files, and
    the same as any other cut of the users would.
    """
    fs = settings.features
    params = feature_params(fs)
    source = source_fingerprint(con, fs.event_types)
    if source["events"] == 0:
        raise UserError(f"the warehouse {settings.duckdb_path} has no events: run `attnrec ingest` first")
    version = feature_version(source, params)
    root = settings.features_dir
    final = root / version
    if final.exists() and not force:
        set_current(root, version)
        return final, False

    where = "WHERE event_type IN (SELECT unnest(?::VARCHAR[]))" if fs.event_types else ""
    args = [fs.event_types] if fs.event_types else []

    catalog = query_frame(
        con, "SELECT item_key, title, categories, text, map_keys(numeric) AS num_keys, map_values(numeric) AS num_values FROM items_v"
    )
    item_ids = query_frame(con, "SELECT item_key, item_id FROM item_ids_v")
    user_ids = query_frame(con, "SELECT user_key, user_id FROM users_v")
    items = item_vocabulary(query_frame(con, f"SELECT DISTINCT item_key FROM events {where}", args), catalog.select("item_key"))
    users = user_vocabulary(query_frame(con, f"SELECT DISTINCT user_key FROM events {where}", args))

    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root)
    tmp = root / f".tmp-{version}-{os.getpid()}-{socket.gethostname()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "pieces").mkdir(parents=True)
    try:
        # Histories, in pieces
        build_pieces = pieces_of or partial(warehouse_pieces, con, fs.event_types, settings.event_buckets)
        pieces = build_pieces(items, users, fs.min_user_events, tmp / "pieces")
        kept, finals = final_user_order(pieces, users.height)
        if not len(kept):
            raise UserError(f"no user has features.min_user_events = {fs.min_user_events} events or more: "
                            "lower it or ingest more events")

        # Split times
        split_info: dict[str, Any] = {"kind": fs.split}
        if fs.split == "temporal":
            valid_time, test_time = _split_times(lambda: piece_times(pieces), fs)
            split_info.update({"valid_time_us": valid_time, "test_time_us": test_time,
                               "valid_time": datetime.fromtimestamp(valid_time / 1e6, UTC).isoformat(),
                               "test_time": datetime.fromtimestamp(test_time / 1e6, UTC).isoformat()})

        # Splits, training popularity and histories.arrow, one piece at a time
        cut = leave_one_out if fs.split == "loo" else partial(temporal, valid_time=valid_time, test_time=test_time)
        splits, counts_per_item, events = _assemble_histories(pieces, finals, kept, users, user_ids, items.height, cut,
                                                              tmp / "histories.arrow")
        (tmp / "pieces").rmdir()
        if not splits["train_end"].sum():
            raise UserError(f"no event is before the validation time {split_info['valid_time']}: nothing to train on; "
                            "move features.valid_time (or split_time) later")

        # Items: content, cold hold-out, training popularity (cold items never count)
        cold = cold_items(items, fs.cold_item_fraction, COLD_SEED)
        items = items.with_columns(cold)
        content = items.join(catalog, on="item_key", how="left").sort("item_idx")
        cat_vocab = category_vocabulary(content)
        num_names, numeric = numeric_fields(content)
        pad = pl.DataFrame({"item_idx": [0]}, schema={"item_idx": pl.Int32})
        item_features = pl.concat([
            pad.with_columns(pl.lit([], pl.List(pl.Int32)).alias("category_ids"), pl.lit([], pl.List(pl.Int32)).alias("text_tokens"),
                             pl.lit([0.0] * len(num_names), pl.List(pl.Float32)).alias("numeric")),
            content.select("item_idx").with_columns(
                category_ids(content, cat_vocab, fs.max_categories),
                text_tokens(content, fs.text_buckets, fs.max_text_tokens),
                numeric.alias("numeric"),
            ),
        ])
        pop = pl.DataFrame({"item_idx": np.arange(items.height + 1, dtype=np.int32), "count": counts_per_item})
        cold_idx = items.filter(pl.col("cold"))["item_idx"]
        pop = pop.with_columns(pl.when(pl.col("item_idx").is_in(cold_idx.implode())).then(0).otherwise(pl.col("count")).alias("count"))
        items_table = (
            content.select("item_idx", "item_key", "title", "categories", "in_events", "cold", item_texts(content))
            .join(item_ids, on="item_key", how="left")
            .join(pop.rename({"count": "train_count"}), on="item_idx", how="left")
            .select("item_idx", "item_key", "item_id", "title",
                    "categories", "in_events", "cold", "train_count", "item_text")
            .sort("item_idx")
        )

        counts = {
            "users": len(kept),
            "items": items.height,
            "events": events,
            "train_events": int(splits["train_end"].sum()),
            "valid_targets": int(splits["valid_pos"].is_not_null().sum()),
            "test_targets": int(splits["test_pos"].is_not_null().sum()),
            "categories": cat_vocab.height,
            "numeric_fields": len(num_names),
            "cold_items": int(cold.sum()),
            "catalog_only_items": int((~items["in_events"]).sum()),
        }
        manifest = {
            "format_version": 1,
            "version": version,
            "source": source,
            "params": params,
            "split": split_info,
            "counts": counts,
            "numeric_fields": num_names,
            "text_buckets": fs.text_buckets,
        }

        items_table.write_parquet(tmp / "items.parquet", statistics=False)
        cat_vocab.write_parquet(tmp / "categories.parquet", statistics=False)
        splits.write_parquet(tmp / "splits.parquet", statistics=False)
        _write_arrow(item_features, tmp / "item_features.arrow")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise UserError(f"{root}: no space left on its device for the feature set (it needs about twice the "
                            "size of histories.arrow while it is written): free space, or set home to a larger disk") from None
        raise
    set_current(root, version)
    return final, True


def _assemble_histories(pieces: list[HistoryPiece], finals: list[np.ndarray], kept: np.ndarray, users: pl.DataFrame,
                        user_ids: pl.DataFrame, num_items: int, cut: Callable[[pl.DataFrame], pl.DataFrame],
                        path: Path) -> tuple[pl.DataFrame, np.ndarray, int]:
    """Write ``histories.arrow`` at ``path`` from the pieces, reading (then removing) one at a
    time, the kept users (``kept``, (U,) vocabulary indices) renumbered 0..U-1 as ``finals``
    says (``final_user_order``); ``cut`` splits a piece's frame (``features.splits``).

    Returns (splits: U rows in ``user_idx`` order; training events per item, (N+1,) int64,
    row 0 the padding; the events in the file).
    """
    lengths = np.zeros(len(kept), dtype=np.int64)  # (U,) in the new user order
    for piece, rows in zip(pieces, finals, strict=True):
        lengths[rows] = piece.lengths
    histories_file = HistoriesFile(path, lengths)
    split_parts, counts_per_item = [], np.zeros(num_items + 1, dtype=np.int64)
    for piece, rows in zip(pieces, finals, strict=True):
        histories = read_history_piece(piece).with_columns(pl.Series("user_idx", rows, dtype=pl.Int32))
        split = cut(histories)
        counts_per_item += item_popularity(histories, split["train_end"], num_items)["count"].to_numpy()
        histories_file.put(histories, rows)
        split_parts.append(split)
        piece.path.unlink()
    user_columns = pl.DataFrame({
        "user_idx": np.arange(len(kept), dtype=np.int32),
        "user_key": users["user_key"].to_numpy()[kept],
    }).join(user_ids, on="user_key", how="left", maintain_order="left")
    histories_file.write(user_columns)
    return pl.concat(split_parts).sort("user_idx").rechunk(), counts_per_item, histories_file.events


def _remove_abandoned_builds(root: Path) -> None:
    """Remove the ``.tmp-<version>-<pid>-<host>`` folders of builds on this machine whose
    process is gone (killed, or the machine restarted); a running build's folder, or one of
    another machine sharing the folder, stays."""
    host = socket.gethostname()
    for folder in root.glob(".tmp-*"):
        parts = folder.name.removeprefix(".tmp-").split("-", 2)
        if len(parts) != 3 or parts[2] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def set_current(root: Path, version: str) -> None:
    tmp = root / f".CURRENT-{os.getpid()}"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / "CURRENT")


def current_feature_set(settings: Settings) -> Path:
    pointer = settings.features_dir / "CURRENT"
    if not pointer.exists():
        raise UserError(f"no feature set in {settings.features_dir}: run `attnrec features` first")
    path = settings.features_dir / pointer.read_text().strip()
    if not (path / "manifest.json").exists():
        raise UserError(f"feature set {path} is missing or incomplete: run `attnrec features --force`")
    return path


@dataclass
class Ragged:
    """A list column as CSR arrays: row r is ``values[offsets[r]:offsets[r+1]]``."""

    offsets: np.ndarray  # (R+1,) int64
    values: np.ndarray   # (nnz,)

    def row(self, r: int) -> np.ndarray:
        return self.values[self.offsets[r]:self.offsets[r + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _ragged(column: pa.Array) -> Ragged:
    arr = column if isinstance(column, pa.Array) else column.combine_chunks()
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    values = arr.values.to_numpy(zero_copy_only=False)
    return Ragged(offsets - offsets[0], values[offsets[0]:offsets[-1]] if len(values) else values)


def _read_arrow(path: Path) -> pa.RecordBatch:
    reader = ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.num_record_batches != 1:
        return pa.Table.from_batches([reader.get_batch(i) for i in range(reader.num_record_batches)]).combine_chunks().to_batches()[0]
    return reader.get_batch(0)


@dataclass
class FeatureSet:
    """A loaded feature set. Sequence arrays are memory-mapped views of ``histories.arrow``.
    It pickles as its folder and loads again from there (a Ray task's argument: the folder
    must be readable where it is unpickled; changes made to the object in memory do not travel)."""

    path: Path
    manifest: dict[str, Any]
    items: pl.DataFrame
    categories: pl.DataFrame
    item_categories: Ragged
    item_tokens: Ragged
    item_numeric: np.ndarray  # (num_items + 1, F) float32, row 0 = padding
    sequences: Ragged         # items per user, oldest first (int32 item_idx)
    times: Ragged             # event times per user (int64)
    user_keys: np.ndarray     # (U,) int64
    user_ids: list[str]
    train_end: np.ndarray     # (U,) int32
    valid_pos: np.ndarray     # (U,) int32, -1 = no target
    test_pos: np.ndarray      # (U,) int32, -1 = no target

    def __reduce__(self) -> tuple[Callable[[Path], FeatureSet], tuple[Path]]:
        return load_feature_set, (self.path,)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def cold_mask(self) -> np.ndarray:
        """(num_items + 1,) bool: items held out of training (index 0 = padding, False)."""
        mask = np.zeros(self.num_items + 1, dtype=bool)
        mask[self.items["item_idx"].to_numpy()] = self.items["cold"].to_numpy()
        return mask


def load_feature_set(path: Path) -> FeatureSet:
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{path} is not a feature set (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    hist = _read_arrow(path / "histories.arrow")
    feats = _read_arrow(path / "item_features.arrow")
    splits = pl.read_parquet(path / "splits.parquet")
    num = _ragged(feats.column("numeric"))
    n_fields = len(manifest["numeric_fields"])
    numeric = num.values.astype(np.float32).reshape(-1, n_fields) if n_fields else np.zeros((feats.num_rows, 0), np.float32)
    return FeatureSet(
        path=path,
        manifest=manifest,
        items=pl.read_parquet(path / "items.parquet"),
        categories=pl.read_parquet(path / "categories.parquet"),
        item_categories=_ragged(feats.column("category_ids")),
        item_tokens=_ragged(feats.column("text_tokens")),
        item_numeric=numeric,
        sequences=_ragged(hist.column("items")),
        times=_ragged(hist.column("times")),
        user_keys=hist.column("user_key").to_numpy(),
        user_ids=hist.column("user_id").to_pylist(),
        train_end=splits["train_end"].to_numpy(),
        valid_pos=splits["valid_pos"].fill_null(-1).to_numpy(),
        test_pos=splits["test_pos"].fill_null(-1).to_numpy(),
    )
