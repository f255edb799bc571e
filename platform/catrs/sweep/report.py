"""What a finished sweep says, from its MLflow parent run: the paper's Figure 2(c)-style trade-off.

    catrs report --sweep PARENT_RUN_ID [--radius 0.5]        (`catrs tune` also writes it at the end)
    catrs report --sweep CAT-RS=ID1 --sweep Consistency=ID2 --radius 2.0 --plot frontiers.png

Per trial (its last proxy certification of the val split): clean accuracy (certified accuracy at r = 0)
against certified accuracy at r, with the Pareto-optimal trials marked (no other trial is at least as good on
both and better on one); the objective against each searched hyper-parameter; and the hyper-parameters'
importances for the objective, by Optuna's fANOVA evaluator over the finished trials. Plots go to the parent run
(`sweep_report/`), the table to the terminal.

Several sweeps (say, one per method, each varying that method's trade-off knob as the paper's λ and η) are
compared the way the paper's Figure 2(c) compares methods: their fronts on one plot, and per sweep the area
its front dominates — one number where the higher frontier wins.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter

from catrs.errors import UserError
from catrs.metrics import certification_metrics
from catrs.plots import png_figure
from catrs.report import split_label
from catrs.sweep.trial import PROXY_PREFIX
from catrs.tracking import Tracker


@dataclass
class SweepReport:
    name: str  # the label it was given, else the sweep's name
    parent_run_id: str
    objective: str
    radius: float
    trials: pd.DataFrame  # a row per trial: params, clean, certified@r, objective, final val, chosen, pareto
    importances: dict[str, float]
    kinds: dict[str, str] = field(default_factory=dict)  # searched key → its domain kind (empty: unknown)

    @property
    def params(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith("param:")]

    @property
    def front(self) -> pd.DataFrame:
        """The Pareto-optimal trials, by clean accuracy."""
        return self.trials[self.trials["pareto"]].sort_values("clean")

    @property
    def front_area(self) -> float:
        """The area the trials' Pareto front dominates in the (clean, certified) plane."""
        return dominated_area(self.trials["clean"].to_numpy(), self.trials["certified"].to_numpy())


def pareto_optimal(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points no other point dominates (≥ on both coordinates, > on one); both are maximised."""
    dominated = [(np.any((x >= xi) & (y >= yi) & ((x > xi) | (y > yi)))) for xi, yi in zip(x, y, strict=True)]
    return ~np.array(dominated, dtype=bool)


def dominated_area(x: np.ndarray, y: np.ndarray) -> float:
    """The area of the points of [0, ∞)² that some point (x_i, y_i) is at least as good as on both coordinates:
    the area under the Pareto front, down to the origin. A higher front dominates more."""
    front = pareto_optimal(x, y)
    order = np.argsort(x[front])
    xs, ys = x[front][order], y[front][order]  # along the front, x rises as y falls
    return float(np.sum(np.diff(xs, prepend=0.0) * ys))


def _numeric(values: pd.Series) -> pd.Series | None:
    converted = pd.to_numeric(values, errors="coerce")
    return converted if converted.notna().all() else None


def importances(trials: pd.DataFrame, params: list[str], objective: str) -> dict[str, float]:
    """Optuna's (fANOVA) importance of each searched hyper-parameter for the objective; {} if too few trials."""
    import optuna

    varied = [p for p in params if trials[p].nunique() > 1]
    if len(trials) < 3 or not varied or trials[objective].nunique() < 2:  # nothing to explain
        return {}
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in varied:
        numeric = _numeric(trials[p])
        distributions[p] = (
            optuna.distributions.FloatDistribution(float(numeric.min()), float(numeric.max()))
            if numeric is not None
            else optuna.distributions.CategoricalDistribution(sorted(trials[p].astype(str).unique()))
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in trials.iterrows():
        values = {
            p: (float(row[p]) if isinstance(distributions[p], optuna.distributions.FloatDistribution) else str(row[p]))
            for p in varied
        }
        study.add_trial(
            optuna.trial.create_trial(params=values, distributions=distributions, value=float(row[objective]))
        )
    try:
        scores = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except RuntimeError:  # fANOVA finds no variance its trees can split
        return {}
    return {name.removeprefix("param:"): float(score) for name, score in scores.items()}


def sweep_report(tracker: Tracker, parent_run_id: str, radius: float = 0.5, label: str = "") -> SweepReport:
    try:
        parent = tracker.client.get_run(parent_run_id)
    except Exception:
        raise UserError(f"no MLflow run {parent_run_id} at {tracker.uri}") from None
    name = label or parent.data.tags.get("catrs.sweep") or parent.info.run_name or parent_run_id
    objective = "val_" + parent.data.tags.get("catrs.objective", "acr")  # what the trials reported, on val
    certified = f"val_certified_accuracy_{radius:g}"
    kinds = searched_kinds(parent.data.tags)
    rows = []
    for child in tracker.children(parent_run_id):
        metrics = proxy_figures(child.data.metrics)
        if objective in metrics and certified not in metrics:  # a radius the trial's page does not chart
            metrics |= proxy_rows_figures(tracker, child.info.run_id, radius)
        if objective not in metrics or certified not in metrics:
            continue
        searched = {k: v for k, v in child.data.params.items() if not kinds or k in kinds}
        rows.append(
            {
                "trial": child.data.tags.get("catrs.trial_id", child.info.run_id),
                "stopped_at": child.data.tags.get("catrs.stopped_at", ""),
                "chosen": child.data.tags.get("catrs.winner") == "true",
                "final_val": metrics.get("final_" + objective, np.nan),
                **{f"param:{k}": v for k, v in searched.items()},
                "clean": metrics.get("val_certified_accuracy_0", metrics.get("val_clean_accuracy")),
                "certified": metrics[certified],
                objective: metrics[objective],
            }
        )
    if not rows:
        raise UserError(
            f"run {parent_run_id} has no trials with {objective} and {certified} "
            f"(is it a sweep's parent run? is r={radius:g} among the logged radii?)"
        )
    trials = pd.DataFrame(rows).sort_values(objective, ascending=False).reset_index(drop=True)
    for column in [c for c in trials.columns if c.startswith("param:")]:  # MLflow keeps params as strings
        numeric = _numeric(trials[column])
        if numeric is not None:
            trials[column] = numeric
    trials["pareto"] = pareto_optimal(trials["clean"].to_numpy(), trials["certified"].to_numpy())
    params = [c for c in trials.columns if c.startswith("param:")]
    return SweepReport(name, parent_run_id, objective, radius, trials, importances(trials, params, objective), kinds)


def proxy_figures(metrics: dict[str, float]) -> dict[str, float]:
    """A trial's metrics with its proxy figures under the names the trials reported them (`val_acr`): MLflow
    names them `proxy/val_acr`, sweeps of earlier versions `val_acr`."""
    return {**metrics, **{k.removeprefix(PROXY_PREFIX): v for k, v in metrics.items() if k.startswith(PROXY_PREFIX)}}


def proxy_rows_figures(tracker: Tracker, run_id: str, radius: float) -> dict[str, float]:
    """The clean and certified accuracy at `radius` of a trial's last proxy, from its rows (MLflow charts
    the radius nearest σ only); none where the trial logged no rows."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            frame = pd.read_parquet(tracker.client.download_artifacts(run_id, "proxy/evaluation.parquet", folder))
        except Exception:  # no rows logged (a trial that failed), or a store that lost them
            return {}
    figures = certification_metrics(frame, (0.0, radius))
    return {f"val_{name}": figures[name] for name in ("certified_accuracy_0", f"certified_accuracy_{radius:g}")}


def searched_kinds(tags: dict[str, str]) -> dict[str, str]:
    """The searched keys and their domain kinds (loguniform, uniform, int, choice) a sweep's parent names;
    empty for sweeps of earlier versions, whose every param was searched."""
    listed = [item.partition(":") for item in tags.get("catrs.searched", "").split(",") if item]
    return {key: kind or "uniform" for key, _, kind in listed}


def sweep_reports(tracker: Tracker, sweeps: Sequence[str], radius: float) -> list[SweepReport]:
    """The report of each `[LABEL=]PARENT_RUN_ID`, under distinct names."""
    reports = [sweep_report(tracker, parent, radius, label) for label, parent in map(split_label, sweeps)]
    names = [report.name for report in reports]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"two sweeps are named {repeated[0]}; give each sweep once, as LABEL=PARENT_RUN_ID")
    return reports


def plot_frontiers(reports: Sequence[SweepReport], path: Path) -> Path:
    """Every trial of each sweep (faint), each sweep's Pareto front (a line through two or more) and its choice
    (ringed), in one colour per sweep."""
    with png_figure(path, figsize=(5, 4)) as axes:
        for colour, report in enumerate(reports):
            axes.scatter(report.trials["clean"], report.trials["certified"], color=f"C{colour}", alpha=0.35)
            chosen = report.trials[report.trials["chosen"]]
            axes.scatter(
                chosen["clean"],
                chosen["certified"],
                s=160,
                facecolors="none",
                edgecolors=f"C{colour}",
                linewidths=1.5,
                label=f"{report.name}: the choice" if len(chosen) else None,
            )
            style = "o-" if len(report.front) > 1 else "o"
            axes.plot(
                report.front["clean"],
                report.front["certified"],
                style,
                color=f"C{colour}",
                label=f"{report.name}: Pareto-optimal",
            )
        axes.set_title("trials' last proxy on val (faint: all trials)", fontsize="medium")
        axes.set_xlabel("clean accuracy (certified at r = 0)")
        axes.set_ylabel(f"certified accuracy at r = {reports[0].radius:g}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return path


def plot_objective_by_param(report: SweepReport, path: Path) -> Path:
    """The objective against each searched value: the proxy of trials trained to their end (dots), of trials
    stopped early (hollow: a figure of fewer epochs), and the shortlist's re-certification on val (stars).
    Log-uniform values on a log axis, choices on a categorical one."""
    params = report.params or ["trial"]
    trials = report.trials
    stopped = trials.get("stopped_at", pd.Series("", index=trials.index)).astype(str) != ""
    with png_figure(path, ncols=len(params), figsize=(3.4 * len(params), 3.2), squeeze=False) as axes:
        for axis, param in zip(axes[0], params, strict=True):
            kind = report.kinds.get(param.removeprefix("param:"), "choice" if param == "trial" else "uniform")
            x = trials[param].astype(str) if kind == "choice" else trials[param]
            if kind == "choice":  # categories in a stable order, evenly spaced
                order = sorted(x.unique(), key=lambda v: (_numeric(pd.Series([v])) is None, v))
                x = x.map({value: i for i, value in enumerate(order)})
                axis.set_xticks(range(len(order)), order)
            axis.scatter(x[~stopped], trials.loc[~stopped, report.objective], label="proxy, trained out")
            chosen = trials["chosen"]
            if chosen.any():  # the sweep's choice, ringed, at its proxy figure
                axis.scatter(
                    x[chosen],
                    trials.loc[chosen, report.objective],
                    s=160,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=1.5,
                    label="the choice",
                )
            if stopped.any():
                axis.scatter(
                    x[stopped],
                    trials.loc[stopped, report.objective],
                    facecolors="none",
                    edgecolors="grey",
                    label="proxy, stopped early",
                )
            if "final_val" in trials and trials["final_val"].notna().any():
                axis.scatter(x, trials["final_val"], marker="*", s=90, color="C3", label="shortlist, final protocol")
            if kind == "loguniform":
                axis.set_xscale("log")
                for ticks in (axis.xaxis.set_major_formatter, axis.xaxis.set_minor_formatter):
                    ticks(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.5, 1, 2; not 2×10⁰
            axis.set_xlabel(param.removeprefix("param:"))
            axis.set_ylabel(report.objective.replace("_acr", " ACR"))
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize="x-small")
    return path


def plot_importances(report: SweepReport, path: Path) -> Path:
    """The searched keys' importances for the objective (fANOVA), one bar each, in one chart."""
    ranked = sorted(report.importances.items(), key=lambda item: item[1])
    with png_figure(path, figsize=(4.5, 0.5 + 0.45 * len(ranked))) as axes:
        axes.barh([name for name, _ in ranked], [score for _, score in ranked], color="C0")
        axes.set_xlim(0, 1)
        axes.set_xlabel(f"importance for {report.objective} (fANOVA; sums to 1)")
        axes.grid(alpha=0.3, axis="x")
    return path


def sweep_report_record(report: SweepReport) -> dict[str, Any]:
    """The report as plain JSON values: the sweep, its front's area, importances and every trial."""
    trials = report.trials.rename(columns=lambda c: c.removeprefix("param:"))
    return {
        "parent_run_id": report.parent_run_id,
        "objective": report.objective,
        "radius": report.radius,
        "area": report.front_area,
        "importances": report.importances,
        "trials": json.loads(trials.to_json(orient="records")),
    }


def log_sweep_report(tracker: Tracker, report: SweepReport) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        tracker.log_artifact(report.parent_run_id, plot_frontiers([report], folder / "frontier.png"), "sweep_report")
        tracker.log_artifact(
            report.parent_run_id, plot_objective_by_param(report, folder / "objective_by_param.png"), "sweep_report"
        )
        if report.importances:
            tracker.log_artifact(
                report.parent_run_id, plot_importances(report, folder / "importances.png"), "sweep_report"
            )
        report.trials.to_csv(folder / "trials.csv", index=False)
        tracker.log_artifact(report.parent_run_id, folder / "trials.csv", "sweep_report")
    # One chart, not one per key: MLflow draws a chart for every metric, so they are params.
    tracker.log_params(report.parent_run_id, {f"importance.{k}": f"{v:.3f}" for k, v in report.importances.items()})


def format_sweep_report(report: SweepReport) -> str:
    shown = report.trials.rename(columns=lambda c: c.removeprefix("param:")).rename(
        columns={"final_val": "final_" + report.objective, "stopped_at": "stopped at"}
    )
    shown["pareto"] = shown["pareto"].map({True: "*", False: ""})
    shown["chosen"] = shown["chosen"].map({True: "★", False: ""})
    shown = shown.drop(
        columns=[
            c
            for c in ("stopped at", "final_" + report.objective)
            if c in shown and not shown[c].replace("", np.nan).notna().any()
        ]
    )
    lines = [
        f"sweep {report.name} ({report.parent_run_id}): {len(shown)} trials; clean vs certified accuracy at "
        f"r = {report.radius:g} (* Pareto-optimal)",
        shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""),
    ]
    if report.importances:
        lines.append(
            "importance for "
            + report.objective
            + ": "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(report.importances.items(), key=lambda kv: -kv[1]))
        )
    return "\n".join(lines)


def format_frontier_comparison(reports: Sequence[SweepReport]) -> str:
    """One row per sweep: its trials, the area its Pareto front dominates (the largest marked) and the front."""
    rows = []
    for report in reports:
        front = " ".join(
            f"({c:.3f}, {r:.3f})" for c, r in zip(report.front["clean"], report.front["certified"], strict=True)
        )
        rows.append(
            {
                "sweep": report.name,
                "trials": len(report.trials),
                "area": report.front_area,
                "front (clean, certified)": front,
            }
        )
    table = pd.DataFrame(rows)
    table.insert(3, "", np.where(table["area"] == table["area"].max(), "*", ""))
    return "\n".join(
        [
            f"trade-off frontiers at r = {reports[0].radius:g}: area dominated by each sweep's Pareto "
            f"front (* the largest: the higher frontier)",
            table.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        ]
    )
