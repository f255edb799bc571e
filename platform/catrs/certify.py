"""The certification job: a checkpoint, a data set split, and CERTIFY (or PREDICT) over a set of indices.

    catrs certify --checkpoint runs/digits/checkpoint.pt --dataset digits --sigma 0.5 --out cert.parquet

`certify_rows` is the pure core (model + images in, rows out) that a single process runs here and that the
Ray workers run per chunk of positions (`catrs.distributed.chunks`); `run_certification` adds the checkpoint
checks, the result file (a path or an object-store URI) with its provenance and resume, and the progress
bar. Images are chosen by position in the split (`--skip`, `--max`) and rows keyed by dataset index
(`catrs.data`): the two agree except on `val`, whose rows name the training images they are.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from catrs.checkpoint import Checkpoint, check_matches, file_sha256, load_checkpoint
from catrs.context import RunContext
from catrs.data import Indexed, dataset_spec, get_dataset
from catrs.errors import UserError
from catrs.faults import inject
from catrs.inference import check_pass_fits, describe_device, pick_device
from catrs.ownership import claim
from catrs.results import ADAPTIVE_COLUMNS, CORRUPTION_COLUMNS, ResultRow, ResultWriter, output_format
from catrs.sampling import DEFAULT_INFERENCE, INFERENCE_MODES, Mode, SamplingProtocol
from catrs.smoothing import Smooth
from catrs.storage import Stored

SEED_LIMIT = 2**63  # seeds are recorded as int64 in every result's provenance


@dataclass(frozen=True)
class CertifySettings:
    """How to sample: the protocol, the seed of the per-image noise streams, precision and inference mode."""

    protocol: SamplingProtocol = SamplingProtocol()
    seed: int = 0
    mixed_precision: bool = False
    inference: str = DEFAULT_INFERENCE

    def validate(self) -> None:
        for name, problem in self.protocol.problems():
            raise UserError(f"--{name} {problem}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"--seed must be a non-negative integer below 2^63, got {self.seed}")
        if self.inference not in INFERENCE_MODES:
            raise UserError(f"unknown --inference {self.inference!r}; choose one of: {', '.join(INFERENCE_MODES)}")

    def smoothed(self, model: nn.Module, num_classes: int, sigma: float) -> Smooth:
        """`model` smoothed at σ, sampling with this protocol's seed, precision and inference mode."""
        return Smooth(
            model, num_classes, sigma, seed=self.seed, mixed_precision=self.mixed_precision, inference=self.inference
        )


def select_positions(length: int, skip: int = 1, max_index: int = -1) -> list[int]:
    """Cohen's subset rule: every `skip`-th position below `max_index` (all when negative)."""
    if skip < 1:
        raise UserError(f"--skip must be a positive integer, got {skip}")
    stop = length if max_index < 0 else min(length, max_index)
    return list(range(0, stop, skip))


def inputs_per_pass(protocol: SamplingProtocol, mode: Mode) -> int:
    """How many inputs share forward passes: enough for the smallest phase (n0) to fill a batch."""
    smallest = protocol.n if mode is Mode.PREDICT else protocol.n0
    return max(1, protocol.batch // smallest)


class Outcome(NamedTuple):
    """What sampling says of one image: its prediction (or -1), the noisy samples it took, in CERTIFY and
    evaluate modes its radius, in evaluate mode whether it got estimation samples, and with an adaptive
    protocol the samples' two parts (pilot, estimation)."""

    prediction: int
    samples: int
    radius: float | None = None
    estimated: bool | None = None
    parts: tuple[int, int] | None = None


def certify_rows(
    smooth: Smooth, dataset: Dataset, positions: Sequence[int], settings: CertifySettings, mode: Mode = Mode.CERTIFY
) -> Iterator[list[ResultRow]]:
    """Rows for the items at `positions`, a list per group of inputs certified together; `time` is the group's
    time per input. Mode `evaluate` is CERTIFY's ACR for less (`Smooth.evaluate_batch`), with an `estimated`
    column: False where the selection was already wrong and no estimation samples were spent."""
    group = inputs_per_pass(settings.protocol, mode)
    for start in range(0, len(positions), group):
        inject("certify.group", positions[start])
        items = [dataset[i] for i in positions[start : start + group]]
        keys = [int(index) for index, _, _ in items]
        xs = torch.stack([x for _, x, _ in items])
        began = time.perf_counter()
        outcomes = _sample(smooth, xs, [label for _, _, label in items], keys, settings.protocol, mode)
        seconds = (time.perf_counter() - began) / len(items)
        layout = getattr(dataset, "layout", lambda i: None)
        yield [
            _row(index, int(label), outcome, seconds, layout(index))
            for (index, _, label), outcome in zip(items, outcomes, strict=True)
        ]


def _row(index: int, label: int, outcome: Outcome, seconds: float, layout: tuple | None) -> ResultRow:
    row = ResultRow(idx=index, label=label, predict=outcome.prediction, correct=int(outcome.prediction == label))
    row["time"] = seconds
    row["samples"] = outcome.samples
    if outcome.radius is not None:
        row["radius"] = outcome.radius
    if outcome.estimated is not None:
        row["estimated"] = outcome.estimated
    if outcome.parts is not None:
        row["pilot_samples"], row["estimation_samples"] = outcome.parts
    if layout is not None:
        row["corruption"], row["severity"] = layout[0], layout[1]
    return row


def _sample(
    smooth: Smooth, xs: torch.Tensor, labels: list[int], keys: list[int], protocol: SamplingProtocol, mode: Mode
) -> list[Outcome]:
    p = protocol
    if p.adaptive:  # CERTIFY or evaluate: `prepare_certification` refuses an adaptive PREDICT
        evaluation = mode is Mode.EVALUATE
        answers = smooth.certify_adaptive_batch(
            xs, p.n0, p.n, p.alpha, p.batch, tolerance=p.tolerance, indices=keys, labels=labels if evaluation else None
        )
        return [
            Outcome(
                a.prediction,
                a.pilot + a.estimation,
                a.radius,
                a.estimated if evaluation else None,
                (a.pilot, a.estimation),
            )
            for a in answers
        ]
    if mode is Mode.CERTIFY:
        return [
            Outcome(c, p.n0 + p.n, r) for c, r in smooth.certify_batch(xs, p.n0, p.n, p.alpha, p.batch, indices=keys)
        ]
    if mode is Mode.EVALUATE:
        rows = smooth.evaluate_batch(xs, labels, p.n0, p.n, p.alpha, p.batch, indices=keys)
        return [Outcome(c, p.n0 + p.n * estimated, r, estimated) for c, r, estimated in rows]
    return [Outcome(c, p.n) for c in smooth.predict_batch(xs, p.n, p.alpha, p.batch, indices=keys)]


@dataclass(frozen=True)
class CertifyRequest:
    checkpoint: Path
    dataset: str
    sigma: float | None  # None: the checkpoint's; given, it must be the checkpoint's
    out: Path | str  # a local path or an object-store URI (`catrs.storage`)
    settings: CertifySettings = CertifySettings()
    mode: Mode = Mode.CERTIFY
    split: str = "test"
    skip: int = 1
    max_index: int = -1
    output_format: str | None = None
    checkpoint_source: str = ""  # what the user named (a models:/ URI), recorded instead of the file's path


@dataclass
class PreparedCertification:
    """A validated request: its checkpoint, the provenance of its rows, its output, and what is left to do."""

    request: CertifyRequest
    checkpoint: Checkpoint
    provenance: dict[str, Any]
    writer: ResultWriter
    dataset: Indexed
    selected: list[int]  # positions in the split

    def unfinished(self, positions: Sequence[int], *finished: set[int]) -> list[int]:
        """The `positions` whose rows are in none of the `finished` sets of indices (default: the output's)."""
        done = set().union(*finished) if finished else self.writer.done
        return [p for p in positions if self.dataset.key(p) not in done]

    @property
    def todo(self) -> list[int]:
        return self.unfinished(self.selected)

    def claimed(self) -> contextlib.AbstractContextManager:
        """Holds the output for this job (`catrs.ownership`); inside, `writer` is reopened, so it holds what
        an earlier owner left."""
        return _claimed(self)


@contextlib.contextmanager
def _claimed(prepared: PreparedCertification) -> Iterator[None]:
    with claim(prepared.writer.path, "certification", prepared.writer.identity):
        prepared.writer = prepared.writer.reopened()
        yield


def prepare_certification(request: CertifyRequest, context: RunContext) -> PreparedCertification:
    """Checks everything about a request before any work is spent; refuses an output of other provenance."""
    settings = request.settings
    settings.validate()
    if settings.protocol.adaptive and request.mode is Mode.PREDICT:
        raise UserError("PREDICT has no adaptive form: adaptive sampling is CERTIFY's (and a sweep's evaluation)")
    spec = dataset_spec(request.dataset)  # an unknown name is reported as such, before any checkpoint check
    check_pass_fits(settings.protocol.batch, spec.input_dim, pick_device(context.device))
    checkpoint = load_checkpoint(request.checkpoint)
    check_matches(checkpoint.card, request.checkpoint, dataset=request.dataset, sigma=request.sigma)
    checkpoint.model()  # weights that do not fit their architecture are refused now, not mid-run
    provenance = {
        "mode": request.mode.value,
        "dataset": request.dataset,
        "split": request.split,
        "n0": 0 if request.mode is Mode.PREDICT else settings.protocol.n0,
        "n": settings.protocol.n,
        "alpha": settings.protocol.alpha,
        "sigma": checkpoint.card.sigma,
        "seed": settings.seed,
        "batch": settings.protocol.batch,
        **settings.protocol.provenance(),
        "mixed_precision": settings.mixed_precision,
        "checkpoint": request.checkpoint_source or str(request.checkpoint),
        "checkpoint_sha256": file_sha256(request.checkpoint),
        "device": describe_device(pick_device(context.device)),  # the queue's workers may set theirs
    }
    extra = (CORRUPTION_COLUMNS if spec.base else ()) + (ADAPTIVE_COLUMNS if settings.protocol.adaptive else ())
    writer = ResultWriter(request.out, provenance, output_format(request.out, request.output_format), extra)
    dataset = get_dataset(request.dataset, request.split, context.data_root, context.download)
    selected = select_positions(len(dataset), request.skip, request.max_index)
    return PreparedCertification(request, checkpoint, provenance, writer, dataset, selected)


def smoothed_model(request: CertifyRequest, checkpoint: Checkpoint, context: RunContext) -> Smooth:
    """The checkpoint's model on the context's device, smoothed at its σ with the request's protocol."""
    model = checkpoint.model(pick_device(context.device))
    return request.settings.smoothed(model, checkpoint.card.num_classes, checkpoint.card.sigma)


def run_certification(request: CertifyRequest, context: RunContext) -> Stored:
    """Certifies (or predicts) the requested indices into `request.out`, resuming what it already holds; the
    output is this job's alone while it runs (`catrs.ownership`)."""
    prepared = prepare_certification(request, context)
    with prepared.claimed():
        prepared.writer.check_device(prepared.provenance["device"])
        todo = prepared.todo
        bar = tqdm(total=len(todo), desc=request.mode.value, unit="img", disable=not context.progress, file=sys.stderr)
        try:
            with bar:
                smooth = smoothed_model(request, prepared.checkpoint, context)
                for rows in certify_rows(smooth, prepared.dataset, todo, request.settings, request.mode):
                    prepared.writer.add(rows)
                    bar.update(len(rows))
        finally:
            prepared.writer.flush()  # what is certified is valid even if the run stops early: keep it to resume
    return prepared.writer.path
