"""Sweeps: `catrs tune search_spaces/NAME.yaml` — Ray Tune + Optuna (TPE) + ASHA, for the best certified radius.

Per trial: the training loop (`catrs.train.fit`; with Ray Train when the file asks for several workers) on
`train_minus_val`, reporting at ASHA's rungs and at the last epoch the cheap certification of the val split
(`ProxyEvaluation`: `val_acr`, certified accuracy, the objective as `val_OBJECTIVE`), so that ASHA can stop
trials that fall behind at equal budgets. CAT-RS's soft labels are computed before the first trial, one
teacher per σ0 the space allows (trained on `train_minus_val` too), and handed to the trials through Ray's
object store. After the last trial the winner is chosen on val (`catrs.distributed.selection`: the top-k
trials trained to their end, certified on val with the selection protocol), and only then is the test split
read: the winner (re-trained on the whole training split if the file asks) is certified on it with the final
protocol, and registered in MLflow's Model Registry as the sweep's `champion`. The driver and every trial
seal the test split until then (`catrs.data.sealed`), so nothing that chooses can read it.

Everything is logged from this driver to MLflow: a parent run for the sweep, a child per trial (params,
metrics per report, and — picked up from the trial's checkpoint in the run storage — the proxy rows, their
curve and the resolved config); `final_val_…` on the shortlisted children, `test_…` on the parent and the
winning child.

Early-stopped trials and Optuna: a trial that ASHA stopped is told to Optuna as PRUNED, with its proxy at
each rung as intermediate values, never as a complete trial: its partial figure is not what its setting
would reach once trained out. Optuna's TPE ranks pruned trials below every complete one and, among
themselves, by the last rung they reached — the signal that steers it away from the region, without
comparing a rung-1 figure with trained-out ones.

`--resume` continues a killed sweep (unfinished trials from their last checkpoint, then the rest of the
samples), re-using its MLflow parent and child runs instead of creating new ones.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
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
from tqdm import tqdm

from catrs.certify import ProxyEvaluation
from catrs.checkpoint import Checkpoint
from catrs.data import corrupted_variant, get_dataset, sealed
from catrs.distributed import selection
from catrs.distributed.cache import cluster_producer
from catrs.distributed.runtime import connect
from catrs.distributed.train import from_ray_checkpoint, scaling, worker_loop, worker_settings
from catrs.errors import JobFailed, UserError
from catrs.inference import pick_device
from catrs.metrics import DEFAULT_RADII
from catrs.model_registry import input_example, register_checkpoint
from catrs.report import build_report, format_report
from catrs.results import read_results
from catrs.search_space import Domain, SearchSpace
from catrs.sweep_report import SweepReport, format_sweep_report, log_sweep_report, sweep_report
from catrs.sweep_story import parent_name, shared_params, stopped_name, sweep_note, trial_name, winner_name
from catrs.tracking import Tracker, plot_certified_accuracy, run_tags, system_metrics
from catrs.train import (CHECKPOINT_NAME, EVALUATION_NAME, METRICS_NAME, SingleWorkerSession, TrainingRun, fit,
                         method_config, soft_label_spec, soft_labels_for, training_method)

PARENT_FILE = "mlflow_parent_run"
BEST_DIR = "best"  # the best trial's checkpoint, beside the sweep's final results


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
    return ProxyEvaluation(space.dataset, space.sigma, proxy.settings(space.seed, inference="channels_last"),
                           proxy.images, tuple(space.budget.rungs(space.epochs)), space.objective, data_root,
                           download)


class TuneSession(SingleWorkerSession):
    """`catrs.train.Session` inside a single-worker Tune trial."""

    def latest(self) -> Checkpoint | None:
        return from_ray_checkpoint(ray.tune.get_checkpoint())

    def report(self, metrics: dict[str, float], run: TrainingRun, evaluation: pd.DataFrame | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            run.write(Path(folder), evaluation)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def sweep_trial(params: dict[str, Any], space: SearchSpace, soft_label_tables: dict[str, Any],
                data_root: Path | None, download: bool, storage_path: str) -> None:
    """One trial: train the point `params`, reporting the proxy certification (the Tune function trainable).

    Soft labels come from the object store (the driver computed one table per σ0), so a trial on any node
    of a cluster finds them without a shared file system.
    """
    config = space.train_config(params)
    table = None
    if training_method(config.method).needs_soft_labels(method_config(config)):
        table = soft_label_tables[soft_label_spec(space.soft_label_config(params)).key()]
    evaluation = proxy_of(space, data_root, download)
    resources = space.resources
    if resources.workers == 1:
        with sealed(*SEALED):
            fit(config, TuneSession(), pick_device(None), data_root=data_root, download=download,
                soft_labels=None if table is None else ray.get(table), evaluation=evaluation)
        return
    trial_id = ray.tune.get_context().get_trial_id()
    settings = worker_settings(config, table, data_root, download, evaluation, sealed=SEALED)
    TorchTrainer(worker_loop, train_loop_config=settings,
                 scaling_config=scaling(resources.workers, resources.gpus_per_worker, resources.cpus_per_worker),
                 run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=storage_path,
                                                callbacks=[TuneReportCallback()],
                                                failure_config=ray.train.FailureConfig(max_failures=2))).fit()


def trial_checkpoint(trial_or_result: Any) -> ray.train.Checkpoint | None:
    """A trial's latest checkpoint: Tune's own, or (Ray Train trials) the one its reports point at."""
    checkpoint = getattr(trial_or_result, "checkpoint", None)
    if checkpoint is not None:
        return checkpoint
    metrics = getattr(trial_or_result, "last_result", None) or getattr(trial_or_result, "metrics", None) or {}
    path = metrics.get("checkpoint_path")
    return ray.train.Checkpoint(path) if path else None


# What Tune adds to every result; everything else a trial reports is a metric of catrs's own.
TUNE_BOOKKEEPING = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
                    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
                    "iterations_since_restore", "experiment_tag", "should_checkpoint", "checkpoint_path"}


class MlflowSweepCallback(ray.tune.Callback):
    """Logs each trial as a child run of the sweep's parent run, from the driver.

    Child runs are found again by their trial id, so a resumed sweep continues its runs rather than
    duplicating them. The MLflow client is created lazily: Tune pickles its callbacks with the experiment.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, space: SearchSpace, spool: Path) -> None:
        self.tracking_uri, self.parent_run_id, self.space, self.spool = tracking_uri, parent_run_id, space, spool
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}
        self._reported: dict[str, set[int]] = {}  # the epochs each trial reported to Tune, so logged already

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None, "_runs": {}, "_reported": {}}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, spool=self.spool)
        return self._tracker

    def run_for(self, trial) -> str:
        """The trial's child run (found again after a resume), named by its searched values, with them as
        params and the data it trains and is evaluated on as dataset inputs."""
        if trial.trial_id not in self._runs:
            tags = {"catrs.trial_id": trial.trial_id, "mlflow.parentRunId": self.parent_run_id}
            run_id = self.tracker.find(tags)
            if run_id is None:
                space = self.space
                tags = run_tags("trial", space.method, space.dataset, space.sigma, trial_id=trial.trial_id,
                                sweep=space.name)
                run_id = self.tracker.start(trial_name(trial.config), tags, self.parent_run_id)
                self.tracker.log_params(run_id, trial.config)  # what differs; the parent has what all share
                self.tracker.log_dataset(run_id, self.space.dataset, "train_minus_val", "training")
                self.tracker.log_dataset(run_id, self.space.dataset, "val", "validation")
            self._runs[trial.trial_id] = run_id
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._guarded(lambda: self.run_for(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING and not k.startswith("config")}
        epoch = int(result.get("epoch", 0))
        self._reported.setdefault(trial.trial_id, set()).add(epoch)
        self._guarded(lambda: self.tracker.log_metrics(self.run_for(trial), metrics, step=epoch))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        def finish() -> None:
            run_id = self.run_for(trial)
            self._log_trial_files(run_id, trial)
            reached = int((trial.last_result or {}).get("epoch", self.space.epochs))
            if reached < self.space.epochs:  # ASHA stopped it: say so where the runs are listed
                self.tracker.set_tags(run_id, {"catrs.stopped_at_epoch": str(reached)})
                self.tracker.rename(run_id, stopped_name(trial.config, reached))
            self.tracker.end(run_id, "FINISHED")

        self._guarded(finish)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._guarded(lambda: self.tracker.end(self.run_for(trial), "FAILED"))

    def _guarded(self, log) -> None:
        """A store that went away must not stop the sweep: the trial's results stay in Tune's storage."""
        try:
            log()
        except Exception as error:
            print(f"catrs: MLflow did not take a trial record ({type(error).__name__}); the trial's results "
                  f"remain in the sweep's Tune storage", file=sys.stderr)

    def _log_trial_files(self, run_id: str, trial) -> None:
        """The proxy results, their curve, the metric history and the resolved config, from the run storage."""
        checkpoint = trial_checkpoint(trial)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "config.json").write_text(json.dumps(asdict(self.space.train_config(trial.config)), indent=1))
            self.tracker.log_artifact(run_id, folder / "config.json")
            if checkpoint is None:
                return
            checkpoint.to_directory(str(folder / "checkpoint"))
            evaluation = folder / "checkpoint" / EVALUATION_NAME
            if evaluation.exists():
                frame = pd.read_parquet(evaluation)
                self.tracker.log_artifact(run_id, evaluation, "proxy")
                plot_certified_accuracy({"": frame}, folder / "proxy_certified_accuracy.png",
                                        "proxy on val (small n, estimates skipped where the class is wrong):")
                self.tracker.log_artifact(run_id, folder / "proxy_certified_accuracy.png", "plots")
            if (folder / "checkpoint" / METRICS_NAME).exists():
                self.tracker.log_artifact(run_id, folder / "checkpoint" / METRICS_NAME)
                self._log_every_epoch(run_id, trial.trial_id, folder / "checkpoint" / METRICS_NAME)

    def _log_every_epoch(self, run_id: str, trial_id: str, history: Path) -> None:
        """The training metrics of the epochs the trial did not report to Tune (it reports at rungs and at its
        end, where the proxy runs), from its metric history, so that the run has every epoch."""
        reported = self._reported.get(trial_id, set())
        for line in history.read_text().splitlines():
            row = json.loads(line)
            epoch = int(row.pop("epoch"))
            if epoch not in reported:
                self.tracker.log_metrics(run_id, row, step=epoch)


class SweepProgress(ray.tune.Callback):
    """The sweep's one progress display on the driver: trials ended out of the planned number, with the best
    proxy so far. (Tune's own reporter is off: `RAY_AIR_NEW_OUTPUT=0` with `verbose=0`.)"""

    def __init__(self, total: int, metric: str) -> None:
        self.total, self.metric, self.best = total, metric, -math.inf
        self._bar: tqdm | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment; a bar is not data
        return {**self.__dict__, "_bar": None}

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc="trials", unit="trial", file=sys.stderr)
        return self._bar

    def setup(self, **info) -> None:
        self.bar.refresh()  # from the sweep's start, not its first result

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.metric in result and result[self.metric] > self.best:
            self.best = result[self.metric]
            self.bar.set_postfix_str(f"best {self.metric} {self.best:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.bar.update(1)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.bar.update(1)

    def on_experiment_end(self, trials, **info) -> None:
        self.bar.close()


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped before its last epoch as PRUNED (see the module
    docstring), keeping its rung figures as intermediate values; trials trained out are COMPLETE."""

    def __init__(self, epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped = result is not None and not error and result.get("epoch", self.epochs) < self.epochs
        super().on_trial_complete(trial_id, None if stopped else result, error)


@dataclass
class SweepOutcome:
    path: Path
    parent_run_id: str
    trials: pd.DataFrame  # a row per trial: searched values, epochs, status, last proxy, selection, test figures
    best_config: dict[str, Any]
    best_trial: str
    best_checkpoint: Path
    final_results: Path  # the winner's certification on test
    trade_off: SweepReport | None = None
    model_version: str | None = None
    experiment_id: str | None = None


def _parent_run(tracker: Tracker, space: SearchSpace, sweep_dir: Path, resume: bool, num_samples: int) -> str:
    marker = sweep_dir / PARENT_FILE
    if resume and marker.exists():
        return marker.read_text().strip()
    run_id = tracker.start(space.name, run_tags("sweep", space.method, space.dataset, space.sigma,
                                                sweep=space.name, objective=space.objective,
                                                searched=",".join(f"{k}:{d.kind}" for k, d in space.search.items())))
    tracker.log_params(run_id, shared_params(space, num_samples))
    tracker.log_dataset(run_id, space.dataset, "train_minus_val", "training")
    tracker.log_dataset(run_id, space.dataset, "val", "validation")
    tracker.log_artifact(run_id, space.path)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return run_id


def _tuner(space: SearchSpace, storage: str, trainable, num_samples: int, callbacks: list) -> ray.tune.Tuner:
    quiet_tune()
    epochs, budget = space.epochs, space.budget
    sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=max(1, min(10, num_samples // 2)))
    search = PrunedAwareOptunaSearch(epochs, sampler=sampler, points_to_evaluate=space.points_to_evaluate or None)
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=budget.first_rung,
                               reduction_factor=budget.reduction_factor)
                 if budget.scheduler == "asha" else FIFOScheduler())
    return ray.tune.Tuner(
        trainable,
        param_space={key: tune_domain(domain) for key, domain in space.search.items()},
        tune_config=ray.tune.TuneConfig(metric=space.metric, mode="max", search_alg=search, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=budget.max_concurrent),
        run_config=ray.tune.RunConfig(name=space.name, storage_path=storage, callbacks=callbacks,
                                      failure_config=ray.tune.FailureConfig(max_failures=1), verbose=0))


def quiet_tune() -> None:
    """Tune's console output off (its legacy reporter honours `verbose=0`, the new one does not; neither the
    results folder nor the TensorBoard hint is something a catrs user acts on), and Optuna's INFO lines."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trainable(space: SearchSpace, soft_label_tables: dict[str, Any], data_root: Path | None, download: bool,
               storage_path: str):
    resources = space.resources
    if resources.workers == 1:
        request = {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    else:  # the trial only drives a TorchTrainer, whose workers ask for their own resources
        request = {"cpu": 1}
    return ray.tune.with_resources(
        ray.tune.with_parameters(sweep_trial, space=space, soft_label_tables=soft_label_tables, data_root=data_root,
                                 download=download, storage_path=storage_path), request)


def _trial_id(result: ray.tune.Result) -> str:
    return (result.metrics or {}).get("trial_id", Path(result.path).name)


def _status(result: ray.tune.Result, epochs: int) -> str:
    if result.error:
        return "error"
    reached = (result.metrics or {}).get("epoch", 0)
    return "done" if reached >= epochs else f"stopped at epoch {reached}"


def trials_table(results: ray.tune.ResultGrid, space: SearchSpace) -> pd.DataFrame:
    """A row per trial: its searched values, how far it trained, and its last proxy figure."""
    rows = [{"trial": _trial_id(result), **{k: result.config.get(k) for k in space.search},
             "epochs": (result.metrics or {}).get("epoch"), "status": _status(result, space.epochs),
             space.metric: (result.metrics or {}).get(space.metric, math.nan)} for result in results]
    return pd.DataFrame(rows).sort_values(space.metric, ascending=False, na_position="last")


def candidates(results: ray.tune.ResultGrid, space: SearchSpace) -> list[selection.Candidate]:
    """The trials trained to their last epoch, with a checkpoint and a proxy figure."""
    found = []
    for result in results:
        checkpoint = trial_checkpoint(result)
        if _status(result, space.epochs) == "done" and checkpoint is not None:
            found.append(selection.Candidate(_trial_id(result), {k: result.config[k] for k in space.search},
                                             float(result.metrics.get(space.metric, math.nan)), checkpoint))
    return found


def run_sweep(space: SearchSpace, *, num_samples: int | None = None, tracking_uri: str | None = None,
              resume: bool = False, storage_path: str | None = None, local_dir: Path = Path("runs") / "sweeps",
              cache_dir: str | Path | None = None, data_root: Path | None = None, download: bool = False,
              progress: bool = True) -> SweepOutcome:
    """Runs (or with `resume`, finishes) the sweep of `space`; chooses on val, certifies the choice on test,
    registers it; logs all to MLflow.

    Tune's experiment (trial checkpoints) lives in `storage_path` (a directory or a cloud URI; default
    `local_dir`); the sweep's own files (MLflow parent id, the candidates' validation rows, the winner's
    checkpoint and test results) in `local_dir/NAME` on the driver.
    """
    num_samples = space.budget.num_samples if num_samples is None else num_samples
    if num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {num_samples}")
    sweep_dir = local_dir.resolve() / space.name
    storage = storage_path if storage_path and "://" in storage_path else str(Path(storage_path or local_dir).resolve())
    experiment = f"{storage.rstrip('/')}/{space.name}"
    if resume and not ray.tune.Tuner.can_restore(experiment):
        raise UserError(f"nothing to resume at {experiment}: run without --resume to start the sweep")
    if not resume and (sweep_dir / PARENT_FILE).exists():
        raise UserError(f"sweep {space.name!r} already exists in {sweep_dir.parent}: pass --resume to finish it, or "
                        f"change its name: in {space.path}")
    tracker = Tracker(tracking_uri, spool=sweep_dir / "mlflow-pending")  # unreachable: fails before any work
    parent = _parent_run(tracker, space, sweep_dir, resume, num_samples)
    with system_metrics(tracker, parent):  # the driver's machine: CPU and memory while it sweeps
        connect()
        callback = MlflowSweepCallback(tracker.uri, parent, space, sweep_dir / "mlflow-pending")
        with sealed(*SEALED):
            results = _run_trials(space, experiment, storage, num_samples, callback, resume, cache_dir, data_root,
                                  download, progress)
            table = trials_table(results, space)
            shortlisted = selection.shortlist(candidates(results, space), space.selection.top_k)
            if not shortlisted:
                tracker.end(parent, "FAILED")
                raise JobFailed(f"no trial of {space.name} was trained to its last epoch; see the trial logs in "
                                f"{experiment}")
            for candidate in shortlisted:
                selection.validate(candidate, space, sweep_dir, data_root, download, progress)
                _log_to_child(callback, parent, candidate.trial_id, candidate.val_metrics)
            winner = selection.choose(shortlisted, space.objective)
        # The choice is made: from here on the test split may be read, once.
        best = _winner_checkpoint(space, winner, sweep_dir, cache_dir, data_root, download)
        final = selection.certify_on_test(space, best, sweep_dir / "final.parquet", data_root, download, progress)
        test_metrics = tracker.log_results(parent, read_results(final), final, prefix=selection.TEST_PREFIX)
        _log_to_child(callback, parent, winner.trial_id,
                      {selection.TEST_PREFIX + k: v for k, v in test_metrics.items()})
        tracker.log_metrics(parent, winner.val_metrics)
        tracker.log_params(parent, {f"best.{k}": v for k, v in winner.point.items()})
        tracker.set_tags(parent, {"best_trial": winner.trial_id, "best_checkpoint": str(best)})
        table = _with_selection(table, shortlisted, winner, space, test_metrics)
        with tempfile.TemporaryDirectory() as folder:
            summary = Path(folder) / "trials.csv"
            table.to_csv(summary, index=False)
            tracker.log_artifact(parent, summary)
        example = input_example(get_dataset(space.dataset, "val", data_root, download))
        winner_run = callback.tracker.find({"catrs.trial_id": winner.trial_id, "mlflow.parentRunId": parent})
        # The model goes on the run it came from: the winning trial's, or the parent's when it was re-trained.
        model_run = parent if space.selection.refit or winner_run is None else winner_run
        version = register_checkpoint(tracker, model_run, space.name, best, example)
        _tell_the_story(tracker, space, parent, winner, winner_run, table, test_metrics)
        _close_orphans(tracker, parent, {str(t) for t in table["trial"]})
        report = _trade_off_report(tracker, parent, space)
    tracker.end(parent, "FINISHED")
    tracker.close()
    callback.tracker.close()
    return SweepOutcome(sweep_dir, parent, table, dict(winner.point), winner.trial_id, best, final, report, version,
                        tracker.experiment_id)


def _run_trials(space: SearchSpace, experiment: str, storage: str, num_samples: int, callback, resume: bool,
                cache_dir: str | Path | None, data_root: Path | None, download: bool, progress: bool
                ) -> ray.tune.ResultGrid:
    """Every trial of the sweep, after the soft labels they share (one teacher per σ0)."""
    tables = {}
    for point in space.teacher_points():
        config = space.soft_label_config(point)
        table = soft_labels_for(config, cache_dir, data_root=data_root, download=download, progress=progress,
                                producer=cluster_producer())
        if table is not None:
            tables[soft_label_spec(config).key()] = ray.put(table)
    trainable = _trainable(space, tables, data_root, download, f"{experiment}-train")
    if resume:
        quiet_tune()
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _tuner(space, storage, trainable, num_samples,
                       [callback] + ([SweepProgress(num_samples, space.metric)] if progress else []))
    return tuner.fit()


def _log_to_child(callback: MlflowSweepCallback, parent: str, trial_id: str, metrics: dict[str, float]) -> None:
    child = callback.tracker.find({"catrs.trial_id": trial_id, "mlflow.parentRunId": parent})
    if child:
        callback.tracker.log_metrics(child, metrics)


def _winner_checkpoint(space: SearchSpace, winner: selection.Candidate, sweep_dir: Path,
                       cache_dir: str | Path | None, data_root: Path | None, download: bool) -> Path:
    """The checkpoint the sweep certifies on test: the winning trial's, or its setting re-trained on all of the
    training split (`selection.refit`); kept in `SWEEP/best/`."""
    best_dir = sweep_dir / BEST_DIR
    if space.selection.refit:
        return selection.refit(space, winner.point, best_dir, cache_dir, data_root, download)
    winner.checkpoint.to_directory(str(best_dir))
    return best_dir / CHECKPOINT_NAME


def _with_selection(table: pd.DataFrame, shortlisted: list[selection.Candidate], winner: selection.Candidate,
                    space: SearchSpace, test_metrics: dict[str, float]) -> pd.DataFrame:
    """The trials table with the shortlist's validation figure, the winner marked and its test figure."""
    val_column = selection.VAL_PREFIX + space.objective
    figures = {c.trial_id: c.val(space.objective) for c in shortlisted}
    table = table.assign(**{val_column: table["trial"].map(figures),
                            "chosen": (table["trial"] == winner.trial_id).map({True: "*", False: ""})})
    table[selection.TEST_PREFIX + space.objective] = table["trial"].map(
        {winner.trial_id: test_metrics.get(space.objective, math.nan)})
    return table.sort_values([val_column, space.metric], ascending=False, na_position="last")


def _tell_the_story(tracker: Tracker, space: SearchSpace, parent: str, winner: selection.Candidate,
                    winner_run: str | None, table: pd.DataFrame, test_metrics: dict[str, float]) -> None:
    """Names, tags and the parent's description that make the UI's runs table read as the sweep went
    (`catrs.sweep_story`): the parent with its test figure and the trials table, the winner starred."""
    test = test_metrics.get(space.objective, math.nan)
    tracker.log_dataset(parent, space.dataset, "test", "evaluation")
    tracker.rename(parent, parent_name(space, test))
    link = f"#/experiments/{tracker.experiment_id}/runs/{winner_run}" if winner_run else ""
    tracker.set_tags(parent, {"mlflow.note.content": sweep_note(space, table, winner.point, link, test_metrics),
                              **({"best_run": winner_run} if winner_run else {})})
    if winner_run:  # the run a reader opens: every setting of it, not only what the trials varied
        tracker.log_params(winner_run, asdict(space.train_config(winner.point)))
        tracker.set_tags(winner_run, {"catrs.winner": "true"})
        tracker.rename(winner_run, winner_name(winner.point, space.objective, winner.val(space.objective), test))
        tracker.log_dataset(winner_run, space.dataset, "test", "evaluation")


def _trade_off_report(tracker: Tracker, parent: str, space: SearchSpace) -> SweepReport | None:
    """The sweep's frontier and importances on the parent run (radius: σ, where the literature reads them)."""
    try:
        report = sweep_report(tracker, parent, radius=_nearest_logged_radius(space.sigma))
    except UserError:
        return None
    log_sweep_report(tracker, report)
    return report


def _nearest_logged_radius(sigma: float) -> float:
    return min(DEFAULT_RADII[1:], key=lambda r: abs(r - sigma))


def _close_orphans(tracker: Tracker, parent: str, trial_ids: set[str]) -> None:
    """Child runs still RUNNING once the sweep is over (a driver killed mid-trial whose trial Tune did not
    bring back) are marked KILLED, so the store holds no run that looks alive."""
    for child in tracker.children(parent):
        if child.info.status == "RUNNING":
            status = "FINISHED" if child.data.tags.get("catrs.trial_id") in trial_ids else "KILLED"
            tracker.end(child.info.run_id, status)


def format_outcome(outcome: SweepOutcome, space: SearchSpace, tracking_uri: str | None = None,
                   data_root: Path | None = None) -> str:
    """The summary a sweep prints: every trial with its last proxy on val, the shortlist's validation figure,
    the winner (*) and its figure on test, the winner's test report, the trade-off report, the next commands."""
    refit = " (re-trained on the whole training split)" if space.selection.refit else ""
    model = f", registered as {space.name}@champion (version {outcome.model_version})" if outcome.model_version else ""
    lines = [f"sweep {space.name}: {len(outcome.trials)} trials; chosen on val by {selection.VAL_PREFIX}"
             f"{space.objective} among the top {space.selection.top_k} by the proxy ({space.metric}); test read "
             f"once, for the choice",
             outcome.trials.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""),
             f"\nchosen: trial {outcome.best_trial} {outcome.best_config}{refit}{model}",
             format_report(build_report(outcome.final_results, DEFAULT_RADII), linf=False)]
    if outcome.trade_off is not None:
        lines.append(format_sweep_report(outcome.trade_off))
    return "\n".join(lines + ["", next_commands(outcome, space, tracking_uri, data_root)])


def next_commands(outcome: SweepOutcome, space: SearchSpace, tracking_uri: str | None = None,
                  data_root: Path | None = None) -> str:
    """The commands that take this sweep to the paper's Table 1, Table 3 and Figure 2(c), with the sweep's own
    tracking URI and data root where it was given them."""
    final = space.final
    store = f" --tracking-uri {shlex.quote(tracking_uri)}" if tracking_uri else ""
    lines = ["the paper's tables for this sweep:",
             f"  Table 1:      catrs report {space.method}={outcome.final_results} LABEL=OTHER_RESULTS… --markdown "
             f"--plot curves.png",
             f"  Figure 2(c):  catrs report --sweep {outcome.parent_run_id} "
             f"--radius {_nearest_logged_radius(space.sigma)}{store}"]
    try:
        corrupted_variant(space.dataset)
    except UserError:
        return "\n".join(lines)
    # The paper certifies 100 images per (corruption, severity) of CIFAR-10-C's 10,000; digits has 360.
    skip = 10 if space.dataset == "digits" else 100
    workers = f" --workers {final.workers}" if final.workers > 1 else ""
    root = f" --data-root {shlex.quote(str(data_root))}" if data_root else ""
    lines.insert(2, f"  Table 3:      catrs certify --checkpoint {outcome.best_checkpoint} "
                    f"--dataset {space.dataset} --sigma {space.sigma} --corruptions --skip {skip} --n0 {final.n0} "
                    f"--n {final.n} --alpha {final.alpha} --batch {final.batch}{workers}{root}{store} "
                    f"--out {outcome.path / 'corruptions.parquet'}")
    return "\n".join(lines)
