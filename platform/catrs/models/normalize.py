"""Dataset normalisation as the model's first layer.

Randomized smoothing adds Gaussian noise in pixel space, and a certified radius is only meaningful in the space
the noise lives in. Putting (x - mean) / std inside the model means the noise goes in *before* normalisation,
so every radius catrs reports is a pixel-space ℓ2 radius, whatever the data set's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of a data set, in [0, 1] pixel units."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError("normalization mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalization std must be positive")


class Normalize(nn.Module):
    """(x - mean) / std per channel; the identity when built without statistics."""

    mean: torch.Tensor | None  # buffers, (1, C, 1, 1)
    std: torch.Tensor | None

    def __init__(self, normalization: Normalization | None) -> None:
        super().__init__()
        self.normalization = normalization
        if normalization is None:
            self.register_buffer("mean", None, persistent=False)
            self.register_buffer("std", None, persistent=False)
        else:
            # Not persistent: the checkpoint's metadata is the single source of truth for the statistics.
            shape = (1, len(normalization.mean), 1, 1)
            self.register_buffer("mean", torch.tensor(normalization.mean).view(shape), persistent=False)
            self.register_buffer("std", torch.tensor(normalization.std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x
        return (x - self.mean) / self.std
