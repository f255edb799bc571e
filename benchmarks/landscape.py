"""The landscape around the paper's point: named settings trained as sweep trials, over seeds, and how well
the proxy at each epoch ranks them.

    .venv/bin/python benchmarks/landscape.py --seeds 0 1 --point paper= --point lbd=0.5 \
        --point mask,lbd=0.5=confidence_mask=true,lbd=0.5 --point lr=0.1

Each `--point NAME=KEY=VALUE,…` (empty: the file's first point) overrides the first point of the search
space (default: the demo's) with searched values, method hyper-parameters or schedule settings (lr,
batch_size, lr_step, …), and is trained exactly as a sweep trial — on `train_minus_val`, with the soft labels
of the first point's schedule and its own σ₀ — reporting the file's proxy on `val` after every epoch. Then it
is certified on `val` and on `test` with the file's final protocol. Runs are Ray tasks, one CPU each.

It prints a row per point (the mean and the per-seed figures of the final val and test ACR, and the test ACR
minus the first point's at the same seeds), then Spearman's ρ between each epoch's proxy and the final val
ACR over all runs: where in the schedule a rung would rank trials as their trained-out figures do.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
import yaml
from scipy.stats import spearmanr

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.context import RunContext
from catrs.distributed.runtime import connect
from catrs.inference import pick_device
from catrs.metrics import average_certified_radius
from catrs.results import read_results
from catrs.sampling import Mode
from catrs.sweep.proxy import evaluation_metrics, proxy_of
from catrs.sweep.space import SearchSpace, find_search_space, load_search_space
from catrs.train import LocalSession, RunFolder, fit, soft_labels_for

DEMO = find_search_space("demo_digits")


def parse_point(text: str) -> tuple[str, dict]:
    """`NAME=KEY=VALUE,KEY=VALUE` (values read as YAML) as (NAME, overrides)."""
    name, _, overrides = text.partition("=")
    point = {}
    for pair in filter(None, overrides.split(",")):
        key, _, value = pair.partition("=")
        point[key] = yaml.safe_load(value)
    return name, point


class EveryEpoch(LocalSession):
    """A local run that keeps each reported epoch's metrics."""

    def __init__(self, out: Path) -> None:
        super().__init__(out, pick_device(None))
        self.reports: list[dict[str, float]] = []

    def report(self, metrics, run, evaluation) -> None:
        super().report(metrics, run, evaluation)
        self.reports.append(metrics)


@ray.remote(num_cpus=1)
def measure(space: SearchSpace, point: dict, folder: Path) -> dict:
    """One run: the proxy after every epoch, then the final protocol on val and on test."""
    torch.set_num_threads(1)
    spec = space.resolve(point)
    context = RunContext.create(cache=folder.parent / "cache", progress=False)
    soft = soft_labels_for(spec, context)
    session = EveryEpoch(folder)
    every_epoch = replace(proxy_of(space, context), epochs=tuple(range(1, spec.config.epochs + 1)))
    fit(spec, session, context, soft, every_epoch)
    figures = {f"proxy@{int(m['epoch'])}": m[space.metric] for m in session.reports}
    settings = CertifySettings(space.final.protocol(), seed=space.seed)
    for split, mode in (("val", Mode.EVALUATE), ("test", Mode.CERTIFY)):
        request = CertifyRequest(
            checkpoint=RunFolder(folder).checkpoint,
            dataset=space.dataset,
            sigma=space.sigma,
            out=folder / f"{split}.parquet",
            settings=settings,
            mode=mode,
            split=split,
        )
        frame = read_results(run_certification(request, context))
        figures[split] = (
            evaluation_metrics(frame, "acr", "")["acr"] if mode is Mode.EVALUATE else average_certified_radius(frame)
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=DEMO)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--point", action="append", default=[], help="NAME=KEY=VALUE,… (repeatable)")
    args = parser.parse_args()
    base = load_search_space(args.space)
    points = dict(map(parse_point, args.point or ["paper="]))
    connect()
    with tempfile.TemporaryDirectory() as folder:
        jobs = {}
        for name, overrides in points.items():
            for seed in args.seeds:
                space = replace(base, seed=seed)
                point = {**space.first_point(), **overrides}
                space.resolve(point)  # a bad override fails here, before any work
                jobs[(name, seed)] = measure.remote(space, point, Path(folder) / f"{name}-{seed}".replace("/", "_"))
        runs = pd.DataFrame([{"point": name, "seed": seed, **ray.get(ref)} for (name, seed), ref in jobs.items()])
    first = runs[runs["point"] == next(iter(points))].set_index("seed")["test"]
    runs["test gain"] = runs["test"] - runs["seed"].map(first)
    table = runs.groupby("point", sort=False).agg(
        val=("val", "mean"),
        test=("test", "mean"),
        gain=("test gain", "mean"),
        tests=("test", lambda t: " ".join(f"{v:.3f}" for v in t)),
    )
    print(
        f"{base.path.name}: final protocol (n = {base.final.n}) on val and test, mean over seeds "
        f"{' '.join(map(str, args.seeds))}; gain: test ACR minus the first point's at the same seeds"
    )
    print(table.to_string(float_format=lambda v: f"{v:+.4f}" if v < 0 else f"{v:.4f}"))
    epochs = sorted((c for c in runs.columns if c.startswith("proxy@")), key=lambda c: int(c.split("@")[1]))
    rho = {c: spearmanr(runs[c], runs["val"])[0] for c in epochs}
    print(
        f"\nSpearman ρ of the proxy (n = {base.proxy.n}, {base.proxy.images} val images) after each epoch against "
        f"the trained-out val ACR, over {len(runs)} runs:"
    )
    print("  " + "  ".join(f"{c.split('@')[1]}: {v:.2f}" for c, v in rho.items() if np.isfinite(v)))


if __name__ == "__main__":
    main()
