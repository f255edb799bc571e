"""The Ray glue, and the only place in catrs that imports `ray`.

- `runtime`: connect to a Ray cluster or start a local instance.
- `train`: `catrs train --workers K` — the training loop in a Ray Train `TorchTrainer` (DDP).
- `chunks`: `catrs certify --workers K` and CAT-RS's soft-label votes as a queue of small chunks of images.
- `sweep`: `catrs tune FILE` — Ray Tune with Optuna and ASHA over a search space, logged to MLflow.
"""
