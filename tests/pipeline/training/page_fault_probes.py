"""Page-fault counts measured in a fresh interpreter, for the tests that check a thread reuses
its large buffers (``python -m tests.pipeline.training.page_fault_probes NAME THREADS`` prints
one JSON object).

Why a fresh process: how many faults a new block costs depends on the allocator's state of the
whole process, and a pytest worker's has been changed by the tests it ran before. ``fit``
(``keep_freed_memory_in_process``) turns glibc's ``mmap`` off for good, after which large
blocks come from the heap, already faulted in: CI saw a fresh 77 MB block fault 0 pages, and a
first step 15 of 31,251, depending on which tests had run in the worker first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[3]


def scorer() -> dict[str, Any]:
    """The scorer's batches in a thread: its own buffer, then a buffer re-allocated every batch (the control)."""
    import pipeline.training.recipe as recipe
    from models.item_tower import ItemTower
    from models.sasrec import SASRec
    from tests.support import fresh_block_faults, page_faults_in_a_thread

    model = SASRec(ItemTower(300_000, 8, use_content=False), max_len=5).eval()
    score = recipe.SasrecScorer(model)
    seq = torch.randint(1, 300_001, (64, 5))
    fresh = fresh_block_faults((64, 300_001))
    faults = page_faults_in_a_thread(lambda: score(seq), times=4)
    empty = score.table.new_empty(0, score.table.shape[0])
    reallocated = page_faults_in_a_thread(lambda: score(seq), times=3,
                                          before_each=lambda i: setattr(score, "buffer", empty))
    return {"fresh": fresh, "faults": faults, "reallocated": reallocated}


def table_gradients() -> dict[str, Any]:
    """``TableGradients`` over a 500,000 x 64 table, steps in a thread."""
    from pipeline.training.loop import TableGradients
    from tests.support import fresh_block_faults, page_faults_in_a_thread

    def sparse_step(table: nn.Parameter, rows: list[int], scale: float) -> None:
        table.grad = None
        (scale * nn.functional.embedding(torch.tensor(rows), table, sparse=True).sum()).backward()

    table = nn.Parameter(torch.zeros(500_000, 64))
    fresh = fresh_block_faults(tuple(table.shape))
    faults = page_faults_in_a_thread(TableGradients([table], group=None), times=4,
                                     before_each=lambda step: sparse_step(table, [step + 1, 1000 * step + 7], 1.0))
    return {"fresh": fresh, "faults": faults, "pages": table.numel() * 4 // 4096}


PROBES = {"scorer": scorer, "table_gradients": table_gradients}


def run_probe(name: str, threads: int) -> dict[str, Any]:
    """``PROBES[name]`` in a new interpreter at ``threads`` intra-op threads; its JSON result."""
    out = subprocess.run([sys.executable, "-m", "tests.pipeline.training.page_fault_probes", name, str(threads)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(PROBES[sys.argv[1]]()))
