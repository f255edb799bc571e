"""catrs installs anywhere: the wheel carries the search spaces as package data, and from an empty directory,
with only the installed wheel on the path (no checkout), `catrs demo --dry-run` resolves and validates the
demo's space exactly as `catrs demo` does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the checkout's sources, installed alone into a target folder; an empty
    directory to run in; and the environment whose Python path is that folder (dependencies come from this
    interpreter's site-packages)."""
    base = tmp_path_factory.mktemp("package")
    source = base / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for name in ("platform", "trainables", "search_spaces"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    wheels, target, empty = base / "wheels", base / "target", base / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("catrs-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", target, wheel],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    return wheel, target, empty, env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_carries_every_search_space_and_every_module(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert SHIPPED and {f"catrs/search_spaces/{name}" for name in SHIPPED} <= names
    modules = {
        str(path.relative_to(root))
        for root in (ROOT / "platform", ROOT)
        for path in (root / ("catrs" if root.name == "platform" else "trainables")).rglob("*.py")
    }
    assert modules <= names, sorted(modules - names)  # pyproject.toml lists every package


def test_the_installed_package_finds_its_own_search_spaces(installed):
    _, target, empty, env = installed
    probe = (
        "import catrs, sys; from catrs.sweep.space import find_search_space, shipped_spaces; "
        "print(catrs.__file__); print(find_search_space('demo_digits')); print(','.join(shipped_spaces())); "
        "print('ray' in sys.modules, 'mlflow' in sys.modules)"
    )
    done = _run(["-c", probe], empty, env)
    assert done.returncode == 0, done.stderr
    module, space, names, heavy = done.stdout.splitlines()
    assert Path(module).resolve().is_relative_to(target.resolve()), module  # not the checkout
    assert Path(space).resolve() == (target / "catrs" / "search_spaces" / "demo_digits.yaml").resolve()
    assert names.split(",") == [Path(name).stem for name in SHIPPED]
    assert heavy == "False False"  # resolving and validating a space starts neither Ray nor MLflow


@pytest.mark.parametrize("command", [["demo", "--dry-run"], ["tune", "demo_digits", "--dry-run"]], ids=["demo", "tune"])
def test_dry_run_from_an_empty_directory_resolves_and_validates_the_demo(installed, command):
    _, target, empty, env = installed
    done = _run(["-m", "catrs.cli", *command], empty, env)
    assert done.returncode == 0, done.stderr
    first, sweep, cost, last = done.stdout.splitlines()
    shipped = (target / "catrs" / "search_spaces" / "demo_digits.yaml").resolve()
    assert first == f"search space: {shipped} (valid)"
    name = "demo_digits-" if command[0] == "demo" else "demo_digits:"  # the demo is a new sweep each time
    assert sweep.startswith(f"sweep {name}") and "catrs on digits (digits_cnn_bn) at σ = 0.5" in sweep, sweep
    assert "searching lbd, epsilon, num_noises, sigma0, confidence_mask; " in sweep and "population-based" in sweep
    assert cost.startswith("expected cost: ≈ ") and "training-run equivalents" in cost
    assert last == "dry run: nothing started"
    assert list(empty.iterdir()) == []  # no MLflow store, no runs/
