"""The figures catrs draws: certified-accuracy curves, the paper's Table 3 and the outcomes as bars, as PNG files.

    catrs report A.parquet B.tsv --plot curves.png        (also logged to MLflow with every certification)

Matplotlib's file-only backend: no display is needed. The sweep's trade-off figures are in
`catrs.sweep.report`, drawn with `png_figure` from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from catrs.metrics import P_LOWER_BINS, average_certified_radius, certified_accuracy_curve


@contextlib.contextmanager
def png_figure(path: Path, **subplots: Any) -> Iterator[Any]:
    """The axes of `plt.subplots(**subplots)`, their figure saved to `path` as a PNG (nothing outside the axes
    cut off) and closed when the block ends. Matplotlib's file-only backend: no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(dpi=120, **subplots)
    try:
        yield axes
        figure.tight_layout()
        figure.savefig(path, bbox_inches="tight")
    finally:
        plt.close(figure)


def plot_corruption_accuracy(accuracy: pd.DataFrame, path: Path) -> Path:
    """Certified accuracy at r = 0 (%) per corruption and the mean (rows of `accuracy`), one bar per result (its
    columns, unnamed for a single result), as a PNG: the paper's Table 3 at a glance."""
    with png_figure(path, figsize=(6, 1.2 + 0.3 * len(accuracy) * len(accuracy.columns) ** 0.5)) as axes:
        # barh fills upwards, so rows and columns go in reversed, and so do the colours: the first result in C0
        accuracy.iloc[::-1, ::-1].plot.barh(
            ax=axes, width=0.8, legend=False, color=[f"C{i}" for i in reversed(range(len(accuracy.columns)))]
        )
        if len(accuracy.columns) > 1 or accuracy.columns[0]:
            handles, labels = axes.get_legend_handles_labels()
            axes.legend(handles[::-1], labels[::-1], loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        axes.set_xlabel("certified accuracy at r = 0 (%), averaged over severities")
        axes.set_ylabel("")
        axes.set_xlim(0, 100)
        axes.grid(axis="x", alpha=0.3)
    return path


def plot_certified_accuracy(frames: Mapping[str, pd.DataFrame], path: Path, title: str = "") -> Path:
    """Certified accuracy against ℓ2 radius, one curve per labelled frame, as a PNG; a single curve is titled
    with its ACR."""
    top = max(float(f["radius"].max()) for f in frames.values() if len(f)) if frames else 1.0
    if len(frames) == 1:
        title = f"{title} ACR {average_certified_radius(next(iter(frames.values()))):.3f}".strip()
    with png_figure(path, figsize=(5, 3.5)) as axes:
        axes.set_title(title, fontsize="medium")
        for label, frame in frames.items():
            radii, accuracy = certified_accuracy_curve(frame, max_radius=max(top, 0.25) * 1.05)
            axes.plot(radii, accuracy, label=label or None)
        axes.set_xlabel("ℓ2 radius")
        axes.set_ylabel("certified accuracy")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        if any(frames):
            axes.legend()
    return path


# The outcomes of `catrs.metrics.outcome_shares` beside the bins of p_A's bound (in C0): the lost images.
OUTCOME_COLOURS = {"abstained": "0.6", "misclassified": "C3"}


def plot_outcomes(outcomes: Mapping[str, float], path: Path, title: str = "") -> Path:
    """The shares of images (%) by outcome (`catrs.metrics.outcome_shares`) as bars, top to bottom: abstained,
    misclassified, then the correct ones by their bound on p_A, each bar labelled with its share."""
    names = list(outcomes)
    shares = [100 * outcomes[name] for name in names]
    rows = range(len(names))[::-1]  # barh fills upwards: the first outcome on top
    with png_figure(path, figsize=(5, 0.8 + 0.3 * len(names))) as axes:
        axes.set_title(title, fontsize="medium")
        axes.barh(rows, shares, color=[OUTCOME_COLOURS.get(name, "C0") for name in names])
        for row, share in zip(rows, shares, strict=True):
            axes.annotate(f"{share:.1f}", (share, row), xytext=(3, 0), textcoords="offset points", va="center")
        axes.set_yticks(rows, [f"p_A {name}" if name in P_LOWER_BINS else name for name in names])
        axes.set_xlabel("images (%); the correct ones by p_A's lower bound Φ(radius/σ)")
        axes.set_xlim(0, max(shares, default=0.0) * 1.15 + 1)
        axes.grid(axis="x", alpha=0.3)
    return path
