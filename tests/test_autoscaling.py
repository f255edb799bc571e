"""The cluster path meets its GPUs (issue 21), on a fake autoscaling cluster on this machine: a head with no GPU
(`ray start --head`, as on a `ray up` cluster, with token authentication) and a GPU node type that starts at
zero nodes. Work that needs GPUs asks for them, the autoscaler adds GPU nodes, nothing trains or samples on
the head, and the rows and weights equal those of a CPU run. Workers see no CUDA here: they choose their device
(and Train's collective backend) from what they actually have."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.checkpoint import load_checkpoint
from catrs.distributed.runtime import connect
from catrs.results import read_results
from catrs.sampling import SamplingProtocol
from tests.conftest import start_local_ray
from tests.helpers import AutoscalingHead, quiet_context

pytestmark = pytest.mark.slow
RESEARCH = ["idx", "label", "predict", "radius", "correct"]
# The work catrs puts on the cluster: chunk workers, Ray Train workers, Tune trials, tasks that train.
WORK = ("ChunkWorker", "RayTrainWorker", "ImplicitFunc", "_train_task", "_teacher_task")


@pytest.fixture(scope="module")
def head():
    import ray

    restart = ray.is_initialized()
    ray.shutdown()  # the session's local instance gives way to this module's cluster
    head = AutoscalingHead()
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = head.start()
    connect()  # this process joins the cluster as its driver, whichever of the tests runs first
    yield head
    ray.shutdown()
    head.stop()
    if saved is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = saved
    if restart:
        start_local_ray()


def _work(before: set[str] = frozenset()) -> tuple[set[str], int, set[str]]:  # type: ignore[assignment]
    """The kinds of node ("head", "gpu") that ran catrs's work (actors and tasks, ended ones too) not among the
    ids in `before`, how many GPU nodes the autoscaler has added, and the ids of all work so far."""
    import ray
    from ray.util.state import list_actors, list_tasks

    kinds = {
        node["NodeID"]: "head"
        if "node:__internal_head__" in node["Resources"]
        else "gpu"
        if node["Resources"].get("GPU")
        else "cpu"
        for node in ray.nodes()
    }
    items = [
        (
            getattr(item, "actor_id", None) or item.task_id,
            kinds.get(item.node_id, "unknown"),
            getattr(item, "class_name", "") or getattr(item, "name", "") or "",
        )
        for item in [*list_actors(limit=10_000), *list_tasks(limit=10_000)]
        if item.node_id  # (a call of an ended worker that never ran has no node)
    ]
    ran = {kind for key, kind, name in items if key not in before and any(work in name for work in WORK)}
    return ran, sum(kind == "gpu" for kind in kinds.values()), {key for key, _, _ in items}


def test_a_certification_asks_for_gpu_nodes_and_runs_none_of_its_work_on_the_head(
    head, run_cli, digits_checkpoint, tmp_path
):
    out = tmp_path / "cert.parquet"
    code, _, err = run_cli(
        "certify", "--checkpoint", digits_checkpoint, "--dataset", "digits", "--n0", "20", "--n", "200",
        "--batch", "400", "--max", "40", "--inference", "eager", "--workers", "2", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    ran, gpu_nodes, _ = _work()
    assert ran == {"gpu"} and gpu_nodes == 2  # the autoscaler added both GPU nodes; the head ran nothing
    settings = CertifySettings(SamplingProtocol(n0=20, n=200, batch=400), inference="eager")
    clean = CertifyRequest(digits_checkpoint, "digits", None, tmp_path / "clean.parquet", settings, max_index=40)
    expected = read_results(run_certification(clean, quiet_context()))
    rows = read_results(out)
    pd.testing.assert_frame_equal(rows[RESEARCH], expected[RESEARCH])  # the same rows as one CPU process
    assert set(rows["device"]) == {expected["device"].iloc[0]}  # the workers' CPUs: they see no CUDA here


def test_catrs_train_on_workers_takes_a_gpu_each_from_a_shell_with_no_ray_settings(head, tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # a shell on the head, as is

    def train(out: str, *extra: str) -> None:
        command = [sys.executable, "-m", "catrs.cli", "train", "--method", "gaussian", "--dataset", "synthetic"]
        command += ["--sigma", "0.25", "--epochs", "1", "--batch", "64", "--lr", "0.05", "--workers", "2", *extra]
        done = subprocess.run([*command, "--out", str(tmp_path / out)], env=environment, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    before = _work()[2]
    train("gpu")
    ran, gpu_nodes, _ = _work(before)
    assert ran == {"gpu"} and gpu_nodes == 2
    train("cpu", "--gpus-per-worker", "0")  # the same run on CPU workers
    a, b = load_checkpoint(tmp_path / "gpu" / "checkpoint.pt"), load_checkpoint(tmp_path / "cpu" / "checkpoint.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_a_catrs_sweep_trains_its_teacher_votes_trials_and_certifies_on_gpu_nodes(head, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = {
        "name": "gpu-sweep",
        "method": "catrs",
        "dataset": "synthetic",
        "sigma": 0.25,
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.05},
        "fixed": {"num_steps": 1, "teacher_noises": 16, "num_noises": 2, "sigma0": 0.25},
        "search": {"lbd": {"loguniform": [0.5, 2.0]}},
        "points_to_evaluate": [{"lbd": 1.0}],
        "objective": "acr",
        "proxy": {"n0": 16, "n": 64, "images": 16, "batch": 512},
        "selection": {"top_k": 1, "images": 32},
        "final": {"n0": 16, "n": 64, "batch": 512, "max": 20, "workers": 1},
        "budget": {"num_samples": 2, "max_concurrent": 2, "scheduler": "none"},
    }
    path = tmp_path / "gpu-sweep.yaml"
    path.write_text(yaml.safe_dump(space))
    before = _work()[2]
    code, out, err = run_cli("tune", path, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    ran, _, _ = _work(before)
    assert ran == {"gpu"}  # the teacher, its votes, the trials, the selection and the test certification
    sweep = tmp_path / "runs" / "sweeps" / "gpu-sweep"
    settings = CertifySettings(SamplingProtocol(n0=16, n=64, batch=512))
    clean = CertifyRequest(
        sweep / "best" / "checkpoint.pt", "synthetic", None, tmp_path / "c.parquet", settings, max_index=20
    )
    expected = read_results(run_certification(clean, quiet_context()))
    pd.testing.assert_frame_equal(read_results(sweep / "final.parquet")[RESEARCH], expected[RESEARCH])


def test_requests_beyond_what_the_cluster_has_and_its_autoscaler_can_add_are_refused_at_once(
    head, run_cli, digits_checkpoint, tmp_path, monkeypatch
):
    """Issue 33: each waited for ever (the autoscaler can add 2 nodes of 1 GPU and 1 CPU; the head has no GPU)."""
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "wide.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "wide",
                "method": "gaussian",
                "dataset": "synthetic",
                "sigma": 0.25,
                "train": {"epochs": 2, "batch_size": 64},
                "search": {"lr": {"loguniform": [0.01, 0.1]}},
                "objective": "acr",
                "proxy": {"n": 64, "images": 16},
                "resources": {"workers": 3},
            }
        )
    )
    train = ["train", "--method", "gaussian", "--dataset", "synthetic", "--epochs", "1", "--out", tmp_path / "r"]
    refusals = {
        "--workers 3: 3 workers of 1 CPU and 1 GPU each at once, and at most 2 fit": [
            *["certify", "--checkpoint", digits_checkpoint, "--dataset", "digits", "--workers", "3"],
            *["--out", tmp_path / "o.parquet"],
        ],
        "--workers 3 --gpus-per-worker 1: 3 workers of 1 CPU and 1 GPU each at once, and at most 2 fit": [
            *train,
            *["--workers", "3", "--gpus-per-worker", "1"],
        ],
        "--workers 1 --gpus-per-worker 2: a worker of 1 CPU and 2 GPUs fits on no node the cluster has or can add": [
            *train,
            *["--workers", "1", "--gpus-per-worker", "2"],
        ],
        "resources (each trial): 3 workers of 1 CPU and 1 GPU each at once, and at most 2 fit": ["tune", space],
    }
    for message, args in refusals.items():
        began = time.monotonic()
        code, out, err = run_cli(*args)
        assert code == 2 and err.startswith("catrs: error:") and len(err.strip().splitlines()) == 1, err
        assert message in err and "its autoscaler can add 2 × gpu_1x (1 CPU and 1 GPU)" in err, err
        assert time.monotonic() - began < 30  # at once, not after a wait for nodes that never come
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.pt", "wide.yaml"]  # no output, run or sweep
