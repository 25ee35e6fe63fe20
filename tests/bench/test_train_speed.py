"""``bench/train_speed.py`` as a user runs it, on a fresh state folder (ML-100K): the set-up
of a new folder, and ``--phases`` (a step's phases at the whole batch and at one rank's share,
the gloo all-reduce between two real processes, and the real data-parallel step of two
processes with the item tables all-reduced whole and with their rows looked up exchanged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_phases_on_a_fresh_state_folder(tmp_path: Path) -> None:
    # reported: on a folder without features the script stopped with a TypeError (prepare's
    # overrides argument was not passed)
    run = subprocess.run(
        [sys.executable, "bench/train_speed.py", "--dataset", "ml-100k", "--home", str(tmp_path / "home"), "--phases",
         "--steps", "2", "--set", "train.batch_size=16", "--set", "model.max_len=20", "--set", "train.negatives=64", "--set", "model.hidden_size=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "sampled softmax (64 negatives) over 1,682 items" in out
    phases = {int(b): float(ms) for b, ms in re.findall(r"one step, 1 thread, batch (\d+): .*; (\d+) ms, ", out)}
    assert set(phases) == {16, 8}  # the whole batch and one of 2 ranks' share
    assert re.search(r"per step: -?\d+ ms whatever the batch, plus -?[\d.]+ ms per window", out)
    numel = int(re.search(r"all-reduce of the gradient \(([\d,]+) floats", out).group(1).replace(",", ""))
    assert numel > 1682 * 32  # at least the item-ID table (hidden size 32)
    assert re.search(r"2 one-thread processes on this machine: [\d.]+ ms per step", out)
    modes = re.findall(r"a data-parallel step, 2 one-thread ranks \(gloo\), 8 windows each, (.+): \d+ ms, ", out)
    assert modes[0] == "DDP all-reduces every gradient whole" and len(modes) == 2  # side by side with
    assert re.fullmatch(r"the rows looked up of [23] item tables exchanged", modes[1])  # ID, category (words)
