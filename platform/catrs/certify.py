"""The certification job: a checkpoint, a data set split, and CERTIFY (or PREDICT) over a set of indices.

    catrs certify --checkpoint runs/digits/checkpoint.pt --dataset digits --sigma 0.5 --out cert.parquet

`certify_rows` is the pure core (model + rows in, rows out) that a single process runs here and that the
Ray shards will run per index range; `run_certification` adds the checkpoint checks, the result file with
its provenance and resume, and the progress bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from catrs.checkpoint import Checkpoint, check_matches, file_sha256, load_checkpoint
from catrs.data import dataset_spec, get_dataset
from catrs.errors import UserError
from catrs.inference import INFERENCE_MODES, pick_device
from catrs.metrics import certification_metrics, objective_value
from catrs.results import CORRUPTION_COLUMNS, ResultWriter
from catrs.smoothing import Smooth

MODES = ("certify", "predict")
# Bound on the predictions one batch of inputs keeps on the device (int64 each) before they are counted.
MAX_PENDING_SAMPLES = 20_000_000


@dataclass(frozen=True)
class CertifySettings:
    """The sampling protocol; defaults are the published one (Cohen et al.; METHODS.md)."""

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    seed: int = 0
    mixed_precision: bool = False
    inference: str = "eager"

    def validate(self) -> None:
        if self.n0 < 1:
            raise UserError(f"--n0 must be a positive integer, got {self.n0}")
        if self.n < 1:
            raise UserError(f"--n must be a positive integer, got {self.n}")
        if not 0 < self.alpha < 1:
            raise UserError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        if self.batch_size < 1:
            raise UserError(f"--batch must be a positive integer, got {self.batch_size}")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.inference not in INFERENCE_MODES:
            raise UserError(f"unknown --inference {self.inference!r}; choose one of: {', '.join(INFERENCE_MODES)}")

    def smoothed(self, model: nn.Module, num_classes: int, sigma: float) -> Smooth:
        """`model` smoothed at σ, sampling with this protocol's seed, precision and inference mode."""
        return Smooth(model, num_classes, sigma, seed=self.seed, mixed_precision=self.mixed_precision,
                      inference=self.inference)


def select_indices(length: int, skip: int = 1, max_index: int = -1) -> list[int]:
    """Cohen's subset rule: every `skip`-th index below `max_index` (all when negative)."""
    if skip < 1:
        raise UserError(f"--skip must be a positive integer, got {skip}")
    stop = length if max_index < 0 else min(length, max_index)
    return list(range(0, stop, skip))


def inputs_per_pass(settings: CertifySettings, mode: str) -> int:
    """How many inputs share forward passes: enough for the smallest phase (n0) to fill a batch."""
    smallest = settings.n0 if mode == "certify" else settings.n
    per_input = settings.n0 + settings.n if mode == "certify" else settings.n
    return max(1, min(settings.batch_size // smallest, MAX_PENDING_SAMPLES // per_input))


def certify_rows(
    smooth: Smooth, dataset: Dataset, indices: Sequence[int], settings: CertifySettings, mode: str = "certify"
) -> Iterator[list[dict[str, Any]]]:
    """Rows for `indices`, a list per group of inputs certified together; `time` is the group's time per input."""
    group = inputs_per_pass(settings, mode)
    for start in range(0, len(indices), group):
        items = [dataset[i] for i in indices[start : start + group]]
        keys = [int(index) for index, _, _ in items]
        xs = torch.stack([x for _, x, _ in items])
        began = time.perf_counter()
        if mode == "certify":
            outcomes = smooth.certify_batch(xs, settings.n0, settings.n, settings.alpha, settings.batch_size,
                                            indices=keys)
        else:
            outcomes = [(label, None) for label in
                        smooth.predict_batch(xs, settings.n, settings.alpha, settings.batch_size, indices=keys)]
        seconds = (time.perf_counter() - began) / len(items)
        rows = []
        for (index, _, label), (predicted, radius) in zip(items, outcomes):
            row = {"idx": index, "label": int(label), "predict": predicted, "correct": int(predicted == label),
                   "time": seconds}
            if mode == "certify":
                row["radius"] = radius
            layout = getattr(dataset, "layout", lambda i: None)(index)
            if layout is not None:
                row["corruption"], row["severity"] = layout[0], layout[1]
            rows.append(row)
        yield rows


@dataclass(frozen=True)
class CertifyRequest:
    checkpoint: Path
    dataset: str
    sigma: float
    out: Path
    settings: CertifySettings = CertifySettings()
    mode: str = "certify"
    split: str = "test"
    skip: int = 1
    max_index: int = -1
    data_root: Path | None = None
    download: bool = False
    output_format: str | None = None
    device: str | None = None


@dataclass
class PreparedCertification:
    """A validated request: its checkpoint, the provenance of its rows, its output, and what is left to do."""

    request: CertifyRequest
    checkpoint: Checkpoint
    provenance: dict[str, Any]
    writer: ResultWriter
    dataset: Dataset
    selected: list[int]

    @property
    def todo(self) -> list[int]:
        done = self.writer.done
        return [i for i in self.selected if i not in done]


def prepare_certification(request: CertifyRequest) -> PreparedCertification:
    """Checks everything about a request before any work is spent; refuses an output of other provenance."""
    settings = request.settings
    settings.validate()
    dataset_spec(request.dataset)  # an unknown name is reported as such, before any checkpoint check
    if not request.sigma > 0:
        raise UserError(f"--sigma must be positive, got {request.sigma}")
    checkpoint = load_checkpoint(request.checkpoint)
    check_matches(checkpoint.card, request.checkpoint, dataset=request.dataset, sigma=request.sigma)
    checkpoint.model()  # weights that do not fit their architecture are refused now, not mid-run
    provenance = {
        "mode": request.mode, "dataset": request.dataset, "split": request.split,
        "n0": settings.n0 if request.mode == "certify" else 0, "n": settings.n, "alpha": settings.alpha,
        "sigma": request.sigma, "seed": settings.seed, "batch": settings.batch_size,
        "mixed_precision": settings.mixed_precision, "checkpoint": str(request.checkpoint),
        "checkpoint_sha256": file_sha256(request.checkpoint),
    }
    extra = CORRUPTION_COLUMNS if dataset_spec(request.dataset).base else ()
    writer = ResultWriter(request.out, provenance, request.output_format, extra_columns=extra)
    dataset = get_dataset(request.dataset, request.split, request.data_root, request.download)
    selected = select_indices(len(dataset), request.skip, request.max_index)
    return PreparedCertification(request, checkpoint, provenance, writer, dataset, selected)


def certify_indices(request: CertifyRequest, checkpoint: Checkpoint, indices: Sequence[int],
                    dataset: Dataset | None = None) -> Iterator[list[dict[str, Any]]]:
    """Rows for `indices` of the request's split (`dataset`, or loaded here), a list per group of inputs
    certified together.

    Pure: reads the data set, writes nothing. The single-process job and every Ray shard run this.
    """
    if dataset is None:
        dataset = get_dataset(request.dataset, request.split, request.data_root, request.download)
    model = checkpoint.model(pick_device(request.device))
    smooth = request.settings.smoothed(model, checkpoint.card.num_classes, request.sigma)
    yield from certify_rows(smooth, dataset, list(indices), request.settings, request.mode)


def run_certification(request: CertifyRequest, progress: bool = True) -> Path:
    """Certifies (or predicts) the requested indices into `request.out`, resuming what it already holds."""
    prepared = prepare_certification(request)
    todo = prepared.todo
    try:
        with tqdm(total=len(todo), desc=request.mode, unit="img", disable=not progress, file=sys.stderr) as bar:
            for rows in certify_indices(request, prepared.checkpoint, todo, prepared.dataset):
                prepared.writer.add(rows)
                bar.update(len(rows))
    finally:
        prepared.writer.flush()  # what is certified is valid even if the run stops early: keep it for the resume
    return request.out


@dataclass(frozen=True)
class ProxyEvaluation:
    """A sweep's cheap certification: CERTIFY with small n on a fixed, evenly spread subset of the test split.

    Reports `acr`, `abstain_rate`, `clean_accuracy`, `certified_accuracy_R` and the sweep's objective, every
    `every` epochs and at the last. The subset and the noise are the same for every trial and epoch, so
    trials are compared on equal terms.
    """

    dataset: str
    sigma: float
    settings: CertifySettings
    subset: int
    every: int
    objective: str = "acr"
    data_root: Path | None = None
    download: bool = False

    def due(self, epoch: int, epochs: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == epochs

    def indices(self, length: int) -> list[int]:
        return sorted({int(i) for i in np.linspace(0, length - 1, min(self.subset, length))})

    @cached_property
    def test_set(self) -> Dataset:
        """Loaded at the first evaluation, kept for the trial's later ones."""
        return get_dataset(self.dataset, "test", self.data_root, self.download)

    def run(self, model: nn.Module) -> tuple[dict[str, float], pd.DataFrame]:
        smooth = self.settings.smoothed(model, dataset_spec(self.dataset).num_classes, self.sigma)
        test = self.test_set
        rows = [row for group in certify_rows(smooth, test, self.indices(len(test)), self.settings) for row in group]
        frame = pd.DataFrame(rows)
        metrics = certification_metrics(frame)
        metrics[self.objective] = objective_value(frame, self.objective)
        return metrics, frame
