"""Stopping a command cleanly: SIGINT (Ctrl-C) and SIGTERM end it with what was finished saved, and said.

SIGTERM — what a scheduler or a spot preemption's notice sends — is turned into `Stopped`, which unwinds the
stack as Ctrl-C's KeyboardInterrupt does: every `finally` writes what is finished, the MLflow run ends KILLED
with the signal as its reason, and `catrs` exits with 128 + the signal's number (130, 143) after one line that
says truthfully what was saved, from the notes the writers leave here as they save (`note_saved`).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from types import FrameType

RESUME = "run the same command again to resume"


class Stopped(BaseException):
    """The process was asked to stop by a signal (SIGTERM): unwinds like KeyboardInterrupt, not an error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises `Stopped` in the main thread (Ray's `init` installs a handler of its own:
    this is called again after it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def signal_of(stop: BaseException) -> tuple[str, int]:
    """The name and number of the signal behind a KeyboardInterrupt or `Stopped`."""
    signum = stop.signum if isinstance(stop, Stopped) else int(signal.SIGINT)
    return signal.Signals(signum).name, signum


@dataclass(frozen=True)
class Saved:
    what: str  # e.g. "120 rows in runs/cert.parquet"
    resume: str  # how to continue from it


_SAVED: dict[str, Saved] = {}


def note_saved(where: str, what: str, resume: str = RESUME) -> None:
    """Records that `what` is safely saved at `where` (the latest note per place counts)."""
    _SAVED[where] = Saved(what, resume)


def forget_saved(where: str | None = None) -> None:
    """Drops the note of `where` (its files are gone into another), or all of them: a new command's record."""
    if where is None:
        _SAVED.clear()
    else:
        _SAVED.pop(where, None)


def stopped_message(stop: BaseException) -> str:
    """The one line a stopped command ends with: the signal, what is saved, how to go on."""
    name, _ = signal_of(stop)
    if not _SAVED:
        return f"stopped by {name} before anything was finished; nothing was saved"
    saved = "; ".join(note.what for note in _SAVED.values())
    resumes = sorted({note.resume for note in _SAVED.values()})
    return f"stopped by {name}; saved: {saved}; {' and '.join(resumes)}"
