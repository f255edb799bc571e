"""The GPU check: what catrs's hot paths do on the GPUs of this machine, in one table (under 8 minutes on one GPU).

    .venv/bin/python benchmarks/gpu_check.py                 (on a machine with CUDA)
    .venv/bin/python benchmarks/gpu_check.py --smoke         (a few seconds on a CPU: checks the script itself)

- Certification: noisy samples per second of `Smooth.sample_counts` (noise drawn on the device, the forward
  pass, the counts kept on the device) for cifar_resnet110 at batches of 1,000 to 8,000 and resnet50 at 256
  and 1,000, in fp32 (TF32 off), TF32, mixed precision (catrs's `--mixed-precision`: fp16 autocast on CUDA),
  bf16 autocast, and `--inference compile` (fp32, at the largest batch; its compilation is timed apart).
- Training: CAT-RS steps per second on cifar_resnet110 (a loader batch of 256, M = 4, T = 4, the released
  per-noise chunking) in fp32 and bf16, with the peak memory.
- DDP: the same CAT-RS step on every visible GPU (NCCL), a few steps, and its throughput against one GPU's.
- Adaptive CERTIFY (with `--checkpoint`, a digits model such as `catrs demo`'s champion): every 3rd digits test
  image evaluated at fixed n = 100,000 and adaptively (n_max = 100,000, tolerances 0.01 and 0.02), n0 = 100,
  α = 0.001, batch 20,000: the wall time, samples and ACR of each, as ratios to fixed n's.

Every figure is a median of `--repeats` timed runs after a warm-up, the device synchronised around each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from catrs.checkpoint import load_checkpoint
from catrs.data import get_dataset
from catrs.models import create_model
from catrs.smoothing import NoiseStream, Smooth
from catrs.train import TrainConfig, TrainingRun, train_step
from trainables.base import Batch, StepContext

SIGMA = 0.5


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a digits model, for the adaptive check")
    return parser.parse_args()


def timed(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median seconds of `work`, after one warm-up run, the device synchronised around each run."""
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work()
    seconds = []
    for _ in range(repeats):
        synchronise()
        began = time.perf_counter()
        work()
        synchronise()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


MODES = {  # name: (TF32, catrs's mixed precision, inference mode, bf16 autocast)
    "fp32": (False, False, "channels_last", False),
    "tf32": (True, False, "channels_last", False),
    "amp fp16": (False, True, "channels_last", False),
    "bf16": (False, False, "channels_last", True),
    "compile": (False, False, "compile", False),
}
CUDA_ONLY = ("tf32", "amp fp16", "compile")  # (compiling would also cost a CPU smoke run minutes)


def counting(model: torch.nn.Module, classes: int, x: torch.Tensor, batch: int, mode: str) -> Callable[[], object]:
    """One forward-pass-sized count of certification's sampling, in `mode`."""
    _, mixed_precision, inference, bf16 = MODES[mode]
    smooth = Smooth(model, classes, SIGMA, mixed_precision=mixed_precision, inference=inference)

    def count() -> None:
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            smooth.sample_counts(x, batch, batch, indices=[0], stream=NoiseStream.ESTIMATION)

    return count


def certification(
    arch: str, shape: tuple[int, ...], batches: list[int], device: torch.device, repeats: int
) -> list[dict]:
    """Samples per second of certification's counting for each batch and numeric mode."""
    classes = 10 if arch.startswith("cifar") else 1000
    model = create_model(arch, classes).to(device).eval()
    x = torch.rand(1, *shape, device=device)
    rows = []
    for batch in batches:
        for mode in MODES:
            if device.type != "cuda" and mode in CUDA_ONLY or mode == "compile" and batch != batches[-1]:
                continue  # compiled once per model, at its largest batch
            with tf32(MODES[mode][0]):
                began = time.perf_counter()
                count = counting(model, classes, x, batch, mode)
                count()  # the first pass: compilation, cuDNN's choice of kernels
                first = time.perf_counter() - began
                seconds = timed(count, device, repeats)
            note = f"first pass {first:.1f} s" if mode == "compile" else ""
            rows.append(
                {
                    "check": f"certify {arch}",
                    "setting": f"{mode}, batch {batch:,}",
                    "per second": batch / seconds,
                    "unit": "samples",
                    "note": note,
                }
            )
    return rows


def catrs_step(
    arch: str, precision: str, device: torch.device, wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
) -> Callable[[], object]:
    """One CAT-RS training step of a loader batch, as `catrs.train` takes it (the model wrapped by `wrap`)."""
    spec = TrainConfig(
        method="catrs", dataset="cifar10", arch=arch, sigma=SIGMA, precision=precision,
        method_config={"num_noises": 4, "num_steps": 4},
    ).resolve()  # fmt: skip
    run = TrainingRun.create(spec, device)
    generator = torch.Generator().manual_seed(0)
    size = spec.config.batch_size
    batch = Batch(
        x=torch.rand(size, 3, 32, 32, generator=generator).to(device),
        y=torch.randint(0, 10, (size,), generator=generator).to(device),
        index=torch.arange(size, device=device),
        soft_labels=torch.softmax(3 * torch.randn(size, 10, generator=generator), dim=1).to(device),
    )
    context = StepContext(sigma=SIGMA, epoch=20, num_classes=10)
    model = wrap(run.model.train())
    return lambda: float(train_step(run, model, context, batch)[-1]["loss"])


def training(arch: str, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for precision in ("fp32", "bf16"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = catrs_step(arch, precision, device)
        seconds = timed(step, device, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append(
            {
                "check": f"train catrs {arch}",
                "setting": f"{precision}, batch 256, M 4, T 4",
                "per second": 1 / seconds,
                "unit": "steps",
                "note": f"peak {peak:.1f} GiB",
            }
        )
    return rows


def _ddp_worker(rank: int, world: int, arch: str, steps: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    step = catrs_step(arch, "fp32", device, lambda model: torch.nn.parallel.DistributedDataParallel(model, [rank]))
    seconds = timed(step, device, steps)
    if rank == 0:
        queue.put(seconds)
    dist.destroy_process_group()


def ddp(arch: str, single_seconds: float, steps: int) -> list[dict]:
    world = torch.cuda.device_count()
    if world < 2:
        return [
            {"check": "ddp", "setting": "one GPU visible", "per second": float("nan"), "unit": "", "note": "skipped"}
        ]
    queue = mp.get_context("spawn").Queue()
    mp.spawn(_ddp_worker, args=(world, arch, steps, queue), nprocs=world, join=True)
    seconds = queue.get()
    speedup = world * single_seconds / seconds
    return [
        {
            "check": f"ddp catrs {arch}",
            "setting": f"{world} GPUs, batch 256 each",
            "per second": world / seconds,
            "unit": "steps",
            "note": f"{speedup:.2f}× one GPU's throughput",
        }
    ]


def adaptive(checkpoint: Path, device: torch.device, n_max: int, batch: int) -> list[dict]:
    """Adaptive CERTIFY against fixed n on a real digits model: wall time, samples and ACR, as ratios."""
    stored = load_checkpoint(checkpoint)
    smooth = Smooth(stored.model(device), stored.card.num_classes, stored.card.sigma)
    test = get_dataset(stored.card.dataset, "test")
    positions = list(range(0, len(test), 3))
    xs = torch.stack([test[i][1] for i in positions]).to(device)
    labels = [test[i][2] for i in positions]
    n0, alpha = 100, 0.001

    def fixed() -> tuple[float, float]:
        rows = smooth.evaluate_batch(xs, labels, n0, n_max, alpha, batch, indices=positions)
        samples = sum(n0 + n_max * estimated for _, _, estimated in rows)
        return float(np.mean([r if c == y else 0.0 for (c, r, _), y in zip(rows, labels, strict=True)])), samples

    def adaptively(tolerance: float) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            rows = smooth.certify_adaptive_batch(
                xs, n0, n_max, alpha, batch, tolerance=tolerance, indices=positions, labels=labels
            )
            samples = sum(row.pilot + row.estimation for row in rows)
            radii = [row.radius if row.prediction == y else 0.0 for row, y in zip(rows, labels, strict=True)]
            return float(np.mean(radii)), samples

        return run

    outcomes = {}
    for name, work in [("fixed n", fixed), ("adaptive 0.01", adaptively(0.01)), ("adaptive 0.02", adaptively(0.02))]:
        outcomes[name] = (timed(work, device, 1), *work())
    base_seconds, base_acr, base_samples = outcomes["fixed n"]
    return [
        {
            "check": f"certify {stored.card.arch} digits ({len(positions)} images)",
            "setting": f"{name}, n(_max) {n_max:,}",
            "per second": samples / seconds,
            "unit": "samples",
            "note": f"wall {seconds / base_seconds:.3f}×, samples {samples / base_samples:.3f}×, "
            f"ACR {acr:.3f} ({acr / base_acr:.3f}×)",
        }
        for name, (seconds, acr, samples) in outcomes.items()
    ]


def printed(rows: list[dict]) -> list[dict]:
    """Prints `rows` as they come (a check cut short keeps what it measured), and returns them."""
    for row in rows:
        print(f"| {row['check']} | {row['setting']} | {row['per second']:,.1f} {row['unit']} | {row['note']} |")
    return rows


def main() -> None:
    args = arguments()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name} ×{max(1, torch.cuda.device_count())}, torch {torch.__version__}")
    print("| check | setting | per second | note |\n|---|---|---|---|")
    began = time.perf_counter()
    smoke = args.smoke
    if args.checkpoint:
        printed(adaptive(args.checkpoint, device, 2_000 if smoke else 100_000, 2_000 if smoke else 20_000))
    if smoke:
        printed(certification("cifar_resnet20", (3, 32, 32), [200], device, 1))
        printed(certification("resnet50", (3, 64, 64), [8], device, 1))
        printed(training("cifar_resnet20", device, 1))
    else:
        printed(certification("cifar_resnet110", (3, 32, 32), [1000, 2000, 4000, 8000], device, args.repeats))
        printed(certification("resnet50", (3, 224, 224), [256, 1000], device, args.repeats))
        trained = printed(training("cifar_resnet110", device, args.repeats))
        printed(ddp("cifar_resnet110", 1 / trained[0]["per second"], max(3, args.repeats)))
    print(f"\n(the check took {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
