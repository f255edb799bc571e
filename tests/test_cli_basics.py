"""What every command line shares: `catrs --version`, and the printed `mlflow ui` line a shell can run as is."""

from __future__ import annotations

import shlex

import catrs
from catrs.tracking import ui_hint
from tests.helpers import certify_digits


def test_version_prints_the_version(run_cli):
    code, out, err = run_cli("--version")
    assert (code, out.strip(), err) == (0, f"catrs {catrs.__version__}", "")


def _command(line: str) -> list[str]:
    """The `mlflow ui …` command of a printed hint, as the shell splits it."""
    return shlex.split(line.removeprefix("MLflow: ").split("  (then open")[0])


def test_the_mlflow_ui_line_quotes_a_store_under_a_folder_with_spaces(run_cli, digits_checkpoint, tmp_path):
    store = tmp_path / "my runs" / "it's here"
    store.mkdir(parents=True)
    uri = f"sqlite:///{store}/mlflow.db"
    assert _command(ui_hint(uri, "1", "abc"))[:4] == ["mlflow", "ui", "--backend-store-uri", uri]
    assert _command(ui_hint("file:///a b/mlruns")) == ["mlflow", "ui", "--backend-store-uri", "file:///a b/mlruns"]
    options = ("--max", "2", "--n0", "10", "--n", "50", "--inference", "eager", "--tracking-uri", uri)
    code, out, err = run_cli(*certify_digits(digits_checkpoint, "--out", tmp_path / "c.parquet", *options))
    assert code == 0, err
    assert _command(out.strip().splitlines()[-1])[:4] == ["mlflow", "ui", "--backend-store-uri", uri]
