"""ACR and certified accuracy, on hand-made rows and on the authors' published CIFAR-10 certification."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pandas as pd
import pytest
from scipy.stats import norm

from catrs.metrics import (
    DEFAULT_RADII,
    abstain_rate,
    average_certified_radius,
    certification_metrics,
    certified_accuracy,
    certified_accuracy_curve,
    clean_accuracy,
    linf_radius,
    outcome_metrics,
    outcome_shares,
    sample_means,
    summarize,
)
from catrs.results import read_results
from tests.helpers import REFERENCE_TSV, certify_digits

# The paper's Table 1, CIFAR-10 σ = 0.5, CAT-RS: certified accuracy (%) at r = 0, 0.25, …, 1.75.
TABLE1_ROW = [62.3, 56.8, 50.5, 44.6, 38.5, 32.7, 27.1, 20.6]


def rows(*tuples):
    return pd.DataFrame(tuples, columns=["idx", "label", "predict", "radius", "correct"])


def test_acr_counts_abstentions_and_wrong_predictions_as_zero():
    frame = rows((0, 1, 1, 0.8, 1), (1, 2, -1, 0.0, 0), (2, 3, 4, 1.5, 0), (3, 0, 0, 0.2, 1))
    assert average_certified_radius(frame) == pytest.approx((0.8 + 0.2) / 4)
    assert certified_accuracy(frame, [0.0, 0.2, 0.5, 1.0]) == {0.0: 0.5, 0.2: 0.5, 0.5: 0.25, 1.0: 0.0}
    assert abstain_rate(frame) == 0.25


def test_curve_is_monotone_and_starts_at_clean_accuracy():
    frame = rows((0, 1, 1, 0.8, 1), (1, 2, 2, 0.3, 1), (2, 3, 3, 1.2, 0))
    radii, accuracy = certified_accuracy_curve(frame)
    assert radii[0] == 0.0 and radii[-1] == pytest.approx(1.2)
    assert accuracy[0] == pytest.approx(2 / 3)
    assert all(a >= b for a, b in pairwise(accuracy))


def test_linf_view_divides_by_root_dimension():
    assert linf_radius(1.0, 3 * 32 * 32) == pytest.approx(1 / math.sqrt(3072))


def test_published_tsv_gives_the_papers_acr_and_table1_row():
    frame = read_results(REFERENCE_TSV)
    assert len(frame) == 10_000
    assert round(average_certified_radius(frame), 3) == 0.757
    accuracy = certified_accuracy(frame, [0.25 * k for k in range(8)])
    assert [round(100 * a, 1) for a in accuracy.values()] == TABLE1_ROW
    assert frame["time"].iloc[0] == pytest.approx(8.593859)  # H:MM:SS.ffffff parsed to seconds


SIGMA = 0.5


def adaptive_evaluation():
    """Ten images of an adaptive evaluation at σ = 0.5: one abstained; two misclassified (one certified for the
    wrong class, one never estimated); seven correct, whose p_A bounds fall in six bins, two of them on an edge."""
    radius = [0.0, SIGMA * norm.ppf(0.8), 0.0, *(SIGMA * norm.ppf([0.5, 0.65, 0.85, 0.95, 0.97, 0.9995])), 5.0]
    frame = rows(*((i, i % 4, i % 4, r, 1) for i, r in enumerate(radius)))
    frame.loc[0, ["predict", "correct"]] = [-1, 0]
    frame.loc[[1, 2], ["predict", "correct"]] = [[3, 0], [0, 0]]
    frame["estimated"] = [True, True, False, *[True] * 7]
    frame["pilot_samples"] = [100, 400, 100, 200, 200, 400, 400, 400, 800, 1000]
    frame["estimation_samples"] = [0, 1000, 0, 1000, 1000, 2000, 2000, 4000, 8000, 1000]
    frame["samples"] = frame["pilot_samples"] + frame["estimation_samples"]
    frame["sigma"], frame["procedure"], frame["tolerance"] = SIGMA, "adaptive", 0.05
    return frame


OUTCOMES = {
    "abstained": 0.1,
    "misclassified": 0.2,
    "0.5-0.6": 0.1,  # radius 0: p_A's bound is 0.5, the lowest edge
    "0.6-0.7": 0.1,
    "0.7-0.8": 0.0,
    "0.8-0.9": 0.1,
    "0.9-0.99": 0.2,
    "0.99-0.999": 0.0,
    "0.999-0.9999": 0.1,
    "0.9999-1": 0.1,  # radius 10σ: Φ is 1 in floating point, the top edge, which the last bin holds
}


def test_outcomes_split_every_row_once_and_the_bins_add_up_to_the_clean_accuracy():
    frame = adaptive_evaluation()
    shares = outcome_shares(frame, SIGMA)
    assert shares == pytest.approx(OUTCOMES) and list(shares) == list(OUTCOMES)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert sum(list(shares.values())[2:]) == pytest.approx(clean_accuracy(frame))
    assert sample_means(frame) == {
        "mean_samples": 2400.0,
        "mean_pilot_samples": 400.0,
        "mean_estimation_samples": 2000.0,
    }
    assert summarize(frame)["misclassification_rate"] == pytest.approx(0.2)
    assert set(certification_metrics(frame)) == set(certification_metrics(rows()))  # the sweep's names stay


def test_outcome_metrics_need_sigma_for_the_histogram_and_samples_for_their_mean():
    frame = adaptive_evaluation()
    metrics = outcome_metrics(frame, SIGMA)
    assert metrics["misclassification_rate"] == pytest.approx(0.2) and metrics["mean_samples"] == 2400.0
    assert metrics["p_lower/0.9-0.99"] == pytest.approx(0.2) and metrics["p_lower/0.9999-1"] == pytest.approx(0.1)
    research = frame[["idx", "label", "predict", "radius", "correct"]]
    assert outcome_metrics(research, None) == {"misclassification_rate": pytest.approx(0.2)}


def test_report_shows_samples_misclassifications_and_the_p_lower_histogram(run_cli, tmp_path):
    adaptive_evaluation().to_parquet(tmp_path / "adaptive.parquet")
    code, out, err = run_cli("report", tmp_path / "adaptive.parquet", "--radii", "0")
    assert code == 0, err
    assert "abstain 10.0%   misclassified 20.0%" in out
    assert "samples per image 2,400 (pilot 400 + estimation 2,000)" in out
    bars = {line.split()[1]: line for line in out.splitlines() if line.startswith("  p_A")}
    assert list(bars) == list(OUTCOMES)[2:]
    assert bars["0.9-0.99"].split()[-1] == "█" * 30  # the largest share fills the bar, with misclassified
    assert bars["0.8-0.9"].split()[-1] == "█" * 15 and bars["0.7-0.8"].split()[-1] == "0.0"
    code, out, err = run_cli("report", tmp_path / "adaptive.parquet", "--json")
    assert json.loads(out)["outcomes"] == pytest.approx(OUTCOMES)


def test_certification_logs_its_outcomes_and_their_chart_to_mlflow(tmp_path):
    import matplotlib.image

    from catrs.tracking import Tracker

    frame = adaptive_evaluation()
    frame.to_parquet(tmp_path / "adaptive.parquet")
    tracker = Tracker(experiment="outcomes")
    run_id = tracker.start("adaptive", {"catrs.kind": "outcomes"})
    tracker.log_results(run_id, frame, tmp_path / "adaptive.parquet", prefix="test_")
    tracker.end(run_id)
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics["test_misclassification_rate"] == pytest.approx(0.2)
    assert metrics["test_mean_samples"] == 2400.0 and metrics["test_mean_estimation_samples"] == 2000.0
    bins = list(OUTCOMES)[2:]
    assert not [name for name in metrics if "p_lower" in name]  # a table, not a one-point chart per bin
    table = pd.read_csv(tracker.client.download_artifacts(run_id, "results/test_p_lower.csv", str(tmp_path)))
    assert dict(zip(table["p_lower"], table["share"], strict=True)) == pytest.approx({n: OUTCOMES[n] for n in bins})
    chart = tracker.client.download_artifacts(run_id, "plots/test_p_lower.png", str(tmp_path))
    pixels = matplotlib.image.imread(chart)
    assert pixels.shape[0] > 200 and pixels.std() > 0.05


def test_report_json_on_the_published_file(run_cli):
    code, out, err = run_cli("report", REFERENCE_TSV, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["count"] == 10_000
    assert round(report["acr"], 3) == 0.757
    assert [round(100 * report["certified_accuracy"][repr(0.25 * k)], 1) for k in range(8)] == TABLE1_ROW
    assert set(report["certified_accuracy"]) == {repr(float(r)) for r in DEFAULT_RADII}
    assert all(0.0 <= v <= 1.0 for v in report["certified_accuracy"].values())


def test_report_table_on_the_published_file(run_cli):
    code, out, _ = run_cli("report", REFERENCE_TSV, "--radii", "0", "0.5", "1.0", "--linf", "--dataset", "cifar10")
    assert code == 0
    assert "ACR 0.757" in out
    assert "no histogram of p_A's lower bound: σ unknown" in out and "samples per image" not in out
    lines = {
        line.split()[0] + " " + line.split()[1]: line
        for line in out.splitlines()
        if line.startswith(("radius", "cert"))
    }
    assert lines["cert. acc"].split()[-3:] == ["62.3", "50.5", "38.5"]
    assert lines["radius (ℓ∞)"].split()[-1] == f"{1.0 / math.sqrt(3072):.4f}"


@pytest.mark.parametrize(
    "content,fragment", [(b"not a table at all\n", "lacks the column"), (b"PAR1\x00\x01garbage", "could not read")]
)
def test_report_refuses_foreign_files_in_one_line(tmp_path, run_cli, content, fragment):
    path = tmp_path / "foreign.tsv"
    path.write_bytes(content)
    code, out, err = run_cli("report", path)
    assert code == 2 and out == ""
    assert fragment in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def two_results(tmp_path):
    """The published file and a copy whose radii are halved (so it loses at every radius above 0)."""
    halved = read_results(REFERENCE_TSV)
    halved["radius"] = halved["radius"] / 2
    halved.to_parquet(tmp_path / "halved.parquet")
    return [REFERENCE_TSV, tmp_path / "halved.parquet"]


def test_comparison_table_marks_the_best_of_every_column(run_cli, two_results):
    code, out, err = run_cli("report", *two_results, "--radii", "0", "0.5", "1.0")
    assert code == 0, err
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:3]}
    assert lines["cifar10_sigma0.5_catrs_certify"] == ["0.757*", "62.3*", "50.5*", "38.5*"]
    assert lines["halved"][0] == "0.379" and lines["halved"][1] == "62.3*"  # a tie at r = 0 is marked twice
    assert lines["halved"][2:] == ["38.5", "0.0"]  # halved radii: its r = 0.5 is the published r = 1.0


def test_comparison_as_markdown_and_latex(run_cli, two_results):
    markdown = run_cli("report", *two_results, "--radii", "0", "0.5", "--markdown")[1]
    assert "| cifar10_sigma0.5_catrs_certify | **0.757** | **62.3** | **50.5** |" in markdown
    latex = run_cli("report", *two_results, "--radii", "0", "0.5", "--latex")[1]
    assert "\\textbf{0.757}" in latex and "\\begin{tabular}{lrrr}" in latex and "halved & 0.379" in latex


def test_results_are_labelled_as_given_and_labels_must_differ(run_cli, two_results):
    code, out, err = run_cli(
        "report", f"CAT-RS={two_results[0]}", f"halved radii={two_results[1]}", "--radii", "0", "--markdown"
    )
    assert code == 0, err
    assert "| CAT-RS | **0.757** | **62.3** |" in out and "| halved radii | 0.379 | **62.3** |" in out
    code, out, err = run_cli("report", f"A={two_results[0]}", f"A={two_results[1]}")
    assert code == 2 and out == "" and "two results are labelled A" in err


def test_overlay_plot_is_a_real_image(run_cli, two_results, tmp_path):
    import matplotlib.image

    code, out, _ = run_cli("report", *two_results, "--plot", tmp_path / "curves.png")
    assert code == 0 and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    pixels = matplotlib.image.imread(tmp_path / "curves.png")
    assert pixels.shape[0] > 200 and pixels.std() > 0.05  # not a blank canvas


def test_report_reads_an_mlflow_run(run_cli, digits_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    from catrs.context import resolve_tracking_uri

    out = tmp_path / "cert.parquet"
    run_cli(
        *certify_digits(digits_checkpoint),
        "--n0",
        "10",
        "--n",
        "50",
        "--max",
        "5",
        "--inference",
        "eager",
        "--out",
        out,
    )
    client = MlflowClient(resolve_tracking_uri())
    run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`catrs.kind` = 'certify'",
        order_by=["attributes.start_time DESC"],
    )[0]
    code, text, err = run_cli("report", run.info.run_id, out, "--json")
    assert code == 0, err
    rows = json.loads(text)
    from_store, from_file = rows[run.info.run_name], rows["cert"]
    assert from_store.pop("path").startswith(f"runs:/{run.info.run_id}/results/") and from_file.pop("path") == str(out)
    assert from_store == from_file  # the same results and provenance, from the store and from the file


def test_results_with_the_same_file_name_are_told_apart_by_their_folder(run_cli, tmp_path):
    for folder in ("catrs", "gaussian"):
        (tmp_path / folder).mkdir()
        read_results(REFERENCE_TSV).to_parquet(tmp_path / folder / "final.parquet")
    code, out, err = run_cli(
        "report", tmp_path / "catrs" / "final.parquet", tmp_path / "gaussian" / "final.parquet", "--json"
    )
    assert code == 0, err
    assert set(json.loads(out)) == {"catrs/final", "gaussian/final"}
