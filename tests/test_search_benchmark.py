"""`benchmarks/search_vs_paper.py --small`: the issue's benchmark, whole, on a tiny space (one seed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_the_search_benchmark_runs_to_its_table(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("search_vs_paper", BENCHMARKS / "search_vs_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--small", "--out", str(tmp_path)])
    header, table = text.splitlines()[0], text.splitlines()[1:]
    assert header.startswith("small.yaml: 1 sweeps")
    columns = table[0].split()
    assert (
        columns[:4] == ["paper", "chosen", "gain", "regret"]
        and {"rho@1", "rho@2"} <= set(columns)
        and "sweep÷train" in columns
    )
    row = dict(zip(columns, table[2].split()[1:], strict=True))
    assert float(row["gain"]) == pytest.approx(float(row["chosen"]) - float(row["paper"]), abs=2e-4)
    assert float(row["regret"]) >= 0.0 and float(row["sweep÷train"]) > 1.0
    assert "mean ± std over seeds:" in text
