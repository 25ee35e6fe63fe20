"""``bench/train_speed.py`` as a user runs it, on a fresh state folder (ML-100K): the set-up
of a new folder, and ``--phases`` (a step's phases at the whole batch and at one rank's share,
the item tables' rows all updated or only those read, the gloo all-reduce between two real
processes, and the real data-parallel step of two processes with the item tables all-reduced
whole, with their rows looked up exchanged, and with those rows alone updated)."""

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
    phases = re.findall(r"one step, 1 thread, batch (\d+), item tables updated (\w+): .*; (\d+) ms, ", out)
    assert [(int(b), how) for b, how, _ in phases] == [(16, "dense"), (16, "rows"), (8, "dense"), (8, "rows")]
    assert re.search(r"per step: -?\d+ ms whatever the batch, plus -?[\d.]+ ms per window", out)
    numel = int(re.search(r"all-reduce of the gradient \(([\d,]+) floats", out).group(1).replace(",", ""))
    assert numel > 1682 * 32  # at least the item-ID table (hidden size 32)
    assert re.search(r"2 one-thread processes on this machine: [\d.]+ ms per step", out)
    modes = re.findall(r"a data-parallel step, 2 one-thread ranks \(gloo\), 8 windows each, (.+): \d+ ms, ", out)
    assert modes[0] == "DDP all-reduces every gradient whole" and len(modes) == 3  # side by side with
    assert re.fullmatch(r"the rows looked up of [23] item tables exchanged", modes[1])  # ID, category (words)
    assert re.fullmatch(r"the rows looked up of [23] item tables exchanged, those rows alone updated", modes[2])


def test_target_only_trains_to_the_target_without_the_throughput_figures(tmp_path: Path) -> None:
    # the GPU measurement needs the run to the target from a fresh process, where a compiled
    # step pays its compilation (the throughput figures before it would have compiled it)
    run = subprocess.run(
        [sys.executable, "bench/train_speed.py", "--dataset", "ml-100k", "--home", str(tmp_path / "home"), "--target-only",
         "--target", "0.0", "--device", "cpu", "--set", "train.batch_size=64", "--set", "model.max_len=20",
         "--set", "model.hidden_size=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "throughput" not in out
    assert "model: batch 64, max_len 20, D 32, full softmax over 1,682 items, cpu, exclude_history=True, " \
           "train.compile=off (not compiled)" in out
    reached = re.search(r"reached valid NDCG@10 0\.\d+ >= 0.0 after epoch 1 in ([\d.]+) s on cpu "
                        r"\(([\d.]+) s from the process start\)", out)
    assert reached and float(reached.group(2)) > float(reached.group(1)), out  # the imports and set-up counted too
    refused = subprocess.run([sys.executable, "bench/train_speed.py", "--target-only", "--steps", "5"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--target-only runs to the target alone" in refused.stderr
