"""The `catrs` command: train, certify, predict, tune, report, demo.

Every command validates its input; a bad one ends with a single line `catrs: error: ...` and exit code 2,
never a traceback, and never touches an existing file. Work that fails for other reasons (a task out of
retries) ends with one line and exit code 1, its finished part saved. Commands that write results log them
to MLflow and end by printing how to open the UI.

    catrs demo                                   # the embedded default: a CAT-RS sweep on digits
    catrs train --method gaussian --dataset digits --sigma 0.5 --epochs 10 --out runs/digits [--workers 2]
    catrs certify --checkpoint runs/digits/checkpoint.pt --dataset digits --sigma 0.5 --out cert.parquet
    catrs tune demo_digits [--resume]              # a shipped search space by name, or a YAML file
    catrs report cert.parquet --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from catrs.errors import JobFailed, UserError

EXIT_USAGE = 2
EXIT_FAILED = 1
DEMO_SPACE = "demo_digits"  # a shipped search space (search_spaces/, installed as catrs.search_spaces)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"catrs: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"radius must be non-negative, got {text}")
    return value


def _output(text: str) -> Path | str:
    """A local path, or an object-store URI kept as text (a Path would fold its `//`); a malformed URI is
    refused with what was probably meant."""
    from catrs.storage import check_location, is_uri

    try:
        check_location(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text if is_uri(text) else Path(text)


def _add_tracking_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )


def _add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=_output,
        default=None,
        help="where soft labels and their teachers are cached: a directory or an object-store URI "
        "(default: $CATRS_CACHE or ~/.cache/catrs)",
    )


def _context(args: argparse.Namespace, progress: bool = True) -> Any:
    """The run context every layer below receives, built once from the command's options."""
    from catrs.context import RunContext

    device = getattr(args, "device", None)
    if device is not None:
        from catrs.inference import check_device

        check_device(device)
    return RunContext.create(
        data_root=args.data_root,
        download=args.download,
        cache=getattr(args, "cache_dir", None),
        device=getattr(args, "device", None),
        progress=progress,
        tracking_uri=args.tracking_uri,
    )


def _add_data_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--data-root", type=Path, default=None, help="data directory (default: $CATRS_DATA or ./data)")
    parser.add_argument("--download", action="store_true", help="download the data set if it is missing")
    if device:  # a sweep's trials run on the devices Ray gives them
        parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _add_sampling_options(parser: argparse.ArgumentParser, mode: str) -> None:
    from catrs.sampling import DEFAULT_INFERENCE, DEFAULT_TOLERANCE, INFERENCE_MODES, SamplingProtocol

    published = SamplingProtocol()
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a catrs checkpoint file, or a registered model: models:/NAME@ALIAS or models:/NAME/VERSION",
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="noise level (default: the checkpoint's; given, it must be the checkpoint's)",
    )
    if mode == "certify":
        parser.add_argument(
            "--n0", type=int, default=published.n0, help=f"selection samples per image (default {published.n0:,})"
        )
        parser.add_argument(
            "--adaptive",
            action="store_true",
            help="adaptive CERTIFY: --n is the largest n; each image's n is chosen from an independent pilot, "
            "with the same guarantee (docs/methods.md)",
        )
        parser.add_argument(
            "--tolerance",
            type=float,
            default=None,
            help=f"with --adaptive: the radius, in units of sigma, an image may give up against certifying it with "
            f"--n samples (default {DEFAULT_TOLERANCE:g})",
        )
    parser.add_argument(
        "--n", type=int, default=published.n, help=f"estimation samples per image (default {published.n:,})"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=published.alpha,
        help=f"failure probability, below 0.5 (default {published.alpha:g})",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=published.batch,
        help=f"noisy samples per forward pass (default {published.batch:,})",
    )
    parser.add_argument("--skip", type=int, default=1, help="certify every SKIP-th image")
    parser.add_argument(
        "--max", type=int, default=None, dest="max_index", help="stop before this position (default: all images)"
    )
    parser.add_argument(
        "--split", default="test", help="test (default), val (the images held out of train), train or train_minus_val"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image noise streams")
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="autocast the model (faster; trades the fp32 soundness argument; recorded)",
    )
    parser.add_argument(
        "--inference",
        default=DEFAULT_INFERENCE,
        help=f"{' | '.join(INFERENCE_MODES)} (default {DEFAULT_INFERENCE}): how the model runs; the same logits",
    )
    parser.add_argument(
        "--out",
        type=_output,
        required=True,
        help="result file (.parquet, or .tsv): a path or an object-store URI (s3://bucket/…)",
    )
    parser.add_argument("--format", choices=("parquet", "tsv"), default=None, help="default: from --out's suffix")
    if mode == "certify":
        parser.add_argument(
            "--corruptions",
            action="store_true",
            help="certify the data set's corrupted copy (cifar10 → cifar10_c; with --skip 100 as "
            "the paper) and report per corruption",
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="certify on K Ray workers pulling small chunks of images (a GPU each where the cluster "
        "has GPUs); 0: in this process",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="images per chunk with --workers (default: the planner's, several chunks per worker)",
    )
    _add_tracking_option(parser)
    _add_data_options(parser)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting of `TrainConfig` that has one; given, it overrides --config."""
    from catrs.train import config_flags

    for field in config_flags():
        meta = field.metadata
        parser.add_argument(meta["flag"], dest=field.name, type=meta["parse"], default=None, help=meta["help"] or None)


def _build_parser() -> argparse.ArgumentParser:
    from catrs import __version__

    parser = _Parser(prog="catrs", description="Certifiably robust classifiers by randomized smoothing.")
    parser.add_argument("--version", action="version", version=f"catrs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a base classifier with a registered method")
    train.add_argument(
        "--config",
        help="YAML file of train settings, or a search space (a file or a shipped name: "
        "its first point); flags override it",
    )
    _add_config_flags(train)
    train.add_argument(
        "--hold-out-val",
        action="store_const",
        const="train_minus_val",
        dest="train_split",
        help="train on train minus the val split, keeping val unseen (as every sweep trial does)",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method hyper-parameter, e.g. --set lbd=2.0 (repeatable)",
    )
    train.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, metrics)")
    _add_cache_option(train)
    train.add_argument(
        "--workers",
        type=int,
        default=0,
        help="train with Ray Train on K data-parallel workers (0: in this process, without Ray)",
    )
    train.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs of each worker (default: one where the cluster has or can get GPUs, else none)",
    )
    train.add_argument("--cpus-per-worker", type=float, default=1.0)
    train.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train storage for checkpoints: a directory or a cloud URI (default: --out's parent)",
    )
    _add_tracking_option(train)
    _add_data_options(train)

    for mode in ("certify", "predict"):
        sub = commands.add_parser(mode, help=f"{'CERTIFY' if mode == 'certify' else 'PREDICT'} over a data set split")
        _add_sampling_options(sub, mode)

    report = commands.add_parser("report", help="ACR and certified accuracy of result files or MLflow runs")
    report.add_argument(
        "sources", nargs="*", help="result files (Parquet or TSV) or MLflow run ids, each as SOURCE or LABEL=SOURCE"
    )
    report.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="[LABEL=]PARENT_RUN_ID",
        help="the trade-off report of a finished sweep (its MLflow parent run): frontier, objective "
        "by parameter, importances; repeated: the sweeps' frontiers compared (Figure 2(c))",
    )
    report.add_argument(
        "--radius",
        type=_non_negative_float,
        default=0.5,
        help="with --sweep: the radius of the certified accuracy on the frontier (default 0.5)",
    )
    report.add_argument("--radii", type=_non_negative_float, nargs="+", default=None)
    report.add_argument(
        "--json", action="store_true", help="print a source's report as one JSON object; several: {label: that object}"
    )
    report.add_argument("--linf", action="store_true", help="also show the ℓ∞ radii r/√d")
    report.add_argument(
        "--dataset", default=None, help="the data set of results that record none, such as a research TSV (for --linf)"
    )
    report.add_argument("--markdown", action="store_true", help="the comparison table as Markdown")
    report.add_argument("--latex", action="store_true", help="the comparison table as LaTeX")
    report.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the certified-accuracy curves (corruption results: bars per corruption; "
        "sweeps: their frontiers) to a PNG",
    )
    _add_tracking_option(report)

    tune = commands.add_parser("tune", help="sweep a search space with Ray Tune + Optuna for the best ACR")
    _add_sweep_options(tune)
    tune.add_argument(
        "space",
        help="a search-space YAML file, or the name of a shipped one (catrs_cifar10, "
        "demo_digits, …: the files in search_spaces/, installed with catrs; "
        "a wrong name lists them all)",
    )
    tune.add_argument("--resume", action="store_true", help="finish a killed sweep")
    _add_dry_run_option(tune)

    demo = commands.add_parser("demo", help="the embedded default: a small CAT-RS sweep on the digits set")
    _add_sweep_options(demo)
    demo.add_argument(
        "--space",
        default=DEMO_SPACE,
        help=f"a search-space YAML file or a shipped space's name (default: {DEMO_SPACE})",
    )
    _add_dry_run_option(demo)
    return parser


def _add_dry_run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and validate the search space, print what would run, and stop (starts neither Ray nor MLflow)",
    )


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, default=None, help="trials (default: the file's budget)")
    parser.add_argument(
        "--storage-path",
        default=None,
        help="Ray Tune storage for trials: a directory or a cloud URI (default: runs/sweeps)",
    )
    _add_cache_option(parser)
    _add_tracking_option(parser)
    _add_data_options(parser, device=False)


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = value.strip()
    return values


def _train_config(args: argparse.Namespace) -> Any:
    from catrs.sweep.space import find_search_space, load_search_space, read_yaml_mapping
    from catrs.train import TrainConfig, config_flags

    settings: dict[str, Any] = {}
    if args.config:
        config_file = find_search_space(args.config, "config file")  # a file, else a shipped space of that name
        settings = read_yaml_mapping(config_file, "config file")
        if "search" in settings:  # a search space: its first point, trained as the sweep trains its choice
            space = load_search_space(config_file)
            split = "train" if space.selection.refit else "train_minus_val"
            settings = asdict(space.settings(space.first_point(), train_split=split))
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UserError(f"{config_file}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    for name in [field.name for field in config_flags()] + ["train_split"]:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["method_config"] = {**settings.get("method_config", {}), **_parse_sets(args.set)}
    return TrainConfig(**settings)


def _run_train(args: argparse.Namespace) -> None:
    from catrs.tracking import Tracker, run_tags, tracked_run, ui_hint
    from catrs.train import RunFolder, check_run_folder, claimed_run

    spec = _train_config(args).resolve()
    config = spec.config
    if args.workers < 0 or (args.gpus_per_worker or 0) < 0 or args.cpus_per_worker <= 0:
        raise UserError("--workers and --gpus-per-worker must be ≥ 0 and --cpus-per-worker > 0")
    if args.gpus_per_worker is not None and not args.workers:  # it was silently ignored
        raise UserError(
            f"--gpus-per-worker {args.gpus_per_worker:g} applies to Ray workers: add --workers K, or leave it out "
            f"(without --workers the run trains in this process, on --device)"
        )
    context = _context(args)
    # Every refusal before the MLflow run starts: the folder, a run of other settings in it, the data.
    check_run_folder(spec, args.out)
    if RunFolder(args.out).trained_epochs() >= config.epochs:  # finished: nothing to train, no empty run
        print(f"{args.out} is complete: {config.epochs} epochs trained; nothing to do, no run added")
        print(f"checkpoint: {RunFolder(args.out).checkpoint}")
        return
    if args.workers:  # workers the cluster can never hold would be waited for for ever: refused before any work
        from catrs.distributed.train import refuse_a_plan_beyond_reach
        from catrs.train import WorkerPlan

        plan = WorkerPlan(args.workers, args.gpus_per_worker, args.cpus_per_worker)
        asked = f"--workers {args.workers}"
        asked += "" if args.gpus_per_worker is None else f" --gpus-per-worker {args.gpus_per_worker:g}"
        asked += "" if args.cpus_per_worker == 1.0 else f" --cpus-per-worker {args.cpus_per_worker:g}"
        refuse_a_plan_beyond_reach(plan, asked)
    data = _training_split(args, config, context)
    _check_precision(args, config.precision)
    with claimed_run(spec, args.out):
        tracker = Tracker(context.tracking_uri, spool=args.out / "mlflow-pending")  # unusable: fails before work
        tags = run_tags("train", config.method, config.dataset, config.sigma)
        with tracked_run(tracker, args.out.name, tags, asdict(config)) as run_id:
            tracker.log_dataset(run_id, data, "training")
            checkpoint = _train_locally_or_on_ray(args, spec, context, tracker, run_id)
            tracker.log_artifact(run_id, checkpoint.parent / "metrics.jsonl")
            _log_model(tracker, run_id, checkpoint, data.example)
    print(f"checkpoint: {checkpoint}")
    print(ui_hint(tracker.uri, tracker.experiment_id, run_id))


def _training_split(args: argparse.Namespace, config: Any, context: Any) -> Any:
    """The facts of the split a run trains on (readable, or refused before any work): read here, or — for Ray
    workers on a cluster with GPUs, whose nodes hold the data — by one of them, not the driver on the head."""
    from catrs.data import split_facts

    if args.workers:
        from catrs.distributed.chunks import facts_on_a_worker
        from catrs.distributed.runtime import capacity, connect

        connect()
        if capacity().accelerated:
            return facts_on_a_worker(config.dataset, (config.train_split,), context)[config.train_split]
    return split_facts(config.dataset, config.train_split, context.data_root, context.download)


def _check_precision(args: argparse.Namespace, precision: str) -> None:
    """The precision on the device the run trains on — this process's, or its Ray workers' (a GPU each where
    the plan or the cluster gives one; Ray is connected by now) — checked before the run's folder and MLflow
    run exist (the training loop's own check comes after both)."""
    import torch

    from catrs.inference import check_precision, pick_device

    if not args.workers:
        check_precision(precision, pick_device(args.device))
        return
    from catrs.distributed.train import gpus_of
    from catrs.train import WorkerPlan

    gpus = gpus_of(WorkerPlan(args.workers, args.gpus_per_worker, args.cpus_per_worker))
    check_precision(precision, torch.device("cuda" if gpus else "cpu"))


def _log_model(tracker: Any, run_id: str, checkpoint: Path, example: Any) -> None:
    """The trained model on its run, as an MLflow PyTorch model with an input example (the checkpoint file is
    in it); a store that cannot take it costs only the model record, with a message."""
    from catrs.model_registry import log_checkpoint_model

    try:
        log_checkpoint_model(tracker, run_id, checkpoint, example)
    except Exception as error:  # MLflow raises many kinds for a store that cannot take models
        print(
            f"catrs: MLflow did not take the model ({type(error).__name__}); the checkpoint is {checkpoint}",
            file=sys.stderr,
        )
        tracker.log_artifact(run_id, checkpoint, "checkpoint")


def _train_locally_or_on_ray(args: argparse.Namespace, spec: Any, context: Any, tracker: Any, run_id: str) -> Path:
    def on_epoch(metrics: dict[str, float]) -> None:
        _print_epoch(metrics)
        tracker.log_metrics(run_id, metrics, step=int(metrics["epoch"]))

    if args.workers:
        from catrs.checkpoint import load_checkpoint
        from catrs.distributed.train import train_distributed
        from catrs.train import WorkerPlan

        plan = WorkerPlan(args.workers, args.gpus_per_worker, args.cpus_per_worker, args.storage_path)
        checkpoint = train_distributed(spec, args.out, plan, context)
        # Logged from here, the driver, once the workers are done: on a cluster only the head reaches MLflow.
        for metrics in (load_checkpoint(checkpoint).training_state or {}).get("history", []):
            on_epoch(metrics)
        return checkpoint
    from catrs.train import train

    return train(spec, args.out, context, on_epoch)


def _print_epoch(metrics: dict[str, float]) -> None:
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
    print(f"epoch {int(metrics['epoch'])}: {shown}", flush=True)


def _certify_only(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol's fields that only `catrs certify` takes: n0, and the adaptive procedure."""
    if args.command != "certify":
        return {}
    if args.tolerance is not None and not args.adaptive:
        raise UserError("--tolerance applies to adaptive certification only: add --adaptive, or leave it out")
    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}
    return {"n0": args.n0, "adaptive": args.adaptive, **tolerance}


def _run_sampling(args: argparse.Namespace) -> None:
    from catrs.certify import CertifyRequest, CertifySettings, prepare_certification
    from catrs.sampling import Mode, SamplingProtocol
    from catrs.tracking import ui_hint

    if args.max_index is not None and args.max_index < 1:
        raise UserError(f"--max must be a positive integer (leave it out for every image), got {args.max_index}")
    # PREDICT has no selection phase: its n0 is the protocol's, checked but never used.
    protocol = SamplingProtocol(n=args.n, alpha=args.alpha, batch=args.batch, **_certify_only(args))
    settings = CertifySettings(protocol, seed=args.seed, mixed_precision=args.mixed_precision, inference=args.inference)
    dataset = args.dataset
    if getattr(args, "corruptions", False):
        from catrs.data import corrupted_variant

        dataset = corrupted_variant(args.dataset)
    context = _context(args)
    request = CertifyRequest(
        checkpoint=_checkpoint_file(args.checkpoint, context),
        dataset=dataset,
        sigma=args.sigma,
        out=args.out,
        checkpoint_source=args.checkpoint,
        settings=settings,
        mode=Mode(args.command),
        split=args.split,
        skip=args.skip,
        max_index=-1 if args.max_index is None else args.max_index,
        output_format=args.format,
    )
    if args.workers < 0:
        raise UserError(f"--workers must be a non-negative integer, got {args.workers}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UserError(f"--chunk-size must be a positive integer, got {args.chunk_size}")
    prepared = prepare_certification(request, context)  # every refusal happens here, before MLflow or Ray start
    if prepared.selected and not prepared.todo:  # a finished command run again: one MLflow run per output
        print(f"{prepared.writer.path} is complete: all {len(prepared.selected)} images; nothing to do, no run added")
        _print_results(args, prepared.writer.path)
        return
    if args.workers:  # a pool the cluster can never hold would be waited for for ever: refused before any work
        from catrs.distributed.chunks import refuse_a_pool_beyond_reach

        refuse_a_pool_beyond_reach(args.workers, f"--workers {args.workers}")
    with prepared.claimed():
        out, tracker, run_id = _sample_and_track(args, request, prepared, context)
    _print_results(args, out)
    print(ui_hint(tracker.uri, tracker.experiment_id, run_id))


def _print_results(args: argparse.Namespace, out: Any) -> None:
    """Where the results are; for corruptions, their per-corruption report."""
    from catrs.results import read_results

    if args.command == "certify" and "corruption" in read_results(out).columns:
        from catrs.metrics import DEFAULT_RADII
        from catrs.report import build_report, format_report

        print(format_report(build_report(out, DEFAULT_RADII)))
    print(f"results: {out}  (summary: catrs report {out})")


def _sample_and_track(args: argparse.Namespace, request: Any, prepared: Any, context: Any) -> tuple[Any, Any, str]:
    """The certification (or prediction) of a claimed output, recorded as an MLflow run."""
    from catrs.certify import run_certification
    from catrs.data import split_facts
    from catrs.results import read_results
    from catrs.tracking import Tracker, run_tags, tracked_run

    name = prepared.writer.path.name
    # The journal of records MLflow could not take yet lives on this machine: beside a local output, else here.
    spool = (
        Path(args.out).with_name(name + ".mlflow-pending")
        if prepared.writer.path.local
        else Path(name + ".mlflow-pending")
    )
    tracker = Tracker(context.tracking_uri, spool=spool)
    dataset = request.dataset
    tags = run_tags(args.command, prepared.checkpoint.card.method, dataset, prepared.checkpoint.card.sigma)
    with tracked_run(tracker, name, tags, prepared.provenance) as run_id:
        tracker.log_dataset(run_id, split_facts(dataset, args.split, context.data_root, context.download), "evaluation")
        if args.workers:
            from catrs.distributed.chunks import certify_distributed

            out = certify_distributed(request, context, args.workers, args.chunk_size)
        else:
            out = run_certification(request, context)
        frame = read_results(out)
        if args.command == "certify":
            tracker.log_results(run_id, frame, out)
        else:
            tracker.log_metrics(
                run_id,
                {
                    "accuracy": float((frame["correct"] == 1).mean()),
                    "abstain_rate": float((frame["predict"] == -1).mean()),
                },
            )
            tracker.log_artifact(run_id, out, "results")
    return out, tracker, run_id


def _checkpoint_file(given: str, context: Any) -> Path:
    """--checkpoint as a file: itself, or the checkpoint of a registered model (`models:/NAME@ALIAS`)."""
    from catrs.model_registry import checkpoint_of, is_model_uri

    if not is_model_uri(given):
        return Path(given)
    return checkpoint_of(given, context.tracking_uri, context.local_cache)


def _run_report(args: argparse.Namespace) -> None:
    from catrs.metrics import DEFAULT_RADII
    from catrs.report import comparison_input_dim, comparison_table, format_comparison, load_sources

    radii = args.radii or DEFAULT_RADII
    if args.plot is not None:
        _check_plot(args.plot)
    if args.sweep:
        _report_sweeps(args)
        return
    if not args.sources:
        raise UserError("give result files or MLflow run ids to report on, or --sweep PARENT_RUN_ID")
    sources = load_sources(args.sources, args.tracking_uri)
    frames = {label: source.frame for label, source in sources.items()}
    single = len(sources) == 1 and not (args.markdown or args.latex or args.plot)
    table3 = not single and _compares_corruptions(args, frames)
    dim = comparison_input_dim(sources, args.dataset) if args.linf else None  # refused before any plot
    if args.plot:
        _plot_results(frames, table3, args.plot)
    if args.json or single:
        _print_reports(args, sources, radii)
    elif table3:
        _report_corruptions(args, sources)
    else:
        print(format_comparison(comparison_table(frames, radii), _table_style(args), _linf_row(radii, dim)))
    if args.plot:
        print(f"plot: {args.plot}")


def _print_reports(args: argparse.Namespace, sources: dict[str, Any], radii: Any) -> None:
    """Each result's report: one source's as text or one JSON object, several as {label: that object}, so
    that a source's figures read the same (fractions, keys, provenance) alone or beside others."""
    from catrs.report import format_report, source_report

    reports = {label: source_report(source, radii, args.dataset) for label, source in sources.items()}
    if not args.json:
        print(format_report(next(iter(reports.values())), linf=args.linf))
    else:
        print(json.dumps(next(iter(reports.values())) if len(reports) == 1 else reports))


def _compares_corruptions(args: argparse.Namespace, frames: dict[str, Any]) -> bool:
    """Whether the comparison is the paper's Table 3 (results of `certify --corruptions`); refuses clean
    results among them, and --linf (the table is accuracy at r = 0 and ACR)."""
    if not any("corruption" in frame.columns for frame in frames.values()):
        return False
    clean = [label for label, frame in frames.items() if "corruption" not in frame.columns]
    if clean:
        raise UserError(
            f"{', '.join(clean)} holds no corruption rows; compare results of `certify --corruptions` "
            f"with each other, and clean results with each other"
        )
    if args.linf:
        raise UserError("--linf does not apply to corruption results (their table is accuracy at r = 0 and ACR)")
    return True


def _plot_results(frames: dict[str, Any], table3: bool, path: Path) -> None:
    """The certified-accuracy curves, or for corruption results the bars of accuracy per corruption."""
    if table3:
        from catrs.plots import plot_corruption_accuracy
        from catrs.report import corruption_comparison

        plot_corruption_accuracy(corruption_comparison(frames)[0], path)
    else:
        from catrs.plots import plot_certified_accuracy

        plot_certified_accuracy(frames, path)


def _linf_row(radii: Any, dim: int | None) -> dict[str, float] | None:
    """The ℓ∞ radius r/√d under each radius of a comparison (None: no ℓ∞ row)."""
    from catrs.metrics import linf_radius

    return None if dim is None else {f"{r:.2f}": float(linf_radius(r, dim)) for r in radii}


def _check_plot(path: Path) -> None:
    """A PNG file in an existing folder, refused before any work otherwise."""
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: plots are PNG files; give a name ending in .png")
    from catrs.storage import stored

    stored(path).check_writable("--plot")


def _table_style(args: argparse.Namespace) -> str:
    return "markdown" if args.markdown else "latex" if args.latex else "text"


def _report_sweeps(args: argparse.Namespace) -> None:
    """Each sweep's trade-off report (also logged to its parent run); several: their frontiers compared."""
    from catrs.sweep.report import (
        format_frontier_comparison,
        format_sweep_report,
        log_sweep_report,
        plot_frontiers,
        sweep_report_record,
        sweep_reports,
    )
    from catrs.tracking import Tracker

    if args.sources:
        raise UserError("give result files or --sweep PARENT_RUN_ID, not both")
    result_options = [
        flag
        for flag, given in (
            ("--markdown", args.markdown),
            ("--latex", args.latex),
            ("--linf", args.linf),
            ("--radii", args.radii),
            ("--dataset", args.dataset),
        )
        if given
    ]
    if result_options:
        verb = "applies" if len(result_options) == 1 else "apply"
        raise UserError(
            f"{', '.join(result_options)} {verb} to result files, not to --sweep (it takes --radius, --json and --plot)"
        )
    tracker = Tracker(args.tracking_uri, lookup=True)
    try:
        reports = sweep_reports(tracker, args.sweep, args.radius)
        for report in reports:
            log_sweep_report(tracker, report)
    finally:
        tracker.close()
    if args.json:
        print(json.dumps({report.name: sweep_report_record(report) for report in reports}))
    else:
        print("\n\n".join(format_sweep_report(report) for report in reports))
        if len(reports) > 1:
            print("\n" + format_frontier_comparison(reports))
    if args.plot:
        plot_frontiers(reports, args.plot)
        print(f"plot: {args.plot}")


def _report_corruptions(args: argparse.Namespace, sources: dict[str, Any]) -> None:
    """The paper's Table 3 for results of `certify --corruptions`: accuracy at r = 0, then ACR, per corruption;
    then what each result covers (partial where it misses corruptions or severities)."""
    from catrs.report import (
        TABLE3_ACCURACY,
        TABLE3_ACR,
        corruption_comparison,
        corruption_coverage,
        describe_coverage,
        format_comparison,
    )

    accuracy, acr = corruption_comparison({label: source.frame for label, source in sources.items()})
    style = _table_style(args)
    print(format_comparison(accuracy, style, layout=TABLE3_ACCURACY))
    print()
    print(format_comparison(acr, style, layout=TABLE3_ACR))
    for label, source in sources.items():
        print(f"{label}: {describe_coverage(corruption_coverage(source.frame, source.provenance.get('dataset')))}")


def _sweep(args: argparse.Namespace, space: Any, resume: bool) -> None:
    from catrs.sweep.console import format_outcome
    from catrs.sweep.run import SweepOptions, run_sweep
    from catrs.tracking import ui_hint

    context = _context(args)
    command = None if args.command == "demo" else "the same catrs tune command with --resume finishes it"
    options = SweepOptions(args.num_samples, resume, args.storage_path, resume_command=command)
    outcome = run_sweep(space, options, context)
    print(format_outcome(outcome, space, args.tracking_uri, args.data_root))
    print(f"sweep: {outcome.path}  (MLflow parent run {outcome.parent_run_id})")
    print(ui_hint(context.tracking_uri, outcome.experiment_id, outcome.parent_run_id))


def _sweep_space(args: argparse.Namespace) -> Any:
    """The search space `tune` and `demo` run (and `--dry-run` shows): a file, or a shipped space by name,
    validated; the demo's is a new sweep each time (teachers and soft labels are cached, so a second demo is
    quicker)."""
    from catrs.sweep.space import find_search_space, load_search_space

    space = load_search_space(find_search_space(args.space))
    if args.command == "demo":
        space = replace(space, name=f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}", registered_name=space.name)
    return space


def _dry_run(args: argparse.Namespace, space: Any) -> None:
    """What the sweep would run and should cost, in four lines; nothing is started."""
    from catrs.sweep.ledger import format_expected_cost

    trials = space.trials(args.num_samples)
    arch = f" ({space.arch})" if space.arch else ""
    print(f"search space: {space.path.resolve()} (valid)")
    print(
        f"sweep {space.name}: {space.method} on {space.dataset}{arch} at σ = {space.sigma:g}, searching "
        f"{', '.join(space.search)}; {trials} trials, {space.budget.max_concurrent} at a time, "
        f"{space.budget.describe(space.epochs)}"
    )
    print(format_expected_cost(space, trials))
    print("dry run: nothing started")


def _run_tune(args: argparse.Namespace) -> None:
    space = _sweep_space(args)
    if args.dry_run:
        _dry_run(args, space)
    else:
        _sweep(args, space, args.resume)


def _run_demo(args: argparse.Namespace) -> None:
    space = _sweep_space(args)
    if args.dry_run:
        _dry_run(args, space)
    else:
        _sweep(args, space, resume=False)


_COMMANDS = {
    "train": _run_train,
    "certify": _run_sampling,
    "predict": _run_sampling,
    "report": _run_report,
    "tune": _run_tune,
    "demo": _run_demo,
}


def main(argv: list[str] | None = None) -> int:
    from catrs.interrupts import Stopped, forget_saved, signal_of, stop_on_sigterm, stopped_message

    args = _build_parser().parse_args(argv)
    forget_saved()
    stop_on_sigterm()
    try:
        _COMMANDS[args.command](args)
    except UserError as error:
        print(f"catrs: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except JobFailed as error:
        print(f"catrs: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Stopped) as stop:
        print(f"catrs: {stopped_message(stop)}", file=sys.stderr)
        return 128 + signal_of(stop)[1]  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
