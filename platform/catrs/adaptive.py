"""Adaptive CERTIFY's sample sizes: how many estimation samples each image gets, from its pilot alone.

An image's pilot is its n0 selection samples plus, where it pays, more samples of an independent stream
(`NoiseStream.PILOT`). From the pilot's count of the selected class, `SampleSizePlanner` picks the smallest n
on a grid up to n_max whose radius, for every p_A the pilot leaves plausible, is at most `tolerance`·σ below
the radius n_max would give; or 0 (abstain without estimating) where even n_max would certify at most that.
The estimation then draws n fresh samples and bounds p_A by Clopper–Pearson at the full α, exactly as
CERTIFY does with a fixed n: n depends on the pilot only, which is independent of the estimation samples, so
the bound holds at level 1 − α given n (docs/methods.md, "Adaptive CERTIFY"). Nothing here can make a
radius larger; it only decides where samples are spent.

Everything in this module is a decision rule, computed at expected counts on a grid: its approximations cost
samples or radius, never soundness.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.stats import beta, norm

# The pilot's interval for p_A: one-sided level of each end (a decision, not a certificate).
PLAUSIBLE = 0.05
# The pilot grows by doubling, to at most n_max / PILOT_SHARE samples (n0 included).
PILOT_SHARE = 50
SIZES = 48  # points of the grid of sample sizes, geometric up to n_max
_Z_GRID = np.linspace(-3.0, 6.5, 1901)  # p_A = Φ(z): fine where the radius moves fast, p_A = 1 appended
_POINTS = np.linspace(0.0, 1.0, 24)  # where the worst case over an interval is looked for
_OUTCOMES = np.linspace(0.1, 0.9, 5)  # where in the plausible interval a doubled pilot's new half may land


def expected_radius(p: np.ndarray, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """The radius (in σ) CERTIFY gives when n_A is its expectation p·n: Φ⁻¹ of Clopper–Pearson's bound, or 0."""
    successes = np.asarray(p, dtype=float) * n
    lower = np.where(successes > 0, beta.ppf(alpha, np.maximum(successes, 1e-12), n - successes + 1), 0.0)
    return np.where(lower > 0.5, norm.ppf(np.clip(lower, 0.5, 1.0)), 0.0)


@dataclass(frozen=True)
class SampleSizePlanner:
    """Chooses each image's estimation sample size from its pilot: `successes` of the selected class in
    `trials` samples. `tolerance` is in units of σ."""

    n_max: int
    alpha: float
    tolerance: float

    @property
    def pilot_limit(self) -> int:
        return self.n_max // PILOT_SHARE

    @cached_property
    def sizes(self) -> np.ndarray:
        """The sample sizes an image may get, smallest first, n_max last."""
        grid = np.geomspace(max(1.0, self.n_max / 2**10), self.n_max, SIZES)
        return np.unique(np.append(np.round(grid).astype(np.int64), self.n_max))

    @cached_property
    def _probabilities(self) -> np.ndarray:
        return np.append(norm.cdf(_Z_GRID), 1.0)

    @cached_property
    def _radii(self) -> np.ndarray:
        """(sizes, probabilities): the expected radius at each size."""
        return np.stack([expected_radius(self._probabilities, n, self.alpha) for n in self.sizes])

    @cached_property
    def _loss(self) -> np.ndarray:
        """(sizes, probabilities): the radius given up by stopping at each size rather than at n_max."""
        return self._radii[-1][None, :] - self._radii

    def sample_sizes(self, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """Each image's estimation sample size: the smallest on the grid that gives up at most `tolerance` for
        every plausible p_A, or 0 where abstaining gives up at most that."""
        lower, upper = _plausible(np.asarray(successes), np.asarray(trials))
        return self._size_for(lower, upper)

    def wants_more_pilot(self, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """Whether doubling each image's pilot would likely save more estimation samples than it costs, within
        `pilot_limit`: the size it would choose after doubling is averaged over pilots whose new half has
        each of `_OUTCOMES` of the plausible p_A as its success rate (a pilot without a failure can only
        learn that p_A < 1 from new samples, so its current estimate alone would never pay for them)."""
        successes, trials = np.asarray(successes), np.asarray(trials)
        lower, upper = _plausible(successes, trials)
        projected = np.mean(
            [
                self.sample_sizes(successes + np.round((lower + q * (upper - lower)) * trials), 2 * trials)
                for q in _OUTCOMES
            ],
            axis=0,
        )
        return (self._size_for(lower, upper) - projected > trials) & (2 * trials <= self.pilot_limit)

    def _size_for(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        if not len(lower):
            return np.zeros(0, dtype=np.int64)
        last = len(self._probabilities) - 1
        low = np.minimum(np.searchsorted(self._probabilities, lower), last)
        high = np.minimum(np.searchsorted(self._probabilities, upper), last)
        columns = np.round(low[:, None] + _POINTS[None, :] * (high - low)[:, None]).astype(np.int64)
        worst = self._loss[:, columns].max(axis=2)  # (sizes, images)
        enough = worst <= self.tolerance
        sizes = np.where(enough.any(axis=0), self.sizes[np.argmax(enough, axis=0)], self.n_max)
        not_worth_estimating = self._radii[-1, high] <= self.tolerance  # even n_max's radius is within it
        return np.where(not_worth_estimating, 0, sizes).astype(np.int64)


def _plausible(successes: np.ndarray, trials: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pilot's two-sided Clopper–Pearson interval for p_A, each end at one-sided level `PLAUSIBLE`."""
    lower = np.where(successes > 0, beta.ppf(PLAUSIBLE, np.maximum(successes, 1), trials - successes + 1), 0.0)
    upper = np.where(successes < trials, beta.ppf(1 - PLAUSIBLE, successes + 1, np.maximum(trials - successes, 1)), 1.0)
    return lower, upper
