"""`dpsweep` command line: sweep, pretrain, prepare, audit, table, ledger, report, release, ui.

User errors (bad sweep file, unprepared data, missing weights, bad privacy parameters: every
`trainables.errors.UserError`) print one clear message and exit with status 2, before Ray or any trial starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trainables.errors import UserError

if TYPE_CHECKING:  # annotations only: the commands import what they need when they run (--help stays fast)
    from sweeps.plan import SweepPaths
    from sweeps.schema import SweepSpec

DEFAULT_SPEC = "sweeps/smoke.yaml"
DRY_RUN_BLOCKED = 3
"""Exit status of a dry run that ends with "before running it for real" notes (data to prepare, weights to provide):
the plan is valid but the sweep cannot run yet."""
TABLE_SOURCES = ("auto", "ray", "mlflow")  # sweeps.results.TABLE_SOURCES (not imported: keeps --help fast)
PREPARABLE = ("chexpert", "mimic-cxr", "chestxray14", "padchest", "vindr-cxr", "uka-cxr", "vindr-cxr-kaggle")
"""`trainables.data.adapters.PREPARABLE` (not imported: the adapters import pandas, which would cost a second before
any sweep file is read; a test ties the two)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpsweep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="run (or resume) a sweep end to end")
    _spec_args(sweep)
    sweep.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--fresh", action="store_true", help="delete this sweep's previous results and start over")
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="plan only: print trials, sigma and GPU-hours, run nothing; exit 0 if the sweep could run here "
        f"now, {DRY_RUN_BLOCKED} if it ends with notes of what to prepare first, 2 if this environment cannot run it "
        "(too few CPUs or GPUs, a model or weight file the trials cannot use, folders, tracking store, Ray address)",
    )

    pretrain = commands.add_parser("pretrain", help="run the sweep's pretrain stage (the `domain` init)")
    _spec_args(pretrain)

    prepare = commands.add_parser(
        "prepare",
        help="turn a real dataset into the preprocessing cache",
        description="Read a dataset as distributed (metadata files and images, see docs/datasets.md), preprocess "
        "every image (grayscale, resize, min-max to [0, 1], uint8, histogram equalization) into "
        "<out>/<dataset>/<size>/, split patient-disjointly into train/val/test by a keyed hash of each patient's id "
        "(key: <out>/<dataset>/split.key, private like the cache), and print its card "
        "(counts, prevalence, demographics, excluded and skipped rows with reasons). Resumable: run it "
        f"again after an interruption. Datasets: {', '.join(PREPARABLE)}.",
    )
    prepare.add_argument("dataset", choices=PREPARABLE, metavar="dataset", help=f"one of {', '.join(PREPARABLE)}")
    prepare.add_argument("--root", required=True, type=Path, help="the dataset's folder as distributed")
    prepare.add_argument("--size", type=int, default=224, help="square image size in pixels (default 224)")
    prepare.add_argument("--out", type=Path, default=Path("data"), help="where prepared datasets go (default data)")
    prepare.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="image-decoding processes (default: the CPU count); never changes the result",
    )
    prepare.add_argument(
        "--uncertain",
        choices=("drop", "zeros", "ones"),
        default="drop",
        help="CheXpert/MIMIC uncertain (-1) labels: drop the image (default), or read as 0 or 1",
    )
    prepare.add_argument("--letterbox", action="store_true", help="keep aspect ratio (pad) instead of stretching")
    prepare.add_argument("--no-equalize", action="store_true", help="skip histogram equalization")
    prepare.add_argument(
        "--split-key",
        type=Path,
        metavar="FILE",
        help="reuse this split key (the <out>/<dataset>/split.key of an earlier preparation, e.g. for a new release "
        "or another --out): each patient's split comes from a keyed hash of its id, so with the same key adding "
        "patients moves nobody else (default: the key beside the prepared dataset, else a new secret one)",
    )
    prepare.add_argument("--patients-csv", type=Path, help="mimic-cxr: MIMIC-IV patients.csv(.gz) for sex and age")
    prepare.add_argument("--master-list", type=Path, help="uka-cxr: the master list (default master_list.csv)")
    prepare.add_argument("--image-pattern", help="uka-cxr: image path pattern (default images/{image_id}.jpg)")

    audit = commands.add_parser(
        "audit",
        help="empirical privacy audit: a lower bound on each private cell's epsilon (one run, m canaries)",
        description="One-run privacy audit (Steinke, Nasr & Jagielski 2023) of the first grid point of every private "
        "(model, dataset, init, epsilon) cell, or of the targets the sweep file's `audit:` section names. "
        "Prints the empirical epsilon lower bound beside the claimed epsilon, writes "
        "runs/<sweep>/audit.parquet and one MLflow run per audit; exits 1 if a claim is refuted (Holm over all "
        "the command's audits).",
    )
    _spec_args(audit)
    audit.add_argument(
        "--kind",
        action="append",
        choices=("white_box", "black_box"),
        help="white_box: Dirac gradient canaries through the engine's clipping and noise; black_box: "
        "mislabeled random images trained by the real trial loop (repeat for both; default: the "
        "sweep file's audit.kind, else white_box)",
    )
    audit.add_argument(
        "--m",
        type=int,
        help="canaries per audit (default: audit.m, else 1000): more canaries raise the largest epsilon an audit "
        "can refute (its 'eps ceiling') while the theorem's 2 m delta term stays small",
    )

    table = commands.add_parser(
        "table",
        help="rebuild the sweep's tables (trials, epochs, evaluation) from Ray results or MLflow (any state)",
    )
    _spec_args(table)
    table.add_argument(
        "--source",
        choices=TABLE_SOURCES,
        default="auto",
        help="ray: the Ray experiment folder (<runs>/ray/<sweep>); mlflow: the tracking store alone "
        "(trials that never started are absent); auto (default): ray if that folder exists, "
        "else mlflow",
    )

    ledger = commands.add_parser(
        "ledger",
        help="the privacy ledger of a prepared dataset: every run on its training split, composed",
        description="Compose every mechanism run recorded on a prepared dataset's training split (every sweep's "
        "trials at their planned steps, audits, runs replaced by --fresh, by anyone): the epsilon of publishing "
        "anything from all of them. Reads <data>/<dataset>/ledger/.",
    )
    ledger.add_argument("dataset", help="a prepared dataset's name, e.g. synthetic-a or chexpert")
    ledger.add_argument("--data", help="prepared-data folder (default: $DPSWEEP_DATA, else data)")
    ledger.add_argument("--delta", type=float, help="the delta to compose at (default: the smallest of the runs')")

    report = commands.add_parser("report", help="write runs/<sweep>/report/index.html (tables and figures)")
    _spec_args(report)

    release = commands.add_parser(
        "release",
        help="write a shareable bundle of what the sweep's epsilon covers (private trials, PRIVACY.md)",
        description="Copy the trials with a DP guarantee out of a sweep's tables into a new folder: tables (parquet "
        "and CSV), their report and, on request, their final model weights, with PRIVACY.md stating the per-trial, "
        "tuning and ledger epsilons, unit, adjacency and accountant, what is not covered, and every file. Never "
        "copies checkpoints, seeds, the ledger, the data or train/loss. See docs/outputs.md.",
    )
    _spec_args(release)
    release.add_argument("--out", required=True, type=Path, help="the bundle's folder (new or empty)")
    release.add_argument(
        "--include-non-private",
        action="store_true",
        help="also release the non-private and reproducible_noise trials (the bundle's epsilon is then inf)",
    )
    release.add_argument(
        "--models", action="store_true", help="also copy each finished released trial's selected weights"
    )
    release.add_argument(
        "--predictions",
        action="store_true",
        help="also release the per-image test scores (row-level data on test patients, not covered by any epsilon)",
    )

    ui = commands.add_parser("ui", help="serve the MLflow UI for the sweeps' runs on 127.0.0.1")
    ui.add_argument("--runs", default="runs")
    ui.add_argument("--port", type=int, default=5000)

    args = parser.parse_args(argv)
    try:
        commands_by_name = {
            "sweep": _sweep,
            "pretrain": _pretrain,
            "prepare": _prepare,
            "audit": _audit,
            "table": _table,
            "ledger": _ledger,
            "report": _report,
            "release": _release,
            "ui": _ui,
        }
        return commands_by_name[args.command](args)
    except UserError as error:
        print(f"dpsweep: error: {error}", file=sys.stderr)
        return 2


def _spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"sweep file (default {DEFAULT_SPEC})")
    parser.add_argument("--runs", help="output folder (default: the spec's `runs`, or $DPSWEEP_RUNS)")
    parser.add_argument("--data", help="prepared-data folder (default: the spec's data.root, or $DPSWEEP_DATA)")


def _load(args: argparse.Namespace) -> tuple[SweepSpec, SweepPaths]:
    """The sweep file, read and checked before anything heavy is imported (torch, Ray, MLflow take seconds: a
    mistake in the file is reported without them), and its paths."""
    from sweeps.spec import load_spec

    spec = load_spec(args.spec)
    from sweeps.plan import SweepPaths

    return spec, SweepPaths.for_spec(spec, args.runs, args.data)


def _sweep(args: argparse.Namespace) -> int:
    spec, paths = _load(args)
    from sweeps.describe import dry_run_report
    from sweeps.launch import SweepCheck, check_sweep_state, describe_sweep_state, run_sweep
    from sweeps.ledger import sweep_ledger_text
    from sweeps.plan import plan_sweep
    from sweeps.preflight import PreflightError, preflight
    from sweeps.summary import summary_text

    if args.dry_run:
        check = SweepCheck() if args.fresh else check_sweep_state(spec, paths)  # what the real run would refuse
        try:  # the environment, as the real run checks it first (`run_sweep`); reported after the plan
            preflight(spec, paths, address=args.address, dry_run=True)
        except PreflightError as error:
            problem: PreflightError | None = error
        else:
            problem = None
        plan = plan_sweep(spec, paths, run_pretrain_stage=False, dry_run=True)
        print(dry_run_report(plan))
        for line in describe_sweep_state(spec, paths, check):
            print(f"\n{line}")
        if problem is not None:
            raise problem
        return DRY_RUN_BLOCKED if plan.notes else 0
    trials = run_sweep(spec, paths, address=args.address, fresh=args.fresh)
    print(summary_text(trials, paths.sweep_dir(spec), paths.tracking_uri, spec))
    print(sweep_ledger_text(paths.data_root, spec.data.train))
    return 0 if len(trials) and (trials["status"] == "TERMINATED").all() else 1


def _pretrain(args: argparse.Namespace) -> int:
    spec, paths = _load(args)
    from sweeps.plan import ensure_pretrained
    from trainables.data.registry import ensure_prepared

    if spec.pretrain is None:
        raise UserError(f"{spec.source} has no `pretrain:` section")
    try:
        ensure_prepared(spec.pretrain.dataset, paths.data_root, spec.data.image_size, spec.data.synthetic_images)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"{spec.source}: pretrain.dataset: {error}") from None
    for model in spec.models:
        print(ensure_pretrained(spec, paths, model))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from trainables.data.prepare import DatasetError, format_card, prepare_dataset

    options = {"patients_csv": args.patients_csv, "master_list": args.master_list, "image_pattern": args.image_pattern}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        folder = prepare_dataset(
            args.dataset,
            args.root,
            size=args.size,
            out=args.out,
            workers=args.workers,
            uncertain=args.uncertain,
            letterbox=args.letterbox,
            equalize=not args.no_equalize,
            split_key=args.split_key,
            **options,
        )
    except (DatasetError, FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    import json

    print(format_card(json.loads((folder / "card.json").read_text())))
    print(f"prepared: {folder}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    spec, paths = _load(args)
    from sweeps.audit import audit_summary, run_audits
    from sweeps.lock import sweep_lock

    if args.m is not None and args.m < 10:
        raise UserError(f"--m {args.m}: an audit needs at least 10 canaries (1000 is the usual)")
    with sweep_lock(paths.sweep_dir(spec), spec.name):  # it writes runs/<sweep>/ too: not while the sweep runs
        table = run_audits(spec, paths, kinds=tuple(args.kind) if args.kind else None, m=args.m)
    print(audit_summary(table))
    print(f"\naudit table: {paths.sweep_dir(spec) / 'audit.parquet'}")
    return 1 if table["violates_claim"].any() else 0


def _table(args: argparse.Namespace) -> int:
    spec, paths = _load(args)
    from sweeps.lock import held_note
    from sweeps.results import rebuild_tables
    from sweeps.summary import summary_text

    note = held_note(paths.sweep_dir(spec), spec.name)
    if note is not None:
        print(f"{note}: these tables are a snapshot; the sweep rewrites them when it ends")
    results = rebuild_tables(spec, paths, args.source)
    trials = results.trials
    print(summary_text(trials, paths.sweep_dir(spec), paths.tracking_uri, spec))
    print(
        f"{len(trials)} trials ({trials['status'].value_counts().to_dict()}), {len(results.epochs)} epoch rows, "
        f"from {results.origin}"
    )
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from sweeps.ledger import describe_ledger

    root = Path(args.data or os.environ.get("DPSWEEP_DATA") or "data")
    if not (root / args.dataset).is_dir():
        raise UserError(
            f"ledger: no prepared dataset {args.dataset!r} under {root}/; name a dataset prepared there, or pass "
            "--data with the folder that holds it"
        )
    if args.delta is not None and not 0 < args.delta < 1:
        raise UserError(f"ledger: --delta {args.delta!r} must be in (0, 1), e.g. 6e-6")
    print(describe_ledger(root, args.dataset, args.delta))
    return 0


def _report(args: argparse.Namespace) -> int:
    spec, paths = _load(args)
    from analysis.report import write_report

    sweep_dir = paths.sweep_dir(spec)
    if not (sweep_dir / "trials.parquet").exists():
        raise UserError(f"no trial table at {sweep_dir / 'trials.parquet'}; run `dpsweep sweep {args.spec}` first")
    ray_dir = paths.ray_experiment(spec)  # absent for tables rebuilt from MLflow alone
    index = write_report(sweep_dir, ray_experiment_dir=ray_dir if ray_dir.is_dir() else None)
    print(f"report: {index}")
    from sweeps.tracking import log_report

    try:  # the report is written either way; logging it to the sweep's parent run is a copy
        logged = log_report(paths.tracking_uri, spec.tracking.experiment or spec.name, spec.name, index.parent)
    except LookupError as error:
        print(f"report not logged to MLflow: {error}")
    else:
        print(f"report logged to MLflow: {logged}")
    return 0


def _release(args: argparse.Namespace) -> int:
    spec, paths = _load(args)
    from sweeps.lock import refuse_while_held
    from sweeps.release import PRIVACY_FILE, write_release

    refuse_while_held(paths.sweep_dir(spec), spec.name, "a release of its tables")

    release = write_release(
        spec,
        paths,
        args.out,
        include_non_private=args.include_non_private,
        models=args.models,
        predictions=args.predictions,
    )
    epsilon = ", ".join(f"{dataset} {value:.4g}" for dataset, value in release.epsilon.items())
    print(
        f"release: {release.out} ({len(release.trials)} trials, {len(release.files)} files); epsilon of the bundle: "
        f"{epsilon or 'none'}; read {release.out / PRIVACY_FILE} before sharing it"
    )
    return 0


def ui_command(runs: Path, port: int) -> list[str]:
    """The MLflow UI for the store in ``runs`` (``mlflow.db``, and ``mlartifacts/``, where the runs'
    ``mlflow-artifacts:/`` artifact locations resolve: `analysis.mlflow_source.experiment_artifact_location`), on
    127.0.0.1. The MLflow of this interpreter's environment (the venv's), not whatever `mlflow` is on PATH (none is,
    unless the venv is activated: `make` does not activate it)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        f"sqlite:///{runs / 'mlflow.db'}",
        "--artifacts-destination",
        str(runs / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def _ui(args: argparse.Namespace) -> int:
    from sweeps.preflight import check_ui

    runs = Path(args.runs).resolve()
    db = check_ui(runs, args.port)  # before any link is printed
    command = ui_command(runs, args.port)
    from sweeps.mlflow_ui import sweep_view_lines

    print("\n".join(sweep_view_lines(f"sqlite:///{db}", f"http://127.0.0.1:{args.port}/")), flush=True)
    # MLflow 3's server otherwise starts a job runner and 7 GenAI job consumers this UI never uses.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
