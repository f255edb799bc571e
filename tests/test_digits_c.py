"""`digits_c`, the generated corruptions of the embedded digits test split: layout, determinism, and severity
as the only thing that changes between levels."""

from __future__ import annotations

from itertools import pairwise

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from catrs.cli import _build_parser
from catrs.context import resolve_tracking_uri
from catrs.data import corrupted_variant, get_dataset
from catrs.data.digits import TEST_SIZE, load_digits_split
from catrs.data.digits_c import CORRUPTIONS, SEVERITIES, corrupt
from catrs.errors import UserError
from catrs.metrics import corruption_table
from catrs.results import read_results
from catrs.sweep.console import SweepOutcome, next_commands
from catrs.sweep.space import find_search_space, load_search_space

CLEAN = load_digits_split("test", None, False)


def test_every_corruption_and_severity_of_every_test_image_in_order():
    data = get_dataset("digits_c", "test")
    assert len(data) == len(CORRUPTIONS) * SEVERITIES * TEST_SIZE
    names = list(CORRUPTIONS)
    index = (2 * SEVERITIES + 3) * TEST_SIZE + 17  # third corruption, severity 4, test image 17
    assert data.layout(index) == (names[2], 4, 17)
    _, x, y = data[index]
    assert y == int(CLEAN.labels[17])
    expected = corrupt(CLEAN.images, names[2], 4)[17]
    assert x.shape == (1, 8, 8) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(x, expected, atol=0.5 / 255 + 1e-6)  # stored as 8-bit images


def test_corruptions_are_the_same_on_every_call_and_differ_from_the_clean_images():
    for name in CORRUPTIONS:
        first, second = corrupt(CLEAN.images, name, 3), corrupt(CLEAN.images, name, 3)
        assert torch.equal(first, second), name
        assert not torch.allclose(first, CLEAN.images), name


def test_each_severity_is_further_from_the_clean_images_than_the_last():
    for name in CORRUPTIONS:
        distances = [
            float((corrupt(CLEAN.images, name, s) - CLEAN.images).flatten(1).norm(dim=1).mean())
            for s in range(1, SEVERITIES + 1)
        ]
        assert all(a < b for a, b in pairwise(distances)), (name, distances)


def test_severities_share_their_random_draws():
    """Gaussian noise at severity 2 is severity 1's noise scaled by the ratio of their levels (unclipped pixels)."""
    low, high = CORRUPTIONS["gaussian_noise"][1][:2]
    noisy_1, noisy_2 = (corrupt(CLEAN.images, "gaussian_noise", s) for s in (1, 2))
    inside = (noisy_1 > 0) & (noisy_1 < 1) & (noisy_2 > 0) & (noisy_2 < 1)  # clipped pixels sit at exactly 0 or 1
    assert inside.float().mean() > 0.2
    clean = CLEAN.images[inside]
    torch.testing.assert_close(noisy_2[inside] - clean, (noisy_1[inside] - clean) * high / low, rtol=1e-4, atol=1e-5)


def test_digits_c_is_the_corrupted_variant_of_digits_and_has_no_train_split():
    assert corrupted_variant("digits") == "digits_c"
    with pytest.raises(UserError, match="test split only"):
        get_dataset("digits_c", "train")


def test_certify_corruptions_on_the_embedded_default(run_cli, digits_checkpoint, tmp_path):
    out = tmp_path / "corruptions.parquet"
    code, stdout, err = run_cli(
        "certify",
        "--checkpoint",
        digits_checkpoint,
        "--dataset",
        "digits",
        "--corruptions",
        "--sigma",
        "0.5",
        "--skip",
        "90",
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
    assert len(frame) == len(CORRUPTIONS) * SEVERITIES * TEST_SIZE // 90
    assert list(dict.fromkeys(frame["corruption"])) == list(CORRUPTIONS)  # the data set's order
    assert set(frame["severity"]) == set(range(1, SEVERITIES + 1))
    for name in CORRUPTIONS:
        assert name in stdout
    run = _latest_certify_run()
    table = corruption_table(frame)
    assert run.data.metrics["mAcc"] == pytest.approx(table.loc["mean", "accuracy"])
    assert run.data.metrics["acr/rotate"] == pytest.approx(table.loc["rotate", "acr"])
    plots = {a.path for a in MlflowClient(resolve_tracking_uri()).list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/certified_accuracy.png", "plots/accuracy_by_corruption.png", "plots/p_lower.png"}


def _latest_certify_run():
    client = MlflowClient(resolve_tracking_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`catrs.kind` = 'certify'", order_by=["attributes.start_time DESC"])[0]


def test_a_sweep_on_digits_ends_with_the_commands_for_the_papers_tables(tmp_path):
    space = load_search_space(find_search_space("demo_digits"))
    outcome = SweepOutcome(
        tmp_path / "sweep",
        "0" * 32,
        pd.DataFrame(),
        {},
        "a1b2c3d4",
        tmp_path / "sweep" / "best" / "checkpoint.pt",
        tmp_path / "sweep" / "final.parquet",
    )
    printed = next_commands(outcome, space, "sqlite:///elsewhere.db", tmp_path / "data").splitlines()[1:]
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1].split() for line in printed}
    assert set(lines) == {"Table 1", "Table 3", "Figure 2(c)"}
    table3 = _build_parser().parse_args(lines["Table 3"][1:])
    assert table3.corruptions and table3.dataset == "digits" and table3.sigma == space.sigma
    assert table3.checkpoint == str(outcome.best_checkpoint) and table3.n == space.final.n
    assert (table3.adaptive, table3.tolerance) == (space.final.adaptive, space.final.tolerance)  # the protocol's
    assert table3.tracking_uri == "sqlite:///elsewhere.db" and table3.data_root == tmp_path / "data"
    assert TEST_SIZE // table3.skip >= 30  # enough images per (corruption, severity) for a mean
    figure = _build_parser().parse_args(lines["Figure 2(c)"][1:])
    assert figure.sweep == ["0" * 32] and figure.tracking_uri == "sqlite:///elsewhere.db"
    assert lines["Table 1"][:3] == ["catrs", "report", f"catrs={outcome.final_results}"]
