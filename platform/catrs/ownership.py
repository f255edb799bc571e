"""One writer per output: a command owns what it writes for as long as it writes it.

    with claim(stored("runs/cert.parquet"), "certification", identity):   # certify, train, tune all do this
        ...write...

A second command on the same output either joins it safely or is refused in one line that names the owner:
with the same `identity` (the settings that decide what the output holds) it waits for the owner to finish
and then resumes from what the owner left; with another identity (or none: a sweep never shares its folder)
it is refused at once, before any work. Nothing is overwritten silently.

- A local output is claimed by an exclusive `flock` on `OUT.lock` beside it, whose content names the owner
  (pid, host, command, identity). The kernel releases the lock when the owner's process ends, however it ends,
  so a crashed owner's claim lapses at once; the lock file is removed by the owner that releases it.
- An output in S3 is claimed by a lease: an object `OUT.lease` created only if absent (`If-None-Match: *`),
  renewed every third of its term by a write conditional on its own ETag (`If-Match`), deleted on release. A
  holder that dies stops renewing; once the term has passed, the next claimant takes the lease over with a
  write conditional on the stale lease's ETag, so two claimants can never both take it. Terms are measured on
  the wall clocks of the machines, which a cluster keeps in step within seconds (a lease lasts a minute).
- Other object stores have no conditional write that catrs uses: their outputs are written unclaimed, with
  a warning.

Claims are re-entrant within a thread (the CLI claims an output before its MLflow run starts, and the job
that writes it claims it again); another thread of the same process is another claimant.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catrs.errors import UserError
from catrs.storage import Stored

LEASE_SECONDS = 60.0
POLL_SECONDS = 1.0
_HELD: dict[tuple[int, str], int] = {}  # claims this process holds: (thread, target) → depth
_HELD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Owner:
    """Who holds a claim, as its record says."""

    pid: int
    host: str
    command: str
    what: str
    identity: dict[str, Any] | None
    token: str = ""
    expires: float = 0.0  # a lease's end, seconds since the epoch (0 for a local lock)

    @classmethod
    def here(cls, what: str, identity: dict[str, Any] | None) -> Owner:
        return cls(
            os.getpid(), socket.gethostname(), " ".join(["catrs", *sys.argv[1:2]]), what, identity, uuid.uuid4().hex
        )

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on {self.host})"

    def record(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, default=str).encode()

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # a record being written, or none yet


@contextlib.contextmanager
def claim(target: Stored, what: str, identity: dict[str, Any] | None = None) -> Iterator[None]:
    """Holds `target` (a file or a run folder; `what` it is, for messages) for the block: see the module
    docstring. `identity`: the settings a second command must share to join (None: nobody joins)."""
    place = target.uri if not target.local else str(Path(target.uri).resolve())
    key = (threading.get_ident(), place)
    with _HELD_LOCK:
        depth = _HELD.get(key, 0)
        _HELD[key] = depth + 1
    try:
        if depth:
            yield
            return
        owner = Owner.here(what, _plain(identity))
        if target.local:
            holder: contextlib.AbstractContextManager = _local_lock(Path(place), owner)
        elif target.uri.startswith("s3://"):
            holder = _s3_lease(target, owner)
        else:
            print(
                f"catrs: warning: {target.uri} cannot be claimed (no conditional writes); it is written unclaimed",
                file=sys.stderr,
            )
            holder = contextlib.nullcontext()
        with holder:
            yield
    finally:
        with _HELD_LOCK:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]


def _plain(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The identity as JSON would give it back, so that it compares equal to a record read from storage."""
    return None if identity is None else json.loads(json.dumps(identity, sort_keys=True, default=str))


def _join_or_refuse(target: str, owner: Owner | None, mine: Owner, waiting: list[bool]) -> None:
    """Another process holds `target`: wait (the same identity; said once) or refuse (another one). An owner
    whose record is not written yet is asked again at the next poll."""
    if owner is None:
        return
    if mine.identity is None or owner.identity != mine.identity:
        settings = "" if mine.identity is None else " with other settings"
        raise UserError(
            f"{target} is being written by another command, {owner.describe()}{settings}; wait for it to finish, "
            f"or choose another output"
        )
    if not waiting:
        print(
            f"catrs: {target} is being written by {owner.describe()} with the same settings; waiting to resume "
            f"after it",
            file=sys.stderr,
        )
        waiting.append(True)


@contextlib.contextmanager
def _local_lock(target: Path, owner: Owner) -> Iterator[None]:
    lock_path = target.with_name(target.name + ".lock")
    waiting: list[bool] = []
    while True:
        descriptor = _open_lock(lock_path)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            _join_or_refuse(str(target), Owner.parse(_read(lock_path)), owner, waiting)
            time.sleep(POLL_SECONDS)
            continue
        if _same_file(descriptor, lock_path):  # not a lock file its last owner removed as we opened it
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, owner.record())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()  # before the unlock: a waiter holding the old file sees it gone and opens anew
        os.close(descriptor)


def _open_lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UserError(f"cannot write beside {path.with_suffix('')}: {error.strerror or error}") from None


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


# --- S3: a lease object written with conditional puts ------------------------------------------------------------


def _s3_client() -> Any:
    try:
        import boto3
    except ImportError:
        raise UserError(
            "an s3:// output is claimed with a lease, which takes boto3: pip install 'catrs[cluster]'"
        ) from None
    return boto3.client("s3")


@contextlib.contextmanager
def _s3_lease(target: Stored, owner: Owner) -> Iterator[None]:
    from botocore.exceptions import ClientError

    bucket, _, key = target.uri[len("s3://") :].partition("/")
    key = f"{key}.lease"
    client, waiting = _s3_client(), list[bool]()
    etag = ""
    while not etag:
        lease = _lease_record(owner)
        try:
            etag = client.put_object(Bucket=bucket, Key=key, Body=lease.record(), IfNoneMatch="*")["ETag"]
            break
        except ClientError as error:
            if _status(error) not in (409, 412):
                raise UserError(f"cannot claim {target.uri}: {error}") from None
        try:
            current = client.get_object(Bucket=bucket, Key=key)
        except ClientError:
            continue  # released meanwhile: try to create it again
        holder = Owner.parse(current["Body"].read())
        if holder is None or holder.expires < time.time():  # lapsed: take it over, or lose the race and retry
            try:
                etag = client.put_object(Bucket=bucket, Key=key, Body=lease.record(), IfMatch=current["ETag"])["ETag"]
                break
            except ClientError:
                continue
        _join_or_refuse(target.uri, holder, owner, waiting)
        time.sleep(POLL_SECONDS)
    state = {"etag": etag}

    def renew() -> None:
        with contextlib.suppress(Exception):  # a store away for a moment: the next renewal may reach it
            state["etag"] = client.put_object(
                Bucket=bucket, Key=key, Body=_lease_record(owner).record(), IfMatch=state["etag"]
            )["ETag"]

    try:
        with renewing(LEASE_SECONDS / 3, renew):
            yield
    finally:
        with contextlib.suppress(Exception):  # a lease not deleted lapses by itself
            current = client.get_object(Bucket=bucket, Key=key)
            if current["ETag"] == state["etag"]:
                client.delete_object(Bucket=bucket, Key=key)


@contextlib.contextmanager
def renewing(every: float, renew: Callable[[], object]) -> Iterator[None]:
    """Calls `renew` every `every` seconds in a thread of its own while the block runs: what keeps a lease."""
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every):
            renew()

    keeper = threading.Thread(target=keep, daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()


def _lease_record(owner: Owner) -> Owner:
    return Owner(**{**owner.__dict__, "expires": time.time() + LEASE_SECONDS})


def _status(error: Any) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
