"""How a sweep reads in MLflow, logged from the driver: the parent run, a child per trial, and the story.

A parent run per sweep, a child per trial (params, metrics per report, and — read from the trial's
checkpoint in the run storage — the proxy rows, their curve, every epoch's training metrics and the
resolved config); `final_val_…` on the shortlisted children, `test_…` on the parent and the winning child.
A store that goes away never stops the sweep: the trials' results stay in the run storage.

The runs table shows names first, so they carry the story: a trial is named by its searched values
(`lbd=0.506 epsilon=0.421 sigma0=0.25 confidence_mask=True`), a trial ASHA stopped says at which epoch, the
winner is starred with its validation and test figures, and the parent shows the winner's test figure. The
parent's description (`mlflow.note.content`, Markdown in the UI's Overview) holds the trials table the console
prints and links the winner's run.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from catrs.data import SplitFacts
from catrs.errors import UserError
from catrs.metrics import DEFAULT_RADII
from catrs.plots import plot_certified_accuracy
from catrs.sweep.population import SCHEDULE_FILES, write_schedule
from catrs.sweep.proxy import proxy_metric_names, proxy_name
from catrs.sweep.report import SweepReport, log_sweep_report, sweep_report
from catrs.sweep.selection import Candidate
from catrs.sweep.space import SearchSpace
from catrs.sweep.trial import TrialCheckpoint, stopped_at
from catrs.tracking import Tracker, flatten, run_tags
from catrs.train import RunFolder

PARENT_FILE = "mlflow_parent_run"
EXPLOIT_TAG = "catrs.exploit.after_epoch_"  # a population member's copies, one tag each


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_name(point: Mapping[str, Any]) -> str:
    """A trial's run name: its searched values, short."""
    return " ".join(f"{key}={_short(value)}" for key, value in point.items())


def stopped_name(point: Mapping[str, Any], where: str) -> str:
    return f"{trial_name(point)} · stopped at {where}"


def winner_name(point: Mapping[str, Any], objective: str, val: float, test: float) -> str:
    return f"★ {trial_name(point)} · val {objective} {val:.3f} · test {objective} {test:.3f}"


def parent_name(space: SearchSpace, test: float) -> str:
    return f"{space.name} · test {space.objective} {test:.3f}"


def shared_params(space: SearchSpace) -> dict[str, str]:
    """What every trial of the sweep shares, flattened: the resolved run of the file's first point without the
    searched keys, the protocols of proxy, selection and final certification, and the budget."""
    config = space.resolve(space.first_point()).config
    run = {key: value for key, value in asdict(config).items() if key != "method_config" and key not in space.search}
    method = {key: value for key, value in config.method_config.items() if key not in space.search}
    return {
        **flatten(run),
        **flatten(method, "method_config."),
        **flatten(asdict(space.proxy), "proxy."),
        **flatten(asdict(space.selection), "selection."),
        **flatten(asdict(space.final), "final."),
        **flatten(asdict(space.budget), "budget."),
        "search_space": str(space.path),
        "objective": space.objective,
    }


def markdown_table(table: pd.DataFrame) -> str:
    """A data frame as a Markdown table (numbers to 4 significant digits, missing values blank)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, "|" + "---|" * len(table.columns), *rows])


def sweep_note(
    space: SearchSpace,
    table: pd.DataFrame,
    winner: Mapping[str, Any],
    winner_link: str,
    test: Mapping[str, float],
    cost: list[str],
) -> str:
    """The parent run's description: the choice and its test figures, how it was made, every trial, and what
    the sweep cost (the ledger, also the `cost/…` metrics)."""
    refit = " (re-trained on the whole training split)" if space.selection.refit else ""
    figures = ", ".join(f"{key} {test[key]:.3f}" for key in (space.objective, "clean_accuracy") if key in test)
    trained = (
        f"A population of {space.budget.num_samples} members trained once on `train_minus_val`, each reporting "
        f"`{proxy_name(space.metric)}` (the proxy: a cheap certification of `val`) every {space.budget.interval} "
        f"epoch(s); the bottom ones copied the top ones' weights and perturbed {', '.join(space.budget.move)} "
        f"(each copy is a `{EXPLOIT_TAG}…` tag on the member's run; its settings per epoch are in its "
        f"`schedule/` artifacts, with the `replay.yaml` that trains it again)."
        if space.budget.population
        else f"Trials trained on `train_minus_val` and reported `{proxy_name(space.metric)}` (the proxy: a cheap "
        f"certification of `val`)."
    )
    return "\n".join(
        [
            f"## {space.method} on {space.dataset}, σ = {space.sigma:g}: sweep {space.name}",
            "",
            f"**Winner: [{trial_name(winner)}]({winner_link})**{refit} — on the test split: {figures}.",
            "",
            f"{trained} The top {space.selection.top_k} by the proxy were certified on `val` again with the final "
            f"protocol (`final_val_{space.objective}`), the best was chosen, and only then was `test` read, once, "
            f"for the winner (`test_{space.objective}`).",
            "",
            markdown_table(table),
            "",
            "### Cost",
            "",
            "```",
            *cost,
            "```",
        ]
    )


def nearest_logged_radius(sigma: float) -> float:
    """The radius of the logged certified accuracies nearest σ."""
    return min(DEFAULT_RADII[1:], key=lambda r: abs(r - sigma))


class TrialRecords:
    """Records each trial as a child run of the sweep's parent run, from the driver (a `TrialObserver`).

    Child runs are found again by their trial id, so a resumed sweep continues its runs rather than
    duplicating them. The MLflow client is created lazily: the Tune glue pickles its observers with the
    experiment.
    """

    def __init__(
        self, tracking_uri: str, parent_run_id: str, space: SearchSpace, data: dict[str, SplitFacts], spool: Path
    ) -> None:
        self.tracking_uri, self.parent_run_id, self.space, self.spool = tracking_uri, parent_run_id, space, spool
        self.data = data  # the facts of the splits the trials train and are evaluated on
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}
        self._reported: dict[str, set[int]] = {}  # the epochs each trial reported, so logged already

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None, "_runs": {}, "_reported": {}}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, spool=self.spool)
        return self._tracker

    def run_for(self, trial_id: str, point: dict[str, Any]) -> str:
        """The trial's child run (found again after a resume), named by its searched values, with them as
        params and the data it trains and is evaluated on as dataset inputs."""
        if trial_id not in self._runs:
            tags = {"catrs.trial_id": trial_id, "mlflow.parentRunId": self.parent_run_id}
            run_id = self.tracker.find(tags)
            if run_id is None:
                space = self.space
                tags = run_tags("trial", space.method, space.dataset, space.sigma, trial_id=trial_id, sweep=space.name)
                run_id = self.tracker.start(trial_name(point), tags, self.parent_run_id)
                if self.space.budget.population:  # a member's params are its final settings (`completed`)
                    self.tracker.set_tags(run_id, {"catrs.initial_settings": trial_name(point)})
                else:
                    self.tracker.log_params(run_id, point)  # what differs; the parent has what all share
                self.tracker.log_dataset(run_id, self.data["train_minus_val"], "training")
                self.tracker.log_dataset(run_id, self.data["val"], "validation")
            self._runs[trial_id] = run_id
        return self._runs[trial_id]

    def child(self, trial_id: str) -> str | None:
        """The trial's child run, if it has one."""
        return self.tracker.find({"catrs.trial_id": trial_id, "mlflow.parentRunId": self.parent_run_id})

    def log_to_child(self, trial_id: str, metrics: dict[str, float], prefix: str) -> None:
        """The headline figures of a certification (`metrics`, each name `prefix` + figure) on the trial's
        child run, if it has one: ACR, the objective, clean accuracy and certified accuracy at σ. The rest (every
        radius, p_A's histogram) is on the parent with the rows: a trial's page keeps its curves in view."""
        headline = {
            "acr",
            self.space.objective,
            "clean_accuracy",
            f"certified_accuracy_{nearest_logged_radius(self.space.sigma):g}",
        }
        if child := self.child(trial_id):
            self.tracker.log_metrics(
                child, {prefix + k: metrics[prefix + k] for k in headline if prefix + k in metrics}
            )

    def started(self, trial_id: str, point: dict[str, Any]) -> None:
        self._guarded(lambda: self.run_for(trial_id, point))

    def reported(self, trial_id: str, point: dict[str, Any], metrics: dict[str, float]) -> None:
        step = int(metrics.get("step", metrics.get("epoch", 0)))  # (a trial climbing rungs counts on over them)
        self._reported.setdefault(trial_id, set()).add(step)
        self._guarded(lambda: self.tracker.log_metrics(self.run_for(trial_id, point), self._named(metrics), step=step))

    def _named(self, metrics: dict[str, float]) -> dict[str, float]:
        """The proxy's headline figures named as the proxy's (`proxy/val_acr`; its other radii stay in its
        rows, `proxy/evaluation.parquet`: a chart each would bury the training curves), the training's as
        they are."""
        proxied, shown = proxy_metric_names(self.space.objective), self._proxy_headline
        return {(proxy_name(k) if k in proxied else k): v for k, v in metrics.items() if k not in proxied or k in shown}

    @property
    def _proxy_headline(self) -> set[str]:
        space = self.space
        radius = nearest_logged_radius(space.sigma)
        return {space.metric, "val_clean_accuracy", f"val_certified_accuracy_{radius:g}", "val_samples"}

    def completed(
        self, trial_id: str, point: dict[str, Any], last: dict[str, Any], checkpoint: TrialCheckpoint | None
    ) -> None:
        def finish() -> None:
            run_id = self.run_for(trial_id, point)
            # The history in the checkpoint is its last rung's: its epoch E was reported at step `offset` + E.
            offset = int(last.get("step", last.get("epoch", 0))) - int(last.get("epoch", 0))
            self._log_trial_files(run_id, trial_id, point, checkpoint, offset)
            if self.space.budget.population:  # where it ended, after its copies and perturbations
                self.tracker.log_params(run_id, point)
                self.tracker.rename(run_id, trial_name(point))
            if where := stopped_at(last, self.space.epochs):  # the scheduler stopped it: say so in the run list
                self.tracker.set_tags(run_id, {"catrs.stopped_at": where})
                self.tracker.rename(run_id, stopped_name(point, where))
            self.tracker.end(run_id, "FINISHED")

        self._guarded(finish)

    def failed(self, trial_id: str, point: dict[str, Any]) -> None:
        self._guarded(lambda: self.tracker.end(self.run_for(trial_id, point), "FAILED"))

    def exploited(self, trial_id: str, copied_id: str, epoch: int, *settings: dict[str, Any]) -> None:
        """A tag per copy on the member's run: `catrs.exploit.after_epoch_004` = "copied T after epoch 4 ·
        before: … · copied: … · after: …" (the moved settings)."""
        moving = self.space.budget.move
        said = " · ".join(
            f"{label}: {trial_name({k: values[k] for k in moving})}"
            for label, values in zip(("before", "copied", "after"), settings, strict=True)
        )
        tag = {f"{EXPLOIT_TAG}{epoch:03d}": f"copied {copied_id} after epoch {epoch} · {said}"}
        self._guarded(lambda: self.tracker.set_tags(self.run_for(trial_id, settings[-1]), tag))

    def _guarded(self, log: Callable[[], object]) -> None:
        """A store that went away must not stop the sweep: the trial's results stay in the run storage."""
        try:
            log()
        except Exception as error:
            print(
                f"catrs: MLflow did not take a trial record ({type(error).__name__}); the trial's results "
                f"remain in the sweep's run storage",
                file=sys.stderr,
            )

    def _log_trial_files(
        self, run_id: str, trial_id: str, point: dict[str, Any], checkpoint: TrialCheckpoint | None, offset: int
    ) -> None:
        """The proxy results, their curve, the metric history and the resolved config, from the run storage."""
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            run = RunFolder(folder / "checkpoint")
            if checkpoint is not None:
                checkpoint.to_directory(str(run.path))
            config = run.trained_config() or asdict(self.space.resolve(point).config)
            (folder / "config.json").write_text(json.dumps(config, indent=1))
            self.tracker.log_artifact(run_id, folder / "config.json")
            if checkpoint is None:
                return
            if self.space.budget.population:
                self._log_schedule(run_id, run, folder)
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
                self._log_every_epoch(run_id, trial_id, run.history(), offset)

    def _log_schedule(self, run_id: str, run: RunFolder, folder: Path) -> None:
        """The member's schedule: table, plot and replay file (`catrs.sweep.population.write_schedule`)."""
        if write_schedule(run, self.space.budget.move, folder) is not None:
            for name in SCHEDULE_FILES:
                self.tracker.log_artifact(run_id, folder / name, "schedule")

    def _log_every_epoch(self, run_id: str, trial_id: str, history: list[dict[str, float]], offset: int) -> None:
        """The training metrics of the epochs whose reports this driver did not see (a driver killed and
        resumed misses those in between), from the trial's metric history, so that the run has every epoch."""
        reported = self._reported.get(trial_id, set())
        for row in history:
            step = offset + int(row["epoch"])
            if step not in reported:
                self.tracker.log_metrics(run_id, self._named({k: v for k, v in row.items() if k != "epoch"}), step=step)


def parent_run(tracker: Tracker, space: SearchSpace, sweep_dir: Path, resume: bool, data: dict[str, SplitFacts]) -> str:
    """The sweep's parent run: found again on a resume (its id is kept in the sweep's folder), else created
    with what every trial shares."""
    marker = sweep_dir / PARENT_FILE
    if resume and marker.exists():
        run_id = marker.read_text().strip()
        tracker.client.update_run(run_id, status="RUNNING")  # ended KILLED or FAILED when it was stopped
        return run_id
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
    tracker.log_params(run_id, shared_params(space))
    tracker.log_dataset(run_id, data["train_minus_val"], "training")
    tracker.log_dataset(run_id, data["val"], "validation")
    tracker.log_artifact(run_id, space.path)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return run_id


def tell_the_story(
    tracker: Tracker,
    space: SearchSpace,
    parent: str,
    winner: Candidate,
    winner_run: str | None,
    table: pd.DataFrame,
    test_metrics: dict[str, float],
    test_split: SplitFacts,
    config: dict[str, Any],
    cost: list[str],
) -> None:
    """Names, tags and the parent's description that make the UI's runs table read as the sweep went
    (above): the parent with its test figure and the trials table, the winner starred with every setting of
    the model certified on test (`config`, its checkpoint's: a population member's schedule included), and
    what the sweep cost (`cost`: the ledger's lines)."""
    test = test_metrics.get(space.objective, math.nan)
    tracker.log_dataset(parent, test_split, "evaluation")
    tracker.rename(parent, parent_name(space, test))
    link = f"#/experiments/{tracker.experiment_id}/runs/{winner_run}" if winner_run else ""
    tracker.set_tags(
        parent,
        {
            "mlflow.note.content": sweep_note(space, table, winner.point, link, test_metrics, cost),
            **({"best_run": winner_run} if winner_run else {}),
        },
    )
    if winner_run:  # the run a reader opens: every setting of it, not only what the trials varied
        tracker.log_params(winner_run, config)
        tracker.set_tags(winner_run, {"catrs.winner": "true"})
        tracker.rename(winner_run, winner_name(winner.point, space.objective, winner.val(space.objective), test))
        tracker.log_dataset(winner_run, test_split, "evaluation")


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
