"""The training loop: one model-agnostic function.

``fit`` knows nothing about recommenders: it gets a model, a batch source, a loss function
and a validation function, and does the steps every run needs: optimiser and schedule,
mixed precision and compilation (bf16 autocast, on CUDA by default; ``torch.compile`` by
setting; either on any device), an epoch loop with a progress bar, validation with early
stopping on the selection metric, the best checkpoint restored at the end, and resumable
checkpoints. The next-item losses are modelling and live in ``models/losses.py``.

In a ``torch.distributed`` process group (Ray Train's workers; gloo on the CPU, NCCL on
GPUs) the same loop is data-parallel: every rank reads its own batches (the recipe gives
each rank its shard of the users and the same number of steps), the loss runs inside
``DistributedDataParallel`` (gradients averaged over the ranks before the step, so the
weights stay equal); every rank calls the validation function, which may split its work over
the group (``pipeline.training.evaluation.evaluate`` does), and rank 0's metrics are
broadcast, so every rank stops at the same epoch; rank 0 alone writes checkpoints and
reports epochs. Tables whose step touches few rows (the item tables under a sampled softmax)
can be left out of DDP: their sparse gradients are averaged after backward over the rows
some rank looked up (``TableGradients``), and, by setting (``train.table_updates = "rows"``),
AdamW then updates those rows alone (``pipeline.training.optimizer.RowAdamW``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline.config import TrainSettings
from pipeline.training.optimizer import clip_gradients, optimizer_and_schedule

Batch = tuple[torch.Tensor, ...]


def resolve_device(setting: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import UserError

        raise UserError("device 'cuda' was asked for but torch sees no GPU (use --device cpu or auto)")
    return torch.device(setting)


def keep_freed_memory_in_process() -> bool:
    """Make glibc reuse freed memory instead of handing it back to the kernel (CPU training).

    A CPU training step allocates and frees the same few hundred MB every step (the
    (positions, catalogue) logits and their gradient: about 200 MB per ML-1M batch). glibc
    serves blocks over its mmap threshold (at most 32 MB) with fresh ``mmap`` calls and unmaps
    them on free, so every step page-faults all of it in again: on ML-1M about 270,000 faults
    and a quarter of the step time in the kernel. With ``mmap`` off and trimming off, freed
    blocks stay in the heap and later steps reuse them (after the first few steps, which grow
    the heap to the step's peak). The process keeps that peak footprint until it exits.
    Returns False (and changes nothing) where libc is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


def precision_and_compilation(cfg: TrainSettings, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, torch.compile) for ``device``: 'auto' means on CUDA only (the
    precision's default; compilation is off unless asked for)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return bf16, compiled


def train_step(model: nn.Module, batch: Batch, step_loss: Callable[[nn.Module, Batch], torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float, bf16: bool,
               phase_done: Callable[[], None] = lambda: None,
               after_backward: Callable[[], None] = lambda: None) -> torch.Tensor:
    """One optimiser step on ``batch`` (already on the device); returns the loss (a scalar tensor).

    ``after_backward`` completes the gradients backward left (``TableGradients``).
    ``phase_done`` is called after each of its four phases (the loss; backward with
    ``after_backward``; gradient clipping; the optimiser and schedule step): the speed bench
    times them with it.
    """
    with torch.autocast(device_type=batch[0].device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = step_loss(model, batch)
    phase_done()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    after_backward()
    phase_done()
    clip_gradients(model.parameters(), grad_clip)
    phase_done()
    optimizer.step()
    scheduler.step()
    phase_done()
    return loss


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel group: ``rank`` of ``world`` processes."""

    rank: int
    world: int

    @property
    def leads(self) -> bool:
        """Rank 0: the one whose validation metrics count, that checkpoints and reports."""
        return self.rank == 0


def process_group() -> ProcessGroup | None:
    """The ``torch.distributed`` group this process trains in, or None when it trains alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


class _Objective(nn.Module):
    """``loss_fn(model, batch)`` as a module's forward, so DDP can wrap it (its gradient
    hooks then average the gradients of every parameter ``loss_fn`` reached)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, tuple(batch))


def data_parallel(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
                  device: torch.device, row_sparse: Sequence[nn.Parameter] = ()) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """``loss_fn`` run through ``DistributedDataParallel`` over ``model`` (rank 0's weights
    are broadcast to every rank here); its backward leaves the ranks' average gradient in
    ``model``'s parameters. Buffers (the catalogue's content, constant and the same on every
    rank) are broadcast with the weights here, not again before every forward.

    ``row_sparse``: tables with sparse gradients (``ItemTower.make_tables_sparse``), left out of
    DDP, which would all-reduce them whole every step (136.6 MB at 500,000 items of 64
    floats); ``TableGradients`` averages them after backward.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    objective = _Objective(model, loss_fn)
    sparse = {id(p) for p in row_sparse}
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        objective, [name for name, p in objective.named_parameters() if id(p) in sparse])
    ddp = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False)
    with torch.no_grad():
        for p in row_sparse:  # DDP broadcasts only the parameters it keeps
            dist.broadcast(p, src=0)
    return lambda _model, batch: ddp(*batch)


class TableGradients:
    """Called after backward: completes the sparse gradients of ``tables`` (R, ...); in a process
    group, by the ranks' average, as DDP's all-reduce would leave it. ``dense``: each becomes
    the dense (R, ...) gradient, for clipping and AdamW over every row; else it stays sparse,
    coalesced, holding the rows read (U, ...), and ``RowAdamW`` updates those rows alone.

    Only the rows some rank looked up are sent: each rank's row indices (gathered), then the
    values of their union (U, ...) summed. Under a sampled softmax a step of 128 windows of 50
    looks up at most 13,825 rows, so 2 ranks send at most 27,650 of a catalogue's rows.

    Made dense, each table's gradient is one buffer kept from step to step: a step zeroes the
    rows the step before wrote and writes its own. A fresh (R, ...) block every step cost a page fault
    per 4 KB page wherever glibc maps it afresh, as it does for any block over 64 MB in a
    thread's own malloc arena (Ray Train runs the training function in a thread): at 500,000
    items 31,000 faults and 112 ms a step, against a few rows' writes here (docs/scaling.md).
    The optimiser drops ``p.grad`` before backward (``zero_grad(set_to_none=True)``), so backward
    never adds into the buffer; clipping scales it in place, which keeps unwritten rows zero.
    """

    def __init__(self, tables: Sequence[nn.Parameter], group: ProcessGroup | None, dense: bool = True) -> None:
        self.tables, self.group, self.dense = list(tables), group, dense
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(table) -> (buffer (R, ...), rows set last (n,))

    @classmethod
    def for_run(cls, tables: Sequence[nn.Parameter], group: ProcessGroup | None, cfg: TrainSettings) -> "TableGradients":
        """The completion ``fit`` runs: dense unless ``cfg.table_updates = "rows"`` (``RowAdamW``'s rows)."""
        return cls(tables, group, dense=cfg.table_updates == "dense")

    def __call__(self) -> None:
        import torch.distributed as dist

        group = self.group
        for p in self.tables:
            if (p.grad is not None and not p.grad.is_sparse) or (p.grad is None and group is None):
                continue
            if p.grad is None:  # this rank's step did not read the table: it sends no rows
                rows, values = torch.zeros(0, dtype=torch.long, device=p.device), p.new_zeros(0, *p.shape[1:])
            else:
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()  # (n,) distinct rows, (n, ...) their gradient
            if group is not None:
                counts = [rows.new_zeros(1) for _ in range(group.world)]
                dist.all_gather(counts, rows.new_full((1,), rows.numel()))
                sent = rows.new_full((int(max(c.item() for c in counts)),), -1)  # (W,) padded to the longest
                sent[:rows.numel()] = rows
                gathered = [torch.empty_like(sent) for _ in range(group.world)]
                dist.all_gather(gathered, sent)
                union = torch.unique(torch.cat(gathered))  # sorted; the padding -1 first where there is any
                union = union[union >= 0]  # (U,)
                summed = values.new_zeros(union.numel(), *values.shape[1:])  # (U, ...)
                summed.index_add_(0, torch.searchsorted(union, rows), values / group.world)  # DDP divides, then sums
                dist.all_reduce(summed)
                rows, values = union, summed
            if not self.dense:
                p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape, is_coalesced=True,  # (R, ...) holding U rows
                                                 check_invariants=False)
                continue
            buffer, last = self.written.get(id(p), (None, None))
            if buffer is None or buffer.dtype != values.dtype:
                buffer, last = torch.zeros(p.shape, dtype=values.dtype, device=values.device), rows[:0]  # (R, ...)
            buffer[last] = 0
            buffer[rows] = values
            self.written[id(p)] = (buffer, rows)
            p.grad = buffer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    samples_per_s: float
    valid: dict[str, float] = field(default_factory=dict)
    valid_seconds: float = 0.0
    max_epochs: int = 0  # the run's epoch limit (the settings' epochs, fitted to the data)


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    history: list[EpochRecord]
    seconds: float
    stopped_early: bool


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[Batch]],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    validate: Callable[[nn.Module], dict[str, float]],
    cfg: TrainSettings,
    device: torch.device,
    steps_per_epoch: int,
    param_groups: list[dict[str, Any]] | None = None,
    row_sparse: Sequence[nn.Parameter] = (),
    checkpoint_path: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` and leave it holding the weights of its best validation epoch.

    Args:
        batches: epoch -> iterable of tensor tuples (on CPU; moved to ``device`` here); in a
            process group, this rank's batches, the same number on every rank.
        loss_fn: (model, batch) -> scalar loss.
        validate: model -> metrics (must contain ``cfg.selection_metric``); called in eval mode,
            in a process group on every rank (rank 0's metrics count).
        cfg: epochs, optimiser, schedule, patience, selection metric, precision and compilation.
        steps_per_epoch: batches per epoch (for the schedule and the progress bar).
        param_groups: AdamW parameter groups (default: every parameter with ``cfg.weight_decay``).
        row_sparse: parameters with sparse gradients (tables whose step looks up few rows): in a
            process group only their rows looked up are exchanged; then made dense, or with
            ``cfg.table_updates = "rows"`` left sparse for ``RowAdamW``'s update of those rows.
        checkpoint_path: where the resumable state is written after every epoch.
        resume: continue from ``checkpoint_path`` if it exists.
    """
    started = time.perf_counter()
    # --- step 1: set-up: device, optimiser, schedule, precision, compilation
    model.to(device)
    if device.type == "cpu":
        keep_freed_memory_in_process()
    optimizer, scheduler = optimizer_and_schedule(model, cfg, steps_per_epoch, param_groups)
    use_bf16, use_compile = precision_and_compilation(cfg, device)
    step_loss = torch.compile(loss_fn, dynamic=True) if use_compile else loss_fn
    metric = cfg.selection_metric
    group = process_group()
    leads = group is None or group.leads
    if group is not None:
        step_loss = data_parallel(model, step_loss, device, row_sparse)
        torch.manual_seed(cfg.seed * 1_000_003 + group.rank)  # each rank its own dropout masks

    state = {"epoch": 0, "best_metric": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
    best_weights = copy.deepcopy(model.state_dict())
    # --- step 2: resume from the last checkpoint
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=True)
        _check_same_shape(checkpoint_path, ckpt["model"], model.state_dict())
        _check_same_validation(checkpoint_path, ckpt.get("validation"), _validation(cfg))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        best_weights = ckpt["best_model"]
        state.update({k: ckpt[k] for k in ("epoch", "best_metric", "best_epoch", "bad_epochs")})
        state["history"] = [EpochRecord(**h) for h in ckpt["history"]]
        torch.set_rng_state(ckpt["torch_rng"])

    history: list[EpochRecord] = state["history"]
    stopped_early = False
    table_gradients = TableGradients.for_run(row_sparse, group, cfg)  # its buffers last the run
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        # --- step 3: one pass over the training batches
        model.train()
        t0, loss_sum, n_steps, n_samples = time.perf_counter(), 0.0, 0, 0
        bar = _Progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", progress and leads)
        for batch in batches(epoch):  # in a process group: this rank's batches, as many on every rank
            rows = batch[0].shape[0]
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            loss = train_step(model, batch, step_loss, optimizer, scheduler, cfg.grad_clip, use_bf16,
                              after_backward=table_gradients)
            loss_sum += loss.item()
            n_steps += 1
            n_samples += rows * (group.world if group is not None else 1)  # all ranks together (equal shares)
            bar.update(loss_sum / n_steps, n_samples / (time.perf_counter() - t0))
        bar.close()
        optimizer.catch_up()  # rows updated row-wise: the steps they missed, so validation reads AdamW's weights
        seconds = time.perf_counter() - t0
        record = EpochRecord(epoch, loss_sum / max(1, n_steps), seconds, n_samples / max(seconds, 1e-9),
                             max_epochs=cfg.epochs)
        # --- step 4: validate; keep the best weights; early stopping on `metric`
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            model.eval()
            t_valid = time.perf_counter()
            record.valid = validate(model)
            if group is not None:
                record.valid = _from_rank_0(record.valid)
            record.valid_seconds = time.perf_counter() - t_valid
            value = record.valid[metric]
            if value > state["best_metric"]:
                state.update(best_metric=value, best_epoch=epoch, bad_epochs=0)
                best_weights = copy.deepcopy(model.state_dict())
            else:
                state["bad_epochs"] += cfg.eval_every
        history.append(record)
        state["epoch"] = epoch
        if on_epoch and leads:
            on_epoch(record)
        # --- step 5: resumable checkpoint
        if checkpoint_path is not None and leads:
            _save_checkpoint(checkpoint_path, model, optimizer, scheduler, best_weights, state, history, _validation(cfg))
        if state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            break
    # --- step 6: restore the best validation weights
    model.load_state_dict(best_weights)
    model.eval()
    return FitResult(state["best_epoch"], state["best_metric"], state["epoch"], history,
                     time.perf_counter() - started, stopped_early)


def _from_rank_0(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's ``metrics`` on every rank of the process group."""
    import torch.distributed as dist

    box: list[Any] = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _validation(cfg: TrainSettings) -> dict[str, Any]:
    """What the best epoch's score means: its metric and the users it ranks (a sample's size or all)."""
    return {"metric": cfg.selection_metric, "users": cfg.valid_users}


def _check_same_validation(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose best score was measured otherwise: the resumed epochs
    would be compared with a score of another metric or over other users. (Checkpoints written
    before the validation was recorded are not checked.)"""
    from pipeline.errors import UserError

    if saved is None or saved == current:
        return

    def said(validation: dict[str, Any]) -> str:
        users = validation["users"]
        return f"{validation['metric']} over " + ("every user" if users is None else f"a sample of {users:,} users")

    raise UserError(f"--resume {path.parent}: its best epoch was chosen on {said(saved)}, these settings validate on "
                    f"{said(current)}; resume with the run's train.selection_metric and train.valid_users")


def _check_same_shape(path: Path, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
    """Refuse to resume a checkpoint into a model of another shape, saying what differs."""
    from pipeline.errors import UserError

    differ = [f"{k} {'x'.join(map(str, saved[k].shape))} there, {'x'.join(map(str, current[k].shape))} now"
              for k in saved.keys() & current.keys() if saved[k].shape != current[k].shape]
    missing = sorted(saved.keys() ^ current.keys())
    if differ or missing:
        shown = "; ".join(sorted(differ)[:3] + ([f"parameters only on one side: {', '.join(missing[:3])}"] if missing else []))
        raise UserError(f"--resume {path.parent}: the checkpoint has another model shape than these settings ({shown}); "
                        "resume with the settings the run started with")


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     best_weights: dict[str, torch.Tensor], state: dict[str, Any], history: list[EpochRecord],
                     validation: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "best_model": best_weights, "torch_rng": torch.get_rng_state(), "validation": validation,
        **{k: state[k] for k in ("epoch", "best_metric", "best_epoch", "bad_epochs")},
        "history": [vars(h) for h in history],
    }, tmp)
    tmp.replace(path)


class _Progress:
    """A rich progress bar with loss and throughput, on a terminal only."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, info="")

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"loss {loss:.4f}  {rate:,.0f} seq/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
