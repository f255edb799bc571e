"""A chosen model in MLflow's Model Registry, and `models:/NAME@ALIAS` found again as a catrs checkpoint.

    catrs tune demo_digits                          (registers the sweep's choice as NAME@champion)
    catrs certify --checkpoint models:/NAME@champion --dataset digits --sigma 0.5 --out cert.parquet

The model is logged on a run as an MLflow PyTorch model: the base classifier exported with torch.export
(MLflow's `pt2` format, which loads without unpickling code) with its signature and an input example, and
the catrs checkpoint beside it as an extra file. It is registered under a name with an alias, and the
checkpoint's card — σ, data set, architecture, method and its hyper-parameters — is set as tags of the
version. `catrs certify` resolves `models:/…` to that checkpoint (downloaded once into the cache) and loads
it with weights_only=True like any other, so a registered model certifies to the same rows as its file.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from catrs.checkpoint import ModelCard, load_checkpoint
from catrs.errors import UserError
from catrs.tracking import Tracker, flatten, quiet_mlflow, sqlite_file

ALIAS = "champion"
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
    return tags


@contextlib.contextmanager
def _active_run(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` and resumed in `run_id` for the block (it logs models only so)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_checkpoint_model(
    tracker: Tracker, run_id: str, checkpoint: Path, example: torch.Tensor, registered_name: str | None = None
) -> Any:
    """Logs `checkpoint` on `run_id` as an MLflow PyTorch model (signature and input example from `example`,
    the checkpoint as an extra file), registered as `registered_name` if given; MLflow's model info."""
    import mlflow

    with _active_run(tracker.uri, run_id):
        return mlflow.pytorch.log_model(
            load_checkpoint(checkpoint).model(),
            name="model",
            input_example=example.numpy(),
            extra_files=[str(checkpoint)],
            registered_model_name=registered_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


def register_checkpoint(
    tracker: Tracker, run_id: str, name: str, checkpoint: Path, example: torch.Tensor, alias: str = ALIAS
) -> str | None:
    """Logs `checkpoint` on `run_id` as an MLflow PyTorch model, registers it as `name`, points `alias` at the
    new version and tags it with the model card; returns the version. A store that cannot take it only
    costs the registration: the checkpoint itself stays where it is, and a message says so."""
    try:
        version = str(log_checkpoint_model(tracker, run_id, checkpoint, example, name).registered_model_version)
        for key, value in card_tags(load_checkpoint(checkpoint).card).items():
            tracker.client.set_model_version_tag(name, version, key, value)
        tracker.client.set_registered_model_alias(name, alias, version)
        return version
    except Exception as error:  # MLflow raises many kinds for a store that cannot register models
        print(
            f"catrs: MLflow did not register {name} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"the checkpoint is {checkpoint}",
            file=sys.stderr,
        )
        return None


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
