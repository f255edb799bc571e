"""Summaries of certification results: ACR, certified accuracy at radii, the curve, outcomes, samples, ℓ∞ view.

Works on any frame with the research columns (`catrs.results.read_results` reads both the research TSV and
catrs's Parquet). Conventions of the literature (docs/methods.md, "ACR and certified accuracy"):

- ACR is the mean over *all* rows of radius·correct: abstentions and wrong predictions count 0.
- Approximate certified accuracy at r is the fraction of rows that are correct with radius ≥ r.
- An ℓ2 radius r certifies the ℓ∞ ball of radius r/√d, d the input dimension.

ACR is not the whole story: a gain in it may come from pushing easy images further while hard ones fall to
abstentions or wrong classes. `outcome_shares` splits the rows into abstained, misclassified, and the correct
ones by their bound on p_A (the probability of the predicted class under noise, from which the radius comes).

`catrs report PATH` prints these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

ABSTAIN = -1
DEFAULT_RADII = tuple(0.25 * k for k in range(11))  # 0.00 … 2.50, the columns of the paper's Table 1
# Bins of p_A's lower bound: from 0.5 (radius 0) up, finer towards 1 where the large radii are (a bound of
# 0.9, 0.99, 0.999, 0.9999 certifies 1.28σ, 2.33σ, 3.09σ, 3.72σ).
P_LOWER_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 0.999, 0.9999, 1.0)
P_LOWER_BINS = tuple(f"{low:g}-{high:g}" for low, high in pairwise(P_LOWER_EDGES))  # LO-HI: 0.5-0.6 … 0.9999-1
P_LOWER_PREFIX = "p_lower/"  # the histogram's bins among a certification's figures (`outcome_metrics`)
# What a row records of the noisy samples it took: all of them, and an adaptive certification's split of them.
SAMPLE_COLUMNS = ("samples", "pilot_samples", "estimation_samples")


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


def misclassification_rate(frame: pd.DataFrame) -> float:
    """The fraction of rows that predict a class and not the label; in an evaluation, the rows never estimated
    (`estimated` False: the selected class was wrong) are among them."""
    if not len(frame):
        return 0.0
    return float(np.mean((frame["predict"].to_numpy() != ABSTAIN) & (frame["correct"].to_numpy() != 1)))


def clean_accuracy(frame: pd.DataFrame) -> float:
    """The smoothed classifier's accuracy (certified at radius ≥ 0, i.e. not abstained and correct)."""
    return float(np.mean(frame["correct"].to_numpy() == 1)) if len(frame) else 0.0


def linf_radius(l2_radius: float | np.ndarray, input_dim: int) -> float | np.ndarray:
    """The ℓ∞ radius certified by an ℓ2 radius in d = `input_dim` dimensions: r/√d."""
    return l2_radius / math.sqrt(input_dim)


def p_lower_bound(radius: float | np.ndarray, sigma: float) -> np.ndarray:
    """p_A's lower bound behind a certified radius: CERTIFY's radius is σ·Φ⁻¹(p_lower), so p_lower = Φ(radius/σ)."""
    return np.asarray(norm.cdf(np.asarray(radius, dtype=float) / sigma))


def p_lower_histogram(frame: pd.DataFrame, sigma: float) -> dict[str, float]:
    """{`LO-HI`: fraction of all rows that are correct with LO ≤ p_lower < HI} (the last bin holds 1 too).
    Over all rows, not the correct ones, so that the bins add up to the clean accuracy and sit beside the
    abstain and misclassification rates (`outcome_shares`)."""
    if not len(frame):
        return dict.fromkeys(P_LOWER_BINS, 0.0)
    correct = frame["correct"].to_numpy() == 1
    bounds = p_lower_bound(frame["radius"].to_numpy(dtype=float)[correct], sigma)
    counts, _ = np.histogram(bounds, bins=P_LOWER_EDGES)
    return {name: int(count) / len(frame) for name, count in zip(P_LOWER_BINS, counts, strict=True)}


def outcome_shares(frame: pd.DataFrame, sigma: float) -> dict[str, float]:
    """Every row in exactly one outcome, as fractions of all rows that add up to 1: `abstained`,
    `misclassified`, or correct with p_A's lower bound in bin `LO-HI`."""
    return {
        "abstained": abstain_rate(frame),
        "misclassified": misclassification_rate(frame),
        **p_lower_histogram(frame, sigma),
    }


def sample_means(frame: pd.DataFrame) -> dict[str, float]:
    """{`mean_COLUMN`: noisy samples per image} of each sample count the rows record (none in a research TSV):
    `mean_samples`, and for an adaptive certification `mean_pilot_samples` and `mean_estimation_samples`."""
    return {f"mean_{c}": float(frame[c].mean()) for c in SAMPLE_COLUMNS if c in frame.columns and len(frame)}


def sigma_of(frame: pd.DataFrame, provenance: dict[str, Any] | None = None) -> float | None:
    """The σ the rows were certified at: the file's provenance says it (`catrs.results.read_provenance`), or
    every row does (catrs's Parquet, also where rows differ in what may differ, such as the batch size);
    None where neither records one σ (a research TSV)."""
    if provenance and "sigma" in provenance:
        return float(provenance["sigma"])
    if "sigma" not in frame.columns:
        return None
    values = frame["sigma"].dropna().unique()
    return float(values[0]) if len(values) == 1 else None


def summarize(frame: pd.DataFrame, radii: Sequence[float] = DEFAULT_RADII) -> dict[str, Any]:
    """count, acr, certified_accuracy {r: fraction}, abstain_rate, misclassification_rate, clean_accuracy, and
    where the rows record them, the mean time and samples per image (`sample_means`)."""
    summary: dict[str, Any] = {
        "count": int(len(frame)),
        "acr": average_certified_radius(frame) if "radius" in frame.columns else None,
        "certified_accuracy": certified_accuracy(frame, radii) if "radius" in frame.columns else {},
        "abstain_rate": abstain_rate(frame),
        "misclassification_rate": misclassification_rate(frame),
        "clean_accuracy": clean_accuracy(frame),
    }
    if "time" in frame.columns and len(frame):
        summary["mean_time_s"] = float(frame["time"].mean())
    return summary | sample_means(frame)


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


def outcome_metrics(frame: pd.DataFrame, sigma: float | None) -> dict[str, float]:
    """What ACR leaves out, as flat metric names beside `certification_metrics`'s: `misclassification_rate`,
    the `sample_means`, and with σ known, the histogram of p_A's lower bound as `p_lower/LO-HI`."""
    metrics = {"misclassification_rate": misclassification_rate(frame), **sample_means(frame)}
    if sigma is not None and "radius" in frame.columns:
        metrics.update({P_LOWER_PREFIX + name: share for name, share in p_lower_histogram(frame, sigma).items()})
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
