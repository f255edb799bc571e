"""What a training method is, for the training loop in `catrs.train`, and the registry of methods.

A method is a typed hyper-parameter config (a dataclass whose defaults are the paper's CIFAR-10 σ=0.5
setting) and a loss of one batch: `loss(model, batch, config, context) -> StepOutput`. It may also split each
loader batch into chunks that each take an optimizer step (the released per-noise chunking) and declare
that it needs an upstream artefact (CAT-RS's soft labels: `SoftLabelNeed`). Pure PyTorch: no Ray, no MLflow.

A method registers itself where it is defined (`METHOD = METHODS.add(Method(...))`); the registry imports
every module of `trainables` at its first lookup, so a new method is one new file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from catrs.registry import Registry


@dataclass(frozen=True)
class Batch:
    """One chunk of training data: images in [0, 1], labels, dataset indices, and soft labels if needed."""

    x: Tensor
    y: Tensor
    index: Tensor
    soft_labels: Tensor | None = None


@dataclass(frozen=True)
class StepContext:
    """What a loss may depend on beyond the batch and its config."""

    sigma: float
    epoch: int
    num_classes: int
    lr_drops: int = 0  # how many times the LR schedule has decayed so far (MACER's deferred start)


@dataclass
class StepOutput:
    """The loss to minimise and detached scalars to log (tensors: no host sync per step)."""

    loss: Tensor
    scalars: dict[str, Tensor]


@dataclass(frozen=True)
class SoftLabelNeed:
    """The soft labels a run trains on: vote histograms of a Gaussian teacher trained at `sigma0` (or the one
    in `teacher_checkpoint`), `votes` noisy votes per training image (`catrs.teacher` makes them)."""

    sigma0: float
    votes: int
    teacher_checkpoint: str = ""


@dataclass(frozen=True)
class Method:
    """A training method: its config type, its loss, and how the training loop should feed it.

    `soft_labels(config)` says which soft labels a run needs (None: none). A sweep trains one teacher per
    value of the `teacher_keys` a trial may take (so it searches them only as a finite choice), and the
    `shared_keys` decide the soft labels every trial shares (so it does not search them at all).
    """

    name: str
    config_type: type
    loss: Callable[[nn.Module, Batch, Any, StepContext], StepOutput]
    chunks: Callable[[Any], int] = lambda config: 1  # optimizer steps per loader batch (released chunking)
    soft_labels: Callable[[Any], SoftLabelNeed | None] = lambda config: None
    teacher_keys: tuple[str, ...] = ()
    shared_keys: tuple[str, ...] = ()
    default_batch_size: int = 256

    def make_config(self, overrides: dict[str, Any] | None = None) -> Any:
        """The default config with `overrides` applied; an unknown name raises KeyError naming the valid ones."""
        overrides = dict(overrides or {})
        known = {f.name: f for f in fields(self.config_type)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise KeyError(f"unknown hyper-parameter(s) {', '.join(unknown)} for method {self.name!r}; valid: {valid}")
        defaults = self.config_type()
        return self.config_type(**{k: _coerce(k, v, type(getattr(defaults, k))) for k, v in overrides.items()})


METHODS: Registry[Method] = Registry("training method", "trainables")


def check_domains(
    config: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (), counts: tuple[str, ...] = ()
) -> None:
    """Refuses (ValueError naming the field) a config whose numbers leave their domains: every float must be
    finite (a NaN weight trains for minutes, then diverges), `positive` ones above 0, `non_negative` ones at
    least 0, `counts` (how many noises, steps, votes) at least 1. A method's `__post_init__` calls it, so
    neither `--set` nor a sweep file nor code builds a config outside them."""
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"hyper-parameter {field.name} must be a finite number, got {value}")
    rules = (
        (positive, "positive", lambda v: v > 0),
        (non_negative, "at least 0", lambda v: v >= 0),
        (counts, "at least 1", lambda v: v >= 1),
    )
    for names, wanted, holds in rules:
        for name in names:
            if not holds(value := getattr(config, name)):
                raise ValueError(f"hyper-parameter {name} must be {wanted}, got {value}")


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Command-line strings into the config field's type; a value that does not fit is a ValueError naming it."""
    spelled_bool = {"1", "true", "yes", "on", "0", "false", "no", "off"}
    if kind is bool and isinstance(value, str) and value.lower() in spelled_bool:
        return value.lower() in {"1", "true", "yes", "on"}
    try:
        if (kind is bool) != isinstance(value, bool):  # int(True) is 1, and bool("no") is True
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():  # int(2.5) is a silent 2
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"hyper-parameter {name}={value!r} is not a valid {kind.__name__}") from None


def noisy(x: Tensor, sigma: float) -> Tensor:
    """x + δ, δ ~ N(0, σ²I); never clipped to [0, 1]."""
    return x + sigma * torch.randn_like(x)


def draw_noises(x: Tensor, sigma: float, copies: int) -> Tensor:
    """`copies` independent noises for the batch x, shaped (copies, b, *image)."""
    return sigma * torch.randn((copies, *x.shape), device=x.device, dtype=x.dtype)


def forward_copies(model: nn.Module, inputs: Tensor) -> Tensor:
    """Logits (m, b, C) of inputs (m, b, *image), in one batched forward pass."""
    m, b = inputs.shape[:2]
    return model(inputs.flatten(0, 1)).view(m, b, -1)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Top-1 accuracy of logits (..., C) against labels y broadcast over the leading dimensions."""
    return (logits.argmax(dim=-1) == y).float().mean().detach()


def per_sample_norm(t: Tensor) -> Tensor:
    """ℓ2 norm over every dimension after the leading ones that index samples: (..., *image) → (..., 1, 1, 1)."""
    return t.flatten(-3).norm(dim=-1)[..., None, None, None]


def l2_normalize(t: Tensor, eps: float = 1e-12) -> Tensor:
    """Each sample's tensor scaled to unit ℓ2 norm (zero stays zero)."""
    return t / (per_sample_norm(t) + eps)


def project_l2(t: Tensor, radius: float) -> Tensor:
    """Each sample's tensor projected onto the ℓ2 ball of `radius` (scaled down only when outside it)."""
    norm = per_sample_norm(t)
    return t * torch.clamp(radius / (norm + 1e-12), max=1.0)


def kl_to_target(target: Tensor, logits: Tensor) -> Tensor:
    """KL(target ‖ softmax(logits)) per sample, summed over classes; target may hold zeros."""
    return F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="none").sum(dim=-1)


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """The bare model (no DDP wrapper) in eval mode with weights frozen, for an attack; restored afterwards.

    Attacks differentiate with respect to inputs only; freezing the weights keeps their gradients out of the
    graph, and eval mode keeps batch-norm statistics untouched, as in the released code.
    """
    inner = getattr(model, "module", model)
    was_training = inner.training
    flags = [p.requires_grad for p in inner.parameters()]
    inner.eval()
    for parameter in inner.parameters():
        parameter.requires_grad_(False)
    try:
        yield inner
    finally:
        for parameter, flag in zip(inner.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
        inner.train(was_training)
