"""attnrec's training recipe: SASRec over a feature set with the shared loop, and the baselines.

``train_sasrec`` builds the model for the feature set, cuts its training windows into
batches, sets up the next-item loss and the validation on the selection metric, and runs
``fit``. It returns the trained model in memory; writing the bundle, tracking and the
promotion gate are the application layer's (``pipeline.app.steps.train``).
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from models.item_knn import ItemKNN
from models.losses import NextItemLoss
from models.popularity import MostPopular
from models.sasrec import SASRec
from pipeline.config import Baseline, ModelSettings, Settings, TextEncoder, TrainSettings
from pipeline.data.feature_store import FeatureSet, Ragged
from pipeline.data.text_vectors import SENTENCE_ENCODERS, text_vectors
from pipeline.errors import UserError
from pipeline.registry.model_store import SASRecShape
from pipeline.training.batches import (
    Windows,
    epoch_batches,
    prefix_batch,
    rank_share,
    training_sequences,
    training_windows,
)
from pipeline.training.data_defaults import fit_model, fit_to_data
from pipeline.training.evaluation import evaluate, selection_ks
from pipeline.training.loop import (EpochRecord, FitResult, fit, precision_and_compilation, process_group, resolve_device,
                                    seed_everything)

BASELINES: tuple[str, ...] = get_args(Baseline)
RECALL_QUERY_USERS = 1000


def padded(ragged: Ragged, width: int | None = None) -> torch.Tensor:
    """A ragged int column as a (R, width) long tensor padded with 0 (width >= 1)."""
    lengths = ragged.lengths()
    w = max(1, int(lengths.max()) if len(lengths) else 1) if width is None else width
    out = np.zeros((len(lengths), w), dtype=np.int64)
    for r in range(len(lengths)):
        row = ragged.row(r)[:w]
        out[r, :len(row)] = row
    return torch.from_numpy(out)


def content_tensors(fs: FeatureSet, text_encoder: TextEncoder,
                    note: Callable[[str], None] = lambda line: None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The catalogue's content for ``text_encoder``: category ids (N+1, Kc), token ids (N+1, Kt)
    (hashed words; a (N+1, 1) zero column for the other encoders), numeric (N+1, F) and, for a
    sentence encoder, its vectors (N+1, S) (else None)."""
    cats, nums = padded(fs.item_categories), torch.from_numpy(np.ascontiguousarray(fs.item_numeric))
    toks = padded(fs.item_tokens) if text_encoder == "hashed" else torch.zeros(fs.num_items + 1, 1, dtype=torch.long)
    sentences = torch.from_numpy(text_vectors(fs, text_encoder, note)) if text_encoder in SENTENCE_ENCODERS else None
    return cats, toks, nums, sentences


def build_sasrec(fs: FeatureSet, ms: ModelSettings,
                 note: Callable[[str], None] = lambda line: None) -> tuple[SASRec, SASRecShape]:
    """A fresh model shaped for ``fs`` (``auto`` values of ``ms`` fitted to it): content buffers
    loaded, cold items marked; and its shape. ``note`` hears about text encoding."""
    ms = fit_model(ms, fs)[0]
    text_encoder = ms.text_encoder if ms.use_content else "none"  # a pure-ID tower reads no content
    cats, toks, nums, sentences = content_tensors(fs, text_encoder, note)
    shape = SASRecShape(
        num_items=fs.num_items, dim=ms.hidden_size, max_len=ms.max_len, num_blocks=ms.num_blocks,
        num_heads=ms.num_heads, dropout=ms.dropout, ff_mult=ms.ff_mult, use_content=ms.use_content,
        id_dropout=ms.id_dropout, num_categories=int(fs.manifest["counts"]["categories"]),
        text_buckets=int(fs.manifest["text_buckets"]) if text_encoder == "hashed" else 0,
        num_numeric=nums.shape[1], max_categories=cats.shape[1], max_tokens=toks.shape[1],
        text_dim=sentences.shape[1] if sentences is not None else 0,
    )
    model = shape.build()
    model.item_tower.set_content(cats, toks, nums, sentences)
    model.item_tower.set_cold(torch.from_numpy(fs.cold_mask))
    return model, shape


class SasrecScorer:
    """Scores over the catalogue for a batch of histories (``SASRec.forward``): item vectors
    computed once, and every batch's scores written into one buffer, so that a call's scores
    last until the next call.

    A fresh (B, N+1) block every batch is mapped afresh and page-faulted in wherever glibc
    serves it outside the main heap, as it does any block over 64 MB in a thread's own arena
    (Ray Train's training thread validates): at 500,000 items a batch of 512 users is 1 GB,
    262,000 faults (docs/scaling.md).

    It pickles as its model (a Ray task's argument): the item vectors are computed again where
    it is unpickled, and the buffer, grown by the batches it scored here, stays here.
    """

    def __init__(self, model: SASRec) -> None:
        self.model = model
        with torch.no_grad():
            self.table = model.item_vectors()  # (N+1, D)
        self.buffer = self.table.new_empty(0, self.table.shape[0])  # (B_max, N+1), grown to the largest batch

    @torch.no_grad()
    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T) item indices -> (B, N+1) scores, a view of the buffer."""
        if self.buffer.shape[0] < seq.shape[0]:
            self.buffer = self.table.new_empty(seq.shape[0], self.table.shape[0])
        return self.model(seq, self.table, out=self.buffer[:seq.shape[0]])

    def __reduce__(self) -> tuple[type[SasrecScorer], tuple[SASRec]]:
        return SasrecScorer, (self.model,)


def new_run_dir(settings: Settings) -> Path:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    path = settings.runs_dir / run_id
    path.mkdir(parents=True, exist_ok=False)
    return path


@dataclass
class TrainOutcome:
    model: SASRec
    shape: SASRecShape
    fit: FitResult
    valid: dict[str, float]
    run_dir: Path
    device: torch.device


@dataclass
class TrainingSetup:
    """What a SASRec run on a feature set steps through (shared by ``train_sasrec`` and the
    training-speed benchmark, so both measure the same recipe)."""

    model: SASRec
    shape: SASRecShape
    train: Ragged              # each user's training events (cold items removed)
    windows: Windows           # training windows over ``train`` (in a DDP group: this rank's users' only)
    steps_per_epoch: int
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (inputs, targets) (B, T)
    loss: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]  # (model, batch) -> scalar
    row_sparse: tuple[torch.nn.Parameter, ...]  # tables with sparse gradients (``fit``'s ``row_sparse``)


def training_setup(settings: Settings, fs: FeatureSet, device: torch.device,
                   note: Callable[[str], None] = lambda line: None) -> TrainingSetup:
    """The model, batches and loss of a run (seeded by ``settings.train.seed`` before the model
    is built; ``auto`` settings fitted to ``fs``). ``note`` hears about text encoding."""
    settings = fit_to_data(settings, fs)[0]
    cfg, ms = settings.train, settings.model
    seed_everything(cfg.seed)
    model, shape = build_sasrec(fs, ms, note)

    # --- batches: every training window once per epoch, shuffled by a per-epoch seed. In a DDP
    # group each rank packs only its own users' windows, its share of every step (``rank_share``).
    cold = fs.cold_mask
    train = training_sequences(fs.sequences, fs.train_end, cold)
    windows = training_windows(train, ms.max_len, cfg.all_windows)
    batch_size, steps = cfg.batch_size, math.ceil(len(windows) / cfg.batch_size)
    group = process_group()
    if group is not None:
        all_windows = len(windows)
        windows, batch_size, steps = rank_share(windows, cfg.batch_size, group.rank, group.world)
        if steps == 0:
            raise UserError(f"train.workers = {group.world}: some workers would get no training windows "
                            f"({all_windows:,} windows in all); use fewer workers")

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(cfg.seed * 1_000_003 + epoch)
        stream = epoch_batches(train, windows, batch_size, rng, cfg.group_by_length)
        for inputs, targets in itertools.islice(stream, steps):
            yield torch.from_numpy(inputs), torch.from_numpy(targets)

    # --- tables with sparse gradients: with a sampled softmax a step looks up at most a few
    # thousand rows of the item tables: DDP's ranks exchange those rows alone (``TableGradients``),
    # and with ``table_updates = "rows"`` AdamW updates them alone (``RowAdamW``). Not in a
    # compiled step (``train.compile``): Inductor cannot compile a sparse backward (it would fall
    # back with a graph break).
    check_table_updates(cfg, device)
    compiled = precision_and_compilation(cfg, device)[1]
    rows = cfg.table_updates == "rows"
    sparse_tables = cfg.negatives > 0 and not compiled and (rows or (group is not None and cfg.sparse_item_tables))
    row_sparse = tuple(model.item_tower.make_tables_sparse()) if sparse_tables else ()

    # --- loss: next item at every position; padding and cold items are never predicted
    excluded = torch.from_numpy(cold).clone()
    excluded[0] = True
    counts = torch.from_numpy(np.bincount(train.values, minlength=fs.num_items + 1).astype(np.float64))
    next_item = NextItemLoss(excluded, cfg.negatives, counts.clamp(min=1.0) ** 0.75 if cfg.negatives else None,
                             exclude_history=cfg.exclude_history).to(device)
    return TrainingSetup(model, shape, train, windows, steps, batches, next_item_objective(next_item), row_sparse)


def check_table_updates(cfg: TrainSettings, device: torch.device) -> None:
    """A ``UserError`` where ``table_updates = "rows"`` cannot hold: a full softmax reads every
    row; a compiled step cannot have sparse gradients; DDP's whole-table all-reduce leaves no
    rows. Checked before a run starts, so a refused run leaves nothing behind."""
    if cfg.table_updates != "rows":
        return
    if cfg.negatives == 0:
        raise UserError("train.table_updates = rows needs a sampled softmax (train.negatives > 0): "
                        "a full-softmax step reads every row of the item tables")
    if precision_and_compilation(cfg, device)[1]:
        raise UserError(f"train.table_updates = rows needs an uncompiled step (train.compile = {cfg.compile} "
                        f"compiles it on {device.type}; set train.compile = off)")
    if cfg.workers > 1 and not cfg.sparse_item_tables:
        raise UserError("train.table_updates = rows needs train.sparse_item_tables = true with workers > 1 "
                        "(the workers must exchange the rows read)")


def next_item_objective(next_item: NextItemLoss) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    """The training step's loss: (model, (inputs, targets) (B, T)) -> the next-item loss of its states.

    The full softmax scores the whole catalogue, so it runs the item tower over every item. A
    sampled softmax reads only the step's own items and its negatives (with 128 windows of 50
    and 1,024 negatives: at most 13,825 rows whatever the catalogue's size), so the tower runs
    on those rows alone, and the step's cost no longer grows with the catalogue; every row gets
    the vector the whole table would give it (one ID-dropout draw per item and step, as there).
    """
    def loss(m: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets = batch  # (B, T) each
        if not next_item.negatives:
            table = m.item_vectors()  # (N+1, D)
            return next_item(m.encode(inputs, table), table, inputs, targets)
        negatives = next_item.draw_negatives()  # (S,)
        read = torch.cat([inputs.new_zeros(1), inputs.reshape(-1), targets.reshape(-1), negatives])  # (1 + 2BT + S,)
        items, rows = torch.unique(read, return_inverse=True)  # (U,) sorted, items[0] = 0 (padding); (1 + 2BT + S,)
        table = m.item_vectors(items)  # (U, D)
        local_inputs = rows[1:1 + inputs.numel()].view_as(inputs)  # (B, T) rows of `table`; padding stays row 0
        return next_item(m.encode(local_inputs, table), table, inputs, targets, negatives, items)

    return loss


def train_sasrec(settings: Settings, fs: FeatureSet, run_dir: Path | None = None, resume: bool = False,
                 progress: bool = True, on_epoch: Callable[[EpochRecord], None] | None = None,
                 note: Callable[[str], None] = lambda line: None) -> TrainOutcome:
    """Train on ``fs``'s training events, early-stop on the validation selection metric.

    The resumable checkpoint goes to ``run_dir/checkpoint.pt``. Checkpoints are chosen on
    the validation split only; the test split is never read here. ``auto`` settings are
    fitted to ``fs`` (``pipeline.training.data_defaults``); ``note`` hears about text encoding.
    In a DDP process group (``pipeline.scale.training``) ``fit`` trains data-parallel and the
    ranks share the validation's users (every rank gets the metrics). The outcome's metrics are
    the best epoch's, the weights it returns.
    """
    settings = fit_to_data(settings, fs)[0]
    cfg, ms = settings.train, settings.model
    device = resolve_device(settings.device)
    run_dir = run_dir or new_run_dir(settings)
    setup = training_setup(settings, fs, device, note)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(SasrecScorer(m), fs, "valid", ms.max_len, device, ks=selection_ks(cfg.selection_metric),
                        group=process_group(), sample=cfg.valid_users).metrics

    result = fit(setup.model, setup.batches, setup.loss, validate, cfg, device, setup.steps_per_epoch,
                 param_groups=setup.model.optimizer_groups(cfg.weight_decay), row_sparse=setup.row_sparse,
                 checkpoint_path=run_dir / "checkpoint.pt",
                 resume=resume, on_epoch=on_epoch, progress=progress)
    # the kept weights are the best epoch's, so are its metrics: a full-ranking validation is not
    # run again (at scale it costs about as much as an epoch's scoring of every user)
    valid = next((r.valid for r in result.history if r.epoch == result.best_epoch and r.valid), None)
    if valid is None:  # no epoch was validated (epochs = 0)
        valid = validate(setup.model)
    return TrainOutcome(setup.model, setup.shape, result, valid, run_dir, device)


@torch.no_grad()
def validation_queries(model: SASRec, fs: FeatureSet, users: int = RECALL_QUERY_USERS) -> np.ndarray:
    """(Q, D) float32 user vectors of up to ``users`` users' validation inputs: real queries for
    index recall (the model is put in eval mode: these are the vectors serving computes)."""
    model.eval()
    chosen = np.nonzero(fs.valid_pos >= 0)[0][:users]
    if not len(chosen):
        return np.zeros((0, model.dim), dtype=np.float32)
    device = next(model.parameters()).device
    seq = torch.from_numpy(prefix_batch(fs.sequences, chosen, fs.valid_pos[chosen].astype(np.int64), model.max_len))
    return model.user_vectors(seq.to(device)).cpu().numpy().astype(np.float32)


def baseline_model(name: str, fs: FeatureSet) -> torch.nn.Module:
    """Most-popular or item-kNN fitted on the training events (cold items excluded)."""
    train = training_sequences(fs.sequences, fs.train_end, fs.cold_mask)
    if name == "popularity":
        return MostPopular(torch.from_numpy(np.bincount(train.values, minlength=fs.num_items + 1).astype(np.float32)))
    if name == "itemknn":
        users = np.repeat(np.arange(len(train.lengths())), train.lengths())
        return ItemKNN.fit(torch.from_numpy(users), torch.from_numpy(train.values), fs.num_users, fs.num_items)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
