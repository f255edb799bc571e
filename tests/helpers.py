"""Constants and builders shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from catrs.checkpoint import ModelCard
from catrs.context import RunContext
from catrs.data import dataset_spec

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_TSV = FIXTURES / "cifar10_sigma0.5_catrs_certify.tsv"
# `catrs train` of a small Gaussian run on the generated data set (add --epochs, --out, …).
QUICK_TRAIN = ("train", "--method", "gaussian", "--dataset", "synthetic", "--sigma", "0.25")


def quiet_context(**settings: object) -> RunContext:
    """The run context of a test: no progress bars; the session's stores (conftest) unless `settings` say
    otherwise (e.g. `cache=tmp_path / "cache"`)."""
    return RunContext.create(progress=False, **settings)  # type: ignore[arg-type]


def certify_digits(checkpoint: object, *options: object) -> list[object]:
    """`catrs certify` arguments for a digits checkpoint, at its own σ (the default), then `options`."""
    return ["certify", "--checkpoint", checkpoint, "--dataset", "digits", *options]


def make_card(dataset: str = "digits", sigma: float = 0.5, arch: str | None = None) -> ModelCard:
    spec = dataset_spec(dataset)
    return ModelCard(
        arch=arch or spec.default_arch,
        dataset=dataset,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        normalization=spec.normalization,
        sigma=sigma,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not start on port {port}")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a backend store and an artifact destination, startable and stoppable
    at will (a head node that comes and goes); each start may take a new port."""

    def __init__(self, backend_store: str, artifacts: str) -> None:
        self.backend_store, self.artifacts, self.process = backend_store, artifacts, None
        self.port = free_port()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                self.backend_store,
                "--artifacts-destination",
                self.artifacts,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, "mlflow server", 120)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Postgres:
    """A throw-away PostgreSQL server from Debian's `postgresql` package (which `make test` installs), on
    127.0.0.1 with one database; run as the `postgres` user when the tests run as root, as PostgreSQL insists."""

    def __init__(self) -> None:
        found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
        if found is None:
            raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql package")
        self.bin = Path(os.path.realpath(found)).parent
        self.root = Path(tempfile.mkdtemp(prefix="catrs-postgres-"))  # not under a root-only pytest folder
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            self.root.chmod(0o755)
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True)

    def start(self) -> str:
        """Starts the server and creates the database `mlflow`; returns its URI."""
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust")
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.root}",
            "start",
        )
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")
        return f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
