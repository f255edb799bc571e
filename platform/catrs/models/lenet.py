"""LeNet for MNIST-like 28×28 grey images, as in the paper's MNIST / Fashion-MNIST experiments."""

from torch import nn

from catrs.models.base import architecture


@architecture(in_channels=1)
def lenet(num_classes: int, in_channels: int = 1) -> nn.Module:
    """conv5×5(→20)–ReLU–pool2, conv5×5(20→50)–ReLU–pool2, FC 800→500–ReLU, FC 500→classes."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
