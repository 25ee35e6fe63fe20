"""Training speed: throughput (sequences/s) and wall time to validation NDCG@10 >= target.

    python bench/train_speed.py --dataset ml-1m                 # full run to the target
    python bench/train_speed.py --dataset ml-1m --steps 20      # throughput only (quick)
    python bench/train_speed.py --dataset ml-1m --target-only   # the run to the target alone, in a fresh process
    python bench/train_speed.py --home H --phases --ranks 2     # where a step's time goes, and DDP's share

``--phases`` times each phase of one training step (the loss, backward, gradient clipping,
the optimiser) for the whole batch and for one rank's share of it with ``--ranks`` DDP ranks
(on the CPU in one thread, as a one-CPU Ray Train worker runs it; on a GPU each phase waited
for), and the gloo all-reduce of the model's gradient between ``--ranks`` processes on this
machine: what data-parallel training can and cannot divide among its workers. On the CPU it
then runs the real data-parallel step: ``--ranks`` one-thread processes in a gloo group, each
its share of every batch through ``data_parallel`` and ``train_step`` as ``fit`` runs them;
with a sampled softmax side by side with the item tables all-reduced whole by DDP
(``train.sparse_item_tables=false``), with only their rows looked up exchanged, and with those
rows alone updated by AdamW (``train.table_updates=rows``); the one-process step likewise with
the tables' rows updated densely and lazily, side by side.

Wall time counts everything from the first training step to the end of the validation
pass that first reaches the target: training steps, validation, checkpointing. It runs
on the device the settings resolve to (``--device auto``: the GPU when torch sees one).
After the throughput figures a compiled step (``--set train.compile=on``) is already
compiled; ``--target-only`` skips them, so the wall time includes compilation, as a fresh
``attnrec train`` pays it.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROCESS_STARTED = time.perf_counter()  # before the heavy imports: "from the process start" counts them
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.quality import machine, parse_overrides, prepare  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.data.feature_store import load_feature_set  # noqa: E402
from pipeline.scale.cluster import free_port  # noqa: E402
from pipeline.training.batches import epoch_batches, pack  # noqa: E402
from pipeline.training.loop import (  # noqa: E402
    TableGradients,
    data_parallel,
    keep_freed_memory_in_process,
    precision_and_compilation,
    process_group,
    resolve_device,
    train_step,
)
from pipeline.training.data_defaults import fit_to_data  # noqa: E402
from pipeline.training.optimizer import optimizer_and_schedule  # noqa: E402
from pipeline.training.recipe import build_sasrec, train_sasrec, training_setup  # noqa: E402


class TargetReached(Exception):
    pass


def throughput(settings, fs, device: torch.device, steps: int | None, exclude_history: bool,
               group_by_length: bool = False) -> float:
    """Training sequences per second over ``steps`` steps (None: one whole epoch) after 3 warm-up steps.

    The model, windows and loss are the recipe's own (``training_setup``); the optimiser,
    schedule and step are ``fit``'s (``optimizer_and_schedule``, ``train_step``), with autocast
    and compilation as the settings resolve them on ``device``.
    """
    variant = with_train(settings, exclude_history=exclude_history, group_by_length=group_by_length)
    setup = training_setup(variant, fs, device)
    model = setup.model.to(device).train()
    cfg = variant.train
    optimizer, scheduler = optimizer_and_schedule(model, cfg, setup.steps_per_epoch, model.optimizer_groups(cfg.weight_decay))
    use_bf16, use_compile = precision_and_compilation(cfg, device)
    step_loss = torch.compile(setup.loss, dynamic=True) if use_compile else setup.loss
    batch_size, windows = cfg.batch_size, setup.windows
    table_gradients = TableGradients.for_run(setup.row_sparse, None, cfg)
    longest = np.argsort(windows.start - windows.stop, kind="stable")[:3 * batch_size]  # warm-up: the heap reaches its peak
    warm = [pack(setup.train, windows, longest[i * batch_size:(i + 1) * batch_size]) for i in range(3)]
    batches = epoch_batches(setup.train, windows, batch_size, np.random.default_rng(0), group_by_length)
    if steps is not None:
        batches = itertools.islice(batches, steps)
    seqs, t0 = 0, 0.0
    for i, batch in enumerate(itertools.chain(warm, batches)):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, seqs = time.perf_counter(), 0
        train_step(model, tuple(torch.from_numpy(a).to(device) for a in batch), step_loss, optimizer, scheduler,
                   cfg.grad_clip, use_bf16, after_backward=table_gradients)
        seqs += batch[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seqs / (time.perf_counter() - t0)


PHASES = ("loss", "backward", "clip", "optimizer")


def step_phases(settings, fs, device: torch.device, steps: int, batch_size: int) -> dict[str, float]:
    """Milliseconds per training step in each phase of ``loop.train_step`` (the loss: forward
    and loss; backward; gradient clipping; the optimiser and schedule step), the mean over
    ``steps`` steps of ``batch_size`` windows after 3 warm-up steps (no autocast or
    compilation; on CUDA each phase is waited for)."""
    variant = with_train(settings, batch_size=batch_size)
    setup = training_setup(variant, fs, device)
    model = setup.model.to(device).train()
    cfg = variant.train
    optimizer, scheduler = optimizer_and_schedule(model, cfg, setup.steps_per_epoch, model.optimizer_groups(cfg.weight_decay))
    table_gradients = TableGradients.for_run(setup.row_sparse, None, cfg)
    totals = dict.fromkeys(PHASES, 0.0)
    marks: list[float] = []

    def mark() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    for i, (inputs, targets) in enumerate(itertools.islice(setup.batches(1), steps + 3)):
        batch = (inputs.to(device), targets.to(device))
        marks.clear()
        mark()
        train_step(model, batch, setup.loss, optimizer, scheduler, cfg.grad_clip, False, phase_done=mark,
                   after_backward=table_gradients)
        if i >= 3:
            for phase, start, stop in zip(PHASES, marks[:-1], marks[1:], strict=True):
                totals[phase] += stop - start
    return {phase: seconds / steps * 1000 for phase, seconds in totals.items()}


def _all_reduce_worker(rank: int, world: int, numel: int, port: int, out) -> None:  # noqa: ANN001
    """One gloo process: the mean seconds of 20 all-reduces of ``numel`` floats (after 3)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    grad = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(grad)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(grad)
    if rank == 0:
        out.put((time.perf_counter() - started) / 20)
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, world: int) -> float:
    """Seconds per gloo all-reduce of ``numel`` float32 values among ``world`` one-thread
    processes on this machine (what DDP does with the gradient every step)."""
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_all_reduce_worker, args=(world, numel, free_port(), out), nprocs=world)
    return out.get()


def _ddp_step_worker(rank: int, world: int, port: int, settings, feature_set: Path, steps: int, out) -> None:  # noqa: ANN001
    """One rank of a gloo group on this machine (one thread): the mean milliseconds of
    ``steps`` data-parallel training steps (after 3), as ``fit`` runs them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    keep_freed_memory_in_process()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device, cfg = torch.device("cpu"), settings.train
        setup = training_setup(settings, load_feature_set(feature_set), device)
        model = setup.model.train()
        optimizer, scheduler = optimizer_and_schedule(model, cfg, setup.steps_per_epoch, model.optimizer_groups(cfg.weight_decay))
        step_loss, group = data_parallel(model, setup.loss, device, setup.row_sparse), process_group()
        table_gradients = TableGradients.for_run(setup.row_sparse, group, cfg)
        for i, batch in enumerate(itertools.islice(setup.batches(1), steps + 3)):
            if i == 3:
                dist.barrier()
                started = time.perf_counter()
            train_step(model, batch, step_loss, optimizer, scheduler, cfg.grad_clip, False,
                       after_backward=table_gradients)
        if rank == 0:
            out.put(((time.perf_counter() - started) / steps * 1000, len(setup.row_sparse)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_step_ms(settings, fs, ranks: int, steps: int) -> tuple[float, int]:  # noqa: ANN001
    """(milliseconds per data-parallel step of ``ranks`` one-thread processes on this machine,
    the number of tables whose rows looked up were exchanged instead of DDP's whole tables)."""
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_step_worker, args=(ranks, free_port(), settings, fs.path, steps, out), nprocs=ranks)
    return out.get()


def report_phases(settings, fs, device: torch.device, steps: int, ranks: int) -> None:
    """``step_phases`` at the whole batch and at one of ``ranks`` ranks' share, the per-step
    cost that does not shrink with the batch (a line through the two), and the all-reduce."""
    if device.type == "cpu":  # as a one-CPU Ray Train worker runs, and as fit does
        torch.set_num_threads(1)
        keep_freed_memory_in_process()
    where = "1 thread" if device.type == "cpu" else str(device)
    whole = settings.train.batch_size
    share = max(1, whole // ranks)
    totals: dict[int, float] = {}
    updates = ("dense", "rows") if settings.train.negatives else ("dense",)
    for batch_size in (whole, share):
        for how in updates:  # the item tables' rows: all updated every step, or those read alone
            ms = step_phases(with_train(settings, table_updates=how), fs, device, steps, batch_size)
            totals.setdefault(batch_size, sum(ms.values()))  # the line below: the dense update's
            print(f"one step, {where}, batch {batch_size}, item tables updated {how}: "
                  + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
                  + f"; {sum(ms.values()):.0f} ms, {batch_size / sum(ms.values()) * 1000:,.0f} windows/s", flush=True)
    if share != whole:
        per_window = (totals[whole] - totals[share]) / (whole - share)
        fixed = totals[whole] - per_window * whole
        print(f"per step: {fixed:.0f} ms whatever the batch, plus {per_window:.2f} ms per window "
              f"(a line through the two; a rank of {ranks} keeps {totals[share] / totals[whole]:.0%} of the step's time "
              f"for {share / whole:.0%} of its windows)")
    if ranks > 1:
        model = build_sasrec(fs, settings.model)[0]  # the recipe's model, without its batches
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = all_reduce_seconds(numel, ranks)
        print(f"all-reduce of the gradient ({numel:,} floats, {numel * 4 / 1e6:.1f} MB), gloo, {ranks} one-thread "
              f"processes on this machine: {seconds * 1000:.1f} ms per step", flush=True)
    if ranks > 1 and device.type == "cpu":
        modes = [(False, "dense")] + ([(True, "dense"), (True, "rows")] if settings.train.negatives else [])
        for sparse, how in modes:
            ms, tables = ddp_step_ms(with_train(settings, sparse_item_tables=sparse, table_updates=how), fs, ranks, steps)
            said = f"the rows looked up of {tables} item tables exchanged" if tables else "DDP all-reduces every gradient whole"
            said += ", those rows alone updated" if how == "rows" else ""
            print(f"a data-parallel step, {ranks} one-thread ranks (gloo), {share} windows each, {said}: {ms:.0f} ms, "
                  f"{share * ranks / ms * 1000:,.0f} windows/s", flush=True)


def report_throughput(settings, fs, device: torch.device, steps: int, xh: bool, shape: str) -> None:  # noqa: ANN001
    """Training sequences/s over ``steps`` steps with the window items excluded from the
    negatives as set (``xh``) and the other way; one whole epoch of random batches against one
    of ``--group-by-length`` batches. On the CPU first with glibc's malloc defaults, then with
    freed memory kept in the process, as ``fit`` trains. A compiled step first runs one grouped
    epoch untimed: the grouped batches' new shapes recompile it (3 times, about 30 s on an H200)."""
    if device.type == "cpu":  # side by side: glibc's defaults, then freed memory kept (what training does)
        rate = throughput(settings, fs, device, steps, xh)
        print(f"throughput, glibc malloc defaults: {rate:,.0f} training sequences/s ({shape})")
        keep_freed_memory_in_process()
    rate = throughput(settings, fs, device, steps, xh)
    kept = ", freed memory kept in the process as training does" if device.type == "cpu" else ""
    compiled = ", compiled" if precision_and_compilation(settings.train, device)[1] else ""
    print(f"throughput: {rate:,.0f} training sequences/s ({shape}, exclude_history={xh}{kept}{compiled})")
    rate_other = throughput(settings, fs, device, steps, not xh)
    print(f"throughput with exclude_history={not xh}: {rate_other:,.0f} training sequences/s ({rate_other / rate:.2f}x)")
    # batch lengths vary from batch to batch once grouped, so compare whole epochs
    if compiled:
        throughput(settings, fs, device, None, xh, group_by_length=True)
    epoch_random = throughput(settings, fs, device, None, xh, group_by_length=False)
    epoch_grouped = throughput(settings, fs, device, None, xh, group_by_length=True)
    print(f"one whole epoch each: random batches {epoch_random:,.0f}, --group-by-length {epoch_grouped:,.0f} "
          f"training sequences/s ({epoch_grouped / epoch_random:.2f}x)")


def with_train(settings, **changes):  # noqa: ANN001, ANN003, ANN201
    """``settings`` with ``train`` settings changed (``table_updates=rows`` also turns compilation off,
    which cannot compile a sparse backward)."""
    if changes.get("table_updates") == "rows":
        changes["compile"] = "off"
    return settings.model_copy(update={"train": settings.train.model_copy(update=changes)})


def report_run(run_dir: Path, target: float) -> None:
    """Throughput and time to ``target`` from a finished run's per-epoch record (training.json)."""
    import json

    info = json.loads((run_dir / "training.json").read_text())
    history = info["history"]
    rates = [h["samples_per_s"] for h in history]
    print(f"run {run_dir.name} on {info['device']}: {len(history)} epochs, median {np.median(rates):,.0f} training "
          f"sequences/s, {np.median([h['seconds'] for h in history]):.1f} s per epoch")
    elapsed = 0.0
    for h in history:
        elapsed += h["seconds"] + h.get("valid_seconds", 0.0)
        v = h.get("valid", {}).get("ndcg@10")
        if v is not None and v >= target:
            untimed = sum(1 for g in history[: history.index(h) + 1] if g.get("valid") and not g.get("valid_seconds"))
            note = (f" (validation time of {untimed} epochs not recorded by this run: training passes only for those)"
                    if untimed else "")
            print(f"reached valid NDCG@10 {v:.4f} >= {target} after epoch {h['epoch']} in {elapsed:.1f} s{note}")
            return
    print(f"did not reach {target} in {len(history)} epochs ({elapsed:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--target", type=float, default=0.18, help="validation NDCG@10 to reach")
    ap.add_argument("--steps", type=int, default=0, help="only measure throughput over this many steps")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--max-epochs", type=int, default=None, help="default: the training default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any setting, e.g. --set train.group_by_length=true (repeatable)")
    ap.add_argument("--phases", action="store_true",
                    help="only time the phases of one step (whole batch, one rank's share) and the all-reduce")
    ap.add_argument("--ranks", type=int, default=2, help="--phases: the DDP ranks a batch is shared among")
    ap.add_argument("--target-only", action="store_true",
                    help="skip the throughput figures: only the run to the target, compilation counted")
    ap.add_argument("--from-run", type=Path, default=None,
                    help="report from a finished run's training.json instead of training again")
    args = ap.parse_args()
    if args.target_only and (args.steps or args.phases or args.from_run):
        ap.error("--target-only runs to the target alone: not with --steps, --phases or --from-run")

    home = (args.home or ROOT / "bench" / "out" / f"speed-{args.dataset}").resolve()
    print(f"command: python bench/train_speed.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    if args.from_run is not None:
        report_run(args.from_run, args.target)
        return
    if not (home / "features" / "CURRENT").exists():
        prepare(home, args.dataset, parse_overrides(args.set))
    settings = load_settings(home=home, device=args.device, **{**({"train.epochs": args.max_epochs} if args.max_epochs else {}), **parse_overrides(args.set)})
    fs = load_feature_set(home / "features" / (home / "features" / "CURRENT").read_text().strip())
    device = resolve_device(settings.device)
    settings = fit_to_data(settings, fs)[0]
    loss = f"sampled softmax ({settings.train.negatives:,} negatives)" if settings.train.negatives else "full softmax"
    shape = (f"batch {settings.train.batch_size}, max_len {settings.model.max_len}, D {settings.model.hidden_size}, "
             f"{loss} over {fs.num_items:,} items, {device}")
    if args.phases:
        print(f"model: {shape}")
        report_phases(settings, fs, device, max(args.steps, 10), args.ranks)
        return
    xh = settings.train.exclude_history
    if args.target_only:
        compiled = "compiled" if precision_and_compilation(settings.train, device)[1] else "not compiled"
        print(f"model: {shape}, exclude_history={xh}, train.compile={settings.train.compile} ({compiled})")
    else:
        report_throughput(settings, fs, device, max(args.steps, 10), xh, shape)
        if args.steps:
            return

    started = time.perf_counter()
    reached: dict[str, float] = {}

    def watch(rec) -> None:  # noqa: ANN001
        v = rec.valid.get("ndcg@10")
        elapsed = time.perf_counter() - started
        print(f"  epoch {rec.epoch:3d}  {elapsed:7.1f} s  {rec.samples_per_s:,.0f} seq/s  valid ndcg@10 {v:.4f}", flush=True)
        if v is not None and v >= args.target:
            reached.update(epoch=rec.epoch, seconds=elapsed, ndcg=v, since_start=time.perf_counter() - PROCESS_STARTED)
            raise TargetReached

    try:
        train_sasrec(settings, fs, progress=False, on_epoch=watch)
    except TargetReached:
        pass
    if reached:
        print(f"reached valid NDCG@10 {reached['ndcg']:.4f} >= {args.target} after epoch {reached['epoch']} "
              f"in {reached['seconds']:.1f} s on {device} ({reached['since_start']:.1f} s from the process start)")
    else:
        print(f"did not reach {args.target} within {settings.train.epochs} epochs ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
