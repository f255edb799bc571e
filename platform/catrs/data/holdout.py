"""The `val` split: a fixed number of images of each class held out of the training split.

    catrs certify --checkpoint runs/x/checkpoint.pt --dataset digits --split val --out val.parquet
    catrs train … --hold-out-val          (trains on `train_minus_val`; every sweep trial does)

Within each class, the images held out are those whose training index ranks first under splitmix64 of
(HOLDOUT_SEED, index): a fixed 64-bit mix, so the choice depends on the labels alone — the same on every
machine and with every NumPy, whose random generators promise no stable streams across versions. Exactly K
per class (`DatasetSpec.val_per_class`), or half of a class that has fewer than 2K images (a partial copy
of a data set). The test split is untouched, so results on it stay comparable with earlier ones.
"""

from __future__ import annotations

import numpy as np

from catrs.data.base import ImageSet

HOLDOUT_SEED = 20231  # fixed forever: changing it changes every data set's `val` split

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser of each uint64 value (wrapping arithmetic)."""
    z = values.astype(np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The training indices held out as `val`, ascending: per class, the `per_class` first by rank."""
    labels = np.asarray(labels)
    with np.errstate(over="ignore"):
        rank = splitmix64(np.arange(len(labels), dtype=np.uint64) ^ (np.uint64(HOLDOUT_SEED) * _GOLDEN))
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(per_class, len(members) // 2)
        chosen.append(members[np.argsort(rank[members], kind="stable")[:take]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def labels_of(dataset: ImageSet) -> np.ndarray:
    """Every label of a base data set, without reading its images where it keeps them apart."""
    for attribute in ("targets", "labels"):  # torchvision's sets and ImageFolder; catrs's TensorImages
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return np.asarray(labels, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)
