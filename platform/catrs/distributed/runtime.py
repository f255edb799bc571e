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
- `refuse_beyond_reach`: a request no cluster of this shape can ever serve (more workers, or a bigger worker,
  than the nodes up and the nodes its autoscaler can add can hold) is refused at once, in one line that says
  what was asked and what exists (`reach`), rather than waited on for ever.
- `gpu_workers_see_cuda`: whether a process given a GPU by Ray can use it (on a test cluster whose nodes
  only advertise GPUs it cannot), which decides the worker device and the collective backend.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catrs.errors import UserError
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

    def worker_bundle(self) -> dict[str, float]:
        """`worker_resources` as Ray reserves them: an actor given a GPU also holds Ray's default CPU."""
        return {"CPU": 1, "GPU": 1} if self.accelerated else {"CPU": 1}


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


UNIT = 10_000  # Ray counts resources in fixed point, to 1/10,000 (so 3 workers of 1/3 CPU fit on one CPU)
SHOWN = ("CPU", "GPU")  # what catrs's work asks for, and what a refusal names


@dataclass(frozen=True)
class NodeKind:
    """Nodes an autoscaler can add: a node type's name, its `resources` (None: the config names none, so they
    are known only once one starts, and no request is refused for lack of them) and its `max_workers`."""

    name: str
    resources: dict[str, float] | None
    count: int


@dataclass(frozen=True)
class Reach:
    """The nodes a cluster has up (`up`) and the nodes its autoscaler can add (`kinds`, at most `room` of them
    in all; None: no autoscaler)."""

    up: tuple[dict[str, float], ...]
    kinds: tuple[NodeKind, ...] | None = None
    room: int = 0

    @property
    def kept(self) -> tuple[dict[str, float], ...]:
        """The nodes up that its autoscaler did not add, and counts in no node type's `max_workers`: the head,
        and any node of a shape no node type has (one started by hand)."""
        shapes = [kind.resources for kind in self.kinds or () if kind.resources is not None]
        return tuple(
            node
            for node in self.up
            if "node:__internal_head__" in node
            or not any(all(node.get(r, 0.0) == shape.get(r, 0.0) for r in SHOWN) for shape in shapes)
        )

    def most(self, bundle: dict[str, float]) -> float:
        """How many `bundle`s (each on one node) the cluster can ever hold at once: on the nodes up now, or on
        its kept nodes and the nodes its autoscaler can add, the roomiest kinds first (inf: unknown)."""
        now = sum(_holds(node, bundle) for node in self.up)
        return max(now, self._added(lambda node: _holds(node, bundle)))

    def total(self, resource: str) -> float:
        """The most of `resource` the cluster can ever have at once (inf: unknown)."""
        now = sum(node.get(resource, 0.0) for node in self.up)
        return max(now, self._added(lambda node: math.inf if node is None else node.get(resource, 0.0)))

    def _added(self, value: Callable[[dict[str, float] | None], float]) -> float:
        """`value` summed over the kept nodes and the nodes the autoscaler can add that have most of it."""
        if self.kinds is None:
            return 0.0
        total, room = float(sum(value(node) for node in self.kept)), self.room
        for kind in sorted(self.kinds, key=lambda kind: value(kind.resources), reverse=True):
            taken = min(kind.count, room)
            if taken > 0:
                total, room = total + taken * value(kind.resources), room - taken
        return total

    def shortfall(self, workers: int, bundle: dict[str, float], driver: dict[str, float] | None = None) -> str | None:
        """Why `workers` bundles (and one `driver` bundle beside them) can never run at once; None if they may."""
        most = self.most(bundle)
        if most < 1:
            return f"a worker of {describe_resources(bundle)} fits on no node the cluster has or can add"
        if workers > most:
            return f"{workers} workers of {describe_resources(bundle)} each at once, and at most {int(most)} fit"
        if driver is not None:
            if self.most(driver) < 1:
                return f"{describe_resources(driver)} to drive the workers fits on no node the cluster has or can add"
            for resource in SHOWN:
                need = workers * bundle.get(resource, 0.0) + driver.get(resource, 0.0)
                if need > self.total(resource):
                    return (
                        f"{workers} workers of {describe_resources(bundle)} each and "
                        f"{describe_resources(driver)} to drive them need {_count(need, resource)} at once, and "
                        f"the cluster can have at most {_count(self.total(resource), resource)}"
                    )
        return None

    def describe(self) -> str:
        """What exists, in words: the nodes up, and what the autoscaler can add."""
        totals = ", ".join(_count(sum(node.get(r, 0.0) for node in self.up), r) for r in SHOWN)
        nodes = f"{len(self.up)} node{'s' if len(self.up) != 1 else ''}"
        if self.kinds is None:
            return f"Ray has {nodes} up ({totals}) and no autoscaler to add any"
        offers = [kind for kind in self.kinds if kind.count > 0]
        if not offers or self.room <= 0:
            return f"Ray has {nodes} up ({totals}) and its autoscaler can add none"
        kinds = ", ".join(
            f"{kind.count} × {kind.name} "
            + ("(resources known at launch)" if kind.resources is None else f"({describe_resources(kind.resources)})")
            for kind in offers
        )
        most = "" if self.room >= sum(kind.count for kind in offers) else f", {self.room} nodes in all"
        return f"Ray has {nodes} up ({totals}) and its autoscaler can add {kinds}{most}"


def _holds(node: dict[str, float] | None, bundle: dict[str, float]) -> float:
    """How many `bundle`s fit on one node (inf: a node of unknown resources, or a bundle that asks nothing)."""
    if node is None:
        return math.inf
    asked = [(round(node.get(key, 0.0) * UNIT), round(value * UNIT)) for key, value in bundle.items() if value > 0]
    return min((has // wants for has, wants in asked), default=math.inf)


def _count(amount: float, resource: str) -> str:
    if amount == math.inf:
        return f"any number of {resource}s"
    shown = f"{amount:g}"
    if amount == 0:
        return f"no {resource}"
    return f"{shown} {resource}" + ("s" if amount != 1 and float(amount).is_integer() else "")


def describe_resources(bundle: dict[str, float]) -> str:
    """A bundle in words: `{"CPU": 1, "GPU": 1}` → "1 CPU and 1 GPU"."""
    shown = [_count(bundle[r], r) for r in SHOWN if bundle.get(r, 0) > 0]
    return " and ".join(shown) or "no CPU or GPU"


def reach(config: dict[str, Any] | None = None) -> Reach:
    """The cluster's nodes up now, and what its autoscaler (its config: `config`, else found as `capacity`
    finds it) can add."""
    import ray

    config = config if config is not None else _autoscaling_config()
    up = tuple({**node["Resources"]} for node in ray.nodes() if node.get("Alive") and node.get("Resources") is not None)
    if config is None:
        return Reach(up)
    head = config.get("head_node_type")
    kinds = tuple(
        NodeKind(
            name,
            None if node_type.get("resources") is None else {k: float(v) for k, v in node_type["resources"].items()},
            int(node_type.get("max_workers", 0)),
        )
        for name, node_type in (config.get("available_node_types") or {}).items()
        if name != head
    )
    return Reach(up, kinds, int(config.get("max_workers", 1 << 30)))


def refuse_beyond_reach(
    asked: str, workers: int, bundle: dict[str, float], fix: str, driver: dict[str, float] | None = None
) -> None:
    """Refuses (`UserError`, before any work) `workers` bundles, and a `driver` bundle beside them, that the
    cluster could never hold at once — it has too few nodes up and its autoscaler can add too few — rather
    than wait for them for ever. `asked` names the request (its flags), `fix` says what to change."""
    connect()
    cluster = reach()
    problem = cluster.shortfall(workers, bundle, driver)
    if problem is not None:
        raise UserError(f"{asked}: {problem} ({cluster.describe()}); {fix}")


def _autoscaling_config() -> dict[str, Any] | None:
    path = os.environ.get(CONFIG_ENVIRONMENT) or _running_autoscaler_config()
    if not path or not Path(path).expanduser().is_file():
        return None
    import yaml

    text = Path(path).expanduser().read_text()
    return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)


def _running_autoscaler_config() -> str | None:
    """The `--autoscaling-config` of the Ray autoscaler running on this machine (a cluster's head) for the
    cluster this process has joined, if any: another cluster's autoscaler on the same machine (a second head,
    a test's) says nothing of this one's nodes."""
    import psutil

    port = _gcs_port()
    for process in psutil.process_iter(["cmdline"]):
        arguments = process.info["cmdline"] or []
        if any(a.endswith("autoscaler/_private/monitor.py") for a in arguments):
            options = dict(a.split("=", 1) for a in arguments if a.startswith("--") and "=" in a)
            if port is not None and options.get("--gcs-address", "").rpartition(":")[2] not in ("", port):
                continue
            if "--autoscaling-config" in options:
                return options["--autoscaling-config"]
    return None


def _gcs_port() -> str | None:
    """The port of the cluster this process has joined (None: none yet)."""
    import ray

    if not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().gcs_address).rpartition(":")[2]


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
