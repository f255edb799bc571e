"""The bad-input catalogue: each case ends in one line `catrs: error: …`, exit code 2, and leaves every file
that existed exactly as it was (and writes none)."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from catrs.checkpoint import save_checkpoint
from tests.helpers import REFERENCE_TSV, make_card


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _certify(checkpoint, out, *extra):
    return [
        "certify",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "digits",
        "--sigma",
        "0.5",
        "--n0",
        "10",
        "--n",
        "50",
        "--inference",
        "eager",
        "--out",
        out,
        *extra,
    ]


def truncated_checkpoint(tmp, good):
    (tmp / "torn.pt").write_bytes(good.read_bytes()[:1500])
    return _certify(tmp / "torn.pt", tmp / "o.parquet"), "truncated or not a PyTorch checkpoint"


def foreign_checkpoint(tmp, good):
    torch.save({"state_dict": {}}, tmp / "foreign.pt")
    return _certify(tmp / "foreign.pt", tmp / "o.parquet"), "is not a catrs checkpoint"


def malicious_checkpoint(tmp, good):
    (tmp / "evil.pt").write_bytes(pickle.dumps(Exploit()))
    return _certify(tmp / "evil.pt", tmp / "o.parquet"), "refused to load"


def checkpoint_of_another_arch(tmp, good):
    card = make_card()
    save_checkpoint(tmp / "liar.pt", card.build_model(), make_card(arch="lenet"))
    return _certify(tmp / "liar.pt", tmp / "o.parquet"), "do not fit architecture lenet"


def missing_data_directory(tmp, good):
    card = make_card("mnist")
    save_checkpoint(tmp / "mnist.pt", card.build_model(), card)
    return (
        [
            "certify",
            "--checkpoint",
            tmp / "mnist.pt",
            "--dataset",
            "mnist",
            "--sigma",
            "0.5",
            "--data-root",
            tmp / "nowhere",
            "--out",
            tmp / "o.parquet",
        ],
        "pass --download",
    )


def data_of_the_wrong_shape(tmp, good):
    card = make_card("mnist")
    save_checkpoint(tmp / "mnist.pt", card.build_model(), card)
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((3, 20, 20)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.zeros(3))
    return (
        [
            "certify",
            "--checkpoint",
            tmp / "mnist.pt",
            "--dataset",
            "mnist",
            "--sigma",
            "0.5",
            "--data-root",
            tmp / "data",
            "--out",
            tmp / "o.parquet",
        ],
        "has images of shape (1, 20, 20), expected (1, 28, 28)",
    )


def output_with_other_provenance(tmp, good):
    import pandas as pd

    pd.DataFrame(
        {
            "idx": [0],
            "label": [1],
            "predict": [1],
            "radius": [0.5],
            "correct": [1],
            "time": [1.0],
            "mode": ["certify"],
            "dataset": ["digits"],
            "split": ["test"],
            "n0": [10],
            "n": [999],
            "alpha": [0.001],
            "sigma": [0.5],
            "seed": [0],
            "mixed_precision": [False],
            "checkpoint_sha256": ["x"],
        }
    ).to_parquet(tmp / "old.parquet")
    return _certify(good, tmp / "old.parquet"), "holds results with other provenance"


def output_that_is_torn(tmp, good):
    (tmp / "torn.parquet").write_bytes(b"PAR1" + b"\x00" * 40)
    return _certify(good, tmp / "torn.parquet"), "truncated or not a Parquet/TSV result file"


def foreign_tsv_output(tmp, good):
    (tmp / "theirs.tsv").write_bytes(REFERENCE_TSV.read_bytes()[:2000].rsplit(b"\n", 1)[0] + b"\n")
    return _certify(good, tmp / "theirs.tsv"), "has no theirs.tsv.provenance.json"


CASES = {
    "truncated checkpoint": truncated_checkpoint,
    "foreign checkpoint": foreign_checkpoint,
    "malicious pickle": malicious_checkpoint,
    "checkpoint of another architecture": checkpoint_of_another_arch,
    "missing data directory": missing_data_directory,
    "data of the wrong shape": data_of_the_wrong_shape,
    "output with other provenance": output_with_other_provenance,
    "torn output": output_that_is_torn,
    "foreign TSV output": foreign_tsv_output,
    "negative workers": lambda tmp, good: (_certify(good, tmp / "o.parquet", "--workers", "-1"), "--workers must be"),
    "zero chunk size": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--workers", "1", "--chunk-size", "0"),
        "--chunk-size must be",
    ),
    "unknown storage scheme": lambda tmp, good: (_certify(good, "nosuch://bucket/o.parquet"), "cannot open storage"),
    "predict with alpha 0": lambda tmp, good: (
        [
            "predict",
            "--checkpoint",
            good,
            "--dataset",
            "digits",
            "--sigma",
            "0.5",
            "--alpha",
            "0",
            "--out",
            tmp / "o.parquet",
        ],
        "--alpha must lie",
    ),
    "unknown split": lambda tmp, good: (_certify(good, tmp / "o.parquet", "--split", "dev"), "unknown split 'dev'"),
    "missing required option": lambda tmp, good: (["certify", "--dataset", "digits"], "are required"),
    "unknown command": lambda tmp, good: (["fit"], "invalid choice"),
    "report of a missing file": lambda tmp, good: (["report", tmp / "absent.parquet"], "result file not found"),
    "report at a negative radius": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--radii", "-1"],
        "radius must be non-negative",
    ),
    "report with an unknown dataset": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--dataset", "svhn", "--linf"],
        "unknown dataset 'svhn'",
    ),
    "train config missing": lambda tmp, good: (
        ["train", "--config", tmp / "absent.yaml", "--out", tmp / "r"],
        "config file not found",
    ),
    "train with negative workers": lambda tmp, good: (
        ["train", "--method", "gaussian", "--dataset", "synthetic", "--workers", "-1", "--out", tmp / "r"],
        "--workers and --gpus-per-worker must be",
    ),
    "train with a non-positive lr": lambda tmp, good: (
        ["train", "--method", "gaussian", "--lr", "0", "--out", tmp / "r"],
        "--lr must be positive",
    ),
    "tune a missing file": lambda tmp, good: (["tune", tmp / "absent.yaml"], "search space not found"),
    "tune with zero samples": lambda tmp, good: (
        ["tune", "demo_digits", "--num-samples", "0"],
        "--num-samples must be a positive integer",
    ),
    "tune an unknown shipped name": lambda tmp, good: (
        ["tune", "nosuchspace"],
        "'nosuchspace' is neither a file nor a shipped space",
    ),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(run_cli, digits_checkpoint, tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show in the snapshot too
    args, message = CASES[case](tmp_path, digits_checkpoint)
    before = _snapshot(tmp_path)
    code, out, err = run_cli(*args)
    assert code == 2, (case, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("catrs: error:"), err
    assert message in err, err
    assert _snapshot(tmp_path) == before
    assert "this must never run" not in out
