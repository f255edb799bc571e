"""Reports of result files: what `catrs report` prints.

catrs report cert.parquet --radii 0 0.25 0.5 --json          # one result: table or JSON
catrs report a.parquet b.tsv RUN_ID --markdown --plot c.png  # several: one comparison table, best marked
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from catrs.data import dataset_spec
from catrs.errors import UserError
from catrs.metrics import P_LOWER_BINS, corruption_table, linf_radius, outcome_shares, sigma_of, summarize
from catrs.results import read_provenance, read_results
from catrs.storage import Stored


@dataclass(frozen=True)
class Source:
    """One result to report on: its rows, what it records of itself (`read_provenance`), and where it is."""

    frame: pd.DataFrame
    provenance: dict[str, Any]
    where: str  # the file, or `runs:/RUN_ID/PATH` for an MLflow run's logged results


def read_source(path: str | Path | Stored) -> Source:
    frame = read_results(path)
    return Source(frame, read_provenance(path, frame), str(path))


def build_report(path: str | Path | Stored, radii: Sequence[float], dataset: str | None = None) -> dict[str, Any]:
    """The summary of the result file `path` as a JSON-ready dict (`source_report`)."""
    return source_report(read_source(path), radii, dataset)


# What a report of no rows leaves out: summarize's zeros for them would read as a result.
NO_ROWS = {"acr": None, "abstain_rate": None, "misclassification_rate": None, "clean_accuracy": None}


def source_report(source: Source, radii: Sequence[float], dataset: str | None = None) -> dict[str, Any]:
    """The summary of one result as a JSON-ready dict, the same for a file or a run and for one source or
    several; with σ known, the `outcomes` (abstained, misclassified, and the correct rows by p_A's lower
    bound); with the data set known (`dataset_of`), the ℓ∞ radii; with corruption rows, the per-corruption
    figures and what they cover (`corruption_coverage`). Rows none: counts and provenance only."""
    frame, provenance = source.frame, source.provenance
    summary = summarize(frame, radii)
    report: dict[str, Any] = {"path": source.where, **summary, "provenance": provenance}
    if not len(frame):
        return report | NO_ROWS | {"certified_accuracy": {}}
    report["certified_accuracy"] = {repr(float(r)): acc for r, acc in summary["certified_accuracy"].items()}
    sigma = sigma_of(frame, provenance)
    if sigma is not None and "radius" in frame.columns:
        report["outcomes"] = outcome_shares(frame, sigma)
    if "corruption" in frame.columns and "radius" in frame.columns:
        table = corruption_table(frame)
        report["corruptions"] = {
            name: {"accuracy": float(row.accuracy), "acr": float(row.acr)}
            for name, row in table.drop(index="mean").iterrows()
        }
        report["mAcc"], report["mACR"] = float(table["accuracy"]["mean"]), float(table["acr"]["mean"])
        report["coverage"] = corruption_coverage(frame, provenance.get("dataset"))
    dataset = dataset_of(source, dataset)
    if dataset:
        dim = dataset_spec(dataset).input_dim
        report["input_dim"] = dim
        report["linf_radius"] = {repr(float(r)): float(linf_radius(r, dim)) for r in radii}
    return report


def dataset_of(source: Source, given: str | None = None) -> str | None:
    """The data set of a result, for its ℓ∞ radii: the one it records, else `given` (--dataset); a `given` that
    contradicts the record (another input size, so other ℓ∞ radii) is refused."""
    recorded = source.provenance.get("dataset")
    if given and recorded and dataset_spec(given).trained_as != dataset_spec(str(recorded)).trained_as:
        raise UserError(f"--dataset {given} contradicts {source.where}, which records {recorded}: leave --dataset out")
    return str(recorded) if recorded else given


def comparison_input_dim(sources: dict[str, Source], given: str | None = None) -> int:
    """d of a comparison's ℓ∞ row: each result's data set (`dataset_of`), which must share one input size."""
    dims = {}
    for source in sources.values():
        dataset = dataset_of(source, given)
        if dataset is None:
            raise UserError(f"--linf needs the data set's input size: {source.where} names none; add --dataset NAME")
        dims[dataset] = dataset_spec(dataset).input_dim
    if len(set(dims.values())) > 1:
        sizes = ", ".join(f"{name} d={dim}" for name, dim in dims.items())
        raise UserError(f"--linf: the results are of data sets of other input sizes ({sizes}); compare them apart")
    return next(iter(dims.values()))


def corruption_coverage(frame: pd.DataFrame, dataset: str | None) -> dict[str, Any]:
    """What corruption rows cover: {corruption: its severities} in the file's order, and what they miss of the
    data set's benchmark (`DatasetSpec.corruptions`, `severities`) as {corruption: missing severities};
    `partial` where anything is missing. Without a recorded data set, the benchmark is what the rows hold:
    every corruption they name, at every severity any of them has."""
    covered = {
        str(name): sorted(int(s) for s in group["severity"].unique())
        for name, group in frame.groupby("corruption", sort=False)
    }
    spec = dataset_spec(dataset) if dataset else None
    names = list(spec.corruptions) if spec and spec.corruptions else list(covered)
    levels = range(1, spec.severities + 1) if spec and spec.severities else sorted(set().union(*covered.values()))
    missing = {name: [s for s in levels if s not in covered.get(name, [])] for name in names}
    missing = {name: gaps for name, gaps in missing.items() if gaps}
    return {"dataset": dataset, "corruptions": covered, "missing": missing, "partial": bool(missing)}


def describe_coverage(coverage: dict[str, Any]) -> str:
    """One line: what the corruption rows cover, and "partial" with what they miss."""
    covered, missing = coverage["corruptions"], coverage["missing"]
    of = f" of {coverage['dataset']}" if coverage["dataset"] else ""
    held = f"{_counted(len(covered), 'corruption')} at {_severities(sorted(set().union(*covered.values())))}"
    if not coverage["partial"]:
        return f"complete: {held}, every corruption and severity{of}"
    absent = [name for name in missing if name not in covered]
    lacks = [f"{_counted(len(absent), 'corruption')} ({', '.join(absent)})"] if absent else []
    lacks += [f"{_severities(levels)} of {name}" for name, levels in missing.items() if name in covered]
    return f"partial: {held}{of}; missing {'; '.join(lacks)}"


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _severities(levels: Sequence[int]) -> str:
    return f"severit{'y' if len(levels) == 1 else 'ies'} {_spans(levels)}"


def _spans(numbers: Sequence[int]) -> str:
    """1, 2, 3, 5 → "1–3, 5"."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][-1] + 1:
            spans[-1].append(number)
        else:
            spans.append([number])
    return ", ".join(f"{span[0]}–{span[-1]}" if len(span) > 1 else f"{span[0]}" for span in spans)


def format_report(report: dict[str, Any], linf: bool = False) -> str:
    """A terminal table: one header line, ACR and rates, samples per image, certified accuracy (%) per radius,
    the outcomes as bars."""
    lines = [f"{report['path']}: {report['count']} rows" + ("; no rows, so no ACR or accuracy" * (not report["count"]))]
    provenance = report["provenance"]
    if provenance:
        lines.append(
            "  "
            + "  ".join(
                f"{k}={provenance[k]}" for k in ("dataset", "sigma", "n0", "n", "alpha", "seed") if k in provenance
            )
            + (
                f"  adaptive: n is the largest n, tolerance={provenance['tolerance']:g}σ"
                if provenance.get("procedure") == "adaptive"
                else ""
            )
        )
        if provenance.get("mixed_precision"):
            lines.append("  NOTE: certified with mixed precision (not the fp32 soundness argument)")
    if report["acr"] is not None:
        lines.append(
            f"ACR {report['acr']:.3f}   clean accuracy {100 * report['clean_accuracy']:.1f}%   "
            f"abstain {100 * report['abstain_rate']:.1f}%   misclassified {100 * report['misclassification_rate']:.1f}%"
        )
    if "mean_samples" in report:
        lines.append(_samples_line(report))
    radii = list(report["certified_accuracy"])
    if radii:
        width = 7
        lines.append("radius (ℓ2)".ljust(14) + "".join(f"{float(r):>{width}.2f}" for r in radii))
        if linf and "linf_radius" in report:
            lines.append("radius (ℓ∞)".ljust(14) + "".join(f"{report['linf_radius'][r]:>{width}.4f}" for r in radii))
        lines.append(
            "cert. acc (%)".ljust(14) + "".join(f"{100 * report['certified_accuracy'][r]:>{width}.1f}" for r in radii)
        )
    if "outcomes" in report:
        lines += _outcome_lines(report["outcomes"])
    elif report["acr"] is not None:
        lines.append("no histogram of p_A's lower bound: σ unknown (the file records none)")
    if "corruptions" in report:
        lines += _corruption_lines(report)
    return "\n".join(lines)


def _corruption_lines(report: dict[str, Any]) -> list[str]:
    """Per corruption, the severities it covers and its figures averaged over them; their means; the coverage."""
    covered = report["coverage"]["corruptions"]
    lines = [f"per corruption, averaged over its severities:{'severities':>12}{'acc@r=0 (%)':>14}{'ACR':>9}"]
    for name, row in report["corruptions"].items():
        lines.append(f"  {name:<43}{_spans(covered[name]):>12}{100 * row['accuracy']:>14.1f}{row['acr']:>9.3f}")
    lines.append(f"  {'mean (mAcc, mACR)':<55}{100 * report['mAcc']:>14.1f}{report['mACR']:>9.3f}")
    return [*lines, describe_coverage(report["coverage"])]


def _samples_line(report: dict[str, Any]) -> str:
    """The mean noisy samples per image, and an adaptive certification's split of them."""
    line = f"samples per image {report['mean_samples']:,.0f}"
    if "mean_pilot_samples" in report:
        line += f" (pilot {report['mean_pilot_samples']:,.0f} + estimation {report['mean_estimation_samples']:,.0f})"
    return line


BAR_WIDTH = 30  # characters of the largest share's bar
EIGHTHS = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")  # a bar's last character, by the eighths it holds


def _bar(fraction: float) -> str:
    """`fraction` of BAR_WIDTH characters, to an eighth of one."""
    whole, eighths = divmod(round(fraction * BAR_WIDTH * 8), 8)
    return "█" * whole + EIGHTHS[eighths]


def _outcome_lines(outcomes: dict[str, float]) -> list[str]:
    """The outcomes as a table with bars, scaled to the largest share: abstained, misclassified, then the
    correct rows by their bound on p_A."""
    top = max(outcomes.values()) or 1.0
    lines = ["outcome (% of rows; correct rows by p_A's lower bound Φ(radius/σ))"]
    for name, share in outcomes.items():
        label = f"p_A {name}" if name in P_LOWER_BINS else name
        lines.append(f"  {label:<18}{100 * share:>5.1f}  {_bar(share / top)}".rstrip())
    return lines


# --- comparing several results: `catrs report A B C …` -------------------------------------------------------

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load_source(source: str, tracking_uri: str | None = None) -> tuple[str, Source]:
    """(label, result) of a result file, or of an MLflow run's logged results (a 32-hex run id)."""
    if Path(source).exists() or not RUN_ID.match(source):
        return Path(source).stem, read_source(source)
    from catrs.tracking import Tracker

    tracker = Tracker(tracking_uri, lookup=True)
    try:
        run = tracker.client.get_run(source)
        files = [
            a.path for a in tracker.client.list_artifacts(source, "results") if a.path.endswith((".parquet", ".tsv"))
        ]
    except Exception:
        raise UserError(f"no MLflow run {source} at {tracker.uri}") from None
    if not files:
        raise UserError(f"MLflow run {source} logged no results file (artifacts/results/*.parquet)")
    with tempfile.TemporaryDirectory() as folder:
        path = tracker.client.download_artifacts(source, files[0], folder)
        return run.info.run_name or source, replace(read_source(path), where=f"runs:/{source}/{files[0]}")


def split_label(given: str) -> tuple[str, str]:
    """`LABEL=SOURCE` → (LABEL, SOURCE); a bare source → ("", SOURCE)."""
    label, separator, source = given.partition("=")
    if not separator or not label or Path(given).exists():  # a file whose name holds '=' is just a file
        return "", given
    return label, source


def load_sources(sources: Sequence[str], tracking_uri: str | None = None) -> dict[str, Source]:
    """Every source's result under a distinct label: the LABEL of a `LABEL=SOURCE`, else its name, or
    `folder/name` where names collide."""
    loaded = []
    for given in sources:
        label, source = split_label(given)
        name, result = load_source(source, tracking_uri)
        loaded.append((source, label or name, bool(label), result))
    names = [label for _, label, _, _ in loaded]
    results = {}
    for source, label, chosen, result in loaded:
        if names.count(label) > 1 and not chosen:
            label = f"{Path(source).parent.name}/{label}"
        if label in results:
            raise UserError(
                f"two results are labelled {label} (the second: {source}); give each result once, under its own label"
            )
        results[label] = result
    return results


def comparison_table(frames: dict[str, pd.DataFrame], radii: Sequence[float]) -> pd.DataFrame:
    """The paper's Table 1: one row per result, ACR and certified accuracy (%) at each radius; a result of no
    rows has none (dashes), not zeros."""
    rows = {}
    for label, frame in frames.items():
        summary = summarize(frame, radii)
        row = {"ACR": summary["acr"], **{f"{r:.2f}": 100 * a for r, a in summary["certified_accuracy"].items()}}
        rows[label] = row if len(frame) else dict.fromkeys(row, np.nan)
    return pd.DataFrame.from_dict(rows, orient="index")


def corruption_comparison(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's Table 3 and its ACR twin: one row per corruption (in data-set order) then the mean, one
    column per result; certified accuracy at r = 0 (%) and ACR, each averaged over severities."""
    tables = {label: corruption_table(frame) for label, frame in frames.items()}
    names = list(dict.fromkeys(name for table in tables.values() for name in table.index if name != "mean"))
    accuracy = pd.DataFrame({label: 100 * table["accuracy"] for label, table in tables.items()})
    acr = pd.DataFrame({label: table["acr"] for label, table in tables.items()})
    accuracy = accuracy.reindex(names + ["mean"]).rename(index={"mean": "mAcc"})
    acr = acr.reindex(names + ["mean"]).rename(index={"mean": "mACR"})
    accuracy.index.name = acr.index.name = "corruption"
    return accuracy, acr


@dataclass(frozen=True)
class Layout:
    """How a comparison table prints: along which axis the best value is marked, decimals, footnote."""

    best_in: str  # "column" (Table 1: the best result per radius) or "row" (Table 3: per corruption)
    decimals: Callable[[str], int]  # of a column
    note: str


TABLE1 = Layout(
    "column", lambda column: 3 if column == "ACR" else 1, "best in its column; certified accuracy in %, radii in ℓ2"
)
TABLE3_ACCURACY = Layout(
    "row", lambda column: 1, "best in its row; certified accuracy at r = 0 in %, averaged over the severities covered"
)
TABLE3_ACR = Layout("row", lambda column: 3, "best in its row; ACR averaged over the severities covered")


def _cells(table: pd.DataFrame, layout: Layout, mark: Callable[[str], str]) -> list[list[str]]:
    """Formatted cells, the best value along the layout's axis passed through `mark` (ties all marked); a
    result missing a value (a corruption it was not certified on) shows a dash."""
    best = table.max(axis=0 if layout.best_in == "column" else 1).to_dict()  # {column or row label: its best}
    cells = []
    for label, row in table.iterrows():
        line = [str(label)]
        for column, value in row.items():
            if pd.isna(value):
                line.append("–")
                continue
            text = f"{value:.{layout.decimals(str(column))}f}"
            top = best[column] if layout.best_in == "column" else best[label]
            line.append(mark(text) if np.isclose(value, top) and top > 0 else text)
        cells.append(line)
    return cells


def format_comparison(
    table: pd.DataFrame, style: str = "text", linf: dict[str, float] | None = None, layout: Layout = TABLE1
) -> str:
    """The table as terminal text (best marked *), Markdown (best in bold) or LaTeX (best in \\textbf)."""
    header = [table.index.name or "", *table.columns]
    if style == "markdown":
        rows = _cells(table, layout, lambda t: f"**{t}**")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    if style == "latex":
        rows = _cells(table, layout, lambda t: f"\\textbf{{{t}}}")
        spec = "l" + "r" * len(table.columns)
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
        lines += [" & ".join(r.replace("_", "\\_") for r in row) + " \\\\" for row in rows]
        return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"])
    rows = _cells(table, layout, lambda t: t + "*")
    widths = [max(len(str(c)) for c in column) + 2 for column in zip(header, *rows, strict=True)]
    lines = [
        "".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in [header, *rows]
    ]
    if linf:
        lines.insert(
            1,
            "ℓ∞ radius".ljust(widths[0] + widths[1])
            + "".join(f"{linf[c]:.4f}".rjust(w) for c, w in zip(table.columns[1:], widths[2:], strict=True)),
        )
    lines.append(f"* {layout.note}")
    return "\n".join(lines)
