"""Population sweeps without Ray: the schedule a member trains (copied epochs, then its own settings) replays
to the same weights, the search file's population keys are validated, and the pieces the sweep records
(schedule table, replay file, Optuna's draws) say what happened."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch
import yaml

from catrs.checkpoint import load_checkpoint, save_checkpoint
from catrs.errors import UserError
from catrs.sweep.ledger import expected_cost
from catrs.sweep.population import (
    LINEAGE_FILE,
    draw_population,
    population_study,
    read_lineage,
    replay_config,
    schedule_table,
)
from catrs.sweep.run import _refit_run
from catrs.sweep.selection import Candidate
from catrs.sweep.space import load_search_space
from catrs.train import TrainConfig, check_same_run, continued, train
from tests.helpers import quiet_context

QUICK = dict(dataset="synthetic", sigma=0.25, batch_size=64, lr=0.05, lr_step=2)
CATRS = {"num_steps": 1, "teacher_noises": 20, "num_noises": 2, "lbd": 1.0, "epsilon": 0.5}


class Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def stop(metrics):
        if metrics["epoch"] == epoch:
            raise Interrupt

    return stop


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def test_a_member_that_copies_another_and_moves_its_settings_ends_where_its_schedule_replayed_ends(tmp_path):
    """The exploit and explore of PBT as the trials do them (`continued` from the copied checkpoint), against
    the schedule trained from scratch in one run (what `catrs train --config replay.yaml` does)."""
    context = quiet_context(cache=tmp_path / "cache")
    base = TrainConfig(method="catrs", epochs=4, **QUICK, method_config=CATRS)
    with pytest.raises(Interrupt):  # member A: two epochs at λ = 1, M = 2
        train(base.resolve(), tmp_path / "a", context, _stop_after(2))
    (tmp_path / "b").mkdir()  # member B copies A's checkpoint after epoch 2 and goes on with λ = 2, M = 4
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    moved = replace(base, method_config={**CATRS, "lbd": 2.0, "num_noises": 4}).resolve()
    member = continued(moved, load_checkpoint(tmp_path / "b" / "checkpoint.pt"))
    assert member.config.schedule == ({"after_epoch": 2, "lbd": 2.0, "num_noises": 4},)
    assert member.config.method_config["lbd"] == 1.0  # the run's settings are those it started from
    assert (member.hyper_at(1).lbd, member.hyper_at(2).lbd, member.hyper_at(3).num_noises) == (1.0, 2.0, 4)
    trained = train(member, tmp_path / "b", context)

    replay = TrainConfig(**replay_config(asdict_of(trained)))  # the file the sweep writes, read back
    replayed = train(replay.resolve(), tmp_path / "replay", context)
    a, b = _weights(trained), _weights(replayed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    unchanged = train(base.resolve(), tmp_path / "unchanged", context)  # the change is real: without it, other weights
    assert not all(torch.equal(a[k], _weights(unchanged)[k]) for k in a)


def asdict_of(checkpoint) -> dict:
    return dict(load_checkpoint(checkpoint).training_state["config"])


def test_a_checkpoint_continues_only_a_run_that_trained_its_epochs_with_the_same_settings(tmp_path):
    config = TrainConfig(method="consistency", epochs=3, **QUICK, schedule=({"after_epoch": 1, "lbd": 3},))
    with pytest.raises(Interrupt):
        train(config.resolve(), tmp_path / "run", quiet_context(), _stop_after(2))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    later = replace(config, schedule=({"after_epoch": 1, "lbd": 3}, {"after_epoch": 2, "eta": 0.25}))
    check_same_run(checkpoint, later.resolve().config, "it")  # a change after the trained epochs: the same run
    other = replace(config, schedule=({"after_epoch": 1, "lbd": 2},))
    with pytest.raises(UserError, match="holds a run with other settings \\(schedule"):
        check_same_run(checkpoint, other.resolve().config, "it")


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([{"after_epoch": 0, "lbd": 2}], "after_epoch above the last one's \\(0\\)"),
        ([{"after_epoch": 2, "lbd": 2}, {"after_epoch": 2, "lbd": 3}], "above the last one's \\(2\\)"),
        ([{"after_epoch": 1, "sigma0": 0.5}], "sigma0 cannot change mid-run"),
        ([{"after_epoch": 1, "lbd": "x"}], "schedule after epoch 1: hyper-parameter lbd='x'"),
        ([{"after_epoch": 1, "bogus": 1}], "unknown hyper-parameter"),
        ({"after_epoch": 1}, "must be a list of changes"),
    ],
)
def test_a_schedule_is_refused_in_one_line_when_it_cannot_be_trained(schedule, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(method="catrs", **QUICK, schedule=schedule).resolve()


def test_the_schedule_table_names_the_member_that_trained_each_epoch_and_its_settings():
    config = {
        "epochs": 5,
        "method_config": {"lbd": 1.0, "epsilon": 0.5, "num_noises": 4},
        "schedule": ({"after_epoch": 2, "lbd": 1.2}, {"after_epoch": 4, "num_noises": 2}),
    }
    lineage = [{"trial": "A", "after_epoch": 0}, {"trial": "B", "after_epoch": 2}]
    table = schedule_table(config, lineage, ("lbd", "num_noises"))
    assert table.to_dict("list") == {
        "epoch": [1, 2, 3, 4, 5],
        "trained_by": ["A", "A", "B", "B", "B"],
        "lbd": [1.0, 1.0, 1.2, 1.2, 1.2],
        "num_noises": [4, 4, 4, 4, 2],
    }


def test_a_lineage_is_read_from_beside_a_checkpoint(tmp_path):
    assert read_lineage(tmp_path) == []
    (tmp_path / LINEAGE_FILE).write_text(json.dumps([{"trial": "A", "after_epoch": 0}]))
    assert read_lineage(tmp_path) == [{"trial": "A", "after_epoch": 0}]


POPULATION = {
    "name": "p",
    "method": "catrs",
    "dataset": "synthetic",
    "sigma": 0.25,
    "train": {"epochs": 4, "batch_size": 64},
    "fixed": {"num_steps": 1},
    "search": {
        "lbd": {"loguniform": [0.5, 2.0]},
        "epsilon": {"uniform": [0.25, 1.0]},
        "num_noises": {"choice": [2, 4]},
        "sigma0": {"choice": [0.25, 0.5]},
        "lr": {"loguniform": [0.01, 0.1]},
    },
    "points_to_evaluate": [{"lbd": 1.0, "epsilon": 1.0, "num_noises": 4, "sigma0": 0.25, "lr": 0.05}],
    "objective": "acr",
    "budget": {"scheduler": "pbt", "population": 4, "interval": 2},
}


def _space(tmp_path, **budget):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**POPULATION, "budget": {**POPULATION["budget"], **budget}}, sort_keys=False))
    return load_search_space(path)


def test_a_population_moves_what_a_run_may_change_mid_run_and_is_described_with_its_cost(tmp_path):
    pbt = _space(tmp_path)
    assert pbt.budget.num_samples == 4 and pbt.budget.move == ("lbd", "epsilon", "num_noises")  # not σ0 nor lr
    assert pbt.budget.rungs(pbt.epochs) == [2]  # the proxy after epoch 2 (and the last)
    assert pbt.budget.describe(pbt.epochs) == (
        "population-based training (PBT), each trial a member trained once; after epoch 2 the bottom 25% copy "
        "the top 25% and perturb lbd, epsilon, num_noises"
    )
    cost = expected_cost(pbt, 4)
    assert (cost["training_run_equivalents"], cost["proxy_evaluations"]) == (4.0, 8)
    assert _space(tmp_path, scheduler="pb2").budget.move == ("lbd", "epsilon")  # PB2 models numbers only


@pytest.mark.parametrize(
    "budget, key, message",
    [
        ({"move": ["sigma0"]}, "budget.move", "sigma0 cannot move: decides the soft labels"),
        ({"move": ["lr"]}, "budget.move", "lr cannot move: a training-schedule setting"),
        ({"move": ["momentum"]}, "budget.move", "'momentum' is not searched"),
        ({"scheduler": "pb2", "move": ["num_noises"]}, "budget.move", "num_noises cannot move: PB2's bandit models"),
        ({"population": 1}, "budget.population", "needs at least 2 members"),
        ({"interval": 4}, "budget.interval", "4 is not below the last epoch \\(4\\)"),
        ({"quantile": 0.6}, "budget.quantile", "must be in \\(0, 0.5\\]"),
        ({"num_samples": 4}, "budget.num_samples", "a population sweep trains each member once: give `population`"),
        ({"scheduler": "asha", "population": 4}, "budget.population", "applies to a population sweep only"),
    ],
)
def test_population_mistakes_name_the_file_and_the_key(tmp_path, budget, key, message):
    with pytest.raises(UserError, match=f"p.yaml: {key}: {message}"):
        _space(tmp_path, **budget)


def test_a_population_trains_each_member_in_one_worker(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**POPULATION, "resources": {"workers": 2}}))
    with pytest.raises(UserError, match="resources.workers: a population trains each member in one worker"):
        load_search_space(path)


def test_optuna_draws_the_papers_point_first_then_spread_members_and_keeps_the_study(tmp_path):
    space = _space(tmp_path)
    members = draw_population(population_study(space, tmp_path), space)
    assert len(members) == 4 and members[0] == POPULATION["points_to_evaluate"][0]
    assert len({m["lbd"] for m in members}) == 4 and all(space.search[k].contains(m[k]) for m in members for k in m)
    again = draw_population(population_study(space, tmp_path / "again"), space)
    assert again == members  # seeded by the file's seed
    assert len(population_study(space, tmp_path).trials) == 4  # kept in the sweep's folder


def test_a_refit_of_a_population_member_replays_its_schedule_on_the_whole_training_split(tmp_path):
    """`selection.refit` trains the chosen member's schedule again on `train`, from the checkpoint the
    selection fetched for it."""
    space = _space(tmp_path)
    trial = space.resolve({**space.first_point(), "lr": 0.02})  # a member whose teacher is the first point's
    member = replace(trial.config, schedule=({"after_epoch": 2, "lbd": 1.5},)).resolve(trial.teacher_schedule)
    (tmp_path / "trials" / "m").mkdir(parents=True)
    save_checkpoint(
        tmp_path / "trials" / "m" / "checkpoint.pt",
        member.card().build_model(),
        member.card(),
        {"config": asdict(member.config), "next_epoch": 4, "history": []},
    )
    refit = _refit_run(space, Candidate("m", {"lbd": 1.5}, 0.5, None), tmp_path)
    assert refit.config.train_split == "train" and refit.config.schedule == ({"after_epoch": 2, "lbd": 1.5},)
    assert refit.config.method_config == member.config.method_config and refit.config.lr == 0.02
    assert refit.config.teacher_training == {"lr": 0.05}  # the sweep's teacher (its first point's), as before
