"""Search-space files: every shipped file validates, and each kind of mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from catrs.errors import UserError
from catrs.search_space import load_search_space

SPACES = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
VALID = {
    "name": "t", "method": "catrs", "dataset": "synthetic", "sigma": 0.25,
    "train": {"epochs": 2, "batch_size": 64},
    "fixed": {"num_steps": 1},
    "search": {"lbd": {"loguniform": [0.5, 2.0]}, "sigma0": {"choice": [0.25, 0.5]}},
    "points_to_evaluate": [{"lbd": 1.0, "sigma0": 0.25}],
    "objective": "acr",
    "proxy": {"n": 64, "images": 16},
}


def test_the_published_settings_and_the_demo_are_shipped():
    names = {p.stem for p in SPACES}
    assert {f"catrs_{d}" for d in ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet")} <= names
    assert {f"cifar10_{m}" for m in ("gaussian", "stability", "smoothadv", "macer", "consistency", "smoothmix")} <= names
    assert "demo_digits" in names
    assert {f"tradeoff_digits_{m}" for m in ("catrs", "consistency", "smoothmix")} <= names


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_validates_and_shows_its_command(path):
    space = load_search_space(path)
    assert f"catrs tune search_spaces/{path.name}" in path.read_text().split("\n\n")[0]
    config = space.train_config(space.first_point())
    assert config.method == space.method and config.sigma == space.sigma


def test_the_paper_setting_is_the_first_point():
    space = load_search_space(Path(__file__).parents[1] / "search_spaces" / "catrs_cifar10.yaml")
    hyper = space.train_config(space.first_point()).method_config
    assert (hyper["lbd"], hyper["num_noises"], hyper["epsilon"], hyper["num_steps"], hyper["sigma0"]) == (1.0, 4, 1.0, 4, 0.25)


@pytest.mark.parametrize("method, knob", [("catrs", "lbd"), ("consistency", "lbd"), ("smoothmix", "eta")])
def test_the_trade_off_spaces_run_their_whole_grid_on_one_schedule(method, knob):
    """Figure 2(c)'s sweeps vary one knob each; every grid value is a point, each trial runs to the end, and the
    three share the training schedule and the proxy, so their frontiers are comparable."""
    space = load_search_space(Path(__file__).parents[1] / "search_spaces" / f"tradeoff_digits_{method}.yaml")
    demo = load_search_space(Path(__file__).parents[1] / "search_spaces" / "demo_digits.yaml")
    assert space.method == method and list(space.search) == [knob] and space.search[knob].kind == "choice"
    assert [point[knob] for point in space.points_to_evaluate] == list(space.search[knob].values)
    assert space.budget.num_samples == len(space.points_to_evaluate) and space.budget.scheduler == "none"
    assert (space.dataset, space.sigma, space.train) == (demo.dataset, demo.sigma, demo.train)
    assert space.budget.rungs(space.epochs) == []  # one proxy certification per trial, at its last epoch


def _edit(data: dict, path: str, value):
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(last)
    else:
        node[last] = value


CASES = [
    ("unknown top-level key", "budgett", {}, "budgett: unknown key"),
    ("unknown method", "method", "trades", "method: unknown method 'trades'"),
    ("unknown dataset", "dataset", "svhn", "dataset: unknown dataset 'svhn'"),
    ("unknown arch", "arch", "vgg", "arch: unknown architecture 'vgg'"),
    ("negative sigma", "sigma", -0.5, "sigma: must be a positive number"),
    ("missing objective", "objective", ..., "objective: missing"),
    ("typo in a searched hyper-parameter", "search.lbdd", {"uniform": [0, 1]}, "search.lbdd: unknown key"),
    ("typo in a fixed hyper-parameter", "fixed.num_step", 2, "fixed: unknown hyper-parameter(s) num_step"),
    ("unknown train setting", "train.learning_rate", 0.1, "train.learning_rate: unknown key"),
    ("impossible range", "search.lbd", {"uniform": [2.0, 1.0]}, "search.lbd: impossible range"),
    ("loguniform through zero", "search.lbd", {"loguniform": [0.0, 1.0]}, "loguniform needs low > 0"),
    ("two kinds in one range", "search.lbd", {"uniform": [0, 1], "choice": [1]}, "give exactly one of"),
    ("empty choice", "search.lbd", {"choice": []}, "choice needs a non-empty list"),
    ("sigma0 not a choice", "search.sigma0", {"uniform": [0.25, 0.5]}, "search.sigma0: must be a choice"),
    ("searching sigma", "search.sigma", {"choice": [0.25, 0.5]}, "search.sigma: σ is what a result is certified at"),
    ("fixed and searched", "fixed.lbd", 1.0, "search.lbd: also given as a fixed value"),
    ("point outside the range", "points_to_evaluate", [{"lbd": 9.0, "sigma0": 0.25}],
     "points_to_evaluate[0].lbd: 9.0 lies outside"),
    ("point missing a key", "points_to_evaluate", [{"lbd": 1.0}], "points_to_evaluate[0]: must set exactly"),
    ("unknown objective", "objective", "accuracy", "objective: expected acr"),
    ("alpha out of range", "proxy.alpha", 1.5, "proxy.alpha: must lie strictly between"),
    ("zero proxy samples", "proxy.n", 0, "proxy.n: must be at least 1"),
    ("no validation candidates", "selection.top_k", 0, "selection.top_k: must be at least 1"),
    ("negative selection images", "selection.images", -1, "selection.images: must be 0 (all) or more"),
    ("refit not a flag", "selection.refit", "yes", "selection.refit: expected bool"),
    ("a rung at the last epoch", "budget.first_rung", 2, "budget.first_rung: 2 is not below the last epoch (2)"),
    ("wrong type", "budget.num_samples", "many", "budget.num_samples: expected int"),
    ("unknown scheduler", "budget.scheduler", "hyperband", "budget.scheduler: expected asha or none"),
    ("zero workers", "resources.workers", 0, "resources.workers: must be at least 1"),
]


@pytest.mark.parametrize("case,key,value,message", CASES, ids=[c[0] for c in CASES])
def test_mistakes_name_the_file_and_the_key(tmp_path, case, key, value, message):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    _edit(data, key, value)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as error:
        load_search_space(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)


def test_broken_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("search: {lbd: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_search_space(broken)
    with pytest.raises(UserError, match="search space not found"):
        load_search_space(tmp_path / "absent.yaml")


def test_cli_tune_refuses_a_bad_space_in_one_line(run_cli, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**VALID, "method": "trades"}))
    code, _, err = run_cli("tune", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown method 'trades'" in err


OLD_KEYS = [
    ("objective", {"metric": "acr", "proxy": {"n": 64}}, "objective.proxy: the proxy is the top-level section"),
    ("objective", {"metric": "acr"}, "objective.metric: give the metric alone"),
    ("proxy", {"n": 64, "subset": 16}, "proxy.subset: renamed `images`"),
    ("proxy", {"n": 64, "every": 2}, "proxy.every: the proxy runs at ASHA's rungs"),
    ("budget", {"scheduler": "asha", "grace_period": 2}, "budget.grace_period: replaced by `first_rung`"),
    ("final", {"n": 100, "shards": 2}, "final.shards: renamed `workers`"),
]


@pytest.mark.parametrize("section,value,message", OLD_KEYS, ids=[m.split(":")[0] for _, _, m in OLD_KEYS])
def test_keys_of_the_old_format_name_the_file_the_key_and_what_became_of_it(tmp_path, section, value, message):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**VALID, section: value}))
    with pytest.raises(UserError) as error:
        load_search_space(path)
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)


def test_asha_compares_trials_at_geometric_rungs_below_the_last_epoch_and_the_proxy_runs_there(tmp_path):
    from catrs.distributed.sweep import proxy_of

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**VALID, "train": {"epochs": 20}, "budget": {"first_rung": 3,
                                                                                   "reduction_factor": 2}}))
    space = load_search_space(path)
    assert space.budget.rungs(20) == [3, 6, 12]
    proxy = proxy_of(space, None, False)
    assert [epoch + 1 for epoch in range(20) if proxy.due(epoch, 20)] == [3, 6, 12, 20]
    assert space.metric == "val_acr" and space.selection.refit is False


def test_trials_hold_out_val_and_the_selection_defaults_to_the_final_protocol(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**VALID, "final": {"n": 3000, "alpha": 0.01}, "selection": {"top_k": 2}}))
    space = load_search_space(path)
    assert space.train_config(space.first_point()).train_split == "train_minus_val"
    assert space.train_config(space.first_point(), train_split="train").train_split == "train"
    assert (space.selection.n, space.selection.alpha, space.selection.top_k) == (3000, 0.01, 2)


def test_optuna_learns_a_stopped_trial_as_pruned_and_a_trained_out_one_as_complete():
    import optuna
    from ray import tune

    from catrs.distributed.sweep import PrunedAwareOptunaSearch

    search = PrunedAwareOptunaSearch(8, space={"lbd": tune.loguniform(0.25, 4.0)}, metric="val_acr", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=0))
    for trial, (epochs, value) in {"stopped": ((4,), 0.30), "trained out": ((4, 8), 0.25)}.items():
        search.suggest(trial)
        for step, epoch in enumerate(epochs, 1):
            search.on_trial_result(trial, {"val_acr": value, "epoch": epoch, "training_iteration": step})
        search.on_trial_complete(trial, {"val_acr": value, "epoch": epochs[-1]})
    stopped, trained_out = search._ot_study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.intermediate_values == {1: 0.30}
    assert trained_out.state == optuna.trial.TrialState.COMPLETE and trained_out.value == 0.25
