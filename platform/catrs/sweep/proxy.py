"""A sweep's cheap measure of a trial: CERTIFY's exact ACR on some val images with small n, at ASHA's rungs.

    catrs tune demo_digits          (every trial reports it as `val_acr`, `val_certified_accuracy_R`, …;
                                     MLflow shows them as `proxy/val_acr`, …)

The proxy certifies in `evaluate` mode (`Smooth.evaluate_batch`: an image whose selected class is already
wrong gets no estimation samples, since it counts 0 at every radius anyway), so its ACR and certified
accuracies are CERTIFY's exactly, for fewer samples. The images and the noise are the same for every trial and
epoch, so trials are compared on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pandas as pd
from torch import nn

from catrs.certify import CertifySettings, certify_rows, select_positions
from catrs.context import RunContext
from catrs.data import Indexed, dataset_spec, get_dataset
from catrs.metrics import certification_metrics, objective_value
from catrs.results import ResultRow
from catrs.sampling import Mode
from catrs.sweep.ledger import samples_spent
from catrs.sweep.space import SearchSpace
from catrs.sweep.trial import PROXY_PREFIX


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
    """The proxy of one sweep: `images` val images spread evenly over the split, certified with `settings`
    after the epochs in `epochs` (1-based: ASHA's rungs) and after the last. Reports `val_acr`,
    `val_clean_accuracy`, `val_certified_accuracy_R` and the objective as `val_OBJECTIVE`."""

    dataset: str
    sigma: float
    settings: CertifySettings
    images: int
    epochs: tuple[int, ...]
    objective: str
    context: RunContext

    @property
    def names(self) -> tuple[str, ...]:
        """The metrics it reports."""
        return proxy_metric_names(self.objective)

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch + 1 in self.epochs or epoch + 1 == epochs

    @cached_property
    def val_set(self) -> Indexed:
        """Loaded at the first evaluation, kept for the trial's later ones."""
        return get_dataset(self.dataset, "val", self.context.data_root, self.context.download)

    def rows(self, model: nn.Module, part: tuple[int, int] = (0, 1)) -> list[ResultRow]:
        """The rows of this worker's share (`part = (rank, world)`) of the proxy's images."""
        smooth = self.settings.smoothed(model, dataset_spec(self.dataset).num_classes, self.sigma)
        positions = select_positions(len(self.val_set), *spread(len(self.val_set), self.images))
        rank, world = part
        groups = certify_rows(smooth, self.val_set, positions[rank::world], self.settings, Mode.EVALUATE)
        return [row for group in groups for row in group]

    def metrics(self, rows: list[ResultRow]) -> tuple[dict[str, float], pd.DataFrame]:
        ordered: list[ResultRow] = sorted(rows, key=_index)
        frame = pd.DataFrame(ordered)
        metrics = evaluation_metrics(frame, self.objective, "val_")
        metrics["val_samples"] = samples_spent(frame, self.settings.protocol, Mode.EVALUATE)  # for the ledger
        return metrics, frame


def proxy_metric_names(objective: str) -> tuple[str, ...]:
    """What the proxy reports to the scheduler: `val_acr`, `val_clean_accuracy`, … and `val_OBJECTIVE`."""
    accuracies = certification_metrics(pd.DataFrame(columns=["predict", "radius", "correct"]))
    names = [*accuracies, objective, "samples"]
    return tuple(f"val_{name}" for name in dict.fromkeys(names) if name != "abstain_rate")


def proxy_name(metric: str) -> str:
    """A proxy figure as MLflow shows it, named as the estimate it is (`proxy/val_acr`), apart from the
    selection's certification of val with the final protocol (`final_val_acr`)."""
    return PROXY_PREFIX + metric


def proxy_of(space: SearchSpace, context: RunContext) -> ProxyEvaluation:
    """The trials' certification of val, at ASHA's rungs and the last epoch."""
    proxy = space.proxy
    return ProxyEvaluation(
        space.dataset,
        space.sigma,
        CertifySettings(proxy.protocol(), seed=space.seed),
        proxy.images,
        tuple(space.budget.rungs(space.epochs)),
        space.objective,
        context,
    )


def _index(row: ResultRow) -> int:
    return row["idx"]
