"""The cluster's durable tracking: `mlflow server` on loopback over a real PostgreSQL (the backend store) and
a real S3-compatible server (the artifacts), as `cluster.yaml` sets it up. What catrs logs through one server
process is all there through the next one, as it must be after `ray down` takes the head node away."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from catrs.metrics import average_certified_radius
from catrs.results import read_results
from tests.helpers import MlflowServer, Postgres, certify_digits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    yield server.start()
    server.stop()


def test_records_and_artifacts_outlive_the_tracking_server(
    run_cli, postgres, object_store, digits_checkpoint, tmp_path
):
    artifacts = object_store.uri("mlflow-artifacts")
    head = MlflowServer(postgres, artifacts)
    head.start()
    try:
        code, _, err = run_cli(
            *certify_digits(digits_checkpoint),
            "--n0",
            "10",
            "--n",
            "100",
            "--max",
            "12",
            "--inference",
            "eager",
            "--out",
            tmp_path / "cert.parquet",
            "--tracking-uri",
            head.uri,
        )
        assert code == 0, err
    finally:
        head.stop()  # the head node and everything on its disk are gone
    assert any(key.endswith("/results/cert.parquet") for key in object_store.keys("mlflow-artifacts/"))

    new_head = MlflowServer(postgres, artifacts)  # a new cluster's head: another process, the same stores
    new_head.start()
    try:
        client = MlflowClient(new_head.uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string="tags.`catrs.kind` = 'certify'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        frame = read_results(tmp_path / "cert.parquet")
        assert runs[0].data.metrics["acr"] == pytest.approx(average_certified_radius(frame))
        back = Path(client.download_artifacts(runs[0].info.run_id, "results/cert.parquet", str(tmp_path / "back")))
        pd.testing.assert_frame_equal(read_results(back), frame)
    finally:
        new_head.stop()
