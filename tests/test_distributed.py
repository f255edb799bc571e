"""Ray Train DDP training, certification and soft-label votes as a queue of chunks, on the session's Ray
instance."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.checkpoint import load_checkpoint
from catrs.results import read_results
from catrs.sampling import SamplingProtocol
from catrs.teacher import VoteJob, count_votes
from catrs.train import TrainConfig, train
from catrs.vote_store import SoftLabels, VoteStore
from tests.helpers import certify_digits, quiet_context

pytestmark = pytest.mark.slow
RESEARCH = ["idx", "label", "predict", "radius", "correct"]
SETTINGS = CertifySettings(SamplingProtocol(n0=20, n=200, batch=400), inference="eager")


def test_ddp_training_with_two_cpu_workers_reports_the_same_schema_and_a_loadable_checkpoint(ray_cluster, tmp_path):
    from catrs.distributed.train import WorkerPlan, train_distributed

    spec = TrainConfig(
        method="catrs",
        dataset="synthetic",
        sigma=0.25,
        epochs=2,
        batch_size=64,
        lr=0.05,
        method_config={"num_steps": 1, "teacher_noises": 20},
    ).resolve()
    context = quiet_context(cache=tmp_path / "cache")
    distributed = train_distributed(spec, tmp_path / "ddp", WorkerPlan(2, cpus_per_worker=0.5), context)
    local = train(spec, tmp_path / "local", context)
    a, b = load_checkpoint(distributed), load_checkpoint(local)
    assert a.training_state["next_epoch"] == 2
    assert [set(row) for row in a.training_state["history"]] == [set(row) for row in b.training_state["history"]]
    model = a.model()
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 4)
    assert a.card == b.card


def test_chunked_certification_equals_a_single_process_run_row_for_row_and_resumes(
    ray_cluster, digits_checkpoint, tmp_path
):
    from catrs.distributed.chunks import certify_distributed

    whole = run_certification(
        CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "whole.parquet", SETTINGS, max_index=30),
        quiet_context(),
    )
    request = CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "chunked.parquet", SETTINGS, max_index=30)
    certify_distributed(request, quiet_context(), 2, 4)
    expected = read_results(whole)[RESEARCH]
    pd.testing.assert_frame_equal(read_results(request.out)[RESEARCH], expected)
    assert not (tmp_path / "chunked.parquet.chunks").exists()  # merged and cleaned up

    # An interrupted run: one chunk finished, one torn mid-write, nothing merged yet. The re-run keeps the
    # finished chunk's rows, does the torn one's images again, and the rest — in chunks of another size.
    partial = CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "resumed.parquet", SETTINGS, max_index=30)
    chunks = tmp_path / "resumed.parquet.chunks"
    chunks.mkdir()
    finished = chunks / "chunk-000000000-000000009.parquet"
    pd.read_parquet(request.out).iloc[:10].assign(radius=99.0).to_parquet(finished, index=False)
    torn = chunks / "chunk-000000010-000000019.parquet"
    pd.read_parquet(request.out).iloc[10:20].to_parquet(torn, index=False)
    torn.write_bytes(torn.read_bytes()[:300])
    certify_distributed(partial, quiet_context(), 2, 3)
    resumed = read_results(partial.out)
    assert (resumed["radius"].iloc[:10] == 99.0).all()  # taken from the finished chunk, not recomputed
    pd.testing.assert_frame_equal(
        resumed[RESEARCH].iloc[10:].reset_index(drop=True), expected.iloc[10:].reset_index(drop=True)
    )


def test_certification_into_an_object_store_writes_chunks_there_and_merges_them(
    ray_cluster, object_store, digits_checkpoint, tmp_path
):
    from catrs.distributed.chunks import certify_distributed

    whole = run_certification(
        CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "whole.parquet", SETTINGS, max_index=20),
        quiet_context(),
    )
    out = object_store.uri("certify/cert.parquet")
    certify_distributed(
        CertifyRequest(digits_checkpoint, "digits", 0.5, out, SETTINGS, max_index=20), quiet_context(), 2, 5
    )
    assert object_store.keys("certify/") == ["certify/cert.parquet"]  # the chunks are merged and gone
    pd.testing.assert_frame_equal(read_results(out)[RESEARCH], read_results(whole)[RESEARCH])
    # The single-process path writes there too, and resumes from what the object holds.
    single = object_store.uri("certify/single.parquet")
    run_certification(CertifyRequest(digits_checkpoint, "digits", 0.5, single, SETTINGS, max_index=10), quiet_context())
    run_certification(CertifyRequest(digits_checkpoint, "digits", 0.5, single, SETTINGS, max_index=20), quiet_context())
    pd.testing.assert_frame_equal(read_results(single)[RESEARCH], read_results(whole)[RESEARCH])


def test_the_planner_cuts_several_chunks_per_worker_and_never_less_than_one_pass():
    from catrs.distributed.chunks import CHUNKS_PER_WORKER, plan_chunks

    items = list(range(1000))
    chunks = plan_chunks(items, workers=4, smallest=10)
    assert sum(chunks, []) == items and len(chunks) == 4 * CHUNKS_PER_WORKER
    assert [len(c) for c in plan_chunks(items[:50], workers=4, smallest=10)] == [10] * 5
    assert [len(c) for c in plan_chunks(items[:7], workers=4, size=3)] == [3, 3, 1]


def test_distributed_votes_equal_single_process_votes_and_resume_by_chunk(ray_cluster, digits_checkpoint, tmp_path):
    from catrs.distributed.chunks import distributed_votes

    checkpoint = load_checkpoint(digits_checkpoint)
    context = quiet_context()
    here, queued = (VoteStore(str(tmp_path / name)) for name in ("here", "queued"))
    assert count_votes(VoteJob(checkpoint, "digits", 0.25, 20, 1, here), context) == (1437, 10)
    counts = np.load(io.BytesIO(here.chunks()[0][2].read()))
    queued.write_chunk(0, torch.from_numpy(counts[:100].astype(np.int64)), 20)  # a run that did 100, then died
    assert distributed_votes(VoteJob(checkpoint, "digits", 0.25, 20, 1, queued), context, workers=2) == (1437, 10)
    files = [entry.name for _, _, entry in queued.chunks()]
    assert len(files) > 2 and files[0] == "votes-000000000-000000099.npy"  # counted by chunk, the rest only
    labels = [SoftLabels(store, "k" + store.folder.name, 1437, 10, 20) for store in (here, queued)]
    first, second = (label.table(tmp_path / "node").dense() for label in labels)
    assert torch.equal(first, second)


def test_a_worker_killed_mid_run_restarts_from_the_checkpoint_and_ends_like_an_uninterrupted_run(
    ray_cluster, faults, tmp_path
):
    from catrs.distributed.train import WorkerPlan, train_distributed

    spec = TrainConfig(method="gaussian", dataset="synthetic", sigma=0.25, epochs=3, batch_size=64, lr=0.05).resolve()
    clean = train_distributed(spec, tmp_path / "clean", WorkerPlan(2, cpus_per_worker=0.5), quiet_context())
    faults.arm("train.epoch", "1:1")  # rank 1 dies after epoch 2's steps, before its checkpoint
    faulty = train_distributed(spec, tmp_path / "faulty", WorkerPlan(2, cpus_per_worker=0.5), quiet_context())
    assert faults.fired() == ["fired-train.epoch-1-1"]
    a, b = load_checkpoint(clean), load_checkpoint(faulty)
    assert b.training_state["next_epoch"] == 3
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_a_chunk_whose_worker_dies_is_retried_and_the_merge_is_unchanged(
    ray_cluster, faults, digits_checkpoint, tmp_path
):
    from catrs.distributed.chunks import certify_distributed

    clean = CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "clean.parquet", SETTINGS, max_index=24)
    certify_distributed(clean, quiet_context(), 2, 6)
    faults.arm("certify.chunk", 6)  # the worker process running the chunk that starts at position 6 dies
    faulty = CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "faulty.parquet", SETTINGS, max_index=24)
    certify_distributed(faulty, quiet_context(), 2, 6)
    assert faults.fired() == ["fired-certify.chunk-6"]
    merged = read_results(faulty.out)
    assert merged["idx"].tolist() == list(range(24))
    pd.testing.assert_frame_equal(merged[RESEARCH], read_results(clean.out)[RESEARCH])


def test_the_cli_certifies_into_an_object_store_and_logs_the_table_to_mlflow(
    ray_cluster, object_store, run_cli, digits_checkpoint, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    out = object_store.uri("cli/cert.parquet")
    code, stdout, err = run_cli(
        *certify_digits(digits_checkpoint),
        "--n0",
        "20",
        "--n",
        "200",
        "--max",
        "16",
        "--inference",
        "eager",
        "--workers",
        "2",
        "--out",
        out,
    )
    assert code == 0, err
    assert f"results: {out}" in stdout and object_store.keys("cli/") == ["cli/cert.parquet"]
    client = MlflowClient()
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "attributes.run_name = 'cert.parquet'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    logged = client.download_artifacts(run.info.run_id, "results/cert.parquet", str(tmp_path))
    pd.testing.assert_frame_equal(read_results(logged), read_results(out))


def test_running_out_of_gpu_memory_is_reported_with_the_batch_to_lower_not_retried(
    ray_cluster, digits_checkpoint, faults, tmp_path
):
    from catrs.distributed.chunks import certify_distributed
    from catrs.errors import JobFailed

    faults.arm("oom certify.group", 0)  # the chunk that starts at image 0 runs out of memory, every time
    request = CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "oom.parquet", SETTINGS, max_index=12)
    with pytest.raises(JobFailed, match="out of GPU memory with batches of 400 samples; lower --batch"):
        # One worker: with two, the one that finishes the other chunk first may run a backup copy of chunk 0
        # (the queue's backup tasks), which would also run out of memory without being a retry.
        certify_distributed(request, quiet_context(), 1, 6)
    assert len(list(faults.folder.glob("oom-certify.group-0-*"))) == 1  # tried once: it would fail again


def test_what_a_cluster_can_ever_hold_counts_its_nodes_up_and_those_its_autoscaler_can_add():
    from catrs.distributed.runtime import NodeKind, Reach

    # cluster.yaml's shape: a head of 4 CPUs; at most 8 nodes in all, of 1 GPU (up to 8) or of 4 (up to 2).
    head = {"CPU": 4.0, "node:__internal_head__": 1.0}
    kinds = (NodeKind("gpu_1x", {"CPU": 4, "GPU": 1}, 8), NodeKind("gpu_4x", {"CPU": 48, "GPU": 4}, 2))
    aws = Reach((head,), kinds, 8)
    assert aws.most({"CPU": 1, "GPU": 1}) == 14  # 2 nodes of 4 GPUs, then 6 of 1: the cluster's 8
    assert aws.most({"CPU": 8, "GPU": 4}) == 2 and aws.total("GPU") == 14 and aws.total("CPU") == 4 + 96 + 24
    assert aws.shortfall(14, {"CPU": 1, "GPU": 1}) is None
    assert aws.shortfall(15, {"CPU": 1, "GPU": 1}) == "15 workers of 1 CPU and 1 GPU each at once, and at most 14 fit"
    assert aws.shortfall(1, {"GPU": 8}) == "a worker of 8 GPUs fits on no node the cluster has or can add"
    assert aws.describe() == (
        "Ray has 1 node up (4 CPUs, no GPU) and its autoscaler can add 8 × gpu_1x (4 CPUs and 1 GPU), "
        "2 × gpu_4x (48 CPUs and 4 GPUs), 8 nodes in all"
    )
    # Nodes it has added already are not counted twice (they are among the 8); one started by hand is.
    added, by_hand = {"CPU": 48.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 2.0}
    assert Reach((head, added, added), kinds, 8).most({"GPU": 1}) == 14
    assert Reach((head, added, by_hand), kinds, 8).most({"GPU": 1}) == 16
    # Without an autoscaler, the nodes up; Ray's resources in fixed point (three workers of ⅓ CPU fit on one).
    fixed = Reach(({"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}))
    assert fixed.most({"CPU": 1 / 3}) == 18 and fixed.most({"CPU": 0.75}) == 6
    assert fixed.shortfall(2, {"CPU": 1, "GPU": 1}, driver={"CPU": 1}) is None
    assert fixed.shortfall(3, {"CPU": 2}, driver={"CPU": 1}) == (
        "3 workers of 2 CPUs each and 1 CPU to drive them need 7 CPUs at once, and the cluster can have at most 6 CPUs"
    )
    assert fixed.shortfall(1, {"CPU": 1}, driver={"CPU": 3}) == (
        "3 CPUs to drive the workers fits on no node the cluster has or can add"
    )
    assert fixed.describe() == "Ray has 3 nodes up (6 CPUs, 2 GPUs) and no autoscaler to add any"
    # A node type whose resources Ray learns only once it starts refuses nothing; an autoscaler with no room adds none.
    assert Reach((head,), (NodeKind("custom", None, 2),), 2).shortfall(1000, {"GPU": 8}) is None
    assert Reach((head,), kinds, 0).shortfall(1, {"CPU": 1, "GPU": 1}) is not None


def test_a_pool_or_a_plan_the_cluster_can_never_hold_is_refused_before_any_work(
    ray_cluster, digits_checkpoint, tmp_path
):
    from catrs.distributed.chunks import certify_distributed
    from catrs.distributed.train import WorkerPlan, train_distributed
    from catrs.errors import UserError

    request = CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "o.parquet", SETTINGS, max_index=10)
    with pytest.raises(UserError, match=r"--workers 3: 3 workers of 1 CPU each at once, and at most 2 fit \(Ray has"):
        certify_distributed(request, quiet_context(), 3)  # the session's instance has 2 CPUs, no GPU
    spec = TrainConfig(method="gaussian", dataset="synthetic", sigma=0.25, epochs=1).resolve()
    with pytest.raises(UserError, match="a worker of 1 CPU and 1 GPU fits on no node the cluster has or can add"):
        train_distributed(spec, tmp_path / "run", WorkerPlan(1, gpus_per_worker=1), quiet_context())
    assert list(tmp_path.iterdir()) == [digits_checkpoint]  # no output, chunk folder or run folder
