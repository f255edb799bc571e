"""A teacher's vote counts in the cache, written chunk by chunk and read as one table per node.

    cache/soft-labels-KEY/votes-000000000-000012499.npy    (a chunk: the counts of indices 0…12,499)
    cache/soft-labels-KEY/manifest.json                    (written last: the entry is complete)

At ImageNet scale the table is 1.28 M images × 1,000 classes: as int64 counts on one driver it would take
10 GB, and a float copy per training rank more. So counts are kept compactly (uint16 up to 65,535 votes, else
uint32), each chunk of the vote queue is written to the cache by the worker that counted it (a driver that
dies loses none: a re-run counts only the indices no chunk file covers), and nothing assembles the table but
the processes that train on it: the first on each node writes it once into a node-local file
(`SoftLabels.table`, under a lock), which every rank of the node then maps read-only — one copy per node,
rows read per batch.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from catrs.errors import UserError
from catrs.storage import Stored, stored

FORMAT = "catrs-soft-labels/2"
MANIFEST = "manifest.json"
_CHUNK = re.compile(r"^votes-(\d{9})-(\d{9})\.npy$")


def counts_dtype(votes: int) -> np.dtype:
    """The smallest unsigned type that holds `votes` counts."""
    return np.dtype(np.uint16 if votes <= np.iinfo(np.uint16).max else np.uint32)


@dataclass(frozen=True)
class VoteStore:
    """The folder of one soft-label table in the cache (a directory or an object-store URI)."""

    uri: str

    @property
    def folder(self) -> Stored:
        return stored(self.uri)

    def write_chunk(self, first: int, counts: torch.Tensor, votes: int) -> None:
        """The counts of the consecutive indices `first`… as one chunk file, whole or not at all."""
        array = counts.cpu().numpy().astype(counts_dtype(votes))
        name = f"votes-{first:09d}-{first + len(array) - 1:09d}.npy"
        self.folder.make_folder().child(name).write(lambda stream: np.save(stream, array))

    def chunks(self) -> list[tuple[int, int, Stored]]:
        """(first, last, file) of every chunk written, by first index."""
        found = []
        for entry in self.folder.files():
            if match := _CHUNK.match(entry.name):
                found.append((int(match[1]), int(match[2]), entry))
        return sorted(found, key=lambda chunk: chunk[0])

    def covered(self) -> set[int]:
        return {index for first, last, _ in self.chunks() for index in range(first, last + 1)}

    def manifest(self) -> dict[str, Any] | None:
        entry = self.folder.child(MANIFEST)
        if not entry.exists():
            return None
        try:
            return dict(json.loads(entry.read()))
        except ValueError:
            raise UserError(f"soft-label cache {entry} is damaged; delete {self.uri} to recompute") from None

    def complete(self, record: dict[str, Any], size: int, classes: int) -> None:
        """Marks the table complete: every index of the training split has its counts."""
        missing = size - len(self.covered() & set(range(size)))
        if missing:
            raise UserError(f"soft-label cache {self.uri} lacks the votes of {missing} images; run again to finish")
        manifest = {"format": FORMAT, "spec": record, "size": size, "classes": classes}
        self.folder.child(MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())


@dataclass(frozen=True)
class SoftLabels:
    """A complete soft-label table in the cache, as the runs that train on it receive it (small, picklable)."""

    store: VoteStore
    key: str
    size: int
    classes: int
    votes: int

    def table(self, local_cache: Path) -> SoftLabelTable:
        """The table mapped from a file of this node (`local_cache/soft-labels/KEY.npy`), written from the
        chunks by the first process of the node that asks, under a lock."""
        path = local_cache / "soft-labels" / f"{self.key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if not path.exists():
                self._assemble(path)
        return SoftLabelTable(np.load(path, mmap_mode="r"), self.votes)

    def _assemble(self, path: Path) -> None:
        partial = path.with_name(path.name + ".partial")
        table = np.lib.format.open_memmap(
            partial, mode="w+", dtype=counts_dtype(self.votes), shape=(self.size, self.classes)
        )
        for first, last, entry in self.store.chunks():
            try:
                table[first : last + 1] = np.load(io.BytesIO(entry.read()))  # never unpickles: allow_pickle=False
            except ValueError:
                raise UserError(
                    f"soft-label cache chunk {entry} holds Python objects or is damaged; delete {self.store.uri} "
                    f"to recompute"
                ) from None
        table.flush()
        del table
        partial.rename(path)


class SoftLabelTable:
    """ŷ by training index: vote counts divided by the number of votes, read a batch of rows at a time."""

    def __init__(self, counts: np.ndarray, votes: int) -> None:
        self.counts, self.votes = counts, votes

    def __len__(self) -> int:
        return len(self.counts)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """ŷ of the indices in `index` (on the CPU), float32."""
        return torch.from_numpy(np.asarray(self.counts[index.numpy()], dtype=np.float32)) / self.votes

    def dense(self) -> torch.Tensor:
        """The whole table (for tests and small data sets)."""
        return self.rows(torch.arange(len(self)))
