"""A chosen model in MLflow's Model Registry, and `models:/NAME@ALIAS` found again as a catrs checkpoint.

    catrs tune demo_digits          (the choice becomes a version of demo_digits: @champion or @challenger)
    catrs certify --checkpoint models:/NAME@champion --dataset digits --sigma 0.5 --out cert.parquet

The model is logged on a run as an MLflow PyTorch model: the base classifier exported with torch.export
(MLflow's `pt2` format, which loads without unpickling code) with its signature and an input example, and
the catrs checkpoint beside it as an extra file. Every sweep of a search space adds a version to the one
registered model named after the space; the checkpoint's card — σ, data set, architecture, method and its
hyper-parameters — and the sweep's standing — its sweep, selection protocol and validation figure — are
tags of the version, and `champion` moves to it only if it beats the current champion on val under the same
protocol (else it is `challenger`), so `models:/NAME@champion` is stable across sweeps. `catrs certify`
resolves `models:/…` to that checkpoint (downloaded once into the cache) and loads it with weights_only=True
like any other, so a registered model certifies to the same rows as its file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catrs.checkpoint import ModelCard, load_checkpoint
from catrs.errors import UserError
from catrs.tracking import Tracker, flatten, quiet_mlflow, sqlite_file

ALIAS = "champion"
CHALLENGER = "challenger"
SCHEME = "models:/"
CHECKPOINT_FILE = "checkpoint.pt"
EXTRA_FILES = "extra_files"  # where MLflow keeps a logged model's extra files


def card_tags(card: ModelCard) -> dict[str, str]:
    """The model card as registry tags: what the model certifies at and how it was trained."""
    tags = {
        "sigma": f"{card.sigma:g}",
        "dataset": card.dataset,
        "arch": card.arch,
        "method": card.method,
        "num_classes": str(card.num_classes),
    }
    tags.update(flatten(card.config.get("method_config", {}), "hyper."))
    tags.update(
        {
            f"train.{k}": str(card.config[k])
            for k in ("epochs", "batch_size", "lr", "lr_step", "seed", "train_split")
            if k in card.config
        }
    )
    # A population member's settings changed mid-run (`hyper.*` are those it started from), and a sweep's
    # teacher may have trained on another schedule: with these the version retrains to the same weights.
    tags.update(
        {f"train.{k}": json.dumps(card.config[k]) for k in ("schedule", "teacher_training") if card.config.get(k)}
    )
    return tags


@contextlib.contextmanager
def _tracking_at(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI at `uri` for the block (models are logged, and `models:/` sources of new
    versions resolved, through it)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _active_run(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` and resumed in `run_id` for the block (it logs models only so)."""
    import mlflow

    with _tracking_at(uri), mlflow.start_run(run_id=run_id):
        yield


def log_checkpoint_model(tracker: Tracker, run_id: str, checkpoint: Path, example: torch.Tensor) -> Any:
    """Logs `checkpoint` on `run_id` as an MLflow PyTorch model (signature and input example from `example`,
    the checkpoint as an extra file); MLflow's model info."""
    import mlflow

    with _active_run(tracker.uri, run_id):
        return mlflow.pytorch.log_model(
            load_checkpoint(checkpoint).model(),
            name="model",
            input_example=example.numpy(),
            extra_files=[str(checkpoint)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


@dataclass(frozen=True)
class Standing:
    """How a sweep's choice compares with other versions of its registered model: its figure on val (`figure`,
    the objective `metric`) under a selection protocol (`protocol`: what was certified, how, on which val
    split), and the sweep that chose it."""

    metric: str
    figure: float
    protocol: str
    sweep: str

    def tags(self) -> dict[str, str]:
        return {
            "catrs.sweep": self.sweep,
            "catrs.selection": self.protocol,
            "catrs.val_metric": self.metric,
            "catrs.val_figure": repr(self.figure),
        }


@dataclass(frozen=True)
class Registration:
    version: str
    alias: str  # champion or challenger
    reason: str  # why, in words


def register_checkpoint(
    tracker: Tracker, run_id: str, name: str, checkpoint: Path, example: torch.Tensor, standing: Standing
) -> Registration | None:
    """Logs `checkpoint` on `run_id` as an MLflow PyTorch model, registers it as a new version of `name`
    tagged with the model card and `standing`, and points `champion` at it if it beats the current champion
    on val under the same selection protocol (or there is none), else `challenger`. A test figure never
    decides. A store that cannot take it only costs the registration: the checkpoint stays where it is, and a
    message says so."""
    try:
        alias, reason = _alias_for(tracker, name, standing)
        info = log_checkpoint_model(tracker, run_id, checkpoint, example)
        _ensure_registered(tracker, name)
        # Through the client, not `registered_model_name`: MLflow's fluent path prints its own lines.
        with _tracking_at(tracker.uri):
            created = tracker.client.create_model_version(name, info.model_uri, run_id, model_id=info.model_id)
        version = str(created.version)
        for key, value in {**card_tags(load_checkpoint(checkpoint).card), **standing.tags()}.items():
            tracker.client.set_model_version_tag(name, version, key, value)
        tracker.client.set_registered_model_alias(name, alias, version)
        return Registration(version, alias, reason)
    except Exception as error:  # MLflow raises many kinds for a store that cannot register models
        print(
            f"catrs: MLflow did not register {name} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"the checkpoint is {checkpoint}",
            file=sys.stderr,
        )
        return None


def _ensure_registered(tracker: Tracker, name: str) -> None:
    """The registered model `name`, created if it does not exist (another sweep may create it meanwhile)."""
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):
            tracker.client.create_registered_model(name)


def _alias_for(tracker: Tracker, name: str, standing: Standing) -> tuple[str, str]:
    """`champion` for a version that beats the current champion on val under the same protocol, or where
    there is none; else `challenger`; and why."""
    try:
        current = tracker.client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # no such model or alias yet
        return ALIAS, "the first version of this search space"
    tags = current.tags
    if tags.get("catrs.selection") != standing.protocol or tags.get("catrs.val_metric") != standing.metric:
        return CHALLENGER, f"version {current.version} is champion under another selection protocol"
    theirs = float(tags.get("catrs.val_figure", "-inf"))
    if standing.figure > theirs:
        return ALIAS, f"beats version {current.version} on val ({standing.figure:.4f} > {theirs:.4f})"
    return CHALLENGER, f"version {current.version} stays champion on val ({theirs:.4f} ≥ {standing.figure:.4f})"


def is_model_uri(text: str) -> bool:
    return str(text).startswith(SCHEME)


def checkpoint_of(uri: str, tracking_uri: str, cache_dir: Path) -> Path:
    """The catrs checkpoint of the registered model `models:/NAME@ALIAS` or `models:/NAME/VERSION`, downloaded
    once into `cache_dir` (keyed by store, name and version)."""
    import mlflow

    quiet_mlflow()
    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        raise UserError(
            f"no MLflow store at {tracking_uri}, so no registered model {uri}; give the --tracking-uri used"
        )
    name, version = _version_of(uri, tracking_uri)
    key = hashlib.sha256(f"{tracking_uri}|{name}|{version}".encode()).hexdigest()[:16]
    folder = cache_dir / "models" / key
    path = folder / EXTRA_FILES / CHECKPOINT_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{SCHEME}{name}/{version}", dst_path=str(folder), tracking_uri=tracking_uri
        )
    if not path.is_file():
        raise UserError(
            f"{uri} holds no catrs checkpoint ({EXTRA_FILES}/{CHECKPOINT_FILE}); register models with "
            f"catrs, or pass the checkpoint file"
        )
    return path


def _version_of(uri: str, tracking_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION` in the registry at `tracking_uri`."""
    from mlflow.tracking import MlflowClient

    reference = uri[len(SCHEME) :]
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, version = reference.rsplit("/", 1)
        return name, str(client.get_model_version(name, version).version)
    except Exception:  # an unknown name, alias or version, or a store without a registry
        raise UserError(
            f"no registered model {uri} in the MLflow store {tracking_uri}; give models:/NAME@ALIAS or "
            f"models:/NAME/VERSION of a registered model"
        ) from None
