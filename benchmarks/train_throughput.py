"""Samples per second of one training step for every method, and each method's cost relative to Gaussian.

    .venv/bin/python benchmarks/train_throughput.py [--models lenet cifar_resnet20] [--repeats 3]

A step is one loader batch (the method's default size: 256, MACER 64) through `catrs.train.train_step`:
the released per-noise chunking, one optimizer step per chunk, the paper's CIFAR-10 σ = 0.5 settings.
Methods run interleaved and medians are reported (the machine is shared and noisy). The published column is
the seconds per CIFAR-10 epoch of the released code relative to Gaussian's (docs/methods.md, "Known costs").
"""

from __future__ import annotations

import statistics
import time

import torch

import trainables
from catrs.train import TrainConfig, TrainingRun, train_step
from harness import device_and_models, parse_arguments  # benchmarks/harness.py
from trainables.base import Batch, StepContext

SHAPES = {"lenet": (1, 28, 28), "cifar_resnet20": (3, 32, 32), "cifar_resnet110": (3, 32, 32)}
PUBLISHED_SECONDS = {
    "gaussian": (22, 22),
    "stability": (40, 40),
    "consistency": (43, 43),
    "smoothmix": (185, 185),
    "macer": (303, 303),
    "catrs": (355, 355),
    "smoothadv": (579, 1157),
}
SIGMA = 0.5


DATASETS = {"lenet": "mnist", "cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10"}


def step_seconds(name: str, model_name: str, device: torch.device) -> callable:
    spec = TrainConfig(method=name, dataset=DATASETS[model_name], arch=model_name, sigma=SIGMA, lr=0.01).resolve()
    training = TrainingRun.create(spec, device)
    model = training.model.train()
    size = spec.method.default_batch_size
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (size,), generator=generator)
    soft = torch.softmax(3 * torch.randn(size, 10, generator=generator), dim=1)
    batch = Batch(
        x=torch.rand(size, *SHAPES[model_name], generator=generator).to(device),
        y=y.to(device),
        index=torch.arange(size, device=device),
        soft_labels=soft.to(device),
    )
    context = StepContext(sigma=SIGMA, epoch=20, num_classes=10)  # past every warm-up

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        logged = train_step(training, model, context, batch)
        float(logged[-1]["loss"])  # wait for the step to finish
        return time.perf_counter() - began

    run()  # warm-up
    return run, size


def main() -> None:
    args = parse_arguments(__doc__)
    device, models = device_and_models(args)
    for model_name in models:
        runners = {name: step_seconds(name, model_name, device) for name in trainables.names()}
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, (run, _) in runners.items():
                seconds[name].append(run())
        rate = {name: runners[name][1] / statistics.median(seconds[name]) for name in runners}
        print(f"\n{model_name}")
        print(f"  {'method':12}{'batch':>7}{'samples/s':>12}{'cost ÷ gaussian':>17}{'published':>14}")
        for name in sorted(rate, key=lambda n: -rate[n]):
            low, high = (v / PUBLISHED_SECONDS["gaussian"][0] for v in PUBLISHED_SECONDS[name])
            published = f"{low:.1f}" if low == high else f"{low:.1f}–{high:.1f}"
            print(
                f"  {name:12}{runners[name][1]:>7}{rate[name]:>12,.0f}{rate['gaussian'] / rate[name]:>17.1f}"
                f"{published:>14}"
            )


if __name__ == "__main__":
    main()
