"""The sweep trade-off report: the pieces the math fixes (Pareto front, dominated area, importances), and
`catrs report --sweep` on sweeps written to a real MLflow store (trials' metrics given, so the numbers are
known)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from catrs.sweep.report import dominated_area, importances, pareto_optimal, sweep_report
from catrs.tracking import Tracker


def test_pareto_front_keeps_exactly_the_undominated_trials():
    clean = np.array([0.9, 0.8, 0.7, 0.85, 0.6, 0.7])
    certified = np.array([0.2, 0.4, 0.5, 0.1, 0.5, 0.3])
    # (0.85, 0.1) is dominated by (0.9, 0.2); (0.6, 0.5) by (0.7, 0.5); (0.7, 0.3) by (0.8, 0.4).
    assert pareto_optimal(clean, certified).tolist() == [True, True, True, False, False, False]
    assert pareto_optimal(np.array([0.5, 0.5]), np.array([0.3, 0.3])).tolist() == [True, True]  # ties survive


def test_dominated_area_is_the_area_under_the_front_down_to_the_origin():
    clean = np.array([0.9, 0.8, 0.6, 0.7])
    certified = np.array([0.2, 0.4, 0.5, 0.3])  # (0.7, 0.3) lies under the front and adds nothing
    assert dominated_area(clean, certified) == pytest.approx(0.6 * 0.5 + 0.2 * 0.4 + 0.1 * 0.2)
    assert dominated_area(np.array([0.5]), np.array([0.4])) == pytest.approx(0.2)
    # A grid count of the dominated points agrees.
    grid = (np.arange(1000) + 0.5) / 1000
    gx, gy = np.meshgrid(grid, grid)
    covered = np.any((gx[..., None] <= clean) & (gy[..., None] <= certified), axis=-1)
    assert covered.mean() == pytest.approx(dominated_area(clean, certified), abs=2e-3)


def test_importances_credit_the_parameter_that_drives_the_objective():
    rng = np.random.default_rng(0)
    trials = pd.DataFrame(
        {
            "param:lbd": rng.uniform(0.25, 4, 24),
            "param:eps": rng.uniform(0.25, 1, 24),
            "param:m": rng.choice(["2", "4"], 24),
        }
    )
    trials["acr"] = 0.1 * trials["param:lbd"] + 0.001 * rng.normal(size=24)
    scores = importances(trials, ["param:lbd", "param:eps", "param:m"], "acr")
    assert set(scores) == {"lbd", "eps", "m"} and sum(scores.values()) == pytest.approx(1.0)
    assert max(scores, key=scores.get) == "lbd" and scores["lbd"] > 0.8


# (clean, certified at r = 0.5) per trial; areas by hand: 0.6·0.5 + 0.2·0.4 + 0.1·0.2 = 0.40 and
# 0.7·0.35 + 0.25·0.1 = 0.27.
SWEEPS = {
    "lambda-catrs": [(0.9, 0.2), (0.8, 0.4), (0.6, 0.5), (0.7, 0.3)],
    "lambda-consistency": [(0.95, 0.1), (0.7, 0.35), (0.5, 0.3)],
}


@pytest.fixture
def two_sweeps(tmp_path):
    """Two finished sweeps as `catrs tune` records them: a parent run, and a child per trial with its proxy
    metrics (`proxy/val_acr`, …; the second as sweeps of earlier versions named them, `val_acr`, …) and
    searched λ; the first sweep's third trial is its choice."""
    uri = f"sqlite:///{tmp_path / 'sweeps.db'}"
    tracker = Tracker(uri)
    parents = {}
    for name, trials in SWEEPS.items():
        parent = tracker.start(name, {"catrs.kind": "sweep", "catrs.sweep": name, "catrs.objective": "acr"})
        prefix = "proxy/" if name == "lambda-catrs" else ""
        for number, (clean, certified) in enumerate(trials):
            tags = {"catrs.trial_id": f"{name[7:11]}{number}"}
            if prefix and number == 2:
                tags["catrs.winner"] = "true"
            child = tracker.start(f"{name}-{number}", tags, parent=parent)
            tracker.log_params(child, {"lbd": 2.0**number})
            tracker.log_metrics(
                child,
                {
                    prefix + "val_acr": clean * certified,
                    prefix + "val_certified_accuracy_0": clean,
                    prefix + "val_certified_accuracy_0.5": certified,
                },
            )
        parents[name] = parent
    tracker.close()
    return uri, parents


def test_sweeps_compare_their_frontiers_with_the_higher_one_marked(run_cli, two_sweeps, tmp_path):
    uri, parents = two_sweeps
    plot = tmp_path / "frontiers.png"
    code, out, err = run_cli(
        "report",
        "--sweep",
        f"CAT-RS={parents['lambda-catrs']}",
        "--sweep",
        parents["lambda-consistency"],
        "--tracking-uri",
        uri,
        "--plot",
        plot,
    )
    assert code == 0, err
    assert f"sweep CAT-RS ({parents['lambda-catrs']}): 4 trials" in out
    assert f"sweep lambda-consistency ({parents['lambda-consistency']}): 3 trials" in out  # its own name
    comparison = out[out.index("trade-off frontiers at r = 0.5") :].splitlines()
    catrs_row, consistency_row = (
        next(line for line in comparison if line.split()[0] == name) for name in ("CAT-RS", "lambda-consistency")
    )
    assert catrs_row.split()[1:4] == ["4", "0.4000", "*"]
    assert consistency_row.split()[1:3] == ["3", "0.2700"] and "*" not in consistency_row
    assert "(0.600, 0.500) (0.800, 0.400) (0.900, 0.200)" in catrs_row
    assert "(0.700, 0.350) (0.950, 0.100)" in consistency_row
    import matplotlib.image

    pixels = matplotlib.image.imread(plot)
    assert pixels.shape[0] > 200 and pixels.std() > 0.05  # not a blank canvas
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for parent in parents.values():  # each sweep's own report is logged to its parent run
        assert "sweep_report/frontier.png" in {a.path for a in client.list_artifacts(parent, "sweep_report")}

    code, out, err = run_cli(
        "report",
        "--sweep",
        f"CAT-RS={parents['lambda-catrs']}",
        "--sweep",
        parents["lambda-consistency"],
        "--tracking-uri",
        uri,
        "--json",
    )
    assert code == 0, err
    records = json.loads(out)
    assert list(records) == ["CAT-RS", "lambda-consistency"]
    assert records["CAT-RS"]["area"] == pytest.approx(0.40) and records["lambda-consistency"]["area"] == pytest.approx(
        0.27
    )
    by_lambda = {trial["lbd"]: trial for trial in records["CAT-RS"]["trials"]}
    assert by_lambda[8.0] == {
        "trial": "catr3",
        "lbd": 8.0,
        "clean": 0.7,
        "certified": 0.3,
        "val_acr": pytest.approx(0.21),
        "pareto": False,
        "stopped_at": "",
        "chosen": False,
        "final_val": None,
    }  # trained out, not shortlisted
    assert by_lambda[4.0]["chosen"] and not any(t["chosen"] for t in records["lambda-consistency"]["trials"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--sweep", "{catrs}"), "two sweeps are named lambda-catrs; give each sweep once"),
        (("--sweep", "X={catrs}", "--sweep", "X={consistency}"), "two sweeps are named X"),
        (("results.parquet",), "give result files or --sweep PARENT_RUN_ID, not both"),
        (("--markdown", "--radii", "1"), "--markdown, --radii apply to result files, not to --sweep"),
        (("--latex",), "--latex applies to result files"),
        (("--sweep", "0123456789abcdef"), "no MLflow run 0123456789abcdef"),
    ],
)
def test_bad_sweep_comparisons_are_refused_in_one_line(run_cli, two_sweeps, extra, message):
    uri, parents = two_sweeps
    ids = {"catrs": parents["lambda-catrs"], "consistency": parents["lambda-consistency"]}
    code, out, err = run_cli(
        "report", "--sweep", ids["catrs"], *(a.format(**ids) for a in extra), "--tracking-uri", uri
    )
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_a_radius_the_trials_pages_do_not_chart_is_read_from_their_proxy_rows(tmp_path):
    """A trial's page charts the proxy at the radius nearest σ only; the report at another radius reads the
    trial's last proxy rows (`proxy/evaluation.parquet`)."""
    uri = f"sqlite:///{tmp_path / 'rows.db'}"
    tracker = Tracker(uri)
    parent = tracker.start("rows", {"catrs.kind": "sweep", "catrs.sweep": "rows", "catrs.objective": "acr"})
    expected = {}
    for number, radii in enumerate(([0.1, 0.3, 0.6, -1.0], [0.4, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.9])):
        child = tracker.start(f"rows-{number}", {"catrs.trial_id": f"t{number}"}, parent=parent)
        tracker.log_params(child, {"lbd": float(number + 1)})
        rows = pd.DataFrame({"predict": [0, 1, 2, -1], "radius": radii, "correct": [1, 1, 0, 0]})
        tracker.log_metrics(child, {"proxy/val_acr": float(rows["radius"].where(rows["correct"] == 1, 0).mean())})
        path = tmp_path / f"{number}" / "evaluation.parquet"
        path.parent.mkdir()
        rows.to_parquet(path)
        tracker.log_artifact(child, path, "proxy")
        expected[f"t{number}"] = (0.5, float(((rows["radius"] >= 0.25) & (rows["correct"] == 1)).mean()))
    report = sweep_report(tracker, parent, radius=0.25)
    found = {t: (c, r) for t, c, r in report.trials[["trial", "clean", "certified"]].itertuples(index=False)}
    assert found.keys() == expected.keys()
    assert all(found[t] == pytest.approx(expected[t]) for t in expected)
