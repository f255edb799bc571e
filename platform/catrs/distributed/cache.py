"""CAT-RS's teacher and soft labels made by the cluster, cached in run storage, one owner per key.

    catrs tune catrs_cifar10 --cache-dir s3://bucket/catrs-cache

`catrs.distributed.train.cluster_producer()` is the `catrs.teacher.Producer` of every Ray path (sweeps,
`catrs train --workers`):

- the teacher trains as one Ray task on a worker (a GPU where the cluster has them), with its checkpoint in
  the cache's `teacher-KEY/` folder after every epoch, so a failed task (retried by Ray) or a driver that died
  mid-way resumes it from there by running again;
- its votes run as the certification queue (`chunks.distributed_votes`);
- one process in the whole cluster computes a key at a time (`cluster_exclusive`, here): the owner holds a lease
  from a named actor (a `LeaseBook`, one per cluster, on the head node) and renews it while it works; the others
  wait for the entry to appear. A holder that dies stops renewing, its lease lapses, and the next requester takes over.
  The entry itself is written whole at the end (`catrs.storage`), so nothing that looks complete is left by
  a crash. A file lock would not do: each machine would see only its own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import ray

from catrs.ownership import renewing
from catrs.storage import Stored

LEASE_SECONDS = 60.0
WAIT_SECONDS = 2.0
OWNERS = "catrs-cache-owners"
NAMESPACE = "catrs"


class LeaseBook:
    """Which process computes which cache entry: leases that lapse unless renewed."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}

    @ray.method  # typed for callers of the actor's handle
    def acquire(self, key: str, holder: str, seconds: float) -> bool:
        """Takes (or renews) the lease of `key` for `holder`, unless another holds it unexpired."""
        now = time.monotonic()
        current = self.leases.get(key)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self.leases[key] = (holder, now + seconds)
        return True

    @ray.method
    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]


def owners() -> ray.actor.ActorProxy[LeaseBook]:
    """The cluster's one `LeaseBook` actor, created by whoever asks first; it lives on the head node (which a
    cluster keeps while workers come and go) and outlives the job that created it."""
    return (
        ray.remote(LeaseBook)
        .options(
            num_cpus=0,
            max_restarts=-1,
            name=OWNERS,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            resources={"node:__internal_head__": 0.001},
        )
        .remote()
    )


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
    try:
        with renewing(lease_seconds / 3, lambda: keeper.acquire.remote(entry.uri, holder, lease_seconds)):
            yield
    finally:
        keeper.release.remote(entry.uri, holder)
