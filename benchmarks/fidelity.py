"""Which low fidelity ranks a sweep's configurations as their trained-out val ACR does, per unit of cost.

    cd benchmarks && ../.venv/bin/python fidelity.py --configs 24 --seeds 0 1 --csv fidelity.csv
    cd benchmarks && ../.venv/bin/python fidelity.py --from-csv fidelity.csv     (the table again, no training)
    cd benchmarks && ../.venv/bin/python fidelity.py --from-csv fidelity.csv --replay 27 --rung 1 --etas 3 9
    cd benchmarks && ../.venv/bin/python fidelity.py --reference-from fidelity.csv --families budget warm \
        --fractions 0.125 0.25 --csv more.csv      (other fidelities against the same reference)

(From `benchmarks/`: the Ray tasks import `landscape` from the working directory.)

Draws `--configs` points of the search space (default: the demo's; the file's first point, then uniform
draws from each range, seeded), trains each at every seed as a sweep trial (on `train_minus_val`, with the
trials' soft labels), and measures on `val`:

- the reference: trained out, certified with the file's final protocol (the figure selection compares);
- truncated training: the file's proxy after each epoch of that run (`trunc@E`);
- budgeted training (`budget@F`): the whole schedule with every epoch a fresh random share F of the training
  split (`catrs train --fraction F`), so the learning rate still drops, then the proxy;
- a lighter inner search (`light@F`): budgeted training with CAT-RS's M and T halved, then the proxy;
- a warm start (`warm@F`): budgeted training that starts from the weights of the configuration's own Gaussian
  teacher (the one its soft labels come from, trained at σ0 anyway, so the start costs nothing) instead of a
  fresh initialisation — the idea: on the demo's schedule a short run from scratch is still at chance when it
  ends (its proxy ties across configurations), a warm one is not;
- learning-curve forecasts from the truncated run's proxies up to epoch E, at truncation's cost: their mean
  (`mean@E`) and the line through the last three extrapolated to the last epoch (`line@E`).

`--families` runs some of them (`trunc` is the truncated run and the reference every row is ranked against);
`--reference-from CSV` takes those from an earlier `--csv` of the same space instead, so another family can
be measured against the same reference (its costs are then relative to that file's trained-out runs).

Cost is training seconds with one proxy evaluation, relative to the trained-out run's. Each fidelity's row gives
its cost, Spearman's ρ against the reference (per seed, then averaged; and of the seed means), and how many of
the reference's top 3 it puts in its own top 3 (of the seed means). The `seed to seed` row is the ceiling:
the reference at one seed ranking the reference at the other. Runs are Ray tasks, one CPU each;
`--csv` keeps every run's figures, and `--from-csv` prints the table of such a file again without training.

`--replay TRIALS` plays a sweep's halving at one truncation rung (`--rung`, epochs) on the measured runs:
TRIALS configurations drawn (with replacement where there are fewer) from one seed's, in a random order, each
trained out if its proxy at the rung passes — ASHA as Ray decides (at least the (1 − 1/η) quantile of the
figures recorded at the rung before it; the first always passes) or synchronous halving (the top ⌈TRIALS/η⌉
of all) — over 400 orders per seed: how many are trained out, the training-run equivalents, and the regret
(the best reference drawn minus the best trained out).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from scipy.stats import spearmanr

from catrs.certify import run_certification
from catrs.checkpoint import load_checkpoint
from catrs.context import RunContext
from catrs.distributed.runtime import connect
from catrs.results import read_results
from catrs.sweep.proxy import evaluation_metrics, proxy_of
from catrs.sweep.selection import trained_out_val_request
from catrs.sweep.space import Domain, SearchSpace, find_search_space, load_search_space
from catrs.train import CHECKPOINT_NAME, RunFolder, RunSpec, fit, soft_labels_for
from landscape import EveryEpoch  # benchmarks/landscape.py

DEMO = find_search_space("demo_digits")
TOP = 3


def draw(domain: Domain, rng: np.random.Generator) -> object:
    """One uniform draw of a search range (log-uniform on the log scale)."""
    if domain.kind == "choice":
        return domain.values[int(rng.integers(len(domain.values)))]
    low, high = domain.values
    if domain.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if domain.kind == "int":
        return int(rng.integers(low, high + 1))
    return float(rng.uniform(low, high))


def points(space: SearchSpace, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    drawn = [{key: draw(domain, rng) for key, domain in space.search.items()} for _ in range(count - 1)]
    return [space.first_point(), *drawn]


def budgeted(spec: RunSpec, fraction: float, light: bool) -> RunSpec:
    """The run at `fraction` of its steps (and with M and T halved if `light`), teacher unchanged."""
    method_config = dict(spec.config.method_config)
    if light:
        for key in ("num_noises", "num_steps"):
            method_config[key] = max(1, method_config[key] // 2)
    config = replace(spec.config, fraction=fraction, method_config=method_config)
    return config.resolve(teacher_schedule=spec.teacher_schedule)


def timed_fit(spec: RunSpec, folder: Path, context: RunContext, soft, evaluation) -> tuple[EveryEpoch, Any, float]:
    """The run's reports, its trained state, and its wall time."""
    session = EveryEpoch(folder)
    began = time.perf_counter()
    run = fit(spec, session, context, soft, evaluation)
    return session, run, time.perf_counter() - began


class WarmStart(EveryEpoch):
    """A local run whose model starts from `weights` (a trained model's state) instead of its initialisation."""

    def __init__(self, out: Path, weights: dict[str, torch.Tensor]) -> None:
        super().__init__(out)
        self.weights = weights

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(self.weights)
        return super().prepare_model(model)


def teacher_weights(spec: RunSpec, context: RunContext) -> dict[str, torch.Tensor]:
    """The weights of the Gaussian teacher behind `spec`'s soft labels: the file the space names, else the one
    `soft_labels_for` trained into the (local) cache."""
    need, labels = spec.soft_label_need, spec.soft_labels()
    if need is None or labels is None:
        raise SystemExit(f"warm@F needs a method with a teacher; {spec.config.method} has none")
    default = Path(context.cache) / f"teacher-{labels.key()}" / CHECKPOINT_NAME
    return load_checkpoint(need.teacher_checkpoint or default).state_dict


FAMILIES = ("trunc", "budget", "light", "warm")


@ray.remote(num_cpus=1)
def measure(space: SearchSpace, point: dict, fractions: list[float], families: list[str], folder: Path) -> dict:
    """One configuration at one seed: each asked family's figures and training costs (`trunc`: the truncated
    run's, and the reference)."""
    torch.set_num_threads(1)
    spec = space.resolve(point)
    context = RunContext.create(cache=folder.parent / "cache", progress=False)
    soft = soft_labels_for(spec, context)
    proxy = proxy_of(space, context)
    epochs = spec.config.epochs
    figures: dict[str, float] = {}
    if "trunc" in families:
        figures |= truncated_and_reference(space, spec, folder / "full", context, soft, proxy)
    for family in ("budget", "light"):
        for fraction in fractions if family in families else []:
            name = f"{family}@{fraction:.3g}"
            low, _, seconds = timed_fit(
                budgeted(spec, fraction, light=family == "light"),
                folder / name,
                context,
                soft,
                replace(proxy, epochs=(epochs,)),
            )
            figures[name], figures[f"{name} cost"] = low.reports[-1][space.metric], seconds
    if "warm" in families:
        weights = teacher_weights(spec, context)
        for fraction in fractions:
            name, began = f"warm@{fraction:.3g}", time.perf_counter()
            warm = WarmStart(folder / name, weights)
            fit(budgeted(spec, fraction, False), warm, context, soft, replace(proxy, epochs=(epochs,)))
            figures[name], figures[f"{name} cost"] = warm.reports[-1][space.metric], time.perf_counter() - began
    return figures


def truncated_and_reference(space: SearchSpace, spec: RunSpec, out: Path, context: RunContext, soft, proxy) -> dict:
    """The run trained out with the proxy after every epoch (`trunc@E`, each costed as training to E plus one
    proxy), and the reference: the trained-out model certified on val with the file's final protocol."""
    epochs = spec.config.epochs
    session, run, _ = timed_fit(spec, out, context, soft, replace(proxy, epochs=tuple(range(1, epochs + 1))))
    began = time.perf_counter()
    proxy.metrics(proxy.rows(run.model, (0, 1)))
    proxy_seconds = time.perf_counter() - began
    per_epoch = [m["seconds"] - proxy_seconds for m in session.reports]  # training (and the noisy accuracy)
    figures: dict[str, float] = {}
    for epoch, metrics in enumerate(session.reports, start=1):
        figures[f"trunc@{epoch}"] = metrics[space.metric]
        figures[f"trunc@{epoch} cost"] = sum(per_epoch[:epoch]) + proxy_seconds
    full = RunFolder(out)
    request = trained_out_val_request(space, full.checkpoint, full.path / "val.parquet")
    figures["reference"] = evaluation_metrics(read_results(run_certification(request, context)), "acr", "")["acr"]
    return figures


def joined(earlier: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` beside the earlier file's figures of the same configurations and seeds (`--reference-from`); a
    fidelity measured again replaces the earlier figure."""
    again = [c for c in runs.columns if c in earlier.columns and c not in ("config", "seed")]
    return earlier.drop(columns=again).merge(runs, on=["config", "seed"], validate="one_to_one")


def with_forecasts(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with learning-curve forecasts from the truncated proxies (`mean@E`, `line@E`), each at the cost of
    truncating at E."""
    runs = runs.copy()
    epochs = sorted(int(c.split("@")[1]) for c in runs.columns if c.startswith("trunc@") and not c.endswith("cost"))
    for epoch in epochs[1:-1]:
        curve = runs[[f"trunc@{e}" for e in range(1, epoch + 1)]].to_numpy()
        last = np.arange(max(1, epoch - 2), epoch + 1)
        slope = np.polyfit(last, curve[:, last - 1].T, 1)[0]
        for name, values in (("mean", curve.mean(axis=1)), ("line", curve[:, -1] + slope * (epochs[-1] - epoch))):
            runs[f"{name}@{epoch}"], runs[f"{name}@{epoch} cost"] = values, runs[f"trunc@{epoch} cost"]
    return runs


def last_epoch(runs: pd.DataFrame) -> int:
    """The trained-out epoch of a run table: its last `trunc@E` column."""
    return max(int(c.split("@")[1]) for c in runs.columns if c.startswith("trunc@") and not c.endswith("cost"))


def top_agreement(figures: pd.Series, reference: pd.Series) -> int:
    return len(set(figures.nlargest(TOP).index) & set(reference.nlargest(TOP).index))


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per fidelity: cost relative to trained out, ρ per seed averaged, ρ and top-3 of the seed means."""
    fidelities = [c for c in runs.columns if "@" in c and not c.endswith(" cost")]
    means = runs.groupby("config").mean(numeric_only=True)
    full_cost = runs[f"trunc@{last_epoch(runs)} cost"]
    rows = []
    for name in fidelities:
        per_seed = [spearmanr(group[name], group["reference"])[0] for _, group in runs.groupby("seed")]
        rows.append(
            {
                "fidelity": name,
                "cost": float((runs[f"{name} cost"] / full_cost).median()),
                "rho per seed": float(np.mean(per_seed)),
                "rho of means": float(spearmanr(means[name], means["reference"])[0]),
                f"top-{TOP}": top_agreement(means[name], means["reference"]),
            }
        )
    by_seed = runs.pivot(index="config", columns="seed", values="reference")
    if by_seed.shape[1] >= 2:
        first, second = by_seed.columns[:2]
        rows.append(
            {
                "fidelity": "seed to seed",
                "cost": 1.0,
                "rho per seed": float(spearmanr(by_seed[first], by_seed[second])[0]),
                "rho of means": math.nan,
                f"top-{TOP}": top_agreement(by_seed[first], by_seed[second]),
            }
        )
    return pd.DataFrame(rows).set_index("fidelity")


def asha_passes(figures: np.ndarray, eta: int) -> np.ndarray:
    """Which trials, arriving in this order, ASHA lets train on from a rung (Ray's `_Bracket.on_result`)."""
    passes = np.ones(len(figures), dtype=bool)
    for i in range(1, len(figures)):
        passes[i] = figures[i] >= np.percentile(figures[:i], (1 - 1 / eta) * 100)
    return passes


def top_passes(figures: np.ndarray, eta: int) -> np.ndarray:
    """Synchronous halving: the top ⌈n/η⌉ of the whole cohort train on."""
    passes = np.zeros(len(figures), dtype=bool)
    passes[np.argsort(-figures, kind="stable")[: math.ceil(len(figures) / eta)]] = True
    return passes


def replay(runs: pd.DataFrame, trials: int, rung: int, etas: list[int], orders: int = 400) -> pd.DataFrame:
    """The halving rules played on measured runs (see the module docstring, `--replay`)."""
    epochs = last_epoch(runs)
    rng = np.random.default_rng(0)
    rows = []
    for rule, passes_of in (("asha", asha_passes), ("synchronous", top_passes)):
        for eta in etas:
            out, regret = [], []
            for _, group in runs.groupby("seed"):
                figures, reference = group[f"trunc@{rung}"].to_numpy(), group["reference"].to_numpy()
                for _ in range(orders):
                    drawn = rng.choice(len(group), size=trials, replace=trials > len(group))
                    passes = passes_of(figures[drawn], eta)
                    out.append(passes.sum())
                    regret.append(reference[drawn].max() - reference[drawn][passes].max())
            rows.append(
                {
                    "rule": rule,
                    "eta": eta,
                    "trained out": float(np.mean(out)),
                    "equivalents": (trials * rung + float(np.mean(out)) * (epochs - rung)) / epochs,
                    "mean regret": float(np.mean(regret)),
                    "P(regret > 0.005)": float(np.mean(np.array(regret) > 0.005)),
                }
            )
    return pd.DataFrame(rows).set_index(["rule", "eta"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=DEMO)
    parser.add_argument("--configs", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="*", default=[1 / 9, 1 / 3], help="none: truncation only")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="the fidelities to run")
    parser.add_argument(
        "--reference-from",
        type=Path,
        metavar="CSV",
        help="take the truncated runs and the reference of these configurations and seeds from a file --csv wrote "
        "(the same space: the same draws) and run only the other families",
    )
    parser.add_argument("--csv", type=Path, help="also write every run's figures here")
    parser.add_argument("--from-csv", type=Path, help="print the table of a file --csv wrote; train nothing")
    parser.add_argument("--replay", type=int, metavar="TRIALS", help="with --from-csv: play halving on the runs")
    parser.add_argument("--rung", type=int, default=1, help="the epoch of the replayed rung")
    parser.add_argument("--etas", type=int, nargs="+", default=[3, 9], help="the replayed reduction factors")
    args = parser.parse_args()
    if args.replay and not args.from_csv:
        parser.error("--replay plays halving on measured runs: give them with --from-csv")
    if args.from_csv:
        runs = pd.read_csv(args.from_csv)
        print(table(with_forecasts(runs)).to_string(float_format=lambda v: f"{v:.3f}"))
        if args.replay:
            print(f"\n{args.replay} trials, one rung at epoch {args.rung}, then trained out:")
            print(replay(runs, args.replay, args.rung, args.etas).to_string(float_format=lambda v: f"{v:.4f}"))
        return
    base = load_search_space(args.space)
    earlier, families = None, args.families
    if args.reference_from:
        earlier = pd.read_csv(args.reference_from)
        args.configs, args.seeds = earlier["config"].nunique(), sorted(int(s) for s in earlier["seed"].unique())
        families = [f for f in families if f != "trunc"]
    elif "trunc" not in families:
        parser.error("every fidelity is ranked against the reference: add trunc, or give --reference-from")
    configs = points(base, args.configs, base.seed)
    connect()
    with tempfile.TemporaryDirectory() as folder:
        jobs = {
            (i, seed): measure.remote(
                replace(base, seed=seed), point, args.fractions, families, Path(folder) / f"{i}-{seed}"
            )
            for i, point in enumerate(configs)
            for seed in args.seeds
        }
        runs = pd.DataFrame([{"config": i, "seed": seed, **ray.get(ref)} for (i, seed), ref in jobs.items()])
    if earlier is not None:
        runs = joined(earlier, runs)
    if args.csv:
        runs.to_csv(args.csv, index=False)
    print(
        f"{base.path.name}: {len(configs)} configurations × seeds {' '.join(map(str, args.seeds))}; reference: "
        f"trained out, final protocol (n = {base.final.n}) on val; fidelities: proxy (n = {base.proxy.n}) on val"
    )
    print(table(with_forecasts(runs)).to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
