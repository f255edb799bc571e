"""One registered model per search space: each sweep's choice is a new version, and `champion` moves only to a
version that beats it on val under the same selection protocol; the others are `challenger`."""

from __future__ import annotations

import pytest
import torch

from catrs.model_registry import Standing, register_checkpoint
from catrs.tracking import Tracker
from catrs.train import TrainConfig, train
from tests.helpers import quiet_context

PROTOCOL = "synthetic val 0123abcd sigma=0.25 n0=16 n=100 alpha=0.001 images=32"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = TrainConfig(method="gaussian", dataset="synthetic", sigma=0.25, epochs=1, batch_size=64).resolve()
    return train(spec, tmp_path_factory.mktemp("run"), quiet_context())


def test_champion_moves_only_to_a_version_that_beats_it_on_val_under_the_same_protocol(tmp_path, checkpoint):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="registry")
    example = torch.zeros(2, 1, 8, 8)

    def register(figure: float, protocol: str = PROTOCOL):
        run = tracker.start("sweep", {})
        standing = Standing("final_val_acr", figure, protocol, f"space-{figure}")
        return register_checkpoint(tracker, run, "space", checkpoint, example, standing)

    steps = [register(0.50), register(0.40), register(0.50), register(0.60), register(0.90, PROTOCOL + " other")]
    assert [(s.version, s.alias) for s in steps] == [
        ("1", "champion"), ("2", "challenger"), ("3", "challenger"), ("4", "champion"), ("5", "challenger")
    ]  # fmt: skip
    assert "stays champion on val (0.5000 ≥ 0.4000)" in steps[1].reason and "another selection" in steps[4].reason
    client = tracker.client
    assert client.get_model_version_by_alias("space", "champion").version == 4
    assert client.get_model_version_by_alias("space", "challenger").version == 5
    tags = client.get_model_version("space", "4").tags
    assert (tags["catrs.sweep"], tags["catrs.selection"], float(tags["catrs.val_figure"])) == (
        "space-0.6",
        PROTOCOL,
        0.6,
    )
