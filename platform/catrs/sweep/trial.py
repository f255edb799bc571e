"""What the sweep knows of a trial, whoever ran it: the interface between the sweep and Ray Tune.

`catrs.distributed.tune` runs the trials and hands the sweep what it sees of them through these types: events
while they run (`TrialObserver`: the MLflow records and the progress bar are observers) and, at the end, a
`TrialResult` per trial. Nothing here knows Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

PROXY_PREFIX = "proxy/"  # the proxy's figures in MLflow (`catrs.sweep.proxy.proxy_name`)


class TrialCheckpoint(Protocol):
    """A trial's latest checkpoint folder in the sweep's run storage (a local directory or an object store)."""

    def to_directory(self, path: str) -> str:
        """Copies the folder to the local `path`; returns it."""


@dataclass(frozen=True)
class TrialResult:
    """A trial as the sweep ends it: its searched values, the metrics of its last report, and its checkpoint."""

    trial_id: str
    point: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: TrialCheckpoint | None = None
    error: bool = False

    def stopped_at(self, epochs: int) -> str:
        """Where the scheduler stopped it ("" if it trained out)."""
        return stopped_at(self.metrics, epochs)


def share(fraction: float) -> str:
    """A budgeted rung's share of the steps as people write it: 1/9, not 0.1111."""
    return str(Fraction(fraction).limit_denominator(1000))


def stopped_at(last: Mapping[str, Any], epochs: int) -> str:
    """Where a trial whose last report is `last` stopped: "epoch E" (truncated training), "1/9 of the steps"
    (a rung of budgeted training), or "" if it trained out: every epoch, every step."""
    fraction = float(last.get("fraction", 1.0))
    if fraction < 1:
        return f"{share(fraction)} of the steps"
    epoch = int(last.get("epoch", epochs))
    return f"epoch {epoch}" if epoch < epochs else ""


class TrialObserver(Protocol):
    """Told what happens to each trial while the sweep runs (from the driver)."""

    def started(self, trial_id: str, point: dict[str, Any]) -> None: ...

    def reported(self, trial_id: str, point: dict[str, Any], metrics: dict[str, float]) -> None:
        """A report of catrs's own metrics (Tune's bookkeeping left out)."""

    def completed(
        self, trial_id: str, point: dict[str, Any], last: dict[str, Any], checkpoint: TrialCheckpoint | None
    ) -> None:
        """The trial ended: trained out, or stopped by the scheduler (`stopped_at(last, epochs)` says where)."""

    def failed(self, trial_id: str, point: dict[str, Any]) -> None: ...

    def exploited(self, trial_id: str, copied_id: str, epoch: int, *settings: dict[str, Any]) -> None:
        """A population member copied the weights of `copied_id` after `epoch` epochs; `settings`: its own
        before, those of the member it copied, and those it goes on with (`catrs.sweep.population`)."""
