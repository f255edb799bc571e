"""CAT-RS's teacher and soft labels made by the cluster, cached in run storage, one owner per key.

    catrs tune search_spaces/catrs_cifar10.yaml --cache-dir s3://bucket/catrs-cache

`cluster_producer()` is the `catrs.teacher.Producer` of every Ray path (sweeps, `catrs train --workers`):

- the teacher trains as a Ray Train job on the workers (a GPU where the cluster has them), with its
  checkpoints in the cache's `teachers/` folder, so a failed worker restarts it from its latest checkpoint
  (`FailureConfig`), and a driver that died mid-way resumes it by running again (same name, same storage);
- its votes run as the certification queue (`chunks.distributed_votes`);
- one process in the whole cluster computes a key at a time: the owner holds a lease from a named actor
  (`CacheOwners`, one per cluster, on the head node) and renews it while it works; the others wait for the
  entry to appear. A holder that dies stops renewing, its lease lapses, and the next requester takes over.
  The entry itself is written whole at the end (`catrs.storage`), so nothing that looks complete is left by
  a crash. A file lock would not do: each machine would see only its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray

from catrs.distributed.chunks import distributed_votes
from catrs.distributed.runtime import cluster_has_gpus
from catrs.storage import Stored
from catrs.teacher import Producer, local_cache_dir
from catrs.train import TrainConfig

LEASE_SECONDS = 60.0
WAIT_SECONDS = 2.0
OWNERS = "catrs-cache-owners"
NAMESPACE = "catrs"


@ray.remote(num_cpus=0, max_restarts=-1)
class CacheOwners:
    """Which process computes which cache entry: leases that lapse unless renewed."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, seconds: float) -> bool:
        """Takes (or renews) the lease of `key` for `holder`, unless another holds it unexpired."""
        now = time.monotonic()
        current = self.leases.get(key)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self.leases[key] = (holder, now + seconds)
        return True

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]


def owners() -> ray.actor.ActorHandle:
    """The cluster's one `CacheOwners`, created by whoever asks first; it lives on the head node (which a
    cluster keeps while workers come and go) and outlives the job that created it."""
    return CacheOwners.options(name=OWNERS, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                               resources={"node:__internal_head__": 0.001}).remote()


@contextlib.contextmanager
def cluster_exclusive(entry: Stored, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Returns once this process owns `entry`'s key, renewing the lease until the block ends, or once the
    entry exists (another owner made it: the caller reads it)."""
    keeper, holder = owners(), uuid.uuid4().hex
    while not ray.get(keeper.acquire.remote(entry.uri, holder, lease_seconds)):
        if entry.exists():
            yield
            return
        time.sleep(WAIT_SECONDS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds / 3):
            keeper.acquire.remote(entry.uri, holder, lease_seconds)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        keeper.release.remote(entry.uri, holder)


def train_teacher_on_workers(config: TrainConfig, folder: Stored, device: str | None, data_root: Path | None,
                             download: bool, progress: bool) -> Path:
    """The teacher as a one-worker Ray Train job (a GPU where there are GPUs), checkpointed in the cache."""
    from catrs.distributed.train import train_distributed

    storage = folder.sibling("teachers")
    local = local_cache_dir() / "teacher-checkpoints" / folder.name  # the driver's copy of the final one
    return train_distributed(config, local, workers=1, gpus_per_worker=1.0 if cluster_has_gpus() else 0.0,
                             storage_path=str(Path(storage.uri).resolve()) if storage.local else storage.uri,
                             data_root=data_root, download=download)


def cluster_producer() -> Producer:
    return Producer(train_teacher=train_teacher_on_workers, vote=distributed_votes, exclusive=cluster_exclusive)
