"""`dpsweep` command line: sweep, plan, pretrain, prepare, ui.

User errors (bad sweep file, unprepared data, missing weights, bad privacy parameters) print one clear
message and exit with status 2, before Ray or any trial starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pandas as pd

DEFAULT_SPEC = "sweeps/smoke.yaml"
TABLE_SOURCES = ("auto", "ray", "mlflow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpsweep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="run (or resume) a sweep end to end")
    _spec_args(sweep)
    sweep.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--fresh", action="store_true", help="delete this sweep's previous results and start over")
    sweep.add_argument("--dry-run", action="store_true", help="plan only: print trials and sigma, run nothing")

    pretrain = commands.add_parser("pretrain", help="run the sweep's pretrain stage (the `domain` init)")
    _spec_args(pretrain)

    prepare = commands.add_parser("prepare", help="turn a real dataset into the preprocessing cache")
    prepare.add_argument("dataset")
    prepare.add_argument("--root", required=True, type=Path, help="the dataset's folder as distributed")
    prepare.add_argument("--size", type=int, default=224)
    prepare.add_argument("--out", type=Path, default=Path("data"))
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    prepare.add_argument("--uncertain", choices=("drop", "zeros", "ones"), default="drop")
    prepare.add_argument("--letterbox", action="store_true", help="keep aspect ratio (pad) instead of stretching")
    prepare.add_argument("--no-equalize", action="store_true", help="skip histogram equalization")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--patients-csv", type=Path, help="mimic-cxr: MIMIC-IV patients.csv(.gz) for sex and age")
    prepare.add_argument("--master-list", type=Path, help="uka-cxr: the master list (default master_list.csv)")
    prepare.add_argument("--image-pattern", help="uka-cxr: image path pattern (default images/{image_id}.jpg)")

    table = commands.add_parser("table", help="rebuild trials.parquet/epochs.parquet from Ray results or MLflow "
                                "(any state)")
    _spec_args(table)
    table.add_argument("--source", choices=TABLE_SOURCES, default="auto",
                       help="ray: the Ray experiment folder (<runs>/ray/<sweep>); mlflow: the tracking store alone "
                            "(trials that never started are absent); auto (default): ray if that folder exists, "
                            "else mlflow")

    report = commands.add_parser("report", help="write runs/<sweep>/report/index.html (tables and figures)")
    _spec_args(report)

    ui = commands.add_parser("ui", help="serve the MLflow UI for the sweeps' runs on 127.0.0.1")
    ui.add_argument("--runs", default="runs")
    ui.add_argument("--port", type=int, default=5000)

    args = parser.parse_args(argv)
    try:
        commands_by_name = {"sweep": _sweep, "pretrain": _pretrain, "prepare": _prepare, "table": _table,
                            "report": _report, "ui": _ui}
        return commands_by_name[args.command](args)
    except UserError as error:
        print(f"dpsweep: error: {error}", file=sys.stderr)
        return 2


class UserError(Exception):
    pass


def _spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"sweep file (default {DEFAULT_SPEC})")
    parser.add_argument("--runs", help="output folder (default: the spec's `runs`, or $DPSWEEP_RUNS)")
    parser.add_argument("--data", help="prepared-data folder (default: the spec's data.root, or $DPSWEEP_DATA)")


def _load(args):
    from sweeps.launch import SweepPaths
    from sweeps.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as error:
        raise UserError(str(error)) from None
    return spec, SweepPaths.for_spec(spec, args.runs, args.data)


def _sweep(args) -> int:
    from sweeps.launch import dry_run_report, plan_sweep, run_sweep
    from sweeps.spec import SpecError

    spec, paths = _load(args)
    try:
        if args.dry_run:
            print(dry_run_report(plan_sweep(spec, paths, run_pretrain_stage=False, dry_run=True)))
            return 0
        trials = run_sweep(spec, paths, address=args.address, fresh=args.fresh)
    except SpecError as error:
        raise UserError(str(error)) from None
    print_summary(trials, paths.sweep_dir(spec), paths.tracking_uri)
    return 0 if len(trials) and (trials["status"] == "TERMINATED").all() else 1


def print_summary(trials: pd.DataFrame, sweep_dir: Path, tracking_uri: str) -> None:
    from trainables import metrics as M

    columns = {"trial": "trial", "status": "status", "target_epsilon": "eps target", M.EPSILON: "eps spent",
               "noise_multiplier": "sigma", M.VAL_SELECTED_AUROC_MACRO: "val AUROC", M.TEST_AUROC_MACRO: "test AUROC",
               M.auroc_gap("test", "age"): "age gap", M.auroc_gap("test", "sex"): "sex gap"}
    external = sorted(c for c in trials.columns if c.startswith("external/") and c.endswith("/auroc_macro"))
    columns.update({c: c.split("/")[1] for c in external})
    table = trials[[c for c in columns if c in trials.columns]].rename(columns=columns)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print(f"\ntables: {sweep_dir / 'trials.parquet'}, {sweep_dir / 'epochs.parquet'}")
    print(f"MLflow: {tracking_uri}\n  open the UI with `make ui` (http://127.0.0.1:5000)")
    from sweeps.launch import adaptive_tuning_bounds, tuning_costs

    costs = tuning_costs(trials)
    adaptive = adaptive_tuning_bounds(trials)
    for dataset, cost in costs.items():
        where = f" on {dataset}" if len(costs) > 1 else ""
        print(f"privacy of releasing the best trial{where} after the whole sweep (not the per-trial epsilon): "
              f"{cost.sentence}")
        if dataset in adaptive:
            print(f"  Optuna chose trials adaptively; the bound that covers that: {adaptive[dataset]}")
    if M.EPSILON in trials:
        private = trials[trials["target_epsilon"].map(math.isfinite)]
        over = private[private[M.EPSILON] > private["target_epsilon"]]
        if len(over):
            print(f"WARNING: {len(over)} trials spent more epsilon than their target")


def _pretrain(args) -> int:
    from sweeps.launch import ensure_pretrained
    from sweeps.spec import SpecError

    spec, paths = _load(args)
    if spec.pretrain is None:
        raise UserError(f"{spec.source} has no `pretrain:` section")
    try:
        from trainables.data.registry import ensure_prepared

        ensure_prepared(spec.pretrain.dataset, paths.data_root, spec.data.image_size, spec.data.synthetic_images)
        for model in spec.models:
            print(ensure_pretrained(spec, paths, model))
    except (SpecError, FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    return 0


def _prepare(args) -> int:
    from trainables.data.prepare import DatasetError, format_card, prepare_dataset

    options = {"patients_csv": args.patients_csv, "master_list": args.master_list,
               "image_pattern": args.image_pattern}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        folder = prepare_dataset(
            args.dataset, args.root, size=args.size, out=args.out, workers=args.workers,
            uncertain=args.uncertain, letterbox=args.letterbox, equalize=not args.no_equalize, seed=args.seed,
            **options,
        )
    except (DatasetError, FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    import json

    print(format_card(json.loads((folder / "card.json").read_text())))
    print(f"prepared: {folder}")
    return 0


def _table(args) -> int:
    from analysis.tables import TableError
    from sweeps.spec import SpecError

    spec, paths = _load(args)
    experiment_dir = paths.ray_storage / spec.name
    source = args.source
    if source == "auto":
        source = "ray" if experiment_dir.is_dir() else "mlflow"
    try:
        if source == "ray":
            from sweeps.launch import rebuild_tables

            trials, epochs = rebuild_tables(spec, paths)
            origin = f"Ray results at {experiment_dir}"
        else:
            trials, epochs = _tables_from_mlflow(spec, paths)
            origin = f"MLflow runs at {paths.tracking_uri} (experiment {spec.tracking.experiment or spec.name!r})"
    except (SpecError, TableError) as error:
        raise UserError(str(error)) from None
    print_summary(trials, paths.sweep_dir(spec), paths.tracking_uri)
    print(f"{len(trials)} trials ({trials['status'].value_counts().to_dict()}), {len(epochs)} epoch rows, "
          f"from {origin}")
    return 0


def _tables_from_mlflow(spec, paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and epoch tables (and the finished trials' evaluation tables) from the sweep's MLflow runs alone."""
    from analysis.mlflow_source import evaluation_tables_from_mlflow, read_sweep
    from analysis.tables import FINISHED, build_tables, write_sweep_tables

    found = read_sweep(paths.tracking_uri, spec.tracking.experiment or spec.name, spec.name)
    trials, epochs = build_tables(found.records, found.run_ids)
    done = trials[trials["status"] == FINISHED]
    finished = dict(zip(done["trial"], done["mlflow_run_id"], strict=True))
    evaluation = evaluation_tables_from_mlflow(paths.tracking_uri, finished) if finished else None
    if evaluation is not None and (evaluation.groups.empty or evaluation.bootstrap.empty):
        evaluation = None  # no finished run logged its evaluation artifacts
    write_sweep_tables(paths.sweep_dir(spec), trials, epochs, evaluation)
    return trials, epochs


def _report(args) -> int:
    from analysis.report import write_report
    from analysis.tables import TableError

    spec, paths = _load(args)
    sweep_dir = paths.sweep_dir(spec)
    if not (sweep_dir / "trials.parquet").exists():
        raise UserError(f"no trial table at {sweep_dir / 'trials.parquet'}; run `dpsweep sweep {args.spec}` first")
    try:
        ray_dir = paths.ray_storage / spec.name  # absent for tables rebuilt from MLflow alone
        index = write_report(sweep_dir, ray_experiment_dir=ray_dir if ray_dir.is_dir() else None)
    except TableError as error:
        raise UserError(str(error)) from None
    print(f"report: {index}")
    return 0


def _ui(args) -> int:
    runs = Path(args.runs).resolve()
    db = runs / "mlflow.db"
    if not db.exists():
        raise UserError(f"no MLflow database at {db}; run `make sweep` first")
    command = ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
               "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    # MLflow 3's server otherwise starts a job runner and 7 GenAI job consumers this UI never uses.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
