"""The data-set registry: `get_dataset(name, split, root)` gives items `(index, x, y)`, x in [0, 1].

`digits` is the embedded default (no download), `digits_c` its generated corruptions; `synthetic` is
generated for tests; the torchvision sets download only with `download=True`; ImageNet is read from an
ImageFolder root; CIFAR-10-C and MNIST-C from their published files. The root is the run context's
(`catrs.context`: `--data-root`, else `$CATRS_DATA`, else `./data`). Each data set registers itself in its
own module (`DATASETS` in `base.py`).

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catrs.context import default_data_root
from catrs.data.base import DATASETS, SPLITS, TRAINING_SPLITS, DatasetSpec, ImageSet, Indexed
from catrs.data.holdout import holdout_indices, labels_of
from catrs.errors import UserError

__all__ = [
    "SPLITS",
    "TRAINING_SPLITS",
    "DatasetSpec",
    "Indexed",
    "SealedSplitError",
    "SplitFacts",
    "corrupted_variant",
    "dataset_names",
    "dataset_spec",
    "get_dataset",
    "sealed",
    "split_facts",
]


def dataset_names() -> list[str]:
    return DATASETS.names()


def dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name)


def corrupted_variant(name: str) -> str:
    """The corruption data set of `name`'s test split (cifar10 → cifar10_c)."""
    for spec in DATASETS.values():
        if spec.base == name:
            return spec.name
    bases = sorted(s.base for s in DATASETS.values() if s.base)
    raise UserError(f"no corruption data set for {name!r}; --corruptions works with: {', '.join(bases)}")


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
    root = Path(root) if root is not None else default_data_root()
    files = "test" if split == "test" else "train"
    with _downloading(root, download):
        base = spec.load(files, root, download, split in TRAINING_SPLITS)
    dataset = Indexed(base, None if split in ("train", "test") else _split_keys(spec, split, base, root))
    _check_shape(dataset, spec, root)
    return dataset


@contextlib.contextmanager
def _downloading(root: Path, download: bool) -> Iterator[None]:
    """While a data set may be downloaded into `root`, no other process of this machine downloads it there:
    the workers of one node share its copy, made once (each node of a cluster without shared storage makes
    its own)."""
    if not download:
        yield
        return
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".catrs-download.lock")):
        yield


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


@dataclass(frozen=True)
class SplitFacts:
    """What a run records of the split it used (MLflow's dataset input): which images, by a short digest of the
    data set, the split and every index (indices, not pixels), and how many; and two of them, the input example
    of a logged model (a batch of one would fix an exported model's batch size)."""

    dataset: str
    split: str
    digest: str
    size: int
    example: torch.Tensor


@functools.lru_cache(maxsize=32)
def split_facts(name: str, split: str, root: str | Path | None = None, download: bool = False) -> SplitFacts:
    """The facts of a split, read where the data is (a Ray driver asks a worker: `catrs.distributed.chunks`)."""
    import hashlib

    dataset = get_dataset(name, split, root, download)
    digest = hashlib.sha256(f"{name}/{split}".encode() + dataset.keys.tobytes()).hexdigest()[:16]
    example = torch.stack([dataset[i][1] for i in range(min(2, len(dataset)))])
    return SplitFacts(name, split, digest, len(dataset), example)
