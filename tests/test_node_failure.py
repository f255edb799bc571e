"""Node failures on a real multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head with no
CPUs and two one-CPU worker nodes). A node is removed mid-run, as a spot preemption would take it, and the run
must end as a clean one does. Each node has its own cache and temporary directory, and run output lives only
in the object store, so nothing passes because the nodes happen to share a disk."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.checkpoint import load_checkpoint
from catrs.results import read_results
from catrs.sampling import SamplingProtocol
from catrs.train import TrainConfig
from tests.conftest import start_local_ray
from tests.helpers import quiet_context

pytestmark = pytest.mark.slow
RESEARCH = ["idx", "label", "predict", "radius", "correct"]


@dataclass
class Nodes:
    cluster: object
    folder: Path
    workers: dict[str, object]

    def add(self, name: str) -> None:
        """A one-CPU worker node with a disk of its own (its cache and temporary folders)."""
        for sub in ("cache", "tmp"):
            (self.folder / name / sub).mkdir(parents=True, exist_ok=True)
        self.workers[name] = self.cluster.add_node(
            num_cpus=1,
            env_vars={
                "CATRS_CACHE": str(self.folder / name / "cache"),
                "TMPDIR": str(self.folder / name / "tmp"),
                "CATRS_FAULTS_NODE": name,
            },
        )
        self.cluster.wait_for_nodes()

    def preempt(self, name: str, replacement: str) -> None:
        """Kills the node `name` and brings up a fresh one, as the autoscaler replaces a lost spot node."""
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=False)
        self.add(replacement)


@pytest.fixture(scope="module")
def nodes(object_store, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    restart = ray.is_initialized()
    ray.shutdown()  # the session's local instance gives way to this module's cluster
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every service on 127.0.0.1 (see the Ray notes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = Nodes(cluster, tmp_path_factory.mktemp("nodes"), {})
    nodes.add("a")
    nodes.add("b")
    ray.init(address=cluster.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    else:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved
    if restart:
        start_local_ray()


def in_background(work) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # re-raised by the test after join
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: list):
    """The run's result, once it ends — well before the held process would give up waiting (`HOLD_SECONDS`):
    nothing releases it, so a run that ends in time did not wait for it, i.e. its node really went."""
    from catrs.faults import HOLD_SECONDS

    thread.join(timeout=0.8 * HOLD_SECONDS)
    assert not thread.is_alive(), "the run waited for the held process: its node was not lost"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_a_node_lost_mid_certification_costs_only_its_chunks(nodes, object_store, faults, digits_checkpoint, tmp_path):
    from catrs.distributed.chunks import certify_distributed

    settings = CertifySettings(SamplingProtocol(n0=20, n=400, batch=800), inference="eager")
    clean = run_certification(
        CertifyRequest(digits_checkpoint, "digits", 0.5, tmp_path / "clean.parquet", settings, max_index=40),
        quiet_context(),
    )
    out = object_store.uri("preempted/cert.parquet")
    faults.hold("certify.chunk", 12)  # the worker that takes the chunk starting at image 12 stops there
    thread, outcome = in_background(
        lambda: certify_distributed(
            CertifyRequest(digits_checkpoint, "digits", 0.5, out, settings, max_index=40), quiet_context(), 2, 4
        )
    )
    nodes.preempt(faults.held_on("certify.chunk", 12), replacement="c")
    finished(thread, outcome)
    merged = read_results(out)
    assert merged["idx"].tolist() == list(range(40))  # each image exactly once
    pd.testing.assert_frame_equal(merged[RESEARCH], read_results(clean)[RESEARCH])
    assert object_store.keys("preempted/") == ["preempted/cert.parquet"]


def test_a_node_lost_mid_ddp_training_restarts_from_the_checkpoint_in_the_object_store(
    nodes, object_store, faults, tmp_path
):
    from catrs.distributed.train import WorkerPlan, train_distributed

    spec = TrainConfig(method="gaussian", dataset="synthetic", sigma=0.25, epochs=3, batch_size=64, lr=0.05).resolve()
    storage = object_store.uri("train-runs")
    clean = train_distributed(spec, tmp_path / "clean", WorkerPlan(2, storage_path=storage), quiet_context())
    faults.hold("train.epoch", "1:1")  # rank 1, after epoch 2's steps, before its checkpoint
    thread, outcome = in_background(
        lambda: train_distributed(spec, tmp_path / "preempted", WorkerPlan(2, storage_path=storage), quiet_context())
    )
    nodes.preempt(faults.held_on("train.epoch", "1:1"), replacement="d")
    preempted = finished(thread, outcome)
    assert any(key.startswith("train-runs/preempted/checkpoint_") for key in object_store.keys("train-runs/"))
    a, b = load_checkpoint(clean), load_checkpoint(preempted)
    assert b.training_state["next_epoch"] == spec.config.epochs
    assert [row["epoch"] for row in b.training_state["history"]] == [1, 2, 3]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_a_node_lost_mid_sweep_retries_its_trial_and_mlflow_has_each_trial_once(
    nodes, object_store, faults, tmp_path, monkeypatch
):
    import yaml
    from mlflow.tracking import MlflowClient

    from catrs.sweep.run import SweepOptions, run_sweep
    from catrs.sweep.space import load_search_space

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "preempted.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "preempted",
                "method": "gaussian",
                "dataset": "synthetic",
                "sigma": 0.25,
                "seed": 0,
                "train": {"epochs": 3, "batch_size": 128},
                "search": {"lr": {"loguniform": [0.02, 0.1]}},
                "objective": "acr",
                "proxy": {"n0": 16, "n": 64, "images": 16, "batch": 512},
                "selection": {"top_k": 2, "images": 32},
                "final": {"n0": 16, "n": 64, "batch": 512, "max": 20},
                "budget": {"num_samples": 2, "max_concurrent": 2, "scheduler": "none"},
                "resources": {"workers": 1, "cpus_per_worker": 1},
            }
        )
    )
    faults.hold("train.epoch", "1:0")  # the first trial to finish its second epoch's steps stops there
    thread, outcome = in_background(
        lambda: run_sweep(load_search_space(path), SweepOptions(storage_path=object_store.uri("tune")), quiet_context())
    )
    nodes.preempt(faults.held_on("train.epoch", "1:0"), replacement="e")
    sweep = finished(thread, outcome)

    assert list(sweep.trials["status"]) == ["done", "done"]
    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(sweep.parent_run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'"
    )
    assert sorted(c.data.tags["catrs.trial_id"] for c in children) == sorted(sweep.trials["trial"])
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:  # the retried trial's epochs are logged once each, not once per attempt
        assert [m.step for m in client.get_metric_history(child.info.run_id, "proxy/val_acr")] == [3]
