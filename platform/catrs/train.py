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

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import trainables
from catrs.checkpoint import Checkpoint, ModelCard, load_checkpoint, save_checkpoint
from catrs.context import RunContext
from catrs.data import TRAINING_SPLITS, DatasetSpec, dataset_spec, get_dataset
from catrs.errors import UserError
from catrs.faults import inject
from catrs.inference import check_precision, describe_device, pick_device
from catrs.interrupts import note_saved
from catrs.models import model_names
from catrs.ownership import claim
from catrs.seeds import derived_seed
from catrs.storage import Stored, check_writable_folder, stored
from catrs.teacher import Producer, SoftLabelSpec, count_votes, file_lock, soft_labels, teacher_sha
from catrs.vote_store import SoftLabels, SoftLabelTable
from trainables.base import Batch, Method, SoftLabelNeed, StepContext

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
EVALUATION_NAME = "evaluation.parquet"


def setting(
    default: Any, *, flag: str = "", parse: Callable[[str], Any] | None = None, role: str = "", help: str = ""
) -> Any:
    """A field of `TrainConfig` with what the rest of catrs derives from it: its `catrs train` flag (parsed
    with `parse`, default the type of `default`) and help, and its `role`: "schedule" (the teacher trains on
    the run's schedule; a sweep file gives it in `train`) or "searchable" (a schedule setting a sweep may
    also search)."""
    metadata = {"flag": flag, "parse": parse or type(default), "role": role, "help": help}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """A training run; the schedule defaults are the paper's CIFAR ones (docs/methods.md, "Training schedules").

    Every field is listed here once: the `catrs train` flags and the keys a sweep file may give or search
    are derived from it (`config_flags`, `schedule_keys`, `searchable_keys`)."""

    method: str = setting("gaussian", flag="--method", help="training method")
    dataset: str = setting("digits", flag="--dataset", help="data set")
    arch: str | None = setting(None, flag="--arch", parse=str, help="architecture (default: the data set's)")
    sigma: float = setting(0.5, flag="--sigma", help="noise level σ of training and certification")
    epochs: int = setting(150, flag="--epochs", role="searchable")
    batch_size: int | None = setting(
        None, flag="--batch", parse=int, role="searchable", help="loader batch (default: the method's; 256, MACER 64)"
    )
    lr: float = setting(0.1, flag="--lr", role="searchable", help="initial learning rate")
    lr_step: int = setting(50, flag="--lr-step", role="searchable", help="epochs between learning-rate drops")
    lr_gamma: float = setting(0.1, flag="--lr-gamma", role="schedule", help="factor of each learning-rate drop")
    momentum: float = setting(0.9, flag="--momentum", role="searchable")
    weight_decay: float = setting(1e-4, flag="--weight-decay", role="searchable")
    seed: int = setting(0, flag="--seed")
    fraction: float = setting(
        1.0,
        flag="--fraction",
        help="budgeted training: each epoch a fresh random share of the training split, so the whole schedule "
        "runs in that share of the steps (a sweep's low fidelity; default 1: every image every epoch)",
    )
    precision: str = setting(
        "fp32", flag="--precision", help="fp32 (default), bf16 or fp16 (CUDA): the training step under autocast"
    )
    method_config: dict[str, Any] = field(default_factory=dict)  # `--set KEY=VALUE`
    # Method settings that change mid-run, in epoch order: ({"after_epoch": E, KEY: VALUE, …}, …) trains the
    # epochs after the E-th with those values (a population sweep's member: `catrs.sweep.population`).
    schedule: tuple[dict[str, Any], ...] = ()
    # The schedule settings of the run's Gaussian teacher where they are not the run's own (a sweep's trials
    # share their first point's teacher), so that the recorded settings retrain the same run.
    teacher_training: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"  # or "train_minus_val": keep the `val` split unseen (every sweep trial does)

    @property
    def evaluation_split(self) -> str:
        """Where the run's per-epoch noisy accuracy is measured: `val` when it is held out, else `test`."""
        return "val" if self.train_split == "train_minus_val" else "test"

    def resolve(self, teacher_schedule: TrainConfig | None = None) -> RunSpec:
        """The run, validated once and typed: default architecture and batch size filled in, the method's
        hyper-parameters parsed. `teacher_schedule`: the settings whose schedule trains the run's Gaussian
        teacher, if it needs one (default: its own, but for its `teacher_training`; a sweep's trials share
        their first point's)."""
        data = dataset_spec(self.dataset)
        checks = [
            (0 < self.sigma < math.inf, f"--sigma must be a positive number, got {self.sigma}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch must be at least 1, got {self.batch_size}"),
            (0 < self.lr < math.inf, f"--lr must be a positive number, got {self.lr}"),
            (0 < self.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {self.lr_gamma}"),
            (0 <= self.momentum < math.inf, f"--momentum must be a number ≥ 0, got {self.momentum}"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay must be a number ≥ 0, got {self.weight_decay}"),
            (self.lr_step >= 1, f"--lr-step must be at least 1, got {self.lr_step}"),
            (0 < self.fraction <= 1, f"--fraction must be in (0, 1], got {self.fraction}"),
            (0 <= self.seed < 2**63, f"--seed must be a non-negative integer below 2^63, got {self.seed}"),
            (
                self.precision in PRECISIONS,
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
            (
                self.train_split in TRAINING_SPLITS,
                f"train_split must be one of {', '.join(TRAINING_SPLITS)}, got {self.train_split!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        arch = self.arch or data.default_arch
        if arch not in model_names():
            raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(model_names())}")
        method = trainables.get(self.method)
        try:
            hyper = method.make_config(self.method_config)
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(str(error.args[0] if error.args else error)) from None
        config = replace(
            self,
            arch=arch,
            method_config=asdict(hyper),
            batch_size=self.batch_size or method.default_batch_size,
            schedule=checked_schedule(method, asdict(hyper), self.schedule),
        )
        if teacher_schedule is None:
            teacher_schedule = replace(config, **self.teacher_training)
        teacher = replace(teacher_schedule, batch_size=teacher_schedule.batch_size or method.default_batch_size)
        differs = {k: v for k in schedule_keys() if (v := getattr(teacher, k)) != getattr(config, k)}
        return RunSpec(replace(config, teacher_training=differs), method, hyper, data, teacher_schedule=teacher)


def checked_schedule(method: Method, base: dict[str, Any], schedule: Any) -> tuple[dict[str, Any], ...]:
    """A run's schedule of method settings, validated and typed: each change names the epoch after which it
    applies (increasing, from 1) and method settings that may change mid-run — not those that decide the soft
    labels (a teacher's σ0, its votes), which the weights trained so far depend on."""
    if not isinstance(schedule, (list, tuple)):
        raise UserError(f"schedule must be a list of changes, got {schedule!r}")
    fixed = {"after_epoch", *method.teacher_keys, *method.shared_keys}
    checked, settings, last = [], dict(base), 0
    for change in schedule:
        after = change.get("after_epoch") if isinstance(change, dict) else None
        if not isinstance(after, int) or isinstance(after, bool) or after <= last:
            raise UserError(f"schedule: each change needs an after_epoch above the last one's ({last}), got {change!r}")
        if barred := sorted(set(change) & fixed - {"after_epoch"}):
            raise UserError(f"schedule: {', '.join(barred)} cannot change mid-run (after epoch {after})")
        try:
            settings = asdict(method.make_config(with_changes(settings, [change])))
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"schedule after epoch {after}: {error.args[0] if error.args else error}") from None
        checked.append({"after_epoch": after, **{k: settings[k] for k in change if k != "after_epoch"}})
        last = after
    return tuple(checked)


def with_changes(settings: dict[str, Any], changes: Any) -> dict[str, Any]:
    """Method settings with each change of a schedule applied in turn (its `after_epoch` aside)."""
    merged = dict(settings)
    for change in changes:
        merged.update({k: v for k, v in change.items() if k != "after_epoch"})
    return merged


def config_flags() -> list[dataclasses.Field]:
    """The fields of `TrainConfig` that `catrs train` takes as flags (`field.metadata["flag"]`)."""
    return [f for f in fields(TrainConfig) if f.metadata.get("flag")]


def schedule_keys() -> tuple[str, ...]:
    """The training schedule: what a sweep file gives in `train`, and what a run's teacher trains on."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("role") in ("schedule", "searchable"))


def searchable_keys() -> tuple[str, ...]:
    """The schedule settings a sweep file may search, beside the method's hyper-parameters."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("role") == "searchable")


@dataclass(frozen=True)
class RunSpec:
    """A training run resolved once (`TrainConfig.resolve`): its complete settings (`config`, what checkpoints
    record and a resume compares), the method with its typed hyper-parameters, and the data set's spec. The
    loop, the model card, the soft-label cache key and a sweep's trial all read this one object."""

    config: TrainConfig
    method: Method
    hyper: Any  # the method's config dataclass
    data: DatasetSpec
    teacher_schedule: TrainConfig  # whose schedule trains the Gaussian teacher of the soft labels

    @property
    def arch(self) -> str:
        return str(self.config.arch)

    def hyper_at(self, epoch: int) -> Any:
        """The method's settings for the epoch of index `epoch` (0-based): the config's, changed by every change
        of the schedule that applies after an earlier epoch."""
        changes = [change for change in self.config.schedule if change["after_epoch"] <= epoch]
        return self.method.make_config(with_changes(self.config.method_config, changes)) if changes else self.hyper

    def card(self) -> ModelCard:
        """What rebuilds the run's model, and what it was trained for."""
        return ModelCard(
            arch=self.arch,
            dataset=self.data.name,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            normalization=self.data.normalization,
            sigma=self.config.sigma,
            method=self.method.name,
            config=asdict(self.config),
        )

    @property
    def soft_label_need(self) -> SoftLabelNeed | None:
        """The soft labels the method says the run needs (None: none)."""
        return self.method.soft_labels(self.hyper)

    def soft_labels(self) -> SoftLabelSpec | None:
        """What determines the soft labels the run trains on (the cache key): its teacher and the votes; None
        for a method that needs none. The one place that decides."""
        need = self.soft_label_need
        if need is None:
            return None
        teacher = need.teacher_checkpoint
        schedule: dict[str, Any] = {key: getattr(self.teacher_schedule, key) for key in schedule_keys()}
        if self.teacher_schedule.train_split != "train":  # the teacher keeps `val` unseen too
            schedule["train_split"] = self.teacher_schedule.train_split
        return SoftLabelSpec(
            dataset=self.data.name,
            arch=self.arch,
            sigma0=need.sigma0,
            votes=need.votes,
            seed=self.config.seed,
            teacher_training={} if teacher else schedule,
            teacher_checkpoint_sha256=teacher_sha(teacher) if teacher else "",
        )


def teacher_run(spec: SoftLabelSpec) -> RunSpec:
    """The Gaussian run that trains the teacher of `spec`'s soft labels."""
    return TrainConfig(
        method="gaussian",
        dataset=spec.dataset,
        arch=spec.arch,
        sigma=spec.sigma0,
        seed=spec.seed,
        **spec.teacher_training,
    ).resolve()


@dataclass
class TrainingRun:
    """The mutable state of a run: what a checkpoint holds and a resume restores."""

    spec: RunSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler | None = None  # fp16 training only
    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def create(cls, spec: RunSpec, device: torch.device) -> TrainingRun:
        config = spec.config
        check_precision(config.precision, device)
        torch.manual_seed(config.seed)
        model = spec.card().build_model().to(device)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
        scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        return cls(spec, model, optimizer, scheduler, scaler)

    @property
    def config(self) -> TrainConfig:
        return self.spec.config

    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            # What the weights were computed on (a resume on another device continues the run, recorded anew).
            "device": describe_device(next(self.model.parameters()).device),
            "next_epoch": self.next_epoch,
            "history": self.history,
        }

    def restore(self, checkpoint: Checkpoint, where: str) -> None:
        """Continues from `checkpoint`, which must come from a run with the same settings (but the epochs)."""
        state = check_same_run(checkpoint, self.config, where)
        self.model.load_state_dict(checkpoint.state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.next_epoch = int(state["next_epoch"])
        self.history = list(state["history"])

    def write(self, directory: Path, evaluation: pd.DataFrame | None = None) -> Path:
        """The run as files in `directory` (`RunFolder`): checkpoint, metric history, the last evaluation's rows."""
        folder = RunFolder(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(folder.checkpoint, self.model, self.spec.card(), self.state())
        folder.history_file.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        if evaluation is not None:
            evaluation.to_parquet(folder.evaluation_file, index=False)
        return path


def run_identity(config: TrainConfig, trained: int | None = None) -> dict[str, Any]:
    """The settings a checkpoint must share for a run to continue from it: all of them but the epochs, and of
    the schedule the changes that apply to the `trained` epochs (None: all of them) — a population member that
    copies another continues its run with settings of its own."""
    identity = {key: value for key, value in asdict(config).items() if key not in ("epochs", "schedule")}
    identity["schedule"] = schedule_before(config.schedule, trained)
    return identity


def schedule_before(schedule: Any, trained: int | None) -> list[dict[str, Any]]:
    """The changes of `schedule` that apply to the first `trained` epochs (None: all), as plain dicts."""
    return [dict(change) for change in schedule or () if trained is None or change["after_epoch"] < trained]


def check_same_run(checkpoint: Checkpoint, config: TrainConfig, where: str) -> dict[str, Any]:
    """The training state of `checkpoint`, if it comes from a run with `config`'s settings (but the epochs)."""
    state = checkpoint.training_state
    if state is None:
        raise UserError(f"{where} holds no training state (a final export?); choose another --out")
    trained = int(state["next_epoch"])
    recorded, wanted = state["config"], run_identity(config, trained)
    recorded = {**recorded, "schedule": schedule_before(recorded.get("schedule"), trained)}
    defaults = asdict(TrainConfig())  # a setting added since the checkpoint was written has its default there
    differing = [k for k, v in wanted.items() if recorded.get(k, defaults[k]) != v]
    if differing:
        details = ", ".join(f"{k}: {recorded.get(k)!r} vs {wanted[k]!r}" for k in differing)
        raise UserError(f"{where} holds a run with other settings ({details}); use another --out to start anew")
    return state


def continued(spec: RunSpec, checkpoint: Checkpoint | None) -> RunSpec:
    """The run of a population member that starts from `checkpoint` (its own, or after an exploit another
    member's): the settings and schedule the checkpoint was trained with, continued from its next epoch with
    `spec`'s method settings where they differ. Without a checkpoint, `spec` itself."""
    state = None if checkpoint is None else checkpoint.training_state
    if state is None:
        return spec
    trained, recorded = int(state["next_epoch"]), state["config"]
    past = schedule_before(recorded.get("schedule"), trained)
    in_force = with_changes(recorded["method_config"], past)
    moved = {k: v for k, v in spec.config.method_config.items() if in_force.get(k) != v}
    schedule = past + ([{"after_epoch": trained, **moved}] if moved else [])
    config = replace(spec.config, method_config=recorded["method_config"], schedule=tuple(schedule))
    return config.resolve(teacher_schedule=spec.teacher_schedule)


def check_run_folder(spec: RunSpec, out: Path) -> None:
    """Refuses, before any work, a run folder that cannot be written or that holds a run with other settings."""
    check_writable_folder(out)
    if (checkpoint := RunFolder(out).checkpoint).exists():
        check_same_run(load_checkpoint(checkpoint), spec.config, str(checkpoint))


def claimed_run(spec: RunSpec, out: Path) -> contextlib.AbstractContextManager:
    """Holds the run folder `out` for this run (`catrs.ownership`): a second command of the same settings
    waits to resume after it, one of other settings is refused."""
    return claim(stored(str(out)), "training run", run_identity(spec.config))


@dataclass(frozen=True)
class WorkerPlan:
    """How a run is spread over Ray Train workers (`catrs.distributed.train`): how many, the GPUs (None: one
    each where the cluster has or can get GPUs, else none) and CPUs of each, where checkpoints go (a directory
    or a cloud URI; None: the run directory's parent), and how many failures it survives."""

    workers: int
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    storage_path: str | None = None
    max_failures: int = 3


@dataclass(frozen=True)
class RunFolder:
    """The files of a training run's folder (what `TrainingRun.write` leaves), for whoever reads them."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def history_file(self) -> Path:
        """One JSON object of metrics per finished epoch."""
        return self.path / METRICS_NAME

    @property
    def evaluation_file(self) -> Path:
        """The rows of the last evaluation (a sweep's proxy), when the run had one."""
        return self.path / EVALUATION_NAME

    def trained_epochs(self) -> int:
        """How many epochs the folder's checkpoint holds (0 without one)."""
        state = self._training_state()
        return 0 if state is None else int(state["next_epoch"])

    def trained_config(self) -> dict[str, Any] | None:
        """The settings the folder's checkpoint was trained with (None without one)."""
        state = self._training_state()
        return None if state is None else dict(state["config"])

    def _training_state(self) -> dict[str, Any] | None:
        return load_checkpoint(self.checkpoint).training_state if self.checkpoint.exists() else None

    def history(self) -> list[dict[str, float]]:
        """The metrics of every finished epoch (none before the first)."""
        if not self.history_file.exists():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines()]


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes of a training step in `precision`: fp32 as is, bf16 or fp16 under autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_step(run: TrainingRun, model: nn.Module, context: StepContext, batch: Batch) -> list[dict[str, torch.Tensor]]:
    """One loader batch: split into the method's chunks, each taking its own optimizer step (as released).

    Returns each chunk's detached loss and scalars, still on the device (no host synchronisation).
    """
    method, hyper = run.spec.method, run.spec.hyper_at(context.epoch)
    count = method.chunks(hyper)
    xs = batch.x.chunk(count)  # fewer than `count` pieces for a batch smaller than that
    others = [t.chunk(count) if t is not None else [None] * len(xs) for t in (batch.y, batch.index, batch.soft_labels)]
    logged = []
    for x, y, index, soft in zip(xs, *others, strict=True):
        with autocast(run.config.precision, batch.x.device):
            output = method.loss(model, Batch(x=x, y=y, index=index, soft_labels=soft), hyper, context)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is None:
            output.loss.backward()
            run.optimizer.step()
        else:  # fp16: the loss scaled against underflow, steps with non-finite gradients skipped
            run.scaler.scale(output.loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        logged.append({"loss": output.loss.detach().float(), **output.scalars})
    return logged


def train_epoch(
    run: TrainingRun,
    loader: DataLoader,
    device: torch.device,
    progress: bool = False,
    soft_labels: SoftLabelTable | None = None,
    model: nn.Module | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns the epoch's mean loss and method scalars (one host read at the end).

    `soft_labels` gives each item's ŷ by its dataset index (read on the host, copied with the batch);
    `model` is what the steps train (the run's model, or its data-parallel wrapper).
    """
    model = model or run.model
    config = run.config
    context = StepContext(
        sigma=config.sigma,
        epoch=run.next_epoch,
        num_classes=run.spec.data.num_classes,
        lr_drops=run.next_epoch // config.lr_step,
    )
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    model.train()
    overlap = device.type == "cuda"  # copies from pinned memory that overlap the step before
    for index, x, y in tqdm(
        loader, desc=f"epoch {run.next_epoch + 1}/{config.epochs}", leave=False, disable=not progress, file=sys.stderr
    ):
        soft = None if soft_labels is None else soft_labels.rows(index).to(device, non_blocking=overlap)
        x, y, index = (t.to(device, non_blocking=overlap) for t in (x, y, index))
        batch = Batch(x=x, y=y, index=index, soft_labels=soft)
        for logged in train_step(run, model, context, batch):
            for name, value in logged.items():
                sums[name] = sums.get(name, 0) + value
            steps += 1
    run.scheduler.step()
    return {name: float(total) / max(steps, 1) for name, total in sums.items()}


@torch.no_grad()
def noisy_hits(
    model: nn.Module, dataset: Dataset, part: tuple[int, int], sigma: float, device: torch.device, seed: int = 0
) -> tuple[int, int]:
    """(correct, count) of the base classifier on one noise draw per image (eval mode), over the images at
    positions `rank::world` of `part = (rank, world)`: each worker's share of a cheap progress signal."""
    model.eval()
    rank, world = part
    generator = torch.Generator(device=device).manual_seed(derived_seed(seed, rank))
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    hits, total = torch.zeros((), device=device, dtype=torch.long), 0
    for _, x, y in DataLoader(share, batch_size=512):
        x, y = x.to(device), y.to(device)
        noise = torch.randn(x.shape, generator=generator, device=device)
        hits += (model(x + sigma * noise).argmax(dim=1) == y).sum()
        total += len(y)
    return int(hits), total


class EpochShuffle(Sampler[int]):
    """This worker's share of each epoch's draw, in an order drawn from (seed, epoch) alone: set with
    `set_epoch`, so one loader (and its worker processes) serves every epoch, and a resumed run draws what an
    uninterrupted one would.

    An epoch draws `fraction` of the `size` indices (all of them at 1), fresh each epoch; the draw is padded by
    wrapping to a multiple of `replicas` and dealt out rank by rank, so every worker takes as many steps."""

    def __init__(self, size: int, seed: int, fraction: float = 1.0, rank: int = 0, replicas: int = 1) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.rank, self.replicas = rank, replicas
        self.drawn = max(1, math.ceil(fraction * size - 1e-9))  # (1e-9: 1/3 of 9 images is 3, not 4)
        self.per_rank = math.ceil(self.drawn / replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        drawn = torch.randperm(self.size, generator=generator)[: self.drawn]
        padded = drawn.repeat(math.ceil(self.per_rank * self.replicas / self.drawn))[: self.per_rank * self.replicas]
        yield from padded[self.rank :: self.replicas].tolist()


def loader_options(device: torch.device) -> dict[str, Any]:
    """How a loader feeds `device`: on CUDA, decoding in worker processes (one per CPU this process was given,
    but one left for the training step) into pinned memory; on a CPU, in this process, which needs the cores."""
    if device.type != "cuda":
        return {}
    workers = max(0, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else 0
    return {"num_workers": workers, "pin_memory": True, "persistent_workers": workers > 0}


class Session(Protocol):
    """Where the loop runs: which worker it is, on which device, where checkpoints come from and go."""

    rank: int
    world_size: int
    device: torch.device

    def latest(self) -> Checkpoint | None:
        """The checkpoint to resume from, if any."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model as the loop should train it (wrapped for data parallelism where there are workers)."""

    def loader(self, dataset: Dataset, config: TrainConfig) -> DataLoader:
        """This worker's share of the training data, whose sampler's `set_epoch` shuffles it from (seed, epoch)."""

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over workers."""

    def gather(self, item: Any) -> list[Any]:
        """Every worker's `item`, in rank order (every worker calls it)."""

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        """Records a finished epoch: its metrics and (from rank 0) the checkpoint."""


class SingleWorkerSession:
    """The parts of a `Session` that are the same wherever one worker trains alone."""

    rank, world_size = 0, 1
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def loader(self, dataset: Dataset, config: TrainConfig) -> DataLoader:
        sampler = EpochShuffle(len(dataset), config.seed, config.fraction)  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, **loader_options(self.device))

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def gather(self, item: Any) -> list[Any]:
        return [item]


class LocalSession(SingleWorkerSession):
    """One process on `device`; checkpoints in the run directory `out`."""

    def __init__(
        self, out: Path, device: torch.device, on_epoch: Callable[[dict[str, float]], None] | None = None
    ) -> None:
        self.out, self.device, self.on_epoch = out, device, on_epoch

    def latest(self) -> Checkpoint | None:
        path = self.out / CHECKPOINT_NAME
        return load_checkpoint(path) if path.exists() else None

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        run.write(self.out, evaluation)
        note_saved(str(self.out), f"epoch {run.next_epoch} of {run.config.epochs} in {RunFolder(self.out).checkpoint}")
        if self.on_epoch:
            self.on_epoch(metrics)


class Evaluation(Protocol):
    """A cheap evaluation at some epochs (a sweep's certification proxy, `catrs.sweep.proxy.ProxyEvaluation`),
    shared by the workers: each computes the rows of its part, the first turns them into metrics."""

    @property
    def names(self) -> tuple[str, ...]:
        """The metrics it reports (NaN at the epochs it does not run)."""

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether to evaluate after `epoch` (0-based) of `epochs`."""

    def rows(self, model: nn.Module, part: tuple[int, int]) -> list[Any]:
        """The rows of the images at positions `rank::world` of `part = (rank, world)`."""

    def metrics(self, rows: list[Any]) -> tuple[dict[str, float], pd.DataFrame]:
        """Metrics of all workers' rows, and the rows as a table."""


def fit(
    spec: RunSpec,
    session: Session,
    context: RunContext,
    soft_labels: SoftLabels | None = None,
    evaluation: Evaluation | None = None,
) -> TrainingRun:
    """Trains the run `spec` to its last epoch on the session's device, resuming from the session's latest
    checkpoint; data from the context's data root, soft labels mapped from this node's copy.

    Reports (and checkpoints) every epoch; with an `evaluation`, its metrics are added at its epochs and are
    NaN at the others, so a scheduler comparing trials sees the same metric names in every report.
    """
    config, device = spec.config, session.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN choose its fastest kernels once
    train_set = get_dataset(config.dataset, config.train_split, context.data_root, context.download)
    evaluation_set = get_dataset(config.dataset, config.evaluation_split, context.data_root, context.download)
    table = None if soft_labels is None else soft_labels.table(context.local_cache)
    run = TrainingRun.create(spec, device)
    if (checkpoint := session.latest()) is not None:
        run.restore(checkpoint, "the run's latest checkpoint")
    trained = session.prepare_model(run.model)
    loader = session.loader(train_set, config)
    while run.next_epoch < config.epochs:
        epoch, began = run.next_epoch, time.perf_counter()
        torch.manual_seed(derived_seed(config.seed, epoch, session.rank))
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        metrics = session.reduce(train_epoch(run, loader, device, context.progress, table, model=trained))
        inject("train.epoch", f"{epoch}:{session.rank}")
        part = (session.rank, session.world_size)
        hits = session.gather(noisy_hits(run.model, evaluation_set, part, config.sigma, device, config.seed))
        metrics[f"{config.evaluation_split}_noisy_accuracy"] = sum(h for h, _ in hits) / max(sum(t for _, t in hits), 1)
        rows = None
        if evaluation is not None:
            metrics.update(dict.fromkeys(evaluation.names, math.nan))
            if evaluation.due(epoch, config.epochs):
                extra, rows = evaluation.metrics(sum(session.gather(evaluation.rows(run.model, part)), []))
                metrics.update(extra)
        metrics.update(epoch=epoch + 1, lr=float(run.scheduler.get_last_lr()[0]), seconds=time.perf_counter() - began)
        # Before the epoch is recorded: a diverged run leaves its last sound checkpoint, not one that looks
        # trained (certifying NaN weights would give a constant classifier).
        if not all(math.isfinite(v) for k, v in metrics.items() if evaluation is None or k not in evaluation.names):
            raise UserError(
                f"training diverged at epoch {epoch + 1} (non-finite metrics); lower --lr and start a new --out"
            )
        run.history.append(metrics)
        run.next_epoch += 1
        session.report(metrics, run, rows)
    return run


@dataclass(frozen=True)
class Rung:
    """One step of a sweep's fidelity ladder: the run trained at `fraction` of its steps (budgeted training,
    `TrainConfig.fraction`), the `index`-th from the bottom. A scheduler that compares trials on a clock
    (`budget`: 1, η, η², …) sees `budget` with the step's last epoch and `previous` (a clock value it has
    already compared) with the epochs before."""

    index: int
    fraction: float
    budget: int
    previous: int


def checkpoint_fraction(checkpoint: Checkpoint | None) -> float:
    """The fraction of its steps the checkpoint's run trains at (0 without a checkpoint)."""
    if checkpoint is None or checkpoint.training_state is None:
        return 0.0
    return float(checkpoint.training_state["config"].get("fraction", 1.0))


class AtRung:
    """A session training one rung of a ladder: it resumes only from a checkpoint of that rung and reports the
    rung with every epoch."""

    def __init__(self, session: Session, rung: Rung) -> None:
        self.session, self.rung = session, rung
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device

    def latest(self) -> Checkpoint | None:
        checkpoint = self.session.latest()
        return checkpoint if checkpoint_fraction(checkpoint) == self.rung.fraction else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return self.session.prepare_model(model)

    def loader(self, dataset: Dataset, config: TrainConfig) -> DataLoader:
        return self.session.loader(dataset, config)

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return self.session.reduce(metrics)

    def gather(self, item: Any) -> list[Any]:
        return self.session.gather(item)

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        done = run.next_epoch >= run.config.epochs
        rung = {
            "fraction": self.rung.fraction,
            "budget": self.rung.budget if done else self.rung.previous,
            "step": self.rung.index * run.config.epochs + run.next_epoch,  # epochs trained on the climb so far
        }
        self.session.report({**metrics, **rung}, run, evaluation)


def climb(
    spec: RunSpec,
    session: Session,
    context: RunContext,
    soft_labels: SoftLabels | None,
    evaluation: Evaluation | None,
    rungs: tuple[Rung, ...],
) -> TrainingRun | None:
    """Trains the run at each rung's fraction of its steps in turn, each from scratch: a schedule compressed
    into fewer steps has dropped its learning rate already and cannot be continued into a longer one. A
    scheduler stops the climb between rungs; a resumed climb skips the rungs below its latest checkpoint's.
    Without rungs it is `fit`: the run as it is."""
    if not rungs:
        return fit(spec, session, context, soft_labels, evaluation)
    reached, run = checkpoint_fraction(session.latest()), None
    for rung in rungs:
        if rung.fraction >= reached:
            at = replace(spec.config, fraction=rung.fraction).resolve(teacher_schedule=spec.teacher_schedule)
            run = fit(at, AtRung(session, rung), context, soft_labels, evaluation)
    return run


def soft_labels_for(spec: RunSpec, context: RunContext, producer: Producer | None = None) -> SoftLabels | None:
    """The soft labels the run needs, from the context's cache or computed into it by `producer` (default: in
    this process); None if it needs none."""
    labels, need = spec.soft_labels(), spec.soft_label_need
    if labels is None or need is None:
        return None
    teacher = Path(need.teacher_checkpoint) if need.teacher_checkpoint else None
    return soft_labels(labels, context, producer or local_producer(), teacher)


def train_teacher_here(spec: SoftLabelSpec, folder: Stored, context: RunContext) -> Path:
    """Trains the teacher of `spec` in this process, in its cache folder when that is on a local disk, else in
    this machine's (`RunContext.local_cache`) with every epoch's checkpoint copied to the cache folder, so that
    a killed run resumes from the cache on whichever machine trains it next."""
    if folder.local:
        return train(teacher_run(spec), Path(folder.uri), context)
    local, mirror = context.local_cache / "teachers" / folder.name, folder.child(CHECKPOINT_NAME)
    if not (local / CHECKPOINT_NAME).exists() and mirror.exists():
        mirror.download(local / CHECKPOINT_NAME)

    copied = False

    def copy_to_the_cache(_: dict[str, float]) -> None:
        nonlocal copied
        mirror.upload(local / CHECKPOINT_NAME)
        copied = True

    checkpoint = train(teacher_run(spec), local, context, on_epoch=copy_to_the_cache)
    if not copied:  # a run killed after its last epoch but before that epoch's copy: nothing trained now
        mirror.upload(checkpoint)
    return checkpoint


def local_producer() -> Producer:
    """Soft labels made in this process: the teacher trained here, the votes counted here, a file lock per key."""
    return Producer(train_teacher=train_teacher_here, vote=count_votes, exclusive=file_lock)


def train(
    spec: RunSpec,
    out: str | Path,
    context: RunContext,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> Path:
    """Trains (or resumes) the run in `out` in this process, on the context's device; returns the path of its
    checkpoint. A method that needs soft labels (CAT-RS) gets them from the context's cache, training its
    Gaussian teacher there first if no run did yet.
    """
    out = Path(out)
    with claimed_run(spec, out):
        out.mkdir(parents=True, exist_ok=True)
        table = soft_labels_for(spec, context)
        fit(spec, LocalSession(out, pick_device(context.device), on_epoch), context, soft_labels=table)
    return out / CHECKPOINT_NAME
