"""Certification result files: the project's Parquet, and the research code's TSV.

One row per test image, keyed by dataset index: `idx label predict radius correct time` (the columns of
Cohen et al.'s code, which every randomized-smoothing paper's TSV uses) plus, in Parquet, the provenance of
every row (mode, dataset, split, n0, n, α, σ, seed, batch, mixed precision, checkpoint and its SHA-256).

Files are rewritten atomically (temporary name, then rename), so an interrupted run leaves a file that
`ResultWriter` can resume from: it skips the finished indices, and refuses a file whose provenance differs
from the request. TSV keeps its provenance in a `FILE.provenance.json` beside it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from catrs.errors import UserError

CERTIFY_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time"]
# Evaluation (a sweep's view of CERTIFY, `Smooth.evaluate_batch`): `estimated` is False where the selected class
# was wrong and no estimation samples were spent; those rows are evaluations, not certificates.
EVALUATE_COLUMNS = CERTIFY_COLUMNS + ["estimated"]
COLUMNS = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS, "evaluate": EVALUATE_COLUMNS}
CORRUPTION_COLUMNS = ("corruption", "severity")  # rows of a corruption data set (cifar10_c, mnist_c)
# Provenance that must match for two runs' rows to belong in one file (batch size and the checkpoint's path
# are recorded per row but may differ: they do not change what a row certifies).
IDENTITY_KEYS = ["mode", "dataset", "split", "n0", "n", "alpha", "sigma", "seed", "mixed_precision",
                 "checkpoint_sha256"]
FORMATS = ("parquet", "tsv")
_PARQUET_MAGIC = b"PAR1"
FLUSH_SECONDS = 5.0


def detect_format(path: Path, requested: str | None = None) -> str:
    """`requested` if given, else from the suffix: .tsv/.txt/.tab is TSV, anything else Parquet."""
    if requested:
        if requested not in FORMATS:
            raise UserError(f"unknown result format {requested!r}; choose one of: {', '.join(FORMATS)}")
        return requested
    return "tsv" if path.suffix.lower() in {".tsv", ".txt", ".tab"} else "parquet"


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(4) == _PARQUET_MAGIC


def _parse_time(column: pd.Series) -> pd.Series:
    """Seconds, from either float seconds or the research code's `H:MM:SS.ffffff` strings."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype(float)
    return pd.to_timedelta(column.astype(str)).dt.total_seconds()


def read_results(path: str | Path) -> pd.DataFrame:
    """A result file, Parquet or research TSV (told apart by content), with `time` in seconds."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"result file not found: {path}")
    try:
        frame = pq.read_table(path).to_pandas() if _is_parquet(path) else pd.read_csv(path, sep="\t")
    except Exception as error:  # pyarrow/pandas raise many types for torn or foreign bytes
        raise UserError(f"could not read result file {path} ({type(error).__name__}): truncated or not a "
                        f"Parquet/TSV result file") from None
    missing = [c for c in ("idx", "label", "predict", "correct") if c not in frame.columns]
    if missing:
        raise UserError(f"{path} is not a result file: it lacks the column(s) {', '.join(missing)}")
    if frame[["idx", "label", "predict", "correct"]].isna().any().any():
        raise UserError(f"{path} has incomplete rows (truncated?); move it away and re-run")
    if "time" in frame.columns:
        frame["time"] = _parse_time(frame["time"])
    return frame


def _format_time(seconds: float) -> str:
    return str(timedelta(seconds=float(seconds)))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ResultWriter:
    """Accumulates result rows for one output file; resumes from what the file already holds.

    Rows are dicts with the mode's columns. `provenance` is added to every Parquet row; its identity keys
    must equal those of the rows already in the file, or the writer refuses to touch it.
    """

    def __init__(self, path: str | Path, provenance: dict[str, Any], fmt: str | None = None,
                 extra_columns: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.format = detect_format(self.path, fmt)
        self.provenance = provenance
        self.columns = COLUMNS[provenance["mode"]] + list(extra_columns)
        self._sidecar = self.path.with_name(self.path.name + ".provenance.json")
        self._rows: list[dict[str, Any]] = []
        self._unwritten = 0
        self._last_flush = time.monotonic()
        if self.path.parent and not self.path.parent.exists():
            raise UserError(f"output directory does not exist: {self.path.parent}")
        if self.path.exists():
            self._rows = self._load_existing()

    @property
    def done(self) -> set[int]:
        return {int(row["idx"]) for row in self._rows}

    def _load_existing(self) -> list[dict[str, Any]]:
        frame = read_results(self.path)
        if self.format == "parquet":
            if not _is_parquet(self.path):
                raise UserError(f"{self.path} exists and is not a Parquet file; choose another --out")
            recorded = self._provenance_of_frame(frame)
        else:
            recorded = self._provenance_of_sidecar()
        self._check_identity(recorded)
        return frame[self.columns].to_dict("records")

    def _provenance_of_frame(self, frame: pd.DataFrame) -> list[dict[str, Any]]:
        missing = [key for key in IDENTITY_KEYS if key not in frame.columns]
        if missing:
            raise UserError(f"{self.path} exists but was not written by catrs certify (no provenance); "
                            f"choose another --out")
        return frame[IDENTITY_KEYS].drop_duplicates().to_dict("records")

    def _provenance_of_sidecar(self) -> list[dict[str, Any]]:
        if not self._sidecar.is_file():
            raise UserError(f"{self.path} exists but has no {self._sidecar.name} (not written by catrs); "
                            f"choose another --out")
        try:
            return [json.loads(self._sidecar.read_text())]
        except ValueError:
            raise UserError(f"{self._sidecar} is damaged; move {self.path} away and re-run") from None

    def _check_identity(self, recorded: list[dict[str, Any]]) -> None:
        wanted = {key: self.provenance[key] for key in IDENTITY_KEYS}
        for row in recorded:
            differing = [key for key in IDENTITY_KEYS if not _same(row.get(key), wanted[key])]
            if differing:
                details = ", ".join(f"{k}: file {row.get(k)!r} vs request {wanted[k]!r}" for k in differing)
                raise UserError(f"{self.path} holds results with other provenance ({details}); "
                                f"choose another --out or repeat the original settings to resume")

    def add(self, rows: list[dict[str, Any]]) -> None:
        self._rows.extend(rows)
        self._unwritten += len(rows)
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Rewrites the whole file atomically, rows sorted by index, if it has rows it does not hold yet."""
        if not self._unwritten:
            return
        rows = sorted(self._rows, key=lambda row: row["idx"])
        frame = pd.DataFrame(rows, columns=self.columns)
        if self.format == "parquet":
            for key, value in self.provenance.items():
                frame[key] = value
            _atomic_write(self.path, lambda tmp: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp))
        else:
            identity = {key: self.provenance[key] for key in IDENTITY_KEYS}
            _atomic_write(self._sidecar, lambda tmp: tmp.write_text(json.dumps(identity, indent=1)))
            frame["time"] = frame["time"].map(_format_time)
            _atomic_write(self.path, lambda tmp: frame.to_csv(tmp, sep="\t", index=False))
        self._unwritten = 0
        self._last_flush = time.monotonic()


def _same(recorded: Any, wanted: Any) -> bool:
    if isinstance(wanted, float) or isinstance(recorded, float):
        try:
            return abs(float(recorded) - float(wanted)) <= 1e-12 * max(1.0, abs(float(wanted)))
        except (TypeError, ValueError):
            return False
    if isinstance(wanted, bool):
        return bool(recorded) == wanted
    return recorded == wanted
