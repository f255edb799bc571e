"""ImageNet from an ImageFolder root (`ROOT/imagenet/{train,val}/<wnid>/*.JPEG`), never downloaded.

Transforms as in the randomized-smoothing literature: RandomResizedCrop(224) + flip for training,
Resize(256) + CenterCrop(224) for testing and for the images catrs holds out of the training folder as its
`val` split (10 per class). The test split is ImageNet's own validation set.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from catrs.data.base import DATASETS, DatasetSpec
from catrs.errors import UserError
from catrs.models.normalize import Normalization

_FOLDERS = {"train": "train", "test": "val"}


def load_imagenet_split(split: str, root: Path, download: bool, augment: bool = False) -> datasets.ImageFolder:
    folder = root / "imagenet" / _FOLDERS[split]
    if download:
        raise UserError("ImageNet cannot be downloaded automatically; place it under ROOT/imagenet/{train,val}")
    if not folder.is_dir():
        raise UserError(f"ImageNet {split} folder not found: {folder} (expected <wnid>/ subfolders of images)")
    if augment:
        transform = transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"ImageNet {split} folder {folder} holds no usable images: {error}") from None


DATASETS.add(
    DatasetSpec(
        "imagenet",
        1000,
        (3, 224, 224),
        Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "resnet50",
        load_imagenet_split,
        val_per_class=10,
    )
)
