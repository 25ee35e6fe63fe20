"""Training windows and left-padded batches."""

import numpy as np

from pipeline.data.feature_store import Ragged
from pipeline.training.batches import epoch_batches, pack, prefix_batch, training_sequences, training_windows


def ragged(rows: list[list[int]]) -> Ragged:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return Ragged(offsets, np.array([v for r in rows for v in r], dtype=np.int64))


def test_training_sequences_cut_at_train_end_and_drop_cold() -> None:
    seqs = ragged([[1, 2, 3, 4, 5], [6, 2, 7]])
    cold = np.zeros(8, dtype=bool)
    cold[2] = True
    train = training_sequences(seqs, np.array([3, 3]), cold)
    assert train.row(0).tolist() == [1, 3]
    assert train.row(1).tolist() == [6, 7]


def test_windows_cover_every_target_once() -> None:
    train = ragged([list(range(1, 12)), [1, 2], [5]])
    win = training_windows(train, max_len=4, all_windows=True)
    targets = []
    for r in range(len(win)):
        inputs, tgt = pack(train, win, np.array([r]))
        targets += [(int(win.user[r]), int(t)) for t in tgt[0] if t]
    assert sorted(targets) == sorted([(0, t) for t in range(2, 12)] + [(1, 2)])
    newest = training_windows(train, max_len=4, all_windows=False)
    assert len(newest) == 2  # one window per user with >= 2 events


def test_pack_left_pads_and_shifts() -> None:
    train = ragged([[1, 2, 3, 4], [7, 8]])
    win = training_windows(train, max_len=10)
    inputs, targets = pack(train, win, np.arange(len(win)))
    assert inputs.tolist() == [[1, 2, 3], [0, 0, 7]]
    assert targets.tolist() == [[2, 3, 4], [0, 0, 8]]


def test_prefix_batch() -> None:
    seqs = ragged([[1, 2, 3, 4, 5], [6, 7]])
    out = prefix_batch(seqs, np.array([0, 1]), np.array([4, 1]), max_len=3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 6]]


def test_length_grouped_batches_cover_every_window_once_with_less_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=300)
    train = ragged([list(range(1, n + 1)) for n in lengths])
    win = training_windows(train, max_len=50)

    def epoch(grouped: bool) -> tuple[list[tuple[int, ...]], int]:
        rows, padded = [], 0
        for inputs, targets in epoch_batches(train, win, 16, np.random.default_rng(1), grouped, chunk_batches=4):
            assert inputs.shape[0] <= 16 and (targets[:, -1] > 0).all()  # every row ends in a real target
            padded += int((inputs == 0).sum())
            rows += [tuple(r[r > 0]) for r in targets]
        return rows, padded

    plain, plain_pad = epoch(False)
    grouped, grouped_pad = epoch(True)
    assert sorted(grouped) == sorted(plain) and len(grouped) == len(win)  # same windows, once each
    assert grouped_pad < plain_pad / 3  # chunks of 64 windows sorted by length: little padding left
    first = [b[0].shape[1] for b in epoch_batches(train, win, 16, np.random.default_rng(2), True, chunk_batches=4)]
    again = [b[0].shape[1] for b in epoch_batches(train, win, 16, np.random.default_rng(3), True, chunk_batches=4)]
    assert first != again  # batch order is shuffled from epoch to epoch
