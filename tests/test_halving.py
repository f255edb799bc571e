"""Synchronous halving's decisions (`catrs.distributed.halving`), driven as Tune drives a scheduler, and
rebuilt from the trials' last results as a resumed sweep does. The real sweep is in tests/test_sweep.py."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from catrs.distributed.halving import SynchronousHalving

METRIC = "val_acr"


class FakeTune:
    """The part of Tune's controller a scheduler sees: its trials, their statuses, and stopping one."""

    def __init__(self, scheduler: SynchronousHalving, trials: list) -> None:
        self.scheduler, self.trials = scheduler, trials

    def get_trials(self) -> list:
        return self.trials

    def _set_trial_status(self, trial, status: str) -> None:
        trial.status = status

    def stop_trial(self, trial) -> None:  # Tune tells the scheduler that a paused trial is removed
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)

    def start(self) -> object | None:
        """What Tune does each step: ask the scheduler which trial to run, and run it."""
        trial = self.scheduler.choose_trial_to_run(self)
        if trial is not None:
            trial.status = Trial.RUNNING
        return trial

    def report(self, trial, epoch: int, figure: float) -> str:
        trial.last_result = {"epoch": epoch, METRIC: figure}
        decision = self.scheduler.on_trial_result(self, trial, trial.last_result)
        trial.status = {TrialScheduler.PAUSE: Trial.PAUSED, TrialScheduler.STOP: Trial.TERMINATED}.get(
            decision, trial.status
        )
        return decision


def trial(trial_id: str, status: str = Trial.PENDING, **last) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last or {})


def halving(rungs: list[int], trials: int, eta: int, max_running: int) -> SynchronousHalving:
    scheduler = SynchronousHalving(rungs, trials, eta, max_running)
    scheduler.set_search_properties(METRIC, "max")
    return scheduler


def test_every_trial_waits_at_the_rung_until_all_have_reached_it_then_the_best_third_goes_on():
    scheduler = halving([1], trials=6, eta=3, max_running=2)
    trials = [trial(f"t{i}") for i in range(6)]
    tune = FakeTune(scheduler, trials)
    figures = dict(zip([t.trial_id for t in trials], [0.3, 0.9, 0.1, 0.5, 0.8, 0.2], strict=True))
    decisions = []
    while len(decisions) < 6:
        pair = [tune.start(), tune.start()]
        assert tune.start() is None  # never more than two at work
        decisions += [tune.report(t, 1, figures[t.trial_id]) for t in pair]
    assert decisions[:5] == [TrialScheduler.PAUSE] * 5  # each waits until the sixth has reached the rung
    assert decisions[5] == TrialScheduler.STOP  # the sixth (0.2) is not among the best two
    assert scheduler.kept == {1: {"t1", "t4"}}
    assert {t.trial_id for t in trials if t.status == Trial.TERMINATED} == {"t0", "t2", "t3", "t5"}
    assert {tune.start().trial_id, tune.start().trial_id} == {"t1", "t4"}  # the kept ones resume
    assert tune.start() is None


def test_a_second_rung_is_decided_among_the_first_rungs_survivors_alone():
    scheduler = halving([1, 2], trials=4, eta=2, max_running=4)
    trials = [trial(f"t{i}") for i in range(4)]
    tune = FakeTune(scheduler, trials)
    for t, figure in zip(trials, [0.1, 0.4, 0.3, 0.2], strict=True):
        tune.start()
        tune.report(t, 1, figure)
    assert scheduler.kept[1] == {"t1", "t2"}
    while tune.start() is not None:
        pass
    assert tune.report(trials[1], 2, 0.5) == TrialScheduler.PAUSE
    assert tune.report(trials[2], 2, 0.6) == TrialScheduler.CONTINUE  # the better of the two
    assert trials[1].status == Trial.TERMINATED and scheduler.kept[2] == {"t2"}


def test_a_resumed_sweep_rebuilds_a_decided_rung_from_where_its_trials_stopped():
    # Killed after the rung at epoch 1 was decided: t0 went on (its last epoch is 2), t1 was cut there, t2 was kept
    # but had not started again; Tune restores the unfinished ones as pending.
    trials = [
        trial("t0", Trial.PENDING, epoch=2, val_acr=0.7),
        trial("t1", Trial.TERMINATED, epoch=1, val_acr=0.9),  # a figure higher than the kept ones': decided anyway
        trial("t2", Trial.PENDING, epoch=1, val_acr=0.2),
    ]
    scheduler = halving([1], trials=3, eta=2, max_running=2)
    tune = FakeTune(scheduler, trials)
    started = {tune.start().trial_id, tune.start().trial_id}
    assert scheduler.kept == {1: {"t0", "t2"}} and started == {"t0", "t2"} and trials[1].status == Trial.TERMINATED


def test_a_resumed_sweep_decides_an_undecided_rung_from_the_figures_its_trials_last_reported():
    # Killed while two trials waited at the rung and one had not reached it.
    trials = [
        trial("t0", Trial.PENDING, epoch=1, val_acr=0.4),
        trial("t1", Trial.PENDING, epoch=1, val_acr=0.6),
        trial("t2", Trial.PENDING),
    ]
    scheduler = halving([1], trials=3, eta=3, max_running=1)
    tune = FakeTune(scheduler, trials)
    assert tune.start() is trials[2]  # the waiting ones are parked: only the one that has not reached the rung runs
    assert trials[0].status == trials[1].status == Trial.PAUSED
    assert tune.report(trials[2], 1, 0.5) == TrialScheduler.STOP
    assert scheduler.kept == {1: {"t1"}} and trials[0].status == Trial.TERMINATED
    assert tune.start() is trials[1]


def test_ties_at_a_rung_are_broken_the_same_way_before_and_after_a_resume():
    def decide(order: list[str]) -> set[str]:
        trials = [trial(i, Trial.PENDING, epoch=1, val_acr=0.25) for i in order]  # a constant classifier's ties
        scheduler = halving([1], trials=4, eta=2, max_running=1)
        FakeTune(scheduler, trials).start()
        return scheduler.kept[1]

    assert decide(["b", "d", "a", "c"]) == decide(["c", "a", "d", "b"]) == {"a", "b"}
