"""A small CAT-RS sweep end to end: Tune + Optuna + ASHA, the proxy on val, the choice on val, the one test
certification (a queue of chunks), the registered champion, and the MLflow store it leaves (checked with
MlflowClient, and through the REST API of a real `mlflow server`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from catrs.checkpoint import load_checkpoint
from catrs.context import resolve_tracking_uri
from catrs.data import get_dataset
from catrs.results import read_results

pytestmark = pytest.mark.slow

SPACE = {
    "name": "tiny",
    "method": "catrs",
    "dataset": "synthetic",
    "sigma": 0.25,
    "seed": 3,
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05},
    "fixed": {"num_steps": 1, "teacher_noises": 20, "num_noises": 2},
    "search": {"lbd": {"loguniform": [0.5, 2.0]}, "sigma0": {"choice": [0.25, 0.5]}},
    "points_to_evaluate": [{"lbd": 1.0, "sigma0": 0.25}],
    "objective": "acr",
    "proxy": {"n0": 16, "n": 64, "images": 16, "batch": 512},
    "selection": {"top_k": 2, "images": 32},
    "final": {"n0": 16, "n": 100, "batch": 500, "max": 40, "workers": 2},
    "budget": {"num_samples": 3, "max_concurrent": 2, "scheduler": "asha", "first_rung": 1},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def test_a_small_sweep_runs_to_completion_and_is_on_record_in_mlflow(ray_cluster, run_cli, tmp_path, monkeypatch):
    """Through `catrs demo --space` (the README's main command, on a tiny space); `catrs tune` is the same
    sweep under the file's own name (the resume test runs it)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    code, out, err = run_cli("demo", "--space", path, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    [sweep_dir] = (tmp_path / "runs" / "sweeps").glob("tiny-*")  # the demo names each sweep by its start time
    assert f"sweep {sweep_dir.name}: 3 trials" in out and "MLflow:" in out

    final = read_results(sweep_dir / "final.parquet")
    assert final["idx"].tolist() == list(range(40)) and (final["n"] == 100).all()

    client = MlflowClient(resolve_tracking_uri())
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`catrs.kind` = 'sweep' and tags.`catrs.sweep` = '{sweep_dir.name}'",
    )
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert f"catrs report --sweep {parent.info.run_id}" in out and "Table 3" not in out  # synthetic has no corruptions
    assert {"test_acr", "test_certified_accuracy_0", "final_val_acr"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} == {
        "results/final.parquet",
        "results/test_p_lower.csv",  # the distribution of p_A's lower bound, a table beside its chart
    }

    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    val_keys = set(get_dataset("synthetic", "val").keys.tolist())
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["catrs.method"] == "catrs" and child.data.tags["catrs.sigma"] == "0.25"
        assert {"lbd", "sigma0"} <= set(child.data.params)
        assert "proxy/val_acr" in child.data.metrics and "proxy/val_certified_accuracy_0.25" in child.data.metrics
        assert not {"acr", "test_noisy_accuracy"} & set(child.data.metrics)  # no figure of the test split
        history = client.get_metric_history(child.info.run_id, "proxy/val_acr")
        assert 1 <= len(history) <= 2
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "proxy", "plots"} <= files
        proxy_rows = pd.read_parquet(
            client.download_artifacts(child.info.run_id, "proxy/evaluation.parquet", str(tmp_path))
        )
        assert len(proxy_rows) == 16 and set(proxy_rows["idx"]) <= val_keys  # the proxy certified val images

    # The cost ledger adds up what the trials, the teachers, the selection and the test certification spent.
    cost = {k.removeprefix("cost/"): v for k, v in parent.data.metrics.items() if k.startswith("cost/")}
    epochs = [len(client.get_metric_history(c.info.run_id, "lr")) for c in children]
    train_images = len(get_dataset("synthetic", "train_minus_val"))
    assert cost["epochs/full"] == sum(epochs) and cost["training_run_equivalents"] == sum(epochs) / 2
    assert cost["optimizer_steps"] == sum(epochs) * -(-train_images // 128)
    votes = 2 * len(get_dataset("synthetic", "train")) * 20  # a teacher per σ0, voting on the training split
    assert cost["teacher_runs"] == 2 and cost["samples/votes"] == votes
    proxies = sum(len(client.get_metric_history(c.info.run_id, "proxy/val_samples")) for c in children)
    assert proxies * 16 * 16 <= cost["samples/proxy"] <= proxies * 16 * (16 + 64)
    assert cost["samples/test"] == 40 * (16 + 100)  # every test image: n0 + n
    assert (
        0
        < cost["samples/selection"]
        <= len(shortlisted := [c for c in children if "final_val_acr" in c.data.metrics]) * 32 * 116
    )
    assert "training-run equivalents in trials" in out and f"test {40 * 116:,}" in out

    # The choice is made on val; test is read once, after it, for the winner alone.
    winner = parent.data.tags["best_trial"]
    [chosen] = [c for c in children if c.data.tags["catrs.trial_id"] == winner]
    assert [c for c in children if "test_acr" in c.data.metrics] == [chosen]
    assert chosen.data.metrics["test_acr"] == parent.data.metrics["test_acr"]
    assert chosen in shortlisted and 1 <= len(shortlisted) <= 2
    assert chosen.data.metrics["final_val_acr"] == max(c.data.metrics["final_val_acr"] for c in shortlisted)
    chose_at = max(client.get_metric_history(c.info.run_id, "final_val_acr")[0].timestamp for c in shortlisted)
    assert client.get_metric_history(parent.info.run_id, "test_acr")[0].timestamp >= chose_at
    assert pd.read_parquet(sweep_dir / "final.parquet")["split"].unique().tolist() == ["test"]
    paper_point = [c for c in children if float(c.data.params["lbd"]) == 1.0 and c.data.params["sigma0"] == "0.25"]
    assert paper_point, "the paper's setting is among the trials"

    # The choice is the registered champion, and certifies to the same rows as its checkpoint.
    version = client.get_model_version_by_alias("tiny", "champion")  # the space's model; a version per sweep
    assert version.tags["catrs.sweep"] == sweep_dir.name and version.tags["catrs.val_metric"] == "final_val_acr"
    assert version.run_id == chosen.info.run_id and parent.data.tags["best_checkpoint"] == str(
        sweep_dir / "best" / "checkpoint.pt"
    )  # the model is logged on the run it came from
    assert (version.tags["sigma"], version.tags["dataset"], version.tags["method"]) == ("0.25", "synthetic", "catrs")
    assert float(version.tags["hyper.lbd"]) == float(chosen.data.params["lbd"])
    rows = {}
    for name, checkpoint in (
        ("file", sweep_dir / "best" / "checkpoint.pt"),
        ("registry", "models:/tiny@champion"),
    ):
        code, _, err = run_cli(
            "certify",
            "--checkpoint",
            checkpoint,
            "--dataset",
            "synthetic",
            "--sigma",
            "0.25",
            "--n0",
            "16",
            "--n",
            "100",
            "--max",
            "12",
            "--inference",
            "eager",
            "--out",
            tmp_path / f"{name}.parquet",
        )
        assert code == 0, err
        rows[name] = read_results(tmp_path / f"{name}.parquet")
    columns = ["idx", "label", "predict", "radius", "correct", "checkpoint_sha256"]
    pd.testing.assert_frame_equal(rows["file"][columns], rows["registry"][columns])
    assert rows["registry"]["checkpoint"].unique().tolist() == ["models:/tiny@champion"]

    # The trade-off report: written by `catrs tune` itself, and again on demand from the store.
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep_report")} == {
        "sweep_report/frontier.png",
        "sweep_report/objective_by_param.png",
        "sweep_report/trials.csv",
    }
    code, text, err = run_cli("report", "--sweep", parent.info.run_id, "--radius", "0.25")
    assert code == 0, err
    assert "Pareto-optimal" in text
    importances = {
        k: float(v) for k, v in client.get_run(parent.info.run_id).data.params.items() if k.startswith("importance.")
    }
    objectives = {c.data.metrics["proxy/val_acr"] for c in children}
    if len(objectives) > 1:  # with three tiny trials the proxy ACR can tie: then there is nothing to attribute
        assert set(importances) == {"importance.lbd", "importance.sigma0"} and "importance for val_acr:" in text
        assert sum(importances.values()) == pytest.approx(1.0, abs=2e-3)  # logged to 3 decimals

    _the_ui_tells_the_story(client, parent, children, chosen)
    _the_ui_server_answers_with_the_same_story(
        parent.info.experiment_id, parent.info.run_id, "tiny", chosen.info.run_id, tmp_path
    )


def _the_ui_tells_the_story(client, parent, children, chosen):
    """What a user sees in the MLflow UI (issue 13): the runs view, the winner marked, every setting and epoch,
    the data sets and the model."""
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs
    assert "catrs" in experiment.tags["mlflow.note.content"]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.run_name.endswith(f"test acr {parent.data.metrics['test_acr']:.3f}")
    note = parent.data.tags["mlflow.note.content"]
    assert f"runs/{chosen.info.run_id})" in note and "| trial |" in note and "**Winner:" in note
    assert "`proxy/val_acr` (the proxy" in note and "### Cost" in note and "training-run equivalents" in note
    assert {
        "epochs",
        "batch_size",
        "method_config.num_steps",
        "proxy.n",
        "final.n",
        "budget.num_samples",
        "search_space",
    } <= set(parent.data.params) and parent.data.params["budget.num_samples"] == "3"
    assert "lbd" not in parent.data.params  # searched: on the children
    assert parent.data.tags["catrs.version"] and parent.data.tags["catrs.searched"] == "lbd:loguniform,sigma0:choice"
    chosen = client.get_run(chosen.info.run_id)
    assert chosen.data.tags["catrs.winner"] == "true" and chosen.info.run_name.startswith("★ lbd=")
    assert chosen.data.params["method_config.lbd"] == chosen.data.params["lbd"]  # the winner has every setting
    # A trial's page shows its curves and a few headline figures, not a one-point chart per radius or bin.
    assert {k for k in chosen.data.metrics if k.startswith(("final_val_", "test_"))} == {
        f"{prefix}{figure}"
        for prefix in ("final_val_", "test_")
        for figure in ("acr", "clean_accuracy", "certified_accuracy_0.25")
    }
    inputs = {
        (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in chosen.inputs.dataset_inputs
    }
    assert inputs == {
        ("synthetic/train_minus_val", "training"),
        ("synthetic/val", "validation"),
        ("synthetic/test", "evaluation"),
    }
    for child in children:
        stopped = child.data.tags.get("catrs.stopped_at")
        epochs = int(stopped.removeprefix("epoch ")) if stopped else 2
        assert [m.step for m in client.get_metric_history(child.info.run_id, "lr")] == list(range(1, epochs + 1))
        if stopped:
            assert client.get_run(child.info.run_id).info.run_name.endswith(f"stopped at {stopped}")


def _three_epoch_space(tmp_path, name: str, **changes):
    """The tiny space, trained three epochs, under another name and with `changes`, written to a file."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "name": name, "train": {**SPACE["train"], "epochs": 3}, **changes}))
    return path


def test_synchronous_halving_waits_for_every_trial_at_a_rung_and_keeps_the_best_share(
    ray_cluster, run_cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = _three_epoch_space(
        tmp_path,
        "halving",
        selection={"top_k": 1, "images": 16},
        # Rungs at epochs 1 and 2: four trials, then the best two, then the best one trains its third epoch.
        budget={"num_samples": 4, "max_concurrent": 2, "scheduler": "halving", "reduction_factor": 2},
    )
    code, out, err = run_cli("tune", path, "--dry-run")
    assert code == 0 and "≈ 2.33 training-run equivalents in trials" in out, err  # (4 + 2 + 1) epochs of 3
    code, out, err = run_cli("tune", path, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    client = MlflowClient(resolve_tracking_uri())
    [parent] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`catrs.kind` = 'sweep' and tags.`catrs.sweep` = 'halving'",
    )
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    history = {c.info.run_id: client.get_metric_history(c.info.run_id, "proxy/val_acr") for c in children}
    epochs = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "lr")) for c in children}
    assert sorted(epochs.values()) == [1, 1, 2, 3]
    for rung, survivors in ((1, 2), (2, 1)):
        reached = [run for run, trained in epochs.items() if trained >= rung]
        figure = {run: next(m.value for m in history[run] if m.step == rung) for run in reached}
        went_on = {run for run in reached if epochs[run] > rung}
        assert len(went_on) == survivors and min(figure[r] for r in went_on) >= max(
            figure[r] for r in set(reached) - went_on
        )  # the best of the rung went on
        # No trial trained past the rung before every trial had reported it: the rung waited for all of them.
        last_at_rung = max(m.timestamp for run in reached for m in history[run] if m.step == rung)
        first_past = min(m.timestamp for run in went_on for m in client.get_metric_history(run, "lr") if m.step > rung)
        assert first_past >= last_at_rung
    for child in children:
        stopped = child.data.tags.get("catrs.stopped_at")
        assert stopped == (None if epochs[child.info.run_id] == 3 else f"epoch {epochs[child.info.run_id]}")
    assert parent.data.metrics["cost/training_run_equivalents"] == pytest.approx(7 / 3)
    assert (
        parent.data.tags["best_trial"]
        == next(c for c in children if epochs[c.info.run_id] == 3).data.tags["catrs.trial_id"]
    )  # the only trial trained out is the choice


def test_a_killed_sweep_driver_resumes_to_the_planned_trials_without_duplicate_runs(
    ray_cluster, run_cli, tmp_path, monkeypatch
):
    import os
    import signal
    import subprocess
    import sys
    import time

    monkeypatch.chdir(tmp_path)
    path = _three_epoch_space(
        tmp_path,
        "killed",
        # Budgeted rungs (half the steps, then all): the kill may fall mid-climb, and the climb resumes.
        budget={"num_samples": 3, "max_concurrent": 1, "fidelity": "fraction", "min_fraction": 0.5},
    )
    client = MlflowClient(resolve_tracking_uri())

    def experiments() -> list[str]:
        return [e.experiment_id for e in client.search_experiments()]

    def children() -> list:
        return client.search_runs(experiments(), "tags.`catrs.sweep` = 'killed' and tags.`catrs.kind` = 'trial'")

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "catrs.cli", "tune", str(path), "--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(r.info.status == "FINISHED" for r in children()):
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(1)
    code, _, err = run_cli("tune", path, "--resume", "--cache-dir", tmp_path / "cache")  # while it runs
    assert code == 2 and "is being written by another command, catrs tune (pid" in err, err
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 1 <= len(children()) < 3

    code, out, err = run_cli("tune", path, "--resume", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    runs = children()
    trial_ids = [r.data.tags["catrs.trial_id"] for r in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3  # the planned trials, each once
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "sweep killed: 3 trials" in out
    assert len(client.search_runs(experiments(), "tags.`catrs.kind` = 'sweep' and tags.`catrs.sweep` = 'killed'")) == 1
    assert read_results(tmp_path / "runs" / "sweeps" / "killed" / "final.parquet")["idx"].tolist() == list(range(40))
    for run in runs:  # a trial stopped at the lower rung trained its 3 epochs once, one trained out twice
        stopped = run.data.tags.get("catrs.stopped_at")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "lr")]
        assert (stopped, steps) in (("1/2 of the steps", [1, 2, 3]), (None, [1, 2, 3, 4, 5, 6])), (stopped, steps)
    best = load_checkpoint(tmp_path / "runs" / "sweeps" / "killed" / "best" / "checkpoint.pt")
    assert best.training_state["config"]["fraction"] == 1.0  # the choice is a run trained on every step


def _the_ui_server_answers_with_the_same_story(
    experiment_id: str, parent: str, model: str, chosen: str, tmp_path
) -> None:
    """The REST API the UI reads, of a real `mlflow server` on loopback over the store the sweep wrote."""
    import json
    import urllib.request

    from tests.helpers import MlflowServer

    server = MlflowServer(resolve_tracking_uri(), str(tmp_path / "served-artifacts"))
    server.start()
    try:

        def call(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(
                server.uri + "/api/2.0/mlflow/" + path,
                method="POST" if body else "GET",
                data=json.dumps(body).encode() if body else None,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        experiment = call(f"experiments/get?experiment_id={experiment_id}")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        [winner] = call(
            "runs/search",
            {
                "experiment_ids": [experiment_id],
                "filter": f"tags.`mlflow.parentRunId` = '{parent}' and tags.`catrs.winner` = 'true'",
            },
        )["runs"]
        assert winner["info"]["run_id"] == chosen and winner["info"]["run_name"].startswith("★ ")
        assert {"synthetic/test", "synthetic/val", "synthetic/train_minus_val"} == {
            d["dataset"]["name"] for d in winner["inputs"]["dataset_inputs"]
        }
        alias = call(f"registered-models/alias?name={model}&alias=champion")["model_version"]
        assert alias["run_id"] == chosen
    finally:
        server.stop()


def test_a_killed_population_sweep_resumes_records_each_copy_and_its_choice_replays_to_the_same_weights(
    ray_cluster, run_cli, tmp_path, monkeypatch
):
    """Synchronous PBT with two members and quantile ½: after each of epochs 1 and 2 the lower member copies
    the other, so copies are certain. The driver is killed after the first copy and resumed; then the copies are
    read back from MLflow against the lineage each member's checkpoint keeps, and the choice's `replay.yaml` is
    trained again with `catrs train --config` to the very weights the sweep certified."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    monkeypatch.chdir(tmp_path)
    path = _three_epoch_space(
        tmp_path,
        "population",
        search={"lbd": {"loguniform": [0.5, 2.0]}, "sigma0": {"choice": [0.25, 0.5]}},
        selection={"top_k": 1, "images": 16},
        budget={
            "scheduler": "pbt",
            "population": 2,
            "interval": 1,
            "quantile": 0.5,
            "synch": True,
            "max_concurrent": 2,
        },
    )
    code, out, err = run_cli("tune", path, "--dry-run")
    assert code == 0 and "2 trials, 2 at a time, synchronous population-based training (PBT)" in out, err
    assert "perturb lbd" in out and "≈ 2.00 training-run equivalents" in out
    client = MlflowClient(resolve_tracking_uri())

    def children() -> list:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, "tags.`catrs.sweep` = 'population' and tags.`catrs.kind` = 'trial'")

    def copies(run) -> dict[int, str]:
        tags = client.get_run(run.info.run_id).data.tags
        return {int(k.rsplit("_", 1)[1]): v for k, v in tags.items() if k.startswith("catrs.exploit.after_epoch_")}

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cache = tmp_path / "cache"
    driver = subprocess.Popen(
        [sys.executable, "-m", "catrs.cli", "tune", str(path), "--cache-dir", str(cache)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(copies(run) for run in children()):
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not any(run.info.status == "FINISHED" for run in children())

    code, out, err = run_cli("tune", path, "--resume", "--cache-dir", cache)
    assert code == 0, err
    best_dir = tmp_path / "runs" / "sweeps" / "population" / "best"
    assert f"its schedule ({best_dir / 'schedule.csv'}; trained again by OMP_NUM_THREADS=1 catrs train" in out
    runs = children()
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["catrs.trial_id"] for r in runs}) == 2  # the two members, each once
    ids = {r.data.tags["catrs.trial_id"] for r in runs}
    for run in runs:  # each copy the member's weights carry is on record on its run, with whom it copied
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "schedule/schedule.csv", str(tmp_path)))
        owners = table["trained_by"].tolist()
        member = run.data.tags["catrs.trial_id"]
        assert table["epoch"].tolist() == [1, 2, 3] and owners[-1] == member and set(owners) <= ids
        for epoch in range(1, 3):
            if owners[epoch] == member != owners[epoch - 1]:
                assert copies(run)[epoch].startswith(f"copied {owners[epoch - 1]} after epoch {epoch}")
    assert sum(len(copies(run)) for run in runs) >= 1

    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    chosen = parent.data.tags["best_run"]
    replay = client.download_artifacts(chosen, "schedule/replay.yaml", str(tmp_path / "chosen"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trials trained (Ray gives a one-CPU trial one thread)
    try:
        code, _, err = run_cli("train", "--config", replay, "--out", tmp_path / "replayed", "--cache-dir", cache)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    best = load_checkpoint(best_dir / "checkpoint.pt")
    assert (best_dir / "replay.yaml").read_text() == Path(replay).read_text()  # the same file, beside it
    replayed = load_checkpoint(tmp_path / "replayed" / "checkpoint.pt").state_dict
    assert all(torch.equal(best.state_dict[k], replayed[k]) for k in best.state_dict)
    [version] = client.search_model_versions("name = 'population'")  # the registry holds the schedule too
    schedule = best.training_state["config"]["schedule"]
    assert json.loads(version.tags.get("train.schedule", "[]")) == [dict(change) for change in schedule]
