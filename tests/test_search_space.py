"""Search-space files: every shipped file validates, and each kind of mistake names the file and the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from catrs.errors import UserError
from catrs.sweep.space import find_search_space, load_search_space, shipped_spaces

SHIPPED = Path(__file__).parents[1] / "search_spaces"  # installed as the data package catrs.search_spaces
SPACES = sorted(SHIPPED.glob("*.yaml"))
VALID = {
    "name": "t",
    "method": "catrs",
    "dataset": "synthetic",
    "sigma": 0.25,
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
    assert {
        f"cifar10_{m}" for m in ("gaussian", "stability", "smoothadv", "macer", "consistency", "smoothmix")
    } <= names
    assert "demo_digits" in names
    assert {f"tradeoff_digits_{m}" for m in ("catrs", "consistency", "smoothmix")} <= names


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_validates_and_shows_its_command(path):
    space = load_search_space(path)
    assert f"catrs tune {path.stem}" in path.read_text().split("\n\n")[0]
    config = space.resolve(space.first_point()).config
    assert config.method == space.method and config.sigma == space.sigma


def test_the_paper_setting_is_the_first_point():
    space = load_search_space(find_search_space("catrs_cifar10"))
    hyper = space.resolve(space.first_point()).config.method_config
    assert (hyper["lbd"], hyper["num_noises"], hyper["epsilon"], hyper["num_steps"], hyper["sigma0"]) == (
        1.0,
        4,
        1.0,
        4,
        0.25,
    )


@pytest.mark.parametrize("method, knob", [("catrs", "lbd"), ("consistency", "lbd"), ("smoothmix", "eta")])
def test_the_trade_off_spaces_run_their_whole_grid_on_one_schedule(method, knob):
    """Figure 2(c)'s sweeps vary one knob each; every grid value is a point, each trial runs to the end, and the
    three share the training schedule and the proxy, so their frontiers are comparable."""
    space = load_search_space(find_search_space(f"tradeoff_digits_{method}"))
    demo = load_search_space(find_search_space("demo_digits"))
    assert space.method == method and list(space.search) == [knob] and space.search[knob].kind == "choice"
    assert [point[knob] for point in space.points_to_evaluate] == list(space.search[knob].values)
    assert space.budget.num_samples == len(space.points_to_evaluate) and space.budget.scheduler == "none"
    assert (space.dataset, space.sigma, space.train) == (demo.dataset, demo.sigma, demo.train)
    assert space.budget.rungs(space.epochs) == []  # one proxy certification per trial, at its last epoch


def test_a_shipped_space_is_found_by_name_with_or_without_its_suffix():
    assert shipped_spaces() == [p.stem for p in SPACES]
    for given in ("demo_digits", "demo_digits.yaml"):
        found = find_search_space(given)
        assert found.samefile(SHIPPED / "demo_digits.yaml")


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert find_search_space(path) == path and find_search_space(str(path)) == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_digits.yaml").write_text(yaml.safe_dump(VALID))
    assert find_search_space("demo_digits.yaml") == Path("demo_digits.yaml")  # the file here, not the shipped one
    assert find_search_space("demo_digits").samefile(SHIPPED / "demo_digits.yaml")  # no file of that name here


def test_an_unknown_name_lists_the_shipped_spaces_and_a_missing_path_is_named(tmp_path):
    with pytest.raises(UserError) as error:
        find_search_space("nosuchspace")
    message = str(error.value)
    assert "'nosuchspace' is neither a file nor a shipped space" in message
    assert all(name in message for name in shipped_spaces())
    with pytest.raises(UserError, match="search space not found: .*absent.yaml$"):
        find_search_space(tmp_path / "absent.yaml")


def test_cli_tune_of_an_unknown_name_is_one_line_exit_2(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("tune", "nosuchspace")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("catrs: error:"), err
    assert "'nosuchspace' is neither a file nor a shipped space" in err and "demo_digits" in err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_resolves_and_validates_as_the_command_would_and_starts_nothing(run_cli, tmp_path, monkeypatch):
    import re

    from catrs.sweep.ledger import expected_cost

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("demo", "--dry-run")
    assert code == 0, err
    first, sweep, cost, last = out.splitlines()
    assert first == f"search space: {(SHIPPED / 'demo_digits.yaml').resolve()} (valid)"
    demo = load_search_space(SHIPPED / "demo_digits.yaml")
    assert re.fullmatch(
        r"sweep demo_digits-\d{8}-\d{6}: catrs on digits \(digits_cnn_bn\) at σ = 0.5, searching lbd, "
        rf"epsilon, num_noises, sigma0, confidence_mask; {demo.budget.num_samples} trials, "
        rf"{demo.budget.max_concurrent} at a time, {re.escape(demo.budget.describe(demo.epochs))}",
        sweep,
    ), sweep
    assert "population-based training" in sweep and "perturb lbd, epsilon, num_noises" in sweep
    expected = expected_cost(demo, demo.budget.num_samples)["training_run_equivalents"]
    assert cost.startswith(f"expected cost: ≈ {expected:.2f} training-run equivalents in trials, 2 teacher run(s)")
    assert last == "dry run: nothing started"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(VALID))
    code, out, err = run_cli("tune", "mine.yaml", "--dry-run", "--num-samples", "3")
    assert code == 0 and "sweep t: catrs on synthetic at σ = 0.25" in out and "; 3 trials, 1 at a time" in out, err
    for budget, cut in (
        ({"scheduler": "halving", "reduction_factor": 3}, "synchronous halving at epoch 1 (η = 3)"),
        ({"scheduler": "asha", "first_rung": 1}, "ASHA at epoch 1 (η = 2)"),
        ({"fidelity": "fraction", "min_fraction": 0.25}, "ASHA at 1/4, 1/2 of the steps (η = 2)"),
    ):
        (tmp_path / "cut.yaml").write_text(yaml.safe_dump({**VALID, "budget": budget}))
        code, out, err = run_cli("tune", "cut.yaml", "--dry-run")
        assert code == 0 and f"1 at a time, {cut}\n" in out, err
    (tmp_path / "cut.yaml").unlink()
    code, _, err = run_cli("tune", "mine.yaml", "--dry-run", "--num-samples", "0")
    assert code == 2 and "--num-samples must be a positive integer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]  # no MLflow store, no runs/


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
    (
        "range beyond the method's domain",
        "search.lbd",
        {"uniform": [-1.0, 1.0]},
        "search.lbd: hyper-parameter lbd must",
    ),
    (
        "choice beyond the domain",
        "search.num_noises",
        {"choice": [0, 4]},
        "search.num_noises: hyper-parameter num_noises",
    ),
    ("loguniform through zero", "search.lbd", {"loguniform": [0.0, 1.0]}, "loguniform needs low > 0"),
    ("two kinds in one range", "search.lbd", {"uniform": [0, 1], "choice": [1]}, "give exactly one of"),
    ("empty choice", "search.lbd", {"choice": []}, "choice needs a non-empty list"),
    ("sigma0 not a choice", "search.sigma0", {"uniform": [0.25, 0.5]}, "search.sigma0: must be a choice"),
    ("searching sigma", "search.sigma", {"choice": [0.25, 0.5]}, "search.sigma: σ is what a result is certified at"),
    ("fixed and searched", "fixed.lbd", 1.0, "search.lbd: also given as a fixed value"),
    (
        "point outside the range",
        "points_to_evaluate",
        [{"lbd": 9.0, "sigma0": 0.25}],
        "points_to_evaluate[0].lbd: 9.0 lies outside",
    ),
    ("point missing a key", "points_to_evaluate", [{"lbd": 1.0}], "points_to_evaluate[0]: must set exactly"),
    ("unknown objective", "objective", "accuracy", "objective: expected acr"),
    ("alpha out of range", "proxy.alpha", 1.5, "proxy.alpha: must lie strictly between"),
    ("alpha of one half", "final.alpha", 0.5, "final.alpha: must lie strictly between 0 and 0.5"),
    ("selection alpha above one half", "selection.alpha", 0.6, "selection.alpha: must lie strictly between 0 and 0.5"),
    ("zero proxy samples", "proxy.n", 0, "proxy.n: must be a positive integer, got 0"),
    ("negative tolerance", "final", {"adaptive": True, "tolerance": -0.1}, "final.tolerance: must lie between 0"),
    ("adaptive not a flag", "proxy.adaptive", "yes", "proxy.adaptive: expected bool"),
    ("no validation candidates", "selection.top_k", 0, "selection.top_k: must be at least 1"),
    ("negative selection images", "selection.images", -1, "selection.images: must be 0 (all) or more"),
    ("refit not a flag", "selection.refit", "yes", "selection.refit: expected bool"),
    ("a rung at the last epoch", "budget.first_rung", 2, "budget.first_rung: 2 is not below the last epoch (2)"),
    ("wrong type", "budget.num_samples", "many", "budget.num_samples: expected int"),
    ("unknown scheduler", "budget.scheduler", "hyperband", "budget.scheduler: expected asha, halving, pbt, pb2, none"),
    ("zero workers", "resources.workers", 0, "resources.workers: must be at least 1"),
    ("unknown fidelity", "budget.fidelity", "steps", "budget.fidelity: expected epochs or fraction"),
    (
        "a fraction off the ladder",
        "budget",
        {"fidelity": "fraction", "min_fraction": 0.2},
        "budget.min_fraction: must be",
    ),
    ("a fraction of one", "budget", {"fidelity": "fraction", "min_fraction": 1.0}, "budget.min_fraction: must be"),
    ("rungs nobody cuts", "budget", {"fidelity": "fraction", "scheduler": "none"}, "fraction needs scheduler: asha"),
    (
        "halving by fraction",
        "budget",
        {"fidelity": "fraction", "scheduler": "halving"},
        "halving compares trials at epochs",
    ),
    (
        "halving with no rung",
        "budget",
        {"scheduler": "halving", "first_rung": 2},
        "budget.first_rung: 2 is not below the last epoch (2): the halving scheduler",
    ),
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
    from catrs.sweep.proxy import proxy_of
    from tests.helpers import quiet_context

    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump({**VALID, "train": {"epochs": 20}, "budget": {"first_rung": 3, "reduction_factor": 2}})
    )
    space = load_search_space(path)
    assert space.budget.rungs(20) == [3, 6, 12]
    proxy = proxy_of(space, quiet_context())
    assert [epoch + 1 for epoch in range(20) if proxy.due(epoch, 20)] == [3, 6, 12, 20]
    assert space.metric == "val_acr" and space.selection.refit is False


def test_budgeted_rungs_climb_from_the_least_fraction_to_the_whole_run_on_ashas_clock(tmp_path):
    from catrs.sweep.proxy import proxy_of
    from tests.helpers import quiet_context

    path = tmp_path / "space.yaml"
    budget = {"fidelity": "fraction", "min_fraction": 0.111, "reduction_factor": 3}
    path.write_text(yaml.safe_dump({**VALID, "train": {"epochs": 8}, "budget": budget}))
    space = load_search_space(path)
    ladder = space.budget.ladder()
    assert [(r.fraction, r.budget, r.previous) for r in ladder] == [(1 / 9, 1, 0), (1 / 3, 3, 1), (1.0, 9, 3)]
    assert space.budget.rungs(8) == []  # no epoch rungs: the proxy runs at each rung's last epoch only
    proxy = proxy_of(space, quiet_context())
    assert [epoch + 1 for epoch in range(8) if proxy.due(epoch, 8)] == [8]


def test_trials_hold_out_val_and_the_selection_defaults_to_the_final_protocol(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**VALID, "final": {"n": 3000, "alpha": 0.01}, "selection": {"top_k": 2}}))
    space = load_search_space(path)
    assert space.resolve(space.first_point()).config.train_split == "train_minus_val"
    assert space.resolve(space.first_point(), train_split="train").config.train_split == "train"
    assert (space.selection.n, space.selection.alpha, space.selection.top_k) == (3000, 0.01, 2)
    assert not space.selection.adaptive and not space.proxy.adaptive
    path.write_text(yaml.safe_dump({**VALID, "final": {"n": 3000, "adaptive": True, "tolerance": 0.05}}))
    adaptive = load_search_space(path)
    assert (adaptive.selection.adaptive, adaptive.selection.tolerance, adaptive.selection.n) == (True, 0.05, 3000)
    assert adaptive.final.protocol().procedure == "adaptive"


def test_optuna_learns_a_stopped_trial_as_pruned_and_a_trained_out_one_as_complete():
    import optuna
    from ray import tune

    from catrs.distributed.tune import PrunedAwareOptunaSearch

    search = PrunedAwareOptunaSearch(
        8,
        space={"lbd": tune.loguniform(0.25, 4.0)},
        metric="val_acr",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    for trial, (epochs, value) in {"stopped": ((4,), 0.30), "trained out": ((4, 8), 0.25)}.items():
        search.suggest(trial)
        for step, epoch in enumerate(epochs, 1):
            search.on_trial_result(trial, {"val_acr": value, "epoch": epoch, "training_iteration": step})
        search.on_trial_complete(trial, {"val_acr": value, "epoch": epochs[-1]})
    search.suggest("stopped at a rung")  # every epoch of its budgeted run, but not every step
    search.on_trial_result(
        "stopped at a rung", {"val_acr": 0.4, "epoch": 8, "fraction": 1 / 9, "training_iteration": 8}
    )
    search.on_trial_complete("stopped at a rung", {"val_acr": 0.4, "epoch": 8, "fraction": 1 / 9})
    stopped, trained_out, at_a_rung = search._ot_study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.intermediate_values == {1: 0.30}
    assert trained_out.state == optuna.trial.TrialState.COMPLETE and trained_out.value == 0.25
    assert at_a_rung.state == optuna.trial.TrialState.PRUNED and at_a_rung.intermediate_values == {8: 0.4}


@pytest.mark.parametrize(
    "key, domain",
    [("teacher_noises", {"choice": [100, 1000]}), ("soft_labels", {"choice": ["teacher", "mean_softmax"]})],
)
def test_what_decides_the_shared_soft_labels_cannot_be_searched(tmp_path, key, domain):
    path = tmp_path / "space.yaml"
    catrs = {**VALID, "method": "catrs", "search": {"lbd": {"uniform": [0.5, 2.0]}, key: domain}}
    catrs.pop("points_to_evaluate", None)
    path.write_text(yaml.safe_dump(catrs))
    with pytest.raises(UserError, match=f"search.{key}: decides the soft labels every trial shares"):
        load_search_space(path)


def test_trials_that_share_a_sigma0_share_one_teacher_whatever_schedule_they_search(tmp_path):
    path = tmp_path / "space.yaml"
    space_file = {
        **VALID,
        "method": "catrs",
        "search": {"lr": {"loguniform": [0.01, 0.1]}, "sigma0": {"choice": [0.25, 0.5]}},
    }
    space_file.pop("points_to_evaluate", None)
    path.write_text(yaml.safe_dump(space_file))
    space = load_search_space(path)
    keys = {space.resolve({"lr": lr, "sigma0": s}).soft_labels().key() for lr in (0.01, 0.05) for s in (0.25, 0.5)}
    assert keys == {space.resolve(point).soft_labels().key() for point in space.teacher_points()}
    assert len(keys) == 2


def test_asha_on_budgeted_rungs_cuts_only_at_a_rungs_end_and_keeps_the_better_half(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from catrs.distributed.tune import scheduler

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**VALID, "budget": {"fidelity": "fraction", "min_fraction": 0.25}}))
    asha = scheduler(load_search_space(path))
    asha.set_search_properties("val_acr", "max")
    trials = [SimpleNamespace(trial_id=name) for name in ("good", "bad", "better")]
    for trial in trials:
        asha.on_trial_add(None, trial)

    def report(trial, budget: int, value: float) -> str:
        return asha.on_trial_result(None, trial, {"budget": budget, "val_acr": value})

    good, bad, better = trials
    assert report(good, 0, math.nan) == TrialScheduler.CONTINUE  # an epoch inside the first rung: no figure
    assert report(good, 1, 0.5) == TrialScheduler.CONTINUE  # the first at a rung goes on
    assert report(good, 1, math.nan) == TrialScheduler.CONTINUE  # training the next rung: compared already
    assert report(bad, 1, 0.2) == TrialScheduler.STOP  # below the better half of those at the rung
    assert report(better, 1, 0.7) == TrialScheduler.CONTINUE
    assert report(better, 2, 0.8) == TrialScheduler.CONTINUE and report(better, 4, 0.9) == TrialScheduler.STOP
