"""`catrs report` says what a result holds (issue 33): no ACR for no rows, the corruptions and severities a
Table 3 covers ("partial" where some are missing), the ℓ∞ view of the data set each file records, and one JSON
shape for one source or several."""

from __future__ import annotations

import json

import pandas as pd

from catrs.data.digits_c import CORRUPTIONS, SEVERITIES
from catrs.results import read_results
from tests.helpers import REFERENCE_TSV, certify_digits

HEADER_ONLY = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


def _recording(path, dataset, rows=20):
    """The reference rows (the first `rows`) as Parquet that records `dataset`."""
    read_results(REFERENCE_TSV).head(rows).assign(dataset=dataset).to_parquet(path)
    return path


def test_a_result_of_no_rows_gives_no_acr(run_cli, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text(HEADER_ONLY)
    code, text, err = run_cli("report", empty)
    assert code == 0, err
    assert "0 rows; no rows, so no ACR or accuracy" in text and "ACR" not in text.replace("no ACR", "")
    report = json.loads(run_cli("report", empty, "--json")[1])
    assert report["count"] == 0 and report["acr"] is None and report["certified_accuracy"] == {}
    assert report["clean_accuracy"] is None and report["abstain_rate"] is None
    code, text, err = run_cli("report", empty, REFERENCE_TSV, "--radii", "0", "0.5")
    assert code == 0, err
    assert [line.split() for line in text.splitlines() if line.startswith("empty")] == [["empty", "–", "–", "–"]]


def _corruption_rows(path, blocks, dataset="digits_c"):
    """A result file recording `dataset` with one correct row (radius 0.5) per (corruption, severity) block."""
    rows = [
        dict(idx=i, label=1, predict=1, correct=1, radius=0.5, corruption=c, severity=s, dataset=dataset)
        for i, (c, s) in enumerate(blocks)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_corruption_results_name_what_they_cover_and_say_partial(run_cli, tmp_path):
    every = [(c, s) for c in CORRUPTIONS for s in range(1, SEVERITIES + 1)]
    complete = _corruption_rows(tmp_path / "complete.parquet", every)
    code, text, err = run_cli("report", complete)
    assert code == 0, err
    assert "complete: 12 corruptions at severities 1–5, every corruption and severity of digits_c" in text
    assert "partial" not in text
    partial = _corruption_rows(tmp_path / "partial.parquet", [(c, s) for c, s in every if s != 5][:-1])
    text = run_cli("report", partial)[1]
    assert "partial: 12 corruptions at severities 1–4 of digits_c; missing severity 5 of gaussian_noise" in text
    assert "severities 4–5 of translate" in text
    report = json.loads(run_cli("report", partial, "--json")[1])
    assert report["coverage"]["partial"] and report["coverage"]["missing"]["translate"] == [4, 5]
    text = run_cli("report", complete, partial, "--markdown")[1]
    assert "complete: 12 corruptions" in text and "partial: 12 corruptions at severities 1–4" in text


def test_certify_corruptions_cut_short_says_partial(run_cli, digits_checkpoint, tmp_path):
    """The issue's case: `--max 10` certifies one corruption at one severity, which was reported as
    "averaged over severities" like the whole benchmark."""
    out = tmp_path / "c.parquet"
    options = ("--corruptions", "--max", "10", "--n0", "10", "--n", "50", "--inference", "eager", "--out", out)
    code, text, err = run_cli(*certify_digits(digits_checkpoint, *options))
    assert code == 0, err
    assert "partial: 1 corruption at severity 1 of digits_c; missing 11 corruptions (shot_noise, " in text
    assert "; severities 2–5 of gaussian_noise" in text


def test_linf_uses_the_data_set_each_file_records(run_cli, tmp_path):
    a, b = _recording(tmp_path / "a.parquet", "digits"), _recording(tmp_path / "b.parquet", "digits", rows=10)
    code, text, err = run_cli("report", a, b, "--linf", "--radii", "0.5")
    assert code == 0, err  # both record their data set: no --dataset needed
    assert "ℓ∞ radius" in text and f"{0.5 / 8:.4f}" in text  # digits: d = 64
    code, text, err = run_cli("report", a, "--linf", "--radii", "0.5")
    assert code == 0, err
    assert f"{0.5 / 8:.4f}" in text
    # The corrupted copy has the clean set's input size: no contradiction.
    assert run_cli("report", a, "--linf", "--dataset", "digits_c")[0] == 0


def test_one_json_shape_for_one_source_or_several(run_cli, tmp_path):
    a, b = _recording(tmp_path / "a.parquet", "digits"), _recording(tmp_path / "b.parquet", "digits", rows=10)
    alone = json.loads(run_cli("report", a, "--json")[1])
    together = json.loads(run_cli("report", a, b, "--json")[1])
    assert set(together) == {"a", "b"} and together["a"] == alone
    assert together["b"]["provenance"] == {"dataset": "digits"} and together["b"]["count"] == 10
    assert 0 <= together["b"]["acr"] and all(0 <= v <= 1 for v in together["b"]["certified_accuracy"].values())
    labelled = json.loads(run_cli("report", f"A={a}", "--json")[1])
    assert labelled == alone


def test_a_labelled_source_reads_as_the_source_alone(run_cli, tmp_path):
    a = _recording(tmp_path / "a.parquet", "digits")
    assert run_cli("report", f"A={a}", "--radii", "0.25")[1] == run_cli("report", a, "--radii", "0.25")[1]
