"""Run storage: a local directory or an object-store URI (`s3://bucket/prefix`, `gs://…`), one interface.

    out = stored("s3://bucket/catrs/cert.parquet")      # or a plain path
    out.write(lambda stream: stream.write(data))          # whole or not at all
    data = out.read()

pyarrow's file systems do the I/O, so the endpoint and credentials come from the usual environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, an instance profile, …) and an S3-compatible server works as S3 does.

Writes never leave a torn object for a reader: the bytes go to a hidden temporary name beside the target,
then are renamed (a local disk, after fsync) or copied server-side (an object store, where the copy appears
whole) onto it; a crash mid-write leaves the old object or none, and at worst a hidden temporary one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

from catrs.errors import UserError


def is_uri(target: str | Path) -> bool:
    return "://" in str(target)


_ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)(.*)$")


def check_location(text: str) -> str:
    """`text` if it names a place catrs can write: a local path, or `SCHEME://BUCKET/KEY`. A URI with one slash
    (`s3:/bucket/key`, which a file system would take as a folder named `s3:`) or with no bucket or key is a
    `UserError` that says what was probably meant."""
    if match := _ONE_SLASH.match(text):
        raise UserError(f"{text} looks like a URI with one slash; did you mean {match[1]}://{match[2]}?")
    if is_uri(text):
        scheme, _, rest = text.partition("://")
        bucket, _, key = rest.partition("/")
        if not bucket or not key.strip("/"):
            raise UserError(f"{text} names no object: give {scheme}://BUCKET/KEY")
    return text


@dataclass(frozen=True)
class Stored:
    """A file or folder in run storage, named by `uri` (a URI, or a local path as given)."""

    uri: str

    @property
    def local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> Stored:
        return Stored(f"{self.uri.rstrip('/')}/{name}")

    def sibling(self, name: str) -> Stored:
        return Stored(f"{self.uri.rstrip('/').rsplit('/', 1)[0]}/{name}" if "/" in self.uri else name)

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        if self.local:
            return pafs.LocalFileSystem(), str(Path(self.uri).resolve())
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as error:  # pyarrow raises ArrowInvalid/OSError for unknown schemes and bad URIs
            raise UserError(f"cannot open storage {self.uri}: {str(error).splitlines()[0]}") from None

    def exists(self) -> bool:
        fs, path = self._resolve()
        return fs.get_file_info(path).type == pafs.FileType.File

    def read(self) -> bytes:
        fs, path = self._resolve()
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise UserError(f"not found in storage: {self.uri}") from None

    def write(self, fill: Callable[[IO[bytes]], object]) -> Stored:
        """Writes the object with `fill(stream)`: readers see the old content or all of the new, never part.

        The bytes go to a hidden temporary name beside the target first, then are moved onto it: a rename on
        a local disk (after fsync), a server-side copy in an object store (whose result appears whole). An
        upload stream cannot be abandoned — closing it, even on an error, completes the object — so it must
        never be the target itself."""
        fs, path = self._resolve()
        parent, _, name = path.rpartition("/")
        temporary = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if self.local:
                Path(parent).mkdir(parents=True, exist_ok=True)
                with open(temporary, "wb") as stream:
                    fill(stream)
                    stream.flush()
                    os.fsync(stream.fileno())
            else:
                with fs.open_output_stream(temporary) as stream:
                    fill(stream)
            fs.move(temporary, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.delete_file(temporary)
            raise
        return self

    def write_bytes(self, data: bytes) -> Stored:
        return self.write(lambda stream: stream.write(data))

    def files(self) -> list[Stored]:
        """The files directly in this folder, by name (none if it does not exist)."""
        fs, path = self._resolve()
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        found = [info.base_name for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return [self.child(name) for name in sorted(found) if not name.startswith(".")]

    def delete(self) -> None:
        fs, path = self._resolve()
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    def check_writable(self, what: str = "output") -> Stored:
        """Refuses, before any work, a local file that could not be written: a directory, a missing or
        read-only folder. (An object store answers only when written; its URI is checked by `check_location`.)"""
        if not self.local:
            check_location(self.uri)
            return self
        path = Path(self.uri)
        if path.is_dir():
            raise UserError(f"{what} {path} is a directory; name a file in it, e.g. {path / 'results.parquet'}")
        folder = path.parent if str(path.parent) else Path(".")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {path}: {folder} is a file, not a folder")
        if not folder.is_dir():
            raise UserError(f"output directory does not exist: {folder}")
        _probe(folder, what, path)
        return self

    def make_folder(self) -> Stored:
        """Creates this folder on a local disk; object stores need none."""
        if self.local:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        return self

    def delete_folder(self) -> None:
        """Removes this folder if it holds nothing (local), or its marker (object stores)."""
        fs, path = self._resolve()
        try:
            if self.local:
                Path(path).rmdir()
            else:
                fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass

    def upload(self, source: Path) -> Stored:
        """Copies the local file `source` here, atomically."""
        with open(source, "rb") as stream:
            return self.write(lambda out: _copy(stream, out))

    def download(self, target: Path) -> Path:
        """Copies this file to the local `target` (atomically), and returns it."""
        fs, path = self._resolve()
        try:
            with fs.open_input_stream(path) as source:
                Stored(str(target)).write(lambda out: _copy(source, out))
        except FileNotFoundError:
            raise UserError(f"not found in storage: {self.uri}") from None
        return target

    def __str__(self) -> str:
        return self.uri


def check_writable_folder(path: Path, what: str = "--out") -> Path:
    """Refuses, before any work, a run folder that could not be made or written: an existing file, a folder
    under a file, a read-only place."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; a run is written to a folder: give a new or a run's folder")
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder")
    _probe(existing, what, path)
    return path


def _probe(folder: Path, what: str, target: Path) -> None:
    """Creates and removes a file in `folder`: the one sure test that it can be written (permissions,
    read-only file systems, quotas); a failure is a `UserError` naming `what`."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".catrs-probe-"):
            pass
    except OSError as error:
        raise UserError(f"{what} {target}: cannot write to {folder} ({error.strerror or error})") from None


def _copy(source: IO[bytes], target: IO[bytes], block: int = 1 << 22) -> None:
    while chunk := source.read(block):
        target.write(chunk)


def stored(target: str | Path | Stored) -> Stored:
    return target if isinstance(target, Stored) else Stored(str(target))
