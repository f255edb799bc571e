"""A generated data set for tests: k classes of 1×8×8 images around fixed class prototypes.

Deterministic, instant, and learnable to near-perfect accuracy in a few steps, so tests can train and certify
without any file on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

from catrs.data.base import DATASETS, DatasetSpec, TensorImages

NUM_CLASSES = 4
SIZES = {"train": 512, "test": 128}
PIXEL_NOISE = 0.1


def make_synthetic(split: str, num_classes: int = NUM_CLASSES, size: int | None = None) -> TensorImages:
    prototypes = torch.rand(num_classes, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    count = size if size is not None else SIZES[split]
    labels = torch.arange(count) % num_classes
    jitter = PIXEL_NOISE * torch.randn(count, 1, 8, 8, generator=generator)
    images = (prototypes[labels] + jitter).clamp(0.0, 1.0)
    return TensorImages(images, labels)


def load_synthetic_split(split: str, root: Path, download: bool, augment: bool = False) -> TensorImages:
    return make_synthetic(split)


DATASETS.add(
    DatasetSpec(
        "synthetic",
        NUM_CLASSES,
        (1, 8, 8),
        None,
        "digits_cnn",
        load_synthetic_split,
        "generated class prototypes, for tests",
        val_per_class=32,
    )
)
