"""The cost ledger adds up what a sweep spent; the expected cost follows the file's budget."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from catrs.sampling import Mode, SamplingProtocol
from catrs.sweep.ledger import Ledger, expected_cost, samples_spent
from catrs.sweep.space import load_search_space
from catrs.teacher import Producer
from tests.test_search_space import VALID

SPACE = {
    **VALID,
    "name": "costed",
    "train": {"epochs": 3, "batch_size": 100},
    "budget": {"num_samples": 27, "fidelity": "fraction", "min_fraction": 0.111, "reduction_factor": 3},
}


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "costed.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return load_search_space(path)


def test_the_ledger_adds_epochs_by_fidelity_steps_samples_and_teachers(space):
    ledger = Ledger(space, train_images=900)
    point = {"lbd": 1.0, "sigma0": 0.25}
    ledger.started("a", point)
    for fraction, epochs in ((1 / 9, 3), (1 / 3, 3), (1.0, 3)):  # one trial climbing every rung
        for epoch in range(1, epochs + 1):
            proxy = 1000.0 if epoch == epochs else float("nan")
            ledger.reported("a", point, {"epoch": epoch, "fraction": fraction, "seconds": 2.0, "val_samples": proxy})
    frame = pd.DataFrame({"estimated": [True, False, True]})
    ledger.certified("selection", frame, SamplingProtocol(n0=10, n=100), Mode.EVALUATE)
    ledger.certified("test", frame, SamplingProtocol(n0=10, n=100), Mode.CERTIFY)

    class Votes:
        votes = 50

    made = Producer(train_teacher=lambda *a: Path("t.pt"), vote=lambda job, c: (900, 4), exclusive=None)
    counting = ledger.counting(made)
    counting.train_teacher(None, None, None)
    assert counting.vote(Votes(), None) == (900, 4)

    cost = ledger.metrics()
    assert cost["cost/training_run_equivalents"] == pytest.approx(1 / 9 + 1 / 3 + 1)
    assert cost["cost/epochs/fraction_1_9"] == cost["cost/epochs/fraction_1_3"] == cost["cost/epochs/full"] == 3
    assert cost["cost/optimizer_steps"] == 3 * (1 + 3 + 9)  # ⌈⌈F·900⌉ / 100⌉ steps an epoch
    assert cost["cost/worker_seconds/trials"] == 9 * 2.0 and cost["cost/samples/proxy"] == 3000
    assert cost["cost/samples/selection"] == 3 * 10 + 2 * 100 and cost["cost/samples/test"] == 3 * 110
    assert cost["cost/teacher_runs"] == 1 and cost["cost/samples/votes"] == 900 * 50
    assert samples_spent(frame, SamplingProtocol(n0=10, n=100), Mode.PREDICT) == 300
    # rows that record their samples (an adaptive protocol's vary per image) are summed as they are
    assert samples_spent(frame.assign(samples=[7, 110, 1]), SamplingProtocol(n0=10, n=100), Mode.CERTIFY) == 118


def test_the_expected_cost_of_budgeted_rungs_keeps_a_third_at_each(space):
    cost = expected_cost(space, 27)
    assert cost["training_run_equivalents"] == pytest.approx(27 / 9 + 9 / 3 + 3)  # 9 runs' worth
    assert cost["proxy_evaluations"] == 27 + 9 + 3 and cost["teacher_runs"] == 2


def test_the_expected_cost_of_epoch_rungs_counts_the_survivors_epochs(space):
    from dataclasses import replace

    truncated = replace(space, budget=replace(space.budget, fidelity="epochs", first_rung=1, reduction_factor=3))
    cost = expected_cost(truncated, 9)  # 9 trials train epoch 1, 3 go on to epoch 3
    assert cost["training_run_equivalents"] == pytest.approx((9 * 1 + 3 * 2) / 3)
    assert (
        expected_cost(replace(space, budget=replace(space.budget, scheduler="none")), 9)["training_run_equivalents"]
        == 9
    )
