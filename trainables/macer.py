"""MACER (Zhai et al. 2020): maximise the certified radius of the soft smoothed classifier directly.

m = 16 noises per image, batch 64, no chunking. With p̄ the mean softmax over the noises,
L_cls = Σ −log(p̄_y + 1e-10). With q the mean of softmax(β·logits), on samples whose top class under q is
y: ξ = Φ⁻¹(q_top1) − Φ⁻¹(q_top2), kept where finite and ≤ γ (the hinge is active), and
L_rob = (σ/2) Σ (γ − ξ). Loss = (L_cls + λ·L_rob) / b. The deferred variant holds λ = 0 until the first LR
drop.

The math and the published hyper-parameters: docs/methods.md, "Method: macer".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
)


@dataclass(frozen=True)
class MacerConfig:
    lbd: float = 6.0  # CIFAR-10 σ = 0.5 (12 / 6 / 12 deferred at σ = 0.25 / 0.5 / 1.0)
    gamma: float = 8.0
    beta: float = 16.0
    num_noises: int = 16
    deferred: bool = False

    def __post_init__(self) -> None:
        # γ ≤ 0 leaves L_rob nothing to reward (ξ ≥ 0 wherever it applies); β ≤ 0 flattens or inverts the votes q.
        check_domains(self, positive=("lbd", "gamma", "beta"), counts=("num_noises",))


def macer_margin(logits: Tensor, y: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor]:
    """ξ = Φ⁻¹(q₁) − Φ⁻¹(q₂) per sample (logits (m, b, C)) and the mask of samples in the hinge.

    The mask holds samples classified correctly under q whose ξ is finite and at most γ; ξ is only
    meaningful where the mask is set (elsewhere it is a finite stand-in).
    """
    q = F.softmax(beta * logits, dim=-1).mean(dim=0)
    top2, labels = q.topk(2, dim=-1)
    with torch.no_grad():
        xi = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
        active = (labels[:, 0] == y) & torch.isfinite(xi) & (xi <= gamma)
    # Recompute ξ with gradients where the hinge is active only: elsewhere Φ⁻¹ may sit at ±∞, and an infinite
    # derivative times a zero mask is NaN. Inactive entries get harmless stand-ins instead of being indexed
    # out, which would cost a host synchronisation.
    first = torch.where(active, top2[:, 0], torch.full_like(top2[:, 0], 0.75))
    second = torch.where(active, top2[:, 1], torch.full_like(top2[:, 1], 0.25))
    return torch.special.ndtri(first) - torch.special.ndtri(second), active


def macer_loss(model: nn.Module, batch: Batch, config: MacerConfig, context: StepContext) -> StepOutput:
    logits = forward_copies(model, batch.x.unsqueeze(0) + draw_noises(batch.x, context.sigma, config.num_noises))
    mean_probs = F.softmax(logits, dim=-1).mean(dim=0)
    l_cls = -torch.log(mean_probs.gather(1, batch.y[:, None]).squeeze(1) + 1e-10).sum()
    xi, active = macer_margin(logits, batch.y, config.beta, config.gamma)
    l_rob = (context.sigma / 2) * torch.where(active, config.gamma - xi, torch.zeros_like(xi)).sum()
    lbd = 0.0 if config.deferred and context.lr_drops == 0 else config.lbd
    loss = (l_cls + lbd * l_rob) / len(batch.y)
    b = len(batch.y)
    return StepOutput(
        loss,
        {
            "accuracy": accuracy(logits, batch.y),
            "l_cls": (l_cls / b).detach(),
            "l_rob": (l_rob / b).detach(),
            "hinge_fraction": active.float().mean(),
        },
    )


METHOD = METHODS.add(Method("macer", MacerConfig, macer_loss, default_batch_size=64))
