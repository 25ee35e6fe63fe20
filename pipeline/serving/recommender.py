"""The Python API: ``from pipeline import Recommender``.

    rec = Recommender.load()                              # the registry champion of ./.attnrec
    rec.recommend(user="42", k=10, explain=True)          # a warehouse user's history
    rec.recommend(items=["1", "260"], k=10)               # an ad-hoc history, oldest first
    rec.similar("1", k=10)                                # items near an item
    rec.item("1"), rec.search("star wars", limit=20)      # catalogue facts, title search
    rec.timeline("42")                                    # a user's history with times
    rec.recommend_all(k=50)                               # every user: a Polars frame
    rec.recommend_chunks(k=50)                            # the same rows, CHUNK_USERS users at a time

Ids are always in the user's terms (the identity rule of ``pipeline.data.identity``);
answers are plain dataclasses (``pipeline.serving.query``). The CLI, the HTTP server and
batch scoring are thin shells over this class, and it is a thin shell over the one query
path, ``pipeline.serving.query.recommend``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.config import Settings, load_settings
from pipeline.data.histories import HistoryEvent, HistoryStore, UserRange
from pipeline.errors import UserError
from pipeline.registry.model_store import Bundle, bundle_stamp, resolve_bundle
from pipeline.serving.query import (Filters, ItemInfo, Recommendations, check_k, indices_of_ids, item_info, rank, recommend,
                                    search_titles, set_threads, similar)

log = logging.getLogger(__name__)

# Users whose histories and answers batch scoring holds at once (``recommend_chunks``): a
# partition's memory is this many users', not all of its users' (at 50M events about 11-17 KB
# per user when a partition was one piece).
CHUNK_USERS = 50_000


class UnknownItems(UserError):
    """Item ids the model does not know; ``ids`` lists them."""

    def __init__(self, ids: list[str]) -> None:
        shown = ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else "")
        super().__init__(f"unknown item ids: {shown}")
        self.ids = ids


class Recommender:
    """A loaded model bundle and the warehouse's user histories, queried in the user's ids."""

    def __init__(self, bundle: Bundle, histories: HistoryStore | None = None) -> None:
        self.bundle = bundle
        self.histories = histories

    @classmethod
    def load(cls, model: str | Path | None = None, *, home: str | Path | None = None, settings: Settings | None = None,
             device: str = "cpu", cache_histories: bool = False, threads: int | None = None) -> Recommender:
        """Load a model and connect the warehouse of a state folder.

        Args:
            model: None (the registry champion), ``models:/attnrec/3``, ``models:/attnrec@champion``,
                ``latest`` (the newest local run) or a bundle / run folder.
            home: the state folder (default ``$ATTNREC_HOME`` or ``./.attnrec``); or ``settings``.
            cache_histories: hold every history in memory, refreshed as the warehouse changes
                (a long-running server); otherwise each query reads the warehouse.
            threads: torch and FAISS threads per query (default: the libraries' own).
        """
        settings = settings or load_settings(home=home)
        if threads is not None:
            set_threads(threads)
        bundle = Bundle.load(resolve_bundle(settings, model), device)
        return cls(bundle, HistoryStore(settings.duckdb_path, cache=cache_histories))

    @property
    def version(self) -> str:
        """The model's name: ``attnrec v3`` for a registry model, else its file hash."""
        return self.bundle.version

    @property
    def num_items(self) -> int:
        return self.bundle.num_items

    def ready(self) -> tuple[bool, str | None]:
        """(whether every query can be answered now, why not): the model is loaded; the users'
        histories can be read unless this Recommender has no warehouse."""
        return (True, None) if self.histories is None else self.histories.ready()

    def recommend(self, user: str | None = None, items: Sequence[str] | None = None, k: int = 10, explain: bool = False,
                  exclude_seen: bool = True, include_categories: list[str] | None = None,
                  exclude_categories: list[str] | None = None, exclude_items: list[str] | None = None) -> Recommendations:
        """Top ``k`` for a warehouse ``user`` or for an ad-hoc history of ``items`` (oldest first).

        An unknown user gets the most popular items with ``known_user=False``; unknown item
        ids raise ``UnknownItems``; ``explain`` attaches the reasons (attention shares).
        """
        if (user is None) == (items is None):
            raise UserError("give exactly one of user or items")
        check_k(k)
        filters = Filters(exclude_seen, include_categories, exclude_categories, exclude_items)
        if user is not None:
            keys = self._store().history(user)
            bundle = self.bundle  # one bundle per query, however often the model is swapped meanwhile
            history = bundle.indices_of_keys(keys) if keys is not None else np.zeros(0, np.int64)
            answer = recommend(bundle, [history], k, explain, filters)[0]
            answer.known_user = keys is not None
            return answer
        bundle = self.bundle
        known, unknown = indices_of_ids(bundle, list(items or []))
        if unknown:
            raise UnknownItems(unknown)
        return recommend(bundle, [np.asarray(known, dtype=np.int64)], k, explain, filters)[0]

    def similar(self, item: str, k: int = 10) -> Recommendations:
        """The ``k`` items nearest to ``item`` in the model's item space (FAISS)."""
        bundle = self.bundle
        known, unknown = indices_of_ids(bundle, [item])
        if unknown:
            raise UnknownItems(unknown)
        return similar(bundle, known, k)[0]

    def item(self, item: str) -> ItemInfo:
        """The catalogue facts of ``item`` (title, categories, popularity); ``UnknownItems`` if the model does not know it."""
        bundle = self.bundle
        known, unknown = indices_of_ids(bundle, [item])
        if unknown:
            raise UnknownItems(unknown)
        return item_info(bundle, known[0])

    def search(self, text: str, limit: int = 20) -> list[ItemInfo]:
        """Items whose title contains ``text`` (any case), or whose id it is, the most popular first."""
        return search_titles(self.bundle, text, limit)

    def timeline(self, user: str) -> list[HistoryEvent] | None:
        """The warehouse ``user``'s events oldest first with item ids and times (None: unknown user)."""
        return self._store().timeline(user)

    def recommend_all(self, k: int = 50, users: UserRange | None = None) -> pl.DataFrame:
        """Top ``k`` unseen items for every warehouse user (or the users of ``users``, one
        partition of a distributed run), through the same query path as ``recommend``:
        ``user_id``, ``rank`` (1..k), ``item_id``, ``score``, ``fallback`` ("popular" for a
        user without usable history, else null), ``model_version``; users in key order."""
        return pl.concat(list(self.recommend_chunks(k, users)))

    def recommend_chunks(self, k: int = 50, users: UserRange | None = None,
                         most_users: int | None = None) -> Iterator[pl.DataFrame]:
        """``recommend_all``'s frame in consecutive pieces of at most ``most_users`` users each
        (default ``CHUNK_USERS``; at least one piece, empty when there are no users), so that
        batch scoring holds one piece's histories and answers at a time, however many users it
        writes. ``k`` and the warehouse are checked here, before the first piece. Each piece is
        its own read of the warehouse: events committed meanwhile reach the pieces read after."""
        check_k(k)
        store = self._store()
        chunks = store.user_ranges(within=users, most=most_users or CHUNK_USERS) or [UserRange(0, -1)]

        def pieces() -> Iterator[pl.DataFrame]:
            for chunk in chunks:
                user_ids, key_lists = store.all_histories(chunk)
                yield self._frame(user_ids, key_lists, k)

        return pieces()

    def _frame(self, user_ids: list[str], key_lists: list[np.ndarray], k: int) -> pl.DataFrame:
        """The top ``k`` of these users' histories (item keys, oldest first) as ``recommend_all``'s rows."""
        bundle = self.bundle
        ranked = rank(bundle, [bundle.indices_of_keys(keys) for keys in key_lists], k)
        counts = np.array([len(r.items) for r in ranked], dtype=np.int64)
        items = np.concatenate([r.items for r in ranked]) if ranked else np.zeros(0, np.int64)
        item_ids = np.array(bundle.item_ids, dtype=object)
        return pl.DataFrame({
            "user_id": np.repeat(np.array(user_ids, dtype=object), counts).tolist(),
            "rank": np.concatenate([np.arange(1, c + 1) for c in counts]) if len(counts) else np.zeros(0),
            "item_id": item_ids[items - 1].tolist(),
            "score": np.concatenate([r.scores for r in ranked]) if ranked else np.zeros(0, np.float32),
            "fallback": np.repeat(np.array([r.fallback for r in ranked], dtype=object), counts).tolist(),
        }, schema={"user_id": pl.String, "rank": pl.Int32, "item_id": pl.String, "score": pl.Float32,
                   "fallback": pl.String}).with_columns(pl.lit(bundle.version).alias("model_version"))

    def follow(self, settings: Settings, model: str | Path | None, every_s: float,
               on_swap: Callable[[str, str], None] | None = None) -> threading.Event | None:
        """Keep serving whatever ``model`` names: when it is a registry alias (None: the champion),
        check it every ``every_s`` seconds in a background thread and, when the alias has moved
        or the bundle's index was rebuilt, load the new bundle beside the old one and swap it in
        (one assignment: a query in flight finishes on the bundle it started with). Returns the
        event that stops the thread, or None when ``model`` is a fixed version or folder."""
        ref = str(model) if model is not None else f"models:/{settings.registry.model_name}@{settings.registry.champion_alias}"
        if not ref.startswith("models:/") or "@" not in ref:
            return None
        from pipeline.registry.tracking import version_by_alias

        name, alias = ref.removeprefix("models:/").split("@", 1)
        stop = threading.Event()
        seen: list[str | None] = [None]  # the alias's version when last resolved

        def watch() -> None:
            while not stop.wait(every_s):
                try:
                    current = version_by_alias(settings, name, alias)  # one registry query, no file read
                    path = self.bundle.path
                    if current is not None and current[0] != seen[0]:
                        path, seen[0] = resolve_bundle(settings, ref), current[0]  # fetched (and checked) once
                    if (path, bundle_stamp(path)) != (self.bundle.path, self.bundle.stamp):
                        old, new = self.bundle.version, Bundle.load(path, self.bundle.device)
                        self.bundle = new
                        if on_swap:
                            on_swap(old, new.version)
                except Exception as exc:  # the registry or a file is unavailable now: keep serving, retry later
                    log.warning("could not check %s for a new model (%s); still serving %s", ref, exc, self.version)

        threading.Thread(target=watch, name="follow-model", daemon=True).start()
        return stop

    def _store(self) -> HistoryStore:
        if self.histories is None:
            raise UserError("this Recommender has no warehouse: load it with Recommender.load(home=...)")
        return self.histories
