"""Consistency regularization (Jeong & Shin 2020).

m noisy copies per image; loss = mean CE over all m·b noisy inputs
+ mean over the batch of [λ · (1/m) Σ_i KL(p̄ ‖ p_i) + η · H(p̄)], where p̄ is the mean of the m softmaxes
(not detached).

The math and the published hyper-parameters: docs/methods.md, "Method: consistency".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from trainables.base import (
    METHODS,
    Batch,
    Method,
    StepContext,
    StepOutput,
    accuracy,
    check_domains,
    draw_noises,
    forward_copies,
    kl_to_target,
)


@dataclass(frozen=True)
class ConsistencyConfig:
    lbd: float = 10.0  # CIFAR-10 σ = 0.5 (20 / 10 / 10 at σ = 0.25 / 0.5 / 1.0; MNIST 10 / 5 / 5)
    eta: float = 0.5
    num_noises: int = 2

    def __post_init__(self) -> None:
        check_domains(self, positive=("lbd",), non_negative=("eta",), counts=("num_noises",))


def consistency_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample: (1/m) Σ_i KL(p̄ ‖ p_i) and H(p̄), from logits (m, b, C)."""
    mean_probs = F.softmax(logits, dim=-1).mean(dim=0)
    kl = kl_to_target(mean_probs.unsqueeze(0), logits).mean(dim=0)
    entropy = -(mean_probs * mean_probs.clamp(min=1e-20).log()).sum(dim=-1)
    return kl, entropy


def consistency_loss(model: nn.Module, batch: Batch, config: ConsistencyConfig, context: StepContext) -> StepOutput:
    logits = forward_copies(model, batch.x.unsqueeze(0) + draw_noises(batch.x, context.sigma, config.num_noises))
    ce = F.cross_entropy(logits.flatten(0, 1), batch.y.repeat(config.num_noises))
    kl, entropy = consistency_terms(logits)
    loss = ce + (config.lbd * kl + config.eta * entropy).mean()
    return StepOutput(
        loss,
        {
            "accuracy": accuracy(logits, batch.y),
            "ce": ce.detach(),
            "kl": kl.mean().detach(),
            "entropy": entropy.mean().detach(),
        },
    )


METHOD = METHODS.add(
    Method("consistency", ConsistencyConfig, consistency_loss, chunks=lambda config: config.num_noises)
)
