"""The bad-input catalogue: each case ends in one line `catrs: error: …`, exit code 2, and leaves every file
that existed exactly as it was (and writes none)."""

from __future__ import annotations

import hashlib
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from catrs.checkpoint import save_checkpoint
from tests.helpers import REFERENCE_TSV, make_card


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _certify(checkpoint, out, *extra):
    return [
        "certify",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "digits",
        "--sigma",
        "0.5",
        "--n0",
        "10",
        "--n",
        "50",
        "--inference",
        "eager",
        "--out",
        out,
        *extra,
    ]


def truncated_checkpoint(tmp, good):
    (tmp / "torn.pt").write_bytes(good.read_bytes()[:1500])
    return _certify(tmp / "torn.pt", tmp / "o.parquet"), "truncated or not a PyTorch checkpoint"


def foreign_checkpoint(tmp, good):
    torch.save({"state_dict": {}}, tmp / "foreign.pt")
    return _certify(tmp / "foreign.pt", tmp / "o.parquet"), "is not a catrs checkpoint"


def malicious_checkpoint(tmp, good):
    (tmp / "evil.pt").write_bytes(pickle.dumps(Exploit()))
    return _certify(tmp / "evil.pt", tmp / "o.parquet"), "refused to load"


def checkpoint_of_another_arch(tmp, good):
    card = make_card()
    save_checkpoint(tmp / "liar.pt", card.build_model(), make_card(arch="lenet"))
    return _certify(tmp / "liar.pt", tmp / "o.parquet"), "do not fit architecture lenet"


def diverged_checkpoint(tmp, good):
    card = make_card()
    model = card.build_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_checkpoint(tmp / "nan.pt", model, card)
    return _certify(tmp / "nan.pt", tmp / "o.parquet"), "checkpoint weights are not finite (NaN or infinity in"


def missing_data_directory(tmp, good):
    card = make_card("mnist")
    save_checkpoint(tmp / "mnist.pt", card.build_model(), card)
    return (
        [
            "certify",
            "--checkpoint",
            tmp / "mnist.pt",
            "--dataset",
            "mnist",
            "--sigma",
            "0.5",
            "--data-root",
            tmp / "nowhere",
            "--out",
            tmp / "o.parquet",
        ],
        "pass --download",
    )


def data_of_the_wrong_shape(tmp, good):
    card = make_card("mnist")
    save_checkpoint(tmp / "mnist.pt", card.build_model(), card)
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((3, 20, 20)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.zeros(3))
    return (
        [
            "certify",
            "--checkpoint",
            tmp / "mnist.pt",
            "--dataset",
            "mnist",
            "--sigma",
            "0.5",
            "--data-root",
            tmp / "data",
            "--out",
            tmp / "o.parquet",
        ],
        "has images of shape (1, 20, 20), expected (1, 28, 28)",
    )


def output_with_other_provenance(tmp, good):
    import pandas as pd

    pd.DataFrame(
        {
            "idx": [0],
            "label": [1],
            "predict": [1],
            "radius": [0.5],
            "correct": [1],
            "time": [1.0],
            "mode": ["certify"],
            "dataset": ["digits"],
            "split": ["test"],
            "n0": [10],
            "n": [999],
            "alpha": [0.001],
            "sigma": [0.5],
            "seed": [0],
            "mixed_precision": [False],
            "checkpoint_sha256": ["x"],
        }
    ).to_parquet(tmp / "old.parquet")
    return _certify(good, tmp / "old.parquet"), "holds results with other provenance"


def output_that_is_torn(tmp, good):
    (tmp / "torn.parquet").write_bytes(b"PAR1" + b"\x00" * 40)
    return _certify(good, tmp / "torn.parquet"), "truncated or not a Parquet/TSV result file"


def foreign_tsv_output(tmp, good):
    (tmp / "theirs.tsv").write_bytes(REFERENCE_TSV.read_bytes()[:2000].rsplit(b"\n", 1)[0] + b"\n")
    return _certify(good, tmp / "theirs.tsv"), "has no theirs.tsv.provenance.json"


def _binary(tmp: Path, good: Path) -> Path:
    """A file that is not text: a checkpoint, given where a YAML file belongs."""
    return good


def _space_with(tmp: Path, text: str) -> Path:
    path = tmp / "space.yaml"
    path.write_text(text)
    return path


DEMO_LINES = (Path(__file__).parents[1] / "search_spaces" / "demo_digits.yaml").read_text()
SMALL_SPACE = """name: small
method: catrs
dataset: synthetic
sigma: 0.25
train: {{epochs: 2, batch_size: 64}}
fixed: {fixed}
search: {{lbd: {{loguniform: [0.5, 2.0]}}}}
objective: acr
proxy: {{n: 64, images: 16}}
"""


def _train(tmp: Path, out: object, *extra: object) -> list[object]:
    return ["train", "--method", "gaussian", "--dataset", "synthetic", "--epochs", "1", "--out", out, *extra]


def _train_method(tmp: Path, method: str, *sets: str) -> list[object]:
    """`catrs train` of `method` with `--set` for each of `sets`."""
    given = [arg for pair in sets for arg in ("--set", pair)]
    return ["train", "--method", method, "--dataset", "synthetic", "--epochs", "1", *given, "--out", tmp / "r"]


def run_of_other_settings(tmp, good):
    from catrs.train import TrainConfig, train
    from tests.helpers import quiet_context

    train(TrainConfig(method="gaussian", dataset="synthetic", epochs=1).resolve(), tmp / "run", quiet_context())
    return _train(tmp, tmp / "run", "--sigma", "0.25"), "holds a run with other settings (sigma: 0.5 vs 0.25)"


CASES = {
    "truncated checkpoint": truncated_checkpoint,
    "foreign checkpoint": foreign_checkpoint,
    "malicious pickle": malicious_checkpoint,
    "checkpoint of another architecture": checkpoint_of_another_arch,
    "checkpoint of a diverged run": diverged_checkpoint,
    "missing data directory": missing_data_directory,
    "data of the wrong shape": data_of_the_wrong_shape,
    "output with other provenance": output_with_other_provenance,
    "torn output": output_that_is_torn,
    "foreign TSV output": foreign_tsv_output,
    "negative workers": lambda tmp, good: (_certify(good, tmp / "o.parquet", "--workers", "-1"), "--workers must be"),
    "zero chunk size": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--workers", "1", "--chunk-size", "0"),
        "--chunk-size must be",
    ),
    "unknown storage scheme": lambda tmp, good: (_certify(good, "nosuch://bucket/o.parquet"), "cannot open storage"),
    "predict with alpha 0": lambda tmp, good: (
        [
            "predict",
            "--checkpoint",
            good,
            "--dataset",
            "digits",
            "--sigma",
            "0.5",
            "--alpha",
            "0",
            "--out",
            tmp / "o.parquet",
        ],
        "--alpha must lie",
    ),
    # Issue 33: α ≥ ½ would pass as a certificate with inflated radii.
    "certify with alpha 0.6": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--alpha", "0.6"),
        "--alpha must lie strictly between 0 and 0.5",
    ),
    "certify with alpha 0.5": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--alpha", "0.5"),
        "--alpha must lie strictly between 0 and 0.5",
    ),
    "certify with alpha nan": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--alpha", "nan"),
        "--alpha must lie strictly between 0 and 0.5",
    ),
    "unknown split": lambda tmp, good: (_certify(good, tmp / "o.parquet", "--split", "dev"), "unknown split 'dev'"),
    "missing required option": lambda tmp, good: (["certify", "--dataset", "digits"], "are required"),
    "unknown command": lambda tmp, good: (["fit"], "invalid choice"),
    "report of a missing file": lambda tmp, good: (["report", tmp / "absent.parquet"], "result file not found"),
    "report at a negative radius": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--radii", "-1"],
        "radius must be non-negative",
    ),
    "report with an unknown dataset": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--dataset", "svhn", "--linf"],
        "unknown dataset 'svhn'",
    ),
    "train config missing": lambda tmp, good: (
        ["train", "--config", tmp / "absent.yaml", "--out", tmp / "r"],
        "config file not found",
    ),
    "train with negative workers": lambda tmp, good: (
        ["train", "--method", "gaussian", "--dataset", "synthetic", "--workers", "-1", "--out", tmp / "r"],
        "--workers and --gpus-per-worker must be",
    ),
    # Issue 33: it was silently ignored, and the run trained in this process.
    "train --gpus-per-worker without --workers": lambda tmp, good: (
        _train(tmp, tmp / "r", "--gpus-per-worker", "1"),
        "--gpus-per-worker 1 applies to Ray workers: add --workers K",
    ),
    # Issue 33: a hyper-parameter out of its domain trained for minutes, then diverged.
    "train with lbd=nan": lambda tmp, good: (
        _train_method(tmp, "catrs", "lbd=nan"),
        "hyper-parameter lbd must be a finite number, got nan",
    ),
    "train with lbd=inf": lambda tmp, good: (
        _train_method(tmp, "stability", "lbd=inf"),
        "hyper-parameter lbd must be a finite number, got inf",
    ),
    "train with a negative epsilon": lambda tmp, good: (
        _train_method(tmp, "smoothadv", "epsilon=-1"),
        "hyper-parameter epsilon must be at least 0, got -1.0",
    ),
    "train with no noises": lambda tmp, good: (
        _train_method(tmp, "consistency", "num_noises=0"),
        "hyper-parameter num_noises must be at least 1, got 0",
    ),
    "train with a mix step past the attack": lambda tmp, good: (
        _train_method(tmp, "smoothmix", "num_steps=1", "mix_step=2"),
        "hyper-parameter mix_step must be at most num_steps (1), got 2",
    ),
    "train --config with a fractional count": lambda tmp, good: (
        [
            "train",
            "--config",
            _written(tmp / "c.yaml", "method: catrs\ndataset: synthetic\nmethod_config: {num_noises: 2.5}\n"),
            "--out",
            tmp / "r",
        ],
        "hyper-parameter num_noises=2.5 is not a valid int",
    ),
    "a search space whose fixed value leaves its domain": lambda tmp, good: (
        ["tune", _space_with(tmp, SMALL_SPACE.format(fixed="{num_steps: -1}")), "--dry-run"],
        "fixed: hyper-parameter num_steps must be at least 0, got -1",
    ),
    "train with a non-positive lr": lambda tmp, good: (
        ["train", "--method", "gaussian", "--lr", "0", "--out", tmp / "r"],
        "--lr must be a positive number, got 0.0",
    ),
    "tune a missing file": lambda tmp, good: (["tune", tmp / "absent.yaml"], "search space not found"),
    "tune with zero samples": lambda tmp, good: (
        ["tune", "demo_digits", "--num-samples", "0"],
        "--num-samples must be a positive integer",
    ),
    "tune an unknown shipped name": lambda tmp, good: (
        ["tune", "nosuchspace"],
        "'nosuchspace' is neither a file nor a shipped space",
    ),
    # Issue 20: failed writes, found before any work.
    "--out naming a directory": lambda tmp, good: (
        _certify(good, tmp, "--max", "2"),
        f"--out {tmp} is a directory; name a file in it",
    ),
    "--out naming a directory, as TSV": lambda tmp, good: (
        _certify(good, tmp, "--max", "2", "--format", "tsv"),
        "is a directory",
    ),
    "--out where nothing can be written": lambda tmp, good: (
        _certify(good, "/proc/cert.parquet", "--max", "2"),
        "--out /proc/cert.parquet: cannot write to /proc",
    ),
    "train --out where nothing can be written": lambda tmp, good: (
        _train(tmp, "/proc/catrs/run"),
        "--out /proc/catrs/run: cannot write to /proc",
    ),
    "train --out naming an existing file": lambda tmp, good: (
        _train(tmp, good),
        f"--out {good} is a file; a run is written to a folder",
    ),
    "train --out under a file": lambda tmp, good: (_train(tmp, good / "run"), f"{good} is a file, not a folder"),
    "--out s3:// with no bucket": lambda tmp, good: (_certify(good, "s3://"), "s3:// names no object"),
    "--out with one slash after the scheme": lambda tmp, good: (
        _certify(good, "s3:/bucket/cert.parquet"),
        "did you mean s3://bucket/cert.parquet?",
    ),
    # Numbers the machine cannot honour, devices it does not have.
    "a seed beyond int64": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--seed", "99999999999999999999999"),
        "--seed must be a non-negative integer below 2^63",
    ),
    "n beyond any certification": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--n", "99999999999999999999"),
        "--n must be at most 1,000,000,000,000",
    ),
    "a batch beyond the machine's memory": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--batch", "1000000000000"),
        "for one pass's noisy inputs alone",
    ),
    "an unknown device": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--device", "potato"),
        "--device 'potato' is not a torch device; this machine has: cpu",
    ),
    "a device this machine lacks": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--device", "cuda:999"),
        "--device cuda:999: no such device here",
    ),
    "train on a device this machine lacks": lambda tmp, good: (
        _train(tmp, tmp / "r", "--device", "cuda:999"),
        "--device cuda:999: no such device here",
    ),
    # Issue 33: a precision the device lacks created a FAILED run and a folder first; a name said one format and
    # the file held another.
    "train --precision fp16 on a CPU": lambda tmp, good: (
        _train(tmp, tmp / "r", "--precision", "fp16", "--device", "cpu"),
        "--precision fp16 trains on CUDA only; on cpu use bf16 or fp32",
    ),
    "--out named as CSV": lambda tmp, good: (
        _certify(good, tmp / "results.csv"),
        "--out results.csv: catrs writes results as Parquet or TSV, not CSV; name it results.parquet or results.tsv",
    ),
    "--out named .parquet, --format tsv": lambda tmp, good: (
        _certify(good, tmp / "x.parquet", "--format", "tsv"),
        "--out x.parquet names a parquet file, but --format tsv was given: name it x.tsv, or leave --format out",
    ),
    "--out named .tsv, --format parquet": lambda tmp, good: (
        _certify(good, tmp / "x.tsv", "--format", "parquet"),
        "--out x.tsv names a tsv file, but --format parquet was given",
    ),
    "--max 0": lambda tmp, good: (_certify(good, tmp / "o.parquet", "--max", "0"), "--max must be a positive integer"),
    "--max -1": lambda tmp, good: (_certify(good, tmp / "o.parquet", "--max", "-1"), "leave it out for every image"),
    "--checkpoint naming a run folder": lambda tmp, good: (
        _certify(good.parent, tmp / "o.parquet"),
        f"--checkpoint {good.parent} is a folder, not a checkpoint file",
    ),
    # Files read as text that are not, and YAML that says one thing twice.
    "a search space that is not text": lambda tmp, good: (
        ["tune", _binary(tmp, good), "--dry-run"],
        "is not a text file (not UTF-8): give a YAML search space",
    ),
    "train --config that is not text": lambda tmp, good: (
        ["train", "--config", _binary(tmp, good), "--out", tmp / "r"],
        "is not a text file (not UTF-8): give a YAML config file",
    ),
    "demo --space that is not text": lambda tmp, good: (
        ["demo", "--space", _binary(tmp, good), "--dry-run"],
        "is not a text file (not UTF-8)",
    ),
    "a key given twice": lambda tmp, good: (
        ["tune", _space_with(tmp, DEMO_LINES.replace("sigma: 0.5\n", "sigma: 0.5\nsigma: 0.25\n")), "--dry-run"],
        f"line {DEMO_LINES.splitlines().index('sigma: 0.5') + 2}: key 'sigma' is given twice in one mapping",
    ),
    "a range given twice": lambda tmp, good: (
        [
            "tune",
            _space_with(tmp, DEMO_LINES.replace("  lbd: {", "  lbd: {uniform: [0.5, 1.0]}\n  lbd: {", 1)),
            "--dry-run",
        ],
        "key 'lbd' is given twice in one mapping",
    ),
    "an empty sweep name": lambda tmp, good: (
        ["tune", _space_with(tmp, DEMO_LINES.replace("name: demo_digits", 'name: ""')), "--dry-run"],
        "name: '' is not a usable sweep name",
    ),
    "a sweep name that climbs out of its folder": lambda tmp, good: (
        ["tune", _space_with(tmp, DEMO_LINES.replace("name: demo_digits", "name: x/../y")), "--dry-run"],
        "name: 'x/../y' is not a usable sweep name",
    ),
    # Reports: values, files and plots.
    "report of a TSV whose radius is not a number": lambda tmp, good: (
        ["report", _written(tmp / "abc.tsv", "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tabc\t1\t1.0\n")],
        "column radius holds a non-number ('abc', row 1)",
    ),
    "report of garbage bytes named .parquet": lambda tmp, good: (
        ["report", _written(tmp / "g.parquet", "not a parquet file")],
        "is not a Parquet file (its first bytes are not PAR1)",
    ),
    "report --plot into a missing folder": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--plot", tmp / "nowhere" / "c.png"],
        "output directory does not exist",
    ),
    "report --plot with a .tsv name": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--plot", tmp / "c.tsv"],
        "plots are PNG files; give a name ending in .png",
    ),
    "report --linf of a TSV that names no data set": lambda tmp, good: (
        ["report", REFERENCE_TSV, "--linf"],
        "--linf needs the data set's input size",
    ),
    # Issue 33: --linf took --dataset's input size over the one a file records.
    "report --linf with a --dataset the file contradicts": lambda tmp, good: (
        ["report", _recording(tmp / "d.parquet", "digits"), "--linf", "--dataset", "cifar10"],
        "--dataset cifar10 contradicts",
    ),
    "report --linf of results of two input sizes": lambda tmp, good: (
        ["report", _recording(tmp / "d.parquet", "digits"), _recording(tmp / "m.parquet", "mnist"), "--linf"],
        "--linf: the results are of data sets of other input sizes (digits d=64, mnist d=784)",
    ),
    # Look-ups create nothing; refusals leave no MLflow run.
    "a registered model in a store that does not exist": lambda tmp, good: (
        _certify("models:/demo@champion", tmp / "o.parquet", "--tracking-uri", f"sqlite:///{tmp}/none/mlflow.db"),
        "no MLflow store at sqlite:///",
    ),
    "a report of a run in a store that does not exist": lambda tmp, good: (
        ["report", "0" * 32, "--tracking-uri", f"sqlite:///{tmp}/none/mlflow.db"],
        "no MLflow store at sqlite:///",
    ),
    "train into a folder of another run": run_of_other_settings,
}


def _recording(path: Path, dataset: str) -> Path:
    """Result rows as Parquet that records the data set they are of."""
    from catrs.results import read_results

    read_results(REFERENCE_TSV).head(5).assign(dataset=dataset).to_parquet(path)
    return path


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _runs() -> int:
    """How many runs the session's MLflow store holds."""
    from mlflow.tracking import MlflowClient

    from catrs.tracking import quiet_mlflow

    quiet_mlflow()
    client = MlflowClient()
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=50_000))


# Requests no cluster of this shape can serve (issue 33: each waited for ever, printing nothing), on the session's
# local Ray instance: 2 CPUs, no GPU, no autoscaler.
NO_GPU = "(Ray has 1 node up (2 CPUs, no GPU) and no autoscaler to add any)"
RAY_CASES = {
    "certify on more workers than the cluster can hold": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--workers", "1000"),
        f"--workers 1000: 1000 workers of 1 CPU each at once, and at most 2 fit {NO_GPU}; lower --workers",
    ),
    "certify on one worker more than the CPUs": lambda tmp, good: (
        _certify(good, tmp / "o.parquet", "--workers", "3"),
        "--workers 3: 3 workers of 1 CPU each at once, and at most 2 fit",
    ),
    "train on more workers than the cluster can hold": lambda tmp, good: (
        _train(tmp, tmp / "r", "--workers", "1000"),
        f"--workers 1000: 1000 workers of 1 CPU each at once, and at most 2 fit {NO_GPU}; lower --workers, "
        f"--gpus-per-worker or --cpus-per-worker",
    ),
    "train on a GPU per worker where there is none": lambda tmp, good: (
        _train(tmp, tmp / "r", "--workers", "1", "--gpus-per-worker", "1"),
        f"--workers 1 --gpus-per-worker 1: a worker of 1 CPU and 1 GPU fits on no node the cluster has or can add "
        f"{NO_GPU}",
    ),
    "train on workers bigger than any node": lambda tmp, good: (
        _train(tmp, tmp / "r", "--workers", "1", "--cpus-per-worker", "3"),
        "--workers 1 --cpus-per-worker 3: a worker of 3 CPUs fits on no node the cluster has or can add",
    ),
    "a sweep whose trials ask for a GPU where there is none": lambda tmp, good: (
        ["tune", _space_with(tmp, SMALL_SPACE.format(fixed="{}") + "resources: {workers: 1, gpus_per_worker: 1}\n")],
        f"space.yaml: resources: a worker of 1 CPU and 1 GPU fits on no node the cluster has or can add {NO_GPU}; "
        f"lower its workers, gpus_per_worker or cpus_per_worker",
    ),
    "a sweep whose trials' workers and driver need more CPUs than there are": lambda tmp, good: (
        ["tune", _space_with(tmp, SMALL_SPACE.format(fixed="{}") + "resources: {workers: 2}\n")],
        "space.yaml: resources (each trial): 2 workers of 1 CPU each and 1 CPU to drive them need 3 CPUs at once, "
        "and the cluster can have at most 2 CPUs",
    ),
    "a sweep certifying on more workers than the cluster can hold": lambda tmp, good: (
        ["tune", _space_with(tmp, SMALL_SPACE.format(fixed="{}") + "final: {workers: 8}\n")],
        "space.yaml: final.workers 8: 8 workers of 1 CPU each at once, and at most 2 fit",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(run_cli, digits_checkpoint, tmp_path, case, monkeypatch):
    _refused(run_cli, digits_checkpoint, tmp_path, CASES[case], monkeypatch)


@pytest.mark.parametrize("case", list(RAY_CASES))
def test_requests_no_cluster_can_serve_are_refused_at_once(
    ray_cluster, run_cli, digits_checkpoint, tmp_path, case, monkeypatch
):
    began = time.monotonic()
    _refused(run_cli, digits_checkpoint, tmp_path, RAY_CASES[case], monkeypatch)
    assert time.monotonic() - began < 30  # at once, not after a wait


def _refused(run_cli, digits_checkpoint, tmp_path, case, monkeypatch) -> None:
    """The case's command ends in its one line, exit 2, no file written or changed, no MLflow run."""
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show in the snapshot too
    args, message = case(tmp_path, digits_checkpoint)
    before, runs = _snapshot(tmp_path), _runs()
    code, out, err = run_cli(*args)
    assert code == 2, (case, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("catrs: error:"), err
    assert message in err, err
    assert _snapshot(tmp_path) == before
    assert _runs() == runs  # refused before its MLflow run was created
    assert "this must never run" not in out
