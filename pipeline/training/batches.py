"""Left-padded sequence batches from a feature set's ragged arrays (numpy, no torch).

Training samples are windows of each user's training events (cold items removed): the
input is window[:-1] and the target window[1:]. Evaluation inputs are the events before a
target position. Everything is right-aligned: the newest item sits in the last column.
"""

from __future__ import annotations

import heapq
import math

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.feature_store import Ragged


def training_sequences(sequences: Ragged, train_end: np.ndarray, cold: np.ndarray) -> Ragged:
    """Each user's first ``train_end[u]`` events without cold items, as a new ``Ragged``."""
    lengths = sequences.lengths()
    user = np.repeat(np.arange(len(lengths)), lengths)  # (nnz,)
    pos = np.arange(len(sequences.values)) - sequences.offsets[user]  # position within user
    keep = (pos < train_end[user]) & ~cold[sequences.values]
    counts = np.bincount(user[keep], minlength=len(lengths))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Ragged(offsets, sequences.values[keep].astype(np.int64))


@dataclass(frozen=True)
class Windows:
    """Training windows: rows ``[start, stop)`` of user ``user`` in the training sequences."""

    user: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def training_windows(train: Ragged, max_len: int, all_windows: bool = True) -> Windows:
    """Windows of up to ``max_len + 1`` events ending at each user's newest training event.

    With ``all_windows`` a long history also yields its earlier, non-overlapping windows
    (every training event is a target once); otherwise only the newest window (SASRec).
    Windows with fewer than 2 events (no target) are dropped.
    """
    lengths = train.lengths()
    users, starts, stops = [], [], []
    span = max_len + 1
    stop = lengths.copy()
    active = stop >= 2
    while active.any():
        u = np.nonzero(active)[0]
        s = np.maximum(stop[u] - span, 0)
        users.append(u)
        starts.append(s)
        stops.append(stop[u])
        if not all_windows:
            break
        # the next window ends where this one's first *target* was, so windows share one event
        stop[u] = s + 1
        active = np.zeros_like(active)
        active[u] = stop[u] >= 2
        active[u] &= s > 0
    return Windows(np.concatenate(users), np.concatenate(starts), np.concatenate(stops))


def rank_share(win: Windows, batch_size: int, rank: int, world: int) -> tuple[Windows, int, int]:
    """What data-parallel rank ``rank`` of ``world`` trains on: (its windows, its batch size,
    steps per epoch).

    Users are dealt to the ranks whole (every window of a user on one rank), most windows
    first, each to the rank holding the fewest windows so far (ties: the lowest rank; the
    longest-processing-time rule), so that the shares' window counts end within one user's
    windows of each other, usually within one window, however heavy the most active users;
    the global batch ``batch_size`` is split evenly, ``batch_size // world`` per rank; every
    rank takes the same number of steps, the smallest share's (the others leave their last
    few shuffled windows out of that epoch). 0 steps: a rank has no windows.
    """
    counts = np.bincount(win.user)  # (U,) windows per user
    users = np.nonzero(counts)[0]
    users = users[np.argsort(-counts[users], kind="stable")]  # most windows first, ties by user
    owner = np.zeros(len(counts), dtype=np.int64)  # (U,) the rank of each user
    loads = [(0, r) for r in range(world)]  # a heap of (windows so far, rank)
    for user, n in zip(users.tolist(), counts[users].tolist(), strict=True):
        load, r = heapq.heappop(loads)
        owner[user] = r
        heapq.heappush(loads, (load + n, r))
    shares = [owner[win.user] == r for r in range(world)]  # (W,) bool each
    per_rank = max(1, batch_size // world)
    steps = min(math.ceil(int(mine.sum()) / per_rank) for mine in shares)
    mine = shares[rank]
    return Windows(win.user[mine], win.start[mine], win.stop[mine]), per_rank, steps


def left_pad(rows: Sequence[np.ndarray], width: int | None = None) -> np.ndarray:
    """(B, T) int64 item sequences, each right-aligned and left-padded with 0.

    T is ``width`` or the longest row (at least 1); longer rows keep their last T items.
    This is the one place where attnrec pads: training, evaluation and serving all call it.
    """
    T = width if width is not None else max([1, *map(len, rows)])
    out = np.zeros((len(rows), T), dtype=np.int64)
    for b, row in enumerate(rows):
        row = row[len(row) - T:] if len(row) > T else row
        if len(row):
            out[b, T - len(row):] = row
    return out


def pack(train: Ragged, win: Windows, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (B, T) int64 for the windows ``rows``; T = longest window - 1."""
    seqs = [train.values[train.offsets[win.user[r]] + win.start[r]: train.offsets[win.user[r]] + win.stop[r]] for r in rows]
    return left_pad([s[:-1] for s in seqs]), left_pad([s[1:] for s in seqs])


def epoch_batches(train: Ragged, win: Windows, batch_size: int, rng: np.random.Generator,
                  group_by_length: bool = False, chunk_batches: int = 50) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled (inputs, targets) batches covering every window once.

    A batch is padded to its longest window. With ``group_by_length`` the shuffled windows
    are cut into chunks of ``chunk_batches`` batches, each chunk is sorted by window length
    and cut into batches, and the batches are shuffled: each batch holds windows of similar
    length, so far fewer padding positions go through the encoder.
    """
    order = rng.permutation(len(win))
    if not group_by_length:
        for i in range(0, len(order), batch_size):
            yield pack(train, win, order[i:i + batch_size])
        return
    lens = win.stop - win.start  # (N,) events per window
    chunk = batch_size * chunk_batches
    groups: list[np.ndarray] = []
    for c in range(0, len(order), chunk):
        part = order[c:c + chunk]
        part = part[np.argsort(-lens[part], kind="stable")]  # longest first; ties keep the shuffle
        groups.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    for g in rng.permutation(len(groups)):
        yield pack(train, win, groups[g])


def prefix_batch(sequences: Ragged, users: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """(B, T) newest ``max_len`` events before position ``ends[b]`` of user ``users[b]``, left-padded.

    T is the longest prefix in the batch (at most ``max_len``), at least 1.
    """
    starts = sequences.offsets[users] + np.maximum(ends - max_len, 0)
    stops = sequences.offsets[users] + ends
    return left_pad([sequences.values[s:e] for s, e in zip(starts, stops, strict=True)])


def seen_pairs(sequences: Ragged, users: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every event before ``ends[b]`` (whole history, not just max_len)."""
    rows = np.repeat(np.arange(len(users)), ends)
    starts = sequences.offsets[users]
    idx = np.concatenate([np.arange(s, s + e) for s, e in zip(starts, ends, strict=True)]) if len(users) else np.zeros(0, np.int64)
    return rows, sequences.values[idx].astype(np.int64)
