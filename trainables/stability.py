"""Stability training (Li et al. 2019): CE on clean inputs plus λ·CE(softmax F(x) → F(x + δ)).

The clean logits are not detached: the stability term trains both branches. Clean and noisy inputs go
through separate forward passes, as released (with batch norm, a joint pass would mix their statistics).

The math and the published hyper-parameters: docs/methods.md, "Method: stability".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from trainables.base import METHODS, Batch, Method, StepContext, StepOutput, accuracy, check_domains, noisy


@dataclass(frozen=True)
class StabilityConfig:
    lbd: float = 2.0  # CIFAR-10 σ = 0.5 (2 / 2 / 1 at σ = 0.25 / 0.5 / 1.0; MNIST 2)

    def __post_init__(self) -> None:
        check_domains(self, positive=("lbd",))


def stability_loss(model: nn.Module, batch: Batch, config: StabilityConfig, context: StepContext) -> StepOutput:
    clean = model(batch.x)
    perturbed = model(noisy(batch.x, context.sigma))
    ce = F.cross_entropy(clean, batch.y)
    stability = -(F.softmax(clean, dim=1) * F.log_softmax(perturbed, dim=1)).sum(dim=1).mean()
    return StepOutput(
        ce + config.lbd * stability,
        {"accuracy": accuracy(perturbed, batch.y), "ce": ce.detach(), "stability": stability.detach()},
    )


METHOD = METHODS.add(Method("stability", StabilityConfig, stability_loss))
