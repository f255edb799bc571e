"""The certification job: a checkpoint, a data set split, and CERTIFY (or PREDICT) over a set of indices.

    catrs certify --checkpoint runs/digits/checkpoint.pt --dataset digits --sigma 0.5 --out cert.parquet

`certify_rows` is the pure core (model + images in, rows out) that a single process runs here and that the
Ray workers run per chunk of positions (`catrs.distributed.chunks`); `run_certification` adds the checkpoint
checks, the result file (a path or an object-store URI) with its provenance and resume, and the progress
bar. Images are chosen by position in the split (`--skip`, `--max`) and rows keyed by dataset index
(`catrs.data`): the two agree except on `val`, whose rows name the training images they are.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from catrs.checkpoint import Checkpoint, check_matches, file_sha256, load_checkpoint
from catrs.data import Indexed, dataset_spec, get_dataset
from catrs.errors import UserError
from catrs.inference import pick_device
from catrs.metrics import certification_metrics, objective_value
from catrs.results import CORRUPTION_COLUMNS, ResultWriter
from catrs.sampling import DEFAULT_INFERENCE, INFERENCE_MODES, SamplingProtocol
from catrs.smoothing import Smooth
from catrs.storage import Stored

MODES = ("certify", "predict")
# Bound on the predictions one batch of inputs keeps on the device (int64 each) before they are counted.
MAX_PENDING_SAMPLES = 20_000_000


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
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {self.seed}")
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


def inputs_per_pass(protocol: SamplingProtocol, mode: str) -> int:
    """How many inputs share forward passes: enough for the smallest phase (n0) to fill a batch."""
    smallest = protocol.n if mode == "predict" else protocol.n0
    per_input = protocol.n if mode == "predict" else protocol.n0 + protocol.n
    return max(1, min(protocol.batch // smallest, MAX_PENDING_SAMPLES // per_input))


def certify_rows(
    smooth: Smooth, dataset: Dataset, positions: Sequence[int], settings: CertifySettings, mode: str = "certify"
) -> Iterator[list[dict[str, Any]]]:
    """Rows for the items at `positions`, a list per group of inputs certified together; `time` is the group's
    time per input. Mode `evaluate` is CERTIFY's ACR for less (`Smooth.evaluate_batch`), with an `estimated`
    column: False where the selection was already wrong and no estimation samples were spent."""
    group = inputs_per_pass(settings.protocol, mode)
    for start in range(0, len(positions), group):
        items = [dataset[i] for i in positions[start : start + group]]
        keys = [int(index) for index, _, _ in items]
        xs = torch.stack([x for _, x, _ in items])
        began = time.perf_counter()
        outcomes = _sample(smooth, xs, [label for _, _, label in items], keys, settings.protocol, mode)
        seconds = (time.perf_counter() - began) / len(items)
        rows = []
        for (index, _, label), outcome in zip(items, outcomes, strict=True):
            row = {
                "idx": index,
                "label": int(label),
                "predict": outcome[0],
                "correct": int(outcome[0] == label),
                "time": seconds,
            }
            if mode != "predict":
                row["radius"] = outcome[1]
            if mode == "evaluate":
                row["estimated"] = outcome[2]
            layout = getattr(dataset, "layout", lambda i: None)(index)
            if layout is not None:
                row["corruption"], row["severity"] = layout[0], layout[1]
            rows.append(row)
        yield rows


def _sample(
    smooth: Smooth, xs: torch.Tensor, labels: list[int], keys: list[int], protocol: SamplingProtocol, mode: str
) -> list[tuple]:
    p = protocol
    if mode == "certify":
        return smooth.certify_batch(xs, p.n0, p.n, p.alpha, p.batch, indices=keys)
    if mode == "evaluate":
        return smooth.evaluate_batch(xs, labels, p.n0, p.n, p.alpha, p.batch, indices=keys)
    return [(label,) for label in smooth.predict_batch(xs, p.n, p.alpha, p.batch, indices=keys)]


@dataclass(frozen=True)
class CertifyRequest:
    checkpoint: Path
    dataset: str
    sigma: float | None  # None: the checkpoint's; given, it must be the checkpoint's
    out: Path | str  # a local path or an object-store URI (`catrs.storage`)
    settings: CertifySettings = CertifySettings()
    mode: str = "certify"
    split: str = "test"
    skip: int = 1
    max_index: int = -1
    data_root: Path | None = None
    download: bool = False
    output_format: str | None = None
    device: str | None = None
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


def prepare_certification(request: CertifyRequest) -> PreparedCertification:
    """Checks everything about a request before any work is spent; refuses an output of other provenance."""
    settings = request.settings
    settings.validate()
    dataset_spec(request.dataset)  # an unknown name is reported as such, before any checkpoint check
    checkpoint = load_checkpoint(request.checkpoint)
    check_matches(checkpoint.card, request.checkpoint, dataset=request.dataset, sigma=request.sigma)
    checkpoint.model()  # weights that do not fit their architecture are refused now, not mid-run
    provenance = {
        "mode": request.mode,
        "dataset": request.dataset,
        "split": request.split,
        "n0": 0 if request.mode == "predict" else settings.protocol.n0,
        "n": settings.protocol.n,
        "alpha": settings.protocol.alpha,
        "sigma": checkpoint.card.sigma,
        "seed": settings.seed,
        "batch": settings.protocol.batch,
        "mixed_precision": settings.mixed_precision,
        "checkpoint": request.checkpoint_source or str(request.checkpoint),
        "checkpoint_sha256": file_sha256(request.checkpoint),
    }
    extra = CORRUPTION_COLUMNS if dataset_spec(request.dataset).base else ()
    writer = ResultWriter(request.out, provenance, request.output_format, extra_columns=extra)
    dataset = get_dataset(request.dataset, request.split, request.data_root, request.download)
    selected = select_positions(len(dataset), request.skip, request.max_index)
    return PreparedCertification(request, checkpoint, provenance, writer, dataset, selected)


def smoothed_model(request: CertifyRequest, checkpoint: Checkpoint) -> Smooth:
    """The checkpoint's model on the request's device, smoothed at its σ with the request's protocol."""
    model = checkpoint.model(pick_device(request.device))
    return request.settings.smoothed(model, checkpoint.card.num_classes, checkpoint.card.sigma)


def run_certification(request: CertifyRequest, progress: bool = True) -> Stored:
    """Certifies (or predicts) the requested indices into `request.out`, resuming what it already holds."""
    prepared = prepare_certification(request)
    todo = prepared.todo
    try:
        with tqdm(total=len(todo), desc=request.mode, unit="img", disable=not progress, file=sys.stderr) as bar:
            smooth = smoothed_model(request, prepared.checkpoint)
            for rows in certify_rows(smooth, prepared.dataset, todo, request.settings, request.mode):
                prepared.writer.add(rows)
                bar.update(len(rows))
    finally:
        prepared.writer.flush()  # what is certified is valid even if the run stops early: keep it for the resume
    return prepared.writer.path


def spread(length: int, count: int) -> tuple[int, int]:
    """(skip, max) that select `count` positions spread evenly over a split of `length` items (all of them
    for 0, or a count that large)."""
    if count <= 0 or count >= length:
        return 1, -1
    skip = length // count
    return skip, skip * count


def evaluation_metrics(frame: pd.DataFrame, objective: str, prefix: str) -> dict[str, float]:
    """ACR, clean accuracy, certified accuracy at the usual radii and `objective` of evaluation rows, prefixed.

    No abstention rate: rows whose selection was wrong were never estimated, so it would count too few."""
    metrics = {k: v for k, v in certification_metrics(frame).items() if k != "abstain_rate"}
    metrics[objective] = objective_value(frame, objective)
    return {prefix + name: value for name, value in metrics.items()}


@dataclass(frozen=True)
class ProxyEvaluation:
    """A sweep's cheap certification of the val split: CERTIFY's ACR (`Smooth.evaluate_batch`: images whose
    selected class is already wrong get no estimation samples) with small n on `images` val images spread
    evenly over the split.

    Runs after the epochs in `epochs` (1-based: ASHA's rungs) and after the last, and reports `val_acr`,
    `val_clean_accuracy`, `val_certified_accuracy_R` and the objective as `val_OBJECTIVE`. The images and the
    noise are the same for every trial and epoch, so trials are compared on equal terms.
    """

    dataset: str
    sigma: float
    settings: CertifySettings
    images: int
    epochs: tuple[int, ...]
    objective: str = "acr"
    data_root: Path | None = None
    download: bool = False

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch + 1 in self.epochs or epoch + 1 == epochs

    @cached_property
    def val_set(self) -> Indexed:
        """Loaded at the first evaluation, kept for the trial's later ones."""
        return get_dataset(self.dataset, "val", self.data_root, self.download)

    def run(self, model: nn.Module) -> tuple[dict[str, float], pd.DataFrame]:
        smooth = self.settings.smoothed(model, dataset_spec(self.dataset).num_classes, self.sigma)
        positions = select_positions(len(self.val_set), *spread(len(self.val_set), self.images))
        frame = pd.DataFrame(
            [row for group in certify_rows(smooth, self.val_set, positions, self.settings, "evaluate") for row in group]
        )
        return evaluation_metrics(frame, self.objective, "val_"), frame
