"""MLflow outages against a real `mlflow server` on loopback: refused at start, survived mid-run."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from catrs.checkpoint import load_checkpoint
from tests.helpers import QUICK_TRAIN, MlflowServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"))
    yield server
    if server.process and server.process.poll() is None:
        server.stop()


def test_an_unreachable_store_is_refused_before_any_work(run_cli, tmp_path):
    code, _, err = run_cli(
        "train",
        "--method",
        "gaussian",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--tracking-uri",
        f"http://127.0.0.1:{free_port()}",
        "--out",
        tmp_path / "run",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot use the MLflow tracking store" in err
    assert not (tmp_path / "run").exists()


def test_training_survives_the_store_going_away_and_logs_everything_when_it_returns(
    run_cli, server, tmp_path, monkeypatch
):
    import catrs.cli as cli

    server.start()
    outage = {1: server.stop, 2: server.start}  # gone after epoch 1, back after epoch 2
    printed = cli._print_epoch

    def print_and_disrupt(metrics):
        printed(metrics)
        outage.get(int(metrics["epoch"]), lambda: None)()

    monkeypatch.setattr(cli, "_print_epoch", print_and_disrupt)
    code, out, err = run_cli(
        *QUICK_TRAIN,
        "--epochs",
        "4",
        "--batch",
        "64",
        "--tracking-uri",
        server.uri,
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    assert "logging is queued" in err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").training_state["next_epoch"] == 4
    client = MlflowClient(server.uri)
    run = client.search_runs([client.get_experiment_by_name("catrs").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.jsonl"}
    [model] = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    assert "checkpoint.pt" in {
        a.path.rsplit("/", 1)[-1] for a in client.list_logged_model_artifacts(model.model_id, "extra_files")
    }  # the trained model, with its catrs checkpoint
    assert not (tmp_path / "run" / "mlflow-pending").exists()  # the journal was sent and removed


def test_what_cannot_be_sent_stays_in_the_run_directory_with_a_message(run_cli, server, tmp_path, monkeypatch):
    import catrs.cli as cli

    server.start()
    printed = cli._print_epoch

    def print_and_stop(metrics):
        printed(metrics)
        if metrics["epoch"] == 1:
            server.stop()

    monkeypatch.setattr(cli, "_print_epoch", print_and_stop)
    code, out, err = run_cli(
        *QUICK_TRAIN,
        "--epochs",
        "2",
        "--batch",
        "64",
        "--tracking-uri",
        server.uri,
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    journal = tmp_path / "run" / "mlflow-pending" / "journal.jsonl"
    assert f"records are kept in {journal}" in err
    ops = [line.split('"op": "')[1].split('"')[0] for line in journal.read_text().splitlines()]
    assert ops.count("metrics") >= 1 and ops.count("artifact") == 2 and ops[-1] == "end"
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").training_state["next_epoch"] == 2
