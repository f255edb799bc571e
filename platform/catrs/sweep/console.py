"""What a sweep shows on the console: one progress bar while it runs, then the summary of its outcome.

Tune's own reporter and Optuna's INFO lines are off (`catrs.distributed.tune.quiet_tune`); a catrs user acts
on the trials table, the choice, its test report and the commands that take the sweep further.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from catrs.data import corrupted_variant
from catrs.errors import UserError
from catrs.metrics import DEFAULT_RADII
from catrs.model_registry import Registration
from catrs.report import build_report, format_report
from catrs.sweep.ledger import Ledger
from catrs.sweep.population import SCHEDULE_FILES
from catrs.sweep.report import SweepReport, format_sweep_report
from catrs.sweep.selection import VAL_PREFIX
from catrs.sweep.space import SearchSpace
from catrs.sweep.story import nearest_logged_radius


class SweepProgress:
    """The sweep's one progress display on the driver (a `TrialObserver`): trials ended out of the planned
    number, with the best proxy so far."""

    def __init__(self, total: int, metric: str) -> None:
        self.total, self.metric, self.best = total, metric, -math.inf
        self._bar: tqdm | None = None

    def __getstate__(self) -> dict[str, Any]:  # the Tune glue pickles its observers; a bar is not data
        return {**self.__dict__, "_bar": None}

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc="trials", unit="trial", file=sys.stderr)
        return self._bar

    def started(self, trial_id: str, point: dict[str, Any]) -> None:
        self.bar.refresh()  # from the first trial's start, not its first result

    def reported(self, trial_id: str, point: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.metric in metrics and metrics[self.metric] > self.best:
            self.best = metrics[self.metric]
            self.bar.set_postfix_str(f"best {self.metric} {self.best:.4f}")

    def completed(self, trial_id: str, point: dict[str, Any], last: dict[str, Any], checkpoint: Any) -> None:
        self.bar.update(1)

    def failed(self, trial_id: str, point: dict[str, Any]) -> None:
        self.bar.update(1)

    def exploited(self, trial_id: str, copied_id: str, epoch: int, *settings: dict[str, Any]) -> None:
        pass  # the bar counts members that end

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


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
    registration: Registration | None = None
    experiment_id: str | None = None
    ledger: Ledger | None = None  # what it spent


def format_outcome(
    outcome: SweepOutcome, space: SearchSpace, tracking_uri: str | None = None, data_root: Path | None = None
) -> str:
    """The summary a sweep prints: every trial with its last proxy on val, the shortlist's validation figure,
    the winner (*) and its figure on test, the winner's test report, the trade-off report, the next commands."""
    refit = " (re-trained on the whole training split)" if space.selection.refit else ""
    registered = outcome.registration
    model = (
        f"; registered as {space.model_name} version {registered.version}, @{registered.alias}: {registered.reason}"
        if registered
        else ""
    )
    lines = [
        f"sweep {space.name}: {len(outcome.trials)} trials; chosen on val by {VAL_PREFIX}"
        f"{space.objective} among the top {space.selection.top_k} by the proxy ({space.metric}); test read "
        f"once, for the choice",
        outcome.trials.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""),
        f"\nchosen: trial {outcome.best_trial} {outcome.best_config}{refit}{model}",
        *schedule_lines(outcome.best_checkpoint.parent),
        format_report(build_report(outcome.final_results, DEFAULT_RADII), linf=False),
        *(outcome.ledger.lines() if outcome.ledger else []),
    ]
    if outcome.trade_off is not None:
        lines.append(format_sweep_report(outcome.trade_off))
    return "\n".join(lines + ["", next_commands(outcome, space, tracking_uri, data_root)])


def schedule_lines(folder: Path) -> list[str]:
    """A population's choice: its settings per epoch and the command that trains it again (none otherwise)."""
    table, replay = folder / SCHEDULE_FILES[0], folder / SCHEDULE_FILES[2]
    if not table.exists():
        return []
    return [
        f"its schedule ({table}; trained again by OMP_NUM_THREADS=1 catrs train --config "
        f"{shlex.quote(str(replay))} --out DIR):",
        pd.read_csv(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
    ]


def next_commands(
    outcome: SweepOutcome, space: SearchSpace, tracking_uri: str | None = None, data_root: Path | None = None
) -> str:
    """The commands that take this sweep to the paper's Table 1, Table 3 and Figure 2(c), with the sweep's own
    tracking URI and data root where it was given them."""
    final = space.final
    store = f" --tracking-uri {shlex.quote(tracking_uri)}" if tracking_uri else ""
    lines = [
        "the paper's tables for this sweep:",
        f"  Table 1:      catrs report {space.method}={outcome.final_results} LABEL=OTHER_RESULTS… --markdown "
        f"--plot curves.png",
        f"  Figure 2(c):  catrs report --sweep {outcome.parent_run_id} "
        f"--radius {nearest_logged_radius(space.sigma)}{store}",
    ]
    try:
        corrupted_variant(space.dataset)
    except UserError:
        return "\n".join(lines)
    # The paper certifies 100 images per (corruption, severity) of CIFAR-10-C's 10,000; digits has 360.
    skip = 10 if space.dataset == "digits" else 100
    workers = f" --workers {final.workers}" if final.workers > 1 else ""
    adaptive = f" --adaptive --tolerance {final.tolerance:g}" if final.adaptive else ""
    root = f" --data-root {shlex.quote(str(data_root))}" if data_root else ""
    lines.insert(
        2,
        f"  Table 3:      catrs certify --checkpoint {outcome.best_checkpoint} "
        f"--dataset {space.dataset} --sigma {space.sigma} --corruptions --skip {skip} --n0 {final.n0} "
        f"--n {final.n}{adaptive} --alpha {final.alpha} --batch {final.batch}{workers}{root}{store} "
        f"--out {outcome.path / 'corruptions.parquet'}",
    )
    return "\n".join(lines)
