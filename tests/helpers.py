"""Constants and builders shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import glob
import json
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


class AutoscalingHead:
    """A Ray head started with `ray start --head` and a fake autoscaler (Ray's `fake_multinode` provider, set up
    as `ray.cluster_utils.AutoscalingCluster` sets it up): no GPU on the head, and a node type with one
    (logical) GPU and one CPU that starts at zero nodes, so GPUs exist only once work asks the autoscaler for
    them. Not `AutoscalingCluster` itself: its start and shutdown run `ray stop --force`, which ends every Ray
    of the machine, other runs' included. This object starts and ends only the processes it started."""

    def __init__(self, head_cpus: int = 2, gpu_nodes: int = 2) -> None:
        # Short: Ray's socket paths live under it, and a Unix socket's path may not exceed 107 bytes.
        self.folder, self.port = Path(tempfile.mkdtemp(prefix="catrs-ray-", dir="/tmp")), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = self.folder / "autoscaling.json"
        self.config.write_text(
            json.dumps(
                {
                    "cluster_name": "catrs-test",
                    "max_workers": gpu_nodes,
                    "upscaling_speed": 1.0,
                    "idle_timeout_minutes": 10,
                    "provider": {
                        "type": "fake_multinode",
                        "use_node_id_as_ip": True,
                        "disable_node_updaters": True,
                        "disable_launch_config_check": True,
                        "gcs_address": self.address,
                    },
                    "auth": {},
                    "docker": {},
                    "available_node_types": {
                        "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                        "gpu_1x": {
                            "resources": {"CPU": 1, "GPU": 1},
                            "node_config": {},
                            "min_workers": 0,
                            "max_workers": gpu_nodes,
                        },
                    },
                    "head_node_type": "ray.head.default",
                    **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
                    **{
                        key: []
                        for key in (
                            "initialization_commands",
                            "setup_commands",
                            "head_setup_commands",
                            "worker_setup_commands",
                            "head_start_ray_commands",
                            "worker_start_ray_commands",
                        )
                    },
                    "file_mounts": {},
                    "file_mounts_sync_continuously": False,
                }
            )
        )
        self.head_cpus = head_cpus

    def start(self) -> str:
        """Starts the head (its autoscaler reads `config`); returns its address."""
        environment = {
            **os.environ,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every service on 127.0.0.1
            "RAY_AUTH_MODE": "token",  # as cluster.yaml starts its head: a token (made if missing) is required
        }
        ray = Path(sys.executable).parent / "ray"
        subprocess.run(
            [
                str(ray),
                "start",
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.folder / 'ray'}",
                f"--autoscaling-config={self.config}",
                f"--num-cpus={self.head_cpus}",
                "--num-gpus=0",
                # A port of its own: another Ray on the machine may hold the default one (the tests read the
                # cluster's state through this dashboard).
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=environment,
            check=True,
            capture_output=True,
        )
        return self.address

    def processes(self) -> list:
        """This head's processes and their descendants (never this test's own process)."""
        import psutil

        marks = (str(self.folder), self.address)
        roots = [
            process
            for process in psutil.process_iter(["cmdline"])
            if process.pid != os.getpid() and any(m in a for a in process.info["cmdline"] or [] for m in marks)
        ]
        found = {process.pid: process for process in roots}
        for process in roots:
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in process.children(recursive=True)})
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        """Ends the head and the nodes its autoscaler started: asked first, then killed."""
        import psutil

        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(p) for p in processes):
            time.sleep(0.2)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def _running(process: object) -> bool:
    """Whether a process still runs (a zombie — ended, not yet reaped by a parent that is gone — does not)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined]
    except psutil.Error:
        return False
