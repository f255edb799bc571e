"""One writer per output (issue 20): real processes racing for one result file, a crashed owner, an S3 lease,
and a fresh MLflow store opened by several commands at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from catrs.errors import UserError
from catrs.ownership import Owner, claim
from catrs.results import read_results
from catrs.storage import stored

pytestmark = pytest.mark.slow


def _certify(checkpoint: Path, out: Path, n: int) -> subprocess.Popen:
    """`catrs certify` of 40 images in groups of 20 (n0 = 20, batch 400), in a process of its own."""
    command = [sys.executable, "-m", "catrs.cli", "certify", "--checkpoint", str(checkpoint), "--dataset", "digits"]
    command += ["--n0", "20", "--n", str(n), "--batch", "400", "--max", "40", "--inference", "eager", "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_certification_with_other_settings_is_refused_and_a_killed_owners_claim_lapses(
    digits_checkpoint, faults, tmp_path
):
    out = tmp_path / "race.parquet"
    faults.hold("certify.group", 20)  # the first command stops between its two groups, holding the output
    first = _certify(digits_checkpoint, out, 400)
    faults.held_on("certify.group", 20)
    owner = Owner.parse(out.with_name(out.name + ".lock").read_bytes())
    second = _certify(digits_checkpoint, out, 200)
    _, refused = second.communicate(timeout=300)
    assert second.returncode == 2, refused
    assert refused.strip().splitlines() == [
        f"catrs: error: {out} is being written by another command, catrs certify (pid {first.pid} on "
        f"{owner.host}) with other settings; wait for it to finish, or choose another output"
    ]
    first.send_signal(signal.SIGKILL)  # no release, no clean-up: the kernel drops its lock
    first.wait()
    third = _certify(digits_checkpoint, out, 400)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert "waiting" not in err  # nobody held the output any more
    frame = read_results(out)
    assert frame["idx"].tolist() == list(range(40)) and set(frame["n"]) == {400}  # nothing of the refused one
    assert not out.with_name(out.name + ".lock").exists()


def test_a_second_certification_with_the_same_settings_waits_and_resumes(digits_checkpoint, faults, tmp_path):
    out = tmp_path / "joined.parquet"
    faults.hold("certify.group", 20)
    first = _certify(digits_checkpoint, out, 400)
    faults.held_on("certify.group", 20)
    second = _certify(digits_checkpoint, out, 400)
    deadline = time.monotonic() + 120
    while "waiting to resume" not in (line := second.stderr.readline()):  # it joins: it waits for the owner
        assert line and time.monotonic() < deadline, "the second command did not wait"
    faults.release("certify.group", 20)
    _, first_err = first.communicate(timeout=300)
    _, second_err = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (first_err, second_err)
    assert read_results(out)["idx"].tolist() == list(range(40))  # each image once: the second found them all done


def test_an_s3_lease_refuses_other_settings_waits_for_the_same_and_is_taken_over_when_it_lapses(
    object_store, monkeypatch
):
    import boto3

    target = stored(object_store.uri("lease/cert.parquet"))
    held, release = threading.Event(), threading.Event()

    def owner() -> None:
        with claim(target, "certification", {"n": 100}):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=owner)
    thread.start()
    assert held.wait(30)
    assert object_store.keys("lease/") == ["lease/cert.parquet.lease"]
    with pytest.raises(UserError, match="is being written by another command, .* with other settings"):
        with claim(target, "certification", {"n": 500}):
            pass
    threading.Timer(1.0, release.set).start()
    began = time.monotonic()
    with claim(target, "certification", {"n": 100}):  # the same settings: waits for the owner, then holds it
        assert time.monotonic() - began >= 0.9
    thread.join()
    assert object_store.keys("lease/") == []

    # A holder that died left a lease that lapsed: the next claimant takes it over.
    stale = Owner(4242, "gone", "catrs certify", "certification", {"n": 7}, "t", expires=time.time() - 1)
    boto3.client("s3").put_object(Bucket=object_store.BUCKET, Key="lease/cert.parquet.lease", Body=stale.record())
    with claim(target, "certification", {"n": 500}):
        record = json.loads(
            boto3.client("s3").get_object(Bucket=object_store.BUCKET, Key="lease/cert.parquet.lease")["Body"].read()
        )
        assert record["pid"] == os.getpid() and record["identity"] == {"n": 500}


def test_a_fresh_tracking_store_opened_by_several_commands_at_once_is_created_once(tmp_path):
    probe = "import sys; from catrs.tracking import Tracker; print(Tracker(sys.argv[1]).experiment_id)"
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    openers = [
        subprocess.Popen([sys.executable, "-c", probe, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outcomes = [opener.communicate(timeout=300) for opener in openers]
    assert [opener.returncode for opener in openers] == [0, 0, 0, 0], outcomes  # without the lock, MLflow's
    assert len({out.strip() for out, _ in outcomes}) == 1  # migrations collide; with it: one experiment, for all
