"""The SASRec recipe: one full validation per validated epoch, and the outcome's metrics are
those of the weights it returns."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import cloudpickle
import pytest
import torch

import pipeline.training.recipe as recipe
from models.item_tower import ItemTower
from models.sasrec import SASRec
from pipeline.config import load_settings
from pipeline.data.feature_store import FeatureSet
from pipeline.errors import UserError
from pipeline.training.evaluation import evaluate, selection_ks
from tests.pipeline.training.page_fault_probes import run_probe


@pytest.mark.parametrize("epochs", [0, 2])
def test_validation_runs_once_per_epoch_and_the_outcome_holds_the_kept_weights_metrics(
        tiny_fs: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    settings = load_settings(home=tmp_path / "home", **{
        "train.epochs": epochs, "train.batch_size": 16, "model.max_len": 20, "model.hidden_size": 16,
        "model.text_encoder": "hashed"})
    calls: list[str] = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(recipe, "evaluate", counted)
    outcome = recipe.train_sasrec(settings, tiny_fs, progress=False)
    # a full-ranking validation is the costly part of an epoch at scale: each validated epoch
    # runs one, and the outcome reuses the best epoch's (one more only when no epoch ran)
    assert calls == ["valid"] * max(epochs, 1)
    metric = settings.train.selection_metric
    again = evaluate(recipe.SasrecScorer(outcome.model), tiny_fs, "valid", settings.model.max_len,
                     torch.device("cpu"), ks=selection_ks(metric)).metrics
    assert outcome.valid == again
    if epochs:
        best = next(r for r in outcome.fit.history if r.epoch == outcome.fit.best_epoch)
        assert outcome.valid == best.valid and outcome.valid[metric] == outcome.fit.best_metric


def test_row_updates_train_one_process_with_sparse_item_tables_and_refuse_steps_that_read_every_row(
        tiny_fs: FeatureSet, tmp_path: Path) -> None:
    shape = {"train.batch_size": 16, "model.max_len": 20, "model.hidden_size": 16, "model.text_encoder": "hashed"}

    def settings(**changes: object):
        return load_settings(home=tmp_path / "home", **shape, **changes)

    rows = settings(**{"train.negatives": 16, "train.table_updates": "rows", "train.epochs": 3, "train.lr": 1e-2})
    setup = recipe.training_setup(rows, tiny_fs, torch.device("cpu"))
    assert setup.row_sparse[0] is setup.model.item_tower.id_embedding.weight
    assert len(setup.row_sparse) == 3  # IDs, categories, hashed words: sparse in one process too
    dense = settings(**{"train.negatives": 16})
    assert recipe.training_setup(dense, tiny_fs, torch.device("cpu")).row_sparse == ()  # one process, dense updates
    losses = [h.loss for h in recipe.train_sasrec(rows, tiny_fs, progress=False).fit.history]
    assert losses[-1] < losses[0], losses

    with pytest.raises(UserError, match=r"train.negatives > 0"):
        recipe.training_setup(settings(**{"train.table_updates": "rows"}), tiny_fs, torch.device("cpu"))
    with pytest.raises(UserError, match=r"train.compile = on compiles it on cpu; set train.compile = off"):
        recipe.training_setup(settings(**{"train.negatives": 16, "train.table_updates": "rows", "train.compile": "on"}),
                              tiny_fs, torch.device("cpu"))


def test_a_sampled_softmax_step_runs_the_item_tower_on_its_own_items_with_the_whole_tables_loss_and_gradient() -> None:
    """The recipe's step with a sampled softmax computes item vectors for the step's items and
    negatives only, and its loss and every gradient equal those of the whole catalogue's table
    (same negatives, same weights)."""
    from models.losses import NextItemLoss
    from pipeline.registry.model_store import SASRecShape

    torch.manual_seed(0)
    n, t, negatives = 400, 6, 16
    model = SASRecShape(num_items=n, dim=16, max_len=t, num_blocks=1, num_heads=2, dropout=0.0, ff_mult=1,
                        use_content=True, id_dropout=0.0, num_categories=3, text_buckets=16, num_numeric=1,
                        max_categories=2, max_tokens=2).build()
    model.item_tower.set_content(torch.randint(0, 4, (n + 1, 2)), torch.randint(0, 16, (n + 1, 2)), torch.randn(n + 1, 1))
    excluded = torch.zeros(n + 1, dtype=torch.bool)
    excluded[0] = True
    next_item = NextItemLoss(excluded, negatives, torch.rand(n + 1) + 0.1, exclude_history=True)
    inputs = torch.randint(1, n + 1, (5, t))
    inputs[0, :3] = 0  # a short history, left-padded
    targets = torch.cat([inputs[:, 1:], torch.randint(1, n + 1, (5, 1))], dim=1)
    targets[0, :2] = 0

    rows_computed: list[int] = []
    model.item_tower.register_forward_hook(lambda _m, args, out: rows_computed.append(out.shape[0]))
    torch.manual_seed(1)  # the same negatives on both sides
    step = recipe.next_item_objective(next_item)(model, (inputs, targets))
    step.backward()
    step_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(1)
    table = model.item_vectors()  # (N+1, D)
    whole = next_item(model.encode(inputs, table), table, inputs, targets)
    whole.backward()

    assert rows_computed[0] <= 1 + 2 * inputs.numel() + negatives < n + 1  # the step's items, not the catalogue
    torch.testing.assert_close(step, whole)
    assert step_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(step_grads[name], p.grad, msg=name)


@torch.no_grad()
def test_the_scorer_writes_each_batch_into_one_buffer_and_scores_as_the_model_does() -> None:
    torch.manual_seed(0)
    model = SASRec(ItemTower(50, 8, use_content=False), max_len=5).eval()
    score = recipe.SasrecScorer(model)
    seq = torch.randint(1, 51, (4, 5))
    first = score(seq)
    torch.testing.assert_close(first, model(seq))
    smaller = score(seq[:2])  # a last, shorter batch
    assert smaller.data_ptr() == first.data_ptr()
    torch.testing.assert_close(smaller, model(seq[:2]))


@torch.no_grad()
def test_a_used_scorer_pickles_as_its_model_without_its_scores_buffer() -> None:
    """A Ray task's scorer: before, the closure carried the buffer its batches had grown (here
    200 x 20,001 floats, 16 MB) and the item vectors beside the model."""
    torch.manual_seed(0)
    model = SASRec(ItemTower(20_000, 8, use_content=False), max_len=5).eval()
    score = recipe.SasrecScorer(model)
    seq = torch.randint(1, 20_001, (200, 5))
    expected = score(seq).clone()
    data = cloudpickle.dumps(score)  # as Ray pickles a task's arguments
    assert len(data) < len(cloudpickle.dumps(model)) + 10_000  # the model, not 16 MB of scores
    again = cloudpickle.loads(data)
    torch.testing.assert_close(again(seq), expected, rtol=0, atol=0)


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's thread arenas are Linux's")
def test_scoring_batches_in_a_thread_does_not_page_fault_the_scores_in_every_batch(intra_op_threads: int) -> None:
    """Ray Train validates in a thread, whose malloc arena maps any block over 64 MB afresh: a
    new (64, 300,001) block of scores (77 MB) each batch was all of its pages faulted in again.
    At 4 intra-op threads the matmul's workers write most of the block (CI saw 7 faults in the
    calling thread). Measured in a fresh interpreter (``page_fault_probes``), against a control:
    the same scorer made to allocate a new buffer before every batch."""
    probe = run_probe("scorer", intra_op_threads)
    fresh, faults, reallocated = probe["fresh"], probe["faults"], probe["reallocated"]
    if fresh < 64 * 300_001 * 4 // resource.getpagesize() // 2:
        pytest.skip(f"a fresh 77 MB block faults {fresh} pages here: too few to tell a reused block from a new one")
    assert min(reallocated) > fresh // 2, probe  # the control: a new buffer every batch is seen
    assert max(faults[1:]) < min(reallocated) // 10, probe  # later batches reuse the buffer
