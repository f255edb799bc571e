"""Soft labels made by the cluster and cached in run storage: an object-store cache, one owner per key, and
no complete-looking entry after a crash."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest
import torch

import catrs.train
from catrs.checkpoint import load_checkpoint
from catrs.context import RunContext
from catrs.storage import Stored, stored
from catrs.teacher import SoftLabelSpec, soft_labels
from catrs.train import local_producer, train_teacher_here
from tests.helpers import quiet_context

pytestmark = pytest.mark.slow
SPEC = SoftLabelSpec(
    dataset="digits",
    arch="digits_cnn",
    sigma0=0.25,
    votes=8,
    seed=0,
    teacher_training={"epochs": 1, "batch_size": 128, "lr": 0.05},
)


def refuse_to_train(*args, **kwargs):
    raise AssertionError("the entry was cached: nothing should be trained")


def test_an_object_store_cache_holds_the_teacher_and_the_table_and_a_second_request_reads_them(
    ray_cluster, object_store, tmp_path
):
    from catrs.distributed.train import cluster_producer

    cache = object_store.uri("cache-a")
    labels = soft_labels(SPEC, quiet_context(cache=cache), cluster_producer())
    table = labels.table(tmp_path / "node").dense()
    assert table.shape == (1437, 10) and torch.allclose(table.sum(1), torch.ones(1437))
    keys = object_store.keys("cache-a/")
    # The votes went to the cache by chunk, from the workers that counted them; the manifest came last.
    chunks = [k for k in keys if k.startswith(f"cache-a/soft-labels-{SPEC.key()}/votes-")]
    assert len(chunks) > 1 and f"cache-a/soft-labels-{SPEC.key()}/manifest.json" in keys
    # The teacher trained in a task that kept its checkpoint in the cache, where a restart finds it.
    assert f"cache-a/teacher-{SPEC.key()}/checkpoint.pt" in keys
    producer = replace(cluster_producer(), train_teacher=refuse_to_train, vote=refuse_to_train)
    again = soft_labels(SPEC, quiet_context(cache=cache), producer)
    assert torch.equal(again.table(tmp_path / "other-node").dense(), table)


def test_concurrent_requests_for_one_key_compute_it_once(ray_cluster, tmp_path):
    from catrs.distributed.cache import cluster_exclusive

    trained = []

    def counting_teacher(*args):
        trained.append(threading.get_ident())
        return train_teacher_here(*args)

    # Local storage, but the cluster's owner, not a file lock: the threads could be processes on two machines.
    producer = replace(local_producer(), train_teacher=counting_teacher, exclusive=cluster_exclusive)
    spec = replace(SPEC, seed=1)
    tables = [None, None, None]

    def request(slot: int) -> None:
        tables[slot] = soft_labels(spec, quiet_context(cache=tmp_path / "cache"), producer)

    threads = [threading.Thread(target=request, args=(slot,)) for slot in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1
    assert tables[0] == tables[1] == tables[2]  # one entry, found by all


def test_an_owner_that_dies_mid_computation_leaves_no_entry_and_its_lease_lapses(ray_cluster, object_store):
    import ray

    from catrs.distributed.cache import cluster_exclusive
    from catrs.distributed.train import cluster_producer

    cache = object_store.uri("cache-b")
    entry = stored(cache).child(f"soft-labels-{SPEC.key()}").child("manifest.json")

    @ray.remote(max_retries=0)
    def die_while_owning() -> None:
        with cluster_exclusive(entry, lease_seconds=3.0):
            stored(cache).child("started").write_bytes(b"")
            os._exit(1)  # as a killed node would: no release, no renewal

    with pytest.raises(ray.exceptions.RayError):
        ray.get(die_while_owning.remote())
    assert not entry.exists() and stored(cache).child("started").exists()
    labels = soft_labels(SPEC, quiet_context(cache=cache), cluster_producer())  # waits for the lapse, then owns
    assert entry.exists() and (labels.size, labels.classes) == (1437, 10)


def _killed_before_its_last_copy(cache: str, tmp_path, monkeypatch) -> tuple[SoftLabelSpec, Stored, RunContext]:
    """A 2-epoch teacher trained on a first machine (its own `$HOME`, so its own ~/.cache/catrs) and stopped
    after epoch 2, before that epoch's copy reached the object-store `cache`, which holds epoch 1's."""
    spec = replace(SPEC, teacher_training={**SPEC.teacher_training, "epochs": 2})
    context = quiet_context(cache=cache)
    folder = stored(context.cache).child(f"teacher-{spec.key()}")
    copies, upload = [], Stored.upload

    def killed_at_the_second_copy(self, source):
        copies.append(source)
        if len(copies) == 2:
            raise KeyboardInterrupt
        return upload(self, source)

    monkeypatch.setenv("HOME", str(tmp_path / "first"))
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Stored, "upload", killed_at_the_second_copy)
        train_teacher_here(spec, folder, context)
    return spec, folder, context


def _counting_epochs(monkeypatch) -> list[int]:
    epochs, train_epoch = [], catrs.train.train_epoch
    monkeypatch.setattr(catrs.train, "train_epoch", lambda *a, **k: epochs.append(1) or train_epoch(*a, **k))
    return epochs


def test_a_teacher_killed_on_one_machine_resumes_from_the_object_store_cache_on_another(
    object_store, tmp_path, monkeypatch
):
    spec, folder, context = _killed_before_its_last_copy(object_store.uri("cache-r"), tmp_path, monkeypatch)
    uninterrupted = tmp_path / "first" / ".cache" / "catrs" / "teachers" / folder.name / "checkpoint.pt"
    monkeypatch.setenv("HOME", str(tmp_path / "second"))
    epochs = _counting_epochs(monkeypatch)
    resumed = train_teacher_here(spec, folder, context)
    assert len(epochs) == 1  # from the cache's epoch 1: epoch 2 only
    first, second = load_checkpoint(uninterrupted).state_dict, load_checkpoint(resumed).state_dict
    assert all(torch.equal(first[k], second[k]) for k in first)  # as if it had never stopped
    assert folder.child("checkpoint.pt").read() == resumed.read_bytes()


def test_a_teacher_killed_before_its_last_copy_completes_the_cache_on_the_same_machine(
    object_store, tmp_path, monkeypatch
):
    spec, folder, context = _killed_before_its_last_copy(object_store.uri("cache-s"), tmp_path, monkeypatch)
    epochs = _counting_epochs(monkeypatch)
    again = train_teacher_here(spec, folder, context)  # the first machine again: its copy is complete
    assert epochs == []
    assert folder.child("checkpoint.pt").read() == again.read_bytes()  # not epoch 1's, which the cache held
