"""Run a sweep: its plan (`sweeps.plan`), then Ray Tune + MLflow, then the trial tables (`sweeps.results`).

    SweepSpec --plan_sweep--> SweepPlan --run_sweep--> MLflow parent run + Tuner.fit() or Tuner.restore()
    --> runs/<sweep>/trials.parquet, epochs.parquet (+ MLflow child runs, the parent's tuning cost)

``runs/<sweep>/sweep.json`` records the sweep's fingerprint (`sweeps.plan.spec_fingerprint`), the state-file
format and whether it is complete: a complete sweep is not rerun, an incomplete one resumes, a changed sweep
file under the same name is refused (``--fresh`` starts over).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sweeps import quiet  # noqa: F401 (silences Ray's known noise before Ray is imported)
from sweeps.describe import describe_plan, sweep_params
from sweeps.ledger import SweepLedger, ledger_metrics
from sweeps.plan import Log, SweepPaths, SweepPlan, plan_sweep, spec_fingerprint
from sweeps.preflight import preflight
from sweeps.results import ray_results, run_ids
from sweeps.spec import SpecError, SweepSpec
from sweeps.tuning_cost import tuning_summary
from trainables import names as N
from trainables.point import POINT

if TYPE_CHECKING:
    from ray.tune import TuneConfig

STATE_FORMAT = 3
"""Version of ``sweep.json`` and of what the sweep was started with. 2: sweep-file fields named after the trial
settings they set; 3: typed trial points (`trainables.point.TrialPoint`; the Optuna searcher Ray saves holds them). A
grid sweep of format 2 resumes (`TrialPoint.from_ray` reads the points it gave Ray); an older sweep, or an Optuna
sweep of format 2, is refused with the way out (`RESUMABLE_FORMATS`), never half-resumed."""
RESUMABLE_FORMATS: dict[str, tuple[int, ...]] = {"grid": (2, STATE_FORMAT), "optuna": (STATE_FORMAT,)}
"""Search mode -> the state formats a sweep of that mode resumes from."""
FORMAT_CHANGES = {
    1: "sweep-file fields were renamed",
    2: "the Optuna searcher Ray saved holds types this dpsweep no longer has",
}
"""State format -> why a sweep of that format (and mode) cannot be resumed by this dpsweep."""


def run_sweep(
    spec: SweepSpec, paths: SweepPaths, *, address: str | None = None, fresh: bool = False, log: Log = print
) -> pd.DataFrame:
    """Run (or resume) a sweep end to end and return its trial table."""
    preflight(spec, paths, address=address, dry_run=False)  # the environment, before anything is written
    sweep_dir = paths.sweep_dir(spec)
    state_file = sweep_dir / N.SWEEP_STATE_FILE
    fingerprint = spec_fingerprint(spec)
    if fresh:
        _replace_in_ledger(spec, paths, state_file)
        _remove_sweep(spec, paths)
    state = check_sweep_state(spec, paths)
    if state.get("status") == "complete" and (sweep_dir / N.TRIALS_FILE).exists():
        from sweeps.scrub import scrub_ended_trials

        scrub_ended_trials(paths.ray_experiment(spec), complete=True)  # a sweep completed by an earlier dpsweep
        log(f"sweep {spec.name!r} is complete; nothing to run (use --fresh to run it again)")
        return pd.read_parquet(sweep_dir / N.TRIALS_FILE)
    instance = state.get("instance") or uuid.uuid4().hex[:12]  # this run of the sweep: its ledger runs

    plan = plan_sweep(spec, paths, log=log)
    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # any failure of the store is the user's URI to fix
        raise SpecError(
            f"{spec.source}: tracking.uri: the MLflow tracking store {paths.tracking_uri!r} cannot be "
            f"used ({type(error).__name__}: {str(error)[:300]}); fix `tracking.uri` (or "
            "$MLFLOW_TRACKING_URI), or remove it to use runs/mlflow.db"
        ) from None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_state(state_file, fingerprint, "running", instance)
    log(describe_plan(plan))
    ledger = SweepLedger(
        str(paths.data_root),
        spec.name,
        instance,
        {name: dataset.patient_images for name, dataset in plan.datasets.items()},
    )
    ledger.record(plan.trials)  # grid trials, before any runs; Optuna's factory records each trial it makes

    import ray
    from mlflow.entities import Param
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from sweeps.scrub import ScrubSecretsCallback, scrub_ended_trials
    from sweeps.tracking import (
        MlflowSweepCallback,
        ProgressCallback,
        finish_parent,
        get_or_create_experiment,
        get_or_create_parent_run,
    )
    from trainables.trial import dp_trial

    experiment_id = get_or_create_experiment(
        client, spec.tracking.experiment or spec.name, paths.runs_root / "mlartifacts"
    )
    parent = get_or_create_parent_run(
        client, experiment_id, spec.name, {"dpsweep.fingerprint": fingerprint, "dpsweep.spec": spec.source}
    )
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in sweep_params(plan).items()])
    ray_address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # address="local": always a private Ray, never one an earlier `ray start` left in /tmp/ray.
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
    trainable = tune.with_resources(dp_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    experiment_path = paths.ray_experiment(spec)
    if tune.Tuner.can_restore(str(experiment_path)):
        log(f"resuming sweep {spec.name!r} from {experiment_path}")
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        callback = MlflowSweepCallback(paths.tracking_uri, experiment_id, parent)
        tuner = tune.Tuner(
            trainable,
            param_space=({POINT: tune.grid_search([t.to_ray() for t in plan.trials])} if spec.search == "grid" else {}),
            tune_config=_tune_config(plan, ledger),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(paths.ray_storage),
                callbacks=[
                    callback,
                    ProgressCallback(plan.n_trials, max((len(t.key) for t in plan.trials), default=0)),
                    CSVLoggerCallback(),
                    JsonLoggerCallback(),
                    ScrubSecretsCallback(),  # an ended trial's checkpoints lose their secrets (sweeps.scrub)
                ],
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            ),
        )
    tuner.fit()
    # runs/<sweep>/: the same tables, through the same writer, as `dpsweep table --source ray`
    results = ray_results(experiment_path, run_ids(client, experiment_id, parent))
    trials = results.trials
    ended = dict(zip(trials["trial"].astype(str), trials["status"].astype(str), strict=True))
    ledger.mark(spec.data.train, {key: LEDGER_STATUS.get(status, status.lower()) for key, status in ended.items()})
    results.write(sweep_dir, ledger=(paths.data_root, spec.data.train))
    complete = len(trials) == plan.n_trials and trials["status"].isin(N.ENDED).all()
    scrub_ended_trials(experiment_path, complete)  # INCOMPLETE trials keep their secrets to resume (sweeps.scrub)
    _write_state(state_file, fingerprint, "complete" if complete else "incomplete", instance)
    ledger_file = sweep_dir / N.LEDGER_SUMMARY_FILE
    finish_parent(
        paths.tracking_uri,
        parent,
        "FINISHED" if complete else "FAILED",
        summary=tuning_summary(spec, trials) | ledger_metrics(spec, paths.data_root),
        artifacts=[sweep_dir / N.TRIALS_FILE, sweep_dir / N.EPOCHS_FILE, ledger_file],
    )
    return trials


def check_sweep_state(spec: SweepSpec, paths: SweepPaths) -> dict[str, Any]:
    """The state (``sweep.json``) of an earlier run of this sweep, {} if none; raise `SpecError` if this dpsweep
    cannot continue it with this sweep file (another state format, other settings). `run_sweep` and the dry run
    (``dpsweep sweep --dry-run``) both ask it, so a dry run refuses what the real run would."""
    state_file = paths.sweep_dir(spec) / N.SWEEP_STATE_FILE
    if not state_file.exists():
        return {}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as error:
        state = error
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise SpecError(
            f"{spec.source}: the sweep's state file {state_file} is unreadable or incomplete ({state!r:.200}); run "
            "again with --fresh to start the sweep over, or change `name`"
        )
    started = state.get("format", 1)
    if started not in RESUMABLE_FORMATS[spec.search]:
        change = FORMAT_CHANGES.get(started, "a format this dpsweep does not know")
        raise SpecError(
            f"{spec.source}: the sweep {spec.name!r} in {paths.runs_root} was started by an earlier dpsweep "
            f"(state format {started}, now {STATE_FORMAT}: {change}); its results stay where they are; run again "
            "with --fresh to start it over, or change `name`"
        )
    if state["fingerprint"] != spec_fingerprint(spec):
        raise SpecError(
            f"{spec.source}: a sweep named {spec.name!r} already exists in {paths.runs_root} with other settings; "
            "change `name`, or run again with --fresh to delete the old sweep's results"
        )
    return state


def _tune_config(plan: SweepPlan, ledger: SweepLedger) -> TuneConfig:
    """Grid: one Ray trial per grid point. Optuna: `PrivateOptunaSearch` behind a concurrency limit.
    Either may use ASHA early stopping on the validation macro AUROC the trial would select so far (reported every
    epoch and in the final report, as Ray requires of a scheduler's metric)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    spec = plan.spec
    scheduler = None
    if spec.early_stopping is not None:
        max_epochs = max(spec.optuna.epochs) if spec.optuna is not None else spec.privacy.epochs
        # stop_last_trials=False: a trial that reaches its last epoch still sends its final evaluation.
        scheduler = ASHAScheduler(
            time_attr=N.EPOCH,
            metric=N.VAL_SELECTED_AUROC_MACRO,
            mode="max",
            max_t=max_epochs,
            grace_period=spec.early_stopping.grace_period,
            reduction_factor=spec.early_stopping.reduction_factor,
            stop_last_trials=False,
        )
    if spec.optuna is None:
        return tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent or None, scheduler=scheduler)
    from sweeps.search import optuna_searcher

    searcher = ConcurrencyLimiter(optuna_searcher(plan, ledger), max_concurrent=spec.optuna.max_concurrent)
    return tune.TuneConfig(search_alg=searcher, num_samples=plan.n_trials, scheduler=scheduler)


def _write_state(path: Path, fingerprint: str, status: str, instance: str) -> None:
    """``sweep.json``: the format, the settings' fingerprint, the status and the instance (this run of the sweep,
    whose trials are its runs in the privacy ledger; kept on resume, new after ``--fresh``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "status": status, "instance": instance}
    path.write_text(json.dumps(state, indent=2))


LEDGER_STATUS = {"TERMINATED": "finished", "STOPPED": "stopped", "ERROR": "error"}
"""A trial's status in the trial table -> its run's status in the ledger (others: lower-cased)."""


def _replace_in_ledger(spec: SweepSpec, paths: SweepPaths, state_file: Path) -> None:
    """--fresh: the runs of the instance being replaced stay in the ledger (they trained on the data), marked."""
    if not state_file.exists():
        return
    instance = json.loads(state_file.read_text()).get("instance")
    if instance:
        SweepLedger(str(paths.data_root), spec.name, instance, {}).mark(spec.data.train, {"*": "replaced"})


def _remove_sweep(spec: SweepSpec, paths: SweepPaths) -> None:
    """--fresh: delete the sweep's tables and Ray state, every trial checkpoint and the secrets of unfinished trials
    included (MLflow runs are kept, the parent is recreated)."""
    for folder in (paths.sweep_dir(spec), paths.ray_experiment(spec)):
        if folder.exists():
            shutil.rmtree(folder)
    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], f"tags.`{N.SWEEP_TAG}` = '{spec.name}'"):
            client.set_tag(run.info.run_id, N.SWEEP_TAG, f"{spec.name} (replaced)")
            if run.data.tags.get(N.ROLE_TAG) == "sweep":
                client.set_terminated(run.info.run_id, "KILLED")
