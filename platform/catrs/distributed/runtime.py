"""Joining Ray, and what the cluster can give: the GPUs it has or can add, asked for before the work needs them.

    catrs tune catrs_cifar10          (on the head of a `ray up` cluster: it joins that cluster)

- `connect`: the cluster in `RAY_ADDRESS` (or `--address`, or the one this machine runs, as on a `ray up`
  head), else a local instance. A cluster started with `ray start` authenticates with a token; a driver
  started in a shell on its head finds the token where `ray start` keeps it and presents it, with no
  environment to set by hand.
- `capacity`: the GPUs (and CPUs) the cluster has now or can scale to. An autoscaling cluster starts with no
  GPU node; planning from what is up would put GPU work on the head's CPUs. The autoscaler's node types come
  from its config (`$CATRS_AUTOSCALING_CONFIG`, else the `--autoscaling-config` of the autoscaler running on
  this machine, as on a `ray up` head).
- `ask_for`: tells the autoscaler the bundles a phase will need (`request_resources`), so nodes start while
  the driver prepares the work rather than when the first task waits.
- `gpu_workers_see_cuda`: whether a process given a GPU by Ray can use it (on a test cluster whose nodes
  only advertise GPUs it cannot), which decides the worker device and the collective backend.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catrs.interrupts import stop_on_sigterm

CONFIG_ENVIRONMENT = "CATRS_AUTOSCALING_CONFIG"


def connect(address: str | None = None) -> None:
    """Initialises Ray once per process; a no-op when it already is (tests share one local instance)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Token authentication stays on (Ray's default for a local instance); its warning that it is on asks the
    # user for nothing, so it is not shown.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if _existing_cluster(address):
        _present_token()
    # Worker output stays in Ray's logs; catrs prints its own progress on the driver.
    ray.init(address=address, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    stop_on_sigterm()  # Ray's init made SIGTERM a bare exit; catrs ends its runs and says what was saved


def _existing_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` would join a running cluster rather than start a local instance."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        # None asks it to look for a cluster (RAY_ADDRESS, then the one this machine runs); its stub says str.
        return canonicalize_bootstrap_address(address) is not None  # type: ignore[arg-type]
    except Exception:  # no cluster recorded on this machine, or an address Ray will refuse in its own words
        return address is not None


def _present_token() -> None:
    """Token authentication for this process when a token exists (`ray start` keeps one in ~/.ray): a cluster
    started with `ray start --head` requires it, and Ray's client does not turn it on by itself (2.60)."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@dataclass(frozen=True)
class Capacity:
    """What the cluster has, or can add, for catrs's work."""

    gpus: int  # GPUs up now, or that the autoscaler's node types can add (the larger)
    cpus: int  # CPUs up now
    autoscaling: bool  # whether an autoscaler's config was found (`ask_for` tells it what is coming)

    @property
    def accelerated(self) -> bool:
        return self.gpus > 0

    def workers(self) -> int:
        """How many workers a queue of GPU (or, without GPUs, CPU) work can keep busy."""
        return max(1, self.gpus or self.cpus)

    def worker_resources(self) -> dict[str, float]:
        """One worker's request: a GPU where the cluster has or can get them (never the head's CPUs), else a CPU."""
        return {"num_gpus": 1} if self.accelerated else {"num_cpus": 1}


def capacity() -> Capacity:
    """The cluster's capacity now and within its autoscaler's reach (see the module docstring)."""
    import ray

    up = ray.cluster_resources()
    scalable = autoscaling_gpus()
    return Capacity(
        gpus=max(int(up.get("GPU", 0)), scalable or 0),
        cpus=int(up.get("CPU", 0)),
        autoscaling=scalable is not None,
    )


def autoscaling_gpus(config: dict[str, Any] | None = None) -> int | None:
    """The most GPUs the autoscaler's node types can add: the GPU-richest types first, each within its own
    `max_workers`, all within the cluster's (None: no autoscaler config found)."""
    config = config if config is not None else _autoscaling_config()
    if config is None:
        return None
    head = config.get("head_node_type")
    room = int(config.get("max_workers", 1 << 30))
    offers = sorted(
        (int(node_type.get("resources", {}).get("GPU", 0)), int(node_type.get("max_workers", 0)))
        for name, node_type in (config.get("available_node_types") or {}).items()
        if name != head
    )
    total = 0
    for gpus, nodes in reversed(offers):
        taken = min(nodes, room)
        total, room = total + gpus * taken, room - taken
    return total


def _autoscaling_config() -> dict[str, Any] | None:
    path = os.environ.get(CONFIG_ENVIRONMENT) or _running_autoscaler_config()
    if not path or not Path(path).expanduser().is_file():
        return None
    import yaml

    text = Path(path).expanduser().read_text()
    return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)


def _running_autoscaler_config() -> str | None:
    """The `--autoscaling-config` of the Ray autoscaler running on this machine (a cluster's head), if any."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        arguments = process.info["cmdline"] or []
        if any(a.endswith("autoscaler/_private/monitor.py") for a in arguments):
            for argument in arguments:
                if argument.startswith("--autoscaling-config="):
                    return argument.split("=", 1)[1]
    return None


def ask_for(bundles: list[dict[str, float]]) -> None:
    """Asks the autoscaler to make room for `bundles` (e.g. one `{"GPU": 1}` per worker of the coming phase);
    an empty list withdraws the request. A no-op without an autoscaler."""
    if not capacity().autoscaling:
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


@functools.lru_cache(maxsize=1)
def gpu_workers_see_cuda() -> bool:
    """Whether a process that Ray gives a GPU can use CUDA there (asked of one such process, once)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return bool(ray.get(probe.remote()))


def cluster_has_gpus() -> bool:
    """Whether work should ask for GPUs: the cluster has them, or can add them."""
    return capacity().accelerated
