"""Images per second of sharded certification (Ray tasks) against single-process certification.

    .venv/bin/python benchmarks/certify_scaling.py [--images 360] [--n 2000]

A digits_cnn (random weights: speed does not depend on them) certifies the embedded digits test split.
On a CPU machine: single-process certification limited to one thread, then `--shards K` with 1 and 2 Ray
tasks (one CPU, so one thread, each); on a GPU machine: one GPU, then all of them. Same images, same noise,
so the outputs are identical (checked); the ratio is the speed-up of sharding. Ray's start-up is excluded;
each task's own start (worker process, model transfer, data loading) is included, as a user would pay it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import torch

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.checkpoint import ModelCard, save_checkpoint
from catrs.distributed.shards import certify_sharded
from catrs.results import read_results
from harness import device_and_models, parse_arguments  # benchmarks/harness.py


def digits_checkpoint(folder: Path) -> Path:
    card = ModelCard(arch="digits_cnn", dataset="digits", num_classes=10, input_shape=(1, 8, 8), normalization=None,
                     sigma=0.5)
    return save_checkpoint(folder / "digits_cnn.pt", card.build_model(), card)


def main() -> None:
    args = parse_arguments(__doc__, {"--images": dict(type=int, default=360), "--n": dict(type=int, default=2000)})
    device, _ = device_and_models(args)
    gpus = torch.cuda.device_count()
    ray.init(num_cpus=2 if device.type == "cpu" else None, log_to_driver=False)
    settings = CertifySettings(n0=100, n=args.n, batch_size=1000, inference="eager")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = digits_checkpoint(folder)
        torch.set_num_threads(1)
        runs = {"single process (1 thread)": lambda out: run_certification(
            CertifyRequest(checkpoint, "digits", 0.5, out, settings, max_index=args.images), progress=False)}
        for workers in ([1, 2] if device.type == "cpu" else sorted({1, gpus})):
            runs[f"--shards {workers}"] = lambda out, k=workers: certify_sharded(
                CertifyRequest(checkpoint, "digits", 0.5, out, settings, max_index=args.images), k, progress=False)
        rates, frames = {}, {}
        for label, run in runs.items():
            out = folder / f"{len(rates)}.parquet"
            began = time.perf_counter()
            run(out)
            rates[label] = args.images / (time.perf_counter() - began)
            frames[label] = read_results(out)[["idx", "predict", "radius"]]
    base = rates["single process (1 thread)"]
    print(f"\ndigits_cnn, {args.images} images, n0=100, n={args.n}, batch 1000")
    print(f"  {'':28}{'images/s':>10}{'÷ single':>10}")
    for label, rate in rates.items():
        pd.testing.assert_frame_equal(frames[label], frames["single process (1 thread)"])
        print(f"  {label:28}{rate:>10.2f}{rate / base:>10.2f}")


if __name__ == "__main__":
    main()
