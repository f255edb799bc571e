"""SIGTERM and SIGINT (issue 20): a stopped command saves what is finished, says so truthfully, ends its MLflow
run KILLED with the signal, exits 143 or 130, and the same command resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.checkpoint import load_checkpoint
from catrs.results import read_results
from catrs.sampling import SamplingProtocol
from tests.helpers import quiet_context

pytestmark = pytest.mark.slow
RESEARCH = ["idx", "label", "predict", "radius", "correct"]


def _catrs(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "catrs.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _run_named(name: str):
    client = MlflowClient()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"attributes.run_name = '{name}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0]


def _certify_args(checkpoint: Path, out: Path) -> list[object]:
    """60 images in groups of 20 (n0 = 20, batch 400)."""
    protocol = ["--n0", "20", "--n", "400", "--batch", "400", "--max", "60", "--inference", "eager"]
    return ["certify", "--checkpoint", checkpoint, "--dataset", "digits", *protocol, "--out", out]


def test_sigterm_mid_certification_saves_the_finished_rows_and_the_same_command_resumes(
    digits_checkpoint, faults, tmp_path
):
    out = tmp_path / "stopped.parquet"
    command = _certify_args(digits_checkpoint, out)
    faults.hold("certify.group", 40)  # two groups certified, the third not begun
    stopped = _catrs(*command)
    faults.held_on("certify.group", 40)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"catrs: stopped by SIGTERM; saved: 40 rows in {out}; run the same command again to resume"
    )
    assert read_results(out)["idx"].tolist() == list(range(40))
    run = _run_named(out.name)
    assert run.info.status == "KILLED" and run.data.tags["catrs.ended_by"] == "SIGTERM"

    resumed = _catrs(*command)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    settings = CertifySettings(SamplingProtocol(n0=20, n=400, batch=400), inference="eager")
    clean = CertifyRequest(digits_checkpoint, "digits", None, tmp_path / "clean.parquet", settings, max_index=60)
    expected = read_results(run_certification(clean, quiet_context()))[RESEARCH]
    pd.testing.assert_frame_equal(read_results(out)[RESEARCH], expected)  # the same rows as an unstopped run


def test_sigint_before_the_first_image_says_that_nothing_was_saved(digits_checkpoint, faults, tmp_path):
    out = tmp_path / "early.parquet"
    faults.hold("certify.group", 0)
    early = _catrs(*_certify_args(digits_checkpoint, out))
    faults.held_on("certify.group", 0)
    early.send_signal(signal.SIGINT)
    _, err = early.communicate(timeout=120)
    assert early.returncode == 130, err
    assert err.strip().splitlines()[-1] == "catrs: stopped by SIGINT before anything was finished; nothing was saved"
    assert not out.exists() and not out.with_name(out.name + ".lock").exists()
    assert _run_named(out.name).data.tags["catrs.ended_by"] == "SIGINT"


def test_sigterm_mid_training_keeps_the_last_epoch_and_the_same_command_resumes(faults, tmp_path):
    out = tmp_path / "run"
    command = ["train", "--method", "gaussian", "--dataset", "synthetic", "--epochs", "3", "--out", out]
    faults.hold("train.epoch", "1:0")  # after epoch 2's steps, before its checkpoint
    stopped = _catrs(*command)
    faults.held_on("train.epoch", "1:0")
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"catrs: stopped by SIGTERM; saved: epoch 1 of 3 in {out / 'checkpoint.pt'}; run the same command again "
        f"to resume"
    )
    assert load_checkpoint(out / "checkpoint.pt").training_state["next_epoch"] == 1
    run = _run_named(out.name)
    assert run.info.status == "KILLED" and run.data.tags["catrs.ended_by"] == "SIGTERM"
    assert not Path(f"{out}.lock").exists()

    resumed = _catrs(*command)
    output, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    trained = [int(line.split()[1].rstrip(":")) for line in output.splitlines() if line.startswith("epoch ")]
    assert trained == [2, 3]  # from the saved epoch on, nothing twice
