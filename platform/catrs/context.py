"""The run context: where a command's data, cache and records are, and how it runs — built once by the CLI.

    context = RunContext.create(data_root=args.data_root, cache=args.cache_dir, tracking_uri=args.tracking_uri)

Every layer below the CLI (training, soft labels, certification, sweeps, the Ray workers) receives this one
frozen object instead of loose values. Its paths are resolved once, on the machine that builds it: a data
root is absolute (a Ray worker's working directory is not the driver's), a relative SQLite tracking store
too, and the cache is a directory or an object-store URI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from catrs.storage import is_uri


def default_data_root() -> Path:
    """`$CATRS_DATA`, else `./data`."""
    return Path(os.environ.get("CATRS_DATA", "data"))


def default_cache() -> str:
    """`$CATRS_CACHE` (a directory or an object-store URI), else ~/.cache/catrs."""
    return os.environ.get("CATRS_CACHE") or str(Path.home() / ".cache" / "catrs")


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The MLflow URI to log to: `explicit`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` here; a
    relative SQLite path is made absolute, so processes in other directories agree."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


@dataclass(frozen=True)
class RunContext:
    """What every layer of a command shares: the data root and whether to download missing data, the cache
    of soft labels, teachers and registered models (a directory or an object-store URI), the torch device of
    a single-process run (None: CUDA if there is one), whether to draw progress bars, and the MLflow store."""

    data_root: Path
    download: bool
    cache: str
    device: str | None
    progress: bool
    tracking_uri: str

    @classmethod
    def create(
        cls,
        *,
        data_root: str | Path | None = None,
        download: bool = False,
        cache: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
        tracking_uri: str | None = None,
    ) -> RunContext:
        """A context with every default filled in and every local path made absolute."""
        cache = str(cache or default_cache())
        return cls(
            data_root=Path(data_root or default_data_root()).resolve(),
            download=download,
            cache=cache if is_uri(cache) else str(Path(cache).resolve()),
            device=device,
            progress=progress,
            tracking_uri=resolve_tracking_uri(tracking_uri),
        )

    @property
    def local_cache(self) -> Path:
        """Where files this machine must hold locally are kept: the cache when it is a directory, else
        ~/.cache/catrs."""
        return Path(self.cache) if not is_uri(self.cache) else Path.home() / ".cache" / "catrs"
