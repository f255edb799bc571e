"""Classifiers whose smoothed classifier is known exactly, to hold certification against the truth.

- `CountingLinear`: f(x) = 1[w·x + b > 0] with ‖w‖ = 1. Under Gaussian noise its smoothed classifier is f
  itself, and the exact ℓ2 radius at x is the distance |w·x + b| to the boundary (`margin`): a sound
  certificate never exceeds it, except with probability α. It counts the noisy inputs it classifies, so that
  a sampling procedure's accounting can be checked too.
- `CoinFlip`: class 1 iff the first noisy pixel is positive; at x = 0 both classes have probability ½, so a
  sound procedure abstains.

Used by the tests (tests/test_smoothing.py, tests/test_adaptive.py) and benchmarks/adaptive_certify.py.
"""

from __future__ import annotations

import torch
from torch import nn


class CountingLinear(nn.Module):
    """Two classes on flattened inputs, class 1 iff w·x + b > 0 (w normalised); counts the rows it sees."""

    def __init__(self, weight: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.flatten() / weight.norm(), requires_grad=False)
        self.bias = bias
        self.rows_seen = 0

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """The signed distance of each input to the boundary: the exact radius, with its sign the class."""
        return x.flatten(1) @ self.weight + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen += len(x)
        margin = self.margin(x)
        return torch.stack([-margin, margin], dim=1)


class CoinFlip(nn.Module):
    """Class 1 iff the first pixel of the noisy input is positive: a fair coin at x = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = (x.flatten(1)[:, 0] > 0).float()
        return torch.stack([1 - heads, heads], dim=1)
