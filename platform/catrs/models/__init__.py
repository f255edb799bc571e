"""The architectures: `create_model(name, num_classes)` builds any registered one.

Every model is `Sequential(Normalize(...), network)`: dataset normalisation is the first layer, so noise is
added in pixel space (see `normalize.py`). Add an architecture with one module whose factory is decorated
`@architecture(in_channels=…)` (`base.py`): the registry finds it.
"""

from __future__ import annotations

from torch import nn

from catrs.errors import UserError
from catrs.models.base import ARCHITECTURES, architecture
from catrs.models.normalize import Normalization, Normalize

__all__ = ["Normalization", "Normalize", "architecture", "create_model", "default_in_channels", "model_names"]


def model_names() -> list[str]:
    return ARCHITECTURES.names()


def default_in_channels(name: str) -> int:
    return ARCHITECTURES.get(name).in_channels


def create_model(
    name: str,
    num_classes: int,
    *,
    normalization: Normalization | None = None,
    in_channels: int | None = None,
) -> nn.Module:
    """A freshly initialised `name` with `num_classes` outputs, normalisation first.

    `in_channels` defaults to the channel count of the architecture's usual data (1 for lenet/digits_cnn,
    3 otherwise); `normalization` defaults to none (the MNIST-like convention).
    """
    found = ARCHITECTURES.get(name)
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    return nn.Sequential(Normalize(normalization), found.build(num_classes, in_channels or found.in_channels))
