"""The training loop: deterministic resume, cached soft labels, `catrs train` end to end and its refusals."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from catrs.checkpoint import load_checkpoint
from catrs.results import read_results
from catrs.sweep.space import Budget
from catrs.teacher import SoftLabelSpec, soft_labels
from catrs.train import EpochShuffle, LocalSession, TrainConfig, climb, local_producer, train
from tests.helpers import QUICK_TRAIN, quiet_context

QUICK = dict(dataset="synthetic", sigma=0.25, batch_size=64, lr=0.05, lr_step=2)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["gaussian", "catrs"])
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, method):
    settings = {"method_config": {"num_steps": 1, "teacher_noises": 20}} if method == "catrs" else {}
    config = TrainConfig(method=method, epochs=3, **QUICK, **settings).resolve()
    whole = train(config, tmp_path / "whole", quiet_context(cache=tmp_path / "cache"))

    def stop_after_two(metrics):
        if metrics["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, tmp_path / "parts", quiet_context(cache=tmp_path / "cache"), stop_after_two)
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt").training_state["next_epoch"] == 2
    parts = train(config, tmp_path / "parts", quiet_context(cache=tmp_path / "cache"))

    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    history = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert a.training_state["history"][-1]["loss"] == b.training_state["history"][-1]["loss"]


def test_checkpoint_carries_the_complete_training_state(tmp_path):
    path = train(TrainConfig(method="gaussian", epochs=1, **QUICK).resolve(), tmp_path / "run", quiet_context())
    state = load_checkpoint(path).training_state
    assert set(state) >= {"config", "optimizer", "scheduler", "next_epoch", "history"}
    assert state["config"]["method"] == "gaussian" and state["next_epoch"] == 1
    card = load_checkpoint(path).card
    assert (card.dataset, card.sigma, card.method, card.arch) == ("synthetic", 0.25, "gaussian", "digits_cnn")
    history = state["history"][0]
    assert {"loss", "accuracy", "test_noisy_accuracy", "seconds", "lr"} <= set(history)


def test_a_run_that_holds_out_val_never_trains_or_evaluates_on_it(run_cli, tmp_path):
    from catrs.data import get_dataset
    from catrs.train import LocalSession, fit

    class Recording(LocalSession):
        def loader(self, dataset, config):
            seen.update(int(i) for i in dataset.keys)
            return super().loader(dataset, config)

    seen: set[int] = set()
    spec = TrainConfig(method="gaussian", epochs=1, train_split="train_minus_val", **QUICK).resolve()
    run = fit(spec, Recording(tmp_path / "fit", torch.device("cpu")), quiet_context())
    val = set(get_dataset("synthetic", "val").keys.tolist())
    assert seen and not seen & val and len(seen | val) == len(get_dataset("synthetic", "train"))
    assert "val_noisy_accuracy" in run.history[0] and "test_noisy_accuracy" not in run.history[0]

    code, out, err = run_cli(
        *QUICK_TRAIN,
        "--epochs",
        "1",
        "--hold-out-val",
        "--out",
        tmp_path / "cli",
    )
    assert code == 0, err
    assert load_checkpoint(tmp_path / "cli" / "checkpoint.pt").card.config["train_split"] == "train_minus_val"
    assert "val_noisy_accuracy=" in out


def test_a_run_with_other_settings_in_the_same_directory_is_refused(tmp_path):
    train(TrainConfig(method="gaussian", epochs=1, **QUICK).resolve(), tmp_path / "run", quiet_context())
    from catrs.errors import UserError

    with pytest.raises(UserError, match="other settings.*sigma"):
        train(
            TrainConfig(method="gaussian", epochs=1, **{**QUICK, "sigma": 0.5}).resolve(),
            tmp_path / "run",
            quiet_context(),
        )


def test_soft_labels_are_vote_histograms_cached_by_everything_that_determines_them(tmp_path):
    spec = TrainConfig(method="catrs", epochs=1, **QUICK, method_config={"teacher_noises": 30}).resolve().soft_labels()
    labels = soft_labels(spec, quiet_context(cache=tmp_path), local_producer())
    table = labels.table(tmp_path / "node").dense()
    assert table.shape == (512, 4) and (labels.size, labels.classes) == (512, 4)
    torch.testing.assert_close(table.sum(dim=1), torch.ones(512))
    assert ((table * 30) - (table * 30).round()).abs().max() < 1e-4  # counts / N
    assert len(list(tmp_path.glob("teacher-*/checkpoint.pt"))) == 1
    assert {p.name for p in (tmp_path / f"soft-labels-{spec.key()}").iterdir() if p.suffix != ".lock"} == {
        "manifest.json",
        "votes-000000000-000000511.npy",  # the counts, compact: uint16
    }
    assert labels.table(tmp_path / "node").counts.dtype == np.uint16

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached soft labels were recomputed")

    refusing = replace(local_producer(), train_teacher=must_not_run, vote=must_not_run)
    again = soft_labels(spec, quiet_context(cache=tmp_path), refusing)
    assert torch.equal(again.table(tmp_path / "another-node").dense(), table)
    other_sigma = SoftLabelSpec(**{**spec.__dict__, "sigma0": 0.5})
    assert other_sigma.key() != spec.key()
    with pytest.raises(AssertionError, match="recomputed"):
        soft_labels(other_sigma, quiet_context(cache=tmp_path), refusing)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gaussian", "catrs"])
def test_train_then_certify_on_digits_from_the_cli(run_cli, tmp_path, method):
    out = tmp_path / method
    cheaper = ["--set", "teacher_noises=100", "--set", "num_steps=2"] if method == "catrs" else []
    code, stdout, err = run_cli(
        "train",
        "--method",
        method,
        "--dataset",
        "digits",
        "--sigma",
        "0.5",
        "--epochs",
        "5",
        "--batch",
        "128",
        "--lr",
        "0.05",
        "--out",
        out,
        "--cache-dir",
        tmp_path / "cache",
        *cheaper,
    )
    assert code == 0, err
    assert "epoch 5:" in stdout
    code, _, err = run_cli(
        "certify",
        "--checkpoint",
        out / "checkpoint.pt",
        "--dataset",
        "digits",
        "--sigma",
        "0.5",
        "--n0",
        "50",
        "--n",
        "200",
        "--skip",
        "9",
        "--inference",
        "eager",
        "--out",
        out / "cert.parquet",
    )
    assert code == 0, err
    frame = read_results(out / "cert.parquet")
    assert len(frame) == 40 and (frame["correct"] == 1).mean() > 0.2  # ten classes: chance is 0.1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "trades"], "unknown training method 'trades'; choose one of: catrs, consistency"),
        (["--method", "catrs", "--set", "lambda=2"], "unknown hyper-parameter(s) lambda for method 'catrs'; valid:"),
        (["--method", "catrs", "--set", "lbd"], "--set expects KEY=VALUE"),
        (["--method", "catrs", "--set", "num_noises=four"], "hyper-parameter num_noises='four' is not a valid int"),
        (["--method", "catrs", "--set", "confidence_mask=maybe"], "confidence_mask='maybe' is not a valid bool"),
        (["--method", "catrs", "--set", "soft_labels=oracle"], "soft_labels must be one of teacher, mean_softmax"),
        (["--method", "gaussian", "--arch", "vgg"], "unknown architecture 'vgg'"),
        (["--method", "gaussian", "--sigma", "0"], "--sigma must be a positive number"),
        (["--method", "gaussian", "--sigma", "inf"], "--sigma must be a positive number, got inf"),
        (["--method", "gaussian", "--lr", "inf"], "--lr must be a positive number, got inf"),
        (["--method", "gaussian", "--lr-gamma", "0"], "--lr-gamma must be in (0, 1], got 0.0"),
        (["--method", "gaussian", "--momentum", "nan"], "--momentum must be a number ≥ 0, got nan"),
        (["--method", "gaussian", "--weight-decay", "-1"], "--weight-decay must be a number ≥ 0, got -1.0"),
        (["--method", "gaussian", "--epochs", "0"], "--epochs must be at least 1"),
        (["--method", "gaussian", "--dataset", "svhn"], "unknown dataset 'svhn'"),
    ],
)
def test_train_refuses_bad_input_in_one_line(run_cli, tmp_path, args, message):
    code, _, err = run_cli("train", "--out", tmp_path / "run", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_rerunning_a_finished_training_adds_no_run_and_a_diverged_one_leaves_no_trained_checkpoint(run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    from catrs.context import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri())
    quick = ["--method", "gaussian", "--dataset", "synthetic", "--sigma", "0.25", "--epochs", "1", "--batch", "64"]
    code, _, err = run_cli("train", "--out", tmp_path / "done", *quick)
    assert code == 0, err
    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    code, out, err = run_cli("train", "--out", tmp_path / "done", *quick)
    assert code == 0 and "is complete: 1 epochs trained; nothing to do, no run added" in out, err
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs
    code, _, err = run_cli("train", "--out", tmp_path / "diverged", *quick, "--lr", "1e30")
    assert code == 2 and "training diverged at epoch 1" in err
    assert not (tmp_path / "diverged" / "checkpoint.pt").exists()  # nothing certify could take for a model


def test_train_reads_a_yaml_config_and_names_a_wrong_key(run_cli, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("method: gaussian\ndataset: synthetic\nsigma: 0.25\nepochs: 1\nbatch_size: 64\n")
    code, out, err = run_cli("train", "--config", good, "--out", tmp_path / "run")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").card.sigma == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: gaussian\nsigmaa: 0.25\n")
    code, _, err = run_cli("train", "--config", bad, "--out", tmp_path / "run2")
    assert code == 2 and f"{bad}: unknown key 'sigmaa'" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [gaussian\n")
    code, _, err = run_cli("train", "--config", broken, "--out", tmp_path / "run3")
    assert code == 2 and "not valid YAML" in err


def test_a_killed_catrs_train_resumes_with_the_same_command(faults, tmp_path):
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "catrs.cli",
        *QUICK_TRAIN,
        "--epochs",
        "3",
        "--batch",
        "64",
        "--lr",
        "0.05",
        "--lr-step",
        "2",
    ]
    reference = train(
        TrainConfig(method="gaussian", epochs=3, **QUICK).resolve(), tmp_path / "reference", quiet_context()
    )
    faults.arm("train.epoch", "1:0")  # the process dies after epoch 2's steps, before its checkpoint
    killed = subprocess.run([*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert killed.returncode == 17 and faults.fired() == ["fired-train.epoch-1-0"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").training_state["next_epoch"] == 1
    resumed = subprocess.run([*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 2:" in resumed.stdout and "epoch 1:" not in resumed.stdout  # epoch 1 was not trained again
    a, b = load_checkpoint(reference), load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_soft_label_cache_holding_python_objects_is_refused(tmp_path, capsys):
    import json

    from catrs.errors import UserError

    spec = TrainConfig(method="catrs", epochs=1, **QUICK).resolve().soft_labels()
    folder = tmp_path / f"soft-labels-{spec.key()}"
    folder.mkdir()
    np.save(folder / "votes-000000000-000000511.npy", np.array([Exploit()] * 512, dtype=object), allow_pickle=True)
    manifest = {"format": "catrs-soft-labels/2", "spec": spec.record(), "size": 512, "classes": 4}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    labels = soft_labels(spec, quiet_context(cache=tmp_path), local_producer())  # complete, as its manifest says
    with pytest.raises(UserError, match="holds Python objects or is damaged"):
        labels.table(tmp_path / "node")
    assert "this must never run" not in capsys.readouterr().out


def test_a_soft_label_key_hashes_the_vote_count_under_its_first_name_so_old_cache_entries_stay_valid():
    import hashlib

    from catrs.teacher import SoftLabelSpec

    spec = SoftLabelSpec(
        dataset="digits", arch="digits_cnn", sigma0=0.25, votes=8, seed=0, teacher_training={"epochs": 1}
    )
    written_before = {
        "dataset": "digits",
        "arch": "digits_cnn",
        "sigma0": 0.25,
        "num_noises": 8,
        "seed": 0,
        "teacher_training": {"epochs": 1},
        "teacher_checkpoint_sha256": "",
    }
    canonical = json.dumps(written_before, sort_keys=True, default=str)
    assert spec.key() == hashlib.sha256(canonical.encode()).hexdigest()[:20]


def test_a_run_is_resolved_once_and_the_loop_never_parses_its_hyper_parameters_again(tmp_path, monkeypatch):
    from trainables.base import Method

    spec = TrainConfig(method="consistency", epochs=2, **QUICK, method_config={"lbd": "5"}).resolve()
    assert spec.hyper.lbd == 5.0 and spec.config.method_config["lbd"] == 5.0  # typed once, recorded typed
    assert spec.arch == spec.data.default_arch and spec.card().arch == spec.arch

    def must_not_parse(self, overrides=None):
        raise AssertionError("hyper-parameters parsed again")

    monkeypatch.setattr(Method, "make_config", must_not_parse)
    path = train(spec, tmp_path / "run", quiet_context())
    assert load_checkpoint(path).training_state["next_epoch"] == 2


def test_the_train_flags_and_a_sweep_files_keys_come_from_train_config_alone():
    from dataclasses import fields

    from catrs.cli import _build_parser
    from catrs.train import config_flags, schedule_keys, searchable_keys

    train = _build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = {action.dest: action.option_strings for action in train._actions}
    for field in config_flags():
        assert flags[field.name] == [field.metadata["flag"]]
    assert set(searchable_keys()) < set(schedule_keys()) < {f.name for f in fields(TrainConfig)}
    assert "lr_gamma" in schedule_keys() and "lr_gamma" not in searchable_keys()
    args = train.parse_args(["--out", "x", "--lr-gamma", "0.5", "--batch", "32"])
    assert (args.lr_gamma, args.batch_size) == (0.5, 32)


@pytest.mark.parametrize("fraction, replicas", [(1.0, 1), (1 / 3, 1), (1 / 3, 2), (0.5, 3)])
def test_budgeted_epochs_draw_a_fresh_share_of_the_split_dealt_evenly_to_the_workers(fraction, replicas):
    size = 100
    drawn = math.ceil(fraction * size - 1e-9)

    def epoch(number: int) -> list[list[int]]:
        shares = [EpochShuffle(size, 7, fraction, rank, replicas) for rank in range(replicas)]
        for share in shares:
            share.set_epoch(number)
        return [list(share) for share in shares]

    first, second = epoch(0), epoch(1)
    assert len({len(share) for share in first}) == 1  # every worker takes as many steps
    assert len(set(sum(first, []))) == drawn and len(sum(first, [])) < drawn + replicas  # the draw, padded
    assert epoch(0) == first  # drawn from (seed, epoch) alone: a resumed epoch draws the same
    if fraction < 1:
        assert set(sum(first, [])) != set(sum(second, []))  # a fresh share every epoch, not a fixed subset


class Recording(LocalSession):
    """A local run that keeps every report and can stop the process once (as a kill would) at one of them."""

    def __init__(self, out, stop_at: int | None = None) -> None:
        super().__init__(out, torch.device("cpu"))
        self.reports: list[dict[str, float]] = []
        self.stop_at = stop_at

    def report(self, metrics, run, evaluation) -> None:
        super().report(metrics, run, evaluation)
        self.reports.append(metrics)
        if len(self.reports) == self.stop_at:
            raise KeyboardInterrupt


def test_a_climb_trains_each_rung_from_scratch_reports_asha_its_clock_and_resumes_at_its_rung(tmp_path):
    spec = TrainConfig(method="gaussian", epochs=2, **QUICK).resolve()
    rungs = Budget(fidelity="fraction", min_fraction=0.25, reduction_factor=2).ladder()
    session = Recording(tmp_path / "climb")
    last = climb(spec, session, quiet_context(), None, None, rungs)
    assert [(r["fraction"], r["budget"], r["step"]) for r in session.reports] == [
        (0.25, 0, 1), (0.25, 1, 2), (0.5, 1, 3), (0.5, 2, 4), (1.0, 2, 5), (1.0, 4, 6)
    ]  # fmt: skip
    plain = train(spec, tmp_path / "plain", quiet_context())  # the top rung is the run trained as it is
    top = load_checkpoint(plain).state_dict
    assert last is not None and all(torch.equal(last.model.state_dict()[k], top[k]) for k in top)

    stopped = Recording(tmp_path / "killed", stop_at=3)  # killed after the first epoch of rung 2
    with pytest.raises(KeyboardInterrupt):
        climb(spec, stopped, quiet_context(), None, None, rungs)
    resumed = Recording(tmp_path / "killed")
    climb(spec, resumed, quiet_context(), None, None, rungs)
    assert [(r["fraction"], r["step"]) for r in resumed.reports] == [(0.5, 4), (1.0, 5), (1.0, 6)]
    again = load_checkpoint(tmp_path / "killed" / "checkpoint.pt").state_dict
    assert all(torch.equal(again[k], top[k]) for k in top)
