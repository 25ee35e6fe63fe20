"""Multi-worker training: the one recipe as torch DDP on Ray Train's ``TorchTrainer``.

``train_sasrec_on_ray`` starts ``train.workers`` Ray Train workers (one CPU each, or one GPU
each on CUDA; gloo on the CPU, NCCL on GPUs). Each worker runs ``train_sasrec`` unchanged:
``pipeline.training.loop.fit`` sees the process group Ray Train set up and trains
data-parallel (every rank reads its shard of the users' windows, a share of every step's
batch; gradients averaged by DDP; each rank ranks a share of the validation users;
checkpoints on rank 0). Rank 0 leaves the trained weights and the fit's record in the run
folder, from which the driver rebuilds the same ``TrainOutcome`` a local run returns. The
run folder and the feature set must be on storage every worker can read (one machine, or a
shared file system).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Settings
from pipeline.data.feature_store import FeatureSet, load_feature_set
from pipeline.errors import UserError
from pipeline.scale.cluster import import_ray, ray_connection, user_error_in
from pipeline.training.loop import EpochRecord, FitResult, process_group, resolve_device
from pipeline.training.recipe import TrainOutcome, build_sasrec, new_run_dir, train_sasrec

RANK_0_RESULT = "distributed_result.pt"  # in the run folder: rank 0's weights and fit record


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: ``train_sasrec`` in the process group; rank 0 saves the outcome."""
    settings: Settings = config["settings"]
    run_dir = Path(config["run_dir"])
    outcome = train_sasrec(settings, load_feature_set(Path(config["features"])), run_dir=run_dir,
                           resume=config["resume"], progress=False)
    group = process_group()
    if group is None or group.leads:
        fit = outcome.fit
        torch.save({"state_dict": outcome.model.state_dict(), "valid": outcome.valid,
                    "fit": {**asdict(fit), "history": [asdict(h) for h in fit.history]}}, run_dir / RANK_0_RESULT)


def train_sasrec_on_ray(settings: Settings, fs: FeatureSet, run_dir: Path | None = None, resume: bool = False,
                        on_epoch: Callable[[EpochRecord], None] | None = None,
                        note: Callable[[str], None] = lambda line: None) -> TrainOutcome:
    """``train_sasrec`` with ``settings.train.workers`` DDP workers on the engine's Ray cluster.

    ``on_epoch`` hears every epoch's record once training has finished (the workers run
    apart from this process). ``settings`` must have its ``auto`` values fitted already
    (``fit_to_data``), so every worker builds the same model.
    """
    import_ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    device = resolve_device(settings.device)
    run_dir = run_dir or new_run_dir(settings)
    cuda = device.type == "cuda"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"settings": settings, "features": str(fs.path), "run_dir": str(run_dir), "resume": resume},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.train.workers, use_gpu=cuda,
                                     resources_per_worker={"GPU": 1} if cuda else {"CPU": 1}),
        run_config=RunConfig(name=run_dir.name, storage_path=str(settings.home / "ray_train")),
    )
    with ray_connection(settings) as ray:
        kind = "GPU" if cuda else "CPU"
        offered = int(ray.cluster_resources().get(kind, 0))
        if offered < settings.train.workers:  # Ray Train would wait for them without a word
            where = f"at {settings.ray_address}" if settings.ray_address else "started for this command"
            raise UserError(f"train.workers = {settings.train.workers}: the Ray cluster {where} has {offered} "
                            f"{kind}s (one per worker); use --workers {max(1, offered)} or a larger cluster")
        try:
            trainer.fit()
        except Exception as exc:  # Ray Train's WorkerGroupError: each failed rank's error, with its traceback in the text
            error = user_error_in(exc)
            if error is None:
                raise
            raise error from None
    saved = torch.load(run_dir / RANK_0_RESULT, map_location="cpu", weights_only=True)  # tensors and plain values only
    model, shape = build_sasrec(fs, settings.model, note)
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    history = [EpochRecord(**h) for h in saved["fit"].pop("history")]
    for record in history:
        if on_epoch:
            on_epoch(record)
    return TrainOutcome(model, shape, FitResult(**saved["fit"], history=history), saved["valid"], run_dir, device)
