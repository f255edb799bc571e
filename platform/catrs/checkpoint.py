"""Checkpoints that rebuild their own model and refuse to be misused.

A checkpoint is one `torch.save`d dict of plain data and tensors: a header, the `ModelCard` (architecture,
data set, classes, input shape, normalisation, σ, training method and its config, versions), the weights,
and optionally the training state (optimizer, scheduler, the next epoch, the metric history) for resuming
(no random state: each epoch seeds itself, `catrs.train`). It is always loaded with
`weights_only=True`, so a file that smuggles Python objects is refused rather than executed. Writes are
atomic (temporary name, then rename), so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import catrs
from catrs.errors import UserError
from catrs.models import Normalization, create_model
from catrs.storage import stored

FORMAT = "catrs-checkpoint"
FORMAT_VERSION = 1


def _versions() -> dict[str, str]:
    return {"catrs": str(catrs.__version__), "torch": str(torch.__version__)}


@dataclass(frozen=True)
class ModelCard:
    """What rebuilds a model and what it was trained for."""

    arch: str
    dataset: str
    num_classes: int
    input_shape: tuple[int, ...]
    normalization: Normalization | None
    sigma: float
    method: str = "gaussian"
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=_versions)

    def build_model(self) -> nn.Module:
        return create_model(
            self.arch, self.num_classes, normalization=self.normalization, in_channels=self.input_shape[0]
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        norm = data.get("normalization")
        return cls(
            arch=data["arch"],
            dataset=data["dataset"],
            num_classes=int(data["num_classes"]),
            input_shape=tuple(data["input_shape"]),
            normalization=Normalization(tuple(norm["mean"]), tuple(norm["std"])) if norm else None,
            sigma=float(data["sigma"]),
            method=data.get("method", "unknown"),
            config=dict(data.get("config", {})),
            versions=dict(data.get("versions", {})),
        )


@dataclass
class Checkpoint:
    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    training_state: dict[str, Any] | None = None

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with these weights, in eval mode on `device`; weights that do not fit the architecture, or
        that are not all finite, are refused."""
        self.check_finite()
        model = self.card.build_model()
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            first_line = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise UserError(f"checkpoint weights do not fit architecture {self.card.arch}: {first_line}") from None
        return model.to(device).eval()

    def check_finite(self) -> None:
        """Refuses NaN or infinite weights (a diverged run's): every noisy sample of such a network votes for the
        class argmax makes of NaN logits, so it would be certified as a constant classifier, with no word why."""
        broken = [
            name
            for name, tensor in self.state_dict.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
        if broken:
            more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
            raise UserError(
                f"checkpoint weights are not finite (NaN or infinity in {broken[0]}{more}): the training that "
                f"wrote them diverged; train again (a lower --lr) or use another checkpoint"
            )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) or `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def plain(value: Any) -> Any:
    """`value` with every NumPy scalar inside it (a seed from `np.arange`, a value a sampler drew) made the
    Python number it holds: `weights_only=True` refuses NumPy scalars, so a payload holding one would be written
    and then never load again."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: plain(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(inner) for inner in value)
    return value


def write_atomically(path: str | Path, payload: dict[str, Any]) -> Path:
    """`torch.save`s `payload` (its NumPy scalars as Python numbers, `plain`) so that a crash leaves either the
    old file or the new one, never a torn one."""
    payload = plain(payload)
    stored(path).write(lambda stream: torch.save(payload, stream))
    return Path(path)


def save_checkpoint(
    path: str | Path, model: nn.Module, card: ModelCard, training_state: dict[str, Any] | None = None
) -> Path:
    """Writes the checkpoint atomically (see `write_atomically`)."""
    return write_atomically(
        path,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "card": card.to_dict(),
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "training_state": training_state,
        },
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads a catrs checkpoint with `weights_only=True`; every way it can be wrong is a `UserError`."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoint.pt"
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise UserError(f"--checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"refused to load {path}: it holds Python objects, not just tensors and plain data "
            f"(loaded with weights_only=True); use a checkpoint written by catrs"
        ) from None
    except Exception:  # torch raises RuntimeError/EOFError/ValueError/... for torn or foreign bytes
        raise UserError(
            f"could not read checkpoint {path}: the file is truncated or not a PyTorch checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a catrs checkpoint (no {FORMAT!r} header); train one with `catrs train`")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer catrs (format {payload['format_version']}); upgrade catrs")
    try:
        card = ModelCard.from_dict(payload["card"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} has a damaged model card ({error!r}); retrain or re-export it") from None
    return Checkpoint(card, payload["model"], payload.get("training_state"))


def check_matches(card: ModelCard, path: str | Path, *, dataset: str | None = None, sigma: float | None = None) -> None:
    """Refuses a certification request that does not fit what the checkpoint was trained for.

    A corrupted copy of a test set (cifar10_c, mnist_c) fits a model trained on the clean data set.
    """
    from catrs.data import dataset_spec

    if dataset is not None and dataset_spec(dataset).trained_as != card.dataset:
        raise UserError(
            f"checkpoint {path} was trained on {card.dataset!r}, not {dataset!r}: "
            f"use --dataset {card.dataset} or a checkpoint trained on {dataset}"
        )
    if sigma is not None and not math.isclose(sigma, card.sigma, rel_tol=1e-9, abs_tol=1e-12):
        raise UserError(
            f"checkpoint {path} was trained at sigma={card.sigma:g}, not {sigma:g}: "
            f"leave --sigma out (it defaults to the checkpoint's) or give a checkpoint trained at that sigma"
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
