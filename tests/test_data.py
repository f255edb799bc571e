"""The data registry: items (index, x, y), x in [0, 1]; local files read, missing ones named."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from PIL import Image

from catrs.data import SealedSplitError, dataset_names, dataset_spec, get_dataset, sealed
from catrs.data.holdout import holdout_indices, splitmix64
from catrs.errors import UserError


def test_digits_is_embedded_with_a_fixed_split():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    index, x, y = test[17]
    assert index == 17 and x.shape == (1, 8, 8) and 0 <= y < 10
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(get_dataset("digits", "test")[17][1], x)  # the split does not move between calls
    labels = [test[i][2] for i in range(len(test))]
    assert set(labels) == set(range(10))


def test_synthetic_is_deterministic():
    a, b = get_dataset("synthetic", "train"), get_dataset("synthetic", "train")
    assert torch.equal(a[5][1], b[5][1]) and a[5][2] == b[5][2]
    assert dataset_spec("synthetic").num_classes == len({a[i][2] for i in range(len(a))})


def test_every_dataset_declares_a_consistent_spec():
    for name in dataset_names():
        spec = dataset_spec(name)
        assert spec.num_classes >= 2 and len(spec.input_shape) == 3
        if spec.normalization:
            assert len(spec.normalization.mean) == spec.input_shape[0]


def _write_idx(path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (dtype ubyte, ndim), dimensions, data; gzip-free raw files."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_sets_read_a_local_copy(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (count,)))
    test = get_dataset(name, "test", tmp_path)
    index, x, y = test[3]
    assert len(test) == 4 and index == 3 and x.shape == (1, 28, 28) and 0 <= y < 10
    assert 0.0 <= float(x.min()) <= float(x.max()) <= 1.0


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_torchvision_sets_name_the_directory_and_the_fix(tmp_path, name):
    with pytest.raises(UserError, match=f"{tmp_path}.*--download"):
        get_dataset(name, "test", tmp_path)


def test_imagenet_reads_an_image_folder(tmp_path):
    for wnid in ("n01", "n02"):
        folder = tmp_path / "imagenet" / "val" / wnid
        folder.mkdir(parents=True)
        Image.fromarray(np.full((300, 260, 3), 128, np.uint8)).save(folder / "a.png")
    test = get_dataset("imagenet", "test", tmp_path)
    index, x, y = test[1]
    assert (len(test), index, y) == (2, 1, 1) and x.shape == (3, 224, 224)


def test_imagenet_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "imagenet" / "val")):
        get_dataset("imagenet", "test", tmp_path)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match="digits"):
        get_dataset("svhn", "test")
    with pytest.raises(UserError, match="train, val, test, train_minus_val"):
        get_dataset("digits", "validation")


def _images(dataset) -> dict[bytes, int]:
    return {dataset[i][1].numpy().tobytes(): dataset[i][0] for i in range(len(dataset))}


@pytest.mark.parametrize("name, per_class", [("digits", 30), ("synthetic", 32)])
def test_val_is_held_out_of_train_stratified_disjoint_and_the_same_on_every_call(name, per_class):
    train, val, fit, test = (get_dataset(name, split) for split in ("train", "val", "train_minus_val", "test"))
    classes = dataset_spec(name).num_classes
    assert len(val) == per_class * classes and len(val) + len(fit) == len(train)
    assert np.bincount([val[i][2] for i in range(len(val))]).tolist() == [per_class] * classes
    val_keys, fit_keys = {val[i][0] for i in range(len(val))}, {fit[i][0] for i in range(len(fit))}
    assert not val_keys & fit_keys and val_keys | fit_keys == set(range(len(train)))  # by index
    for position in (0, len(val) - 1):  # a val item is the training image its index names
        index, x, y = val[position]
        assert torch.equal(x, train[index][1]) and y == train[index][2]
    val_images = _images(val)
    assert not val_images.keys() & _images(fit).keys()  # by content
    assert not val_images.keys() & _images(test).keys()
    assert list(get_dataset(name, "val").keys) == list(val.keys)  # the same on every call
    assert len(test) == {"digits": 360, "synthetic": 128}[name]  # the test split is untouched


def test_the_holdout_rule_is_fixed_exact_per_class_and_caps_small_classes():
    labels = np.array([0] * 10 + [1] * 40 + [2] * 3)
    chosen = holdout_indices(labels, 4)
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 1]  # K per class, at most half of a small class
    assert np.array_equal(chosen, holdout_indices(labels, 4)) and np.all(np.diff(chosen) > 0)
    # splitmix64's published first output for seed 0 (Steele, Lea, Flood 2014; Vigna's reference code)
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_val_images_get_the_test_transforms_and_training_images_the_augmentations(tmp_path):
    for wnid in ("n01", "n02"):
        folder = tmp_path / "imagenet" / "train" / wnid
        folder.mkdir(parents=True)
        for k in range(4):
            pixels = np.random.default_rng(k).integers(0, 256, (300, 260, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.png")
    val, fit = get_dataset("imagenet", "val", tmp_path), get_dataset("imagenet", "train_minus_val", tmp_path)
    assert (len(val), len(fit)) == (4, 4)  # 10 per class asked, half of each 4-image class held out
    assert torch.equal(val[0][1], val[0][1]) and val[0][1].shape == (3, 224, 224)  # centre crop: deterministic
    torch.manual_seed(0)
    first = fit[0][1]
    assert not all(torch.equal(first, fit[0][1]) for _ in range(3))  # random resized crops and flips


def test_corrupted_sets_have_no_val_and_a_sealed_split_cannot_be_read():
    with pytest.raises(UserError, match="test split only"):
        get_dataset("digits_c", "val")
    with sealed("test"):
        with pytest.raises(SealedSplitError, match="test split of digits is sealed"):
            get_dataset("digits", "test")
        assert len(get_dataset("digits", "val")) == 300
    assert len(get_dataset("digits", "test")) == 360  # unsealed when the block ends
