"""The Tune side of a sweep: the trial each sample runs, its resources, and the tuner that schedules them.

A trial is the training loop (`catrs.train.fit`; with Ray Train when the file asks for several workers) on
`train_minus_val`, reporting at ASHA's rungs and at the last epoch the cheap certification of the val split
(`ProxyEvaluation`: `val_acr`, certified accuracy, the objective as `val_OBJECTIVE`), so that ASHA can stop
trials that fall behind at equal budgets. The test split is sealed in every trial (`catrs.data.sealed`).

Early-stopped trials and Optuna: a trial that ASHA stopped is told to Optuna as PRUNED, with its proxy at
each rung as intermediate values, never as a complete trial: its partial figure is not what its setting
would reach once trained out. Optuna's TPE ranks pruned trials below every complete one and, among
themselves, by the last rung they reached — the signal that steers it away from the region, without
comparing a rung-1 figure with trained-out ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from catrs.certify import CertifySettings, ProxyEvaluation
from catrs.checkpoint import Checkpoint
from catrs.data import sealed
from catrs.distributed.console import quiet_tune
from catrs.distributed.train import from_ray_checkpoint, scaling, worker_loop, worker_settings
from catrs.inference import pick_device
from catrs.search_space import Domain, SearchSpace
from catrs.train import SingleWorkerSession, TrainingRun, fit


def tune_domain(domain: Domain) -> Any:
    low_high = domain.values
    if domain.kind == "loguniform":
        return ray.tune.loguniform(*low_high)
    if domain.kind == "uniform":
        return ray.tune.uniform(*low_high)
    if domain.kind == "int":
        return ray.tune.randint(low_high[0], low_high[1] + 1)  # Tune's upper bound is exclusive
    return ray.tune.choice(list(domain.values))


SEALED = ("test",)  # what no trial, and the driver until its choice, may read


def proxy_of(space: SearchSpace, data_root: Path | None, download: bool) -> ProxyEvaluation:
    """The trials' certification of val, at ASHA's rungs and the last epoch."""
    proxy = space.proxy
    return ProxyEvaluation(
        space.dataset,
        space.sigma,
        CertifySettings(proxy.protocol(), seed=space.seed),
        proxy.images,
        tuple(space.budget.rungs(space.epochs)),
        space.objective,
        data_root,
        download,
    )


class TuneSession(SingleWorkerSession):
    """`catrs.train.Session` inside a single-worker Tune trial."""

    def latest(self) -> Checkpoint | None:
        return from_ray_checkpoint(ray.tune.get_checkpoint())

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            run.write(Path(folder), evaluation)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def sweep_trial(
    params: dict[str, Any],
    space: SearchSpace,
    soft_label_tables: dict[str, Any],
    data_root: Path | None,
    download: bool,
    storage_path: str,
) -> None:
    """One trial: train the point `params`, reporting the proxy certification (the Tune function trainable).

    Soft labels come from the object store (the driver computed one table per σ0), so a trial on any node
    of a cluster finds them without a shared file system.
    """
    spec = space.resolve(params)
    labels = spec.soft_labels()
    table = None if labels is None else soft_label_tables[labels.key()]
    evaluation = proxy_of(space, data_root, download)
    resources = space.resources
    if resources.workers == 1:
        with sealed(*SEALED):
            fit(
                spec,
                TuneSession(),
                pick_device(None),
                data_root=data_root,
                download=download,
                soft_labels=None if table is None else ray.get(table),
                evaluation=evaluation,
            )
        return
    trial_id = ray.tune.get_context().get_trial_id()
    settings = worker_settings(spec, table, data_root, download, evaluation, sealed=SEALED)
    TorchTrainer(
        worker_loop,
        train_loop_config=settings,
        scaling_config=scaling(resources.workers, resources.gpus_per_worker, resources.cpus_per_worker),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=storage_path,
            # Ray's documented bridge from a Train run to its Tune trial;
            # its type is a Tune callback where RunConfig names Train's.
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=ray.train.FailureConfig(max_failures=2),
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


def trial_trainable(
    space: SearchSpace, soft_label_tables: dict[str, Any], data_root: Path | None, download: bool, storage_path: str
) -> Any:
    """`sweep_trial` with its arguments bound and the resources each trial asks for."""
    resources = space.resources
    if resources.workers == 1:
        request = {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    else:  # the trial only drives a TorchTrainer, whose workers ask for their own resources
        request = {"cpu": 1}
    return ray.tune.with_resources(
        ray.tune.with_parameters(
            sweep_trial,
            space=space,
            soft_label_tables=soft_label_tables,
            data_root=data_root,
            download=download,
            storage_path=storage_path,
        ),
        request,
    )


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped before its last epoch as PRUNED (see the module
    docstring), keeping its rung figures as intermediate values; trials trained out are COMPLETE."""

    def __init__(self, epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = result is not None and not error and result.get("epoch", self.epochs) < self.epochs
        super().on_trial_complete(trial_id, None if stopped else result, error)


def tuner(space: SearchSpace, storage: str, trainable: Any, num_samples: int, callbacks: list) -> ray.tune.Tuner:
    """A new sweep's tuner: Optuna's TPE (the file's points first), ASHA at the file's rungs (or FIFO)."""
    quiet_tune()
    epochs, budget = space.epochs, space.budget
    sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=max(1, min(10, num_samples // 2)))
    search = PrunedAwareOptunaSearch(epochs, sampler=sampler, points_to_evaluate=space.points_to_evaluate or None)
    scheduler = (
        ASHAScheduler(
            time_attr="epoch", max_t=epochs, grace_period=budget.first_rung, reduction_factor=budget.reduction_factor
        )
        if budget.scheduler == "asha"
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        trainable,
        param_space={key: tune_domain(domain) for key, domain in space.search.items()},
        tune_config=ray.tune.TuneConfig(
            metric=space.metric,
            mode="max",
            search_alg=search,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=budget.max_concurrent,
        ),
        run_config=ray.tune.RunConfig(
            name=space.name,
            storage_path=storage,
            callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )
