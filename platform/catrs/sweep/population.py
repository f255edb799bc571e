"""A population that trains once: population-based training (PBT, Jaderberg et al. 2017) and its bandit
variant PB2 (Parker-Holder et al. 2020), as a search file asks for them.

    budget: {scheduler: pbt, population: 4, interval: 2, quantile: 0.25, move: [lbd, epsilon, num_noises]}

`population` members train side by side, each once. After every `interval` epochs a member reports the proxy
on val; if it ranks in the bottom `quantile` of the population it copies the weights (and the settings) of a
member of the top `quantile` — the exploit — and perturbs the settings named in `move` — the explore: PBT
multiplies a number by 0.8 or 1.2 or draws it anew (`resample_probability`), and shifts a choice to a
neighbouring value; PB2 lets a Gaussian-process bandit choose the numbers. The run's cost is `population`
training runs, however many settings it tries. Members are judged as they arrive (Ray's asynchronous PBT: a
member that copies one not yet at its epoch takes that one's last judged checkpoint, and trains the epochs
between again), or with `synch: true` all at once at each interval (each member then waits for the slowest,
and is restarted from its checkpoint after the decision).

The settings that move are those a run can change between epochs without restarting: a method's per-step
settings (CAT-RS: λ, ε, M — which only re-chunks the next batches — and the confidence mask). A teacher's σ0
does not move: the weights trained so far were fitted to its soft labels, so a member that copies another
takes its σ0 with its weights (every allowed σ0's soft labels are made before the first member starts).

The result is a schedule, not a point: the chosen member's settings per epoch, those of the epochs it
inherited included. Its checkpoint holds them (`TrainConfig.schedule`: the changes, epoch by epoch, of
the settings it started from) and the members that trained each stretch (`LINEAGE_FILE`); `replay_config`
writes them as a file that `catrs train --config FILE` trains again to the same weights.

Optuna draws the initial population (the file's points first, then a scrambled Sobol sequence over the
space) and keeps the study — each member told its final proxy — in the sweep's folder.

The file's population keys are checked with the rest of it (`catrs.sweep.space.population_problems`: which
settings may move, and why the others may not). Nothing here knows Ray: `catrs.distributed.tune` makes Tune's
PBT or PB2 of the file's budget.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
import yaml

from catrs.sweep.space import Domain, SearchSpace
from catrs.train import RunFolder, with_changes

if TYPE_CHECKING:
    from catrs.sweep.trial import TrialResult

LINEAGE_FILE = "lineage.json"  # beside a member's checkpoint: which member trained which epochs
SCHEDULE_FILES = ("schedule.csv", "schedule.png", "replay.yaml")  # what `write_schedule` leaves
STUDY_FILE = "optuna.db"


def distribution(domain: Domain) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a searched range."""
    if domain.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(domain.values))
    low, high = domain.values
    if domain.kind == "int":
        return optuna.distributions.IntDistribution(low, high)
    return optuna.distributions.FloatDistribution(low, high, log=domain.kind == "loguniform")


def population_study(space: SearchSpace, folder: Path) -> optuna.Study:
    """The sweep's Optuna study, kept in its folder (`optuna.db`): made by the first run, found by a resume."""
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # QMC is "experimental"; categorical ranges fall back to its random sampler
        warnings.simplefilter("ignore")
        sampler = optuna.samplers.QMCSampler(scramble=True, seed=space.seed, warn_independent_sampling=False)
    return optuna.create_study(
        study_name=space.name,
        storage=f"sqlite:///{folder / STUDY_FILE}",
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )


def draw_population(study: optuna.Study, space: SearchSpace) -> list[dict[str, Any]]:
    """The initial members: the file's points first, then Optuna's draws (asked of the study, told at the end
    by `record_population`)."""
    for point in space.points_to_evaluate:
        study.enqueue_trial(point)
    distributions = {key: distribution(domain) for key, domain in space.search.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [study.ask(distributions).params for _ in range(space.budget.num_samples)]


def record_population(study: optuna.Study, results: list[TrialResult], space: SearchSpace) -> None:
    """Each member's final proxy told to the trial that drew its initial settings (Tune keeps the members in
    the order they were drawn); a member with no figure as failed."""
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial, result in zip(waiting, results, strict=False):
        value = float(result.metrics.get(space.metric, math.nan))
        if math.isfinite(value):
            study.tell(trial.number, value)
        else:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def read_lineage(folder: Path) -> list[dict[str, Any]]:
    """Which member trained which epochs of the checkpoint in `folder`: [{"trial": ID, "after_epoch": E}, …]
    in order, each member training the epochs after its E up to the next one's ([] where none is recorded)."""
    path = folder / LINEAGE_FILE
    return json.loads(path.read_text()) if path.exists() else []


def schedule_table(config: Mapping[str, Any], lineage: list[dict[str, Any]], keys: tuple[str, ...]) -> pd.DataFrame:
    """A row per epoch of a member's run (`config`: its checkpoint's settings): the member that trained it
    and the value of each of `keys` it was trained with."""
    settings, changes = dict(config["method_config"]), {c["after_epoch"]: c for c in config.get("schedule", ())}
    owners = {entry["after_epoch"]: entry["trial"] for entry in lineage}
    rows, owner = [], ""
    for index in range(int(config["epochs"])):
        settings = with_changes(settings, [changes[index]] if index in changes else [])
        owner = owners.get(index, owner)
        rows.append({"epoch": index + 1, "trained_by": owner, **{key: settings[key] for key in keys}})
    return pd.DataFrame(rows)


def replay_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a member's run as a `catrs train --config FILE` file: trained again with them, on the
    same data and seed, it ends with the member's weights."""
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}


def plot_schedule(table: pd.DataFrame, keys: tuple[str, ...], path: Path) -> Path:
    """The moved settings over the epochs of `schedule_table`'s rows, a panel each; the epochs each member
    trained shaded alike, so an exploit shows where the shading changes."""
    from catrs.plots import png_figure

    with png_figure(path, nrows=len(keys), ncols=1, sharex=True, figsize=(6, 1.6 * len(keys) + 0.6)) as axes:
        axes = axes if len(keys) > 1 else [axes]
        owners = list(dict.fromkeys(table["trained_by"]))
        for ax, key in zip(axes, keys, strict=True):
            ax.step(table["epoch"], table[key].astype(float), where="mid", marker="o")
            ax.set_ylabel(key)
            for epoch, owner in zip(table["epoch"], table["trained_by"], strict=True):  # light, dark, light, …
                ax.axvspan(epoch - 0.5, epoch + 0.5, alpha=(0.08, 0.25)[owners.index(owner) % 2], color="grey", lw=0)
        axes[0].set_title("settings per epoch (a change of shading: another member trained it)")
        axes[-1].set_xlabel("epoch")
    return path


def write_schedule(run: RunFolder, keys: tuple[str, ...], folder: Path) -> pd.DataFrame | None:
    """The schedule of the member whose checkpoint is in `run` as `SCHEDULE_FILES` in `folder`: its settings
    per epoch (those it inherited included) as a table and a plot of `keys`, and the file `catrs train
    --config` trains the same weights again from. None (and no files) without a checkpoint."""
    config = run.trained_config()
    if config is None:
        return None
    table = schedule_table(config, read_lineage(run.path), keys)
    table.to_csv(folder / SCHEDULE_FILES[0], index=False)
    plot_schedule(table, keys, folder / SCHEDULE_FILES[1])
    (folder / SCHEDULE_FILES[2]).write_text(
        "# OMP_NUM_THREADS=1 catrs train --config replay.yaml --out DIR\n"
        "#   the member's weights again (same data, seed and schedule): bit for bit on a CPU with one thread per\n"
        "#   process, as a one-CPU trial trains; another thread count adds up sums in another order (≈1e-6 apart)\n"
        + yaml.safe_dump(replay_config(config), sort_keys=False)
    )
    return table
