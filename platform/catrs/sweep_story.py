"""How a sweep reads in the MLflow UI: the names of its runs, the parent's description, and its params.

The runs table shows names first, so they carry the story: a trial is named by its searched values
(`lbd=0.506 epsilon=0.421 sigma0=0.25 confidence_mask=True`), a trial ASHA stopped says at which epoch, the
winner is starred with its validation and test figures, and the parent shows the winner's test figure. The
parent's description (`mlflow.note.content`, Markdown in the UI's Overview) holds the trials table the console
prints and links the winner's run. `catrs.distributed.sweep` sets them; nothing here talks to MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import pandas as pd

from catrs.metrics import DEFAULT_RADII
from catrs.search_space import SearchSpace
from catrs.tracking import flatten


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_name(point: Mapping[str, Any]) -> str:
    """A trial's run name: its searched values, short."""
    return " ".join(f"{key}={_short(value)}" for key, value in point.items())


def stopped_name(point: Mapping[str, Any], epoch: int) -> str:
    return f"{trial_name(point)} · stopped at epoch {epoch}"


def winner_name(point: Mapping[str, Any], objective: str, val: float, test: float) -> str:
    return f"★ {trial_name(point)} · val {objective} {val:.3f} · test {objective} {test:.3f}"


def parent_name(space: SearchSpace, test: float) -> str:
    return f"{space.name} · test {space.objective} {test:.3f}"


def shared_params(space: SearchSpace, num_samples: int) -> dict[str, str]:
    """What every trial of the sweep shares, flattened: the resolved run of the file's first point without the
    searched keys, the protocols of proxy, selection and final certification, and the budget."""
    config = space.resolve(space.first_point()).config
    run = {key: value for key, value in asdict(config).items() if key != "method_config" and key not in space.search}
    method = {key: value for key, value in config.method_config.items() if key not in space.search}
    return {
        **flatten(run),
        **flatten(method, "method_config."),
        **flatten(asdict(space.proxy), "proxy."),
        **flatten(asdict(space.selection), "selection."),
        **flatten(asdict(space.final), "final."),
        **flatten(asdict(space.budget), "budget."),
        "budget.num_samples": str(num_samples),
        "search_space": str(space.path),
        "objective": space.objective,
    }


def markdown_table(table: pd.DataFrame) -> str:
    """A data frame as a Markdown table (numbers to 4 significant digits, missing values blank)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, "|" + "---|" * len(table.columns), *rows])


def sweep_note(
    space: SearchSpace, table: pd.DataFrame, winner: Mapping[str, Any], winner_link: str, test: Mapping[str, float]
) -> str:
    """The parent run's description: the choice and its test figures, how it was made, and every trial."""
    refit = " (re-trained on the whole training split)" if space.selection.refit else ""
    figures = ", ".join(f"{key} {test[key]:.3f}" for key in (space.objective, "clean_accuracy") if key in test)
    return "\n".join(
        [
            f"## {space.method} on {space.dataset}, σ = {space.sigma:g}: sweep {space.name}",
            "",
            f"**Winner: [{trial_name(winner)}]({winner_link})**{refit} — on the test split: {figures}.",
            "",
            f"Trials trained on `train_minus_val` and reported `{space.metric}` (the proxy) on `val`; the top "
            f"{space.selection.top_k} by it were certified on `val` again (`final_val_{space.objective}`), the best "
            f"was chosen, and only then was `test` read, once, for the winner (`test_{space.objective}`).",
            "",
            markdown_table(table),
        ]
    )


def nearest_logged_radius(sigma: float) -> float:
    """The radius of the logged certified accuracies nearest σ."""
    return min(DEFAULT_RADII[1:], key=lambda r: abs(r - sigma))
