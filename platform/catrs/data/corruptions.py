"""Common corruptions of the test sets: CIFAR-10-C (Hendrycks & Dietterich 2019) and MNIST-C (Mu & Gilmer 2019),
read from their published `.npy` layouts (never downloaded; place them under the data root):

- `ROOT/CIFAR-10-C/<corruption>.npy`: 50000×32×32×3 uint8, severities 1–5 stacked by 10,000 images, and
  `ROOT/CIFAR-10-C/labels.npy`.
- `ROOT/mnist_c/<corruption>/test_images.npy` (10000×28×28×1 uint8) and `test_labels.npy`; one severity.

One data set holds every corruption found, severities in order; the dataset index runs over all of them, so
`catrs certify --skip 100` takes every 100th image of every (corruption, severity), as the paper does.
`layout(index)` tells an index's corruption, severity and index within the clean test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from catrs.data.base import DATASETS, DatasetSpec
from catrs.data.torchvision_sets import CIFAR10_NORMALIZATION
from catrs.errors import UserError

CIFAR10_C = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
MNIST_C = (
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
    "canny_edges",
    "identity",
)


@dataclass(frozen=True)
class Block:
    corruption: str
    severity: int
    images: np.ndarray  # (n, H, W, C) uint8, memory-mapped
    labels: np.ndarray


class CorruptedImages(Dataset):
    """Blocks of (corruption, severity) images as one data set of `(x, y)`, x in [0, 1] (C, H, W)."""

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(b.labels) for b in blocks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, index: int) -> tuple[Block, int]:
        """The block holding a dataset index, and the index within it."""
        block = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.blocks[block], int(index - self.starts[block])

    def layout(self, index: int) -> tuple[str, int, int]:
        """(corruption, severity, index within the clean test set) of a dataset index."""
        block, within = self._locate(index)
        return block.corruption, block.severity, within

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        block, within = self._locate(index)
        image = np.asarray(block.images[within], dtype=np.float32) / 255.0
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), int(block.labels[within])


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable .npy file ({error}); replace it") from None


def load_cifar10_c(split: str, root: Path, download: bool, augment: bool = False) -> CorruptedImages:
    folder = root / "CIFAR-10-C"
    found = [c for c in CIFAR10_C if (folder / f"{c}.npy").exists()]
    if download or not found or not (folder / "labels.npy").exists():
        raise UserError(
            f"CIFAR-10-C is read, never downloaded: expected {folder}/labels.npy "
            f"and {folder}/<corruption>.npy for corruptions among {', '.join(CIFAR10_C)}"
        )
    labels = _load(folder / "labels.npy")
    blocks = []
    for corruption in found:
        images = _load(folder / f"{corruption}.npy")
        if images.shape[1:] != (32, 32, 3) or len(images) != len(labels) or len(images) % 5:
            raise UserError(
                f"{folder / f'{corruption}.npy'} has shape {images.shape}; expected (5·N, 32, 32, 3) "
                f"matching labels.npy"
            )
        size = len(images) // 5
        blocks += [
            Block(corruption, s + 1, images[s * size : (s + 1) * size], labels[s * size : (s + 1) * size])
            for s in range(5)
        ]
    return CorruptedImages(blocks)


def load_mnist_c(split: str, root: Path, download: bool, augment: bool = False) -> CorruptedImages:
    folder = root / "mnist_c"
    found = [
        c for c in MNIST_C if (folder / c / "test_images.npy").exists() and (folder / c / "test_labels.npy").exists()
    ]
    if download or not found:
        raise UserError(
            f"MNIST-C is read, never downloaded: expected "
            f"{folder}/<corruption>/test_images.npy and test_labels.npy for corruptions among "
            f"{', '.join(MNIST_C)}"
        )
    blocks = []
    for corruption in found:
        images, labels = _load(folder / corruption / "test_images.npy"), _load(folder / corruption / "test_labels.npy")
        if images.shape[1:] != (28, 28, 1) or len(images) != len(labels):
            raise UserError(
                f"{folder / corruption / 'test_images.npy'} has shape {images.shape}; expected (N, 28, 28, 1)"
            )
        blocks.append(Block(corruption, 1, images, labels))
    return CorruptedImages(blocks)


DATASETS.add(
    DatasetSpec(
        "cifar10_c",
        10,
        (3, 32, 32),
        CIFAR10_NORMALIZATION,
        "cifar_resnet110",
        load_cifar10_c,
        "CIFAR-10-C: 15 corruptions × 5 severities of the test set",
        base="cifar10",
        corruptions=CIFAR10_C,
        severities=5,
    )
)
DATASETS.add(
    DatasetSpec(
        "mnist_c",
        10,
        (1, 28, 28),
        None,
        "lenet",
        load_mnist_c,
        "MNIST-C: 16 corruptions of the test set",
        base="mnist",
        corruptions=MNIST_C,
        severities=1,
    )
)
