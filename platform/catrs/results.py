"""Certification result files: the project's Parquet, and the research code's TSV.

One row per test image, keyed by dataset index: `idx label predict radius correct time` (the columns of
Cohen et al.'s code, which every randomized-smoothing paper's TSV uses) plus, in Parquet, the provenance of
every row (mode, dataset, split, n0, n, α, σ, seed, batch, mixed precision, checkpoint and its SHA-256).

A result file is a local path or an object-store URI (`catrs.storage`). It is rewritten whole and atomically,
so an interrupted run leaves a file that `ResultWriter` can resume from: it skips the finished indices, and
refuses a file whose provenance differs from the request. TSV keeps its provenance in a
`FILE.provenance.json` beside it.
"""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from catrs.errors import UserError
from catrs.sampling import Mode
from catrs.storage import Stored, stored


class ResultRow(TypedDict, total=False):
    """One image's row: the research columns, then what a mode or a data set adds."""

    idx: int  # the dataset index
    label: int
    predict: int  # the prediction, or -1 (abstained)
    radius: float  # CERTIFY: the certified ℓ2 radius (0 where abstained)
    correct: int  # 1 where the prediction is the label
    time: float  # seconds per image of the group it was certified with
    estimated: bool  # evaluate: False where the selection was wrong and no estimation samples were spent
    corruption: str  # a corruption data set's rows: which corruption ...
    severity: int  # ... at which severity


CERTIFY_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time"]
# Evaluation (a sweep's view of CERTIFY, `Smooth.evaluate_batch`): `estimated` is False where the selected class
# was wrong and no estimation samples were spent; those rows are evaluations, not certificates.
EVALUATE_COLUMNS = CERTIFY_COLUMNS + ["estimated"]
COLUMNS = {Mode.CERTIFY: CERTIFY_COLUMNS, Mode.PREDICT: PREDICT_COLUMNS, Mode.EVALUATE: EVALUATE_COLUMNS}
CORRUPTION_COLUMNS = ("corruption", "severity")  # rows of a corruption data set (cifar10_c, mnist_c)
# Provenance that must match for two runs' rows to belong in one file (batch size and the checkpoint's path
# are recorded per row but may differ: they do not change what a row certifies).
IDENTITY_KEYS = [
    "mode",
    "dataset",
    "split",
    "n0",
    "n",
    "alpha",
    "sigma",
    "seed",
    "mixed_precision",
    "checkpoint_sha256",
]
FORMATS = ("parquet", "tsv")
_PARQUET_MAGIC = b"PAR1"
FLUSH_SECONDS = 5.0


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame's rows as {column: value}: `DataFrame.to_dict("records")` for a frame whose column names are
    strings, as every result file's are (pandas types the keys as any hashable label)."""
    return cast(list[dict[str, Any]], frame.to_dict("records"))


def result_rows(frame: pd.DataFrame) -> list[ResultRow]:
    """A result frame's rows."""
    return cast(list[ResultRow], records(frame))


def detect_format(path: str | Path | Stored, requested: str | None = None) -> str:
    """`requested` if given, else from the suffix: .tsv/.txt/.tab is TSV, anything else Parquet."""
    if requested:
        if requested not in FORMATS:
            raise UserError(f"unknown result format {requested!r}; choose one of: {', '.join(FORMATS)}")
        return requested
    return "tsv" if Path(stored(path).name).suffix.lower() in {".tsv", ".txt", ".tab"} else "parquet"


def _parse_time(column: pd.Series) -> pd.Series:
    """Seconds, from either float seconds or the research code's `H:MM:SS.ffffff` strings."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype(float)
    return pd.to_timedelta(column.astype(str)).dt.total_seconds()


def read_results(path: str | Path | Stored) -> pd.DataFrame:
    """A result file (local or in an object store), Parquet or research TSV (told apart by content), with
    `time` in seconds."""
    path = stored(path)
    if not path.exists():
        raise UserError(f"result file not found: {path}")
    data = path.read()
    try:
        frame = (
            pq.read_table(io.BytesIO(data)).to_pandas()
            if data[:4] == _PARQUET_MAGIC
            else pd.read_csv(io.BytesIO(data), sep="\t")
        )
    except Exception as error:  # pyarrow/pandas raise many types for torn or foreign bytes
        raise UserError(
            f"could not read result file {path} ({type(error).__name__}): truncated or not a Parquet/TSV result file"
        ) from None
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


class ResultWriter:
    """Accumulates result rows for one output file; resumes from what the file already holds.

    Rows are dicts with the mode's columns. `provenance` is added to every Parquet row; its identity keys
    must equal those of the rows already in the file, or the writer refuses to touch it.
    """

    def __init__(
        self,
        path: str | Path | Stored,
        provenance: dict[str, Any],
        fmt: str | None = None,
        extra_columns: tuple[str, ...] = (),
    ) -> None:
        self.path = stored(path)
        self.format = detect_format(self.path, fmt)
        self.provenance = provenance
        self.columns = COLUMNS[Mode(provenance["mode"])] + list(extra_columns)
        self._sidecar = self.path.sibling(self.path.name + ".provenance.json")
        self._rows: list[ResultRow] = []
        self._unwritten = 0
        self._last_flush = time.monotonic()
        folder = Path(self.path.uri).parent
        if self.path.local and not folder.is_dir():
            raise UserError(f"output directory does not exist: {folder}")
        if self.path.exists():
            self._rows = self._load_existing()

    @property
    def done(self) -> set[int]:
        return {int(row["idx"]) for row in self._rows}

    def _load_existing(self) -> list[ResultRow]:
        frame = read_results(self.path)
        if self.format == "parquet":
            if self.path.read()[:4] != _PARQUET_MAGIC:
                raise UserError(f"{self.path} exists and is not a Parquet file; choose another --out")
            recorded = self._provenance_of_frame(frame)
        else:
            recorded = self._provenance_of_sidecar()
        self._check_identity(recorded)
        return result_rows(frame[self.columns])

    def _provenance_of_frame(self, frame: pd.DataFrame) -> list[dict[str, Any]]:
        missing = [key for key in IDENTITY_KEYS if key not in frame.columns]
        if missing:
            raise UserError(
                f"{self.path} exists but was not written by catrs certify (no provenance); choose another --out"
            )
        return records(frame[IDENTITY_KEYS].drop_duplicates())

    def _provenance_of_sidecar(self) -> list[dict[str, Any]]:
        if not self._sidecar.exists():
            raise UserError(
                f"{self.path} exists but has no {self._sidecar.name} (not written by catrs); choose another --out"
            )
        try:
            return [json.loads(self._sidecar.read())]
        except ValueError:
            raise UserError(f"{self._sidecar} is damaged; move {self.path} away and re-run") from None

    def _check_identity(self, recorded: list[dict[str, Any]]) -> None:
        wanted = {key: self.provenance[key] for key in IDENTITY_KEYS}
        for row in recorded:
            differing = [key for key in IDENTITY_KEYS if not _same(row.get(key), wanted[key])]
            if differing:
                details = ", ".join(f"{k}: file {row.get(k)!r} vs request {wanted[k]!r}" for k in differing)
                raise UserError(
                    f"{self.path} holds results with other provenance ({details}); "
                    f"choose another --out or repeat the original settings to resume"
                )

    def add(self, rows: list[ResultRow]) -> None:
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
            self.path.write(lambda stream: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), stream))
        else:
            identity = {key: self.provenance[key] for key in IDENTITY_KEYS}
            self._sidecar.write_bytes(json.dumps(identity, indent=1).encode())
            frame["time"] = frame["time"].map(_format_time)
            self.path.write_bytes(frame.to_csv(sep="\t", index=False).encode())
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
