"""Noisy samples per second of certification, against the bare model and a plain loop, side by side.

    .venv/bin/python benchmarks/certify_throughput.py [--models lenet cifar_resnet20] [--repeats 3]

For each model: (a) the bare eager forward at the batch size used, (b) `Smooth.certify` on one input and
`Smooth.certify_batch` on several, in each inference mode, (c) a plain per-input loop that reads every batch's
predictions back to the host (Cohen et al.'s `core.py` pattern), eager. Prints b/a and b/c. Runs alternate
between the contenders and report medians, because this machine is shared and noisy: read the ratios, not
the absolute numbers. Every inference mode's logits are first checked against the eager model's.
"""

from __future__ import annotations

import statistics
import time

import torch

from catrs.inference import INFERENCE_MODES, prepare_for_inference
from catrs.models import create_model
from catrs.smoothing import Smooth
from harness import device_and_models, parse_arguments  # benchmarks/harness.py

SHAPES = {"digits_cnn": (1, 8, 8), "lenet": (1, 28, 28), "cifar_resnet20": (3, 32, 32), "cifar_resnet110": (3, 32, 32)}
CPU_BATCH = {"digits_cnn": 1000, "lenet": 1000, "cifar_resnet20": 400, "cifar_resnet110": 200}
GPU_BATCH = {"digits_cnn": 10_000, "lenet": 10_000, "cifar_resnet20": 4000, "cifar_resnet110": 1000}
SIGMA, ALPHA, N0 = 0.5, 0.001, 100


def plain_loop_counts(model, x, num, batch_size, num_classes):
    """The baseline: Cohen's sample_noise, one host read per batch."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            size = min(batch_size, remaining)
            batch = x.repeat(size, 1, 1, 1)
            predictions = model(batch + SIGMA * torch.randn_like(batch)).argmax(1)
            counts += torch.bincount(predictions.cpu(), minlength=num_classes)
            remaining -= size
    return counts


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began


def check_logits(model, mode, x) -> None:
    fast = prepare_for_inference(model, mode)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def bench_model(name: str, device: torch.device, repeats: int, group: int) -> list[tuple[str, float]]:
    model = create_model(name, 10).to(device).eval()
    batch_size = (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[name]
    n = 10 * batch_size - N0 % batch_size  # n0 + n = 10 full batches for one input
    x = torch.rand(*SHAPES[name], device=device)
    xs = torch.rand(group, *SHAPES[name], device=device)
    probe = torch.rand(batch_size, *SHAPES[name], device=device)

    contenders = {
        "(a) bare eager forward": (lambda: [model(probe) for _ in range(10)], 10 * batch_size),
        "(c) plain per-input loop": (lambda: plain_loop_counts(model, x, N0 + n, batch_size, 10), N0 + n),
    }
    for mode in INFERENCE_MODES:
        check_logits(model, mode, probe)
        smooth = Smooth(model, 10, SIGMA, inference=mode)
        began = time.perf_counter()
        smooth.certify(x, N0, n, ALPHA, batch_size, index=0)  # warm-up (compiles)
        print(f"  {name} {mode}: warm-up {time.perf_counter() - began:.1f}s", flush=True)
        contenders[f"(b) certify, {mode}"] = (lambda s=smooth: s.certify(x, N0, n, ALPHA, batch_size, index=0), N0 + n)
        contenders[f"(b) certify_batch×{group}, {mode}"] = (
            lambda s=smooth: s.certify_batch(xs, N0, n // group, ALPHA, batch_size, indices=range(group)),
            group * (N0 + n // group),
        )

    seconds: dict[str, list[float]] = {label: [] for label in contenders}
    with torch.inference_mode():
        for _ in range(repeats):
            for label, (run, _) in contenders.items():
                seconds[label].append(timed(run))
    return [(label, samples / statistics.median(seconds[label])) for label, (_, samples) in contenders.items()]


def main() -> None:
    args = parse_arguments(__doc__, {"--group": dict(type=int, default=10, help="inputs per certify_batch call")})
    device, models = device_and_models(args)
    for name in models:
        rows = bench_model(name, device, args.repeats, args.group)
        bare = dict(rows)["(a) bare eager forward"]
        plain = dict(rows)["(c) plain per-input loop"]
        print(f"\n{name} (batch {(GPU_BATCH if device.type == 'cuda' else CPU_BATCH)[name]})")
        print(f"  {'':38}{'samples/s':>12}{'÷ (a)':>8}{'÷ (c)':>8}")
        for label, rate in rows:
            print(f"  {label:38}{rate:>12,.0f}{rate / bare:>8.2f}{rate / plain:>8.2f}")


if __name__ == "__main__":
    main()
