"""What the sweep knows of a trial, whoever ran it: the interface between the sweep and Ray Tune.

`catrs.distributed.tune` runs the trials and hands the sweep what it sees of them through these types: events
while they run (`TrialObserver`: the MLflow records and the progress bar are observers) and, at the end, a
`TrialResult` per trial. Nothing here knows Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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

    def reached(self) -> int:
        """The last epoch it reported."""
        return int(self.metrics.get("epoch", 0))


class TrialObserver(Protocol):
    """Told what happens to each trial while the sweep runs (from the driver)."""

    def started(self, trial_id: str, point: dict[str, Any]) -> None: ...

    def reported(self, trial_id: str, point: dict[str, Any], metrics: dict[str, float]) -> None:
        """A report of catrs's own metrics (Tune's bookkeeping left out)."""

    def completed(
        self, trial_id: str, point: dict[str, Any], last: dict[str, Any], checkpoint: TrialCheckpoint | None
    ) -> None:
        """The trial ended: trained out, or stopped by the scheduler (`last["epoch"]` says where)."""

    def failed(self, trial_id: str, point: dict[str, Any]) -> None: ...
