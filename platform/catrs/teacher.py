"""CAT-RS's soft labels ŷ: a Gaussian teacher's vote histograms over the training set, computed once.

    ŷ_i = counts of argmax F_teacher(x_i + δ), δ ~ N(0, σ0²I), over N noises, divided by N

for every training index i, where the teacher is trained with Gaussian augmentation at σ0 (or given as a
checkpoint). That is a certification-sized job (N = 10,000 votes per training image), so the result is
cached under a key of everything that determines it — data set, architecture, σ0, the teacher's training
settings (or its checkpoint's SHA-256), N and the seed — and a file lock keeps concurrent sweep trials from
computing the same key twice. The votes reuse the certification core (`Smooth.sample_counts`, noise stream
VOTES keyed by training index).

Training images get the same preprocessing as in the released code: the training split with its training
transforms, one augmented view per image; catrs draws each image's view from a seed of (seed, index), so ŷ
is reproducible and the same however the votes are sharded (`count_votes` is the single-process way,
`catrs.distributed` shards the same job over Ray tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from catrs.checkpoint import Checkpoint, file_sha256, load_checkpoint, write_atomically
from catrs.errors import UserError
from catrs.smoothing import NoiseStream, Smooth, derived_seed

FORMAT = "catrs-soft-labels"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CATRS_CACHE", Path.home() / ".cache" / "catrs"))


@dataclass(frozen=True)
class SoftLabelSpec:
    """Everything that determines a soft-label table; its hash is the cache key."""

    dataset: str
    arch: str
    sigma0: float
    num_noises: int
    seed: int
    teacher_training: dict[str, Any] = field(default_factory=dict)  # the Gaussian teacher's schedule
    teacher_checkpoint_sha256: str = ""  # set instead when a trained teacher is given

    def key(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def vote_histograms(model: nn.Module, dataset: Dataset, indices: list[int], sigma: float, num_noises: int,
                    *, seed: int, batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
    """Vote counts (len(indices), C) of `model` under `num_noises` Gaussian draws per image, on the CPU."""
    num_classes = _num_outputs(model, dataset)
    smooth = Smooth(model, num_classes, sigma, seed=seed)
    group = max(1, batch_size // num_noises)
    rows = []
    for start in tqdm(range(0, len(indices), group), desc="soft labels", unit="group", disable=not progress,
                      file=sys.stderr):
        items = [_augmented_view(dataset, i, seed) for i in indices[start : start + group]]
        xs = torch.stack([x for _, x, _ in items])
        counts = smooth.sample_counts(xs, num_noises, batch_size, indices=[i for i, _, _ in items],
                                      stream=NoiseStream.VOTES)
        rows.append(counts.cpu())
    return torch.cat(rows) if rows else torch.zeros(0, num_classes, dtype=torch.long)


def _augmented_view(dataset: Dataset, index: int, seed: int) -> tuple[int, torch.Tensor, int]:
    """dataset[index] with its random training transform drawn from a seed of (seed, index)."""
    torch.manual_seed(derived_seed(seed, index))
    return dataset[index]


def _num_outputs(model: nn.Module, dataset: Dataset) -> int:
    with torch.no_grad():
        device = next(model.parameters()).device
        return model.eval()(dataset[0][1].unsqueeze(0).to(device)).shape[-1]


@dataclass(frozen=True)
class VoteJob:
    """Votes of a teacher over (some of) a training split: what `count_votes` and its sharded twin compute."""

    checkpoint: Checkpoint
    dataset: str
    sigma: float
    num_noises: int
    seed: int
    indices: tuple[int, ...] | None = None  # None: the whole training split
    data_root: Path | None = None
    download: bool = False
    device: str | None = None

    def shard(self, indices: tuple[int, ...]) -> VoteJob:
        return replace(self, indices=indices)


def count_votes(job: VoteJob, progress: bool = False) -> torch.Tensor:
    """Vote counts (len(indices), C) for `job`, in this process."""
    from catrs.data import get_dataset
    from catrs.inference import pick_device

    train_set = get_dataset(job.dataset, "train", job.data_root, job.download)
    indices = list(job.indices) if job.indices is not None else list(range(len(train_set)))
    model = job.checkpoint.model(pick_device(job.device))
    return vote_histograms(model, train_set, indices, job.sigma, job.num_noises, seed=job.seed, progress=progress)


VoteFunction = Callable[[VoteJob], torch.Tensor]


def soft_labels(spec: SoftLabelSpec, cache_dir: Path, *, teacher_checkpoint: Path | None = None,
                device: str | None = None, data_root: Path | None = None, download: bool = False,
                progress: bool = True, vote: VoteFunction = count_votes) -> torch.Tensor:
    """ŷ (len(train split), C), float32, rows in dataset-index order: from the cache, or computed and cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"soft-labels-{spec.key()}.pt"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return _load(path, spec)
        table = _compute(spec, cache_dir, teacher_checkpoint, device, data_root, download, progress, vote)
        write_atomically(path, {"format": FORMAT, "spec": asdict(spec), "soft_labels": table})
    return table


def _compute(spec: SoftLabelSpec, cache_dir: Path, teacher_checkpoint: Path | None, device: str | None,
             data_root: Path | None, download: bool, progress: bool, vote: VoteFunction) -> torch.Tensor:
    from catrs.train import TrainConfig, train

    if teacher_checkpoint is None:
        config = TrainConfig(method="gaussian", dataset=spec.dataset, arch=spec.arch, sigma=spec.sigma0,
                             seed=spec.seed, **spec.teacher_training)
        teacher_checkpoint = train(config, cache_dir / f"teacher-{spec.key()}", device=device,
                                   data_root=data_root, download=download, progress=progress)
    checkpoint = load_checkpoint(teacher_checkpoint)
    if checkpoint.card.dataset != spec.dataset:
        raise UserError(f"teacher {teacher_checkpoint} was trained on {checkpoint.card.dataset!r}, "
                        f"not {spec.dataset!r}")
    counts = vote(VoteJob(checkpoint, spec.dataset, spec.sigma0, spec.num_noises, spec.seed, None, data_root,
                          download, device))
    return counts.float() / spec.num_noises


def _load(path: Path, spec: SoftLabelSpec) -> torch.Tensor:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"soft-label cache {path} is unreadable; delete it to recompute") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("spec") != asdict(spec):
        raise UserError(f"soft-label cache {path} does not hold what its name says; delete it to recompute")
    return payload["soft_labels"]


def teacher_sha(path: str | Path) -> str:
    if not Path(path).is_file():
        raise UserError(f"teacher checkpoint not found: {path}")
    return file_sha256(path)
