"""Adaptive CERTIFY: the planner's choices, the guarantee (statistically), and the sample accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from catrs.adaptive import SampleSizePlanner, expected_radius
from catrs.models import create_model
from catrs.smoothing import ABSTAIN, Smooth
from catrs.testing import CoinFlip, CountingLinear

PILOTS = [(100, 100), (99, 100), (97, 100), (90, 100), (75, 100), (60, 100), (50, 100), (30, 100), (1590, 1600)]


def _sizes(planner: SampleSizePlanner) -> np.ndarray:
    successes, trials = (np.array(column) for column in zip(*PILOTS, strict=True))
    return planner.sample_sizes(successes, trials)


def test_the_planner_gives_up_at_most_the_tolerance_for_every_plausible_p():
    planner = SampleSizePlanner(100_000, 0.001, 0.05)
    sizes = _sizes(planner)
    assert set(sizes) <= {0, *planner.sizes.tolist()}
    for (successes, trials), n in zip(PILOTS, sizes, strict=True):
        for p in np.linspace(*_interval(successes, trials), 9):
            at_max = expected_radius(np.array([p]), planner.n_max, planner.alpha)[0]
            at_n = expected_radius(np.array([p]), n, planner.alpha)[0] if n else 0.0
            assert at_max - at_n <= planner.tolerance + 0.01  # the grid of p is searched, not every p
    assert sizes[0] > planner.n_max / 2  # all correct: the radius is capped by n, only a large n reaches it
    assert sizes[PILOTS.index((30, 100))] == 0  # a clear loser: nothing to certify, not worth a sample
    assert 0 < sizes[PILOTS.index((75, 100))] < planner.n_max / 4  # a moderate p: a fraction of n_max


def _interval(successes: int, trials: int) -> tuple[float, float]:
    from catrs.adaptive import _plausible

    lower, upper = _plausible(np.array([successes]), np.array([trials]))
    return float(lower[0]), float(upper[0])


def test_a_larger_tolerance_never_asks_for_more_samples_and_zero_tolerance_asks_for_n_max():
    sizes = [_sizes(SampleSizePlanner(100_000, 0.001, t)) for t in (0.0, 0.01, 0.03, 0.1, 0.3)]
    assert all((later <= earlier).all() for earlier, later in zip(sizes, sizes[1:], strict=False))
    worth_estimating = sizes[0] > 0
    assert (sizes[0][worth_estimating] == 100_000).all() and worth_estimating.sum() >= 7


def test_adaptive_radii_exceed_the_true_distance_of_a_linear_classifier_only_with_probability_alpha():
    # As for CERTIFY (tests/test_smoothing.py): the exact radius of the smoothed linear classifier is the
    # distance to its boundary; each input may overshoot it, or certify the wrong class, with probability ≤ α.
    torch.manual_seed(0)
    sigma, alpha, inputs = 0.5, 0.05, 200
    model = CountingLinear(torch.randn(1, 4, 4), 0.1)
    xs = torch.randn(inputs, 1, 4, 4) * 0.6
    distance, truth = model.margin(xs).abs().tolist(), (model.margin(xs) > 0).long().tolist()
    smooth = Smooth(model, 2, sigma, seed=11)
    answers = smooth.certify_adaptive_batch(xs, 100, 20_000, alpha, 4000, tolerance=0.1, indices=range(inputs))
    overshoots = sum(1 for a, d in zip(answers, distance, strict=True) if a.prediction != ABSTAIN and a.radius > d)
    wrong = sum(1 for a, t in zip(answers, truth, strict=True) if a.prediction not in (ABSTAIN, t))
    assert overshoots + wrong <= binom.ppf(0.9999, inputs, alpha)
    sizes = [a.estimation for a in answers]
    assert min(sizes) < 1000 and max(sizes) > 10_000  # the sizes did adapt: the check is not vacuous


def test_adaptive_radii_are_within_the_tolerance_of_fixed_n_and_cost_less():
    # The tolerance bounds the expected radius given up; each estimate adds its own noise (a few hundredths
    # of σ at these sizes), so single rows get a margin and the mean is held to the tolerance.
    sigma, tolerance = 0.5, 0.05
    model = CountingLinear(torch.ones(1, 2, 2), 0.0)
    distances = np.linspace(0.1, 1.6, 16)
    xs = torch.stack([torch.full((1, 2, 2), d / 2) for d in distances])  # w·x = d
    smooth = Smooth(model, 2, sigma, inference="eager")
    fixed = smooth.certify_batch(xs, 100, 100_000, 0.001, 20_000, indices=range(16))
    model.rows_seen = 0
    adaptive = smooth.certify_adaptive_batch(xs, 100, 100_000, 0.001, 20_000, tolerance=tolerance, indices=range(16))
    assert model.rows_seen == sum(a.pilot + a.estimation for a in adaptive)  # every sample is accounted for
    assert all(a.pilot >= 100 for a in adaptive)
    given_up = [radius - a.radius for (_, radius), a in zip(fixed, adaptive, strict=True)]
    assert all(a.prediction == 1 for a in adaptive) and all(g < (tolerance + 0.1) * sigma for g in given_up)
    assert np.mean(given_up) <= tolerance * sigma
    assert all(a.radius <= d for a, d in zip(adaptive, distances, strict=True))
    assert model.rows_seen < 0.5 * 16 * 100_100


def test_zero_tolerance_is_fixed_n_certify_on_the_same_noise():
    torch.manual_seed(1)
    model = create_model("digits_cnn", 10)
    xs = torch.rand(6, 1, 8, 8)
    smooth = Smooth(model, 10, 0.5, seed=3)
    fixed = smooth.certify_batch(xs, 50, 3000, 0.001, 1000, indices=range(6))
    adaptive = smooth.certify_adaptive_batch(xs, 50, 3000, 0.001, 1000, tolerance=0.0, indices=range(6))
    estimated = [(a.prediction, a.radius) for a in adaptive if a.estimation]
    assert estimated == [row for row, a in zip(fixed, adaptive, strict=True) if a.estimation] and estimated
    assert all(label == ABSTAIN for (label, _), a in zip(fixed, adaptive, strict=True) if not a.estimation)


def test_adaptive_certification_is_invariant_to_how_inputs_are_grouped():
    torch.manual_seed(1)
    model = create_model("digits_cnn", 10)
    xs = torch.rand(7, 1, 8, 8)
    smooth = Smooth(model, 10, 0.5, seed=3)
    settings = dict(n0=50, n_max=20_000, alpha=0.001, batch_size=2000, tolerance=0.05)
    together = smooth.certify_adaptive_batch(xs, **settings, indices=range(100, 107))
    split = smooth.certify_adaptive_batch(xs[:3], **settings, indices=range(100, 103))
    split += smooth.certify_adaptive_batch(xs[3:], **settings, indices=range(103, 107))
    one_by_one = [smooth.certify_adaptive(x, **settings, index=100 + i) for i, x in enumerate(xs)]
    assert together == split and [(a.prediction, a.radius) for a in together] == one_by_one


def test_adaptive_evaluation_skips_wrong_selections_and_keeps_certifys_rows():
    torch.manual_seed(2)
    model = CountingLinear(torch.randn(1, 4, 4), 0.1)
    xs = torch.randn(30, 1, 4, 4) * 0.6
    labels = ((torch.rand(30) < 0.7).long() * (model.margin(xs) > 0).long()).tolist()
    smooth = Smooth(model, 2, 0.5, seed=5, inference="eager")
    settings = dict(n0=20, n_max=5000, alpha=0.001, batch_size=1000, tolerance=0.05, indices=range(30))
    certified = smooth.certify_adaptive_batch(xs, **settings)
    evaluated = smooth.certify_adaptive_batch(xs, **settings, labels=labels)
    skipped = [i for i, a in enumerate(evaluated) if not a.estimated]
    assert 3 <= len(skipped) < 30
    for i, (c, e) in enumerate(zip(certified, evaluated, strict=True)):
        if e.estimated:
            assert c == e
        else:
            assert (e.radius, e.pilot, e.estimation) == (0.0, 20, 0) and e.prediction != labels[i]


def test_a_coin_flip_is_abstained_on():
    answer = Smooth(CoinFlip(), 2, sigma=1.0, seed=5).certify_adaptive(
        torch.zeros(1, 2, 2), 100, 10_000, 0.001, 500, tolerance=0.05, index=0
    )
    assert answer == (ABSTAIN, 0.0)


@pytest.mark.parametrize("tolerance", [-0.1, float("nan"), float("inf")])
def test_an_impossible_tolerance_is_refused(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        Smooth(CoinFlip(), 2, 1.0).certify_adaptive(torch.zeros(1, 2, 2), 10, 100, 0.01, 10, tolerance=tolerance)
