"""Shared fixtures: small real models and checkpoints, the published reference results, CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from catrs.checkpoint import save_checkpoint
from catrs.cli import main
from tests.helpers import make_card

# Every Ray service of the tests on 127.0.0.1, set before anything asks Ray for this machine's address (it keeps
# the first answer): multi-node clusters and `ray start` heads are joined there (see the Ray notes).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(autouse=True, scope="session")
def _isolated_stores(tmp_path_factory):
    """Every test logs to one throw-away MLflow store and caches soft labels in a throw-away directory."""
    root = tmp_path_factory.mktemp("stores")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CATRS_CACHE", "CATRS_FAULTS_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["CATRS_CACHE"] = str(root / "cache")
    (root / "faults").mkdir()
    os.environ["CATRS_FAULTS_DIR"] = str(root / "faults")  # inert until a test arms a fault (catrs.faults)
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Faults:
    """Arms faults for `catrs.faults` and tells which fired."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def arm(self, point: str, detail: object) -> None:
        """The next process reaching `point` with `detail` dies, once."""
        with open(self.folder / "armed", "a") as stream:
            stream.write(f"{point} {detail}\n")

    def fired(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob("fired-*"))

    def hold(self, point: str, detail: object) -> None:
        """The next process reaching `point` with `detail` waits there (`catrs.faults.HOLD_SECONDS`)."""
        with open(self.folder / "armed", "a") as stream:
            stream.write(f"hold {point} {detail}\n")

    def release(self, point: str, detail: object) -> None:
        """Lets the process held at `point` go on."""
        (self.folder / f"release-{point}-{str(detail).replace(':', '-')}").write_text("")

    def held_on(self, point: str, detail: object, seconds: float = 180) -> str:
        """Waits until a process is held at `point`; returns the name of its node ($CATRS_FAULTS_NODE)."""
        import time

        marker = self.folder / f"held-{point}-{str(detail).replace(':', '-')}"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                return marker.read_text()
            time.sleep(0.1)
        raise TimeoutError(f"no process reached {point} {detail} in {seconds:.0f} s")


@pytest.fixture
def faults(_isolated_stores):
    folder = _isolated_stores / "faults"
    yield Faults(folder)
    for path in folder.iterdir():
        path.unlink()


class ObjectStore:
    """moto's standalone S3 server on loopback, with one bucket; `uri` names a place in it."""

    BUCKET = "catrs-test"

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.client.create_bucket(Bucket=self.BUCKET)

    def uri(self, key: str) -> str:
        return f"s3://{self.BUCKET}/{key}"

    def keys(self, prefix: str) -> list[str]:
        """The objects under `prefix` (without pyarrow's empty directory markers)."""
        listing = self.client.list_objects_v2(Bucket=self.BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(item["Key"] for item in listing if not item["Key"].endswith("/"))


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """An S3-compatible server for the session. Its endpoint and dummy credentials go into the environment
    before Ray starts (`ray_cluster` depends on this), so every worker reaches the same store."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield ObjectStore(endpoint)
    server.terminate()
    server.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_local_ray():
    """The session's local Ray instance: 2 CPUs, dashboard on (see the notes on leaked placement groups)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_cluster(_isolated_stores, object_store):
    """The one local Ray instance of the test session (a module with a cluster of its own restarts it)."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture
def digits_checkpoint(tmp_path: Path) -> Path:
    """An untrained digits_cnn checkpoint for digits at σ = 0.5 (its predictions vary, which is all we need)."""
    card = make_card()
    torch.manual_seed(3)
    return save_checkpoint(tmp_path / "digits.pt", card.build_model(), card)


@pytest.fixture
def run_cli(capsys):
    """Runs `catrs ARGS` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
