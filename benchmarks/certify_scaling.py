"""Images per second of certification as a queue of chunks on Ray workers, against a single process.

    .venv/bin/python benchmarks/certify_scaling.py [--images 360] [--n 2000] [--chunk-size C] [--repeats 3]

A digits_cnn (random weights: speed does not depend on them) certifies the embedded digits test split.
On a CPU machine: single-process certification limited to one thread, then `--workers 1` and `--workers 2`
(one CPU, so one thread, each), then `--workers 2` with one worker slowed 3× by fault injection (a
straggler: `catrs.faults.straggle`), whose makespan is compared with the ideal one — all images at the
combined speed of one full-speed and one third-speed worker, as measured by `--workers 1`. On a GPU machine
the same with one GPU per worker (1, then all of them). Same images, same noise, so every output is the
same table (checked). The configurations run in turn, `--repeats` rounds, and each reports its median time
(the machine is shared: a slow moment then costs one sample, not a ratio). Ray's start-up is excluded; each
worker's own start (process, model transfer, data loading) is included, as a user would pay it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import torch

from catrs.certify import CertifyRequest, CertifySettings, inputs_per_pass, run_certification
from catrs.checkpoint import ModelCard, save_checkpoint
from catrs.context import RunContext
from catrs.distributed.chunks import certify_distributed, plan_chunks
from catrs.results import read_results
from catrs.sampling import SamplingProtocol
from harness import device_and_models, parse_arguments  # benchmarks/harness.py

SLOWDOWN = 3.0
SINGLE = "single process (1 thread)"


def digits_checkpoint(folder: Path) -> Path:
    card = ModelCard(
        arch="digits_cnn", dataset="digits", num_classes=10, input_shape=(1, 8, 8), normalization=None, sigma=0.5
    )
    return save_checkpoint(folder / "digits_cnn.pt", card.build_model(), card)


def main() -> None:
    args = parse_arguments(
        __doc__,
        {
            "--images": dict(type=int, default=360),
            "--n": dict(type=int, default=2000),
            "--chunk-size": dict(type=int, default=None),
        },
    )
    device, _ = device_and_models(args)
    counts = [1, 2] if device.type == "cpu" else sorted({1, torch.cuda.device_count()})
    faults = Path(tempfile.mkdtemp(prefix="catrs-faults-"))
    os.environ["CATRS_FAULTS_DIR"] = str(faults)  # before Ray starts, so its workers see it
    ray.init(num_cpus=max(counts) if device.type == "cpu" else None, log_to_driver=False)
    settings = CertifySettings(SamplingProtocol(n0=100, n=args.n, batch=1000), inference="eager")
    context = RunContext.create(device=str(device), progress=False)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = digits_checkpoint(folder)

        def request(out: Path, images: int = args.images) -> CertifyRequest:
            return CertifyRequest(checkpoint, "digits", 0.5, out, settings, max_index=images)

        torch.set_num_threads(1)
        run_certification(request(folder / "warm-up.parquet", 20), context)  # this process's one-time costs
        runs = {SINGLE: lambda out: run_certification(request(out), context)}
        for workers in counts:
            runs[f"--workers {workers}"] = lambda out, k=workers: certify_distributed(
                request(out), context, k, args.chunk_size
            )
        straggler = f"--workers {max(counts)}, one {SLOWDOWN:g}× slower"

        def slowed(out: Path) -> None:
            (faults / "armed").write_text(f"slow certify.chunk {SLOWDOWN}\n")
            try:
                certify_distributed(request(out), context, max(counts), args.chunk_size)
            finally:  # the next runs at full speed, whichever process was slowed
                for marker in faults.iterdir():
                    marker.unlink()

        runs[straggler] = slowed
        samples: dict[str, list[float]] = {label: [] for label in runs}
        frames = {}
        for repeat in range(args.repeats):
            for number, (label, run) in enumerate(runs.items()):
                out = folder / f"{repeat}-{number}.parquet"  # a new file: an existing one would be resumed
                began = time.perf_counter()
                run(out)
                samples[label].append(time.perf_counter() - began)
                frames[label] = read_results(out)[["idx", "predict", "radius"]]
    seconds = {label: statistics.median(times) for label, times in samples.items()}
    workers = max(counts)  # the straggler run's
    speeds = workers - 1 + 1 / SLOWDOWN  # the workers' speeds summed, in units of one full-speed worker's
    ideal = {"busy": seconds[f"--workers {workers}"] * workers / speeds, "alone": seconds["--workers 1"] / speeds}
    per_pass = inputs_per_pass(settings.protocol, "certify")
    chunk = len(plan_chunks(list(range(args.images)), workers, per_pass, args.chunk_size)[0])
    print(
        f"\ndigits_cnn, {args.images} images, n0=100, n={args.n}, batch 1000, chunks of {chunk} images "
        f"with {workers} workers; medians of {args.repeats} rounds"
    )
    print(f"  {'':36}{'images/s':>10}{'÷ single':>10}")
    for label, took in seconds.items():
        pd.testing.assert_frame_equal(frames[label], frames[SINGLE])
        rate = args.images / took
        print(f"  {label:36}{rate:>10.2f}{rate / (args.images / seconds[SINGLE]):>10.2f}")
    print(
        f"  straggler makespan {seconds[straggler]:.1f} s; the ideal (all images at the speed of {workers - 1} full "
        f"and one 1/{SLOWDOWN:g}-speed worker), with a worker as fast as beside another / alone: "
        f"{ideal['busy']:.1f} / {ideal['alone']:.1f} s; makespan ÷ ideal: "
        f"{seconds[straggler] / ideal['busy']:.2f} / {seconds[straggler] / ideal['alone']:.2f}"
    )


if __name__ == "__main__":
    main()
