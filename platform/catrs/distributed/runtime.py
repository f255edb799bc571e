"""Joining Ray: the cluster in `RAY_ADDRESS` (or `--address`), else a local instance of this machine."""

from __future__ import annotations

import logging
import os

from catrs.interrupts import stop_on_sigterm


def connect(address: str | None = None) -> None:
    """Initialises Ray once per process; a no-op when it already is (tests share one local instance)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Token authentication stays on (Ray's default for a local instance); its warning that it is on asks the
    # user for nothing, so it is not shown.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Worker output stays in Ray's logs; catrs prints its own progress on the driver.
    ray.init(address=address, log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    stop_on_sigterm()  # Ray's init made SIGTERM a bare exit; catrs ends its runs and says what was saved


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
