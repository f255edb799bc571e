"""What every catrs data set is: items `(index, x, y)` with x a float tensor in [0, 1].

The index names the image in the data set's published files: its position in the training or the test
split. Per-sample artefacts (certification rows, soft labels, noise streams) are keyed by it, so they
survive any sharding or reordering, and a `val` row names the training image it was held out from.

Each data set registers its `DatasetSpec` in its own module (`DATASETS.add(...)`); the registry imports every
module of `catrs.data` at its first lookup, so a new data set is one new module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from catrs.models.normalize import Normalization
from catrs.registry import Registry

# `train`: the published training split, whole; `val`: held out from it (`catrs.data.holdout`);
# `train_minus_val`: what a run that keeps `val` unseen trains on; `test`: the published test split.
SPLITS = ("train", "val", "test", "train_minus_val")
TRAINING_SPLITS = ("train", "train_minus_val")


class ImageSet(Protocol):
    """A base data set: `len` images, item `i` an `(x, y)`. torchvision's sets, `TensorImages` and
    `CorruptedImages` are ones (torch's `Dataset` does not promise a length, so it is not one)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


# (files, root, download, augment) -> the base data set: files is "train" or "test"; augment applies the
# training transforms (random crops and flips), which images held out for validation never get.
Loader = Callable[[str, Path, bool, bool], ImageSet]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about a data set that a model or a certificate depends on."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    normalization: Normalization | None
    default_arch: str
    load: Loader
    description: str = ""
    base: str | None = None  # a corrupted copy of this data set's test split: models trained on it apply
    val_per_class: int = 0  # images of each class held out of the training split as `val`
    # A corrupted copy's full benchmark: its corruptions and their severities (1…N), what a report of results on
    # it checks them against (results that miss some are partial).
    corruptions: tuple[str, ...] = ()
    severities: int = 0

    @property
    def trained_as(self) -> str:
        """The data set a model certified on this one must have been trained on."""
        return self.base or self.name

    @property
    def input_dim(self) -> int:
        """d, the number of input dimensions: an ℓ2 radius r certifies ℓ∞ radius r/√d."""
        c, h, w = self.input_shape
        return c * h * w


DATASETS: Registry[DatasetSpec] = Registry("dataset", "catrs.data")


class Indexed(Dataset):
    """Wraps a data set of `(x, y)` into one of `(index, x, y)`; `keys` picks which items, in order (default:
    all). Item `i` is `base[keys[i]]`, and its index is `keys[i]`."""

    def __init__(self, base: ImageSet, keys: Sequence[int] | np.ndarray | None = None) -> None:
        self.base = base
        self.keys: np.ndarray = np.arange(len(base)) if keys is None else np.asarray(keys, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, position: int) -> int:
        """The index of the `position`-th item."""
        return int(self.keys[position])

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, int]:
        index = self.key(position)
        x, y = self.base[index]
        return index, x, int(y)

    def layout(self, index: int) -> tuple[str, int, int] | None:
        """(corruption, severity, clean index) for a corruption data set; None for any other."""
        layout = getattr(self.base, "layout", None)
        return layout(index) if layout else None


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) in [0, 1] and integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError("TensorImages needs images (N, C, H, W) and N labels")
        self.images = images.float()
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
