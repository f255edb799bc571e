"""Distributed training with Ray Train: `catrs train … --workers K [--gpus-per-worker G]`.

The training loop (`catrs.train.fit`) runs in a `TorchTrainer` with K workers (DDP over gloo on CPUs, NCCL
on GPUs). The global batch keeps its meaning: each worker takes batch/K of it from a `DistributedSampler`,
and each of its chunks is one synchronised optimizer step, so the released per-noise chunking is intact.
Checkpoints go to the run's storage (`--storage-path`, a local directory or a cloud URI; default the run
directory's parent, so the run's own directory is its storage); a worker failure restarts the group from the
latest checkpoint (`FailureConfig`), and the same command resumes a stopped run. Soft labels are made
by the cluster (`cache.cluster_producer`) and handed to the workers through the object store.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from catrs.checkpoint import Checkpoint, load_checkpoint
from catrs.data import sealed
from catrs.distributed.runtime import connect
from catrs.distributed.cache import cluster_producer
from catrs.errors import JobFailed, UserError
from catrs.train import (CHECKPOINT_NAME, Evaluation, TrainConfig, TrainingRun, fit, shuffled_loader,
                         soft_labels_for)

MAX_FAILURES = 3


def from_ray_checkpoint(checkpoint: ray.train.Checkpoint | None) -> Checkpoint | None:
    """The catrs checkpoint inside a Ray Train or Tune checkpoint directory (None for no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_NAME)


class RayTrainSession:
    """`catrs.train.Session` inside a Ray Train worker."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def latest(self) -> Checkpoint | None:
        return from_ray_checkpoint(ray.train.get_checkpoint())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    def loader(self, dataset: Dataset, config: TrainConfig, epoch: int) -> DataLoader:
        if self.world_size == 1:
            return shuffled_loader(dataset, config, epoch)
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=config.seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=max(1, config.batch_size // self.world_size), sampler=sampler)

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=ray.train.torch.get_device())
        dist.all_reduce(values)
        return dict(zip(metrics, (values / self.world_size).tolist()))

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                run.write(Path(folder), evaluation)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)  # a barrier: every rank calls it


def worker_settings(config: TrainConfig, soft_labels: ray.ObjectRef | None, data_root: Path | None, download: bool,
                    evaluation: Evaluation | None = None, sealed: tuple[str, ...] = ()) -> dict[str, Any]:
    """`worker_loop`'s argument: the run, and its soft labels as a reference into the object store (each worker
    fetches them there, so no node needs a shared file system); `sealed`: splits the workers must not read."""
    return {"config": asdict(config), "soft_labels": soft_labels,
            "data_root": None if data_root is None else str(data_root), "download": download,
            "evaluation": evaluation, "sealed": sealed}


def worker_loop(settings: dict[str, Any]) -> None:
    """What each Ray Train worker runs: `fit` with a `RayTrainSession`."""
    config = TrainConfig(**settings["config"])
    table = ray.get(settings["soft_labels"]) if settings["soft_labels"] is not None else None
    with sealed(*settings["sealed"]):
        fit(config, RayTrainSession(), ray.train.torch.get_device(), data_root=settings["data_root"],
            download=settings["download"], soft_labels=table, evaluation=settings["evaluation"])


def scaling(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> ray.train.ScalingConfig:
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def train_distributed(config: TrainConfig, out: Path, *, workers: int, gpus_per_worker: float = 0.0,
                      cpus_per_worker: float = 1.0, storage_path: str | None = None,
                      max_failures: int = MAX_FAILURES, cache_dir: str | Path | None = None,
                      data_root: Path | None = None, download: bool = False) -> Path:
    """Trains (or resumes) `config` on `workers` Ray Train workers; copies the final checkpoint into `out`."""
    if workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise UserError("--gpus-per-worker must be ≥ 0 and --cpus-per-worker > 0")
    config = config.resolved()
    out = Path(out).resolve()
    connect()
    table = soft_labels_for(config, cache_dir, data_root=data_root, download=download, producer=cluster_producer())
    settings = worker_settings(config, None if table is None else ray.put(table), data_root, download)
    trainer = TorchTrainer(
        worker_loop, train_loop_config=settings, scaling_config=scaling(workers, gpus_per_worker, cpus_per_worker),
        run_config=ray.train.RunConfig(
            name=out.name, storage_path=storage_path or str(out.parent),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise JobFailed(f"distributed training of {out} failed after {max_failures} restarts: "
                        f"{str(error).splitlines()[0][:300]}; the same command resumes from the latest "
                        f"checkpoint") from None
    out.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(out))
    return out / CHECKPOINT_NAME
