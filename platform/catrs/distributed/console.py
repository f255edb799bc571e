"""What a sweep shows on the console: one progress bar while it runs, then the summary of its outcome.

Tune's own reporter and Optuna's INFO lines are off (`quiet_tune`); a catrs user acts on the trials table,
the choice, its test report and the commands that take the sweep further.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray.tune
from tqdm import tqdm

from catrs.data import corrupted_variant
from catrs.distributed.selection import VAL_PREFIX
from catrs.errors import UserError
from catrs.metrics import DEFAULT_RADII
from catrs.report import build_report, format_report
from catrs.search_space import SearchSpace
from catrs.sweep_report import SweepReport, format_sweep_report
from catrs.sweep_story import nearest_logged_radius


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

    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any
    ) -> None:
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


def quiet_tune() -> None:
    """Tune's console output off (its legacy reporter honours `verbose=0`, the new one does not; neither the
    results folder nor the TensorBoard hint is something a catrs user acts on), and Optuna's INFO lines."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


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


def format_outcome(
    outcome: SweepOutcome, space: SearchSpace, tracking_uri: str | None = None, data_root: Path | None = None
) -> str:
    """The summary a sweep prints: every trial with its last proxy on val, the shortlist's validation figure,
    the winner (*) and its figure on test, the winner's test report, the trade-off report, the next commands."""
    refit = " (re-trained on the whole training split)" if space.selection.refit else ""
    model = f", registered as {space.name}@champion (version {outcome.model_version})" if outcome.model_version else ""
    lines = [
        f"sweep {space.name}: {len(outcome.trials)} trials; chosen on val by {VAL_PREFIX}"
        f"{space.objective} among the top {space.selection.top_k} by the proxy ({space.metric}); test read "
        f"once, for the choice",
        outcome.trials.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""),
        f"\nchosen: trial {outcome.best_trial} {outcome.best_config}{refit}{model}",
        format_report(build_report(outcome.final_results, DEFAULT_RADII), linf=False),
    ]
    if outcome.trade_off is not None:
        lines.append(format_sweep_report(outcome.trade_off))
    return "\n".join(lines + ["", next_commands(outcome, space, tracking_uri, data_root)])


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
    root = f" --data-root {shlex.quote(str(data_root))}" if data_root else ""
    lines.insert(
        2,
        f"  Table 3:      catrs certify --checkpoint {outcome.best_checkpoint} "
        f"--dataset {space.dataset} --sigma {space.sigma} --corruptions --skip {skip} --n0 {final.n0} "
        f"--n {final.n} --alpha {final.alpha} --batch {final.batch}{workers}{root}{store} "
        f"--out {outcome.path / 'corruptions.parquet'}",
    )
    return "\n".join(lines)
