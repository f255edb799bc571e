"""Certification and soft-label votes as a work queue: small chunks of images pulled by one worker per GPU.

    catrs certify --checkpoint CKPT --dataset cifar10 --sigma 0.5 --out s3://bucket/cert.parquet --workers 8

The planner cuts the images still to do into chunks (`plan_chunks`: several per worker, never fewer images
than one pass of the model takes, or `--chunk-size`). The workers are Ray actors (`ChunkWorker`), one per
GPU where the cluster has or can get GPUs (asked for before they start, so the autoscaler adds nodes while
the driver prepares), one per CPU otherwise: each process keeps the GPU Ray gave it for its whole life, so
CUDA never sees another, and holds the job's model and data between chunks; all are ended with the job, so
no idle process holds a GPU Ray believes free. The driver hands the next chunk to whichever worker is idle,
so each pulls work at its own pace and a slow node takes fewer chunks; at the end, idle workers run backup
copies of the chunks still running, so a slow node's last chunk does not hold the run back. A chunk's rows
are written to its own object in `OUT.chunks/` (`catrs.storage`: a directory or an object store) as soon as
it finishes, so a lost node costs only the chunks it held, and a re-run skips every image already in a chunk
file. The chunks are then merged into OUT — the same table as a single-process run, row for row, since each
image's noise is keyed by its index — and removed. Every worker must run on one kind of device (the noise of
an index differs between GPU models): a pool of mixed devices is refused, and so is a resume on another. A
pool the cluster can never hold (more workers than its nodes and those its autoscaler can add take) is refused
before any work, where it would be waited for for ever.

Why actors and not Ray Data: a chunk's work is one call of the single-process core on a handful of indices,
its rows are a few kilobytes, and resume needs to know which indices are done — a bounded window of calls
gives all of that in a page, where Ray Data's `map_batches` would add its streaming executor, its own blocks
and its own retry semantics between the queue and the rows. A worker whose process or node dies is restarted
(elsewhere, if its node is gone) and its chunk retried; an out-of-memory error is not retried: it is reported
with the batch size to lower.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch
from tqdm import tqdm

from catrs.certify import CertifyRequest, certify_rows, inputs_per_pass, prepare_certification
from catrs.context import RunContext
from catrs.data import SplitFacts, get_dataset, split_facts
from catrs.distributed.runtime import ask_for, capacity, connect, refuse_beyond_reach
from catrs.errors import JobFailed, UserError
from catrs.faults import inject, straggle
from catrs.inference import describe_device, worker_device
from catrs.interrupts import forget_saved, note_saved
from catrs.results import ResultRow, ResultWriter, read_results, result_rows
from catrs.sampling import SamplingProtocol
from catrs.smoothing import Smooth
from catrs.storage import Stored, stored
from catrs.teacher import VoteJob, consecutive, vote_histograms

MAX_RETRIES = 3
# Transient failures worth a retry (a lost file handle, a CUDA hiccup); bad input is not retried, nor is running
# out of memory (an `OutOfMemory`, not a RuntimeError: the same chunk would run out again).
RETRIED = [OSError, RuntimeError]
CHUNKS_PER_WORKER = 8  # enough that the last chunks balance the workers, few enough that each fills batches
# Adaptive CERTIFY spends from a few hundred to n_max samples on an image, which is not known before its pilot:
# every image has the same expected cost, so equal counts are equal expected samples, but a chunk's cost varies
# far more. Four times as many chunks let the queue even it out.
ADAPTIVE_CHUNKS_PER_WORKER = 4 * CHUNKS_PER_WORKER
POLL_SECONDS = 0.5
POOL_FIX = "lower --workers (each takes a GPU where the cluster has or can add GPUs, else a CPU)"


class OutOfMemory(Exception):
    """A worker ran out of device memory: a batch too large for it, reported, not retried."""


def plan_chunks(
    items: list[int], workers: int, smallest: int = 1, size: int | None = None, per_worker: int = CHUNKS_PER_WORKER
) -> list[list[int]]:
    """`items` in consecutive chunks of `size`, or of a size that gives each worker `per_worker` chunks but
    never fewer than `smallest` items (one full pass of the model)."""
    if size is None:
        size = max(smallest, math.ceil(len(items) / (workers * per_worker)))
    if size < 1:
        raise UserError(f"--chunk-size must be a positive integer, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


class ChunkWorker:
    """One worker of the queue (a Ray actor): the device Ray gave it, the job's model and data once loaded."""

    def __init__(self) -> None:
        self.device = worker_device()
        self._job: Any = None
        self._state: tuple[Any, ...] = ()

    def describe(self) -> str:
        """The device its rows are computed on (what their noise and logits depend on)."""
        return describe_device(self.device)

    def facts(self, dataset: str, splits: tuple[str, ...], context: RunContext) -> dict[str, SplitFacts]:
        """What a driver records of splits (their size, digest, two images), read here rather than on the
        driver, which holds no training images it does not need."""
        return {split: split_facts(dataset, split, context.data_root, context.download) for split in splits}

    @ray.method(max_task_retries=MAX_RETRIES, retry_exceptions=RETRIED)
    def certify(
        self, request: CertifyRequest, context: RunContext, checkpoint: list[Any], positions: list[int]
    ) -> list[ResultRow]:
        inject("certify.chunk", positions[0])
        began = time.perf_counter()
        dataset, smooth = self._loaded(request, lambda: self._certifier(request, context, ray.get(checkpoint[0])))
        with _out_of_memory(request.settings.protocol.batch):
            groups = certify_rows(smooth, dataset, positions, request.settings, request.mode)
            rows = [row for group in groups for row in group]
        straggle("certify.chunk", time.perf_counter() - began)
        return rows

    @ray.method(max_task_retries=MAX_RETRIES, retry_exceptions=RETRIED)
    def vote(self, job: list[Any], context: RunContext, indices: list[int]) -> int:
        """Counts the votes of `indices` (consecutive) and writes them to the job's store; returns their number."""
        inject("votes.chunk", indices[0])
        vote_job, teacher, train_set = self._loaded(job[0], lambda: self._voter(ray.get(job[0]), context))
        with _out_of_memory(VOTE_BATCH):
            counts = vote_histograms(teacher, train_set, indices, vote_job.sigma, vote_job.votes, seed=vote_job.seed)
        vote_job.store.write_chunk(indices[0], counts, vote_job.votes)
        return len(indices)

    def _loaded(self, job: Any, load: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        if self._job != job:
            self._job, self._state = job, load()
        return self._state

    def _certifier(self, request: CertifyRequest, context: RunContext, checkpoint: Any) -> tuple[Any, Smooth]:
        dataset = get_dataset(request.dataset, request.split, context.data_root, context.download)
        model = checkpoint.model(self.device)
        return dataset, request.settings.smoothed(model, checkpoint.card.num_classes, checkpoint.card.sigma)

    def _voter(self, job: VoteJob, context: RunContext) -> tuple[Any, ...]:
        return (
            job,
            job.checkpoint.model(self.device),
            get_dataset(job.dataset, "train", context.data_root, context.download),
        )


@contextlib.contextmanager
def _out_of_memory(batch: int) -> Iterator[None]:
    """A CUDA out-of-memory error as `OutOfMemory`, with the batch size to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(f"out of GPU memory with batches of {batch:,} samples; lower --batch") from None


def refuse_a_pool_beyond_reach(workers: int, asked: str, fix: str = "") -> None:
    """Refuses (before any work) a pool of `workers` chunk workers that the cluster can never hold at once: a
    GPU (and Ray's default CPU) each where it has or can add GPUs, else a CPU each (`Pool`)."""
    connect()
    refuse_beyond_reach(asked, workers, capacity().worker_bundle(), fix or POOL_FIX)


class Pool:
    """The queue's workers: `size` actors, a GPU each where the cluster has or can get them, else a CPU each;
    the autoscaler is asked for them first. Ended (their GPUs released) when the block ends."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: list[Any] = []
        self.device = ""

    def __enter__(self) -> Pool:
        resources = capacity().worker_resources()
        ask_for([{"GPU": 1} if "num_gpus" in resources else {"CPU": 1}] * self.size)
        actor = ray.remote(ChunkWorker).options(**resources, max_restarts=MAX_RETRIES)
        self.workers = [actor.remote() for _ in range(self.size)]
        devices = ray.get([worker.describe.remote() for worker in self.workers])
        if len(set(devices)) > 1:
            raise UserError(
                f"the workers run on different devices ({', '.join(sorted(set(devices)))}), whose noise and logits "
                f"differ: run a certification on one kind of device (one node type)"
            )
        self.device = devices[0]
        return self

    def __exit__(self, *failure: object) -> None:
        for worker in self.workers:
            ray.kill(worker)
        ask_for([])


VOTE_BATCH = 1000  # `vote_histograms`' forward passes


def run_queue(
    pool: Pool,
    launch: Callable[[Any, list[int]], ray.ObjectRef],
    chunks: list[list[int]],
    on_done: Callable[[list[int], Any], None],
    desc: str,
    progress: bool,
) -> None:
    """Runs `launch(worker, chunk)` for every chunk on the pool's idle workers (a chunk queued on a busy
    worker would wait for it, and a slow one would hold it), calling `on_done(chunk, value)` in the driver as
    each finishes; a chunk that fails after its retries stops the queue.

    Once every chunk has started, a worker that would sit idle runs a backup copy of the oldest chunk still
    running (as MapReduce's backup tasks do): both copies compute the same rows, since the noise is keyed by
    index, the first to finish counts and the other's result is ignored. So a slow node's last chunk does not
    set the makespan.
    """
    started, backed_up = 0, set[int]()
    running: dict[ray.ObjectRef, tuple[int, Any]] = {}  # a call → the number of its chunk, its worker
    finished: set[int] = set()
    with tqdm(total=sum(map(len, chunks)), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        while len(finished) < len(chunks):
            busy = {id(worker) for _, worker in running.values()}
            for worker in [w for w in pool.workers if id(w) not in busy]:
                number = _next_chunk(started, chunks, running, backed_up, finished)
                if number is None:
                    break
                started = max(started, number + 1)
                running[launch(worker, chunks[number])] = (number, worker)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                number, _ = running.pop(ref)
                try:
                    value = ray.get(ref)
                except OutOfMemory as error:
                    raise JobFailed(f"{desc}: {error}; finished chunks are kept, re-run to resume") from None
                except ray.exceptions.RayError as error:
                    if number in finished or number in {n for n, _ in running.values()}:
                        continue  # its other copy has finished, or may still
                    chunk = chunks[number]
                    raise JobFailed(
                        f"{desc}: the chunk of images {chunk[0]}…{chunk[-1]} failed after {MAX_RETRIES} retries: "
                        f"{_first_line(error)}; finished chunks are kept, re-run to resume"
                    ) from None
                if number not in finished:
                    finished.add(number)
                    on_done(chunks[number], value)
                    bar.update(len(chunks[number]))
        for copy in running:  # backup copies still running: their chunks are done
            ray.cancel(copy)


def _next_chunk(
    started: int, chunks: list[list[int]], running: dict[Any, tuple[int, Any]], backed_up: set[int], finished: set[int]
) -> int | None:
    """The next chunk to start, or a backup of the oldest one still running once all have started."""
    if started < len(chunks):
        return started
    unbacked = sorted({n for n, _ in running.values()} - backed_up - finished)
    if not unbacked:
        return None
    backed_up.add(unbacked[0])
    return unbacked[0]


def _first_line(error: Exception) -> str:
    """The cause of a Ray error in one line: the exception its task raised, where it shows."""
    cause = getattr(error, "cause", None)
    return str(cause if cause is not None else error).splitlines()[0][:300]


# --- certification ---------------------------------------------------------------------------------------------


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
    """Certifies the request as a queue of chunks on up to `workers` Ray workers at once (default: one per
    GPU the cluster has or can get, else per CPU); resumable chunk by chunk; returns the merged output."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    prepared = prepare_certification(request, context)
    if workers is not None:  # a pool the cluster can never hold would wait for ever
        refuse_a_pool_beyond_reach(workers, f"--workers {workers}")
    with prepared.claimed():  # the chunk folder is the output's: claimed with it
        connect()
        with Pool(workers or capacity().workers()) as pool:
            prepared.provenance["device"] = pool.device
            folder = stored(request.out).sibling(stored(request.out).name + ".chunks").make_folder()
            extra = prepared.writer.extra_columns
            earlier = _readable_chunks(folder, prepared.provenance, extra)
            for writer in [prepared.writer, *earlier]:
                writer.check_device(pool.device)
            todo = prepared.unfinished(prepared.selected, prepared.writer.done, *(chunk.done for chunk in earlier))
            smallest = inputs_per_pass(request.settings.protocol, request.mode)
            checkpoint = [ray.put(prepared.checkpoint)]

            def save(positions: list[int], rows: list[ResultRow]) -> None:
                name = f"chunk-{positions[0]:09d}-{positions[-1]:09d}.parquet"
                writer = ResultWriter(folder.child(name), prepared.provenance, "parquet", extra, announce=False)
                writer.add(rows)
                writer.flush()
                earlier.append(writer)
                done = sum(len(c.done) for c in earlier)
                note_saved(folder.uri, f"{done} rows in {len(earlier)} chunk files in {folder}")

            run_queue(
                pool,
                lambda worker, positions: worker.certify.remote(request, context, checkpoint, positions),
                plan_chunks(todo, pool.size, smallest, chunk_size, _chunks_per_worker(request.settings.protocol)),
                save,
                request.mode.value,
                context.progress,
            )
        _merge(prepared.writer, earlier)
        folder.delete_folder()
        forget_saved(folder.uri)
    return prepared.writer.path


def _chunks_per_worker(protocol: SamplingProtocol) -> int:
    return ADAPTIVE_CHUNKS_PER_WORKER if protocol.adaptive else CHUNKS_PER_WORKER


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


def facts_on_a_worker(dataset: str, splits: tuple[str, ...], context: RunContext) -> dict[str, SplitFacts]:
    """`split_facts` of each split, read by a worker of the cluster (where the data is), not the driver."""
    connect()
    with Pool(1) as pool:
        return dict(ray.get(pool.workers[0].facts.remote(dataset, splits, context)))


# --- soft-label votes ------------------------------------------------------------------------------------------


def distributed_votes(job: VoteJob, context: RunContext, workers: int | None = None) -> tuple[int, int]:
    """`count_votes(job, context)` on the same queue: the indices no chunk file holds yet, in chunks that the
    workers write to the job's store themselves (the driver never holds the counts); (size, classes)."""
    connect()
    with Pool(workers or capacity().workers()) as pool:
        size = ray.get(pool.workers[0].facts.remote(job.dataset, ("train",), context))["train"].size
        done = job.store.covered()
        chunks = [
            chunk
            for run in consecutive([i for i in range(size) if i not in done])
            for chunk in plan_chunks(run, pool.size)
        ]
        job_ref = [ray.put(job)]
        run_queue(
            pool,
            lambda worker, chunk: worker.vote.remote(job_ref, context, chunk),
            chunks,
            lambda chunk, count: None,
            "soft labels",
            context.progress,
        )
    return size, job.checkpoint.card.num_classes
