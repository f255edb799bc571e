"""`digits_c`: common corruptions of the embedded digits test split, so the paper's Table 3 runs on a laptop.

There is no published corrupted copy of scikit-learn's 8×8 digits, so catrs generates its own, in the image of
CIFAR-10-C (5 severities per corruption) and MNIST-C (whose geometric corruptions matter for digits):
12 corruptions × 5 severities × the 360 test images, computed in memory in well under a second. They are
catrs's own, not a benchmark from the literature: compare digits_c numbers between catrs runs only.

Every corruption is seeded by its name alone and draws the same random numbers at every severity (the same
noise pattern, the same rotation direction, …) so that severity is the only thing that changes between
levels; the data set is identical on every machine. Images are stored as 8-bit values like the published
sets (the clean digits' 17 grey levels survive quantisation to within 0.002).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from catrs.data.base import DATASETS, DatasetSpec
from catrs.data.corruptions import Block, CorruptedImages
from catrs.data.digits import load_digits_split

Corruption = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]  # (images, level, rng) -> images


def _gaussian_noise(x: torch.Tensor, std: float, rng: torch.Generator) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=rng)


def _shot_noise(x: torch.Tensor, photons: float, rng: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * photons, generator=rng) / photons


def _impulse_noise(x: torch.Tensor, amount: float, rng: torch.Generator) -> torch.Tensor:
    hit, salt = torch.rand(x.shape, generator=rng), torch.rand(x.shape, generator=rng) < 0.5
    return torch.where(hit < amount, salt.float(), x)  # the hit pixels at one level are a subset of the next's


def _gaussian_blur(x: torch.Tensor, std: float, rng: torch.Generator) -> torch.Tensor:
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * std**2))
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), kernel[None, None])


def _motion_blur(x: torch.Tensor, length: float, rng: torch.Generator) -> torch.Tensor:
    """Averages along a segment of `length` pixels at a random angle per image (bilinear splats of 17 points)."""
    angle = math.pi * torch.rand(len(x), generator=rng)
    along = torch.linspace(-length / 2, length / 2, 17)
    points_x, points_y = along * torch.cos(angle)[:, None], along * torch.sin(angle)[:, None]  # (N, 17)
    grid = torch.arange(-4, 5, dtype=torch.float32)
    weight_x = (1 - (grid[None, None, :] - points_x[..., None]).abs()).clamp(min=0)  # (N, 17, 9)
    weight_y = (1 - (grid[None, None, :] - points_y[..., None]).abs()).clamp(min=0)
    kernels = torch.einsum("npy,npx->nyx", weight_y, weight_x)
    kernels = kernels / kernels.sum(dim=(1, 2), keepdim=True)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    return F.conv2d(padded.transpose(0, 1), kernels[:, None], groups=len(x)).transpose(0, 1)


def _stripe(x: torch.Tensor, intensity: float, rng: torch.Generator) -> torch.Tensor:
    """A vertical stroke at least `intensity` bright down a random column of each image (MNIST-C's stripe)."""
    column = torch.randint(0, x.shape[-1], (len(x),), generator=rng)
    in_stripe = (torch.arange(x.shape[-1]) == column[:, None])[:, None, None, :]
    return torch.where(in_stripe, x.clamp(min=intensity), x)


def _brightness(x: torch.Tensor, shift: float, rng: torch.Generator) -> torch.Tensor:
    return x + shift


def _contrast(x: torch.Tensor, factor: float, rng: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _warp(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Each image resampled (bilinear, black outside) at `matrices` @ (u, v, 1), coordinates in [-1, 1]."""
    grid = F.affine_grid(matrices, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_signs(count: int, rng: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (count,), generator=rng).float() * 2 - 1


def _rotate(x: torch.Tensor, degrees: float, rng: torch.Generator) -> torch.Tensor:
    angle = math.radians(degrees) * _random_signs(len(x), rng)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(len(x))
    return _warp(x, torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1))


def _shear(x: torch.Tensor, amount: float, rng: torch.Generator) -> torch.Tensor:
    shear, horizontal = amount * _random_signs(len(x), rng), torch.rand(len(x), generator=rng) < 0.5
    matrices = torch.eye(2, 3).repeat(len(x), 1, 1)
    matrices[:, 0, 1] = torch.where(horizontal, shear, 0.0)
    matrices[:, 1, 0] = torch.where(horizontal, 0.0, shear)
    return _warp(x, matrices)


def _scale(x: torch.Tensor, factor: float, rng: torch.Generator) -> torch.Tensor:
    """Shrinks the digit about the centre to `factor` of its size."""
    return _warp(x, (torch.eye(2, 3) / factor).expand(len(x), 2, 3))


def _translate(x: torch.Tensor, pixels: float, rng: torch.Generator) -> torch.Tensor:
    angle = 2 * math.pi * torch.rand(len(x), generator=rng)
    matrices = torch.eye(2, 3).repeat(len(x), 1, 1)
    matrices[:, 0, 2] = 2 * pixels / x.shape[-1] * torch.cos(angle)  # normalised coordinates: 2 per image width
    matrices[:, 1, 2] = 2 * pixels / x.shape[-2] * torch.sin(angle)
    return _warp(x, matrices)


# name -> (corruption, its parameter at severities 1..5); levels chosen so a clean model degrades gradually.
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": (_shot_noise, (60, 25, 12, 5, 3)),
    "impulse_noise": (_impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27)),
    "gaussian_blur": (_gaussian_blur, (0.5, 0.7, 0.9, 1.1, 1.4)),
    "motion_blur": (_motion_blur, (1.5, 2.0, 2.5, 3.0, 4.0)),
    "stripe": (_stripe, (0.2, 0.35, 0.5, 0.7, 1.0)),
    "brightness": (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": (_contrast, (0.75, 0.6, 0.45, 0.3, 0.2)),
    "rotate": (_rotate, (6, 12, 18, 24, 30)),
    "shear": (_shear, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "scale": (_scale, (0.9, 0.8, 0.7, 0.6, 0.5)),
    "translate": (_translate, (0.5, 1.0, 1.5, 2.0, 2.5)),
}
SEVERITIES = 5


def corrupt(images: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    """`images` (N, C, H, W) in [0, 1] under corruption `name` at `severity` (1–5), clipped to [0, 1]."""
    function, levels = CORRUPTIONS[name]
    rng = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same draws at every severity
    return function(images, float(levels[severity - 1]), rng).clamp(0.0, 1.0)


@lru_cache(maxsize=1)
def _blocks() -> tuple[Block, ...]:
    clean = load_digits_split("test", Path(), False)
    labels = clean.labels.numpy()
    blocks = []
    for name in CORRUPTIONS:
        for severity in range(1, SEVERITIES + 1):
            images = corrupt(clean.images, name, severity)
            pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NHWC like the .npy sets
            blocks.append(Block(name, severity, pixels, labels))
    return tuple(blocks)


def load_digits_c(split: str, root: Path, download: bool, augment: bool = False) -> CorruptedImages:
    return CorruptedImages(list(_blocks()))


DATASETS.add(
    DatasetSpec(
        "digits_c",
        10,
        (1, 8, 8),
        None,
        "digits_cnn",
        load_digits_c,
        "12 generated corruptions × 5 severities of the digits test set, catrs's own",
        base="digits",
        corruptions=tuple(CORRUPTIONS),
        severities=SEVERITIES,
    )
)
