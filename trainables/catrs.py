"""CAT-RS (Jeong, Kim, Shin, AAAI 2023): confidence-aware training of smoothed classifiers, as released.

Per chunk of b images with labels y and soft labels ŷ:

1. M noises δ_i; one train-mode forward of [x + δ_1; …; x + δ_M].
2. p̂ = fraction of the M noisy copies classified as y (hard votes, no gradient).
3. Worst-case noise search (eval mode, frozen weights), from the same δ_i, no random start, T steps of
   2ε/T along the per-copy ℓ2-normalised gradient of Σ_i KL(ŷ ‖ softmax F(x + δ'_i)); after each step,
   δ' − δ is projected onto the ε-ball and δ' re-standardised per copy to δ's mean and RMS.
4. A train-mode forward of [x + δ'_1; …; x + δ'_M].
5. K ~ Binomial(M, p̂) per sample, at least 1; L_low = (1/M)·(sum of the K smallest per-noise CEs of step 1).
6. L_high = max_i KL(ŷ ‖ softmax F(x + δ'_i)).
7. Loss = mean over the chunk of L_low + λ·1[K = M]·L_high.

Variants: `confidence_mask` draws K ~ Bin(M, ŷ_y) (used on ImageNet); `soft_labels="mean_softmax"` needs no
pre-trained teacher (ŷ = the detached mean softmax of step 1; the paper's App. G.1); `eps_double_epoch`
doubles ε from that epoch on (ImageNet: 80). The teacher's ŷ come from `catrs.teacher`.

The math and the published hyper-parameters: docs/methods.md, "Method: catrs".
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
    SoftLabelNeed,
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

SOFT_LABEL_SOURCES = ("teacher", "mean_softmax")


@dataclass(frozen=True)
class CatrsConfig:
    # CIFAR-10 σ = 0.5 (λ = 0.5 / 1.0 / 2.0 at σ = 0.25 / 0.5 / 1.0; M = 4, ε = 1.0, T = 4 throughout)
    lbd: float = 1.0
    num_noises: int = 4
    epsilon: float = 1.0
    num_steps: int = 4
    confidence_mask: bool = False
    eps_double_epoch: int = -1  # from this epoch on, search within 2ε (negative: never)
    soft_labels: str = "teacher"  # or "mean_softmax": no pre-trained teacher
    sigma0: float = 0.25  # the teacher's noise level (the released experiments use 0.25 for every σ)
    teacher_noises: int = 10_000  # N, noisy votes per training image for ŷ
    teacher_checkpoint: str = ""  # a trained Gaussian teacher to use instead of training one

    def __post_init__(self) -> None:
        if self.soft_labels not in SOFT_LABEL_SOURCES:
            raise ValueError(f"soft_labels must be one of {', '.join(SOFT_LABEL_SOURCES)}, got {self.soft_labels!r}")
        # eps_double_epoch takes any epoch (negative: never); T = 0 is the variant without a search.
        check_domains(
            self,
            positive=("lbd", "sigma0"),
            non_negative=("epsilon", "num_steps"),
            counts=("num_noises", "teacher_noises"),
        )


def pixel_mean(t: Tensor) -> Tensor:
    return t.flatten(-3).mean(dim=-1)[..., None, None, None]


def pixel_rms(t: Tensor) -> Tensor:
    """The root mean square over pixels (not the centred standard deviation), as released."""
    return t.flatten(-3).pow(2).mean(dim=-1).sqrt()[..., None, None, None]


def restandardize(noise: Tensor, mean0: Tensor, rms0: Tensor) -> Tensor:
    """μ0 + (δ' − μ) / s · s0 per copy: δ' moved to the original's mean and rescaled by s0/s around it."""
    return mean0 + (noise - pixel_mean(noise)) / pixel_rms(noise) * rms0


def worst_case_noise(
    model: nn.Module, x: Tensor, noises: Tensor, soft_labels: Tensor, epsilon: float, steps: int
) -> Tensor:
    """The searched noises δ' (M, b, *image) near `noises` that maximise Σ_i KL(ŷ ‖ softmax F(x + δ'_i))."""
    if steps == 0:
        return noises.detach()
    original = noises.detach()
    mean0, rms0 = pixel_mean(original), pixel_rms(original)
    step_size = 2 * epsilon / steps
    current = original
    with frozen_eval(model) as frozen:
        for _ in range(steps):
            current = current.clone().requires_grad_(True)
            objective = kl_to_target(soft_labels, forward_copies(frozen, x.unsqueeze(0) + current)).sum()
            (grad,) = torch.autograd.grad(objective, [current])
            stepped = current.detach() + step_size * l2_normalize(grad)
            projected = original + project_l2(stepped - original, epsilon)
            current = restandardize(projected, mean0, rms0)
    return current.detach()


def sample_k(probability: Tensor, num_noises: int) -> Tensor:
    """K ~ Binomial(M, p) per sample, clamped to at least 1."""
    trials = torch.full_like(probability, float(num_noises))
    return torch.binomial(trials, probability.clamp(0.0, 1.0)).long().clamp(min=1)


def bottom_k_mean(losses: Tensor, k: Tensor) -> Tensor:
    """Per sample, the sum of its K smallest losses (losses (b, M)) divided by M, not by K."""
    ordered, _ = losses.sort(dim=1)
    keep = torch.arange(losses.shape[1], device=losses.device)[None, :] < k[:, None]
    return (ordered * keep).sum(dim=1) / losses.shape[1]


def catrs_objective(ce: Tensor, kl: Tensor, k: Tensor, lbd: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample loss L_low + λ·1[K = M]·L_high from per-noise CEs and KLs (b, M); also L_low and L_high."""
    low = bottom_k_mean(ce, k)
    high = kl.max(dim=1).values
    full = (k == ce.shape[1]).to(ce.dtype)
    return low + lbd * full * high, low, high


def catrs_loss(model: nn.Module, batch: Batch, config: CatrsConfig, context: StepContext) -> StepOutput:
    m = config.num_noises
    noises = draw_noises(batch.x, context.sigma, m)
    logits = forward_copies(model, batch.x.unsqueeze(0) + noises)
    if config.soft_labels == "teacher":
        if batch.soft_labels is None:
            raise ValueError("catrs with soft_labels='teacher' needs the teacher's soft labels in the batch")
        soft = batch.soft_labels
    else:
        soft = F.softmax(logits, dim=-1).mean(dim=0).detach()
    p_hat = (logits.argmax(dim=-1) == batch.y).float().mean(dim=0).detach()
    epsilon = config.epsilon * (2 if 0 <= config.eps_double_epoch <= context.epoch else 1)
    searched = worst_case_noise(model, batch.x, noises, soft, epsilon, config.num_steps)
    logits_worst = forward_copies(model, batch.x.unsqueeze(0) + searched)

    ce = F.cross_entropy(logits.flatten(0, 1), batch.y.repeat(m), reduction="none").view(m, -1).T
    kl = kl_to_target(soft.unsqueeze(0), logits_worst).T
    confidence = soft.gather(1, batch.y[:, None]).squeeze(1) if config.confidence_mask else p_hat
    k = sample_k(confidence, m)
    per_sample, low, high = catrs_objective(ce, kl, k, config.lbd)
    return StepOutput(
        per_sample.mean(),
        {
            "accuracy": accuracy(logits, batch.y),  # the mean of p_hat, which would be a copy of it
            "full_fraction": (k == m).float().mean(),
            "l_low": low.mean().detach(),
            "l_high": high.mean().detach(),
        },
    )


def soft_label_need(config: CatrsConfig) -> SoftLabelNeed | None:
    """The teacher's votes, unless ŷ comes from the run's own noisy copies (`mean_softmax`)."""
    if config.soft_labels != "teacher":
        return None
    return SoftLabelNeed(config.sigma0, config.teacher_noises, config.teacher_checkpoint)


METHOD = METHODS.add(
    Method(
        "catrs",
        CatrsConfig,
        catrs_loss,
        chunks=lambda config: config.num_noises,
        soft_labels=soft_label_need,
        teacher_keys=("sigma0",),
        shared_keys=("soft_labels", "teacher_noises", "teacher_checkpoint"),
    )
)
