"""Sweeps: `catrs tune NAME` (a shipped space) or `catrs tune FILE.yaml` — Ray Tune + Optuna (TPE) + ASHA, for
the best certified radius. This module runs one from start to end; its parts are `trial` (what each trial
runs and how Tune schedules them), `mlflow_callback` (what MLflow records), `console` (what the terminal
shows) and `selection` (how the winner is chosen and certified).

CAT-RS's soft labels are computed before the first trial, one teacher per σ0 the space allows (trained on
`train_minus_val` too), and handed to the trials through Ray's object store. After the last trial the winner
is chosen on val (`selection`: the top-k trials trained to their end, certified on val with the selection
protocol), and only then is the test split read: the winner (re-trained on the whole training split if the
file asks) is certified on it with the final protocol, and registered in MLflow's Model Registry as the
sweep's `champion`. The driver and every trial seal the test split until then (`catrs.data.sealed`), so
nothing that chooses can read it.

`--resume` continues a killed sweep (unfinished trials from their last checkpoint, then the rest of the
samples), re-using its MLflow parent and child runs instead of creating new ones.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
import ray
import ray.tune

from catrs.data import get_dataset, sealed
from catrs.distributed import selection
from catrs.distributed.console import SweepOutcome, SweepProgress, quiet_tune
from catrs.distributed.mlflow_callback import (
    PARENT_FILE,
    MlflowSweepCallback,
    close_orphans,
    log_to_child,
    parent_run,
    tell_the_story,
    trade_off_report,
)
from catrs.distributed.runtime import connect
from catrs.distributed.train import cluster_producer
from catrs.distributed.trial import SEALED, trial_checkpoint, trial_trainable, tuner
from catrs.errors import JobFailed, UserError
from catrs.model_registry import input_example, register_checkpoint
from catrs.results import read_results
from catrs.search_space import SearchSpace
from catrs.tracking import Tracker, system_metrics
from catrs.train import RunFolder, soft_labels_for

BEST_DIR = "best"  # the best trial's checkpoint, beside the sweep's final results


def _trial_id(result: ray.tune.Result) -> str:
    return (result.metrics or {}).get("trial_id", Path(result.path).name)


def _status(result: ray.tune.Result, epochs: int) -> str:
    if result.error:
        return "error"
    reached = (result.metrics or {}).get("epoch", 0)
    return "done" if reached >= epochs else f"stopped at epoch {reached}"


def each(results: ray.tune.ResultGrid) -> list[ray.tune.Result]:
    """The grid's results (it iterates by index; its type says it does not iterate)."""
    return [results[i] for i in range(len(results))]


def trials_table(results: ray.tune.ResultGrid, space: SearchSpace) -> pd.DataFrame:
    """A row per trial: its searched values, how far it trained, and its last proxy figure."""
    rows = [
        {
            "trial": _trial_id(result),
            **{k: (result.config or {}).get(k) for k in space.search},
            "epochs": (result.metrics or {}).get("epoch"),
            "status": _status(result, space.epochs),
            space.metric: (result.metrics or {}).get(space.metric, math.nan),
        }
        for result in each(results)
    ]
    return pd.DataFrame(rows).sort_values(space.metric, ascending=False, na_position="last")


def candidates(results: ray.tune.ResultGrid, space: SearchSpace) -> list[selection.Candidate]:
    """The trials trained to their last epoch, with a checkpoint and a proxy figure."""
    found = []
    for result in each(results):
        checkpoint = trial_checkpoint(result)
        if _status(result, space.epochs) == "done" and checkpoint is not None:
            point = {k: (result.config or {})[k] for k in space.search}
            proxy = float((result.metrics or {}).get(space.metric, math.nan))
            found.append(selection.Candidate(_trial_id(result), point, proxy, checkpoint))
    return found


def run_sweep(
    space: SearchSpace,
    *,
    num_samples: int | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    storage_path: str | None = None,
    local_dir: Path = Path("runs") / "sweeps",
    cache_dir: str | Path | None = None,
    data_root: Path | None = None,
    download: bool = False,
    progress: bool = True,
) -> SweepOutcome:
    """Runs (or with `resume`, finishes) the sweep of `space`; chooses on val, certifies the choice on test,
    registers it; logs all to MLflow.

    Tune's experiment (trial checkpoints) lives in `storage_path` (a directory or a cloud URI; default
    `local_dir`); the sweep's own files (MLflow parent id, the candidates' validation rows, the winner's
    checkpoint and test results) in `local_dir/NAME` on the driver.
    """
    num_samples = space.trials(num_samples)
    sweep_dir = local_dir.resolve() / space.name
    storage = storage_path if storage_path and "://" in storage_path else str(Path(storage_path or local_dir).resolve())
    experiment = f"{storage.rstrip('/')}/{space.name}"
    if resume and not ray.tune.Tuner.can_restore(experiment):
        raise UserError(f"nothing to resume at {experiment}: run without --resume to start the sweep")
    if not resume and (sweep_dir / PARENT_FILE).exists():
        raise UserError(
            f"sweep {space.name!r} already exists in {sweep_dir.parent}: pass --resume to finish it, or "
            f"change its name: in {space.path}"
        )
    tracker = Tracker(tracking_uri, spool=sweep_dir / "mlflow-pending")  # unreachable: fails before any work
    parent = parent_run(tracker, space, sweep_dir, resume, num_samples)
    with system_metrics(tracker, parent):  # the driver's machine: CPU and memory while it sweeps
        connect()
        callback = MlflowSweepCallback(tracker.uri, parent, space, sweep_dir / "mlflow-pending")
        with sealed(*SEALED):
            results = _run_trials(
                space, experiment, storage, num_samples, callback, resume, cache_dir, data_root, download, progress
            )
            table = trials_table(results, space)
            shortlisted = selection.shortlist(candidates(results, space), space.selection.top_k)
            if not shortlisted:
                tracker.end(parent, "FAILED")
                raise JobFailed(
                    f"no trial of {space.name} was trained to its last epoch; see the trial logs in {experiment}"
                )
            for candidate in shortlisted:
                selection.validate(candidate, space, sweep_dir, data_root, download, progress)
                log_to_child(callback, parent, candidate.trial_id, candidate.val_metrics)
            winner = selection.choose(shortlisted, space.objective)
        # The choice is made: from here on the test split may be read, once.
        best = _winner_checkpoint(space, winner, sweep_dir, cache_dir, data_root, download)
        final = selection.certify_on_test(space, best, sweep_dir / "final.parquet", data_root, download, progress)
        test_metrics = tracker.log_results(parent, read_results(final), final, prefix=selection.TEST_PREFIX)
        log_to_child(callback, parent, winner.trial_id, {selection.TEST_PREFIX + k: v for k, v in test_metrics.items()})
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
        tell_the_story(tracker, space, parent, winner, winner_run, table, test_metrics)
        close_orphans(tracker, parent, {str(t) for t in table["trial"]})
        report = trade_off_report(tracker, parent, space)
    tracker.end(parent, "FINISHED")
    tracker.close()
    callback.tracker.close()
    return SweepOutcome(
        sweep_dir,
        parent,
        table,
        dict(winner.point),
        winner.trial_id,
        best,
        final,
        report,
        version,
        tracker.experiment_id,
    )


def _run_trials(
    space: SearchSpace,
    experiment: str,
    storage: str,
    num_samples: int,
    callback: MlflowSweepCallback,
    resume: bool,
    cache_dir: str | Path | None,
    data_root: Path | None,
    download: bool,
    progress: bool,
) -> ray.tune.ResultGrid:
    """Every trial of the sweep, after the soft labels they share (one teacher per σ0)."""
    tables = {}
    for point in space.teacher_points():
        spec = space.resolve(point)
        labels = spec.soft_labels()
        if labels is not None:
            table = soft_labels_for(
                spec, cache_dir, data_root=data_root, download=download, progress=progress, producer=cluster_producer()
            )
            tables[labels.key()] = ray.put(table)
    function = trial_trainable(space, tables, data_root, download, f"{experiment}-train")
    if resume:
        quiet_tune()
        return ray.tune.Tuner.restore(experiment, function, resume_unfinished=True, resume_errored=True).fit()
    callbacks = [callback] + ([SweepProgress(num_samples, space.metric)] if progress else [])
    return tuner(space, storage, function, num_samples, callbacks).fit()


def _winner_checkpoint(
    space: SearchSpace,
    winner: selection.Candidate,
    sweep_dir: Path,
    cache_dir: str | Path | None,
    data_root: Path | None,
    download: bool,
) -> Path:
    """The checkpoint the sweep certifies on test: the winning trial's, or its setting re-trained on all of the
    training split (`selection.refit`); kept in `SWEEP/best/`."""
    best_dir = sweep_dir / BEST_DIR
    if space.selection.refit:
        return selection.refit(space, winner.point, best_dir, cache_dir, data_root, download)
    winner.checkpoint.to_directory(str(best_dir))
    return RunFolder(best_dir).checkpoint


def _with_selection(
    table: pd.DataFrame,
    shortlisted: list[selection.Candidate],
    winner: selection.Candidate,
    space: SearchSpace,
    test_metrics: dict[str, float],
) -> pd.DataFrame:
    """The trials table with the shortlist's validation figure, the winner marked and its test figure."""
    val_column = selection.VAL_PREFIX + space.objective
    figures = {c.trial_id: c.val(space.objective) for c in shortlisted}
    table = table.copy()
    table[val_column] = table["trial"].map(figures)
    table["chosen"] = (table["trial"] == winner.trial_id).map({True: "*", False: ""})
    table[selection.TEST_PREFIX + space.objective] = table["trial"].map(
        {winner.trial_id: test_metrics.get(space.objective, math.nan)}
    )
    return table.sort_values([val_column, space.metric], ascending=False, na_position="last")
