"""MLflow records of everything catrs runs: one run per `catrs train` / `catrs certify`, a parent run per sweep
with a child per trial.

The tracking URI is the run context's (`catrs.context`): `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else a
SQLite file `mlflow.db` in the working directory (with artifacts in `mlruns/` beside it). Runs are tagged
`catrs.kind`, `catrs.method`, `catrs.dataset` and `catrs.sigma` so the UI can filter them. Everything goes
through an explicit `MlflowClient` (no global active run), so the sweep driver can log for many trials at once.

A store that cannot be reached when a command starts is an error before any work is spent. One that goes away
later does not stop the work: what cannot be sent (params, metrics, artifacts, run ends) is queued in a journal
on disk, `SPOOL/journal.jsonl` with artifact copies beside it, and sent in order as soon as the store answers
again; whatever is still queued when the command ends stays there, and the command says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from catrs.context import resolve_tracking_uri
from catrs.data import SplitFacts
from catrs.errors import UserError
from catrs.metrics import (
    DEFAULT_RADII,
    P_LOWER_PREFIX,
    certification_metrics,
    corruption_table,
    outcome_metrics,
    outcome_shares,
    sigma_of,
)
from catrs.plots import plot_certified_accuracy, plot_corruption_accuracy, plot_outcomes
from catrs.results import read_provenance
from catrs.storage import Stored, stored

DEFAULT_EXPERIMENT = "catrs"
# The UI opens an experiment of this kind on its runs (MLflow 3's default is a GenAI overview of traces).
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "Runs of **catrs**: certifiably robust classifiers by randomized smoothing. "
    "A sweep is a parent run (its description holds the trials table and links its winner) "
    "with a child run per trial; `catrs train` and `catrs certify` log a run each. "
    "Filter with the tags `catrs.kind`, `catrs.method`, `catrs.dataset`, `catrs.sigma`.",
}


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The one line that tells a user how to look at what was logged: the page of the run (or experiment) in
    the UI's model-training view (MLflow 3 opens on its GenAI view unless the link asks otherwise)."""
    page = ""
    if experiment_id is not None:
        page = (
            f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
        )
    store = shlex.quote(uri)  # a store under a folder with spaces (or quotes) is one word for the shell
    if uri.startswith("sqlite:"):
        return (
            f"MLflow: mlflow ui --backend-store-uri {store} --host 127.0.0.1  (then open http://127.0.0.1:5000{page})"
        )
    if uri.startswith(("http://", "https://")):
        return f"MLflow: open {uri.rstrip('/')}{page}"
    return f"MLflow: mlflow ui --backend-store-uri {store}"


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """What ran: catrs's version, its git commit when it runs from a checkout, the command and the user."""
    import getpass
    import subprocess

    import catrs

    tags = {
        "catrs.version": catrs.__version__,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "catrs " + " ".join(sys.argv[1:2]),
    }
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(catrs.__file__).parent, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def run_tags(kind: str, method: str | None, dataset: str | None, sigma: float | None, **extra: str) -> dict[str, str]:
    tags = {"catrs.kind": kind, **{f"catrs.{k}": str(v) for k, v in extra.items()}}
    for key, value in (("method", method), ("dataset", dataset), ("sigma", sigma)):
        if value is not None:
            tags[f"catrs.{key}"] = f"{value:g}" if isinstance(value, float) else str(value)
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: `a.b` keys, string values (MLflow caps a value at 6,000 characters)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits, `_-./ ` in metric names."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (None for any other store)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _creating(database: Path | None) -> Iterator[None]:
    """While a SQLite store is opened — and, the first time, its schema created — no other command of this
    machine opens it: MLflow's migrations fail when two processes create one store at once."""
    if database is None:
        yield
        return
    from filelock import FileLock

    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        yield


def quiet_mlflow() -> None:
    """MLflow as a catrs command wants it, set before its first use: an unreachable server fails a command in
    seconds, not after MLflow's default minutes of retries; no progress bars of its own in catrs's output;
    and no INFO lines of its own (nor of its schema migrations)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """An MLflow experiment at a tracking URI, and the few operations catrs needs on its runs.

    Writes go through a journal in `spool` when the store does not answer (see the module docstring).
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        spool: Path | None = None,
        *,
        lookup: bool = False,
    ) -> None:
        """Opens (creating where needed) the store at `uri` and its experiment; with `lookup`, a store that does
        not exist yet is a `UserError` and nothing is created: a look-up never leaves an empty store behind."""
        from mlflow.tracking import MlflowClient

        quiet_mlflow()
        self.uri = resolve_tracking_uri(uri)
        database = sqlite_file(self.uri)
        if lookup and database is not None and not database.is_file():
            raise UserError(f"no MLflow store at {self.uri}: nothing was logged there; give the --tracking-uri used")
        self.spool = spool
        self._pending: list[dict[str, Any]] = []
        try:
            with _creating(database):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment(experiment, lookup)
        except UserError:
            raise
        except Exception as error:  # MLflow raises many kinds for an unreachable or broken store
            raise UserError(
                f"cannot use the MLflow tracking store {self.uri}: {str(error).splitlines()[0][:200]}"
            ) from None

    def _experiment(self, name: str, lookup: bool) -> str:
        """The experiment's id, created (with the tags that open the UI on its runs) if it does not exist; two
        commands creating it at once both end up with the one that won."""
        found = self.client.get_experiment_by_name(name)
        if found is None and lookup:
            raise UserError(f"the MLflow store {self.uri} has no experiment {name!r}: nothing was logged there")
        if found is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=self._artifact_location(name), tags=EXPERIMENT_TAGS
                )
            except Exception:
                found = self.client.get_experiment_by_name(name)  # another command created it meanwhile
                if found is None:
                    raise
        for key, value in EXPERIMENT_TAGS.items():  # an experiment of an earlier catrs: open it on its runs too
            if key not in found.tags and not lookup:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def _artifact_location(self, experiment: str) -> str | None:
        """Beside the SQLite file for a local store; the server's default for a remote one."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///") :]).parent / "mlruns" / experiment).as_uri()
        return None

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**source_tags(), **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def rename(self, run_id: str, name: str) -> None:
        self.set_tags(run_id, {"mlflow.runName": name})

    def log_dataset(self, run_id: str, facts: SplitFacts, context: str) -> None:
        """The data set split a run trained or was evaluated on, as an MLflow dataset input (name, digest,
        size; `context` says how it was used: training, validation, test)."""
        self._deliver(
            {
                "op": "input",
                "run_id": run_id,
                "name": f"{facts.dataset}/{facts.split}",
                "digest": facts.digest,
                "source": json.dumps({"dataset": facts.dataset, "split": facts.split}),
                "profile": json.dumps({"num_rows": facts.size}),
                "context": context,
            }
        )

    def find(self, tags: dict[str, str]) -> str | None:
        """The newest run with all these tags, if any (to resume a run rather than duplicate it)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
        )
        return runs[0].info.run_id if runs else None

    def children(self, parent: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10_000
        )

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._deliver({"op": "params", "run_id": run_id, "params": flatten(params)})

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {
            metric_key(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if values:
            self._deliver(
                {
                    "op": "metrics",
                    "run_id": run_id,
                    "metrics": values,
                    "step": step or 0,
                    "timestamp": int(time.time() * 1000),
                }
            )

    def log_artifact(self, run_id: str, path: str | Path | Stored, folder: str | None = None) -> None:
        """Logs a file: a local one, or one in run storage (fetched first: MLflow uploads local files)."""
        source = stored(path)
        if source.local:
            self._deliver({"op": "artifact", "run_id": run_id, "path": source.uri, "folder": folder})
            return
        with tempfile.TemporaryDirectory() as local:
            self.log_artifact(run_id, source.download(Path(local) / source.name), folder)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._deliver({"op": "tags", "run_id": run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._deliver({"op": "end", "run_id": run_id, "status": status})

    def end_abruptly(self, run_id: str, error: BaseException) -> None:
        """Ends a run that `error` cut short: KILLED by a signal (named in `catrs.ended_by`), else FAILED."""
        from catrs.interrupts import Stopped, signal_of

        if isinstance(error, KeyboardInterrupt | Stopped):
            self.set_tags(run_id, {"catrs.ended_by": signal_of(error)[0]})
            self.end(run_id, "KILLED")
        else:
            self.set_tags(run_id, {"catrs.ended_by": f"{type(error).__name__}: {str(error)[:200]}"})
            self.end(run_id, "FAILED")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Sends what is queued; if the store is still away, says where the journal keeps it."""
        self._flush()
        if self._pending:
            print(
                f"catrs: MLflow at {self.uri} is still unreachable: {len(self._pending)} records are kept in "
                f"{self._journal()} and nothing else was lost",
                file=sys.stderr,
            )

    def _apply(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        run_id, op = record["run_id"], record["op"]
        if op == "params":
            existing = self.client.get_run(run_id).data.params
            fresh = [Param(k, v) for k, v in record["params"].items() if k not in existing]
            for start in range(0, len(fresh), 100):
                self.client.log_batch(run_id, params=fresh[start : start + 100])
        elif op == "metrics":
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()],
            )
        elif op == "artifact":
            self.client.log_artifact(run_id, record["path"], record["folder"])
        elif op == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif op == "input":
            dataset = Dataset(record["name"], record["digest"], "catrs", record["source"], profile=record["profile"])
            self.client.log_inputs(
                run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", record["context"])])]
            )
        else:
            self.client.set_terminated(run_id, record["status"])

    def _deliver(self, record: dict[str, Any]) -> None:
        self._flush()
        if not self._pending:
            try:
                self._apply(record)
                return
            except Exception as error:  # any failure to reach the store: queue, warn once, carry on
                print(
                    f"catrs: MLflow at {self.uri} did not answer ({type(error).__name__}); logging is queued "
                    f"in {self._journal()} and continues when it returns",
                    file=sys.stderr,
                )
        self._queue(record)

    def _queue(self, record: dict[str, Any]) -> None:
        if record["op"] == "artifact":  # the original may be a temporary file: keep a copy with the journal
            copy = self._journal().parent / "artifacts" / uuid.uuid4().hex / Path(record["path"]).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(record["path"], copy)
            record = {**record, "path": str(copy)}
        self._pending.append(record)
        self._write_journal()

    def _flush(self) -> None:
        while self._pending:
            try:
                self._apply(self._pending[0])
            except Exception:
                return
            self._pending.pop(0)
            self._write_journal()

    def _journal(self) -> Path:
        return (self.spool or Path("mlflow-pending")) / "journal.jsonl"

    def _write_journal(self) -> None:
        journal = self._journal()
        if not self._pending:
            shutil.rmtree(journal.parent, ignore_errors=True)
            return
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text("".join(json.dumps(record) + "\n" for record in self._pending))

    def log_results(
        self,
        run_id: str,
        frame: pd.DataFrame,
        result_file: str | Path | Stored | None,
        radii: Sequence[float] = DEFAULT_RADII,
        prefix: str = "",
    ) -> dict[str, float]:
        """ACR, abstain rate, certified accuracy at radii and what ACR leaves out (`outcome_metrics`) as metrics,
        but for the distribution of p_A's lower bound, a table (`results/PREFIXp_lower.csv`) beside its bar
        chart, not a one-point chart per bin; the file and a curve plot as artifacts. Returns every figure."""
        sigma = sigma_of(frame, None if result_file is None else read_provenance(result_file, frame))
        metrics = certification_metrics(frame, radii) | outcome_metrics(frame, sigma)
        if "corruption" in frame.columns:
            table = corruption_table(frame)
            metrics.update(mAcc=float(table["accuracy"]["mean"]), mACR=float(table["acr"]["mean"]))
            metrics.update({f"accuracy_0/{name}": float(row.accuracy) for name, row in table.iterrows()})
            metrics.update({f"acr/{name}": float(row.acr) for name, row in table.iterrows()})
        bins = {k.removeprefix(P_LOWER_PREFIX): v for k, v in metrics.items() if k.startswith(P_LOWER_PREFIX)}
        self.log_metrics(run_id, {prefix + k: v for k, v in metrics.items() if not k.startswith(P_LOWER_PREFIX)})
        with tempfile.TemporaryDirectory() as folder:
            if bins:
                shares = Path(folder) / f"{prefix}p_lower.csv"
                pd.DataFrame({"p_lower": list(bins), "share": list(bins.values())}).to_csv(shares, index=False)
                self.log_artifact(run_id, shares, "results")
            plot = Path(folder) / f"{prefix}certified_accuracy.png"
            title = prefix.rstrip("_") + ":" if prefix else ""
            plot_certified_accuracy({"": frame}, plot, title)
            self.log_artifact(run_id, plot, "plots")
            if sigma is not None:
                outcomes = Path(folder) / f"{prefix}p_lower.png"
                heading = f"{title} outcomes at σ = {sigma:g}".strip()
                self.log_artifact(run_id, plot_outcomes(outcome_shares(frame, sigma), outcomes, heading), "plots")
            if "corruption" in frame.columns:
                bars = Path(folder) / f"{prefix}accuracy_by_corruption.png"
                accuracy = 100 * table[["accuracy"]].rename(index={"mean": "mAcc"}, columns={"accuracy": ""})
                self.log_artifact(run_id, plot_corruption_accuracy(accuracy, bars), "plots")
        if result_file is not None:
            self.log_artifact(run_id, result_file, "results")
        return metrics


@contextlib.contextmanager
def system_metrics(tracker: Tracker, run_id: str, seconds: float = 10.0) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory; GPU where NVIDIA's library is installed) of this machine, logged to
    the run every `seconds` while the block runs; a store that cannot take them costs only them."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, tracking_uri=tracker.uri)
    monitor.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            monitor.finish()


@contextlib.contextmanager
def tracked_run(tracker: Tracker, name: str, tags: dict[str, str], params: Mapping[str, Any]) -> Iterator[str]:
    """A run for one command, with its system metrics: FINISHED when the block ends, KILLED (with the signal
    as `catrs.ended_by`) if it is stopped, FAILED if it raises; queued records flushed."""
    run_id = tracker.start(name, tags)
    tracker.log_params(run_id, params)
    try:
        with system_metrics(tracker, run_id):
            yield run_id
    except BaseException as error:
        tracker.end_abruptly(run_id, error)
        raise
    else:
        tracker.end(run_id)
    finally:
        tracker.close()
