"""Cohen's CERTIFY / PREDICT: exact statistics, sample accounting, soundness, and reproducible noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from catrs.models import create_model
from catrs.smoothing import ABSTAIN, NoiseStream, Smooth, _forward_plan, certified_radius, clopper_pearson_lower
from catrs.testing import CoinFlip, CountingLinear


@pytest.mark.parametrize(
    "successes,trials,alpha", [(0, 10, 0.05), (7, 10, 0.05), (10, 10, 0.001), (99_000, 100_000, 0.001), (51, 100, 0.01)]
)
def test_clopper_pearson_lower_matches_statsmodels_and_the_beta_quantile(successes, trials, alpha):
    ours = float(clopper_pearson_lower(successes, trials, alpha))
    assert ours == proportion_confint(successes, trials, alpha=2 * alpha, method="beta")[0]
    expected = 0.0 if successes == 0 else beta.ppf(alpha, successes, trials - successes + 1)
    assert ours == pytest.approx(expected, abs=1e-12)


def test_radius_is_sigma_times_inverse_normal_and_zero_below_one_half():
    p = np.array([0.3, 0.4999, 0.5, 0.8, 0.99])
    radii = certified_radius(p, 0.5)
    assert radii[:2].tolist() == [0.0, 0.0]
    assert radii[2] == 0.0  # Φ⁻¹(1/2) = 0
    assert radii[3] == pytest.approx(0.5 * norm.ppf(0.8))
    assert radii[4] == pytest.approx(0.5 * norm.ppf(0.99))


def test_certify_draws_exactly_n0_plus_n_samples_when_n_is_not_a_multiple_of_the_batch():
    model = CountingLinear(torch.ones(1, 2, 2), 0.0)
    smooth = Smooth(model, 2, sigma=0.25, inference="eager")  # the counting model itself runs
    smooth.certify(torch.zeros(1, 2, 2), n0=37, n=1001, alpha=0.001, batch_size=64, index=0)
    assert model.rows_seen == 37 + 1001
    model.rows_seen = 0
    smooth.certify_batch(torch.zeros(5, 1, 2, 2), n0=37, n=1001, alpha=0.001, batch_size=64, indices=range(5))
    assert model.rows_seen == 5 * (37 + 1001)


@pytest.mark.parametrize(
    "nums,batch",
    [([100], 1000), ([100] * 7, 1000), ([1001] * 3, 64), ([250] * 4, 100), ([0, 5, 3000, 1, 0, 999], 700)],
)
def test_forward_plan_never_exceeds_the_batch_and_covers_every_sample(nums, batch):
    passes = list(_forward_plan(nums, batch))
    assert all(0 < sum(size for _, size in p) <= batch for p in passes)
    for i, num in enumerate(nums):
        assert sum(size for p in passes for owner, size in p if owner == i) == num


def test_certified_radius_exceeds_the_true_distance_of_a_linear_classifier_only_with_probability_alpha():
    # For f(x) = 1[w·x + b > 0] with ‖w‖ = 1 the smoothed classifier's exact radius is |w·x + b|, the
    # distance to the boundary. CERTIFY may overshoot it with probability at most α per input.
    torch.manual_seed(0)
    sigma, alpha, inputs = 0.5, 0.05, 200
    model = CountingLinear(torch.randn(1, 4, 4), 0.1)
    xs = torch.randn(inputs, 1, 4, 4) * 0.6
    distance = model.margin(xs).abs()
    truth = (model.margin(xs) > 0).long()
    results = Smooth(model, 2, sigma, seed=11).certify_batch(xs, 100, 2000, alpha, 4000, indices=range(inputs))
    overshoots = sum(
        1 for (label, radius), d in zip(results, distance.tolist(), strict=True) if label != ABSTAIN and radius > d
    )
    wrong = sum(1 for (label, _), t in zip(results, truth.tolist(), strict=True) if label not in (ABSTAIN, t))
    # Each input overshoots (or certifies the wrong class) independently with probability ≤ α.
    assert overshoots + wrong <= binom.ppf(0.9999, inputs, alpha)


def test_certified_radius_is_close_to_the_true_distance_for_large_n():
    sigma = 0.5
    model = CountingLinear(torch.ones(1, 2, 2), 0.0)
    for distance in (0.1, 0.5, 1.0):
        x = torch.full((1, 2, 2), distance / 2)  # w = (1,1,1,1)/2, so w·x = distance
        label, radius = Smooth(model, 2, sigma).certify(x, 100, 100_000, 0.001, 20_000, index=0)
        assert label == 1
        assert distance - 0.03 < radius <= distance  # a lower bound, and a tight one at n = 100,000


def test_predict_and_certify_abstain_on_a_coin_flip():
    smooth = Smooth(CoinFlip(), 2, sigma=1.0, seed=5)
    x = torch.zeros(1, 2, 2)
    assert smooth.predict(x, 2000, 0.001, 500, index=0) == ABSTAIN
    assert smooth.certify(x, 100, 2000, 0.001, 500, index=0) == (ABSTAIN, 0.0)


def test_predict_returns_a_clear_winner():
    model = CountingLinear(torch.ones(1, 2, 2), 0.0)
    assert Smooth(model, 2, 0.25).predict(torch.full((1, 2, 2), -1.0), 500, 0.001, 100) == 0


def test_batched_certification_is_invariant_to_how_inputs_are_grouped():
    torch.manual_seed(1)
    model = create_model("digits_cnn", 10)
    xs = torch.rand(9, 1, 8, 8)
    smooth = Smooth(model, 10, 0.5, seed=3)
    together = smooth.certify_batch(xs, 50, 300, 0.001, 256, indices=range(100, 109))
    split = smooth.certify_batch(xs[:2], 50, 300, 0.001, 256, indices=range(100, 102)) + smooth.certify_batch(
        xs[2:], 50, 300, 0.001, 256, indices=range(102, 109)
    )
    one_by_one = [smooth.certify(x, 50, 300, 0.001, 256, index=100 + i) for i, x in enumerate(xs)]
    assert together == split == one_by_one
    assert len({r for _, r in together}) > 1  # the model discriminates: the check is not vacuous


def test_evaluation_gives_certifys_acr_and_rows_and_skips_the_estimation_of_wrong_selections():
    """An input whose selected class is wrong counts 0 at every radius: it needs no estimation samples. The
    others get CERTIFY's own rows (same noise), so ACR and certified accuracy at every radius are equal."""
    torch.manual_seed(2)
    model = CountingLinear(torch.randn(1, 4, 4), 0.1)
    xs = torch.randn(40, 1, 4, 4) * 0.6
    labels = (torch.rand(40) < 0.7).long() * (model.margin(xs) > 0).long()  # ~30% of labels disagree with f
    smooth = Smooth(model, 2, 0.5, seed=5, inference="eager")  # the counting model itself runs
    certified = smooth.certify_batch(xs, 20, 400, 0.001, 1000, indices=range(40))
    model.rows_seen = 0
    evaluated = smooth.evaluate_batch(xs, labels.tolist(), 20, 400, 0.001, 1000, indices=range(40))
    wrong = [i for i, (guess, _, estimated) in enumerate(evaluated) if not estimated]
    assert 5 <= len(wrong) < 40 and all(evaluated[i][0] != labels[i] for i in wrong)
    assert model.rows_seen == 40 * 20 + (40 - len(wrong)) * 400  # no estimation samples for the wrong ones
    for i, (row, (guess, radius, estimated)) in enumerate(zip(certified, evaluated, strict=True)):
        if estimated:
            assert (guess, radius) == row
        else:  # CERTIFY abstains or predicts the wrong class there: nothing certified correct either way
            assert radius == 0.0 and row[0] != labels[i]

    def contribution(rows: list[tuple]) -> list[float]:
        return [r if p == y else 0.0 for (p, r, *_), y in zip(rows, labels.tolist(), strict=True)]

    assert contribution(evaluated) == contribution(certified) and sum(contribution(certified)) > 0


def test_noise_streams_are_keyed_by_index_and_phase():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # near-uniform votes: counts reveal the noise
    smooth = Smooth(model, 10, 1.0, seed=0)
    x = torch.zeros(1, 1, 8, 8)

    def counts(index: int, stream: NoiseStream, seed: int = 0) -> torch.Tensor:
        return Smooth(model, 10, 1.0, seed=seed).sample_counts(x, 500, 500, indices=[index], stream=stream)

    assert torch.equal(counts(4, NoiseStream.ESTIMATION), counts(4, NoiseStream.ESTIMATION))
    assert not torch.equal(counts(4, NoiseStream.ESTIMATION), counts(5, NoiseStream.ESTIMATION))
    assert not torch.equal(counts(4, NoiseStream.ESTIMATION), counts(4, NoiseStream.SELECTION))
    assert not torch.equal(counts(4, NoiseStream.ESTIMATION), counts(4, NoiseStream.ESTIMATION, seed=1))
    assert smooth.sample_counts(x, 777, 100, indices=[0], stream=NoiseStream.VOTES).sum() == 777


@pytest.mark.parametrize(
    "kwargs", [dict(n0=0), dict(n=0), dict(alpha=0.0), dict(alpha=0.5), dict(alpha=1.0), dict(batch_size=0)]
)
def test_certify_rejects_impossible_sampling_settings(kwargs):
    smooth = Smooth(CoinFlip(), 2, 1.0)
    settings = dict(n0=10, n=10, alpha=0.01, batch_size=10) | kwargs
    with pytest.raises(ValueError):
        smooth.certify(torch.zeros(1, 2, 2), **settings)


def test_smooth_rejects_nonpositive_sigma():
    with pytest.raises(ValueError):
        Smooth(CoinFlip(), 2, 0.0)


def test_mixed_precision_changes_only_the_arithmetic():
    torch.manual_seed(2)
    model = create_model("digits_cnn", 10)
    xs = torch.rand(3, 1, 8, 8)
    full = Smooth(model, 10, 0.5).sample_counts(xs, 400, 400, indices=[0, 1, 2], stream=NoiseStream.ESTIMATION)
    mixed = Smooth(model, 10, 0.5, mixed_precision=True).sample_counts(
        xs, 400, 400, indices=[0, 1, 2], stream=NoiseStream.ESTIMATION
    )
    assert mixed.sum() == full.sum() == 1200
    # bf16 logits may flip near-ties, but the vote histograms must stay nearly the same.
    assert (mixed - full).abs().sum() <= 0.05 * 1200
