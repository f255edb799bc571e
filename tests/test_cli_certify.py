"""`catrs certify` / `predict` end to end: result files, provenance, resume, and one-line refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catrs.results import CERTIFY_COLUMNS, read_results
from tests.helpers import certify_digits, quiet_context

FAST = ["--n0", "20", "--n", "200", "--batch", "400", "--inference", "eager"]


def certify(run_cli, checkpoint, out, *extra):
    return run_cli(
        "certify", "--checkpoint", checkpoint, "--dataset", "digits", "--sigma", "0.5", "--out", out, *FAST, *extra
    )


def test_certify_writes_one_row_per_selected_image_with_provenance(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "cert.parquet"
    code, stdout, err = certify(run_cli, digits_checkpoint, out, "--skip", "3", "--max", "30")
    assert code == 0, err
    frame = pq.read_table(out).to_pandas()
    assert frame["idx"].tolist() == list(range(0, 30, 3))
    assert set(CERTIFY_COLUMNS) <= set(frame.columns)
    first = frame.iloc[0]
    assert (first["n0"], first["n"], first["alpha"], first["sigma"], first["seed"]) == (20, 200, 0.001, 0.5, 0)
    assert first["checkpoint"] == str(digits_checkpoint) and len(first["checkpoint_sha256"]) == 64
    assert not first["mixed_precision"]
    assert ((frame["predict"] == -1) == (frame["radius"] == 0)).all()
    assert (frame["correct"] == (frame["predict"] == frame["label"])).all()
    assert "catrs report" in stdout


def test_sigma_defaults_to_the_checkpoints_and_the_published_protocol_fills_the_rest(
    run_cli, digits_checkpoint, tmp_path
):
    from catrs.sampling import SamplingProtocol

    out = tmp_path / "cert.parquet"
    code, _, err = run_cli(
        "certify",
        "--checkpoint",
        digits_checkpoint,
        "--dataset",
        "digits",
        "--out",
        out,
        "--n",
        "200",
        "--batch",
        "400",
        "--max",
        "2",
    )
    assert code == 0, err
    first = pq.read_table(out).to_pandas().iloc[0]
    published = SamplingProtocol()
    assert (first["sigma"], first["n0"], first["alpha"]) == (0.5, published.n0, published.alpha)


def test_certify_on_val_names_the_training_images_it_certified_and_resumes(run_cli, digits_checkpoint, tmp_path):
    from catrs.data import get_dataset

    val = get_dataset("digits", "val")
    out = tmp_path / "val.parquet"
    code, _, err = certify(run_cli, digits_checkpoint, out, "--split", "val", "--skip", "7", "--max", "30")
    assert code == 0, err
    frame = pq.read_table(out).to_pandas()
    assert frame["idx"].tolist() == [val.key(p) for p in range(0, 30, 7)]  # positions in val, training indices
    assert frame["split"].unique().tolist() == ["val"]
    assert frame["label"].tolist() == [val[p][2] for p in range(0, 30, 7)]
    code, _, err = certify(run_cli, digits_checkpoint, out, "--split", "val", "--skip", "7", "--max", "60")
    assert code == 0, err  # a resume keyed by training index: the first five rows are kept, four more added
    assert pq.read_table(out).to_pandas()["idx"].tolist() == [val.key(p) for p in range(0, 60, 7)]


def test_resume_skips_finished_images_and_equals_an_uninterrupted_run(run_cli, digits_checkpoint, tmp_path):
    whole, pieces = tmp_path / "whole.parquet", tmp_path / "pieces.parquet"
    assert certify(run_cli, digits_checkpoint, whole, "--max", "12")[0] == 0
    assert certify(run_cli, digits_checkpoint, pieces, "--max", "5")[0] == 0
    # Resume with another batch size: rows already there are kept, the rest are added.
    assert certify(run_cli, digits_checkpoint, pieces, "--max", "12", "--batch", "400")[0] == 0
    a, b = read_results(whole), read_results(pieces)
    research = ["idx", "label", "predict", "radius", "correct"]
    pd.testing.assert_frame_equal(a[research], b[research])
    assert b["idx"].is_unique


def _mlflow_runs() -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=50_000))


def test_rerunning_a_finished_certification_says_it_is_complete_and_adds_no_run(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "cert.parquet"
    assert certify(run_cli, digits_checkpoint, out, "--max", "4")[0] == 0
    before, runs = out.read_bytes(), _mlflow_runs()
    code, text, err = certify(run_cli, digits_checkpoint, out, "--max", "4")
    assert code == 0, err
    assert f"{out} is complete: all 4 images; nothing to do, no run added" in text
    assert out.read_bytes() == before and _mlflow_runs() == runs
    assert certify(run_cli, digits_checkpoint, out, "--max", "6")[0] == 0  # more images: work, and a run
    assert len(read_results(out)) == 6 and _mlflow_runs() == runs + 1


def test_tsv_output_is_the_research_format_and_resumes(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "cert.tsv"
    assert certify(run_cli, digits_checkpoint, out, "--max", "4")[0] == 0
    assert out.read_text().splitlines()[0].split("\t") == CERTIFY_COLUMNS
    assert certify(run_cli, digits_checkpoint, out, "--max", "8")[0] == 0
    frame = pd.read_csv(out, sep="\t")
    assert frame["idx"].tolist() == list(range(8))
    assert frame["time"].str.match(r"\d+:\d\d:\d\d").all()
    parquet = tmp_path / "cert.parquet"
    certify(run_cli, digits_checkpoint, parquet, "--max", "8")
    pd.testing.assert_frame_equal(
        read_results(out)[["idx", "predict", "radius"]], read_results(parquet)[["idx", "predict", "radius"]]
    )
    # The sidecar names the data set, so the ℓ∞ view needs no --dataset (a research TSV without one does).
    code, text, err = run_cli("report", out, "--linf")
    assert code == 0, err
    assert "radius (ℓ∞)" in text and f"{0.25 / 8:.4f}" in text  # digits: d = 64, r/√d


def test_a_name_that_says_no_format_takes_format(run_cli, digits_checkpoint, tmp_path):
    """Cohen et al.'s names (`sigma_0.50`) say no format: --format decides, Parquet without it; read back either way."""
    code, _, err = certify(run_cli, digits_checkpoint, tmp_path / "sigma_0.50", "--max", "2", "--format", "tsv")
    assert code == 0, err
    assert (tmp_path / "sigma_0.50").read_text().splitlines()[0].split("\t") == CERTIFY_COLUMNS
    code, _, err = certify(run_cli, digits_checkpoint, tmp_path / "cert", "--max", "2")
    assert code == 0, err
    assert (tmp_path / "cert").read_bytes()[:4] == b"PAR1"


def test_predict_writes_predictions(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "pred.parquet"
    code, _, err = run_cli(
        "predict",
        "--checkpoint",
        digits_checkpoint,
        "--dataset",
        "digits",
        "--sigma",
        "0.5",
        "--n",
        "300",
        "--batch",
        "300",
        "--max",
        "6",
        "--inference",
        "eager",
        "--out",
        out,
    )
    assert code == 0, err
    frame = read_results(out)
    assert frame["idx"].tolist() == list(range(6)) and "radius" not in frame.columns


def test_mixed_precision_is_recorded_and_reported(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "amp.parquet"
    assert certify(run_cli, digits_checkpoint, out, "--max", "3", "--mixed-precision")[0] == 0
    assert read_results(out)["mixed_precision"].all()
    code, text, _ = run_cli("report", out)
    assert "mixed precision" in text
    code, text, _ = run_cli("report", out, "--json")
    assert json.loads(text)["provenance"]["mixed_precision"] is True


def test_existing_output_with_other_provenance_is_left_untouched(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "cert.parquet"
    certify(run_cli, digits_checkpoint, out, "--max", "3")
    before = out.read_bytes()
    code, _, err = run_cli(
        *certify_digits(digits_checkpoint),
        "--out",
        out,
        "--n0",
        "20",
        "--n",
        "999",
        "--batch",
        "400",
        "--max",
        "6",
    )
    assert code == 2 and "other provenance" in err and "n: file 200 vs request 999" in err
    assert out.read_bytes() == before


def test_adaptive_certify_records_each_images_samples_and_refuses_to_mix_procedures(
    run_cli, digits_checkpoint, tmp_path
):
    out = tmp_path / "adaptive.parquet"
    adaptive = ["--n", "2000", "--adaptive", "--tolerance", "0.05"]  # at this n, the default gives all of it
    code, _, err = certify(run_cli, digits_checkpoint, out, "--max", "12", *adaptive)
    assert code == 0, err
    frame = pq.read_table(out).to_pandas()
    assert (frame["procedure"] == "adaptive").all() and (frame["tolerance"] == 0.05).all()
    assert (frame["samples"] == frame["pilot_samples"] + frame["estimation_samples"]).all()
    assert (frame["pilot_samples"] >= 20).all() and (frame["estimation_samples"] <= 2000).all()
    assert frame["estimation_samples"].nunique() > 1  # each image got its own n
    code, report, _ = run_cli("report", out)
    assert code == 0 and f"samples per image {frame['samples'].mean():,.0f} (pilot" in report
    before = out.read_bytes()
    for other in (["--n", "2000"], ["--n", "2000", "--adaptive"]):  # fixed n; the default tolerance
        code, _, err = certify(run_cli, digits_checkpoint, out, "--max", "24", *other)
        assert code == 2 and "other provenance" in err and ("procedure" in err or "tolerance" in err)
    assert out.read_bytes() == before
    code, _, err = certify(run_cli, digits_checkpoint, tmp_path / "x.parquet", "--adaptive", "--tolerance", "-1")
    assert code == 2 and "--tolerance must lie between 0 and 1" in err


def test_predict_has_no_adaptive_form(digits_checkpoint, tmp_path):
    from catrs.certify import CertifyRequest, CertifySettings, prepare_certification
    from catrs.errors import UserError
    from catrs.sampling import Mode, SamplingProtocol

    request = CertifyRequest(
        digits_checkpoint, "digits", None, tmp_path / "p.parquet", CertifySettings(SamplingProtocol(adaptive=True))
    )
    with pytest.raises(UserError, match="PREDICT has no adaptive form"):
        prepare_certification(replace(request, mode=Mode.PREDICT), quiet_context())
    assert not (tmp_path / "p.parquet").exists()


def test_a_fixed_n_file_written_before_rows_recorded_samples_resumes(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "old.parquet"
    certify(run_cli, digits_checkpoint, out, "--max", "3")
    old = pq.read_table(out).to_pandas().drop(columns=["samples", "procedure", "tolerance"])
    pq.write_table(pa.Table.from_pandas(old, preserve_index=False), out)
    code, _, err = certify(run_cli, digits_checkpoint, out, "--max", "6")
    assert code == 0, err
    frame = pq.read_table(out).to_pandas()
    assert frame["idx"].tolist() == list(range(6)) and (frame["samples"] == 20 + 200).all()
    assert (frame["procedure"] == "fixed").all()


# (case, options replaced in a valid command, what the one-line error must say)
BAD_INPUTS = [
    ("unknown dataset", {"--dataset": "svhn"}, "unknown dataset 'svhn'"),
    ("zero sigma", {"--sigma": "0"}, "was trained at sigma=0.5, not 0: leave --sigma out"),
    ("negative sigma", {"--sigma": "-1"}, "was trained at sigma=0.5, not -1: leave --sigma out"),
    ("alpha zero", {"--alpha": "0"}, "--alpha must lie strictly between 0 and 0.5"),
    ("alpha above one", {"--alpha": "1.5"}, "--alpha must lie strictly between 0 and 0.5"),
    ("n0 zero", {"--n0": "0"}, "--n0 must be a positive integer"),
    ("n negative", {"--n": "-5"}, "--n must be a positive integer"),
    ("batch zero", {"--batch": "0"}, "--batch must be a positive integer"),
    ("skip zero", {"--skip": "0"}, "--skip must be a positive integer"),
    ("n not a number", {"--n": "many"}, "invalid int value"),
    ("unknown inference mode", {"--inference": "turbo"}, "unknown --inference"),
    ("missing checkpoint", {"--checkpoint": "{tmp}/nope.pt"}, "checkpoint not found"),
    ("sigma mismatch", {"--sigma": "0.25"}, "trained at sigma=0.5, not 0.25"),
    ("dataset mismatch", {"--dataset": "synthetic"}, "trained on 'digits'"),
    ("missing output directory", {"--out": "{tmp}/no/dir.parquet"}, "output directory does not exist"),
    ("tolerance without adaptive", {"--tolerance": "0.05"}, "--tolerance applies to adaptive certification only"),
]


@pytest.mark.parametrize("case,changes,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(run_cli, digits_checkpoint, tmp_path, case, changes, message):
    options = {
        "--checkpoint": str(digits_checkpoint),
        "--dataset": "digits",
        "--sigma": "0.5",
        "--out": str(tmp_path / "new.parquet"),
        "--n0": "20",
        "--n": "200",
        "--batch": "400",
        "--skip": "1",
        "--alpha": "0.001",
        "--inference": "eager",
    }
    options.update({k: v.format(tmp=tmp_path) for k, v in changes.items()})
    code, out, err = run_cli("certify", *[item for pair in options.items() for item in pair])
    assert code == 2, (case, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("catrs: error:")
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.pt"]  # nothing written


def test_console_script_fails_without_a_traceback(digits_checkpoint, tmp_path):
    catrs = shutil.which("catrs", path=str(Path(sys.executable).parent))
    done = subprocess.run(
        [
            catrs,
            "certify",
            "--checkpoint",
            str(digits_checkpoint),
            "--dataset",
            "digits",
            "--sigma",
            "0.3",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
