"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision, with the paper's transforms.

Nothing is downloaded unless the user asks (`--download`); a missing data set is a clear error naming the
directory that was searched.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torchvision import datasets, transforms

from catrs.data.base import DATASETS, DatasetSpec, ImageSet
from catrs.errors import UserError
from catrs.models.normalize import Normalization

CIFAR10_NORMALIZATION = Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_CLASSES = {
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
}


def _transform(name: str, augment: bool) -> transforms.Compose:
    if name.startswith("cifar") and augment:
        return transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
    return transforms.Compose([transforms.ToTensor()])


def load_torchvision_split(name: str, split: str, root: Path, download: bool, augment: bool = False) -> ImageSet:
    """The `split` files ("train" or "test"), with the training augmentations if `augment`."""
    cls = _CLASSES[name]
    try:
        return cls(str(root), train=split == "train", transform=_transform(name, augment), download=download)
    except RuntimeError as error:
        if "not found" in str(error).lower() or "corrupted" in str(error).lower():
            raise UserError(
                f"{name} ({split}) not found under {root}: pass --download to fetch it, "
                f"or --data-root DIR (or CATRS_DATA) pointing at an existing copy"
            ) from None
        raise


for spec in (
    DatasetSpec("mnist", 10, (1, 28, 28), None, "lenet", partial(load_torchvision_split, "mnist"), val_per_class=500),
    DatasetSpec(
        "fashion_mnist",
        10,
        (1, 28, 28),
        None,
        "lenet",
        partial(load_torchvision_split, "fashion_mnist"),
        val_per_class=500,
    ),
    DatasetSpec(
        "cifar10",
        10,
        (3, 32, 32),
        CIFAR10_NORMALIZATION,
        "cifar_resnet110",
        partial(load_torchvision_split, "cifar10"),
        val_per_class=500,
    ),
    DatasetSpec(
        "cifar100",
        100,
        (3, 32, 32),
        Normalization((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
        "cifar_resnet110",
        partial(load_torchvision_split, "cifar100"),
        val_per_class=50,
    ),
):
    DATASETS.add(spec)
