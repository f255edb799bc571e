"""A small CNN for the embedded 8×8 digits set: the laptop default, trains in seconds on a CPU."""

from torch import nn

from catrs.models.base import architecture


@architecture(in_channels=1)
def digits_cnn(num_classes: int, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
