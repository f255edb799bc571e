"""Summaries of certification results: ACR, certified accuracy at radii, the curve, abstentions, ℓ∞ view.

Works on any frame with the research columns (`catrs.results.read_results` reads both the research TSV and
catrs's Parquet). Conventions of the literature (docs/methods.md, "ACR and certified accuracy"):

- ACR is the mean over *all* rows of radius·correct: abstentions and wrong predictions count 0.
- Approximate certified accuracy at r is the fraction of rows that are correct with radius ≥ r.
- An ℓ2 radius r certifies the ℓ∞ ball of radius r/√d, d the input dimension.

`catrs report PATH` prints these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

ABSTAIN = -1
DEFAULT_RADII = tuple(0.25 * k for k in range(11))  # 0.00 … 2.50, the columns of the paper's Table 1


def _correct_radii(frame: pd.DataFrame) -> np.ndarray:
    """Each row's radius where it is certified correctly, else 0."""
    return np.where(frame["correct"].to_numpy() == 1, frame["radius"].to_numpy(dtype=float), 0.0)


def average_certified_radius(frame: pd.DataFrame) -> float:
    return float(_correct_radii(frame).mean()) if len(frame) else 0.0


def certified_accuracy(frame: pd.DataFrame, radii: Iterable[float]) -> dict[float, float]:
    """{r: fraction of rows correct with radius ≥ r} for each r."""
    if not len(frame):
        return {float(r): 0.0 for r in radii}
    correct = frame["correct"].to_numpy() == 1
    radius = frame["radius"].to_numpy(dtype=float)
    return {float(r): float(np.mean(correct & (radius >= r))) for r in radii}


def certified_accuracy_curve(
    frame: pd.DataFrame, max_radius: float | None = None, points: int = 201
) -> tuple[np.ndarray, np.ndarray]:
    """(radii, certified accuracy) on an even grid from 0 to `max_radius` (default: the largest radius)."""
    top = max_radius if max_radius is not None else float(frame["radius"].max() if len(frame) else 0.0)
    radii = np.linspace(0.0, max(top, 1e-12), points)
    accuracy = certified_accuracy(frame, radii)
    return radii, np.array(list(accuracy.values()))


def abstain_rate(frame: pd.DataFrame) -> float:
    return float(np.mean(frame["predict"].to_numpy() == ABSTAIN)) if len(frame) else 0.0


def clean_accuracy(frame: pd.DataFrame) -> float:
    """The smoothed classifier's accuracy (certified at radius ≥ 0, i.e. not abstained and correct)."""
    return float(np.mean(frame["correct"].to_numpy() == 1)) if len(frame) else 0.0


def linf_radius(l2_radius: float | np.ndarray, input_dim: int) -> float | np.ndarray:
    """The ℓ∞ radius certified by an ℓ2 radius in d = `input_dim` dimensions: r/√d."""
    return l2_radius / math.sqrt(input_dim)


def summarize(frame: pd.DataFrame, radii: Sequence[float] = DEFAULT_RADII) -> dict[str, Any]:
    """count, acr, certified_accuracy {r: fraction}, abstain_rate, clean_accuracy, and (when certified) time."""
    summary: dict[str, Any] = {
        "count": int(len(frame)),
        "acr": average_certified_radius(frame) if "radius" in frame.columns else None,
        "certified_accuracy": certified_accuracy(frame, radii) if "radius" in frame.columns else {},
        "abstain_rate": abstain_rate(frame),
        "clean_accuracy": clean_accuracy(frame),
    }
    if "time" in frame.columns and len(frame):
        summary["mean_time_s"] = float(frame["time"].mean())
    return summary


def certification_metrics(frame: pd.DataFrame, radii: Sequence[float] = DEFAULT_RADII) -> dict[str, float]:
    """Flat metric names: `acr`, `abstain_rate`, `clean_accuracy`, `certified_accuracy_R` for each radius."""
    summary = summarize(frame, radii)
    metrics = {
        "acr": summary["acr"],
        "abstain_rate": summary["abstain_rate"],
        "clean_accuracy": summary["clean_accuracy"],
    }
    metrics.update({f"certified_accuracy_{r:g}": acc for r, acc in summary["certified_accuracy"].items()})
    return metrics


def objective_value(frame: pd.DataFrame, objective: str) -> float:
    """`acr`; `certified_accuracy_R`; or `auc_R`, the area under the certified-accuracy curve on [0, R]
    (= mean of min(radius, R)·correct; it equals the ACR once R passes every radius)."""
    if objective == "acr":
        return average_certified_radius(frame)
    kind, _, radius = objective.rpartition("_")
    if kind == "certified_accuracy":
        return certified_accuracy(frame, [float(radius)])[float(radius)]
    if kind == "auc":
        clipped = np.minimum(frame["radius"].to_numpy(dtype=float), float(radius))
        return float(np.mean(np.where(frame["correct"].to_numpy() == 1, clipped, 0.0))) if len(frame) else 0.0
    raise ValueError(f"unknown objective {objective!r}")


def corruption_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per corruption, certified accuracy at r = 0 and ACR, each averaged over severities (the paper's Table 3),
    with a last row `mean` holding mAcc and mACR. Corruptions keep the order of the frame (result files are
    sorted by index, i.e. the data set's order)."""
    # pandas-stubs 3.1 lacks `include_groups`, a keyword of DataFrameGroupBy.apply since pandas 2.2 (still in 3.x).
    per_severity = frame.groupby(["corruption", "severity"], sort=False).apply(  # type: ignore[call-overload]
        lambda g: pd.Series({"accuracy": certified_accuracy(g, [0.0])[0.0], "acr": average_certified_radius(g)}),
        include_groups=False,
    )
    table = per_severity.groupby("corruption", sort=False).mean()
    table.loc["mean"] = table.mean()
    return table
