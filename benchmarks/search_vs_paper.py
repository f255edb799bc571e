"""Does the sweep earn its keep? Each budget's choice against the paper's point, on test, over sweep seeds.

    .venv/bin/python benchmarks/search_vs_paper.py --variants tpe10 pbt4 pbt6 pb2-4 pb2-6 [--seeds 0 1 2]
    .venv/bin/python benchmarks/search_vs_paper.py [--space FILE] [--test-n 10000]   (the file's own budget)
    .venv/bin/python benchmarks/search_vs_paper.py --small --variants file pbt2     (a tiny space, for the tests)

For each seed, the search space (default: the demo's, CAT-RS on digits at σ = 0.5) is swept as `catrs tune`
sweeps it, seeded by that seed, under each budget of `--variants`: `file` (the file's own), `tpeN` (N trials
trained out, two at a time: what the demo did before populations), `pbtN` / `pb2-N` (a population of N, all at
once, judged together every quarter of the epochs). The seed's teachers are trained before any sweep is
timed. Then, apart from the sweep:

- every trial is trained to its end as it trained, in Ray tasks (a trial ASHA stopped is completed; a
  trained-out one or a population member — from the `replay.yaml` on its MLflow run — is reproduced: training
  is deterministic on a CPU), and certified on `val` with the file's final protocol;
- the paper's point — the file's first point, trained by `catrs train --config FILE` in a process of its own,
  as the sweep trains its choice — and each sweep's choice are certified on `test` with n = `--test-n`.

It prints a row per budget and seed, then the means ± std per budget: the test ACR of the choice and its gain
over the paper's point; the selection regret (the best final val ACR among the trials minus the chosen one's);
Spearman's ρ between the proxy at each rung (an epoch, or a budgeted fraction of the steps) and the trials'
final val ACR; the training-run equivalents its ledger counted, the configurations it tried (a population
member's copies count each) and the sweep's wall time over the paper's training process (`sweep÷train`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import yaml
from scipy.stats import spearmanr

from catrs.certify import CertifyRequest, CertifySettings, run_certification
from catrs.context import RunContext
from catrs.distributed.chunks import certify_distributed
from catrs.distributed.runtime import connect
from catrs.metrics import average_certified_radius
from catrs.results import read_results
from catrs.sweep.proxy import evaluation_metrics, proxy_name
from catrs.sweep.run import SweepOptions, run_sweep
from catrs.sweep.selection import trained_out_val_request
from catrs.sweep.space import Budget, SearchSpace, find_search_space, load_search_space, moving_keys
from catrs.sweep.story import EXPLOIT_TAG
from catrs.tracking import Tracker
from catrs.train import RunSpec, TrainConfig, soft_labels_for, train

DEMO = find_search_space("demo_digits")
SMALL = {  # generated data, two epochs, three trials: the benchmark's whole path in about a minute
    "name": "small",
    "method": "catrs",
    "dataset": "synthetic",
    "sigma": 0.25,
    "seed": 0,
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "lr_step": 1},
    "fixed": {"num_steps": 1, "teacher_noises": 16, "num_noises": 2, "epsilon": 0.5, "sigma0": 0.25},
    "search": {"lbd": {"loguniform": [0.25, 4.0]}},
    "points_to_evaluate": [{"lbd": 1.0}],
    "objective": "acr",
    "proxy": {"n0": 8, "n": 32, "images": 32, "batch": 512},
    "selection": {"top_k": 2, "images": 64},
    "final": {"n0": 8, "n": 64, "batch": 512, "workers": 1},
    "budget": {"num_samples": 3, "max_concurrent": 2, "scheduler": "asha", "first_rung": 1},
}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=DEMO, help="the search space (default: the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-n", type=int, default=10_000, help="estimation samples of the test certifications")
    parser.add_argument("--small", action="store_true", help="a tiny space on generated data, one seed")
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["file"],
        help="budgets to compare on the same space and seeds: file (the space's own), tpeN, pbtN, pb2-N",
    )
    return parser.parse_args(argv)


def trial_histories(tracker: Tracker, parent: str, metric: str) -> pd.DataFrame:
    """A row per trial of the sweep: its searched values (params) and its proxy at each reported epoch."""
    rows = []
    for child in tracker.children(parent):
        history = {int(m.step): m.value for m in tracker.client.get_metric_history(child.info.run_id, metric)}
        rows.append(
            {
                "trial": child.data.tags["catrs.trial_id"],
                "run_id": child.info.run_id,
                "copies": sum(k.startswith(EXPLOIT_TAG) for k in child.data.tags),
                "params": dict(child.data.params),
                **{f"proxy@{epoch}": value for epoch, value in history.items()},
            }
        )
    return pd.DataFrame(rows)


def proxy_steps(space: SearchSpace) -> dict[str, int]:
    """Where a trial's proxy was reported, by name: at each epoch rung and the last epoch, or at the end of each
    budgeted rung (its trial's metrics count steps on over the climb: rung k ends at step (k + 1) · epochs)."""
    if ladder := space.budget.ladder():
        return {f"{Fraction(r.fraction).limit_denominator(1000)}": (r.index + 1) * space.epochs for r in ladder}
    return {str(epoch): epoch for epoch in [*space.budget.rungs(space.epochs), space.epochs]}


def typed_point(space: SearchSpace, params: dict[str, str]) -> dict:
    """A trial's searched values from MLflow's strings, typed as the space's ranges."""
    point = {}
    for key, domain in space.search.items():
        value = yaml.safe_load(params[key])
        point[key] = int(value) if domain.kind == "int" else value
    return point


def trained_out(space: SearchSpace, tracker: Tracker, trial: pd.Series) -> RunSpec:
    """A trial's run trained to its end as it trained: its point, or a population member's schedule (the
    `replay.yaml` on its MLflow run; so the weights are the member's own, not only its settings')."""
    if not space.budget.population:
        return space.resolve(typed_point(space, trial["params"]))
    with tempfile.TemporaryDirectory() as folder:
        replay = tracker.client.download_artifacts(trial["run_id"], "schedule/replay.yaml", folder)
        return TrainConfig(**yaml.safe_load(Path(replay).read_text())).resolve()


@ray.remote(num_cpus=1)
def final_val_acr(space: SearchSpace, spec: RunSpec, folder: Path, context: RunContext) -> float:
    """The run `spec` trained to its end, then its ACR on val with the final protocol."""
    checkpoint = train(spec, folder, context)
    request = trained_out_val_request(space, checkpoint, folder / "val.parquet")
    return evaluation_metrics(read_results(run_certification(request, context)), "acr", "")["acr"]


def test_acr(space: SearchSpace, checkpoint: Path, out: Path, n: int, context: RunContext) -> float:
    settings = CertifySettings(replace(space.final.protocol(), n=n), seed=space.seed)
    request = CertifyRequest(
        checkpoint=checkpoint,
        dataset=space.dataset,
        sigma=space.sigma,
        out=out,
        settings=settings,
        skip=space.final.skip,
        max_index=space.final.max,
    )
    return average_certified_radius(read_results(certify_distributed(request, context, space.final.workers)))


def paper_point(space: SearchSpace, path: Path, folder: Path, test_n: int, context: RunContext) -> dict:
    """(a) The paper's point: `catrs train --config FILE` in a process of its own (timed: what one training run
    costs a user), then certified on test."""
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "catrs.cli", "train", "--config", str(path), "--out", str(folder / "paper")],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "CATRS_CACHE": context.cache},
    )
    train_seconds = time.perf_counter() - began
    paper = folder / "paper" / "checkpoint.pt"
    return {"paper": test_acr(space, paper, folder / "paper_test.parquet", test_n, context), "train_s": train_seconds}


def one_sweep(space: SearchSpace, folder: Path, test_n: int, context: RunContext) -> dict:
    """The sweep of `space` and everything measured around it (see the module docstring)."""
    began = time.perf_counter()
    outcome = run_sweep(space, SweepOptions(local_dir=folder / "sweeps"), context)
    sweep_seconds = time.perf_counter() - began
    tracker = Tracker()
    trials = trial_histories(tracker, outcome.parent_run_id, proxy_name(space.metric))
    finals = ray.get(
        [
            final_val_acr.remote(
                space, trained_out(space, tracker, trial), folder / "trained_out" / trial["trial"], context
            )
            for _, trial in trials.iterrows()
        ]
    )
    trials["final_val_acr"] = finals
    rho = {}
    for name, step in proxy_steps(space).items():  # each rung, and the proxy that shortlists
        reached = trials.dropna(subset=[f"proxy@{step}"])[[f"proxy@{step}", "final_val_acr"]]
        ranked = len(reached) > 2 and (reached.nunique() > 1).all()  # a tie throughout has no ranking
        rho[f"rho@{name}"] = spearmanr(reached.iloc[:, 0], reached.iloc[:, 1])[0] if ranked else math.nan
    chosen_test = test_acr(space, outcome.best_checkpoint, folder / "chosen_test.parquet", test_n, context)
    chosen = trials.loc[trials["trial"] == outcome.best_trial, "final_val_acr"].item()
    return {
        "chosen": chosen_test,
        "regret": trials["final_val_acr"].max() - chosen,
        **rho,
        "sweep_s": sweep_seconds,
        "run_equivalents": outcome.ledger.training_run_equivalents() if outcome.ledger else math.nan,
        "configs": len(trials) + int(trials["copies"].sum()),  # a member's copy explores another setting
        "chosen_trial": outcome.best_trial,
    }


VARIANT = re.compile(r"^(file|tpe(\d+)|(pbt|pb2)-?(\d+))$")


def variant(base: SearchSpace, name: str, cpus: float) -> SearchSpace:
    """The space with the budget `name` names: `file` (its own), `tpeN` (N trials trained out, two at a time),
    `pbtN` or `pb2-N` (a population of N, all at once on the cluster's `cpus`, judged every quarter of the
    epochs), under a name of its own."""
    match = VARIANT.match(name)
    if match is None:
        raise SystemExit(f"unknown variant {name!r}: file, tpeN, pbtN or pb2-N")
    budget, resources = base.budget, base.resources
    if match.group(2):
        budget = Budget(num_samples=int(match.group(2)), max_concurrent=2, scheduler="none")
        resources = replace(resources, cpus_per_worker=min(1.0, cpus / 2))
    elif match.group(3):
        population = int(match.group(4))
        budget = Budget(
            num_samples=population,
            max_concurrent=population,
            scheduler=match.group(3),
            interval=max(1, base.epochs // 4),
            synch=True,
        )
        budget = replace(budget, move=moving_keys(replace(base, budget=budget)))
        resources = replace(resources, cpus_per_worker=min(1.0, cpus / population))
    return replace(base, budget=budget, resources=resources)


def summary(rows: list[dict]) -> str:
    table = pd.DataFrame(rows).set_index(["variant", "seed"])
    numeric = table.select_dtypes("number").drop(columns=["sweep_s", "train_s"], errors="ignore")
    means = numeric.groupby(level="variant", sort=False).agg(lambda c: f"{c.mean():.4f} ± {np.nan_to_num(c.std()):.4f}")
    return "\n".join(
        [
            table.to_string(float_format=lambda v: f"{v:.4f}"),
            "",
            "mean ± std over seeds:",
            means.to_string(),
        ]
    )


def main(argv: list[str] | None = None) -> str:
    args = arguments(argv)
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.out or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        if args.small:
            path = folder / "small.yaml"
            path.write_text(yaml.safe_dump(SMALL))
            args.space, args.seeds, args.test_n = path, args.seeds[:1], 128
        base = load_search_space(args.space)
        connect()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        rows = []
        for seed in args.seeds:
            raw = {**yaml.safe_load(Path(args.space).read_text()), "seed": seed}
            seeded = folder / f"seed{seed}" / "space.yaml"
            seeded.parent.mkdir(parents=True, exist_ok=True)
            seeded.write_text(yaml.safe_dump(raw, sort_keys=False))
            context = RunContext.create(cache=folder / "cache", progress=False)
            for point in base.teacher_points():  # the seed's teachers, before any sweep is timed
                soft_labels_for(replace(base, seed=seed).resolve(point), context)
            shared = None
            for name in args.variants:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                space = replace(variant(base, name, cpus), seed=seed, name=f"{base.name}-{name}-{stamp}-s{seed}")
                row = {
                    "variant": name,
                    "seed": seed,
                    **one_sweep(space, folder / f"seed{seed}" / name, args.test_n, context),
                }
                shared = shared or paper_point(space, seeded, folder / f"seed{seed}", args.test_n, context)
                row |= {"paper": shared["paper"], "gain": row["chosen"] - shared["paper"], "train_s": shared["train_s"]}
                row["sweep÷train"] = row["sweep_s"] / shared["train_s"]
                rows.append(row)
                print(
                    ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                    flush=True,
                )
    text = (
        f"{base.path.name}: {len(rows)} sweeps; test ACR of the paper's point and of each sweep's choice, n = "
        f"{args.test_n}; gain = chosen − paper; regret and ρ on val with the final protocol; sweep÷train: the "
        f"sweep's wall time over one `catrs train --config` process of the paper's point\n" + summary(rows)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
    ray.shutdown()
