"""SmoothAdv (Salman et al. 2019), the PGD variant with m noises: adversarial training of the soft smoothed
classifier.

The attack (eval mode, frozen weights) starts from δ_x = 0 and takes T steps of 2ε/T along the per-sample
ℓ2-normalised gradient of −log(mean_i softmax F(x + δ_x + δ_i)_y), keeping x + δ_x in [0, 1] and δ_x in the
ε-ball, with the same m noises throughout; training then minimises the mean CE over the m noisy copies of
x_adv, same noises. ε warms up linearly over the first `warmup` epochs.

The math and the published hyper-parameters: docs/methods.md, "Method: smoothadv".
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
    frozen_eval,
    l2_normalize,
    project_l2,
)


@dataclass(frozen=True)
class SmoothAdvConfig:
    # CIFAR-10 σ = 0.5; (ε, m) = (1.0, 4), (1.0, 8), (2.0, 2) at σ = 0.25 / 0.5 / 1.0
    epsilon: float = 1.0
    num_noises: int = 8
    num_steps: int = 10
    warmup: int = 10  # epochs over which ε grows linearly to its value

    def __post_init__(self) -> None:
        # T = 0 or ε = 0 is Gaussian training on the m noises; warmup 0 starts at the full ε.
        check_domains(self, non_negative=("epsilon", "num_steps", "warmup"), counts=("num_noises",))


def warmed_up_epsilon(config: SmoothAdvConfig, epoch: int) -> float:
    return min(config.epsilon, (epoch + 1) * config.epsilon / config.warmup) if config.warmup > 0 else config.epsilon


def smoothadv_attack(model: nn.Module, x: Tensor, y: Tensor, noises: Tensor, epsilon: float, steps: int) -> Tensor:
    """x_adv within ε of x (ℓ2, per sample) and inside [0, 1], maximising the soft smoothed classifier's loss."""
    if steps == 0 or epsilon == 0:
        return x.detach()
    step_size = 2 * epsilon / steps
    delta = torch.zeros_like(x)
    with frozen_eval(model) as frozen:
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = forward_copies(frozen, (x + delta).unsqueeze(0) + noises)
            smoothed = F.softmax(logits, dim=-1).mean(dim=0).gather(1, y[:, None]).squeeze(1)
            loss = -torch.log(smoothed.clamp(min=1e-20)).sum()
            (grad,) = torch.autograd.grad(loss, [delta])
            delta = delta.detach() + step_size * l2_normalize(grad)
            delta = project_l2((x + delta).clamp(0.0, 1.0) - x, epsilon)
    return (x + delta).detach()


def smoothadv_loss(model: nn.Module, batch: Batch, config: SmoothAdvConfig, context: StepContext) -> StepOutput:
    noises = draw_noises(batch.x, context.sigma, config.num_noises)
    epsilon = warmed_up_epsilon(config, context.epoch)
    x_adv = smoothadv_attack(model, batch.x, batch.y, noises, epsilon, config.num_steps)
    logits = forward_copies(model, x_adv.unsqueeze(0) + noises)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.y.repeat(config.num_noises))
    return StepOutput(
        loss, {"accuracy": accuracy(logits, batch.y), "epsilon": torch.tensor(epsilon, device=batch.x.device)}
    )


METHOD = METHODS.add(Method("smoothadv", SmoothAdvConfig, smoothadv_loss, chunks=lambda config: config.num_noises))
