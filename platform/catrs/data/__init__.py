"""The data-set registry: `get_dataset(name, split, root)` gives items `(index, x, y)`, x in [0, 1].

`digits` is the embedded default (no download), `digits_c` its generated corruptions; `synthetic` is
generated for tests; the torchvision sets download only with `download=True`; ImageNet is read from an
ImageFolder root; CIFAR-10-C and MNIST-C from their published files. The root defaults to `$CATRS_DATA`,
else `./data`.

Splits: `train` and `test` are the published ones; `val` holds out `val_per_class` images of each class of
`train` (`catrs.data.holdout`: digits 30 per class, 300 images; synthetic 32; MNIST, Fashion-MNIST and
CIFAR-10 500, CIFAR-100 50, i.e. 5,000; ImageNet 10, i.e. 10,000), and `train_minus_val` is the rest of
`train`, what a run that keeps `val` unseen trains on. `val` gets the test transforms, never the training
augmentations. A process can seal splits it must not read (`sealed`): a sweep seals `test` until its choice
is made.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from catrs.data.base import SPLITS, TRAINING_SPLITS, DatasetSpec, ImageSet, Indexed
from catrs.data.corruptions import load_cifar10_c, load_mnist_c
from catrs.data.digits import load_digits_split
from catrs.data.digits_c import load_digits_c
from catrs.data.holdout import holdout_indices, labels_of
from catrs.data.imagenet import load_imagenet_split
from catrs.data.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from catrs.data.synthetic import load_synthetic_split
from catrs.data.torchvision_sets import load_torchvision_split
from catrs.errors import UserError
from catrs.models.normalize import Normalization

__all__ = [
    "SPLITS",
    "TRAINING_SPLITS",
    "DatasetSpec",
    "Indexed",
    "SealedSplitError",
    "corrupted_variant",
    "dataset_names",
    "dataset_spec",
    "default_root",
    "get_dataset",
    "sealed",
]

_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits",
            10,
            (1, 8, 8),
            None,
            "digits_cnn",
            load_digits_split,
            "scikit-learn's 8×8 digits, embedded",
            val_per_class=30,
        ),
        DatasetSpec(
            "synthetic",
            SYNTHETIC_CLASSES,
            (1, 8, 8),
            None,
            "digits_cnn",
            load_synthetic_split,
            "generated class prototypes, for tests",
            val_per_class=32,
        ),
        DatasetSpec(
            "mnist", 10, (1, 28, 28), None, "lenet", partial(load_torchvision_split, "mnist"), val_per_class=500
        ),
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
            Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
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
        DatasetSpec(
            "imagenet",
            1000,
            (3, 224, 224),
            Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "resnet50",
            load_imagenet_split,
            val_per_class=10,
        ),
        DatasetSpec(
            "cifar10_c",
            10,
            (3, 32, 32),
            Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
            "cifar_resnet110",
            load_cifar10_c,
            "CIFAR-10-C: 15 corruptions × 5 severities of the test set",
            base="cifar10",
        ),
        DatasetSpec(
            "mnist_c",
            10,
            (1, 28, 28),
            None,
            "lenet",
            load_mnist_c,
            "MNIST-C: 16 corruptions of the test set",
            base="mnist",
        ),
        DatasetSpec(
            "digits_c",
            10,
            (1, 8, 8),
            None,
            "digits_cnn",
            load_digits_c,
            "12 generated corruptions × 5 severities of the digits test set, catrs's own",
            base="digits",
        ),
    )
}


def dataset_names() -> list[str]:
    return sorted(_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in _SPECS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return _SPECS[name]


def corrupted_variant(name: str) -> str:
    """The corruption data set of `name`'s test split (cifar10 → cifar10_c)."""
    for spec in _SPECS.values():
        if spec.base == name:
            return spec.name
    bases = sorted(s.base for s in _SPECS.values() if s.base)
    raise UserError(f"no corruption data set for {name!r}; --corruptions works with: {', '.join(bases)}")


def default_root() -> Path:
    return Path(os.environ.get("CATRS_DATA", "data"))


class SealedSplitError(RuntimeError):
    """A split was read where it is sealed: a defect in the code that read it, never a user's mistake."""


_SEALED: set[str] = set()


@contextlib.contextmanager
def sealed(*splits: str) -> Iterator[None]:
    """While the block runs, reading any of `splits` in this process raises `SealedSplitError`.

    A sweep seals `test` in its driver until the choice is made and in every trial, so that nothing that
    chooses can read it, by design or by mistake.
    """
    added = set(splits) - _SEALED
    _SEALED.update(added)
    try:
        yield
    finally:
        _SEALED.difference_update(added)


def get_dataset(name: str, split: str, root: str | Path | None = None, download: bool = False) -> Indexed:
    """The `split` (see `SPLITS`) of data set `name`, as items `(index, x, y)`."""
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if split != "test" and spec.base:
        raise UserError(f"{name} corrupts the {spec.base} test split: it has a test split only; use --split test")
    if split in _SEALED:
        raise SealedSplitError(f"the {split} split of {name} is sealed here: what chooses must not read it")
    root = Path(root) if root is not None else default_root()
    files = "test" if split == "test" else "train"
    base = spec.load(files, root, download, split in TRAINING_SPLITS)
    dataset = Indexed(base, None if split in ("train", "test") else _split_keys(spec, split, base, root))
    _check_shape(dataset, spec, root)
    return dataset


_HELD_OUT: dict[tuple[str, str, int], np.ndarray] = {}  # (data set, root, training size) -> `val` indices


def _split_keys(spec: DatasetSpec, split: str, train_files: ImageSet, root: Path) -> np.ndarray:
    """The training indices of `val` or of `train_minus_val` (labels are read once per process)."""
    size = len(train_files)
    key = (spec.name, str(root), size)
    if key not in _HELD_OUT:
        _HELD_OUT[key] = holdout_indices(labels_of(train_files), spec.val_per_class)
    held_out = _HELD_OUT[key]
    return held_out if split == "val" else np.setdiff1d(np.arange(size), held_out)


def _check_shape(dataset: Indexed, spec: DatasetSpec, root: Path) -> None:
    """Foreign files under the data root are refused here, not by a shape error deep inside a model."""
    if not len(dataset):
        raise UserError(f"{spec.name} under {root} holds no images")
    try:
        shape = tuple(dataset[0][1].shape)
    except Exception as error:  # torchvision raises many kinds for unreadable files
        raise UserError(
            f"{spec.name} under {root} cannot be read ({type(error).__name__}): replace the files or pass --download"
        ) from None
    if shape != spec.input_shape:
        raise UserError(
            f"{spec.name} under {root} has images of shape {shape}, expected {spec.input_shape}: "
            f"wrong files in the data directory?"
        )


@functools.lru_cache(maxsize=32)
def split_digest(name: str, split: str, root: str | Path | None = None, download: bool = False) -> tuple[str, int]:
    """A short digest of which images a split holds (the data set, the split and every index) and its size:
    what MLflow records as the dataset a run used. Indices, not pixels, so a large set is not read."""
    import hashlib

    dataset = get_dataset(name, split, root, download)
    return hashlib.sha256(f"{name}/{split}".encode() + dataset.keys.tobytes()).hexdigest()[:16], len(dataset)
