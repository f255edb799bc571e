"""Deliberate faults at named points, so tests can prove that catrs survives them for real.

Inert unless the environment variable `CATRS_FAULTS_DIR` names a directory (tests set it before Ray starts,
so every Ray worker inherits it). A test arms a fault by writing `POINT DETAIL` lines into `DIR/armed`;
the first process that reaches that point with that detail dies at once, as a killed process would
(`os._exit`), and leaves a marker so the fault fires only once — the retry or restart then succeeds.

Points: `train.epoch` (detail `EPOCH:RANK`, after the epoch's steps, before its checkpoint),
`certify.chunk` and `votes.chunk` (detail: the chunk's first position or index, before its work),
`certify.group` (detail: the first position of a group of images certified together, before its work).

A held process, for tests that act at a known moment: `hold POINT DETAIL` makes the first process there write
`DIR/held-POINT-DETAIL` (holding the name of its node, `$CATRS_FAULTS_NODE`, else its pid) and wait
`HOLD_SECONDS`, or until the test writes `DIR/release-POINT-DETAIL`; meanwhile the test removes that node, as
a spot preemption would, or signals the process, or starts a rival command.

Out of memory, for tests: `oom POINT DETAIL` makes every process there raise CUDA's out-of-memory error, as a
batch too large for its GPU would.

A straggler, for benchmarks: `slow POINT FACTOR` in `DIR/armed` makes the first process that calls
`straggle(POINT, …)` take FACTOR times as long for its work at that point, every time, as a slow node would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

EXIT_CODE = 17
HOLD_SECONDS = 120.0


def inject(point: str, detail: object) -> None:
    folder = os.environ.get("CATRS_FAULTS_DIR")
    if not folder or not (Path(folder) / "armed").exists():
        return
    armed = (Path(folder) / "armed").read_text().splitlines()
    name = f"{point}-{str(detail).replace(':', '-')}"
    if f"{point} {detail}" in armed and _first(Path(folder) / f"fired-{name}", ""):
        os._exit(EXIT_CODE)
    if f"oom {point} {detail}" in armed:
        (Path(folder) / f"oom-{name}-{os.getpid()}-{time.monotonic_ns()}").touch()  # each attempt leaves one
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by catrs.faults)")
    if f"hold {point} {detail}" in armed and _first(
        Path(folder) / f"held-{name}", os.environ.get("CATRS_FAULTS_NODE") or f"pid {os.getpid()}"
    ):
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline and not (Path(folder) / f"release-{name}").exists():
            time.sleep(0.05)


def _first(marker: Path, content: str) -> bool:
    """Whether this process is the first to get here (it leaves `marker`, holding `content`)."""
    try:
        with open(marker, "x") as stream:
            stream.write(content)
    except FileExistsError:
        return False
    return True


def straggle(point: str, seconds: float) -> None:
    """After work at `point` that took `seconds`: in the one slowed process, waits (FACTOR − 1)·seconds."""
    folder = os.environ.get("CATRS_FAULTS_DIR")
    if not folder or not (Path(folder) / "armed").exists():
        return
    armed = [line.split() for line in (Path(folder) / "armed").read_text().splitlines()]
    factors = [float(words[2]) for words in armed if len(words) == 3 and words[:2] == ["slow", point]]
    if not factors:
        return
    owner = Path(folder) / f"slow-{point}"
    _first(owner, str(os.getpid()))  # the first process here becomes the straggler
    if owner.read_text().strip() == str(os.getpid()):
        time.sleep((factors[0] - 1) * seconds)
