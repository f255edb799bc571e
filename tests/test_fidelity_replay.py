"""`benchmarks/fidelity.py --replay`: the halving rules it plays on measured runs are the ones the sweep runs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fidelity():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # fidelity.py imports landscape.py from beside it
        spec = importlib.util.spec_from_file_location("fidelity", BENCHMARKS / "fidelity.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


@pytest.mark.parametrize("eta", [3, 9])
def test_the_replayed_asha_decides_as_rays_bracket_does(fidelity, eta):
    figures = np.random.default_rng(eta).normal(size=40).round(2)  # rounded: ties happen, as tied proxies do
    bracket = _Bracket(min_t=1, max_t=8, reduction_factor=eta, s=0)
    ray_passes = [
        bracket.on_result(SimpleNamespace(trial_id=str(i)), 1, float(v)) == TrialScheduler.CONTINUE
        for i, v in enumerate(figures)
    ]
    replayed = fidelity.asha_passes(figures, eta)
    assert replayed.tolist() == ray_passes
    assert 40 / eta < replayed.sum() < 40  # it keeps more than 1/η (the early arrivals), not everyone


def test_a_replay_on_a_fidelity_that_ranks_perfectly_has_no_regret_and_halving_keeps_its_share(fidelity):
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.3, 0.45, size=(2, 24))
    runs = pd.DataFrame(
        [
            {"config": c, "seed": s, "trunc@1": 0.5 * r, "trunc@8": r, "reference": r}
            for s in range(2)
            for c, r in enumerate(reference[s])
        ]
    )
    table = fidelity.replay(runs, trials=27, rung=1, etas=[3, 9], orders=20)
    assert (table["mean regret"] == 0).all()
    for eta in (3, 9):
        kept = math.ceil(27 / eta)
        assert table.loc[("synchronous", eta), "trained out"] == kept
        assert table.loc[("synchronous", eta), "equivalents"] == pytest.approx((27 + kept * 7) / 8)
        assert table.loc[("asha", eta), "trained out"] > kept


def test_figures_measured_later_join_the_earlier_reference_row_by_row(fidelity):
    earlier = pd.DataFrame(
        {"config": [0, 0, 1, 1], "seed": [0, 1, 0, 1], "reference": [0.1, 0.2, 0.3, 0.4], "warm@0.25": [9.0] * 4}
    )
    later = pd.DataFrame({"config": [1, 0, 1, 0], "seed": [1, 1, 0, 0], "warm@0.25": [4.0, 2.0, 3.0, 1.0]})
    runs = fidelity.joined(earlier, later).sort_values(["config", "seed"])
    assert runs["reference"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert runs["warm@0.25"].tolist() == [1.0, 2.0, 3.0, 4.0]  # the new figures, each on its own row
    with pytest.raises(pd.errors.MergeError):  # a configuration measured twice is not silently doubled
        fidelity.joined(earlier, pd.concat([later, later]))
