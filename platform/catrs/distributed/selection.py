"""The end of a sweep: the choice on the val split, then its one look at the test split.

Candidates are the trials trained to their last epoch; trials that ASHA stopped are not, since their
checkpoints are partly trained models, not what their settings produce. The `selection.top_k` candidates
with the best last proxy are certified on val with the selection protocol (by default the file's final one,
in `evaluate` mode: CERTIFY's exact ACR, with no estimation samples spent on images whose selected class is
wrong), and the best of them wins: the proxy only shortlists, the validation protocol decides. The winning
setting is then, if `selection.refit`, trained again on the whole training split, and — the test split
unsealed only now — certified on test with the final protocol.

    catrs tune demo_digits                         (the sweep driver calls these after its trials)
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from catrs.certify import CertifyRequest, CertifySettings, evaluation_metrics, run_certification, spread
from catrs.data import get_dataset
from catrs.distributed.chunks import certify_distributed
from catrs.distributed.train import train_distributed
from catrs.errors import JobFailed
from catrs.results import read_results
from catrs.search_space import SearchSpace
from catrs.storage import Stored, stored
from catrs.teacher import default_cache_dir
from catrs.train import RunFolder, RunSpec, train

VAL_PREFIX = "final_val_"  # the selection's figures on val, apart from the proxy's `val_…` per epoch
TEST_PREFIX = "test_"


@dataclass
class Candidate:
    """A trial trained to its last epoch, and what the selection measured of it."""

    trial_id: str
    point: dict[str, Any]  # its searched values
    proxy: float  # the objective of its last proxy (`val_OBJECTIVE`)
    checkpoint: Any  # the Ray checkpoint of its last epoch
    val_metrics: dict[str, float] = field(default_factory=dict)  # `final_val_…`, once certified

    def val(self, objective: str) -> float:
        return self.val_metrics.get(VAL_PREFIX + objective, math.nan)


def shortlist(candidates: list[Candidate], top_k: int) -> list[Candidate]:
    """The `top_k` candidates by their last proxy (ties keep the trials' order)."""
    ranked = sorted(candidates, key=lambda c: -c.proxy if math.isfinite(c.proxy) else math.inf)
    return ranked[:top_k]


def choose(shortlisted: list[Candidate], objective: str) -> Candidate:
    """The candidate with the best validation figure; among equals, the better proxy."""
    return max(shortlisted, key=lambda c: (c.val(objective), c.proxy))


def certify(request: CertifyRequest, workers: int, progress: bool) -> Stored:
    """The request on `workers` Ray workers pulling chunks, or in this process for one."""
    if workers > 1:
        return certify_distributed(request, workers, progress=progress)
    return stored(run_certification(request, progress=progress))


def validate(
    candidate: Candidate, space: SearchSpace, folder: Path, data_root: Path | None, download: bool, progress: bool
) -> None:
    """Certifies the candidate on val with the selection protocol; its figures go to `candidate.val_metrics`."""
    local = folder / "trials" / candidate.trial_id
    candidate.checkpoint.to_directory(str(local))
    selection = space.selection
    skip, max_index = spread(len(get_dataset(space.dataset, "val", data_root, download)), selection.images)
    out = folder / "selection" / f"{candidate.trial_id}.parquet"
    request = CertifyRequest(
        checkpoint=RunFolder(local).checkpoint,
        dataset=space.dataset,
        sigma=space.sigma,
        out=out,
        settings=CertifySettings(selection.protocol(), seed=space.seed),
        mode="evaluate",
        split="val",
        skip=skip,
        max_index=max_index,
        data_root=data_root,
        download=download,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = read_results(certify(request, space.final.workers, progress))
    candidate.val_metrics = evaluation_metrics(frame, space.objective, VAL_PREFIX)


@ray.remote(max_retries=1)
def _train_task(spec: RunSpec, cache_dir: str | Path | None, data_root: Path | None, download: bool) -> bytes:
    """Trains on whichever node Ray picks, in a scratch folder there; the checkpoint comes back as bytes, since
    that folder is not one the driver can read."""
    with tempfile.TemporaryDirectory() as scratch:
        return train(
            spec, Path(scratch), cache_dir=cache_dir, data_root=data_root, download=download, progress=False
        ).read_bytes()


def refit(
    space: SearchSpace,
    point: dict[str, Any],
    out: Path,
    cache_dir: str | Path | None,
    data_root: Path | None,
    download: bool,
) -> Path:
    """The winning setting trained again on the whole training split, where the trials trained; its checkpoint."""
    spec = space.resolve(point, train_split="train")
    resources = space.resources
    if resources.workers > 1:
        return train_distributed(
            spec,
            out,
            workers=resources.workers,
            gpus_per_worker=resources.gpus_per_worker,
            cpus_per_worker=resources.cpus_per_worker,
            cache_dir=cache_dir,
            data_root=data_root,
            download=download,
        )
    task = _train_task.options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker)
    try:  # the driver's cache, not the worker node's default: it is where this sweep's teachers are
        checkpoint = ray.get(task.remote(spec, cache_dir or default_cache_dir(), data_root, download))
    except ray.exceptions.RayError as error:
        raise JobFailed(
            f"re-training the winner of {space.name} on the whole training split failed: "
            f"{str(error).splitlines()[0][:300]}"
        ) from None
    path = RunFolder(out).checkpoint
    stored(path).write_bytes(checkpoint)
    return path


def certify_on_test(
    space: SearchSpace, checkpoint: Path, out: Path, data_root: Path | None, download: bool, progress: bool
) -> Path:
    """The winner on the test split with the file's final protocol: the sweep's one look at it."""
    final = space.final
    request = CertifyRequest(
        checkpoint=checkpoint,
        dataset=space.dataset,
        sigma=space.sigma,
        out=out,
        settings=CertifySettings(final.protocol(), seed=space.seed),
        skip=final.skip,
        max_index=final.max,
        data_root=data_root,
        download=download,
    )
    certify(request, final.workers, progress)
    return out


def selection_table(candidates: list[Candidate], objective: str) -> pd.DataFrame:
    """trial, proxy and validation figure of the shortlisted candidates."""
    return pd.DataFrame(
        [{"trial": c.trial_id, "proxy": c.proxy, VAL_PREFIX + objective: c.val(objective)} for c in candidates]
    )
