"""What a sweep spent, and what it expects to spend: the cost ledger.

A sweep's cost is its training (trials, teachers, a refit) and its sampling (soft-label votes, the proxy,
the selection, the test certification). The ledger counts both as the sweep runs — training in epochs and
optimizer steps per fidelity and in training-run equivalents (one equivalent: one run of the file's schedule
on every step), sampling in noisy forward passes per phase — and the wall and worker seconds of each phase,
with the time the driver only waits. It goes to the parent run's metrics under `cost/` and to the console;
`catrs tune --dry-run` prints what the file's budget should cost (`expected_cost`).

It counts what this driver saw: a sweep resumed after its driver was killed counts the reports of the trials
it finished, not those the killed driver had received.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd

from catrs.results import fixed_n_samples
from catrs.sampling import Mode, SamplingProtocol
from catrs.storage import Stored
from catrs.sweep.space import SearchSpace
from catrs.teacher import Producer, SoftLabelSpec, VoteJob
from catrs.train import EpochShuffle


def samples_spent(frame: pd.DataFrame, protocol: SamplingProtocol, mode: Mode) -> int:
    """The noisy forward passes behind `frame`'s rows: their `samples`, or for rows written before rows recorded
    it, what fixed n cost them (`fixed_n_samples`)."""
    if "samples" in frame.columns:
        return int(frame["samples"].sum())
    return int(fixed_n_samples(frame, mode, protocol.n0, protocol.n).sum())


def fidelity_name(fraction: float) -> str:
    return "full" if fraction >= 1 else f"fraction_{Fraction(fraction).limit_denominator(1000)}".replace("/", "_")


@dataclass
class Ledger:
    """The sweep's costs as they happen; a `TrialObserver` (the trials' reports) and the sweep's phase clock."""

    space: SearchSpace
    train_images: int  # the split trials train on
    epochs: dict[float, int] = field(default_factory=lambda: defaultdict(int))  # epochs trained per fraction
    steps: int = 0
    trial_worker_seconds: float = 0.0
    teacher_runs: int = 0
    samples: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per phase
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # wall, per phase
    refit: bool = False
    _batches: dict[str, int] = field(default_factory=dict)  # per trial: its (searched or fixed) batch size
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks' observers; a lock is not data
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    # --- the trials' reports (TrialObserver)
    def started(self, trial_id: str, point: dict[str, Any]) -> None:
        self._batch(trial_id, point)

    def reported(self, trial_id: str, point: dict[str, Any], metrics: dict[str, float]) -> None:
        fraction = float(metrics.get("fraction", 1.0))
        self.epochs[fraction] += 1
        drawn = len(EpochShuffle(self.train_images, 0, fraction))  # the images an epoch at `fraction` draws
        self.steps += math.ceil(drawn / self._batch(trial_id, point))
        self.trial_worker_seconds += float(metrics.get("seconds", 0.0)) * self.space.resources.workers
        if math.isfinite(samples := float(metrics.get("val_samples", math.nan))):
            self.samples["proxy"] += int(samples)

    def _batch(self, trial_id: str, point: dict[str, Any]) -> int:
        """The trial's batch size (searched or fixed), resolved once per trial (a resumed driver sees reports
        of trials whose start it did not see)."""
        if trial_id not in self._batches:
            self._batches[trial_id] = int(self.space.resolve(point).config.batch_size or 1)
        return self._batches[trial_id]

    def completed(self, trial_id: str, point: dict[str, Any], last: dict[str, Any], checkpoint: Any) -> None:
        pass

    def failed(self, trial_id: str, point: dict[str, Any]) -> None:
        pass

    def exploited(self, trial_id: str, copied_id: str, epoch: int, *settings: dict[str, Any]) -> None:
        pass  # a member's epochs after a copy count as any others

    # --- the sweep's own phases
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began

    def certified(self, phase: str, frame: pd.DataFrame, protocol: SamplingProtocol, mode: Mode) -> None:
        self.samples[phase] += samples_spent(frame, protocol, mode)

    def counting(self, producer: Producer) -> Producer:
        """`producer`, counting the teachers it trains and the votes it counts (a cache hit costs nothing)."""

        def train_teacher(spec: SoftLabelSpec, folder: Stored, context: Any) -> Path:
            with self._lock:  # (teachers are made side by side)
                self.teacher_runs += 1
            return producer.train_teacher(spec, folder, context)

        def vote(job: VoteJob, context: Any) -> tuple[int, int]:
            size, classes = producer.vote(job, context)
            with self._lock:
                self.samples["votes"] += size * job.votes
            return size, classes

        return replace(producer, train_teacher=train_teacher, vote=vote)

    # --- what it adds up to
    def training_run_equivalents(self) -> float:
        """Epochs trained, each weighted by its fraction of the steps, over the schedule's epochs (the teachers
        and a refit are counted apart)."""
        return sum(fraction * epochs for fraction, epochs in self.epochs.items()) / self.space.epochs

    def metrics(self) -> dict[str, float]:
        """The ledger as the parent run's `cost/…` metrics."""
        metrics: dict[str, float] = {
            "cost/training_run_equivalents": self.training_run_equivalents(),
            "cost/optimizer_steps": self.steps,
            "cost/teacher_runs": self.teacher_runs,
            "cost/refit_runs": int(self.refit),
            "cost/worker_seconds/trials": self.trial_worker_seconds,
            "cost/driver_wait_seconds": self.seconds["teachers"] + self.seconds["trials"],
        }
        metrics |= {f"cost/epochs/{fidelity_name(f)}": e for f, e in sorted(self.epochs.items())}
        metrics |= {f"cost/samples/{phase}": n for phase, n in self.samples.items()}
        metrics |= {f"cost/seconds/{phase}": s for phase, s in self.seconds.items()}
        return metrics

    def lines(self) -> list[str]:
        """The ledger for the console."""
        rungs = ", ".join(
            f"{e} epochs at {'every step' if f >= 1 else f'{Fraction(f).limit_denominator(1000)} of the steps'}"
            for f, e in sorted(self.epochs.items())
        )
        samples = ", ".join(f"{phase} {n:,}" for phase, n in self.samples.items())
        wall = ", ".join(f"{phase} {s:.0f} s" for phase, s in self.seconds.items())
        return [
            f"cost: {self.training_run_equivalents():.2f} training-run equivalents in trials ({rungs}; "
            f"{self.steps:,} optimizer steps), {self.teacher_runs} teacher run(s), {int(self.refit)} refit",
            f"      certification samples: {samples or 'none'}",
            f"      wall: {wall}; trial worker-seconds {self.trial_worker_seconds:.0f}",
        ]


def expected_cost(space: SearchSpace, trials: int) -> dict[str, float]:
    """What the file's budget should cost, in training-run equivalents and samples per image, were the
    scheduler to keep ⌈n/η⌉ of the n trials at each rung: synchronous halving keeps exactly that many, ASHA at
    least that many (the first trials at a rung always go on)."""
    budget, eta = space.budget, space.budget.reduction_factor
    if budget.population:  # each member trains once, reporting the proxy at every interval and the end
        equivalents, proxies = float(trials), trials * (len(budget.rungs(space.epochs)) + 1)
    elif rungs := budget.ladder():  # each rung trained from scratch at its fraction
        equivalents = sum(math.ceil(trials / eta**k) * rung.fraction for k, rung in enumerate(rungs))
        proxies = sum(math.ceil(trials / eta**k) for k in range(len(rungs)))
    elif epoch_rungs := budget.rungs(space.epochs):  # truncation: survivors train on
        marks = [0, *epoch_rungs, space.epochs]
        equivalents = sum(math.ceil(trials / eta**k) * (b - a) for k, (a, b) in enumerate(itertools.pairwise(marks)))
        equivalents /= space.epochs
        proxies = sum(math.ceil(trials / eta**k) for k in range(len(marks) - 1))
    else:
        equivalents, proxies = float(trials), trials
    selection, final = space.selection, space.final
    return {
        "training_run_equivalents": equivalents,
        "teacher_runs": len(space.teacher_points()) if space.resolve(space.first_point()).soft_labels() else 0,
        "refit_runs": int(selection.refit),
        "proxy_evaluations": proxies,
        "proxy_samples_per_image": space.proxy.n0 + space.proxy.n,
        "selection_candidates": min(selection.top_k, trials),
        "samples_per_image": final.n0 + final.n,
    }


def format_expected_cost(space: SearchSpace, trials: int) -> str:
    cost = expected_cost(space, trials)
    return (
        f"expected cost: ≈ {cost['training_run_equivalents']:.2f} training-run equivalents in trials, "
        f"{cost['teacher_runs']} teacher run(s), {cost['refit_runs']} refit; {cost['proxy_evaluations']} proxy "
        f"evaluations of {space.proxy.images or 'all'} val images at ≤ {cost['proxy_samples_per_image']:,} samples "
        f"each; selection: {cost['selection_candidates']} candidate(s) on val and the choice on test at "
        f"{'≤ ' if space.final.adaptive else ''}{cost['samples_per_image']:,} samples per image"
    )
