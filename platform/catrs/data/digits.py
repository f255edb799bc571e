"""The embedded default: scikit-learn's 8×8 handwritten digits (1,797 images, ships with the package).

No download, no data directory: what lets every catrs command run on a laptop out of the box. Pixel values
0–16 are scaled to [0, 1]. The train/test split is fixed (stratified, seed 0, 360 test images) so results are
comparable across machines and runs; `val` holds out 30 images of each class of the training split.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from catrs.data.base import DATASETS, DatasetSpec, TensorImages

TEST_SIZE = 360
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=bunch.target
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def load_digits_split(split: str, root: Path, download: bool, augment: bool = False) -> TensorImages:
    images, labels = _split_arrays()[split]
    return TensorImages(torch.from_numpy(images), torch.from_numpy(labels))


DATASETS.add(
    DatasetSpec(
        "digits",
        10,
        (1, 8, 8),
        None,
        "digits_cnn",
        load_digits_split,
        "scikit-learn's 8×8 digits, embedded",
        val_per_class=30,
    )
)
