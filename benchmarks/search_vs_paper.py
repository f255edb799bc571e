"""Does the sweep earn its keep? The demo's choice against the paper's point, on test, over sweep seeds.

    .venv/bin/python benchmarks/search_vs_paper.py [--seeds 0 1 2] [--test-n 10000] [--space FILE]
    .venv/bin/python benchmarks/search_vs_paper.py --small       (a tiny space on generated data, for the tests)

For each seed, the search space (default: the demo's, CAT-RS on digits at σ = 0.5) is swept as `catrs tune`
sweeps it, seeded by that seed. Then, apart from the sweep:

- every trial's setting is trained to its end as the trial trained (so a trial ASHA stopped is completed,
  and a completed one is reproduced: training is deterministic on a CPU) and certified on `val` with the
  file's final protocol, in Ray tasks;
- (a) the paper's point — the file's first point, trained on the sweep's schedule and seed, as the sweep
  trains its choice — and (b) the sweep's choice are certified on `test` with n = `--test-n`.

It prints per seed and as mean ± std: the test ACR of (a) and (b) and their difference; the selection
regret (the best final val ACR among the trials minus the chosen trial's); Spearman's ρ between the proxy at
each rung (an epoch, or a budgeted fraction of the steps) and at the last epoch (over the trials that
reached it) and the trials' final val ACR; the sweep's wall time against one training run of the paper's point
in this process; the configurations it explored and the training-run equivalents its ledger counted. Targets
(issue 22): gain ≥ +0.03, regret ≤ 0.005, ρ ≥ 0.9 at the first rung where trials are cut, ≥ 27
configurations, ≤ 5 training-run equivalents, sweep ≤ 8× one training run.
"""

from __future__ import annotations

import argparse
import math
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
from catrs.sweep.proxy import evaluation_metrics
from catrs.sweep.run import SweepOptions, run_sweep
from catrs.sweep.selection import trained_out_val_request
from catrs.sweep.space import SearchSpace, find_search_space, load_search_space
from catrs.tracking import Tracker
from catrs.train import train

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
    return parser.parse_args(argv)


def trial_histories(tracker: Tracker, parent: str, metric: str) -> pd.DataFrame:
    """A row per trial of the sweep: its searched values (params) and its proxy at each reported epoch."""
    rows = []
    for child in tracker.children(parent):
        history = {int(m.step): m.value for m in tracker.client.get_metric_history(child.info.run_id, metric)}
        rows.append(
            {
                "trial": child.data.tags["catrs.trial_id"],
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


@ray.remote(num_cpus=1)
def final_val_acr(space: SearchSpace, point: dict, folder: Path, context: RunContext) -> float:
    """`point` trained to its end as a trial trains, then its ACR on val with the final protocol."""
    checkpoint = train(space.resolve(point), folder, context)
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


def one_seed(space: SearchSpace, folder: Path, test_n: int) -> dict:
    """The sweep of `space` and everything measured around it (see the module docstring)."""
    context = RunContext.create(cache=folder / "cache", progress=False)
    began = time.perf_counter()
    outcome = run_sweep(space, SweepOptions(local_dir=folder / "sweeps"), context)
    sweep_seconds = time.perf_counter() - began
    began = time.perf_counter()  # (a): the paper's point, trained as the sweep trains its choice, in this process
    split = "train" if space.selection.refit else "train_minus_val"
    paper = train(space.resolve(space.first_point(), split), folder / "paper", context)
    train_seconds = time.perf_counter() - began
    trials = trial_histories(Tracker(), outcome.parent_run_id, space.metric)
    finals = ray.get(
        [
            final_val_acr.remote(space, typed_point(space, params), folder / "trained_out" / trial, context)
            for trial, params in zip(trials["trial"], trials["params"], strict=True)
        ]
    )
    trials["final_val_acr"] = finals
    rho = {}
    for name, step in proxy_steps(space).items():  # each rung, and the proxy that shortlists
        reached = trials.dropna(subset=[f"proxy@{step}"])[[f"proxy@{step}", "final_val_acr"]]
        ranked = len(reached) > 2 and (reached.nunique() > 1).all()  # a tie throughout has no ranking
        rho[f"rho@{name}"] = spearmanr(reached.iloc[:, 0], reached.iloc[:, 1])[0] if ranked else math.nan
    paper_test = test_acr(space, paper, folder / "paper_test.parquet", test_n, context)
    chosen_test = test_acr(space, outcome.best_checkpoint, folder / "chosen_test.parquet", test_n, context)
    chosen = trials.loc[trials["trial"] == outcome.best_trial, "final_val_acr"].item()
    return {
        "seed": space.seed,
        "paper": paper_test,
        "chosen": chosen_test,
        "gain": chosen_test - paper_test,
        "regret": trials["final_val_acr"].max() - chosen,
        **rho,
        "sweep_s": sweep_seconds,
        "train_s": train_seconds,
        "sweep÷train": sweep_seconds / train_seconds,
        "run_equivalents": outcome.ledger.training_run_equivalents() if outcome.ledger else math.nan,
        "configs": len(trials),
        "chosen_trial": outcome.best_trial,
    }


def summary(rows: list[dict]) -> str:
    table = pd.DataFrame(rows).set_index("seed")
    numeric = table.select_dtypes("number")
    lines = [
        table.to_string(float_format=lambda v: f"{v:.4f}"),
        "",
        "mean ± std over seeds: "
        + "  ".join(
            f"{column} {numeric[column].mean():.4f} ± {np.nan_to_num(numeric[column].std()):.4f}"
            for column in numeric.columns
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = arguments(argv)
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.out or Path(temporary)
        if args.small:
            path = folder / "small.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(SMALL))
            args.space, args.seeds, args.test_n = path, args.seeds[:1], 128
        base = load_search_space(args.space)
        connect()
        rows = []
        for seed in args.seeds:
            space = replace(base, seed=seed, name=f"{base.name}-bench-{time.strftime('%Y%m%d-%H%M%S')}-s{seed}")
            rows.append(one_seed(space, folder / f"seed{seed}", args.test_n))
            print(
                f"seed {seed}: "
                + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                flush=True,
            )
    text = (
        f"{base.path.name}: {len(rows)} sweeps; test ACR of the paper's point (a) and of the sweep's choice "
        f"(b), n = {args.test_n}; regret and ρ on val with the final protocol\n" + summary(rows)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
    ray.shutdown()
