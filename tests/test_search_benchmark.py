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
    text = module.main(["--small", "--variants", "file", "pbt2", "--out", str(tmp_path)])
    lines = text.splitlines()
    assert lines[0].startswith("small.yaml: 2 sweeps")
    columns = lines[1].split()
    assert columns[:3] == ["chosen", "regret", "rho@1"] and {"gain", "sweep÷train", "run_equivalents"} <= set(columns)
    rows = {line.split()[0]: dict(zip(columns, line.split()[2:], strict=True)) for line in lines[3:5]}
    assert set(rows) == {"file", "pbt2"}
    for row in rows.values():
        assert float(row["gain"]) == pytest.approx(float(row["chosen"]) - float(row["paper"]), abs=2e-4)
        assert float(row["regret"]) >= 0.0 and float(row["sweep÷train"]) > 1.0
    assert rows["pbt2"]["paper"] == rows["file"]["paper"]  # one paper's point per seed
    assert float(rows["pbt2"]["run_equivalents"]) == pytest.approx(2.0)  # each member trained once
    assert "mean ± std over seeds:" in text
