"""Corruption data sets in their published layouts (generated small here), certification per corruption, and
the paper's Table 3 averaging."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from catrs.checkpoint import save_checkpoint
from catrs.data import get_dataset
from catrs.data.corruptions import CIFAR10_C
from catrs.errors import UserError
from catrs.metrics import corruption_table
from catrs.results import read_results
from tests.helpers import make_card

PER_SEVERITY = 4  # images per severity in the generated CIFAR-10-C (10,000 in the real one)


@pytest.fixture
def cifar10_c(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(PER_SEVERITY) % 10, 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    for corruption in CIFAR10_C[:2]:
        np.save(folder / f"{corruption}.npy", rng.integers(0, 256, (5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8))
    return tmp_path


def test_cifar10_c_reads_the_published_layout_with_corruption_and_severity(cifar10_c):
    data = get_dataset("cifar10_c", "test", cifar10_c)
    assert len(data) == 2 * 5 * PER_SEVERITY
    raw = np.load(cifar10_c / "CIFAR-10-C" / f"{CIFAR10_C[1]}.npy")
    index = 5 * PER_SEVERITY + 2 * PER_SEVERITY + 3  # second corruption, severity 3, image 3
    assert data.layout(index) == (CIFAR10_C[1], 3, 3)
    _, x, y = data[index]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, torch.from_numpy(raw[2 * PER_SEVERITY + 3] / 255.0).float().permute(2, 0, 1))


def test_mnist_c_reads_one_folder_per_corruption(tmp_path):
    for corruption in ("fog", "rotate"):
        folder = tmp_path / "mnist_c" / corruption
        folder.mkdir(parents=True)
        np.save(folder / "test_images.npy", np.full((3, 28, 28, 1), 255, np.uint8))
        np.save(folder / "test_labels.npy", np.array([1, 2, 3], np.uint8))
    data = get_dataset("mnist_c", "test", tmp_path)
    assert len(data) == 6 and data.layout(4) == ("fog", 1, 1) and data[4][2] == 2  # MNIST-C order: rotate, fog
    assert float(data[4][1].max()) == 1.0


def test_missing_corruption_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-10-C/labels.npy and .*<corruption>.npy"):
        get_dataset("cifar10_c", "test", tmp_path)
    with pytest.raises(UserError, match=r"mnist_c/<corruption>/test_images.npy"):
        get_dataset("mnist_c", "test", tmp_path)


def test_table3_averages_over_severities_then_corruptions():
    rows = []
    # fog: severity 1 all correct (radius 1), severity 2 half correct (radius 0.5); snow: all wrong.
    for severity, correct in ((1, [1, 1]), (2, [1, 0])):
        for i, c in enumerate(correct):
            rows.append(
                dict(
                    corruption="fog",
                    severity=severity,
                    idx=i,
                    correct=c,
                    radius=1.0 if severity == 1 else 0.5,
                    label=0,
                    predict=0 if c else 1,
                )
            )
    rows += [dict(corruption="snow", severity=1, idx=9, correct=0, radius=0.0, label=0, predict=-1)]
    table = corruption_table(pd.DataFrame(rows))
    assert table.loc["fog", "accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert table.loc["fog", "acr"] == pytest.approx((1.0 + 0.25) / 2)
    assert table.loc["snow", "accuracy"] == 0.0
    assert table.loc["mean", "accuracy"] == pytest.approx(0.75 / 2)
    assert table.loc["mean", "acr"] == pytest.approx(0.625 / 2)


def test_certify_corruptions_end_to_end(run_cli, cifar10_c, tmp_path):
    card = make_card("cifar10", arch="cifar_resnet20")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "c10.pt", card.build_model(), card)
    out = tmp_path / "c.parquet"
    code, stdout, err = run_cli(
        "certify",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "cifar10",
        "--corruptions",
        "--sigma",
        "0.5",
        "--data-root",
        cifar10_c,
        "--skip",
        "2",
        "--n0",
        "8",
        "--n",
        "32",
        "--inference",
        "eager",
        "--out",
        out,
    )
    assert code == 0, err
    frame = read_results(out)
    assert len(frame) == 2 * 5 * PER_SEVERITY // 2 and set(frame["severity"]) == {1, 2, 3, 4, 5}
    assert "mean (mAcc, mACR)" in stdout
    report = json.loads(run_cli("report", out, "--json")[1])
    assert set(report["corruptions"]) == set(CIFAR10_C[:2])
    assert report["mACR"] == pytest.approx(corruption_table(frame).loc["mean", "acr"])


def _corruption_results(path, blocks):
    """A result file of (corruption, severity, [correct…], radius of the correct ones) blocks, in index order."""
    rows = []
    for corruption, severity, correct, radius in blocks:
        for c in correct:
            rows.append(
                dict(
                    idx=len(rows),
                    label=1,
                    predict=1 if c else 0,
                    correct=c,
                    radius=radius if c else 0.0,
                    corruption=corruption,
                    severity=severity,
                )
            )
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def two_corruption_results(tmp_path):
    # A: fog 75 % (ACR 0.625), snow 0 %, frost 100 % (0.3) → mAcc 58.3, mACR 0.308.
    # B: fog 25 % (ACR 0.1), snow 100 % (0.6), no frost → mAcc 62.5, mACR 0.350.
    a = _corruption_results(
        tmp_path / "A.parquet",
        [("fog", 1, [1, 1], 1.0), ("fog", 2, [1, 0], 0.5), ("snow", 1, [0, 0], 0.0), ("frost", 1, [1, 1], 0.3)],
    )
    b = _corruption_results(
        tmp_path / "B.parquet", [("fog", 1, [1, 0], 0.4), ("fog", 2, [0, 0], 0.0), ("snow", 1, [1, 1], 0.6)]
    )
    return a, b


def test_table3_compares_results_per_corruption_with_the_best_of_every_row_marked(
    run_cli, two_corruption_results, tmp_path
):
    plot = tmp_path / "table3.png"
    code, out, err = run_cli("report", *two_corruption_results, "--markdown", "--plot", plot)
    assert code == 0, err
    assert (
        "| corruption | A | B |\n|---|---|---|\n| fog | **75.0** | 25.0 |\n| snow | 0.0 | **100.0** |\n"
        "| frost | **100.0** | – |\n| mAcc | 58.3 | **62.5** |"
    ) in out
    assert (
        "| fog | **0.625** | 0.100 |\n| snow | 0.000 | **0.600** |\n| frost | **0.300** | – |\n"
        "| mACR | 0.308 | **0.350** |"
    ) in out
    import matplotlib.image

    pixels = matplotlib.image.imread(plot)
    assert pixels.shape[0] > 200 and pixels.std() > 0.05  # not a blank canvas
    reports = json.loads(run_cli("report", *two_corruption_results, "--json")[1])
    assert "frost" not in reports["B"]["corruptions"] and reports["A"]["mACR"] == pytest.approx(0.925 / 3)
    # Each result says what it covers: fog at two severities, the others at one of them.
    assert reports["A"]["coverage"]["missing"] == {"snow": [2], "frost": [2]}
    assert reports["B"]["coverage"]["corruptions"] == {"fog": [1, 2], "snow": [1]}
    assert "A: partial: 3 corruptions at severities 1–2; missing severity 2 of snow; severity 2 of frost" in out


def test_table3_refuses_to_mix_corruption_and_clean_results(run_cli, two_corruption_results, tmp_path):
    clean = pd.read_parquet(two_corruption_results[0]).drop(columns=["corruption", "severity"])
    clean.to_parquet(tmp_path / "clean.parquet")
    code, out, err = run_cli("report", two_corruption_results[0], tmp_path / "clean.parquet")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "clean holds no corruption rows" in err
