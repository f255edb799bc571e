"""SmoothMix (Jeong et al. 2021): mixup between clean and adversarial points of the smoothed classifier.

Attack (eval mode, frozen weights): T steps x ← clamp(x + α·ĝ, 0, 1), ĝ the ℓ2-normalised gradient of
CE(log mean_i softmax F(x + δ_i), y). The iterate at `mix_step`, pulled into the ℓ2 ball of radius
min(1, (e+1)/10)·α·mix_step around x (as the released code does: during the warm-up the mix start point is
closer to x), is x_init (0 is the clean x); the last iterate is x_adv.
Loss = mean CE of F(x_init + δ_i) + η·min(1, (e+1)/10)·L_mix, where, with p̄ the mean softmax at x_init + δ_i
and λ ~ U[0, ½] per sample, x_mix = (1−λ)x_init + λx_adv, target = (1−λ)p̄ + λ·uniform, and
L_mix = mean over noises of 1[argmax p̄ = y]·KL(target ‖ softmax F(x_mix + δ_i)). Same noises throughout.

The math and the published hyper-parameters: docs/methods.md, "Method: smoothmix".
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
    kl_to_target,
    l2_normalize,
    project_l2,
)

WARMUP_EPOCHS = 10


@dataclass(frozen=True)
class SmoothMixConfig:
    # CIFAR-10 σ = 0.5; (α, mix_step) = (0.5, 0), (1.0, 1), (2.0, 1) at σ = 0.25 / 0.5 / 1.0
    eta: float = 5.0
    num_noises: int = 2
    num_steps: int = 4
    alpha: float = 1.0
    mix_step: int = 1

    def __post_init__(self) -> None:
        check_domains(self, non_negative=("eta", "num_steps", "alpha", "mix_step"), counts=("num_noises",))
        if self.mix_step > self.num_steps:  # the mix starts at one of the attack's iterates x_0 … x_T
            raise ValueError(
                f"hyper-parameter mix_step must be at most num_steps ({self.num_steps}), got {self.mix_step}"
            )


def smoothmix_iterates(
    model: nn.Module, x: Tensor, y: Tensor, noises: Tensor, alpha: float, steps: int
) -> list[Tensor]:
    """[x, x_1, …, x_T]: the clean input and each step's iterate (detached, in [0, 1])."""
    iterates = [x.detach()]
    current = x.detach()
    with frozen_eval(model) as frozen:
        for _ in range(steps):
            current = current.clone().requires_grad_(True)
            mean_probs = F.softmax(forward_copies(frozen, current.unsqueeze(0) + noises), dim=-1).mean(dim=0)
            loss = F.nll_loss(torch.log(mean_probs.clamp(min=1e-20)), y)
            (grad,) = torch.autograd.grad(loss, [current])
            current = (current.detach() + alpha * l2_normalize(grad)).clamp(0.0, 1.0)
            iterates.append(current)
    return iterates


def mix_start(x: Tensor, iterate: Tensor, radius: float) -> Tensor:
    """x_init: `iterate` projected onto the ℓ2 ball of `radius` around `x`, per sample, and into [0, 1]."""
    return (x + project_l2(iterate - x, radius)).clamp(0.0, 1.0)


def mix_loss(logits_init: Tensor, logits_mix: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """L_mix per (noise, sample), (m, b): 1[argmax p̄ = y]·KL(target ‖ softmax logits_mix)."""
    num_classes = logits_init.shape[-1]
    mean_probs = F.softmax(logits_init, dim=-1).mean(dim=0)
    target = (1 - lam)[:, None] * mean_probs + lam[:, None] / num_classes
    correct = (mean_probs.argmax(dim=-1) == y).float()
    return correct * kl_to_target(target.unsqueeze(0), logits_mix)


def smoothmix_loss(model: nn.Module, batch: Batch, config: SmoothMixConfig, context: StepContext) -> StepOutput:
    noises = draw_noises(batch.x, context.sigma, config.num_noises)
    iterates = smoothmix_iterates(model, batch.x, batch.y, noises, config.alpha, config.num_steps)
    warmup = min(1.0, (context.epoch + 1) / WARMUP_EPOCHS)
    x_init = mix_start(batch.x, iterates[config.mix_step], warmup * config.alpha * config.mix_step)
    x_adv = iterates[-1]
    logits_init = forward_copies(model, x_init.unsqueeze(0) + noises)
    ce = F.cross_entropy(logits_init.flatten(0, 1), batch.y.repeat(config.num_noises))
    lam = torch.rand(len(batch.y), device=batch.x.device) / 2
    shape = (-1,) + (1,) * (batch.x.ndim - 1)
    x_mix = (1 - lam.view(shape)) * x_init + lam.view(shape) * x_adv
    logits_mix = forward_copies(model, x_mix.unsqueeze(0) + noises)
    l_mix = mix_loss(logits_init, logits_mix, batch.y, lam).mean()
    return StepOutput(
        ce + config.eta * warmup * l_mix,
        {"accuracy": accuracy(logits_init, batch.y), "ce": ce.detach(), "l_mix": l_mix.detach()},
    )


METHOD = METHODS.add(Method("smoothmix", SmoothMixConfig, smoothmix_loss, chunks=lambda config: config.num_noises))
