"""CAT-RS's soft labels ŷ: a Gaussian teacher's vote histograms over the training set, computed once.

    ŷ_i = counts of argmax F_teacher(x_i + δ), δ ~ N(0, σ0²I), over N noises, divided by N

for every training index i, where the teacher is trained with Gaussian augmentation at σ0 (or given as a
checkpoint). That is a certification-sized job (N = 10,000 votes per training image), so the result is cached
under a key of everything that determines it — data set, architecture, σ0, the teacher's training settings (or
its checkpoint's SHA-256), N and the seed — in the run context's cache, a directory or an object store
(`--cache-dir`, `$CATRS_CACHE`), where a new cluster finds it again. A `Producer` says how a missing entry is
made: in this process under a file lock (`catrs.train.local_producer`), or on a cluster (`cluster_producer` in
`catrs.distributed.train`: the teacher as a Ray task on a worker, the votes as a queue of chunks, and
one owner per key cluster-wide). This module trains nothing itself: what a teacher is lives in `catrs.train`
(`teacher_run`), which depends on this module, not the other way round. The math: docs/methods.md, "Soft labels
ŷ (the teacher)". The votes reuse the certification core (`Smooth.sample_counts`, noise stream VOTES keyed by
training index).

Training images get the same preprocessing as in the released code: the training split with its training
transforms, one augmented view per image; catrs draws each image's view from a seed of (seed, index), so ŷ is
reproducible and the same however the votes are split (`count_votes` is the single-process way,
`catrs.distributed.chunks` runs the same job as a queue of chunks on Ray workers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from catrs.checkpoint import Checkpoint, file_sha256, load_checkpoint
from catrs.context import RunContext
from catrs.data import Indexed, get_dataset
from catrs.errors import UserError
from catrs.inference import pick_device
from catrs.seeds import derived_seed
from catrs.smoothing import NoiseStream, Smooth
from catrs.storage import Stored, stored
from catrs.vote_store import FORMAT, MANIFEST, SoftLabels, VoteStore


@dataclass(frozen=True)
class SoftLabelSpec:
    """Everything that determines a soft-label table; its hash is the cache key."""

    dataset: str
    arch: str
    sigma0: float
    votes: int  # N: noisy votes per training image
    seed: int
    teacher_training: dict[str, Any] = field(default_factory=dict)  # the Gaussian teacher's schedule
    teacher_checkpoint_sha256: str = ""  # set instead when a trained teacher is given

    def record(self) -> dict[str, Any]:
        """The spec as the cache records and hashes it. The vote count keeps the name it had when the first
        entries were written (`num_noises`), so that their keys, and their teachers' folders, stay valid."""
        data = asdict(self)
        data["num_noises"] = data.pop("votes")
        return data

    def key(self) -> str:
        canonical = json.dumps(self.record(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def vote_histograms(
    model: nn.Module,
    dataset: Dataset,
    indices: list[int],
    sigma: float,
    votes: int,
    *,
    seed: int,
    batch_size: int = 1000,
    progress: bool = False,
) -> torch.Tensor:
    """Vote counts (len(indices), C) of `model` under `votes` Gaussian draws per image, on the CPU."""
    num_classes = _num_outputs(model, dataset)
    smooth = Smooth(model, num_classes, sigma, seed=seed)
    group = max(1, batch_size // votes)
    rows = []
    for start in tqdm(
        range(0, len(indices), group), desc="soft labels", unit="group", disable=not progress, file=sys.stderr
    ):
        items = [_augmented_view(dataset, i, seed) for i in indices[start : start + group]]
        xs = torch.stack([x for _, x, _ in items])
        counts = smooth.sample_counts(xs, votes, batch_size, indices=[i for i, _, _ in items], stream=NoiseStream.VOTES)
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
    """Votes of a teacher over a training split, written by chunk into the cache entry `store`: what
    `count_votes` and its distributed twin compute."""

    checkpoint: Checkpoint
    dataset: str
    sigma: float
    votes: int
    seed: int
    store: VoteStore


def teacher_and_train_set(job: VoteJob, context: RunContext) -> tuple[nn.Module, Indexed]:
    """The job's teacher on the context's device, and the training split it votes on."""
    model = job.checkpoint.model(pick_device(context.device))
    return model, get_dataset(job.dataset, "train", context.data_root, context.download)


def consecutive(indices: list[int]) -> list[list[int]]:
    """`indices` (ascending) in runs of consecutive values: each run is one chunk file."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def count_votes(job: VoteJob, context: RunContext) -> tuple[int, int]:
    """The votes of `job` in this process, for the indices no chunk file holds yet; (size, classes)."""
    model, train_set = teacher_and_train_set(job, context)
    done = job.store.covered()
    for run in consecutive([i for i in range(len(train_set)) if i not in done]):
        counts = vote_histograms(model, train_set, run, job.sigma, job.votes, seed=job.seed, progress=context.progress)
        job.store.write_chunk(run[0], counts, job.votes)
    return len(train_set), job.checkpoint.card.num_classes


class TeacherTrainer(Protocol):
    """Trains the Gaussian teacher of `spec`'s soft labels, checkpointed in its cache `folder`; returns a local
    checkpoint of it (`catrs.train.train_teacher_here`, or the cluster's)."""

    def __call__(self, spec: SoftLabelSpec, folder: Stored, context: RunContext) -> Path: ...


class VoteCounter(Protocol):
    """Counts a teacher's votes into its store (`count_votes` in this process, or the cluster's chunk queue);
    returns the training split's size and the number of classes."""

    def __call__(self, job: VoteJob, context: RunContext) -> tuple[int, int]: ...


def file_lock(entry: Stored) -> ContextManager:
    """One computation per key among the processes of this machine (a lock file beside a local entry); an
    object-store entry needs the cluster's owner (`catrs.distributed.cache`), without which two machines may
    compute it twice — wasted work, never a wrong entry, since each writes it whole."""
    if not entry.local:
        return contextlib.nullcontext()
    Path(entry.uri).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(entry.uri + ".lock")


@dataclass(frozen=True)
class Producer:
    """How a missing cache entry is made: where the teacher trains, where its votes are counted, and who owns
    a key while it is computed: this process (`catrs.train.local_producer`) or the cluster
    (`catrs.distributed.train.cluster_producer`)."""

    train_teacher: TeacherTrainer
    vote: VoteCounter
    exclusive: Callable[[Stored], ContextManager]


def soft_labels(
    spec: SoftLabelSpec, context: RunContext, producer: Producer, teacher_checkpoint: Path | None = None
) -> SoftLabels:
    """The soft labels of `spec`, from the context's cache (a directory or an object-store URI), or computed by
    `producer` into it: the teacher trained (unless given), its votes counted by chunk. The entry is complete
    only once its manifest is written, so a crash mid-way leaves nothing that looks complete, and a re-run
    counts only what no chunk holds."""
    store = VoteStore(stored(context.cache).child(f"soft-labels-{spec.key()}").uri)
    if (done := _complete(store, spec)) is not None:
        return done
    with producer.exclusive(store.folder.child(MANIFEST)):
        if (done := _complete(store, spec)) is not None:  # computed by the owner we waited for
            return done
        if teacher_checkpoint is None:
            teacher_checkpoint = producer.train_teacher(
                spec, stored(context.cache).child(f"teacher-{spec.key()}"), context
            )
        checkpoint = load_checkpoint(teacher_checkpoint)
        if checkpoint.card.dataset != spec.dataset:
            raise UserError(
                f"teacher {teacher_checkpoint} was trained on {checkpoint.card.dataset!r}, not {spec.dataset!r}"
            )
        size, classes = producer.vote(
            VoteJob(checkpoint, spec.dataset, spec.sigma0, spec.votes, spec.seed, store), context
        )
        store.complete(spec.record(), size, classes)
    return SoftLabels(store, spec.key(), size, classes, spec.votes)


def _complete(store: VoteStore, spec: SoftLabelSpec) -> SoftLabels | None:
    manifest = store.manifest()
    if manifest is None:
        return None
    if manifest.get("format") != FORMAT or manifest.get("spec") != spec.record():
        raise UserError(f"soft-label cache {store.uri} does not hold what its name says; delete it to recompute")
    return SoftLabels(store, spec.key(), int(manifest["size"]), int(manifest["classes"]), spec.votes)


def teacher_sha(path: str | Path) -> str:
    if not Path(path).is_file():
        raise UserError(f"teacher checkpoint not found: {path}")
    return file_sha256(path)
