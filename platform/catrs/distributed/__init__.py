"""The Ray glue, and the only place in catrs that imports `ray`.

- `runtime`: connect to a Ray cluster or start a local instance; what the cluster offers.
- `chunks`: `catrs certify --workers K` and CAT-RS's soft-label votes as a queue of small chunks of images.
- `cache`: one owner per soft-label cache key in the whole cluster (a lease from a named actor).
- `train`: `catrs train --workers K` — the training loop in a Ray Train `TorchTrainer` (DDP); teachers on the
  workers (`cluster_producer`); a run trained in one Ray task.
- `tune`: the Tune side of `catrs tune` — the trial, the tuner with Optuna and ASHA, and the callback that
  tells the sweep (`catrs.sweep`) what happens to its trials.
"""
