"""Sweep definitions: one YAML file per sweep, validated before anything starts.

    catrs tune demo_digits          (a shipped space, by name: `find_search_space`; or any FILE.yaml)

A file names the method, data set, architecture and σ; the fixed training settings (`train`) and method
hyper-parameters (`fixed`); the ranges to search (`search`: loguniform / uniform / int / choice); the points
to evaluate first (`points_to_evaluate`, the paper's settings); the objective (`objective`: acr,
certified_accuracy_R or auc_R) and how a sweep measures it — the cheap `proxy` certification of the val split
at each of ASHA's rungs and at the last epoch, the `selection` of the winner among the trials trained to
their end (the top-k re-certified on val; optionally re-trained on the whole training split), and the
`final` certification of the winner, the only one on the test split; the `budget` and the `resources` of a
trial. Every trial trains on `train_minus_val`, so nothing that chooses ever sees the test split. Every mistake
is a `UserError` naming the file and the key, old keys included. The same file drives
`catrs train --config FILE` through its first point.

The keys a file may give or search come from the code they configure: the schedule keys and the searchable
ones from `catrs.train.TrainConfig`, a method's hyper-parameters from its config type, and which of those
need a teacher per value (searched only as a choice) or decide the soft labels every trial shares (never
searched) from the method itself (`trainables.base.Method`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

import trainables
from catrs.data import dataset_names
from catrs.errors import UserError
from catrs.models import model_names
from catrs.sampling import SamplingProtocol
from catrs.sweep.trial import share
from catrs.train import Rung, RunSpec, TrainConfig, WorkerPlan, schedule_keys, searchable_keys

TOP_LEVEL = {
    "name",
    "method",
    "dataset",
    "arch",
    "sigma",
    "seed",
    "train",
    "fixed",
    "search",
    "points_to_evaluate",
    "objective",
    "proxy",
    "selection",
    "final",
    "budget",
    "resources",
}
# Keys of earlier versions of the format, and what became of them.
MOVED = {
    "objective.proxy": "the proxy is the top-level section `proxy` now, and certifies the val split, not test",
    "objective.metric": "give the metric alone, e.g. `objective: acr`",
    "proxy.subset": "renamed `images`: how many val images each proxy certifies",
    "proxy.every": "the proxy runs at ASHA's rungs (`budget.first_rung`) and at the last epoch",
    "final.shards": "renamed `workers`: how many Ray workers certify chunks of the test split at once",
    "budget.grace_period": "replaced by `first_rung`, counted in epochs: ASHA compares trials at epochs "
    "first_rung·reduction_factor^k",
}
DOMAIN_KINDS = ("loguniform", "uniform", "int", "choice")
NUMERIC = ("loguniform", "uniform", "int")
POPULATION_SCHEDULERS = ("pbt", "pb2")  # a population that trains once (`catrs.sweep.population`)
OBJECTIVE = re.compile(r"^(acr|certified_accuracy_(\d+(\.\d+)?)|auc_(\d+(\.\d+)?))$")


@dataclass(frozen=True)
class Domain:
    """A range to search: loguniform/uniform [low, high], int [low, high] (both inclusive), or a choice."""

    kind: str
    values: tuple[Any, ...]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        low, high = self.values
        if self.kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class Proxy(SamplingProtocol):
    """The cheap certification each trial reports at ASHA's rungs and its last epoch: `images` val images
    spread evenly over the split, small n; images whose selected class is wrong get no estimation samples."""

    n0: int = 50
    n: int = 500
    images: int = 500


@dataclass(frozen=True)
class Selection(SamplingProtocol):
    """How the winner is chosen among the trials trained to their end: the `top_k` by their last proxy are
    certified on `images` val images (0: all) with this protocol (by default the final one), and the best
    wins. `refit` trains the winning setting again on the whole training split before the test
    certification. Off by default: then the model certified on test is the very model the selection
    validated, and no second teacher or training run is spent; the files of the published settings turn it
    on, so that their final model, like the published ones, has seen the whole training split."""

    top_k: int = 3
    images: int = 0
    refit: bool = False


@dataclass(frozen=True)
class Final(SamplingProtocol):
    """The certification of the winner on the test split: every `skip`-th image below `max`, by `workers` Ray
    workers pulling chunks of images (1: in the driver's process)."""

    skip: int = 1
    max: int = -1
    workers: int = 1


@dataclass(frozen=True)
class Budget:
    """How many trials, how many at once, and how they are cut: by ASHA (`scheduler: asha`) at epochs
    (`fidelity: epochs`: a trial trains on and is compared after first_rung · η^k epochs) or at budgets
    (`fidelity: fraction`: a trial trains its whole schedule in min_fraction · η^k of the steps, from scratch
    at each rung, and is compared after each), or by synchronous halving (`scheduler: halving`, epochs only:
    each rung waits for all its trials and keeps the best ⌈n/η⌉, `catrs.distributed.halving`), η being
    `reduction_factor`. Or a population that trains once (`scheduler: pbt | pb2`, `catrs.sweep.population`):
    `population` members (the file's key for `num_samples`) train side by side, and after every `interval`
    epochs the bottom `quantile` of them copy the weights of the top and perturb the settings in `move`."""

    num_samples: int = 8
    max_concurrent: int = 1
    scheduler: str = "asha"  # or "halving", "pbt", "pb2", or "none"
    fidelity: str = "epochs"  # or "fraction"
    first_rung: int = 1  # epochs (fidelity: epochs)
    min_fraction: float = 1 / 9  # of the steps (fidelity: fraction): reduction_factor^-k
    reduction_factor: int = 2
    interval: int = 1  # pbt, pb2: epochs between a member's exploit-and-explore steps
    quantile: float = 0.25  # pbt, pb2: the share at the bottom that copies the share at the top
    resample_probability: float = 0.25  # pbt: how often a moved setting is drawn anew rather than perturbed
    move: tuple[str, ...] = field(default=(), metadata={"type": list})  # pbt, pb2: the settings that move
    synch: bool = False  # pbt, pb2: every member waits at each interval for the others (and restarts after it)

    @property
    def population(self) -> bool:
        return self.scheduler in POPULATION_SCHEDULERS

    def rungs(self, epochs: int) -> list[int]:
        """The epochs at which the scheduler compares trials: truncated ones (none without a scheduler, or by
        fraction), or a population's members (every `interval` epochs before the last)."""
        rungs: list[int] = []
        if self.population:
            return list(range(self.interval, epochs, self.interval))
        if self.scheduler in ("asha", "halving") and self.fidelity == "epochs":
            while (rung := self.first_rung * self.reduction_factor ** len(rungs)) < epochs:
                rungs.append(rung)
        return rungs

    def describe(self, epochs: int) -> str:
        """How trials are cut, in words: `catrs tune --dry-run` says it."""
        eta = f"η = {self.reduction_factor}"
        if self.population:
            return describe_population(self, epochs)
        if ladder := self.ladder():
            return f"ASHA at {', '.join(share(r.fraction) for r in ladder[:-1])} of the steps ({eta})"
        if rungs := self.rungs(epochs):
            name = "synchronous halving" if self.scheduler == "halving" else "ASHA"
            return f"{name} at epoch{'s' if len(rungs) > 1 else ''} {', '.join(map(str, rungs))} ({eta})"
        return "every trial trained out"

    def ladder(self) -> tuple[Rung, ...]:
        """The fractions of the steps a trial climbs (fidelity: fraction), on ASHA's clock 1, η, …, η^k."""
        if self.scheduler != "asha" or self.fidelity != "fraction":
            return ()
        steps = round(math.log(1 / self.min_fraction, self.reduction_factor))
        clock = [self.reduction_factor**k for k in range(steps + 1)]
        return tuple(Rung(k, budget / clock[-1], budget, clock[k - 1] if k else 0) for k, budget in enumerate(clock))


@dataclass(frozen=True)
class Resources:
    workers: int = 1  # >1: each trial trains with Ray Train (DDP)
    # None: one per worker where the cluster has or can get GPUs, else none
    gpus_per_worker: float | None = field(default=None, metadata={"type": float})
    cpus_per_worker: float = 1.0

    def plan(self, max_failures: int = 3) -> WorkerPlan:
        """A trial's (or the refit's) workers, as `catrs.distributed.train` spreads a run over them."""
        return WorkerPlan(self.workers, self.gpus_per_worker, self.cpus_per_worker, max_failures=max_failures)


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    name: str
    method: str
    dataset: str
    arch: str | None
    sigma: float
    seed: int
    train: dict[str, Any]
    fixed: dict[str, Any]
    search: dict[str, Domain]
    points_to_evaluate: list[dict[str, Any]]
    objective: str
    proxy: Proxy = field(default_factory=Proxy)
    selection: Selection = field(default_factory=Selection)
    final: Final = field(default_factory=Final)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    registered_name: str = ""  # the registered model's name, where it is not the sweep's (the demo's)

    @property
    def model_name(self) -> str:
        """The registered model every sweep of this space adds a version to."""
        return self.registered_name or self.name

    @property
    def metric(self) -> str:
        """What trials report and the sweep maximises: the objective on the val split (`val_acr`)."""
        return f"val_{self.objective}"

    def trials(self, num_samples: int | None = None) -> int:
        """How many trials the sweep runs: `--num-samples` where given, else the file's budget."""
        trials = self.budget.num_samples if num_samples is None else num_samples
        if trials < 1:
            raise UserError(f"--num-samples must be a positive integer, got {trials}")
        return trials

    @property
    def epochs(self) -> int:
        return self.resolve(self.first_point()).config.epochs

    def settings(self, point: dict[str, Any], train_split: str = "train_minus_val") -> TrainConfig:
        """The training settings of one point of the space (sampled values over the fixed ones)."""
        schedule = searchable_keys()
        train = {**self.train, **{k: v for k, v in point.items() if k in schedule}}
        hyper = {**self.fixed, **{k: v for k, v in point.items() if k not in schedule}}
        return TrainConfig(
            method=self.method,
            dataset=self.dataset,
            arch=self.arch,
            sigma=self.sigma,
            seed=self.seed,
            method_config=hyper,
            train_split=train_split,
            **train,
        )

    def resolve(self, point: dict[str, Any], train_split: str = "train_minus_val") -> RunSpec:
        """The training run of one point. Trials keep the val split unseen; the winner's refit
        (`train_split="train"`) trains on all of the training split. A run that needs soft labels gets them
        from a teacher trained on the first point's schedule at its own σ0, so trials that share a σ0 share
        one teacher, whatever else (learning rate, batch size) they vary."""
        return self.settings(point, train_split).resolve(
            teacher_schedule=self.settings(self.first_point(), train_split)
        )

    def first_point(self) -> dict[str, Any]:
        """The first point evaluated: the first of `points_to_evaluate`, else each range's middle or first choice."""
        if self.points_to_evaluate:
            return dict(self.points_to_evaluate[0])
        return {key: _middle(domain) for key, domain in self.search.items()}

    def teacher_points(self) -> list[dict[str, Any]]:
        """One point per teacher a trial may ask for: the first point with each combination of the searched
        values of the method's `teacher_keys` (CAT-RS: each σ0)."""
        keys = [key for key in trainables.get(self.method).teacher_keys if key in self.search]
        choices = itertools.product(*(self.search[key].values for key in keys))
        return [{**self.first_point(), **dict(zip(keys, values, strict=True))} for values in choices]


def moving_keys(space: SearchSpace) -> tuple[str, ...]:
    """The settings the population perturbs: the file's `move`, or every searched setting that may move
    (PB2: every numeric one; its bandit models numbers)."""
    if space.budget.move:
        return tuple(space.budget.move)
    method = trainables.get(space.method)
    movable = [key for key, domain in space.search.items() if not _fixed_reason(key, domain, space, method)]
    return tuple(movable)


def _fixed_reason(key: str, domain: Domain, space: SearchSpace, method: Any) -> str:
    """Why `key` cannot move mid-run ("" if it can)."""
    if key in method.teacher_keys:
        return (
            "decides the soft labels the weights were fitted to, so it stays with them: a member that copies "
            "another takes its value; search it, but do not move it"
        )
    if key in searchable_keys():
        return "a training-schedule setting (it shapes the whole run, not a step); search it, but do not move it"
    if space.budget.scheduler == "pb2" and domain.kind not in NUMERIC:
        return "PB2's bandit models numbers; a choice stays fixed per member (move it with scheduler: pbt)"
    return ""


def population_problems(space: SearchSpace) -> list[tuple[str, str]]:
    """What is wrong with a population sweep's file, as (key, problem) pairs."""
    budget, problems = space.budget, []
    if budget.num_samples < 2:
        problems.append(
            ("budget.population", f"needs at least 2 members to copy one another, got {budget.num_samples}")
        )
    if budget.interval >= space.epochs:
        problems.append(
            (
                "budget.interval",
                f"{budget.interval} is not below the last epoch ({space.epochs}): no member would copy another",
            )
        )
    if not 0 < budget.quantile <= 0.5:
        problems.append(("budget.quantile", f"must be in (0, 0.5], got {budget.quantile}"))
    if not 0 <= budget.resample_probability <= 1:
        problems.append(("budget.resample_probability", f"must be in [0, 1], got {budget.resample_probability}"))
    if space.resources.workers != 1:
        problems.append(
            ("resources.workers", "a population trains each member in one worker (an exploit restores one process)")
        )
    method = trainables.get(space.method)
    for key in budget.move:
        if key not in space.search:
            problems.append(("budget.move", f"{key!r} is not searched; searched: {', '.join(space.search)}"))
        elif reason := _fixed_reason(key, space.search[key], space, method):
            problems.append(("budget.move", f"{key} cannot move: {reason}"))
    if not problems and not moving_keys(space):
        problems.append(("budget.move", "nothing to move: search at least one setting a run may change mid-run"))
    return problems


def describe_population(budget: Budget, epochs: int) -> str:
    """How a population sweep runs, in words (`catrs tune --dry-run`)."""
    name = "PBT" if budget.scheduler == "pbt" else "PB2"
    rungs = budget.rungs(epochs)
    return (
        f"{'synchronous ' if budget.synch else ''}population-based training ({name}), each trial a member "
        f"trained once; after epoch{'s' if len(rungs) > 1 else ''} {', '.join(map(str, rungs))} the bottom "
        f"{budget.quantile:.0%} copy the top {budget.quantile:.0%} and perturb {', '.join(budget.move)}"
    )


def _middle(domain: Domain) -> Any:
    if domain.kind == "choice":
        return domain.values[0]
    low, high = domain.values
    if domain.kind == "loguniform":
        return math.sqrt(low * high)
    return (low + high) // 2 if domain.kind == "int" else (low + high) / 2


class _Checker:
    """Raises `UserError("FILE: KEY: problem")`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> None:
        raise UserError(f"{self.path}: {key}: {problem}")

    def mapping(self, data: Any, key: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.fail(key, f"expected a mapping, got {type(data).__name__}")
        return data

    def only(self, data: dict[str, Any], allowed: set[str], key: str) -> None:
        for name in data:
            if name not in allowed:
                where = f"{key}.{name}" if key else name
                self.fail(where, f"unknown key; valid: {', '.join(sorted(allowed))}")

    def section(self, cls: type, data: Any, key: str) -> Any:
        data = self.mapping(data, key)
        self.only(data, {f.name for f in fields(cls)}, key)
        defaults = cls()
        values = {}
        types = {f.name: f.metadata.get("type") for f in fields(cls)}
        for name, value in data.items():
            kind = types[name] or type(getattr(defaults, name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                self.fail(f"{key}.{name}", f"expected {kind.__name__}, got {value!r}")
            values[name] = value
        return cls(**values)


def _domain(check: _Checker, key: str, spec: Any) -> Domain:
    spec = check.mapping(spec, key)
    if len(spec) != 1 or next(iter(spec)) not in DOMAIN_KINDS:
        check.fail(key, f"give exactly one of {', '.join(DOMAIN_KINDS)}, e.g. {{loguniform: [0.25, 4.0]}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        check.fail(key, f"{kind} needs a non-empty list")
    if kind == "choice":
        return Domain(kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        check.fail(key, f"{kind} needs [low, high] numbers, got {values!r}")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        check.fail(key, f"int needs integer bounds, got {values!r}")
    if not low < high if kind != "int" else not low <= high:
        check.fail(key, f"impossible range: low {low} is not below high {high}")
    if kind == "loguniform" and low <= 0:
        check.fail(key, f"loguniform needs low > 0, got {low}")
    return Domain(kind, (low, high))


def _check_method_values(check: _Checker, method: str, values: dict[str, Any], key: str) -> None:
    try:
        trainables.get(method).make_config(values)
    except (KeyError, ValueError, TypeError) as error:
        check.fail(key, str(error.args[0] if error.args else error))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the plain loader keeps the last, so a
    setting would silently lose to a later one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file, a file that is not text, broken YAML, a key given twice
    or another shape is a `UserError`."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not a text file (not UTF-8): give a YAML {what}, not a checkpoint or data"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None)
        said = problem if isinstance(error, yaml.constructor.ConstructorError) else f"not valid YAML ({problem})"
        raise UserError(f"{path}{f' line {mark.line + 1}' if mark else ''}: {said}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return data


SHIPPED_PACKAGE = "catrs.search_spaces"  # the top-level search_spaces/, installed as this data package


def _shipped_folder() -> Path:
    from importlib.resources import files

    return Path(str(files(SHIPPED_PACKAGE)))  # a wheel installs unzipped: a real folder


def shipped_spaces() -> list[str]:
    """The names of the search spaces that ship with catrs (`catrs tune NAME`)."""
    folder = _shipped_folder()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_search_space(name_or_path: str | Path, what: str = "search space") -> Path:
    """The file `catrs tune` reads: an existing file wins; otherwise the shipped space of that name (with or
    without `.yaml`). Anything else is a `UserError` ("WHAT not found") naming the shipped spaces."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    name = text[: -len(".yaml")] if text.endswith(".yaml") else text
    shipped = shipped_spaces()
    if name in shipped:
        return _shipped_folder() / f"{name}.yaml"
    if len(path.parts) > 1:  # a path, not a name: no shipped space is meant
        raise UserError(f"{what} not found: {path}")
    raise UserError(
        f"{what} not found: {text!r} is neither a file nor a shipped space; shipped: "
        f"{', '.join(shipped) or 'none (is catrs installed without its package data?)'}"
    )


def load_search_space(path: str | Path) -> SearchSpace:
    """Reads and validates a sweep file."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search space")
    check = _Checker(path)
    _check_moved(check, raw)
    check.only(raw, TOP_LEVEL, "")
    for required in ("method", "dataset", "sigma", "search", "objective"):
        if required not in raw:
            check.fail(required, "missing (required)")
    _check_identity(check, raw)
    method = raw["method"]
    train = check.mapping(raw.get("train"), "train")
    check.only(train, set(schedule_keys()), "train")
    fixed = check.mapping(raw.get("fixed"), "fixed")
    _check_method_values(check, method, fixed, "fixed")
    search = _search(check, raw["search"], method, train, fixed)
    space = SearchSpace(
        path=path,
        name=_name(check, raw.get("name", path.stem)),
        method=method,
        dataset=raw["dataset"],
        arch=raw.get("arch"),
        sigma=float(raw["sigma"]),
        seed=raw.get("seed", 0),
        train=train,
        fixed=fixed,
        search=search,
        points_to_evaluate=_points(check, raw, search),
        objective=_objective(check, raw["objective"]),
        **_run_sections(check, raw),
    )
    try:
        epochs = space.epochs
    except UserError as error:
        check.fail("train", str(error))
    budget = space.budget
    if budget.scheduler in ("asha", "halving") and budget.fidelity == "epochs" and not budget.rungs(epochs):
        check.fail(
            "budget.first_rung",
            f"{budget.first_rung} is not below the last epoch ({epochs}): the {budget.scheduler} scheduler "
            f"would never compare trials; lower it, or set scheduler: none",
        )
    if budget.population:
        for key, problem in population_problems(space):
            check.fail(key, problem)
        space = replace(space, budget=replace(budget, move=moving_keys(space)))
    return space


SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _name(check: _Checker, name: Any) -> str:
    """The sweep's name, which names its folders and its registered model: one safe path component."""
    if not isinstance(name, str) or not SWEEP_NAME.match(name) or name in (".", ".."):
        check.fail(
            "name",
            f"{name!r} is not a usable sweep name: letters, digits, '.', '_' and '-', starting with a letter or "
            f"a digit (it names folders and the registered model)",
        )
    return str(name)


def _check_moved(check: _Checker, raw: dict[str, Any]) -> None:
    """Keys of the format's earlier versions are named, with what became of them."""
    for key, news in MOVED.items():
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            check.fail(key, news)


def _check_identity(check: _Checker, raw: dict[str, Any]) -> None:
    """Method, data set, architecture, σ and seed name things that exist."""
    method, dataset, arch = raw["method"], raw["dataset"], raw.get("arch")
    if method not in trainables.names():
        check.fail("method", f"unknown method {method!r}; valid: {', '.join(trainables.names())}")
    if dataset not in dataset_names():
        check.fail("dataset", f"unknown dataset {dataset!r}; valid: {', '.join(dataset_names())}")
    if arch is not None and arch not in model_names():
        check.fail("arch", f"unknown architecture {arch!r}; valid: {', '.join(model_names())}")
    sigma = raw["sigma"]
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or sigma <= 0:
        check.fail("sigma", f"must be a positive number, got {sigma!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        check.fail("seed", f"must be a non-negative integer, got {seed!r}")


def _search(check: _Checker, raw: Any, method: str, train: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Domain]:
    """The ranges: each over a method hyper-parameter or a searchable training setting, given in one place."""
    kind = trainables.get(method)
    valid = {f.name for f in fields(kind.config_type)} | set(searchable_keys())
    search_raw = check.mapping(raw, "search")
    if not search_raw:
        check.fail("search", "nothing to search: give at least one range")
    search = {}
    for key, spec in search_raw.items():
        if key == "sigma":
            check.fail("search.sigma", "σ is what a result is certified at; sweep each σ in its own file")
        if key not in valid:
            check.fail(f"search.{key}", f"unknown key; valid: {', '.join(sorted(valid))}")
        if key in fixed or key in train:
            check.fail(f"search.{key}", "also given as a fixed value; keep it in one place")
        if key in kind.shared_keys:
            check.fail(f"search.{key}", "decides the soft labels every trial shares; give it in `fixed`")
        search[key] = _domain(check, f"search.{key}", spec)
        if key in kind.teacher_keys and search[key].kind != "choice":
            check.fail(f"search.{key}", "must be a choice: each value trains (and caches) one teacher")
        if key not in searchable_keys():  # a method's setting: every value the range may give is one it takes
            for value in search[key].values:
                _check_method_values(check, method, {**fixed, key: value}, f"search.{key}")
    return search


def _points(check: _Checker, raw: dict[str, Any], search: dict[str, Domain]) -> list[dict[str, Any]]:
    """The points evaluated first: each sets every searched key, inside its range."""
    points = raw.get("points_to_evaluate") or []
    if not isinstance(points, list):
        check.fail("points_to_evaluate", "expected a list of points")
    for i, point in enumerate(points):
        point = check.mapping(point, f"points_to_evaluate[{i}]")
        if set(point) != set(search):
            check.fail(f"points_to_evaluate[{i}]", f"must set exactly the searched keys: {', '.join(sorted(search))}")
        for key, value in point.items():
            if not search[key].contains(value):
                check.fail(f"points_to_evaluate[{i}].{key}", f"{value!r} lies outside the searched range")
    return points


def _objective(check: _Checker, objective: Any) -> str:
    """The metric to maximise on the val split."""
    if not isinstance(objective, str) or not OBJECTIVE.match(objective):
        check.fail("objective", f"expected acr, certified_accuracy_R or auc_R (R a radius), got {objective!r}")
    return objective


def _run_sections(check: _Checker, raw: dict[str, Any]) -> dict[str, Any]:
    """`proxy`, `selection`, `final`, `budget` and `resources`: how the sweep measures, chooses and runs."""
    proxy = _protocol(check, Proxy, raw.get("proxy"), "proxy", ("images",))
    final = _protocol(check, Final, raw.get("final"), "final", ("skip", "workers"))
    # The selection certifies val with the final protocol unless it says otherwise.
    inherited = {f.name: getattr(final, f.name) for f in fields(SamplingProtocol)}
    selection = _protocol(
        check, Selection, {**inherited, **check.mapping(raw.get("selection"), "selection")}, "selection", ("top_k",)
    )
    if selection.images < 0:
        check.fail("selection.images", f"must be 0 (all) or more, got {selection.images}")
    budget = check.section(Budget, _population_key(check, check.mapping(raw.get("budget"), "budget")), "budget")
    resources = check.section(Resources, raw.get("resources"), "resources")
    _check_positive(check, budget, "budget", ("num_samples", "max_concurrent", "first_rung", "interval"))
    _check_positive(check, resources, "resources", ("workers",))
    if budget.scheduler not in SCHEDULERS:
        check.fail("budget.scheduler", f"expected {', '.join(SCHEDULERS)}, got {budget.scheduler!r}")
    if budget.reduction_factor < 2:
        check.fail("budget.reduction_factor", f"must be at least 2, got {budget.reduction_factor}")
    _check_fidelity(check, budget)
    if (resources.gpus_per_worker or 0) < 0 or resources.cpus_per_worker <= 0:
        check.fail("resources", "gpus_per_worker must be ≥ 0 and cpus_per_worker > 0")
    return {"proxy": proxy, "selection": selection, "final": final, "budget": budget, "resources": resources}


SCHEDULERS = ("asha", "halving", *POPULATION_SCHEDULERS, "none")
POPULATION_KEYS = ("interval", "quantile", "resample_probability", "move", "synch")


def _population_key(check: _Checker, budget: dict[str, Any]) -> dict[str, Any]:
    """The budget section with a population sweep's `population` read as its number of trials, and the
    population's keys refused under the other schedulers."""
    if budget.get("scheduler") not in POPULATION_SCHEDULERS:
        for key in ("population", *POPULATION_KEYS):
            if key in budget:
                check.fail(f"budget.{key}", "applies to a population sweep only (scheduler: pbt or pb2)")
        return budget
    if "num_samples" in budget:
        check.fail("budget.num_samples", "a population sweep trains each member once: give `population` instead")
    budget = dict(budget)
    if "population" in budget:
        budget["num_samples"] = budget.pop("population")
    return budget


def _check_fidelity(check: _Checker, budget: Budget) -> None:
    if budget.fidelity not in ("epochs", "fraction"):
        check.fail("budget.fidelity", f"expected epochs or fraction, got {budget.fidelity!r}")
    if budget.fidelity != "fraction":
        return
    if budget.scheduler != "asha":
        check.fail(
            "budget.fidelity",
            "fraction needs scheduler: asha (without one every trial would climb every rung; "
            "halving compares trials at epochs)",
        )
    eta, lowest = budget.reduction_factor, budget.min_fraction
    steps = math.log(1 / lowest, eta) if 0 < lowest < 1 else math.nan
    if not (steps >= 0.99 and abs(steps - round(steps)) < 0.01):
        check.fail(
            "budget.min_fraction",
            f"must be reduction_factor^-k for some k ≥ 1 (e.g. {1 / eta**2:.4g} = 1/{eta**2}), got {lowest}",
        )


def _protocol(check: _Checker, cls: type, raw: Any, key: str, positive: tuple[str, ...]) -> Any:
    """A section holding a sampling protocol, read and checked."""
    section = check.section(cls, raw, key)
    for name, problem in section.protocol().problems():
        check.fail(f"{key}.{name}", problem)
    _check_positive(check, section, key, positive)
    return section


def _check_positive(check: _Checker, section: Any, key: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 1:
            check.fail(f"{key}.{name}", f"must be at least 1, got {getattr(section, name)}")
