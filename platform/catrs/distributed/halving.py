"""Synchronous successive halving for Ray Tune: a sweep's `budget: {scheduler: halving}`.

    budget: {num_samples: 27, max_concurrent: 2, scheduler: halving, first_rung: 1, reduction_factor: 9}

Every trial trains to the first rung (epoch `first_rung`) and waits there, paused with its checkpoint and its
worker freed, until every trial of the sweep has; then the best ⌈n/η⌉ by the proxy train on to the next rung
(`first_rung · η`, …) and the others stop. ASHA (`scheduler: asha`) decides each trial as it arrives against
those that came before, so the first trials at a rung always go on and a sweep trains out more than its share
(measured on the demo: 8 and 13 of 27 at η = 9, not 3); here each rung keeps exactly ⌈n/η⌉, at the price of
waiting for the slowest trial of the rung. With one cohort there is no finished trial for TPE to learn from
before the first rung is decided, so the first rung's trials are Optuna's start-up draws.

Ray's own synchronous `HyperBandScheduler` sizes its brackets itself (it would not put every trial at the
first rung), and Tune's `max_concurrent_trials` counts paused trials as running (a cohort larger than it would
never start its last trials). So this scheduler is the only gate that starts trials: a trial Tune adds or
restores waits (paused) until `choose_trial_to_run` picks it, which keeps at most `max_running` at work.

Resuming a killed sweep rebuilds the decisions from the trials' last results, which Tune saves: a trial whose
last epoch is past a rung went on from it, one stopped at a rung was cut there, and a rung none went past is
decided again from its trials' figures, the same way.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

ENDED = (Trial.TERMINATED, Trial.ERROR)


class SynchronousHalving(FIFOScheduler):
    """Keeps the best ⌈n/η⌉ of each rung's n trials once all n have reached it (see the module docstring)."""

    def __init__(self, rungs: list[int], trials: int, reduction_factor: int, max_running: int) -> None:
        super().__init__()  # the metric and mode come from the tuner (`set_search_properties`); higher is better
        self.rungs, self.trials, self.eta, self.max_running = list(rungs), trials, reduction_factor, max_running
        # Each rung's figures as reported: Tune updates a trial's last result only after asking the scheduler.
        self.figures: dict[int, dict[str, float]] = {rung: {} for rung in self.rungs}
        self.kept: dict[int, set[str]] = {}  # each decided rung: the trials that go on from it
        self.chosen: set[str] = set()  # started by this scheduler and not yet paused or ended
        self._deciding = False

    # --- Tune's calls
    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        epoch = int(result.get("epoch", 0))
        if epoch not in self.figures:
            return TrialScheduler.CONTINUE
        self.figures[epoch][trial.trial_id] = float(result[self._metric])
        self._decide(tune_controller)
        if epoch not in self.kept:
            self.chosen.discard(trial.trial_id)
            return TrialScheduler.PAUSE
        if trial.trial_id in self.kept[epoch]:
            return TrialScheduler.CONTINUE
        self.chosen.discard(trial.trial_id)
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.chosen.discard(trial.trial_id)
        self._decide(tune_controller)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.chosen.discard(trial.trial_id)  # Tune adds it again if it retries it, and it waits to be chosen
        self._decide(tune_controller)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.chosen.discard(trial.trial_id)
        self._decide(tune_controller)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """The next trial to start or resume, if fewer than `max_running` are at work. Every other trial Tune
        holds as pending is parked (paused), so that Tune does not start it on its own."""
        self._decide(tune_controller)
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING and trial.trial_id not in self.chosen:
                tune_controller._set_trial_status(trial, Trial.PAUSED)
        at_work = sum(t.status == Trial.RUNNING or t.trial_id in self.chosen for t in trials if t.status not in ENDED)
        if at_work >= self.max_running:
            return None
        ready = [t for t in trials if t.status == Trial.PAUSED and self._may_go_on(t)]
        if not ready:
            return None
        chosen = max(ready, key=lambda t: _reached(t))  # the furthest first: promoted trials finish the sweep
        self.chosen.add(chosen.trial_id)
        return chosen

    def debug_string(self) -> str:
        return f"Synchronous halving at epochs {self.rungs}, η = {self.eta}: kept {self.kept}"

    # --- the decisions
    def _may_go_on(self, trial: Trial) -> bool:
        reached = _reached(trial)
        return reached not in self.figures or trial.trial_id in self.kept.get(reached, ())

    def _figure(self, trial: Trial, rung: int) -> float | None:
        if (figure := self.figures[rung].get(trial.trial_id)) is not None:
            return figure
        last = trial.last_result or {}
        return float(last[self._metric]) if last.get("epoch") == rung and self._metric in last else None

    def _decide(self, tune_controller: Any) -> None:
        """Decides every rung whose trials have all reached it (or ended), lowest first, and stops the trials it
        cuts. Re-entrant calls (stopping a trial tells the scheduler again) return at once."""
        if self._deciding:
            return
        self._deciding = True
        try:
            trials = tune_controller.get_trials()
            members = trials if len(trials) >= self.trials else None  # the first rung: every trial of the sweep
            for rung in self.rungs:
                if members is None:
                    return
                if rung not in self.kept:
                    if (kept := self._kept_at(rung, members)) is None:
                        return
                    self.kept[rung] = kept
                    for trial in members:
                        if trial.trial_id not in kept and trial.status in (Trial.PAUSED, Trial.PENDING):
                            tune_controller.stop_trial(trial)
                members = [t for t in members if t.trial_id in self.kept[rung]]
        finally:
            self._deciding = False

    def _kept_at(self, rung: int, members: list[Trial]) -> set[str] | None:
        """Who goes on from `rung`, or None while some member can still reach it."""
        went_on = {t.trial_id for t in members if _reached(t) > rung}
        if went_on:  # decided before the driver was killed: the cut ones were stopped then
            waiting = {t.trial_id for t in members if _reached(t) == rung and t.status not in ENDED}
            return went_on | waiting
        figures: dict[str, float] = {}
        for trial in members:
            if (figure := self._figure(trial, rung)) is not None:
                figures[trial.trial_id] = figure
            elif trial.status not in ENDED:
                return None
        ranked = sorted(figures, key=lambda tid: (-figures[tid], tid))  # ties: by id, the same after a resume
        return set(ranked[: math.ceil(len(members) / self.eta)])


def _reached(trial: Trial) -> int:
    """The last epoch the trial reported (0 before its first)."""
    return int((trial.last_result or {}).get("epoch", 0) or 0)
