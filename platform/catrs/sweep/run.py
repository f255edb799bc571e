"""A sweep from start to end: `catrs tune NAME` (a shipped space) or `catrs tune FILE.yaml`.

The soft labels the trials share (CAT-RS: one teacher per σ0 the space allows, trained on
`train_minus_val` too) are made first, then the trials run on Ray Tune with Optuna (TPE) and ASHA
(`catrs.distributed.tune`), each reporting the proxy on val (`catrs.sweep.proxy`). After the last trial the
winner is chosen on val (`catrs.sweep.selection`: the top-k trials trained to their end, certified on val
with the selection protocol), and only then is the test split read: the winner (re-trained on the whole
training split if the file asks) is certified on it with the final protocol, and registered in MLflow's Model
Registry. The driver and every trial seal the test split until then
(`catrs.data.sealed`), so nothing that chooses can read it. MLflow hears the story as it happens
(`catrs.sweep.story`), the terminal sees a progress bar and the outcome (`catrs.sweep.console`), and the
ledger counts what each phase spent (`catrs.sweep.ledger`). The choice becomes a new version of the space's
registered model, `@champion` only if it beats the current one on val (`catrs.model_registry`).

`--resume` continues a killed sweep (unfinished trials from their last checkpoint, then the rest of the
samples), re-using its MLflow parent and child runs instead of creating new ones.
"""

from __future__ import annotations

import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from catrs.certify import CertifyRequest, run_certification
from catrs.context import RunContext
from catrs.data import SplitFacts, sealed, split_facts
from catrs.distributed.chunks import certify_distributed, facts_on_a_worker
from catrs.distributed.runtime import capacity, connect
from catrs.distributed.train import cluster_producer, refuse_a_sweep_beyond_reach, train_on_a_worker
from catrs.distributed.tune import SEALED, TrialsPlan, run_trials
from catrs.errors import JobFailed, UserError
from catrs.interrupts import forget_saved, note_saved
from catrs.model_registry import Standing, register_checkpoint
from catrs.ownership import claim
from catrs.results import read_results
from catrs.storage import Stored, stored
from catrs.sweep import selection
from catrs.sweep.console import SweepOutcome, SweepProgress
from catrs.sweep.ledger import Ledger
from catrs.sweep.population import draw_population, population_study, record_population, write_schedule
from catrs.sweep.proxy import evaluation_metrics
from catrs.sweep.space import SearchSpace
from catrs.sweep.story import (
    PARENT_FILE,
    TrialRecords,
    close_orphans,
    parent_run,
    tell_the_story,
    trade_off_report,
)
from catrs.sweep.trial import TrialObserver, TrialResult
from catrs.teacher import Producer
from catrs.tracking import Tracker, system_metrics
from catrs.train import RunFolder, RunSpec, TrainConfig, soft_labels_for
from catrs.vote_store import SoftLabels

BEST_DIR = "best"  # the best trial's checkpoint, beside the sweep's final results


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep: how many trials (None: the file's budget), whether to finish a killed one, where
    Tune keeps the trials (a directory or a cloud URI; default `local_dir`), where the sweep's own files go on
    the driver (`local_dir/NAME`: the MLflow parent id, the candidates' validation rows, the winner's
    checkpoint and test results), and the command that finishes it if it is stopped (None: none does)."""

    num_samples: int | None = None
    resume: bool = False
    storage_path: str | None = None
    local_dir: Path = Path("runs") / "sweeps"
    resume_command: str | None = None


def run_sweep(space: SearchSpace, options: SweepOptions, context: RunContext) -> SweepOutcome:
    """Runs (or with `options.resume`, finishes) the sweep of `space`; chooses on val, certifies the choice on
    test, registers it; logs all to MLflow. The sweep's folder is this process's alone while it runs; a sweep
    stopped by a signal or an error ends its MLflow runs KILLED or FAILED, and `--resume` finishes it."""
    space = replace(space, budget=replace(space.budget, num_samples=space.trials(options.num_samples)))
    # A trial (or the certifying pool) the cluster can never hold would wait for ever: refused before anything.
    refuse_a_sweep_beyond_reach(space.resources.plan(), space.final.workers, space.path)
    sweep_dir = options.local_dir.resolve() / space.name
    storage = options.storage_path or str(options.local_dir)
    plan = TrialsPlan(space, storage if "://" in storage else str(Path(storage).resolve()), options.resume)
    with claim(stored(str(sweep_dir)), "sweep"):
        started = (sweep_dir / PARENT_FILE).exists()
        if plan.resume and not started and not plan.can_resume():
            raise UserError(f"nothing to resume at {plan.experiment}: run without --resume to start the sweep")
        if not plan.resume and started:
            raise UserError(
                f"sweep {space.name!r} already exists in {sweep_dir.parent}: pass --resume to finish it, or "
                f"change its name: in {space.path}"
            )
        # A sweep stopped before Tune saved its first state has no trials to resume: they start anew.
        plan = replace(plan, resume=plan.resume and plan.can_resume())
        if space.budget.population and not plan.resume:
            plan = replace(plan, initial=tuple(draw_population(population_study(space, sweep_dir), space)))
        tracker = Tracker(context.tracking_uri, spool=sweep_dir / "mlflow-pending")  # unreachable: fails first
        connect()
        data = split_facts_of(space.dataset, ("train_minus_val", "val"), context)
        parent = parent_run(tracker, space, sweep_dir, options.resume, data)
        try:
            return _sweep(plan, (sweep_dir, parent, tracker), data, options, context)
        except BaseException as error:
            tracker.end_abruptly(parent, error)
            close_orphans(tracker, parent, set())
            tracker.close()
            raise


def _sweep(
    plan: TrialsPlan,
    where: tuple[Path, str, Tracker],
    data: dict[str, SplitFacts],
    options: SweepOptions,
    context: RunContext,
) -> SweepOutcome:
    """The sweep of `plan` under its parent run (`where`: the sweep's folder, the parent run, its tracker);
    `data`: the facts of the splits the trials use."""
    space, (sweep_dir, parent, tracker) = plan.space, where
    resume = options.resume_command or "`catrs demo` starts a new sweep each time"
    note_saved(str(sweep_dir), f"the sweep's trials so far, in {plan.experiment}", resume)
    with system_metrics(tracker, parent):  # the driver's machine: CPU and memory while it sweeps
        records = TrialRecords(tracker.uri, parent, space, data, sweep_dir / "mlflow-pending")
        ledger = Ledger(space, data["train_minus_val"].size)
        with sealed(*SEALED):
            progress = SweepProgress(space.budget.num_samples, space.metric)
            observers: list[TrialObserver] = [records, ledger, progress] if context.progress else [records, ledger]
            with ledger.phase("teachers"):
                soft_labels = _shared_soft_labels(space, context, ledger.counting(cluster_producer()))
            with ledger.phase("trials"):
                results = run_trials(plan, soft_labels, context, observers)
            progress.close()
            if space.budget.population:
                record_population(population_study(space, sweep_dir), results, space)
            table = trials_table(results, space)
            shortlisted = selection.shortlist(candidates(results, space), space.selection.top_k)
            if not shortlisted:
                raise JobFailed(
                    f"no trial of {space.name} was trained to its last epoch; see the trial logs in {plan.experiment}"
                )
            with ledger.phase("selection"):
                for candidate in shortlisted:
                    _validate(candidate, space, sweep_dir, data["val"].size, context, ledger)
                    records.log_to_child(candidate.trial_id, candidate.val_metrics, selection.VAL_PREFIX)
            winner = selection.choose(shortlisted, space.objective)
        # The choice is made: from here on the test split may be read, once.
        with ledger.phase("test"):
            best = _winner_checkpoint(space, winner, sweep_dir, context, ledger)
            if space.budget.population:  # the choice's schedule and its replay file beside its checkpoint
                write_schedule(RunFolder(best.parent), space.budget.move, best.parent)
            final = sweep_dir / "final.parquet"
            request = selection.final_request(space, best, final)
            _certify(request, space.final.workers, context)
            test_rows = read_results(final)
            ledger.certified("test", test_rows, request.settings.protocol, request.mode)
        test_metrics = tracker.log_results(parent, test_rows, final, prefix=selection.TEST_PREFIX)
        tracker.log_metrics(parent, ledger.metrics())
        records.log_to_child(
            winner.trial_id, {selection.TEST_PREFIX + k: v for k, v in test_metrics.items()}, selection.TEST_PREFIX
        )
        tracker.log_metrics(parent, winner.val_metrics)
        tracker.log_params(parent, {f"best.{k}": v for k, v in winner.point.items()})
        tracker.set_tags(parent, {"best_trial": winner.trial_id, "best_checkpoint": str(best)})
        table = _with_selection(table, shortlisted, winner, space, test_metrics)
        with tempfile.TemporaryDirectory() as folder:
            summary = Path(folder) / "trials.csv"
            table.to_csv(summary, index=False)
            tracker.log_artifact(parent, summary)
        winner_run = records.child(winner.trial_id)
        # The model goes on the run it came from: the winning trial's, or the parent's when it was re-trained.
        model_run = parent if space.selection.refit or winner_run is None else winner_run
        registration = register_checkpoint(
            tracker, model_run, space.model_name, best, data["val"].example, _standing(space, winner, data["val"])
        )
        test_split = split_facts_of(space.dataset, ("test",), context)["test"]
        config = RunFolder(best.parent).trained_config() or {}
        tell_the_story(
            tracker, space, parent, winner, winner_run, table, test_metrics, test_split, config, ledger.lines()
        )
        close_orphans(tracker, parent, {str(t) for t in table["trial"]})
        report = trade_off_report(tracker, parent, space)
    tracker.end(parent, "FINISHED")
    tracker.close()
    records.tracker.close()
    forget_saved(str(sweep_dir))
    return SweepOutcome(
        sweep_dir,
        parent,
        table,
        dict(winner.point),
        winner.trial_id,
        best,
        final,
        report,
        registration,
        tracker.experiment_id,
        ledger,
    )


def _standing(space: SearchSpace, winner: selection.Candidate, val: SplitFacts) -> Standing:
    """The choice's figure on val and the protocol behind it: what decides whether it becomes champion."""
    chosen = space.selection
    protocol = (
        f"{space.dataset} val {val.digest} sigma={space.sigma:g} n0={chosen.n0} n={chosen.n} "
        f"alpha={chosen.alpha:g} images={chosen.images or val.size}"
        + (f" adaptive tolerance={chosen.tolerance:g}" if chosen.adaptive else "")
    )
    metric = selection.VAL_PREFIX + space.objective
    return Standing(metric, winner.val(space.objective), protocol, space.name)


def _shared_soft_labels(space: SearchSpace, context: RunContext, producer: Producer) -> dict[str, SoftLabels]:
    """The soft-label tables the trials share, by cache key: one per teacher the space allows, made by
    `producer` (or read from the cache) all at once — each teacher is a job of its own on the cluster, so
    their start-up and their votes overlap instead of adding up."""
    specs = [space.resolve(point) for point in space.teacher_points()]
    with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
        tables = list(pool.map(lambda spec: soft_labels_for(spec, context, producer), specs))
    return {
        labels.key(): table
        for spec, table in zip(specs, tables, strict=True)
        if (labels := spec.soft_labels()) is not None and table is not None
    }


def _status(result: TrialResult, epochs: int) -> str:
    if result.error:
        return "error"
    where = result.stopped_at(epochs)
    return f"stopped at {where}" if where else "done"


def trials_table(results: list[TrialResult], space: SearchSpace) -> pd.DataFrame:
    """A row per trial: its searched values, how far it trained, and its last proxy figure."""
    rows = [
        {
            "trial": result.trial_id,
            **result.point,
            "epochs": result.metrics.get("epoch"),
            "status": _status(result, space.epochs),
            space.metric: result.metrics.get(space.metric, math.nan),
        }
        for result in results
    ]
    return pd.DataFrame(rows).sort_values(space.metric, ascending=False, na_position="last")


def candidates(results: list[TrialResult], space: SearchSpace) -> list[selection.Candidate]:
    """The trials trained to their last epoch, with a checkpoint and a proxy figure."""
    return [
        selection.Candidate(
            result.trial_id, result.point, float(result.metrics.get(space.metric, math.nan)), result.checkpoint
        )
        for result in results
        if _status(result, space.epochs) == "done" and result.checkpoint is not None
    ]


def split_facts_of(dataset: str, splits: tuple[str, ...], context: RunContext) -> dict[str, SplitFacts]:
    """The facts the driver records of splits: read by a worker where the cluster has (or can get) GPUs, whose
    nodes hold the data, rather than by the driver on the head; here, on a machine of its own."""
    if capacity().accelerated:
        return facts_on_a_worker(dataset, splits, context)
    return {split: split_facts(dataset, split, context.data_root, context.download) for split in splits}


def _certify(request: CertifyRequest, workers: int, context: RunContext) -> Stored:
    """The request on `workers` Ray workers pulling chunks; in this process for one, unless the cluster has (or
    can get) GPUs: the driver on the head samples nothing."""
    if workers > 1 or capacity().accelerated:
        return certify_distributed(request, context, workers)
    return stored(run_certification(request, context))


def _validate(
    candidate: selection.Candidate,
    space: SearchSpace,
    folder: Path,
    val_size: int,
    context: RunContext,
    ledger: Ledger,
) -> None:
    """Certifies the candidate on val with the selection protocol; its figures go to `candidate.val_metrics`."""
    local = folder / "trials" / candidate.trial_id
    candidate.checkpoint.to_directory(str(local))
    out = folder / "selection" / f"{candidate.trial_id}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    request = selection.validation_request(space, RunFolder(local).checkpoint, out, val_size)
    frame = read_results(_certify(request, space.final.workers, context))
    ledger.certified("selection", frame, request.settings.protocol, request.mode)
    candidate.val_metrics = evaluation_metrics(frame, space.objective, selection.VAL_PREFIX)


def _winner_checkpoint(
    space: SearchSpace, winner: selection.Candidate, sweep_dir: Path, context: RunContext, ledger: Ledger
) -> Path:
    """The checkpoint the sweep certifies on test: the winning trial's, or its setting re-trained on all of the
    training split where the trials trained (`selection.refit`); kept in `SWEEP/best/`."""
    best_dir = sweep_dir / BEST_DIR
    if space.selection.refit:
        ledger.refit = True
        return train_on_a_worker(_refit_run(space, winner, sweep_dir), best_dir, space.resources.plan(), context)
    winner.checkpoint.to_directory(str(best_dir))
    return RunFolder(best_dir).checkpoint


def _refit_run(space: SearchSpace, winner: selection.Candidate, sweep_dir: Path) -> RunSpec:
    """The winner trained again on the whole training split: its point, or a population member's schedule
    (read from the checkpoint `_validate` fetched)."""
    if not space.budget.population:
        return space.resolve(winner.point, train_split="train")
    config = RunFolder(sweep_dir / "trials" / winner.trial_id).trained_config() or {}
    schedule = replace(TrainConfig(**config), train_split="train")
    return schedule.resolve(teacher_schedule=space.settings(space.first_point(), train_split="train"))


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
