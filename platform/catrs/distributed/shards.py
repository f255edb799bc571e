"""Certification and soft-label votes as Ray tasks over shards of dataset indices.

    catrs certify --checkpoint CKPT --dataset cifar10 --sigma 0.5 --out cert.parquet --shards 16

The selected positions are split into K contiguous shards, fixed by the selection and K alone. Each shard is
a task (a GPU each when the cluster has GPUs, a CPU otherwise) that runs the single-process certification core
(`catrs.certify.certify_positions`) and returns its rows; the driver writes each finished shard to its own
Parquet file in `OUT.shards/` at once, so a killed run loses only the shards in flight, and a re-run skips
every shard already on disk. Once all are done they are merged into OUT — the same table as an unsplit run,
row for row, because each image's noise is keyed by its index — and the shard files are removed. Tasks that
die are retried by Ray; a progress bar counts images across all shards.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from catrs.certify import CertifyRequest, certify_positions, prepare_certification
from catrs.distributed.runtime import cluster_has_gpus, connect
from catrs.errors import JobFailed, UserError
from catrs.faults import inject
from catrs.results import CORRUPTION_COLUMNS, ResultWriter, read_results
from catrs.teacher import VoteJob, count_votes

MAX_RETRIES = 3
# Transient failures worth a retry (a lost file handle, a CUDA hiccup); bad input is not retried.
RETRIED = [OSError, RuntimeError]
POLL_SECONDS = 0.5


@ray.remote
class ProgressCounter:
    """Images finished across all tasks, for the driver's progress bar."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def value(self) -> int:
        return self.count


def _resources() -> dict[str, Any]:
    return {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=RETRIED)
def _certify_shard(request: CertifyRequest, checkpoint, shard: int, positions: list[int], counter
                   ) -> list[dict[str, Any]]:
    inject("certify.shard", shard)
    rows: list[dict[str, Any]] = []
    for group in certify_positions(request, checkpoint, positions):
        rows.extend(group)
        counter.add.remote(len(group))
    return rows


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=RETRIED)
def _vote_shard(job: VoteJob, indices: tuple[int, ...], counter) -> torch.Tensor:
    counts = count_votes(job.shard(indices))
    counter.add.remote(len(indices))
    return counts


def split(indices: list[int], shards: int) -> list[list[int]]:
    """K contiguous, near-equal shards (empty ones dropped)."""
    return [part.tolist() for part in np.array_split(np.asarray(indices, dtype=np.int64), shards) if len(part)]


def _wait_all(futures: dict[Any, Any], counter, total: int, desc: str, progress: bool, on_done) -> None:
    """Waits for every task, calling `on_done(key, value)` as each finishes, with a bar of images done."""
    pending = dict(futures)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as error:
                    for other in pending:
                        ray.cancel(other)
                    raise JobFailed(f"{desc} shard {key} failed after {MAX_RETRIES} retries: "
                                    f"{str(error).splitlines()[0][:300]}; finished shards are kept, re-run to "
                                    f"resume") from None
                on_done(key, value)
            done = min(total, ray.get(counter.value.remote()))
            if done != bar.n:
                bar.update(done - bar.n)


def _shard_writer(path: Path, provenance: dict[str, Any], extra_columns: tuple[str, ...]) -> ResultWriter:
    """The writer of one shard's file. A torn file (a crash mid-write on a file system without atomic
    rename) is never trusted: it is removed and the shard recomputed. A readable file of other provenance
    is still refused, as for any output."""
    if path.exists():
        try:
            read_results(path)
        except UserError:
            path.unlink()
    return ResultWriter(path, provenance, "parquet", extra_columns)


def certify_sharded(request: CertifyRequest, shards: int, progress: bool = True) -> Path:
    """Certifies the request with K Ray tasks; resumable shard by shard; returns the merged output."""
    if shards < 1:
        raise UserError(f"--shards must be a positive integer, got {shards}")
    prepared = prepare_certification(request)
    connect()
    shard_dir = request.out.with_name(request.out.name + ".shards")
    shard_dir.mkdir(exist_ok=True)
    plan = split(prepared.selected, shards)
    extra = tuple(c for c in prepared.writer.columns if c in CORRUPTION_COLUMNS)
    writers = {i: _shard_writer(shard_dir / f"shard-{i:05d}-of-{len(plan):05d}.parquet", prepared.provenance, extra)
               for i in range(len(plan))}
    missing = {i: prepared.unfinished(part, prepared.writer.done, writers[i].done) for i, part in enumerate(plan)}
    missing = {i: part for i, part in missing.items() if part}

    checkpoint = ray.put(prepared.checkpoint)
    counter = ProgressCounter.remote()
    options = _resources()
    futures = {_certify_shard.options(**options).remote(request, checkpoint, i, part, counter): i
               for i, part in missing.items()}

    def save_shard(i: int, rows: list[dict[str, Any]]) -> None:
        writers[i].add(rows)
        writers[i].flush()

    _wait_all(futures, counter, sum(len(p) for p in missing.values()), request.mode, progress, save_shard)
    for writer in writers.values():
        if writer.path.exists():
            merged = prepared.writer.done  # a merge cut short may have left rows in both places
            rows = read_results(writer.path)[prepared.writer.columns].to_dict("records")
            prepared.writer.add([row for row in rows if row["idx"] not in merged])
    prepared.writer.flush()
    for writer in writers.values():
        writer.path.unlink(missing_ok=True)
    if not any(shard_dir.iterdir()):
        shard_dir.rmdir()
    return request.out


def sharded_votes(job: VoteJob, shards: int | None = None, progress: bool = True) -> torch.Tensor:
    """`count_votes(job)` computed as Ray tasks over index shards (one per CPU or GPU by default)."""
    from catrs.data import get_dataset

    connect()
    size = len(get_dataset(job.dataset, "train", job.data_root, job.download))
    resources = ray.cluster_resources()
    shards = shards or max(1, int(resources.get("GPU", 0) or resources.get("CPU", 1)))
    plan = split(list(job.indices) if job.indices is not None else list(range(size)), shards)
    job_ref = ray.put(job)
    counter = ProgressCounter.remote()
    options = _resources()
    futures = {_vote_shard.options(**options).remote(job_ref, tuple(part), counter): i for i, part in enumerate(plan)}
    results: dict[int, torch.Tensor] = {}
    _wait_all(futures, counter, sum(map(len, plan)), "soft labels", progress, results.__setitem__)
    return torch.cat([results[i] for i in range(len(plan))])
