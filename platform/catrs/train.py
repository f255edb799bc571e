"""The one training loop: any registered method, any data set and architecture, checkpoint and resume.

    catrs train --method gaussian --dataset digits --sigma 0.5 --epochs 5 --out runs/digits-gaussian

SGD (momentum 0.9, weight decay 1e-4) with a step LR schedule, as in the released code. Each loader batch is
split into the method's number of chunks, each taking its own optimizer step (the released per-noise
chunking). Every epoch ends with `OUT/checkpoint.pt` holding the complete state (model, optimizer, scheduler,
epoch, metric history) and `OUT/metrics.jsonl`; running the same command again resumes from it.

Random state is not carried across epochs: each epoch seeds the noise from (seed, epoch, rank) and the data
order from (seed, epoch), so a run resumed from any epoch's checkpoint — in one process, or in a restarted
Ray Train worker group — draws exactly what an uninterrupted run would have.

`fit` is the loop itself. It talks to its surroundings through a `Session` (where checkpoints come from and
go, how the model and the data are spread over workers): `LocalSession` here, and the Ray sessions in
`catrs.distributed`, so the same loop runs in a plain process, a Ray Train worker and a Tune trial.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import trainables
from catrs.checkpoint import Checkpoint, ModelCard, load_checkpoint, save_checkpoint
from catrs.data import TRAINING_SPLITS, dataset_spec, get_dataset
from catrs.errors import UserError
from catrs.faults import inject
from catrs.inference import pick_device
from catrs.models import model_names
from catrs.smoothing import derived_seed
from catrs.teacher import Producer, SoftLabelSpec, default_cache_dir, soft_labels, teacher_sha
from trainables.base import Batch, Method, StepContext

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
EVALUATION_NAME = "evaluation.parquet"


@dataclass(frozen=True)
class TrainConfig:
    """A training run; the schedule defaults are the paper's CIFAR ones (METHODS.md, "Schedules")."""

    method: str = "gaussian"
    dataset: str = "digits"
    arch: str | None = None  # None: the data set's default architecture
    sigma: float = 0.5
    epochs: int = 150
    batch_size: int | None = None  # None: the method's default (256; MACER 64)
    lr: float = 0.1
    lr_step: int = 50
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    method_config: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"  # or "train_minus_val": keep the `val` split unseen (every sweep trial does)

    @property
    def evaluation_split(self) -> str:
        """Where the run's per-epoch noisy accuracy is measured: `val` when it is held out, else `test`."""
        return "val" if self.train_split == "train_minus_val" else "test"

    def resolved(self) -> TrainConfig:
        """Validated, with the default architecture filled in and the method's config complete."""
        spec = dataset_spec(self.dataset)
        checks = [
            (self.sigma > 0, f"--sigma must be positive, got {self.sigma}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.lr_step >= 1, f"--lr-step must be at least 1, got {self.lr_step}"),
            (self.seed >= 0, f"--seed must be non-negative, got {self.seed}"),
            (self.train_split in TRAINING_SPLITS,
             f"train_split must be one of {', '.join(TRAINING_SPLITS)}, got {self.train_split!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        arch = self.arch or spec.default_arch
        if arch not in model_names():
            raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(model_names())}")
        return replace(self, arch=arch, method_config=asdict(method_config(self)),
                       batch_size=self.batch_size or training_method(self.method).default_batch_size)


def training_method(name: str) -> Method:
    try:
        return trainables.get(name)
    except KeyError as error:
        raise UserError(error.args[0]) from None


def method_config(config: TrainConfig) -> Any:
    try:
        return training_method(config.method).make_config(config.method_config)
    except (KeyError, ValueError, TypeError) as error:
        raise UserError(str(error.args[0] if error.args else error)) from None


@dataclass
class TrainingRun:
    """The mutable state of a run: what a checkpoint holds and a resume restores."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def create(cls, config: TrainConfig, device: torch.device) -> TrainingRun:
        torch.manual_seed(config.seed)
        model = model_card(config).build_model().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
        return cls(config, model, optimizer, scheduler)

    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "next_epoch": self.next_epoch,
            "history": self.history,
        }

    def restore(self, checkpoint: Checkpoint, where: str) -> None:
        """Continues from `checkpoint`, which must come from a run with the same settings (but the epochs)."""
        state = checkpoint.training_state
        if state is None:
            raise UserError(f"{where} holds no training state (a final export?); choose another --out")
        recorded, wanted = state["config"], asdict(self.config)
        defaults = asdict(TrainConfig())  # a setting added since the checkpoint was written has its default there
        differing = [k for k, v in wanted.items() if k != "epochs" and recorded.get(k, defaults[k]) != v]
        if differing:
            details = ", ".join(f"{k}: {recorded.get(k)!r} vs {wanted[k]!r}" for k in differing)
            raise UserError(f"{where} holds a run with other settings ({details}); use another --out to start anew")
        self.model.load_state_dict(checkpoint.state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.next_epoch = int(state["next_epoch"])
        self.history = list(state["history"])

    def write(self, directory: Path, evaluation: pd.DataFrame | None = None) -> Path:
        """The run as files in `directory`: checkpoint, metric history, and the last evaluation's rows."""
        directory.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(directory / CHECKPOINT_NAME, self.model, model_card(self.config), self.state())
        (directory / METRICS_NAME).write_text("".join(json.dumps(row) + "\n" for row in self.history))
        if evaluation is not None:
            evaluation.to_parquet(directory / EVALUATION_NAME, index=False)
        return path


def model_card(config: TrainConfig) -> ModelCard:
    spec = dataset_spec(config.dataset)
    return ModelCard(arch=config.arch or spec.default_arch, dataset=config.dataset, num_classes=spec.num_classes,
                     input_shape=spec.input_shape, normalization=spec.normalization, sigma=config.sigma,
                     method=config.method, config=asdict(config))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, hyper: Any,
               context: StepContext, batch: Batch) -> list[dict[str, torch.Tensor]]:
    """One loader batch: split into the method's chunks, each taking its own optimizer step (as released).

    Returns each chunk's detached loss and scalars, still on the device (no host synchronisation).
    """
    chunks = method.chunks(hyper)
    pieces = zip(*(t.chunk(chunks) if t is not None else [None] * chunks
                   for t in (batch.x, batch.y, batch.index, batch.soft_labels)))
    logged = []
    for x, y, index, soft in pieces:
        output = method.loss(model, Batch(x=x, y=y, index=index, soft_labels=soft), hyper, context)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        logged.append({"loss": output.loss.detach(), **output.scalars})
    return logged


def train_epoch(run: TrainingRun, loader: DataLoader, device: torch.device, progress: bool = False,
                soft_labels: torch.Tensor | None = None, model: nn.Module | None = None) -> dict[str, float]:
    """One pass over `loader`; returns the epoch's mean loss and method scalars (one host read at the end).

    `soft_labels` (training-set size × classes, on `device`) is indexed by each item's dataset index;
    `model` is what the steps train (the run's model, or its data-parallel wrapper).
    """
    model = model or run.model
    config, method = run.config, training_method(run.config.method)
    hyper = method.make_config(config.method_config)
    context = StepContext(sigma=config.sigma, epoch=run.next_epoch,
                          num_classes=dataset_spec(config.dataset).num_classes,
                          lr_drops=run.next_epoch // config.lr_step)
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    model.train()
    for index, x, y in tqdm(loader, desc=f"epoch {run.next_epoch + 1}/{config.epochs}", leave=False,
                            disable=not progress, file=sys.stderr):
        index = index.to(device)
        batch = Batch(x=x.to(device), y=y.to(device), index=index,
                      soft_labels=None if soft_labels is None else soft_labels[index])
        for logged in train_step(model, run.optimizer, method, hyper, context, batch):
            for name, value in logged.items():
                sums[name] = sums.get(name, 0) + value
            steps += 1
    run.scheduler.step()
    return {name: float(total) / max(steps, 1) for name, total in sums.items()}


@torch.no_grad()
def noisy_accuracy(model: nn.Module, dataset: Dataset, sigma: float, device: torch.device,
                   batch_size: int = 512, seed: int = 0) -> float:
    """Accuracy of the base classifier on one noise draw per image (eval mode): a cheap progress signal."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    hits, total = torch.zeros((), device=device), 0
    for _, x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        noise = torch.randn(x.shape, generator=generator, device=device)
        hits += (model(x + sigma * noise).argmax(dim=1) == y).sum()
        total += len(y)
    return float(hits) / max(total, 1)


class Session(Protocol):
    """Where the loop runs: which worker it is, where checkpoints come from and go."""

    rank: int
    world_size: int

    def latest(self) -> Checkpoint | None:
        """The checkpoint to resume from, if any."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model as the loop should train it (wrapped for data parallelism where there are workers)."""

    def loader(self, dataset: Dataset, config: TrainConfig, epoch: int) -> DataLoader:
        """This worker's share of the training data for `epoch`, shuffled from (seed, epoch)."""

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over workers."""

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        """Records a finished epoch: its metrics and (from rank 0) the checkpoint."""


def shuffled_loader(dataset: Dataset, config: TrainConfig, epoch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(derived_seed(config.seed, epoch))
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)


class SingleWorkerSession:
    """The parts of a `Session` that are the same wherever one worker trains alone."""

    rank, world_size = 0, 1

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def loader(self, dataset: Dataset, config: TrainConfig, epoch: int) -> DataLoader:
        return shuffled_loader(dataset, config, epoch)

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics


class LocalSession(SingleWorkerSession):
    """One process; checkpoints in the run directory `out`."""

    def __init__(self, out: Path, on_epoch: Callable[[dict[str, float]], None] | None = None) -> None:
        self.out = out
        self.on_epoch = on_epoch

    def latest(self) -> Checkpoint | None:
        path = self.out / CHECKPOINT_NAME
        return load_checkpoint(path) if path.exists() else None

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        run.write(self.out, evaluation)
        if self.on_epoch:
            self.on_epoch(metrics)


class Evaluation(Protocol):
    """A cheap evaluation at some epochs (a sweep's certification proxy, `catrs.certify.ProxyEvaluation`)."""

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether to evaluate (and report) after `epoch` (0-based) of `epochs`."""

    def run(self, model: nn.Module) -> tuple[dict[str, float], pd.DataFrame]:
        """Metrics, and the rows they were computed from."""


def fit(config: TrainConfig, session: Session, device: torch.device, *, data_root: Path | None = None,
        download: bool = False, soft_labels: torch.Tensor | None = None, evaluation: Evaluation | None = None,
        progress: bool = False) -> TrainingRun:
    """Trains `config` (resolved) to its last epoch, resuming from the session's latest checkpoint.

    Reports every epoch, or with an `evaluation` only at its epochs (with its metrics added), so that a
    scheduler comparing trials sees the same metrics at every report.
    """
    train_set = get_dataset(config.dataset, config.train_split, data_root, download)
    evaluation_set = get_dataset(config.dataset, config.evaluation_split, data_root, download)
    run = TrainingRun.create(config, device)
    if (checkpoint := session.latest()) is not None:
        run.restore(checkpoint, "the run's latest checkpoint")
    trained = session.prepare_model(run.model)
    table = None if soft_labels is None else soft_labels.to(device)
    while run.next_epoch < config.epochs:
        epoch, began = run.next_epoch, time.perf_counter()
        torch.manual_seed(derived_seed(config.seed, epoch, session.rank))
        metrics = session.reduce(
            train_epoch(run, session.loader(train_set, config, epoch), device, progress, table, model=trained))
        inject("train.epoch", f"{epoch}:{session.rank}")
        due = evaluation is None or evaluation.due(epoch, config.epochs)
        rows = None
        if session.rank == 0:  # only rank 0's report is kept: the others skip the evaluations
            metrics[f"{config.evaluation_split}_noisy_accuracy"] = noisy_accuracy(
                run.model, evaluation_set, config.sigma, device, seed=config.seed)
            if evaluation is not None and due:
                extra, rows = evaluation.run(run.model)
                metrics.update(extra)
        metrics.update(epoch=epoch + 1, lr=run.scheduler.get_last_lr()[0], seconds=time.perf_counter() - began)
        run.history.append(metrics)
        run.next_epoch += 1
        if due:
            session.report(metrics, run, rows)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise UserError(f"training diverged at epoch {epoch + 1} (non-finite metrics); "
                            f"lower --lr and start a new --out")
    return run


def soft_label_spec(config: TrainConfig) -> SoftLabelSpec:
    """What determines the soft labels a (resolved) CAT-RS run trains on: its teacher and the votes."""
    hyper = method_config(config)
    teacher = getattr(hyper, "teacher_checkpoint", "")
    schedule = {k: getattr(config, k) for k in ("epochs", "batch_size", "lr", "lr_step", "lr_gamma", "momentum",
                                                "weight_decay")}
    if config.train_split != "train":  # the teacher keeps `val` unseen too; other runs keep their cache keys
        schedule["train_split"] = config.train_split
    return SoftLabelSpec(dataset=config.dataset, arch=config.arch or dataset_spec(config.dataset).default_arch,
                         sigma0=hyper.sigma0, num_noises=hyper.teacher_noises, seed=config.seed,
                         teacher_training={} if teacher else schedule,
                         teacher_checkpoint_sha256=teacher_sha(teacher) if teacher else "")


def soft_labels_for(config: TrainConfig, cache_dir: str | Path | None = None, *, device: str | None = None,
                    data_root: Path | None = None, download: bool = False, progress: bool = True,
                    producer: Producer = Producer()) -> torch.Tensor | None:
    """The soft labels a (resolved) run needs, from the cache or computed into it by `producer`; None if it
    needs none."""
    if not training_method(config.method).needs_soft_labels(method_config(config)):
        return None
    teacher = getattr(method_config(config), "teacher_checkpoint", "")
    return soft_labels(soft_label_spec(config), cache_dir or default_cache_dir(),
                       teacher_checkpoint=Path(teacher) if teacher else None, device=device, data_root=data_root,
                       download=download, progress=progress, producer=producer)


def train(config: TrainConfig, out: str | Path, *, device: str | None = None, data_root: Path | None = None,
          download: bool = False, progress: bool = True, cache_dir: str | Path | None = None,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Trains (or resumes) the run in `out` in this process; returns the path of its checkpoint.

    A method that needs soft labels (CAT-RS) gets them from the cache in `cache_dir` (default
    `$CATRS_CACHE` or ~/.cache/catrs), training its Gaussian teacher there first if no run did yet.
    """
    config = config.resolved()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = soft_labels_for(config, cache_dir, device=device, data_root=data_root, download=download,
                            progress=progress)
    fit(config, LocalSession(out, on_epoch), pick_device(device), data_root=data_root, download=download,
        soft_labels=table, progress=progress)
    return out / CHECKPOINT_NAME
