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
from catrs.interrupts import note_saved
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
    samples: int  # every noisy sample the image took: selection, pilot (adaptive), estimation
    estimated: bool  # evaluate: False where the selection was wrong and no estimation samples were spent
    pilot_samples: int  # adaptive: the selection's and the pilot's samples, which chose the estimation's size ...
    estimation_samples: int  # ... and the estimation's, which the bound rests on
    corruption: str  # a corruption data set's rows: which corruption ...
    severity: int  # ... at which severity


CERTIFY_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time", "samples"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time", "samples"]
# Evaluation (a sweep's view of CERTIFY, `Smooth.evaluate_batch`): `estimated` is False where the selected class
# was wrong and no estimation samples were spent; those rows are evaluations, not certificates.
EVALUATE_COLUMNS = CERTIFY_COLUMNS + ["estimated"]
COLUMNS = {Mode.CERTIFY: CERTIFY_COLUMNS, Mode.PREDICT: PREDICT_COLUMNS, Mode.EVALUATE: EVALUATE_COLUMNS}
CORRUPTION_COLUMNS = ("corruption", "severity")  # rows of a corruption data set (cifar10_c, mnist_c)
ADAPTIVE_COLUMNS = ("pilot_samples", "estimation_samples")  # rows of an adaptive certification
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
    "procedure",
    "tolerance",
]
# What files written before a key existed hold: fixed-n CERTIFY, which gives up no radius.
IDENTITY_DEFAULTS = {"procedure": "fixed", "tolerance": 0.0}
FORMATS = ("parquet", "tsv")
# What a name's suffix says of its format; an output named without one of these is Parquet unless --format says
# TSV (Cohen et al.'s result files are named like `sigma_0.50`, whose ".50" says nothing).
SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv", ".txt": "tsv", ".tab": "tsv"}
# Names that say a format catrs does not write: an output so named is refused, not written as Parquet under it.
FOREIGN_SUFFIXES = frozenset(
    {".csv", ".json", ".jsonl", ".xlsx", ".xls", ".feather", ".arrow", ".orc", ".avro", ".h5", ".hdf5", ".pkl", ".npz"}
)
_PARQUET_MAGIC = b"PAR1"
FLUSH_SECONDS = 5.0


def fixed_n_samples(frame: pd.DataFrame, mode: Mode, n0: int, n: int) -> pd.Series:
    """What fixed-n rows cost, for rows written before they recorded `samples`: CERTIFY n0 + n each, an
    evaluation n0 and n only where the selection was right (`estimated`), PREDICT n."""
    if mode is Mode.PREDICT:
        return pd.Series(n, index=frame.index)
    estimated = frame["estimated"].astype(int) if mode is Mode.EVALUATE else pd.Series(1, index=frame.index)
    return n0 + n * estimated


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
    return SUFFIX_FORMATS.get(_suffix(path), "parquet")


def output_format(path: str | Path | Stored, requested: str | None = None) -> str:
    """The format an output is written in, refused before any work where its name says another: a name of a
    format catrs does not write (`results.csv`), or a `--format` its suffix contradicts (`x.parquet` as TSV,
    which every later read would call foreign)."""
    name, suffix = stored(path).name, _suffix(path)
    if suffix in FOREIGN_SUFFIXES:
        raise UserError(
            f"--out {name}: catrs writes results as Parquet or TSV, not {suffix[1:].upper()}; "
            f"name it {Path(name).stem}.parquet or {Path(name).stem}.tsv"
        )
    chosen, named = detect_format(path, requested), SUFFIX_FORMATS.get(suffix)
    if named is not None and named != chosen:
        raise UserError(
            f"--out {name} names a {named} file, but --format {chosen} was given: "
            f"name it {Path(name).stem}.{chosen}, or leave --format out"
        )
    return chosen


def _suffix(path: str | Path | Stored) -> str:
    return Path(stored(path).name).suffix.lower()


def _parse_time(column: pd.Series) -> pd.Series:
    """Seconds, from either float seconds or the research code's `H:MM:SS.ffffff` strings."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype(float)
    return pd.to_timedelta(column.astype(str)).dt.total_seconds()


NUMERIC_COLUMNS = ("idx", "label", "predict", "correct", "radius")


def read_results(path: str | Path | Stored) -> pd.DataFrame:
    """A result file (local or in an object store), Parquet or research TSV (told apart by content), with
    `time` in seconds. Anything else — foreign bytes, a torn file, a column of non-numbers — is a `UserError`
    that names the file and what is wrong with it."""
    path = stored(path)
    if not path.exists():
        raise UserError(f"result file not found: {path}")
    data = path.read()
    frame = _parse(path, data)
    missing = [c for c in ("idx", "label", "predict", "correct") if c not in frame.columns]
    if missing:
        raise UserError(f"{path} is not a result file: it lacks the column(s) {', '.join(missing)}")
    for column in (c for c in NUMERIC_COLUMNS if c in frame.columns):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column][numbers.isna() & frame[column].notna()]
        if len(bad):
            raise UserError(
                f"{path}: column {column} holds a non-number ({bad.iloc[0]!r}, row {bad.index[0] + 1}): "
                f"not a result file catrs or the research code wrote"
            )
        frame[column] = numbers
    if frame[["idx", "label", "predict", "correct"]].isna().any().any():
        raise UserError(f"{path} has incomplete rows (truncated?); move it away and re-run")
    if "time" in frame.columns:
        frame["time"] = _parse_time(frame["time"])
    return frame


def _parse(path: Stored, data: bytes) -> pd.DataFrame:
    """The bytes as a table: Parquet by its magic number, else the research TSV if they are text — unless the
    name says Parquet (a name that says nothing, `sigma_0.50`, may hold either)."""
    if data[:4] != _PARQUET_MAGIC and SUFFIX_FORMATS.get(_suffix(path)) == "parquet":
        raise UserError(f"{path} is not a Parquet file (its first bytes are not PAR1): truncated or foreign")
    try:
        if data[:4] == _PARQUET_MAGIC:
            return pq.read_table(io.BytesIO(data)).to_pandas()
        data.decode("utf-8")
        return pd.read_csv(io.BytesIO(data), sep="\t")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a result file: neither Parquet nor text (a TSV)") from None
    except Exception as error:  # pyarrow/pandas raise many types for torn or foreign bytes
        raise UserError(
            f"could not read result file {path} ({type(error).__name__}): truncated or not a Parquet/TSV result file"
        ) from None


def read_provenance(path: str | Path | Stored, frame: pd.DataFrame) -> dict[str, Any]:
    """What a result file says it holds: the provenance columns of catrs's Parquet (when each holds one
    value), or the `.provenance.json` beside a TSV that catrs wrote; empty for a research TSV."""
    keys = [k for k in IDENTITY_KEYS + ["checkpoint", "batch"] if k in frame.columns]
    if keys and len(frame) and frame[keys].drop_duplicates().shape[0] == 1:
        first = frame[keys].iloc[0]
        return {k: (first[k].item() if hasattr(first[k], "item") else first[k]) for k in keys}
    sidecar = stored(path).sibling(stored(path).name + ".provenance.json")
    if not keys and sidecar.exists():
        try:
            return dict(json.loads(sidecar.read()))
        except (ValueError, TypeError):
            return {}
    return {}


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
        announce: bool = True,
    ) -> None:
        self.path = stored(path)
        self.format = detect_format(self.path, fmt)
        self.provenance = provenance
        self.columns = COLUMNS[Mode(provenance["mode"])] + list(extra_columns)
        self.announce = announce  # whether a flush is noted as saved (`catrs.interrupts`): not for chunk files
        self._sidecar = self.path.sibling(self.path.name + ".provenance.json")
        self._rows: list[ResultRow] = []
        self._devices: set[str] = set()  # the devices the rows already there were computed on
        self._unwritten = 0
        self._last_flush = time.monotonic()
        self.path.check_writable("--out")
        if self.path.exists():
            self._rows = self._load_existing()

    def reopened(self) -> ResultWriter:
        """A writer of the same output as it is now (what an earlier owner left), with nothing unwritten."""
        return ResultWriter(self.path, self.provenance, self.format, self.extra_columns)

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """The columns beyond the mode's: a corruption data set's, an adaptive certification's."""
        return tuple(self.columns[len(COLUMNS[self.mode]) :])

    @property
    def mode(self) -> Mode:
        return Mode(self.provenance["mode"])

    @property
    def identity(self) -> dict[str, Any]:
        """The provenance that decides what the output holds (what a second writer must share to join)."""
        return {key: self.provenance[key] for key in IDENTITY_KEYS}

    @property
    def done(self) -> set[int]:
        return {int(row["idx"]) for row in self._rows}

    def check_device(self, device: str) -> None:
        """Refuses to add rows computed on `device` to rows computed on another: the noise of an index, and the
        logits, differ between devices, so a file of mixed rows would be no one run's certificates."""
        other = self._devices - {device}
        if other:
            raise UserError(
                f"{self.path} holds rows computed on {', '.join(sorted(other))}, and this run computes on {device}; "
                f"finish it on that kind of device, or choose another --out (each device's certificates are valid)"
            )

    def _load_existing(self) -> list[ResultRow]:
        frame = read_results(self.path)
        if "device" in frame.columns:
            self._devices = set(frame["device"].dropna().astype(str))
        if self.format == "parquet":
            if self.path.read()[:4] != _PARQUET_MAGIC:
                raise UserError(f"{self.path} exists and is not a Parquet file; choose another --out")
            recorded = self._provenance_of_frame(frame)
        else:
            recorded = self._provenance_of_sidecar()
        self._check_identity(recorded)
        if "samples" not in frame.columns:  # written before rows recorded it: fixed n, as the identity says
            frame["samples"] = fixed_n_samples(frame, self.mode, int(self.provenance["n0"]), int(self.provenance["n"]))
        return result_rows(frame[self.columns])

    def _provenance_of_frame(self, frame: pd.DataFrame) -> list[dict[str, Any]]:
        missing = [key for key in IDENTITY_KEYS if key not in frame.columns and key not in IDENTITY_DEFAULTS]
        if missing:
            raise UserError(
                f"{self.path} exists but was not written by catrs certify (no provenance); choose another --out"
            )
        return records(frame[[key for key in IDENTITY_KEYS if key in frame.columns]].drop_duplicates())

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
            row = {**IDENTITY_DEFAULTS, **row}
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
            self._write_tsv(frame)
        self._unwritten = 0
        self._last_flush = time.monotonic()
        if self.announce:
            note_saved(self.path.uri, f"{len(rows)} rows in {self.path}")

    def _write_tsv(self, frame: pd.DataFrame) -> None:
        """The research TSV and its provenance beside it: the sidecar first (a TSV without one would be refused
        at the resume), removed again if the TSV cannot be written, so nothing is left half-made."""
        existed = self._sidecar.exists()
        self._sidecar.write_bytes(json.dumps(self.identity, indent=1).encode())
        frame["time"] = frame["time"].map(_format_time)
        try:
            self.path.write_bytes(frame.to_csv(sep="\t", index=False).encode())
        except BaseException:
            if not existed:
                self._sidecar.delete()
            raise


def _same(recorded: Any, wanted: Any) -> bool:
    if isinstance(wanted, float) or isinstance(recorded, float):
        try:
            return abs(float(recorded) - float(wanted)) <= 1e-12 * max(1.0, abs(float(wanted)))
        except (TypeError, ValueError):
            return False
    if isinstance(wanted, bool):
        return bool(recorded) == wanted
    return recorded == wanted
