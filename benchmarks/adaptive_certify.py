"""Adaptive CERTIFY against fixed n: the samples it spends and the radius it keeps, side by side.

    .venv/bin/python benchmarks/adaptive_certify.py                  (published and linear: about a minute)
    .venv/bin/python benchmarks/adaptive_certify.py published [--seeds 0 1 2 3 4] [--tolerances 0.01 0.03]
    .venv/bin/python benchmarks/adaptive_certify.py linear
    catrs demo                                                       (first, for `model`: it trains a champion)
    .venv/bin/python benchmarks/adaptive_certify.py model --checkpoint runs/sweeps/*/best/checkpoint.pt \\
        [--skip 3] [--n-max 100000] [--workers 2]          (about 12 minutes on 2 CPUs at these defaults)

Parts (positional, or --part; default: published and linear):

- `published`: a simulation on the released CAT-RS CIFAR-10 σ = 0.5 certificates (n0 = 100, n = 100,000,
  α = 0.001). Each image's p_A is reconstructed as the p whose Clopper–Pearson bound at the expected count
  p·n gives its radius (capped radii give p = 1); abstained images get p_A = 0.5, the hardest to decide (their
  true p_A is unknown: anything that CERTIFY could not tell from 1/2). Each seed then draws, with binomials
  at those p_A, the shipped procedure's noise: the selection count, the pilot's doubling parts and the
  estimation stream. Adaptive CERTIFY runs on them with the real `SampleSizePlanner`; fixed n uses the
  whole estimation stream, adaptive a prefix of it (its count given the stream's: hypergeometric, the same
  joint law as drawing the prefix and adding the rest). Reported per tolerance, as medians over seeds: mean
  samples per image ÷ (n0 + n_max), ACR ÷ fixed n's ACR, the share of images estimated at n_max and at 0
  (abstained on without estimating). Beside it, on the same draws: a plain two-stage procedure (a pilot of
  1,000 fresh samples, no growth, then the planner's sizes), an oracle that knows p_A (the smallest
  size of the planner's grid whose expected radius is within the tolerance of n_max's; 0 where n_max's is),
  and the anytime family's contender, sequential with α spent over looks: one estimation stream (fixed n's)
  looked at after n_max/2^7, …, n_max/2, n_max samples, look k < 8 bounding p_A at α·0.1/7 and the last at
  α·0.9 (a union bound makes all 8 bounds hold at once, so stopping at any look is sound); it stops at the
  first look where the radius the last look could plausibly give (its expected radius at the counts'
  one-sided 95% Clopper–Pearson upper bound of p_A) exceeds this look's radius by at most the tolerance,
  and reports this look's radius. The class is the released one, so ACR counts the released `correct`
  column. Target (issue): samples ≤ 0.35× at ACR ≥ 0.99×.
- `linear`: soundness with the real `Smooth`, on a linear classifier f(x) = 1[w·x + b > 0], ‖w‖ = 1, whose
  smoothed classifier's exact radius is |w·x + b|. Fixed n and adaptive on the same inputs: the share of
  certificates that overshoot the true distance or name the wrong class (at most α per input, so the share
  must stay under the binomial bound binom.ppf(0.999, inputs, α) / inputs), the tightness (mean radius ÷
  mean true distance over certified-correct inputs; target adaptive ÷ fixed ≥ 0.9), the samples; and a coin
  flip (f = the sign of the first noisy pixel, x = 0), which both must abstain on.
- `model`: a real model. `catrs certify` on the digits test split (every `--skip`-th image) as a subprocess,
  once with fixed n = `--n-max` and once `--adaptive` (default tolerance), each on `--workers` Ray workers,
  timed by the wall clock. Prints the samples (sum of each row's `samples`), wall time and ACR of both with
  their ratios. Targets (issue): samples ≤ 0.35×, wall ≤ 0.45×, ACR ≥ 0.99×.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from catrs.adaptive import PLAUSIBLE, SampleSizePlanner, expected_radius
from catrs.metrics import average_certified_radius
from catrs.results import read_results
from catrs.sampling import DEFAULT_TOLERANCE
from catrs.smoothing import ABSTAIN, Smooth, certified_radius, clopper_pearson_lower
from catrs.testing import CoinFlip, CountingLinear

PARTS = ["published", "linear", "model"]
DEFAULT_PARTS = ["published", "linear"]
REFERENCE = Path("/work/shared/reference/cifar10_sigma0.5_catrs_certify.tsv")
TOLERANCES = [0.01, 0.02, 0.03, 0.05, 0.1, DEFAULT_TOLERANCE]
TWO_STAGE_PILOT = 1000
# sequential: looks at n_max/2^(LOOKS−1), …, n_max/2, n_max; the share of α spent on the looks before the last
SEQUENTIAL_LOOKS, SEQUENTIAL_EARLY_ALPHA = 8, 0.1
TARGET_SAMPLES, TARGET_ACR, TARGET_WALL, TARGET_TIGHTNESS = 0.35, 0.99, 0.45, 0.9


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"{' | '.join(PARTS)} (default: published linear)")
    parser.add_argument("--part", dest="part_options", action="append", choices=PARTS, default=[])
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the released certificates (TSV)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tolerances", type=float, nargs="+", default=sorted(set(TOLERANCES)))
    parser.add_argument("--checkpoint", type=Path, default=None, help="model: a catrs checkpoint")
    parser.add_argument("--skip", type=int, default=3, help="model: certify every SKIP-th test image")
    parser.add_argument("--n-max", type=int, default=100_000, help="model: n of fixed n, n_max of adaptive")
    parser.add_argument("--workers", type=int, default=2, help="model: Ray workers of each certification")
    parser.add_argument(
        "--model-tolerances", type=float, nargs="+", default=[DEFAULT_TOLERANCE], help="model: one run for each"
    )
    args = parser.parse_args(argv)
    args.parts = list(dict.fromkeys([*args.parts, *args.part_options])) or DEFAULT_PARTS
    if unknown := [part for part in args.parts if part not in PARTS]:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if "model" in args.parts and args.checkpoint is None:
        parser.error("the model part needs --checkpoint (run `catrs demo`: runs/sweeps/*/best/checkpoint.pt)")
    return args


def verdict(met: bool) -> str:
    return "yes" if met else "NO"


# --- published: a simulation on the released certificates -------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    n0: int
    n_max: int
    alpha: float
    sigma: float

    @property
    def fixed_samples(self) -> int:
        return self.n0 + self.n_max


PUBLISHED = Protocol(n0=100, n_max=100_000, alpha=0.001, sigma=0.5)


def reconstructed_p(radius: np.ndarray, protocol: Protocol, steps: int = 60) -> np.ndarray:
    """The p whose Clopper–Pearson lower bound at the expected count p·n is Φ(radius / σ), by bisection; 1 where
    no p reaches it (a radius at n's cap)."""
    target = norm.cdf(radius / protocol.sigma)
    low, high = target.copy(), np.ones_like(target)
    n = protocol.n_max
    for _ in range(steps):
        middle = (low + high) / 2
        short = beta.ppf(protocol.alpha, middle * n, n - middle * n + 1) < target
        low, high = np.where(short, middle, low), np.where(short, high, middle)
    return high


def published_images(path: Path, protocol: Protocol) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(p_A, correct, the released rows): abstained rows get p_A = 1/2."""
    frame = pd.read_csv(path, sep="\t")
    p = reconstructed_p(frame["radius"].to_numpy(dtype=float), protocol)
    p = np.where(frame["predict"].to_numpy() == ABSTAIN, 0.5, p)
    return p, frame["correct"].to_numpy() == 1, frame


@dataclass(frozen=True)
class Draws:
    """One seed's noise for every image, shared by every procedure and tolerance, as the real streams are:
    the selection count, the pilot's parts (part k has n0·2^(k−1) samples), a plain two-stage pilot, the
    count of the whole estimation stream (fixed n's) and, nested in it, the counts of its prefixes at the
    sequential procedure's looks."""

    selection: np.ndarray
    pilot_parts: list[tuple[int, np.ndarray]]  # (samples in the part, each image's count in it)
    two_stage_pilot: np.ndarray
    estimation_total: np.ndarray
    looks: np.ndarray  # (looks, images): the count of the first look_sizes(protocol)[k] estimation samples
    rng: np.random.Generator

    def estimation_prefix(self, sizes: np.ndarray, n_max: int) -> np.ndarray:
        """The count of each image's first sizes[i] estimation samples, given the whole stream's count."""
        return self.rng.hypergeometric(self.estimation_total, n_max - self.estimation_total, sizes)


def pilot_part_sizes(protocol: Protocol, pilot_limit: int) -> list[int]:
    sizes, size = [], protocol.n0
    while 2 * size <= pilot_limit:
        sizes.append(size)
        size *= 2
    return sizes


def look_sizes(protocol: Protocol) -> np.ndarray:
    """The sequential procedure's looks: n_max/2^(LOOKS−1), …, n_max/2, n_max (rounded down)."""
    return np.array([protocol.n_max // 2**k for k in range(SEQUENTIAL_LOOKS - 1, -1, -1)])


def look_counts(total: np.ndarray, protocol: Protocol, rng: np.random.Generator) -> np.ndarray:
    """(looks, images): each image's count in the first n_k samples of the estimation stream whose count in
    all n_max is `total`, nested as one stream's are: from the last look back, each look's count given the
    next's (hypergeometric: the law of a prefix of the samples that made the next count)."""
    sizes = look_sizes(protocol)
    assert sizes[-1] == protocol.n_max
    counts = [total]
    for size, following in zip(sizes[-2::-1], sizes[:0:-1], strict=True):
        counts.append(rng.hypergeometric(counts[-1], following - counts[-1], size))
    return np.stack(counts[::-1])


def draw(p: np.ndarray, protocol: Protocol, pilot_limit: int, seed: int) -> Draws:
    rng = np.random.default_rng(seed)
    selection = rng.binomial(protocol.n0, p)
    pilot_parts = [(size, rng.binomial(size, p)) for size in pilot_part_sizes(protocol, pilot_limit)]
    two_stage_pilot = rng.binomial(TWO_STAGE_PILOT, p)
    estimation_total = rng.binomial(protocol.n_max, p)
    return Draws(
        selection=selection,
        pilot_parts=pilot_parts,
        two_stage_pilot=two_stage_pilot,
        estimation_total=estimation_total,
        # a child generator, so that the looks leave `rng`, and with it the other procedures' draws, as they were
        looks=look_counts(estimation_total, protocol, rng.spawn(1)[0]),
        rng=rng,
    )


@dataclass(frozen=True)
class Outcome:
    """A procedure's result on every image: samples taken in all, estimation sample size, radius."""

    samples: np.ndarray
    sizes: np.ndarray
    radius: np.ndarray


def radii(counts: np.ndarray, sizes: np.ndarray, protocol: Protocol) -> np.ndarray:
    bound = clopper_pearson_lower(counts, np.maximum(sizes, 1), protocol.alpha)
    return np.where(sizes > 0, certified_radius(bound, protocol.sigma), 0.0)


def estimated(pilot_samples: np.ndarray, sizes: np.ndarray, draws: Draws, protocol: Protocol) -> Outcome:
    counts = draws.estimation_prefix(sizes, protocol.n_max)
    return Outcome(pilot_samples + sizes, sizes, radii(counts, sizes, protocol))


def fixed_n(draws: Draws, protocol: Protocol) -> Outcome:
    sizes = np.full(len(draws.selection), protocol.n_max)
    return Outcome(np.full(len(sizes), protocol.fixed_samples), sizes, radii(draws.estimation_total, sizes, protocol))


def shipped_adaptive(planner: SampleSizePlanner, draws: Draws, protocol: Protocol) -> Outcome:
    """`Smooth._adaptive`: the selection's count starts the pilot, which doubles while the planner wants it."""
    successes, trials = draws.selection.copy(), np.full(len(draws.selection), protocol.n0)
    for size, counts in draws.pilot_parts:
        growing = planner.wants_more_pilot(successes, trials)
        if not growing.any():
            break
        assert np.all(trials[growing] == size)  # an image that stops growing never resumes: parts fit
        successes[growing] += counts[growing]
        trials[growing] *= 2
    return estimated(trials, planner.sample_sizes(successes, trials), draws, protocol)


def plain_two_stage(planner: SampleSizePlanner, draws: Draws, protocol: Protocol) -> Outcome:
    """A fixed pilot of fresh samples, apart from the selection, then the planner's sizes on it alone."""
    pilot = np.full(len(draws.selection), TWO_STAGE_PILOT)
    sizes = planner.sample_sizes(draws.two_stage_pilot, pilot)
    return estimated(protocol.n0 + pilot, sizes, draws, protocol)


def oracle_sizes(p: np.ndarray, planner: SampleSizePlanner, expected: np.ndarray) -> np.ndarray:
    """The smallest grid size whose expected radius at the true p_A is within the tolerance of n_max's, 0 where
    n_max's is itself within it. `expected`: (grid sizes, images) of expected radii, in σ."""
    enough = expected[-1][None, :] - expected <= planner.tolerance
    sizes = planner.sizes[np.argmax(enough, axis=0)]
    return np.where(expected[-1] <= planner.tolerance, 0, sizes)


def look_alphas(protocol: Protocol) -> np.ndarray:
    """Each look's share of α: α·s/(K−1) for each of the K − 1 early looks, α·(1 − s) for the last. They sum
    to α, so by the union bound all K Clopper–Pearson bounds hold at once with probability ≥ 1 − α: the
    bound at whichever look the procedure stops at, however it chose it from the counts, holds too."""
    early = protocol.alpha * SEQUENTIAL_EARLY_ALPHA / (SEQUENTIAL_LOOKS - 1)
    return np.append(np.full(SEQUENTIAL_LOOKS - 1, early), protocol.alpha * (1 - SEQUENTIAL_EARLY_ALPHA))


@dataclass(frozen=True)
class SequentialLooks:
    """What the sequential procedure sees at each look, for every image (tolerance aside): `radius`, (looks,
    images), the certified radius (in σ) of the counts so far at the look's α; `plausible`, (looks − 1,
    images), the radius (in σ) the last look could plausibly give: its expected radius at the counts' upper
    bound of p_A (one-sided, level 1 − PLAUSIBLE), with n_max and the last look's α."""

    radius: np.ndarray
    plausible: np.ndarray

    @classmethod
    def of(cls, draws: Draws, protocol: Protocol) -> SequentialLooks:
        sizes, alphas = look_sizes(protocol), look_alphas(protocol)
        radius = np.stack(
            [
                certified_radius(clopper_pearson_lower(counts, size, alpha), 1.0)
                for counts, size, alpha in zip(draws.looks, sizes, alphas, strict=True)
            ]
        )
        early, trials = draws.looks[:-1], sizes[:-1, None]
        upper = np.where(early < trials, beta.ppf(1 - PLAUSIBLE, early + 1, np.maximum(trials - early, 1)), 1.0)
        return cls(radius, expected_radius(upper, protocol.n_max, alphas[-1]))


def sequential(tolerance: float, looks: SequentialLooks, protocol: Protocol) -> Outcome:
    """Stops at the first look whose radius is within `tolerance` of what the last look could plausibly give
    (the last look where none is), and reports that look's radius."""
    sizes = look_sizes(protocol)
    close = looks.plausible - looks.radius[:-1] <= tolerance
    stop = np.where(close.any(axis=0), np.argmax(close, axis=0), len(sizes) - 1)
    radius = protocol.sigma * looks.radius[stop, np.arange(looks.radius.shape[1])]
    return Outcome(protocol.n0 + sizes[stop], sizes[stop], radius)


def summary(outcome: Outcome, fixed: Outcome, correct: np.ndarray, protocol: Protocol) -> dict[str, float]:
    acr = np.mean(outcome.radius * correct)
    return {
        "samples": outcome.samples.mean() / protocol.fixed_samples,
        "acr": acr / np.mean(fixed.radius * correct),
        "at_max": np.mean(outcome.sizes == protocol.n_max),
        "at_zero": np.mean(outcome.sizes == 0),
    }


def simulate_published(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    protocol = PUBLISHED
    p, correct, frame = published_images(args.reference, protocol)
    planners = {
        tolerance: SampleSizePlanner(protocol.n_max, protocol.alpha, tolerance) for tolerance in args.tolerances
    }
    grid = next(iter(planners.values())).sizes
    expected = expected_radius(p[None, :], grid[:, None], protocol.alpha)
    procedures = {
        "adaptive (shipped)": lambda planner, draws: shipped_adaptive(planner, draws, protocol),
        f"plain two-stage (pilot {TWO_STAGE_PILOT:,})": lambda planner, draws: plain_two_stage(
            planner, draws, protocol
        ),
        "oracle (knows p_A)": lambda planner, draws: estimated(
            np.full(len(p), protocol.n0), oracle_sizes(p, planner, expected), draws, protocol
        ),
        "sequential (α spent over looks)": lambda planner, draws: sequential(planner.tolerance, looks, protocol),
    }
    rows, fixed_acrs = [], []
    for seed in args.seeds:
        draws = draw(p, protocol, next(iter(planners.values())).pilot_limit, seed)
        looks = SequentialLooks.of(draws, protocol)  # the sequential procedure's view, the same at every tolerance
        fixed = fixed_n(draws, protocol)
        fixed_acrs.append(np.mean(fixed.radius * correct))
        for tolerance, planner in planners.items():
            for name, procedure in procedures.items():
                stats = summary(procedure(planner, draws), fixed, correct, protocol)
                rows.append({"seed": seed, "tolerance": tolerance, "procedure": name, **stats})
    medians = pd.DataFrame(rows).groupby(["tolerance", "procedure"], sort=False).median(numeric_only=True)
    abstained = int((frame["predict"] == ABSTAIN).sum())
    print(
        f"\npublished: {args.reference.name}, {len(frame):,} images ({abstained} abstained: p_A = 0.5 for them, "
        f"the hardest to decide); n0 = {protocol.n0}, n_max = {protocol.n_max:,}, α = {protocol.alpha}, "
        f"σ = {protocol.sigma}; medians over seeds {', '.join(map(str, args.seeds))}"
    )
    print(
        f"fixed n: {protocol.fixed_samples:,} samples per image, simulated ACR {np.median(fixed_acrs):.4f} "
        f"(released {np.mean(frame['radius'] * frame['correct']):.4f})"
    )
    print(f"target (issue): samples ≤ {TARGET_SAMPLES}× at ACR ≥ {TARGET_ACR}× (÷ fixed n, on the same draws)\n")
    print(published_table(medians, list(procedures)))
    sizes = look_sizes(protocol)
    print(
        f"\n(* the default tolerance; at n_max / at 0: shares of images estimated at n_max (sequential: stopped at "
        f"the last look) and at 0;\n sequential's looks: {', '.join(f'{size:,}' for size in sizes)}; "
        f"{time.perf_counter() - began:.0f} s)"
    )


def published_table(medians: pd.DataFrame, procedures: list[str]) -> str:
    """One row per tolerance and procedure, the procedures of a tolerance together."""
    width = max(map(len, procedures)) + 2
    lines = [f"{'tolerance':11}{'procedure':{width}}{'samples×':>9}{'ACR×':>8}{'@n_max':>8}{'@0':>7}{'target':>8}"]
    for tolerance in medians.index.get_level_values("tolerance").unique():
        mark = "*" if tolerance == DEFAULT_TOLERANCE else " "
        for index, name in enumerate(procedures):
            row = medians.loc[(tolerance, name)]
            met = row["samples"] <= TARGET_SAMPLES and row["acr"] >= TARGET_ACR
            label = f"{tolerance:<5g}{mark}" if index == 0 else ""
            lines.append(
                f"{label:11}{name:{width}}{row['samples']:>9.3f}{row['acr']:>8.4f}{row['at_max']:>8.1%}"
                f"{row['at_zero']:>7.1%}{verdict(met):>8}"
            )
    return "\n".join(lines)


# --- linear: soundness against exact radii -------------------------------------------------------------------

LINEAR = Protocol(n0=100, n_max=20_000, alpha=0.01, sigma=0.5)
LINEAR_INPUTS, COIN_FLIPS, LINEAR_BATCH = 400, 100, 10_000


def certify_both(model: nn.Module, xs: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{procedure: (predictions, radii, samples per input)} of fixed n and adaptive CERTIFY on `xs`."""
    smooth = Smooth(model, 2, LINEAR.sigma, seed=0, inference="eager")
    indices = range(len(xs))
    fixed = smooth.certify_batch(xs, LINEAR.n0, LINEAR.n_max, LINEAR.alpha, LINEAR_BATCH, indices=indices)
    adaptive = smooth.certify_adaptive_batch(
        xs, LINEAR.n0, LINEAR.n_max, LINEAR.alpha, LINEAR_BATCH, tolerance=DEFAULT_TOLERANCE, indices=indices
    )
    return {
        "fixed n": (
            np.array([c for c, _ in fixed]),
            np.array([r for _, r in fixed]),
            np.full(len(xs), LINEAR.fixed_samples),
        ),
        "adaptive": (
            np.array([a.prediction for a in adaptive]),
            np.array([a.radius for a in adaptive]),
            np.array([a.pilot + a.estimation for a in adaptive]),
        ),
    }


def linear_rows(model: CountingLinear, xs: torch.Tensor) -> dict[str, dict[str, float]]:
    distance_signed = model.margin(xs).numpy()
    truth, distance = (distance_signed > 0).astype(int), np.abs(distance_signed)
    rows = {}
    for name, (predicted, radius, samples) in certify_both(model, xs).items():
        answered = predicted != ABSTAIN
        certified = answered & (predicted == truth)
        rows[name] = {
            "unsound": np.mean(answered & ((predicted != truth) | (radius > distance))),
            "abstained": np.mean(~answered),
            "tightness": radius[certified].mean() / distance[certified].mean(),
            "acr_vs_true": np.sum(radius * certified) / np.sum(distance),
            "samples": samples.mean(),
        }
    return rows


def check_linear(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    torch.manual_seed(0)
    model = CountingLinear(torch.randn(1, 4, 4), 0.1)
    xs = torch.randn(LINEAR_INPUTS, 1, 4, 4) * 0.8  # true distances spread from 0 to past n_max's largest radius
    rows = linear_rows(model, xs)
    counted = model.rows_seen / LINEAR_INPUTS - rows["fixed n"]["samples"]  # what the model classified for adaptive
    bound = binom.ppf(0.999, LINEAR_INPUTS, LINEAR.alpha) / LINEAR_INPUTS
    cap = LINEAR.sigma * float(expected_radius(1.0, LINEAR.n_max, LINEAR.alpha))
    fixed = rows["fixed n"]
    print(
        f"\nlinear: f = 1[w·x + b > 0], ‖w‖ = 1, on {LINEAR_INPUTS} random 4×4 inputs (true distance: median "
        f"{np.median(np.abs(model.margin(xs).numpy())):.2f}, n_max's largest radius {cap:.2f}); σ = "
        f"{LINEAR.sigma}, α = {LINEAR.alpha}, n0 = {LINEAR.n0}, n_max = {LINEAR.n_max:,}, tolerance "
        f"{DEFAULT_TOLERANCE}"
    )
    print(f"unsound: overshoots the true distance or names the wrong class; bound {bound:.2%} (binom 0.999)\n")
    print(
        f"{'':10}{'unsound':>9}{'bound':>7}{'abstained':>11}{'tightness':>11}{'÷ fixed':>9}{'ACR÷true':>10}"
        f"{'samples':>9}{'÷ fixed':>9}"
    )
    for name, row in rows.items():
        print(
            f"{name:10}{row['unsound']:>9.2%}{verdict(row['unsound'] <= bound):>7}{row['abstained']:>11.1%}"
            f"{row['tightness']:>11.3f}{row['tightness'] / fixed['tightness']:>9.3f}{row['acr_vs_true']:>10.3f}"
            f"{row['samples']:>9,.0f}{row['samples'] / fixed['samples']:>9.3f}"
        )
    tight = rows["adaptive"]["tightness"] / fixed["tightness"] >= TARGET_TIGHTNESS
    print(f"tightness: adaptive ÷ fixed ≥ {TARGET_TIGHTNESS}: {verdict(tight)}")
    print(
        f"adaptive's samples per input as the model counted them: {counted:,.1f} (its certificates say "
        f"{rows['adaptive']['samples']:,.1f})"
    )
    coin_flips(bound_share=binom.ppf(0.999, COIN_FLIPS, LINEAR.alpha) / COIN_FLIPS)
    print(f"({time.perf_counter() - began:.0f} s)")


def coin_flips(bound_share: float) -> None:
    xs = torch.zeros(COIN_FLIPS, 1, 4, 4)
    outcome = certify_both(CoinFlip(), xs)
    print(
        f"coin flip at x = 0 ({COIN_FLIPS} noise streams; any certificate overshoots, bound {bound_share:.0%}): "
        + "; ".join(coin_flip_line(name, *answers, bound_share) for name, answers in outcome.items())
    )


def coin_flip_line(name: str, predicted: np.ndarray, radius: np.ndarray, samples: np.ndarray, bound: float) -> str:
    answered = int(np.sum(predicted != ABSTAIN))
    return (
        f"{name} certified {answered} ({verdict(answered / len(predicted) <= bound)}, largest radius "
        f"{radius.max():.3f}), {samples.mean():,.0f} samples"
    )


# --- model: `catrs certify` on a trained model ---------------------------------------------------------------


def certify_command(args: argparse.Namespace, out: Path, tolerance: float | None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "catrs.cli",
        "certify",
        "--checkpoint",
        str(args.checkpoint.resolve()),
        "--dataset",
        "digits",
        "--skip",
        str(args.skip),
        "--n",
        str(args.n_max),
        "--workers",
        str(args.workers),
        "--out",
        str(out),
        "--tracking-uri",
        f"sqlite:///{out.parent / 'mlflow.db'}",
        *([] if tolerance is None else ["--adaptive", "--tolerance", str(tolerance)]),
    ]


def timed_certify(args: argparse.Namespace, folder: Path, tolerance: float | None) -> tuple[pd.DataFrame, float]:
    """The rows and wall seconds of fixed n (tolerance None) or of adaptive CERTIFY at `tolerance`."""
    out = folder / ("fixed.parquet" if tolerance is None else f"adaptive-{tolerance:g}.parquet")
    began = time.perf_counter()
    done = subprocess.run(certify_command(args, out, tolerance), cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"catrs certify failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return read_results(out), seconds


def certify_model(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        fixed, fixed_seconds = timed_certify(args, folder, None)
        for tolerance in args.model_tolerances:
            adaptive, adaptive_seconds = timed_certify(args, folder, tolerance)
            compare_model_runs(args, tolerance, (fixed, fixed_seconds), (adaptive, adaptive_seconds))


def compare_model_runs(
    args: argparse.Namespace,
    tolerance: float,
    fixed_run: tuple[pd.DataFrame, float],
    adaptive_run: tuple[pd.DataFrame, float],
) -> None:
    (fixed, fixed_seconds), (adaptive, adaptive_seconds) = fixed_run, adaptive_run
    contenders = {  # name: (fixed n's, adaptive's, format, target ratio, whether the ratio must stay below it)
        "samples": (fixed["samples"].sum(), adaptive["samples"].sum(), ",.0f", TARGET_SAMPLES, True),
        "wall (s)": (fixed_seconds, adaptive_seconds, ",.1f", TARGET_WALL, True),
        "ACR": (average_certified_radius(fixed), average_certified_radius(adaptive), ".4f", TARGET_ACR, False),
    }
    print(
        f"\nmodel: {args.checkpoint}, digits test --skip {args.skip} ({len(fixed)} images), n_max = {args.n_max:,}, "
        f"{args.workers} workers, tolerance {tolerance:g}; wall includes each process's start\n"
    )
    print(f"{'':10}{'fixed n':>14}{'adaptive':>14}{'÷ fixed':>9}{'target':>9}{'met':>5}")
    for name, (fixed_value, adaptive_value, form, threshold, below) in contenders.items():
        ratio = adaptive_value / fixed_value
        met = ratio <= threshold if below else ratio >= threshold
        target = f"{'≤' if below else '≥'} {threshold}"
        print(f"{name:10}{fixed_value:>14{form}}{adaptive_value:>14{form}}{ratio:>9.3f}{target:>9}{verdict(met):>5}")
    if "pilot_samples" in adaptive:
        estimation = adaptive["estimation_samples"]
        print(
            f"adaptive per image: pilot {adaptive['pilot_samples'].mean():,.0f}, estimation {estimation.mean():,.0f} "
            f"(at n_max {np.mean(estimation == args.n_max):.0%}, at 0 {np.mean(estimation == 0):.0%})"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; parts: {', '.join(args.parts)}")
    runners = {"published": simulate_published, "linear": check_linear, "model": certify_model}
    for part in args.parts:
        runners[part](args)


if __name__ == "__main__":
    main()
