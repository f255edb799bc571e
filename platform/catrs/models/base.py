"""The registry of architectures: each registers itself where it is defined.

    @architecture(in_channels=1)
    def lenet(num_classes: int, in_channels: int = 1) -> nn.Module: ...

The registry imports every module of `catrs.models` at its first lookup, so a new architecture is one new
module; `catrs.models.create_model` builds any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from catrs.registry import Registry

Factory = Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> the network, without normalisation


@dataclass(frozen=True)
class Architecture:
    """A network factory and the channel count of the data it is usually trained on."""

    name: str
    build: Factory
    in_channels: int


ARCHITECTURES: Registry[Architecture] = Registry("architecture", "catrs.models")


def architecture(in_channels: int) -> Callable[[Factory], Factory]:
    """Registers the decorated factory under its function name."""

    def register(factory: Factory) -> Factory:
        ARCHITECTURES.add(Architecture(factory.__name__, factory, in_channels))
        return factory

    return register
