"""Users' histories read back from the warehouse, for serving and batch scoring.

A history is the user's warehouse item keys, oldest first (ties in time broken by file
order, as the feature store does). User ids become keys by the one identity rule
(``pipeline.data.identity``), so the cached store of the HTTP server and the uncached one
of the CLI give the same history for every id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np

from pipeline.data.identity import canonical_id, id_of_key_sql, integer_key
from pipeline.data.warehouse import connect, lookup_keys
from pipeline.errors import UserError

HISTORY_ORDER = "ts, source_id, line"


@dataclass(frozen=True)
class UserRange:
    """The users whose warehouse key is in ``[first, last]``: one partition of batch scoring."""

    first: int
    last: int


class WarehouseUnavailable(UserError):
    """The warehouse cannot be read right now (missing, or a writer holds its lock): try again."""


@dataclass(frozen=True)
class HistoryEvent:
    """One event of a user's history as a person reads it: the item and when (None for a
    source that gives order only)."""

    item_key: int
    item_id: str
    at: datetime | None


class HistoryStore:
    """User histories from the warehouse file at ``db_path``.

    The DuckDB file is opened read-only only while reading, so ``attnrec ingest`` can
    write meanwhile. With ``cache=True`` (the HTTP server) all histories are held in
    memory and re-read for the users touched by new sources once the warehouse file
    changes (checked at most every ``refresh_seconds``); while a writer holds the file,
    the cached histories keep being served.
    """

    def __init__(self, db_path: Path, cache: bool = False, refresh_seconds: float = 0.5) -> None:
        self.db_path = db_path
        self.cache = cache
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._histories: dict[int, np.ndarray] = {}
        self._dictionary: dict[str, int] = {}  # user_dict: id -> key, for ids that are not their own key
        self._last_source = 0
        self._stamp: tuple[int, ...] = ()
        self._checked = 0.0
        self._loaded = False  # cache: every history has been read at least once
        if cache:
            self._refresh(force=True)

    def _unavailable(self) -> WarehouseUnavailable:
        if not self.db_path.exists():
            return WarehouseUnavailable(f"no warehouse at {self.db_path}: run `attnrec ingest` first")
        return WarehouseUnavailable(f"cannot read the warehouse {self.db_path}: a writer holds it (an ingest?); "
                                    "the histories are read as soon as it is free")

    def ready(self) -> tuple[bool, str | None]:
        """(whether histories can be answered now, why not)."""
        if self.cache:
            self._refresh(force=not self._loaded)
            return self._loaded, None if self._loaded else str(self._unavailable())
        con = self._connect()
        if con is None:
            return False, str(self._unavailable())
        con.close()
        return True, None

    def _file_stamp(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for p in (self.db_path, self.db_path.with_name(self.db_path.name + ".wal")):
            try:
                st = p.stat()
                stamp += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                stamp += [0, 0]
        return tuple(stamp)

    def _connect(self) -> duckdb.DuckDBPyConnection | None:
        if not self.db_path.exists():
            return None
        try:
            return connect(self.db_path, read_only=True, retries=1)
        except UserError:  # a writer holds the file right now
            return None

    @contextmanager
    def _reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for one read, closed after it; ``WarehouseUnavailable`` when
        the file is missing or a writer holds it."""
        con = self._connect()
        if con is None:
            raise self._unavailable()
        try:
            yield con
        finally:
            con.close()

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return
        self._checked = now
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return
        con = self._connect()
        if con is None:
            return
        try:
            last = con.execute("SELECT coalesce(max(source_id), 0) FROM sources WHERE kind = 'events'").fetchall()[0][0]
            users_sql = "SELECT DISTINCT user_key FROM events WHERE source_id > ?"
            rows = con.execute(
                f"""SELECT user_key, item_key FROM events WHERE user_key IN ({users_sql})
                    ORDER BY user_key, {HISTORY_ORDER}""", [self._last_source],
            ).fetchnumpy()
            dictionary = con.execute("SELECT user_id, user_key FROM user_dict").fetchall()
        finally:
            con.close()
        users, items = rows["user_key"], rows["item_key"]
        starts, ends = _runs(users)
        with self._lock:
            for s, e in zip(starts, ends, strict=True):
                self._histories[int(users[s])] = items[s:e].copy()
            self._dictionary = {uid: int(k) for uid, k in dictionary}
            self._last_source = int(last)
            self._stamp = stamp
            self._loaded = True

    def history(self, user_id: str) -> np.ndarray | None:
        """Item keys of ``user_id`` oldest first, or None for a user the warehouse does not know.

        Raises ``InvalidId`` for an id the identity rule refuses (empty, too long).
        """
        uid = canonical_id(user_id, "user id")
        if self.cache:
            self._refresh(force=not self._loaded)
            if not self._loaded:
                raise self._unavailable()
            with self._lock:
                key = integer_key(uid)
                key = self._dictionary.get(uid) if key is None else key
                return None if key is None else self._histories.get(key)
        with self._reading() as con:
            key = lookup_keys(con, "user", [uid]).get(uid)
            if key is None:
                return None
            return con.execute(
                f"SELECT item_key FROM events WHERE user_key = ? ORDER BY {HISTORY_ORDER}", [key]
            ).fetchnumpy()["item_key"]

    def timeline(self, user_id: str) -> list[HistoryEvent] | None:
        """The events of ``user_id`` oldest first, in the order of ``history``, with each item's id
        and time, read from the warehouse file (never the cache: times are not cached); None for
        a user the warehouse does not know."""
        uid = canonical_id(user_id, "user id")
        with self._reading() as con:
            key = lookup_keys(con, "user", [uid]).get(uid)
            if key is None:
                return None
            rows = con.execute(
                f"""SELECT e.item_key, {id_of_key_sql('e.item_key', 'd', 'item')}, e.ts, s.time_kind = 'time'
                    FROM events e LEFT JOIN item_dict d USING (item_key) JOIN sources s USING (source_id)
                    WHERE e.user_key = ? ORDER BY {HISTORY_ORDER}""", [key]).fetchall()
        return [HistoryEvent(int(key), str(iid), datetime.fromtimestamp(ts / 1e6, tz=UTC) if timed else None)
                for key, iid, ts, timed in rows]

    def all_histories(self, users: UserRange | None = None) -> tuple[list[str], list[np.ndarray]]:
        """Every user's (id, item keys) from the warehouse, in key order (batch scoring);
        only the users of ``users`` when given."""
        where, params = ("WHERE e.user_key BETWEEN ? AND ?", [users.first, users.last]) if users else ("", [])
        with self._reading() as con:
            rows = con.execute(
                f"""SELECT e.user_key, {id_of_key_sql('e.user_key', 'd', 'user')} AS uid, e.item_key
                    FROM events e LEFT JOIN user_dict d USING (user_key) {where}
                    ORDER BY e.user_key, {HISTORY_ORDER}""", params
            ).fetchnumpy()
        users, items, uids = rows["user_key"], rows["item_key"], rows["uid"]
        starts, ends = _runs(users)
        return [str(uids[s]) for s in starts], [items[s:e] for s, e in zip(starts, ends, strict=True)]

    def user_ranges(self, parts: int = 1, within: UserRange | None = None, most: int | None = None) -> list[UserRange]:
        """The warehouse's users (those of ``within`` when given) cut into ranges of consecutive
        keys with about as many users each, in key order (so their batch scores, concatenated,
        are in the order of ``all_histories``): ``parts`` ranges, or more where one would hold
        over ``most`` users; fewer where there are fewer users; none when there are none."""
        where, params = ("WHERE user_key BETWEEN ? AND ?", [within.first, within.last]) if within else ("", [])
        with self._reading() as con:
            keys = con.execute(f"SELECT DISTINCT user_key FROM events {where} ORDER BY user_key",
                               params).fetchnumpy()["user_key"]  # (users,) int64
        if parts < 1 or (most is not None and most < 1):
            raise ValueError(f"user_ranges: parts = {parts} and most = {most} must be at least 1")
        if not len(keys):
            return []
        count = max(parts, -(-len(keys) // most) if most else 1)
        return [UserRange(int(chunk[0]), int(chunk[-1])) for chunk in np.array_split(keys, min(count, len(keys))) if len(chunk)]


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of equal values in a sorted key array."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return starts, np.r_[starts[1:], len(sorted_keys)]
