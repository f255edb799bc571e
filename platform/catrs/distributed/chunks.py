"""Certification and soft-label votes as a work queue: small chunks of images pulled by Ray workers.

    catrs certify --checkpoint CKPT --dataset cifar10 --sigma 0.5 --out s3://bucket/cert.parquet --workers 8

The planner cuts the images still to do into chunks (`plan_chunks`: several per worker, never fewer images
than one pass of the model takes, or `--chunk-size`). Each chunk is a Ray task (a GPU each when the cluster
has GPUs, a CPU otherwise); as many are in flight as there are workers, and the driver starts the next
chunk as soon as one finishes, so each worker pulls work at its own pace and a slow node takes fewer chunks;
at the end, idle workers run backup copies of the chunks still running, so a slow node's last chunk does not
hold the run back. A chunk's rows are written to its own object in `OUT.chunks/` (`catrs.storage`: a directory or
an object store) as soon as it finishes, so a lost node costs only the chunks it held, and a re-run skips every
image already in a chunk file. The chunks are then merged into OUT — the same table as a single-process run,
row for row, since each image's noise is keyed by its index — and removed.

Why tasks and not Ray Data: a chunk's work is one call of the single-process core on a handful of indices,
its rows are a few kilobytes, and resume needs to know which indices are done — a bounded window of tasks
gives all of that in a page, where Ray Data's `map_batches` would add its streaming executor, its own
blocks and its own retry semantics between the queue and the rows. Task retries (`max_retries`) cover
crashed worker processes and dead nodes. Ray reuses worker processes, and each keeps its last model and data
set (`_worker_state`), so a chunk pays only for its images, not for loading.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import ray
import torch
from tqdm import tqdm

from catrs.certify import CertifyRequest, certify_rows, inputs_per_pass, prepare_certification, smoothed_model
from catrs.context import RunContext
from catrs.data import get_dataset
from catrs.distributed.runtime import cluster_has_gpus, connect
from catrs.errors import JobFailed, UserError
from catrs.faults import inject, straggle
from catrs.interrupts import forget_saved, note_saved
from catrs.results import CORRUPTION_COLUMNS, ResultRow, ResultWriter, read_results, result_rows
from catrs.smoothing import Smooth
from catrs.storage import Stored, stored
from catrs.teacher import VoteJob, teacher_and_train_set, vote_histograms

MAX_RETRIES = 3
# Transient failures worth a retry (a lost file handle, a CUDA hiccup); bad input is not retried.
RETRIED = [OSError, RuntimeError]
CHUNKS_PER_WORKER = 8  # enough that the last chunks balance the workers, few enough that each fills batches
POLL_SECONDS = 0.5


def _resources() -> dict[str, Any]:
    return {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}


def cluster_workers() -> int:
    """How many chunks can run at once: the cluster's GPUs, or its CPUs where it has none."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU", 0) or resources.get("CPU", 1)))


def plan_chunks(items: list[int], workers: int, smallest: int = 1, size: int | None = None) -> list[list[int]]:
    """`items` in consecutive chunks of `size`, or of a size that gives each worker `CHUNKS_PER_WORKER` but
    never fewer than `smallest` items (one full pass of the model)."""
    if size is None:
        size = max(smallest, math.ceil(len(items) / (workers * CHUNKS_PER_WORKER)))
    if size < 1:
        raise UserError(f"--chunk-size must be a positive integer, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


def run_queue(
    launch: Callable[[list[int]], ray.ObjectRef],
    chunks: list[list[int]],
    workers: int,
    on_done: Callable[[list[int], Any], None],
    desc: str,
    progress: bool,
) -> None:
    """Runs `launch(chunk)` for every chunk, `workers` at a time (a queued task would be bound to a worker
    before it is free, and a slow one would hold it), calling `on_done(chunk, value)` in the driver as each
    finishes; a chunk that fails after its retries stops the queue.

    Once every chunk has started, a worker that would sit idle runs a backup copy of the oldest chunk still
    running (as MapReduce's backup tasks do): both copies compute the same rows, since the noise is keyed by
    index, the first to finish counts and the other is cancelled. So a slow node's last chunk does not set
    the makespan.
    """
    started, backed_up = 0, set[int]()
    running: dict[ray.ObjectRef, int] = {}  # a task → the number of its chunk
    with tqdm(total=sum(map(len, chunks)), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        while started < len(chunks) or running:
            while started < len(chunks) and len(running) < workers:
                running[launch(chunks[started])] = started
                started += 1
            while started == len(chunks) and len(running) < workers:
                unbacked = sorted(set(running.values()) - backed_up)
                if not unbacked:
                    break
                backed_up.add(unbacked[0])
                running[launch(chunks[unbacked[0]])] = unbacked[0]
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                number = running.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as error:
                    if number in running.values():
                        continue  # its other copy may still finish
                    for other in running:
                        ray.cancel(other)
                    chunk = chunks[number]
                    raise JobFailed(
                        f"{desc}: the chunk of images {chunk[0]}…{chunk[-1]} failed after "
                        f"{MAX_RETRIES} retries: {str(error).splitlines()[0][:300]}; finished chunks "
                        f"are kept, re-run to resume"
                    ) from None
                for copy in [other for other, n in running.items() if n == number]:
                    ray.cancel(copy)
                    del running[copy]
                on_done(chunks[number], value)
                bar.update(len(chunks[number]))


# --- certification ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _certifier(request: CertifyRequest, context: RunContext, checkpoint_ref: ray.ObjectRef) -> tuple[Any, Smooth]:
    """The request's data set and smoothed model (compiled, where asked), built once per worker process and
    kept for its next chunks (the last request's only)."""
    return (
        get_dataset(request.dataset, request.split, context.data_root, context.download),
        smoothed_model(request, ray.get(checkpoint_ref), context),
    )


# Ray's overloads type `retry_exceptions` as a bool; its documentation and runtime also take exception types.
@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=RETRIED)  # type: ignore[call-overload]
def _certify_chunk(
    request: CertifyRequest, context: RunContext, checkpoint: list[ray.ObjectRef], positions: list[int]
) -> list[ResultRow]:
    inject("certify.chunk", positions[0])
    began = time.perf_counter()
    dataset, smooth = _certifier(request, context, checkpoint[0])  # the ref in a list: fetched here, once
    rows = [row for group in certify_rows(smooth, dataset, positions, request.settings, request.mode) for row in group]
    straggle("certify.chunk", time.perf_counter() - began)
    return rows


def _readable_chunks(folder: Stored, provenance: dict[str, Any], extra: tuple[str, ...]) -> list[ResultWriter]:
    """The chunk files of an earlier attempt. A torn one (a crash mid-write on a file system without atomic
    rename) is removed and its images done again; one of other provenance is refused, as any output is."""
    found = []
    for chunk in folder.files():
        try:
            read_results(chunk)
        except UserError:
            chunk.delete()
            continue
        found.append(ResultWriter(chunk, provenance, "parquet", extra, announce=False))
    return found


def certify_distributed(
    request: CertifyRequest, context: RunContext, workers: int | None = None, chunk_size: int | None = None
) -> Stored:
    """Certifies the request as a queue of chunks on up to `workers` Ray workers at once (default: every GPU,
    or CPU, of the cluster); resumable chunk by chunk; returns the merged output."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    prepared = prepare_certification(request, context)
    with prepared.claimed():  # the chunk folder is the output's: claimed with it
        connect()
        workers = workers or cluster_workers()
        folder = stored(request.out).sibling(stored(request.out).name + ".chunks").make_folder()
        extra = tuple(c for c in prepared.writer.columns if c in CORRUPTION_COLUMNS)
        earlier = _readable_chunks(folder, prepared.provenance, extra)
        todo = prepared.unfinished(prepared.selected, prepared.writer.done, *(chunk.done for chunk in earlier))
        smallest = inputs_per_pass(request.settings.protocol, request.mode)
        checkpoint = [ray.put(prepared.checkpoint)]
        task = _certify_chunk.options(**_resources())

        def save(positions: list[int], rows: list[ResultRow]) -> None:
            name = f"chunk-{positions[0]:09d}-{positions[-1]:09d}.parquet"
            writer = ResultWriter(folder.child(name), prepared.provenance, "parquet", extra, announce=False)
            writer.add(rows)
            writer.flush()
            earlier.append(writer)
            note_saved(
                folder.uri, f"{sum(len(c.done) for c in earlier)} rows in {len(earlier)} chunk files in {folder}"
            )

        run_queue(
            lambda positions: task.remote(request, context, checkpoint, positions),
            plan_chunks(todo, workers, smallest, chunk_size),
            workers,
            save,
            request.mode.value,
            context.progress,
        )
        _merge(prepared.writer, earlier)
        folder.delete_folder()
        forget_saved(folder.uri)
    return prepared.writer.path


def _merge(output: ResultWriter, chunks: list[ResultWriter]) -> None:
    """Adds every chunk's rows to the output (once: a merge cut short may have left rows in both), writes it,
    then removes the chunks."""
    merged = output.done
    for chunk in chunks:
        rows = result_rows(read_results(chunk.path)[output.columns])
        output.add([row for row in rows if row["idx"] not in merged])
        merged |= chunk.done
    output.flush()
    for chunk in chunks:
        chunk.path.delete()


# --- soft-label votes ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _voter(job_ref: ray.ObjectRef, context: RunContext) -> tuple[VoteJob, torch.nn.Module, Any]:
    """The job, its teacher on this worker's device and the training split, once per worker process."""
    job = ray.get(job_ref)
    return (job, *teacher_and_train_set(job, context))


# Ray's overloads type `retry_exceptions` as a bool; its documentation and runtime also take exception types.
@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=RETRIED)  # type: ignore[call-overload]
def _vote_chunk(job_ref: list[ray.ObjectRef], context: RunContext, indices: list[int]) -> torch.Tensor:
    inject("votes.chunk", indices[0])
    job, teacher, train_set = _voter(job_ref[0], context)
    return vote_histograms(teacher, train_set, indices, job.sigma, job.votes, seed=job.seed)


def distributed_votes(job: VoteJob, context: RunContext, workers: int | None = None) -> torch.Tensor:
    """`count_votes(job, context)` computed by the same queue (every GPU, or CPU, of the cluster by default)."""
    connect()
    size = len(get_dataset(job.dataset, "train", context.data_root, context.download))
    indices = list(job.indices) if job.indices is not None else list(range(size))
    job_ref = [ray.put(job)]
    task = _vote_chunk.options(**_resources())
    counts: dict[int, torch.Tensor] = {}
    workers = workers or cluster_workers()
    chunks = plan_chunks(indices, workers)
    run_queue(
        lambda chunk: task.remote(job_ref, context, chunk),
        chunks,
        workers,
        lambda chunk, value: counts.__setitem__(chunk[0], value),
        "soft labels",
        context.progress,
    )
    return torch.cat([counts[chunk[0]] for chunk in chunks])
