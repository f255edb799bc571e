"""Distributed training with Ray Train: `catrs train … --workers K [--gpus-per-worker G]`.

The training loop (`catrs.train.fit`) runs in a `TorchTrainer` with K workers (DDP over gloo on CPUs, NCCL
on GPUs). The global batch keeps its meaning: each worker takes batch/K of it (its share of `catrs.train.EpochShuffle`),
and each of its chunks is one synchronised optimizer step, so the released per-noise chunking is intact.
Checkpoints go to the run's storage (`--storage-path`, a local directory or a cloud URI; default the run
directory's parent, so the run's own directory is its storage); a worker failure restarts the group from the
latest checkpoint (`FailureConfig`), and the same command resumes a stopped run. Soft labels are made
by the cluster (`cluster_producer`, below) and handed to the workers through the object store. Workers the
cluster can never hold (more than its nodes and its autoscaler's can take, or one bigger than any node) are
refused before any work, as is a sweep's trial (`refuse_a_sweep_beyond_reach`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from catrs.checkpoint import Checkpoint, load_checkpoint
from catrs.context import RunContext
from catrs.data import sealed
from catrs.distributed.cache import cluster_exclusive
from catrs.distributed.chunks import distributed_votes, refuse_a_pool_beyond_reach
from catrs.distributed.runtime import ask_for, capacity, connect, gpu_workers_see_cuda, refuse_beyond_reach
from catrs.errors import JobFailed
from catrs.inference import worker_device
from catrs.storage import Stored, stored
from catrs.teacher import Producer, SoftLabelSpec
from catrs.train import (
    CHECKPOINT_NAME,
    EpochShuffle,
    Evaluation,
    RunFolder,
    Rung,
    RunSpec,
    SingleWorkerSession,
    TrainConfig,
    TrainingRun,
    WorkerPlan,
    claimed_run,
    climb,
    loader_options,
    soft_labels_for,
    train,
    train_teacher_here,
)
from catrs.vote_store import SoftLabels


def from_ray_checkpoint(checkpoint: ray.train.Checkpoint | None) -> Checkpoint | None:
    """The catrs checkpoint inside a Ray Train or Tune checkpoint directory (None for no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(RunFolder(Path(folder)).checkpoint)


class RayTrainSession:
    """`catrs.train.Session` inside a Ray Train worker, on the device it actually has."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = worker_device()

    def latest(self) -> Checkpoint | None:
        return from_ray_checkpoint(ray.train.get_checkpoint())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def loader(self, dataset: Dataset, config: TrainConfig) -> DataLoader:
        if self.world_size == 1:
            return SingleWorkerSession.loader(self, dataset, config)  # type: ignore[arg-type]
        sampler = EpochShuffle(len(dataset), config.seed, config.fraction, self.rank, self.world_size)  # type: ignore[arg-type]
        batch = max(1, config.batch_size // self.world_size)
        return DataLoader(dataset, batch_size=batch, sampler=sampler, **loader_options(self.device))

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(metrics, (values / self.world_size).tolist(), strict=True))

    def gather(self, item: Any) -> list[Any]:
        if self.world_size == 1:
            return [item]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, item)
        return gathered

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                run.write(Path(folder), evaluation)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)  # a barrier: every rank calls it


def worker_settings(
    spec: RunSpec,
    soft_labels: SoftLabels | None,
    context: RunContext,
    evaluation: Evaluation | None = None,
    sealed: tuple[str, ...] = (),
    rungs: tuple[Rung, ...] = (),
) -> dict[str, Any]:
    """`worker_loop`'s argument: the run, its soft labels (where they are in the cache: each node maps its own
    copy, so no node needs a shared file system and no rank holds a copy of its own); `sealed`: splits the
    workers must not read; `rungs`: the fidelity ladder a sweep's trial climbs (none: train the run as it is)."""
    return {
        "run": spec,
        "soft_labels": soft_labels,
        "context": context,
        "evaluation": evaluation,
        "sealed": sealed,
        "rungs": rungs,
    }


def worker_loop(settings: dict[str, Any]) -> None:
    """What each Ray Train worker runs: `fit` (or a trial's `climb`) with a `RayTrainSession`."""
    run, session, context = settings["run"], RayTrainSession(), settings["context"]
    with sealed(*settings["sealed"]):
        climb(run, session, context, settings["soft_labels"], settings["evaluation"], settings["rungs"])


def gpus_of(plan: WorkerPlan) -> float:
    """The GPUs of each worker of `plan`, decided from the cluster's capacity where the plan leaves it open."""
    if plan.gpus_per_worker is not None:
        return plan.gpus_per_worker
    return 1.0 if capacity().accelerated else 0.0


def worker_bundle(plan: WorkerPlan) -> dict[str, float]:
    """What each worker of `plan` asks Ray for."""
    gpus = gpus_of(plan)
    return {"CPU": plan.cpus_per_worker, **({"GPU": gpus} if gpus else {})}


def scaling(plan: WorkerPlan) -> ray.train.ScalingConfig:
    resources = worker_bundle(plan)
    return ray.train.ScalingConfig(
        num_workers=plan.workers, use_gpu=resources.get("GPU", 0) > 0, resources_per_worker=resources
    )


PLAN_FIX = "lower --workers, --gpus-per-worker or --cpus-per-worker"
TRIAL_FIX = "lower its workers, gpus_per_worker or cpus_per_worker"


def refuse_a_plan_beyond_reach(plan: WorkerPlan, asked: str, fix: str = PLAN_FIX) -> None:
    """Refuses (before any work) a plan whose workers the cluster can never hold at once: more than its nodes
    and its autoscaler's can take, or a worker bigger than any node (`catrs.distributed.runtime.reach`)."""
    connect()
    refuse_beyond_reach(asked, plan.workers, worker_bundle(plan), fix)


def refuse_a_sweep_beyond_reach(resources: WorkerPlan, certify_workers: int, space: Path) -> None:
    """Refuses, when a sweep starts (before its MLflow parent run), what its file asks and the cluster can
    never hold: a trial (`resources`: one worker's bundle, or Ray Train workers and the trial that drives them
    with one CPU, as `catrs.distributed.tune.trial_trainable` asks) or the pool of `certify_workers` that
    certifies the candidates and the winner (`final.workers`)."""
    connect()
    if resources.workers == 1:
        refuse_beyond_reach(f"{space}: resources", 1, worker_bundle(resources), TRIAL_FIX)
    else:
        bundle, driver = worker_bundle(resources), {"CPU": 1.0}
        refuse_beyond_reach(f"{space}: resources (each trial)", resources.workers, bundle, TRIAL_FIX, driver)
    refuse_a_pool_beyond_reach(certify_workers, f"{space}: final.workers {certify_workers}", "lower final.workers")


def torch_config(plan: WorkerPlan) -> TorchConfig:
    """The collective backend of what the workers actually have: NCCL between GPUs that CUDA sees, gloo
    otherwise (CPUs, or GPUs a test cluster only advertises)."""
    return TorchConfig(backend="nccl" if gpus_of(plan) and gpu_workers_see_cuda() else "gloo")


def train_distributed(spec: RunSpec, out: Path, plan: WorkerPlan, context: RunContext) -> Path:
    """Trains (or resumes) the run `spec` on the plan's Ray Train workers; copies the final checkpoint into `out`."""
    out = Path(out).resolve()
    refuse_a_plan_beyond_reach(plan, f"--workers {plan.workers}")  # what the cluster can never hold waits for ever
    with claimed_run(spec, out):
        return _train_on_workers(spec, out, plan, context)


def _train_on_workers(spec: RunSpec, out: Path, plan: WorkerPlan, context: RunContext) -> Path:
    connect()
    settings = worker_settings(spec, soft_labels_for(spec, context, cluster_producer()), context)
    gpus = gpus_of(plan)
    ask_for([{"GPU": gpus, "CPU": plan.cpus_per_worker}] * plan.workers if gpus else [])
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=settings,
        scaling_config=scaling(plan),
        torch_config=torch_config(plan),
        run_config=ray.train.RunConfig(
            name=out.name,
            storage_path=plan.storage_path or str(out.parent),
            failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise JobFailed(
            f"distributed training of {out} failed after {plan.max_failures} restarts: "
            f"{str(error).splitlines()[0][:300]}; the same command resumes from the latest "
            f"checkpoint"
        ) from None
    finally:
        ask_for([])  # the workers are done: the autoscaler may let their nodes go
    if result.checkpoint is None:  # every epoch reports one: only a run with no epoch to train gets here
        raise JobFailed(f"distributed training of {out} ended without a checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(out))
    return RunFolder(out).checkpoint


def train_teacher_on_a_worker(spec: SoftLabelSpec, folder: Stored, context: RunContext) -> Path:
    """The teacher of `spec` trained in one Ray task (a GPU where the cluster has or can get GPUs), checkpointed
    every epoch in the cache `folder` (`train_teacher_here`), where a restarted task resumes; returns the
    driver's copy of the final checkpoint. A task, not a Ray Train job: a teacher is one worker, and a worker
    group's start-up dwarfs a short teacher (the demo's two: 36 s as Ray Train jobs, 6 s as tasks)."""
    task = _teacher_task.options(num_cpus=1, num_gpus=gpus_of(WorkerPlan(workers=1)))
    local = context.local_cache / "teacher-checkpoints" / folder.name / CHECKPOINT_NAME
    return _checkpoint_of(task.remote(spec, folder, context), local, f"training the teacher {folder.name}")


@ray.remote(max_retries=3)  # as many as a training run's worker group survives (`WorkerPlan.max_failures`)
def _teacher_task(spec: SoftLabelSpec, folder: Stored, context: RunContext) -> bytes:
    return train_teacher_here(spec, folder, context).read_bytes()


def cluster_producer() -> Producer:
    """Soft labels made by the cluster: the teacher in a task, the votes on the chunk queue, and one owner
    per cache key cluster-wide (`catrs.distributed.cache`)."""
    return Producer(train_teacher=train_teacher_on_a_worker, vote=distributed_votes, exclusive=cluster_exclusive)


@ray.remote(max_retries=1)
def _train_task(spec: RunSpec, context: RunContext) -> bytes:
    """Trains on whichever node Ray picks, in a scratch folder there; the checkpoint comes back as bytes, since
    that folder is not one the driver can read."""
    with tempfile.TemporaryDirectory() as scratch:
        return train(spec, Path(scratch), context).read_bytes()


def train_on_a_worker(spec: RunSpec, out: Path, plan: WorkerPlan, context: RunContext) -> Path:
    """The run trained in one Ray task with the plan's resources (a one-worker plan), its checkpoint written
    to `out`; or on Ray Train workers (a plan of several)."""
    if plan.workers > 1:
        return train_distributed(spec, out, plan, context)
    task = _train_task.options(num_cpus=plan.cpus_per_worker, num_gpus=gpus_of(plan))
    return _checkpoint_of(task.remote(spec, context), RunFolder(out).checkpoint, f"training {out} on a worker")


def _checkpoint_of(pending: ray.ObjectRef, path: Path, what: str) -> Path:
    """The checkpoint a training task sends back as bytes, written to `path` on the driver."""
    try:
        checkpoint = ray.get(pending)
    except ray.exceptions.RayError as error:
        raise JobFailed(f"{what} failed: {str(error).splitlines()[0][:300]}") from None
    stored(str(path)).write_bytes(checkpoint)
    return path
