"""Gaussian data augmentation (Cohen et al. 2019): CE(F(x + δ), y), one noise draw per image per step.

The math and the published hyper-parameters: docs/methods.md, "Method: gaussian".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from trainables.base import METHODS, Batch, Method, StepContext, StepOutput, accuracy, noisy


@dataclass(frozen=True)
class GaussianConfig:
    """Gaussian training has no hyper-parameters beyond the schedule and σ."""


def gaussian_loss(model: nn.Module, batch: Batch, config: GaussianConfig, context: StepContext) -> StepOutput:
    logits = model(noisy(batch.x, context.sigma))
    return StepOutput(F.cross_entropy(logits, batch.y), {"accuracy": accuracy(logits, batch.y)})


METHOD = METHODS.add(Method("gaussian", GaussianConfig, gaussian_loss))
