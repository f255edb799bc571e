"""Ray Tune for a sweep: the trial each sample runs, its resources, Optuna's searcher, the tuner, and the
callback that tells the sweep what happens.

    catrs tune demo_digits          (`catrs.sweep.run` calls `run_trials`)

A trial is the training loop (`catrs.train.climb`: `fit`, or with budgeted rungs `fit` at each fraction of the
steps in turn; with Ray Train when the file asks for several workers) on `train_minus_val`, reporting every
epoch and, at ASHA's rungs and each run's last epoch, the cheap certification of the val split
(`catrs.sweep.proxy`), so that ASHA can stop trials that fall behind at equal budgets (`scheduler`). The test
split is sealed in every trial (`catrs.data.sealed`).

Early-stopped trials and Optuna: a trial that ASHA stopped is told to Optuna as PRUNED, with its proxy at
each rung as intermediate values, never as a complete trial: its partial figure is not what its setting
would reach once trained out. Optuna's TPE ranks pruned trials below every complete one and, among
themselves, by the last rung they reached — the signal that steers it away from the region, without
comparing a rung-1 figure with trained-out ones.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from catrs.checkpoint import Checkpoint
from catrs.context import RunContext
from catrs.data import sealed
from catrs.distributed.halving import SynchronousHalving
from catrs.distributed.train import from_ray_checkpoint, gpus_of, scaling, torch_config, worker_loop, worker_settings
from catrs.inference import pick_device
from catrs.sweep.population import LINEAGE_FILE, read_lineage
from catrs.sweep.proxy import proxy_of
from catrs.sweep.space import NUMERIC, Domain, SearchSpace
from catrs.sweep.trial import TrialObserver, TrialResult, stopped_at
from catrs.train import SingleWorkerSession, TrainingRun, climb, continued
from catrs.vote_store import SoftLabels

SEALED = ("test",)  # what no trial, and the driver until its choice, may read
# What Tune adds to every result; everything else a trial reports is a metric of catrs's own.
TUNE_BOOKKEEPING = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "experiment_tag",
    "should_checkpoint",
    "checkpoint_path",
}


def tune_domain(domain: Domain) -> Any:
    low_high = domain.values
    if domain.kind == "loguniform":
        return ray.tune.loguniform(*low_high)
    if domain.kind == "uniform":
        return ray.tune.uniform(*low_high)
    if domain.kind == "int":
        return ray.tune.randint(low_high[0], low_high[1] + 1)  # Tune's upper bound is exclusive
    return ray.tune.choice(list(domain.values))


class TuneSession(SingleWorkerSession):
    """`catrs.train.Session` inside a single-worker Tune trial, on the device the trial was given. A population
    member (`moving`: the settings its population perturbs) also reports them each epoch (`setting/KEY`) and
    keeps beside its checkpoint which member trained which epochs (`catrs.sweep.population.LINEAGE_FILE`)."""

    def __init__(self, device: torch.device, moving: tuple[str, ...] = ()) -> None:
        self.device, self.moving = device, moving
        self.lineage: list[dict[str, Any]] = []

    def latest(self) -> Checkpoint | None:
        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            self.lineage = read_lineage(Path(folder))
        return from_ray_checkpoint(checkpoint)

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            run.write(Path(folder), evaluation)
            if self.moving:
                metrics = {**metrics, **self._member_record(run, Path(folder))}
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    def _member_record(self, run: TrainingRun, folder: Path) -> dict[str, float]:
        """The lineage written beside the checkpoint; the settings the epoch trained with, as metrics."""
        trained = run.next_epoch - 1  # the index of the epoch just trained
        member = ray.tune.get_context().get_trial_id()
        if not self.lineage or self.lineage[-1]["trial"] != member:
            self.lineage.append({"trial": member, "after_epoch": trained})
        (folder / LINEAGE_FILE).write_text(json.dumps(self.lineage))
        hyper = run.spec.hyper_at(trained)
        return {f"setting/{key}": float(getattr(hyper, key)) for key in self.moving}


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares: the space, the soft-label tables per key (one per teacher: where they
    are in the cache, each node mapping its own copy), the run context, and where Ray Train trials keep their
    checkpoints."""

    space: SearchSpace
    soft_label_tables: dict[str, SoftLabels]
    context: RunContext
    storage_path: str


def sweep_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: train the point `params`, reporting the proxy certification (the Tune function trainable).

    Soft labels come from the cache (the driver had one table made per teacher), which each node maps once,
    so a trial on any node of a cluster finds them without a shared file system.
    """
    space, context = setup.space, setup.context
    spec = space.resolve(params)
    labels = spec.soft_labels()
    table = None if labels is None else setup.soft_label_tables[labels.key()]
    evaluation = proxy_of(space, context)
    resources = space.resources
    rungs = space.budget.ladder()
    if resources.workers == 1:
        session = TuneSession(pick_device(None), space.budget.move if space.budget.population else ())
        if space.budget.population:  # the settings it copied or was given, from the epoch it goes on from
            spec = continued(spec, session.latest())
        with sealed(*SEALED):
            climb(spec, session, context, table, evaluation, rungs)
        return
    trial_id = ray.tune.get_context().get_trial_id()
    settings = worker_settings(spec, table, context, evaluation, sealed=SEALED, rungs=rungs)
    plan = resources.plan(max_failures=2)
    TorchTrainer(
        worker_loop,
        train_loop_config=settings,
        scaling_config=scaling(plan),
        torch_config=torch_config(plan),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=setup.storage_path,
            # Ray's documented bridge from a Train run to its Tune trial;
            # its type is a Tune callback where RunConfig names Train's.
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
        ),
    ).fit()


def trial_checkpoint(trial_or_result: Any) -> ray.train.Checkpoint | None:
    """A trial's latest checkpoint: Tune's own, or (Ray Train trials) the one its reports point at."""
    checkpoint = getattr(trial_or_result, "checkpoint", None)
    if checkpoint is not None:
        return checkpoint
    metrics = getattr(trial_or_result, "last_result", None) or getattr(trial_or_result, "metrics", None) or {}
    path = metrics.get("checkpoint_path")
    return ray.train.Checkpoint(path) if path else None


def trial_trainable(setup: TrialSetup) -> Any:
    """`sweep_trial` with its setup bound and the resources each trial asks for."""
    resources = setup.space.resources
    if resources.workers == 1:
        request = {"cpu": resources.cpus_per_worker, "gpu": gpus_of(resources.plan())}
    else:  # the trial only drives a TorchTrainer, whose workers ask for their own resources
        request = {"cpu": 1}
    return ray.tune.with_resources(ray.tune.with_parameters(sweep_trial, setup=setup), request)


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped before its last epoch or rung as PRUNED (see the
    module docstring), keeping its rung figures as intermediate values; trials trained out are COMPLETE."""

    def __init__(self, epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = result is not None and not error and stopped_at(result, self.epochs) != ""
        super().on_trial_complete(trial_id, None if stopped else result, error)


class Observe(ray.tune.Callback):
    """Tells the sweep's observers (`catrs.sweep.trial.TrialObserver`) what Tune does with each trial."""

    def __init__(self, observers: list[TrialObserver]) -> None:
        self.observers = observers

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        for observer in self.observers:
            observer.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING and not k.startswith("config")}
        for observer in self.observers:
            observer.reported(trial.trial_id, trial.config, metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        for observer in self.observers:
            observer.completed(trial.trial_id, trial.config, trial.last_result or {}, trial_checkpoint(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        for observer in self.observers:
            observer.failed(trial.trial_id, trial.config)


def quiet_tune() -> None:
    """Tune's console output off (its legacy reporter honours `verbose=0`, the new one does not; neither the
    results folder nor the TensorBoard hint is something a catrs user acts on), and Optuna's INFO lines. Tune's
    own Ctrl-C handler is off too: it would end the trials and return them as if the sweep were over; catrs
    stops the sweep instead (`--resume` finishes it from Tune's saved state)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Every epoch's checkpoint (the latest kept) makes Tune save its state often; it warns each time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune times its own steps and warns of slow ones; the sweep's are slow by design: its observers record
    # each trial in MLflow, and a halving rung's decision stops every trial it cuts at once (4.5 s for 24).
    logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    # Tune suggests reusing actors under PBT; catrs does not (see `tuner`).
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class KeepInRange:
    """An explore step's last word: every moved number back inside the file's range (PBT multiplies by 0.8
    or 1.2, PB2's bandit proposes floats), integers rounded."""

    def __init__(self, domains: dict[str, Domain]) -> None:
        self.domains = {key: d for key, d in domains.items() if d.kind in NUMERIC}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, domain in self.domains.items():
            low, high = domain.values
            value = min(max(config[key], low), high)
            config[key] = int(round(value)) if domain.kind == "int" else float(value)
        return config


class TellsExploits:
    """A population scheduler (PBT or PB2) that tells the sweep's observers of each exploit (who copied whom
    after which epoch, the settings before and after) and never exploits at the last epoch, where a copy
    would only duplicate a finished member."""

    def __init__(self, observers: list[TrialObserver], last_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observers, self.last_epoch = observers, last_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("epoch", 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]

    def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
        before, copied = dict(trial.config), dict(trial_to_clone.config)
        epoch = int(self._trial_state[trial_to_clone].last_train_time)  # type: ignore[attr-defined]
        super()._exploit(tune_controller, trial, trial_to_clone)  # type: ignore[misc]
        for observer in self.observers:
            observer.exploited(trial.trial_id, trial_to_clone.trial_id, epoch, before, copied, dict(trial.config))


class TellingPBT(TellsExploits, PopulationBasedTraining):
    pass


class TellingPB2(TellsExploits, PB2):
    pass


def population_scheduler(space: SearchSpace, observers: list[TrialObserver]) -> PopulationBasedTraining:
    """PBT or PB2 over the file's moving settings, its clock the epochs trained."""
    budget, moving = space.budget, {key: space.search[key] for key in space.budget.move}
    shared: dict[str, Any] = {
        "observers": observers,
        "last_epoch": space.epochs,
        "time_attr": "epoch",
        "perturbation_interval": budget.interval,
        "quantile_fraction": budget.quantile,
        "custom_explore_fn": KeepInRange(moving),
        "synch": budget.synch,
    }
    if budget.scheduler == "pb2":
        bounds = {key: list(domain.values) for key, domain in moving.items()}
        return TellingPB2(hyperparam_bounds=bounds, log_config=False, **shared)
    return TellingPBT(
        hyperparam_mutations={key: _mutation(domain) for key, domain in moving.items()},
        resample_probability=budget.resample_probability,
        log_config=False,
        **shared,
    )


def _mutation(domain: Domain) -> Any:
    """How PBT perturbs a setting: a choice or an integer shifts to a neighbouring value, a number is scaled."""
    if domain.kind == "choice":
        return list(domain.values)
    if domain.kind == "int":
        low, high = domain.values
        return list(range(low, high + 1))
    return tune_domain(domain)


def scheduler(
    space: SearchSpace, observers: list[TrialObserver] | None = None
) -> ASHAScheduler | SynchronousHalving | FIFOScheduler | PopulationBasedTraining:
    """ASHA on the file's fidelity: epochs trained (rungs at first_rung · η^k), or the clock of a trial's
    budgeted rungs (1, η, …: `Budget.ladder`); synchronous halving at the same epochs; a population's PBT or
    PB2; FIFO without a scheduler."""
    budget = space.budget
    if budget.population:
        return population_scheduler(space, observers or [])
    if budget.scheduler == "halving":
        return SynchronousHalving(
            budget.rungs(space.epochs), budget.num_samples, budget.reduction_factor, budget.max_concurrent
        )
    if budget.scheduler != "asha":
        return FIFOScheduler()
    if rungs := budget.ladder():
        return ASHAScheduler(
            time_attr="budget", max_t=rungs[-1].budget, grace_period=1, reduction_factor=budget.reduction_factor
        )
    return ASHAScheduler(
        time_attr="epoch", max_t=space.epochs, grace_period=budget.first_rung, reduction_factor=budget.reduction_factor
    )


def searcher(space: SearchSpace, initial: tuple[dict[str, Any], ...]) -> Any:
    """Optuna's TPE (the file's points first); for a population, its `initial` members as drawn (Tune's PBT
    and PB2 refuse a searcher that suggests as it goes)."""
    if space.budget.population:
        return BasicVariantGenerator(points_to_evaluate=list(initial), max_concurrent=space.budget.max_concurrent)
    num_samples = space.budget.num_samples
    sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=max(1, min(10, num_samples // 2)))
    return PrunedAwareOptunaSearch(space.epochs, sampler=sampler, points_to_evaluate=space.points_to_evaluate or None)


def tuner(
    space: SearchSpace, storage: str, trainable: Any, observers: list[TrialObserver], initial: tuple = ()
) -> ray.tune.Tuner:
    """A new sweep's tuner: Optuna's TPE (the file's points first) with ASHA at the file's rungs (or FIFO), or
    a population's `initial` members under PBT or PB2."""
    budget = space.budget
    if budget.population:  # PBT's and PB2's random choices, seeded as the rest of the sweep
        random.seed(space.seed)
        np.random.seed(space.seed)
    return ray.tune.Tuner(
        trainable,
        param_space={key: tune_domain(domain) for key, domain in space.search.items()},
        tune_config=ray.tune.TuneConfig(
            metric=space.metric,
            mode="max",
            search_alg=searcher(space, initial),
            scheduler=scheduler(space, observers),
            num_samples=budget.num_samples,
            # Synchronous halving starts trials itself: Tune's limit would count its paused trials as running.
            # A population's generator limits itself (Tune's limit is for Optuna's kind of searcher).
            max_concurrent_trials=None if budget.scheduler == "halving" or budget.population else budget.max_concurrent,
            # Not reused: with reused actors a sweep whose driver was killed and resumed recorded a trial twice
            # (tests/test_sweep.py's killed-driver test failed 3 runs in 3; it passes without), though reuse
            # saved the demo's trials 25 s (131 s → 106 s). A fresh actor per trial until that race is found.
            reuse_actors=False,
        ),
        run_config=ray.tune.RunConfig(
            name=space.name,
            storage_path=storage,
            callbacks=[Observe(observers)],
            failure_config=ray.tune.FailureConfig(max_failures=1),
            # Every epoch's, the latest kept; a population keeps them all: a member may copy another's
            # checkpoint of some epochs back (an exploit restores the one the other reported the proxy with).
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None if budget.population else 1),
            verbose=0,
        ),
    )


@dataclass(frozen=True)
class TrialsPlan:
    """A sweep's trials as Tune runs them: the space (its budget says how many), where Tune's experiment lives
    (`storage`, a directory or a cloud URI), and whether to finish a killed one."""

    space: SearchSpace
    storage: str
    resume: bool = False
    initial: tuple[dict[str, Any], ...] = ()  # a population's members as drawn (`catrs.sweep.population`)

    @property
    def experiment(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.space.name}"

    def can_resume(self) -> bool:
        return ray.tune.Tuner.can_restore(self.experiment)


def run_trials(
    plan: TrialsPlan, soft_labels: dict[str, SoftLabels], context: RunContext, observers: list[TrialObserver]
) -> list[TrialResult]:
    """Every trial of the sweep (`soft_labels`: the tables the trials share, by key), told to `observers`."""
    trainable = trial_trainable(TrialSetup(plan.space, soft_labels, context, f"{plan.experiment}-train"))
    quiet_tune()
    if plan.resume:
        grid = ray.tune.Tuner.restore(plan.experiment, trainable, resume_unfinished=True, resume_errored=True).fit()
    else:
        grid = tuner(plan.space, plan.storage, trainable, observers, plan.initial).fit()
    return [_result(grid[i], plan.space) for i in range(len(grid))]


def _result(result: ray.tune.Result, space: SearchSpace) -> TrialResult:
    metrics = dict(result.metrics or {})
    config = result.config or {}
    return TrialResult(
        trial_id=metrics.get("trial_id", Path(result.path).name),
        point={key: config.get(key) for key in space.search},
        metrics=metrics,
        checkpoint=trial_checkpoint(result),
        error=result.error is not None,
    )
