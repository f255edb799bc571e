"""Small CNNs for the embedded 8×8 digits set: the laptop default, trains in seconds on a CPU.

`digits_cnn` is the plain one. `digits_cnn_bn` adds batch normalisation after each hidden layer: on the demo's
eight-epoch schedule the plain net stays at chance for its first epochs (the default initialisation shrinks the
signal through four ReLU layers without normalisation), so a truncated run says little about how a
configuration ends; with normalisation it learns from the first epoch and ends higher (the demo's header has
the figures). Attacks and certification run it in eval mode, as they do the CIFAR ResNets.
"""

import torch
from torch import nn

from catrs.models.base import architecture


class _FeatureNorm(nn.BatchNorm1d):
    """Batch normalisation of the hidden features that also takes a batch of one image in training (the last of
    an epoch whose size leaves one over, say 1,437 images in batches of 4): one value per feature has no
    variance, so such a batch is normalised with the running statistics, which it leaves as they are. The
    weights and buffers are BatchNorm1d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _hidden(layer: nn.Module, width: int, norm: type[nn.Module] | None) -> list[nn.Module]:
    return [layer, *([norm(width)] if norm else []), nn.ReLU()]


def _digits_net(num_classes: int, in_channels: int, batch_norm: bool) -> nn.Module:
    return nn.Sequential(
        *_hidden(nn.Conv2d(in_channels, 32, 3, padding=1), 32, nn.BatchNorm2d if batch_norm else None),
        *_hidden(nn.Conv2d(32, 64, 3, padding=1), 64, nn.BatchNorm2d if batch_norm else None),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *_hidden(nn.Linear(64 * 4 * 4, 128), 128, _FeatureNorm if batch_norm else None),
        nn.Linear(128, num_classes),
    )


@architecture(in_channels=1)
def digits_cnn(num_classes: int, in_channels: int = 1) -> nn.Module:
    return _digits_net(num_classes, in_channels, batch_norm=False)


@architecture(in_channels=1)
def digits_cnn_bn(num_classes: int, in_channels: int = 1) -> nn.Module:
    return _digits_net(num_classes, in_channels, batch_norm=True)
