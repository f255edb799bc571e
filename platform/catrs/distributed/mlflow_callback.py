"""The MLflow side of a sweep, logged from the driver: the parent run, a child per trial, and the story.

A parent run per sweep, a child per trial (params, metrics per report, and — read from the trial's
checkpoint in Tune's run storage — the proxy rows, their curve, every epoch's training metrics and the
resolved config); `final_val_…` on the shortlisted children, `test_…` on the parent and the winning child.
Then the names, tags and the parent's description that make the UI's runs table read as the sweep went
(`catrs.sweep_story`). A store that goes away never stops the sweep: the trials' results stay in Tune's
storage.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import ray.tune

from catrs.distributed import selection
from catrs.distributed.trial import trial_checkpoint
from catrs.errors import UserError
from catrs.search_space import SearchSpace
from catrs.sweep_report import SweepReport, log_sweep_report, sweep_report
from catrs.sweep_story import (
    nearest_logged_radius,
    parent_name,
    shared_params,
    stopped_name,
    sweep_note,
    trial_name,
    winner_name,
)
from catrs.tracking import Tracker, plot_certified_accuracy, run_tags
from catrs.train import RunFolder

PARENT_FILE = "mlflow_parent_run"


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
                tags = run_tags(
                    "trial", space.method, space.dataset, space.sigma, trial_id=trial.trial_id, sweep=space.name
                )
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
            print(
                f"catrs: MLflow did not take a trial record ({type(error).__name__}); the trial's results "
                f"remain in the sweep's Tune storage",
                file=sys.stderr,
            )

    def _log_trial_files(self, run_id: str, trial: Any) -> None:
        """The proxy results, their curve, the metric history and the resolved config, from the run storage."""
        checkpoint = trial_checkpoint(trial)
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            config = asdict(self.space.resolve(trial.config).config)
            (folder / "config.json").write_text(json.dumps(config, indent=1))
            self.tracker.log_artifact(run_id, folder / "config.json")
            if checkpoint is None:
                return
            run = RunFolder(folder / "checkpoint")
            checkpoint.to_directory(str(run.path))
            if run.evaluation_file.exists():
                self.tracker.log_artifact(run_id, run.evaluation_file, "proxy")
                plot_certified_accuracy(
                    {"": pd.read_parquet(run.evaluation_file)},
                    folder / "proxy_certified_accuracy.png",
                    "proxy on val (small n, estimates skipped where the class is wrong):",
                )
                self.tracker.log_artifact(run_id, folder / "proxy_certified_accuracy.png", "plots")
            if run.history_file.exists():
                self.tracker.log_artifact(run_id, run.history_file)
                self._log_every_epoch(run_id, trial.trial_id, run.history())

    def _log_every_epoch(self, run_id: str, trial_id: str, history: list[dict[str, float]]) -> None:
        """The training metrics of the epochs the trial did not report to Tune (it reports at rungs and at its
        end, where the proxy runs), from its metric history, so that the run has every epoch."""
        reported = self._reported.get(trial_id, set())
        for row in history:
            epoch = int(row["epoch"])
            if epoch not in reported:
                self.tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)


def parent_run(tracker: Tracker, space: SearchSpace, sweep_dir: Path, resume: bool, num_samples: int) -> str:
    """The sweep's parent run: found again on a resume (its id is kept in the sweep's folder), else created
    with what every trial shares."""
    marker = sweep_dir / PARENT_FILE
    if resume and marker.exists():
        return marker.read_text().strip()
    run_id = tracker.start(
        space.name,
        run_tags(
            "sweep",
            space.method,
            space.dataset,
            space.sigma,
            sweep=space.name,
            objective=space.objective,
            searched=",".join(f"{k}:{d.kind}" for k, d in space.search.items()),
        ),
    )
    tracker.log_params(run_id, shared_params(space, num_samples))
    tracker.log_dataset(run_id, space.dataset, "train_minus_val", "training")
    tracker.log_dataset(run_id, space.dataset, "val", "validation")
    tracker.log_artifact(run_id, space.path)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return run_id


def log_to_child(callback: MlflowSweepCallback, parent: str, trial_id: str, metrics: dict[str, float]) -> None:
    """`metrics` on the trial's child run, if it has one."""
    child = callback.tracker.find({"catrs.trial_id": trial_id, "mlflow.parentRunId": parent})
    if child:
        callback.tracker.log_metrics(child, metrics)


def tell_the_story(
    tracker: Tracker,
    space: SearchSpace,
    parent: str,
    winner: selection.Candidate,
    winner_run: str | None,
    table: pd.DataFrame,
    test_metrics: dict[str, float],
) -> None:
    """Names, tags and the parent's description that make the UI's runs table read as the sweep went
    (`catrs.sweep_story`): the parent with its test figure and the trials table, the winner starred."""
    test = test_metrics.get(space.objective, math.nan)
    tracker.log_dataset(parent, space.dataset, "test", "evaluation")
    tracker.rename(parent, parent_name(space, test))
    link = f"#/experiments/{tracker.experiment_id}/runs/{winner_run}" if winner_run else ""
    tracker.set_tags(
        parent,
        {
            "mlflow.note.content": sweep_note(space, table, winner.point, link, test_metrics),
            **({"best_run": winner_run} if winner_run else {}),
        },
    )
    if winner_run:  # the run a reader opens: every setting of it, not only what the trials varied
        tracker.log_params(winner_run, asdict(space.resolve(winner.point).config))
        tracker.set_tags(winner_run, {"catrs.winner": "true"})
        tracker.rename(winner_run, winner_name(winner.point, space.objective, winner.val(space.objective), test))
        tracker.log_dataset(winner_run, space.dataset, "test", "evaluation")


def trade_off_report(tracker: Tracker, parent: str, space: SearchSpace) -> SweepReport | None:
    """The sweep's frontier and importances on the parent run (radius: σ, where the literature reads them)."""
    try:
        report = sweep_report(tracker, parent, radius=nearest_logged_radius(space.sigma))
    except UserError:
        return None
    log_sweep_report(tracker, report)
    return report


def close_orphans(tracker: Tracker, parent: str, trial_ids: set[str]) -> None:
    """Child runs still RUNNING once the sweep is over (a driver killed mid-trial whose trial Tune did not
    bring back) are marked KILLED, so the store holds no run that looks alive."""
    for child in tracker.children(parent):
        if child.info.status == "RUNNING":
            status = "FINISHED" if child.data.tags.get("catrs.trial_id") in trial_ids else "KILLED"
            tracker.end(child.info.run_id, status)
