"""Run a sweep: its plan (`sweeps.plan`), then Ray Tune + MLflow, then the trial tables (`sweeps.results`).

    SweepSpec --plan_sweep--> SweepPlan --run_sweep--> MLflow parent run + Tuner.fit() or Tuner.restore() per part
    --> runs/<sweep>/trials.parquet, epochs.parquet (+ MLflow child runs, the parent's tuning cost)

One command at a time runs a sweep: `run_sweep` holds ``runs/<sweep>/sweep.lock`` (`sweeps.lock`) throughout.
``runs/<sweep>/sweep.json`` (`sweeps.state.SweepState`) records the sweep's settings and fingerprint
(`sweeps.plan.spec_settings`), the state-file format, whether it is complete, and its parts: a complete sweep is not
rerun, an incomplete one resumes, a sweep file that only adds grid values runs the new trials as a new part of the
same sweep (an extension: its own Ray experiment, `analysis.tables.ray_part_dir`; the same MLflow parent run, ledger
instance and tables), and any other change under the same name is refused naming each changed field
(``--fresh`` starts over).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sweeps import quiet  # noqa: F401 (silences Ray's known noise before Ray is imported)
from sweeps.describe import describe_plan, sweep_params
from sweeps.ledger import SweepLedger, ledger_metrics
from sweeps.lock import held_note, sweep_lock
from sweeps.plan import Log, SweepPaths, SweepPlan, plan_sweep, spec_fingerprint, spec_settings, trial_key
from sweeps.preflight import preflight
from sweeps.results import ray_results, run_ids
from sweeps.spec import SpecError, SweepSpec
from sweeps.state import EXTENDABLE, OTHER_SETTING, Part, SettingChange, SweepState, refusal, setting_changes
from sweeps.tuning_cost import tuning_summary
from trainables import names as N
from trainables.point import POINT, TrialPoint

if TYPE_CHECKING:
    from ray.tune import TuneConfig

    from sweeps.selection import SelectionRun

STATE_FORMAT = 4
"""Version of ``sweep.json`` and of what the sweep was started with. 2: sweep-file fields named after the trial
settings they set; 3: typed trial points (`trainables.point.TrialPoint`; the Optuna searcher Ray saves holds them);
4: the settings and the parts (first grid, extensions) recorded (`sweeps.state`), so that a dpsweep that knows
neither refuses the sweep rather than resume its first part alone. A grid sweep of format 2 resumes
(`TrialPoint.from_ray` reads the points it gave Ray); an older sweep, or an Optuna sweep of format 2, is refused with
the way out (`RESUMABLE_FORMATS`), never half-resumed. A state of format 2 or 3 records no settings: its sweep
resumes, but is not extended."""
RESUMABLE_FORMATS: dict[str, tuple[int, ...]] = {
    "grid": (2, 3, STATE_FORMAT),
    "optuna": (3, STATE_FORMAT),
    "private_selection": (STATE_FORMAT,),
    "proxy": (STATE_FORMAT,),
}
"""Search mode -> the state formats a sweep of that mode resumes from."""
FORMAT_CHANGES = {
    1: "sweep-file fields were renamed",
    2: "the Optuna searcher Ray saved holds types this dpsweep no longer has",
}
"""State format -> why a sweep of that format (and mode) cannot be resumed by this dpsweep."""
COMPLETE, INCOMPLETE, RUNNING = "complete", "incomplete", "running"


@dataclass(frozen=True)
class SweepCheck:
    """What running the sweep file would do with the sweep of its name in the runs folder (`check_sweep_state`).

    Attributes:
        state: the sweep's ``sweep.json``; None for a new sweep.
        parts: its parts so far (a state written before parts: one, its grid); () for a new sweep.
        changes: the grid values the sweep file adds to the sweep as it ran (an extension); () when unchanged.
        new_trials: the keys of the grid points no part holds: the trials an extension (or a new grid sweep) adds.
    """

    state: SweepState | None = None
    parts: tuple[Part, ...] = ()
    changes: tuple[SettingChange, ...] = ()
    new_trials: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """The sweep ran to its end and the file adds nothing: nothing to run."""
        return self.state is not None and self.state.status == COMPLETE and not self.new_trials

    @property
    def extends(self) -> bool:
        return self.state is not None and bool(self.new_trials)


def run_sweep(
    spec: SweepSpec, paths: SweepPaths, *, address: str | None = None, fresh: bool = False, log: Log = print
) -> pd.DataFrame:
    """Run (or resume, or extend) a sweep end to end and return its trial table.

    Checks the environment first (`sweeps.preflight.preflight`), before anything is written; then holds the sweep's
    lock (`sweeps.lock.sweep_lock`) from before ``--fresh`` deletes anything to the end.

    Raises:
        sweeps.preflight.PreflightError: this environment cannot run the sweep.
        sweeps.lock.SweepLockedError: another command runs the sweep now.
        SpecError: the sweep exists with settings this file cannot resume or extend (`check_sweep_state`), or the
            plan fails (`sweeps.plan.plan_sweep`).
    """
    preflight(spec, paths, address=address, dry_run=False)
    with sweep_lock(paths.sweep_dir(spec), spec.name, log):
        return _run_sweep(spec, paths, address, fresh, log)


def _run_sweep(spec: SweepSpec, paths: SweepPaths, address: str | None, fresh: bool, log: Log) -> pd.DataFrame:
    sweep_dir = paths.sweep_dir(spec)
    state_file = sweep_dir / N.SWEEP_STATE_FILE
    fingerprint = spec_fingerprint(spec)
    if fresh:
        _replace_in_ledger(spec, paths, state_file)
        _remove_sweep(spec, paths)
    check = check_sweep_state(spec, paths)
    if check.complete and (sweep_dir / N.TRIALS_FILE).exists():
        from sweeps.scrub import scrub_ended_trials

        scrub_ended_trials(paths.ray_experiment(spec), complete=True)  # a sweep completed by an earlier dpsweep
        log(f"sweep {spec.name!r} is complete; nothing to run (use --fresh to run it again)")
        return pd.read_parquet(sweep_dir / N.TRIALS_FILE)
    # this run of the sweep: its ledger runs (kept on resume and extension)
    instance = (check.state.instance if check.state else None) or uuid.uuid4().hex[:12]
    parts = list(check.parts)
    if check.new_trials or not parts:
        parts.append(Part(check.new_trials))

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
    settings = spec_settings(spec)
    SweepState(STATE_FORMAT, fingerprint, RUNNING, instance, settings, tuple(parts)).write(state_file)
    log(describe_plan(plan))
    if check.extends:
        log(f"extending sweep {spec.name!r} {extension_summary(check)}")
    ledger = SweepLedger(
        str(paths.data_root),
        spec.name,
        instance,
        {name: dataset.patient_images for name, dataset in plan.datasets.items()},
    )
    # grid trials, before any runs (those recorded already, on an earlier run of this instance, are not recorded
    # again: an extension records its new trials); Optuna's factory records each trial it makes
    ledger.record(plan.trials)
    selection = _prepare_selection(plan, ledger, log)

    import ray
    from ray import tune

    from sweeps.scrub import scrub_ended_trials
    from sweeps.tracking import finish_parent, get_or_create_experiment, get_or_create_parent_run
    from trainables.trial import dp_trial

    experiment_id = get_or_create_experiment(
        client, spec.tracking.experiment or spec.name, paths.runs_root / "mlartifacts"
    )
    parent = get_or_create_parent_run(
        client, experiment_id, spec.name, {"dpsweep.fingerprint": fingerprint, "dpsweep.spec": spec.source}
    )
    _log_parent_params(client, parent, sweep_params(plan), check, len(parts) - 1, fingerprint)
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
    for index, part in enumerate(parts):
        if part.status == COMPLETE:
            continue
        if selection is not None:
            selection.run(trainable)
            continue
        if plan.proxy is not None:
            part_ended = _run_proxy(plan, ledger, trainable, experiment_id, parent, log)
        else:
            part_ended = _all_ended(_part_tuner(plan, ledger, trainable, index, part, experiment_id, parent, log).fit())
        if not part_ended:
            break  # interrupted (Ctrl-C): the later parts wait for the next run
    outcome = selection.finish(experiment_id, parent, ledger) if selection is not None else None
    released = outcome.released if outcome is not None else _proxy_released(plan)
    # runs/<sweep>/: the same tables, through the same writer, as `dpsweep table --source ray`
    results = ray_results(experiment_path, run_ids(client, experiment_id, parent), released)
    trials = results.trials
    ended = dict(zip(trials["trial"].astype(str), trials["status"].astype(str), strict=True))
    if selection is None:
        ledger.mark(spec.data.train, {key: LEDGER_STATUS.get(status, status.lower()) for key, status in ended.items()})
    results.write(sweep_dir, ledger=(paths.data_root, spec.data.train))
    if outcome is not None:
        complete = outcome.ended
    else:
        complete = len(trials) == plan.n_trials and trials["status"].isin(N.ENDED).all()
    scrub_ended_trials(experiment_path, complete)  # INCOMPLETE trials keep their secrets to resume (sweeps.scrub)
    parts = [replace(part, status=_part_status(part, ended, complete)) for part in parts]
    status = COMPLETE if complete else INCOMPLETE
    SweepState(STATE_FORMAT, fingerprint, status, instance, settings, tuple(parts)).write(state_file)
    ledger_file = sweep_dir / N.LEDGER_SUMMARY_FILE
    finish_parent(
        paths.tracking_uri,
        parent,
        "FINISHED" if complete else "FAILED",
        summary=(outcome.metrics if outcome is not None else _summary_metrics(plan, trials))
        | ledger_metrics(spec, paths.data_root),
        artifacts=[
            sweep_dir / N.TRIALS_FILE,
            sweep_dir / N.EPOCHS_FILE,
            ledger_file,
            *([sweep_dir / N.SELECTION_FILE] if (sweep_dir / N.SELECTION_FILE).is_file() else []),
        ],
        step=len(parts) - 1,
    )
    return trials


def _all_ended(grid: Any) -> bool:
    """Whether every trial of a fitted Ray part ended (not interrupted)."""
    return bool(len(grid) == grid.num_terminated + grid.num_errors)


def _run_proxy(plan: SweepPlan, ledger: SweepLedger, trainable: Any, experiment_id: str, parent: str, log: Log) -> bool:
    """search: proxy: phase 1 on public data, then phase 2's private trials, each phase its own Ray part
    (`sweeps.proxy.ProxyRun`); False when interrupted."""
    from sweeps.proxy import ProxyRun

    def tuner(phase: SweepPlan, ray_part: int, trials: list[TrialPoint]) -> Any:
        part = Part(tuple(t.key for t in trials))
        return _part_tuner(phase, ledger, trainable, ray_part, part, experiment_id, parent, log)

    return ProxyRun(plan).run(tuner, trainable, ledger, (experiment_id, parent), log)


def _proxy_released(plan: SweepPlan) -> set[str] | None:
    """A proxy sweep's tabled trials (`sweeps.proxy.released_trials`); None (every trial) for other sweeps."""
    if plan.proxy is None:
        return None
    from sweeps.proxy import released_trials

    return released_trials(plan)


def _summary_metrics(plan: SweepPlan, trials: pd.DataFrame) -> dict[str, float]:
    """The parent run's tuning cost: of the trials that trained on private data (`sweeps.proxy.summary_metrics` for a
    proxy sweep, whose phase 1 ran on public data)."""
    if plan.proxy is None:
        return tuning_summary(plan.spec, trials)
    from sweeps.proxy import summary_metrics

    return summary_metrics(plan, trials)


def _prepare_selection(plan: SweepPlan, ledger: SweepLedger, log: Log) -> SelectionRun | None:
    """A private selection's candidates (`sweeps.selection.SelectionRun.prepare`: the secret draws, before anything
    runs), each cell recorded once in the ledger; None for other searches."""
    if plan.spec.search != "private_selection":
        return None
    from sweeps.selection import SelectionRun, selection_paths_note

    selection = SelectionRun.prepare(plan)
    selection.record(ledger)
    log(selection_paths_note(plan.paths, plan.spec))
    return selection


def _part_tuner(
    plan: SweepPlan,
    ledger: SweepLedger,
    trainable: Any,
    index: int,
    part: Part,
    experiment_id: str,
    parent: str,
    log: Log,
) -> Any:
    """The Tuner of one part of the sweep (its first grid, or an extension: `analysis.tables.ray_part_dir`): Ray's
    saved experiment restored (its errored trials run again), or a new one of the part's trials."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from analysis.tables import ray_part_dir
    from sweeps.scrub import ScrubSecretsCallback
    from sweeps.tracking import MlflowSweepCallback, ProgressCallback

    spec = plan.spec
    folder = ray_part_dir(plan.paths.ray_experiment(spec), index)
    extension = f" (extension {index})" if index else ""
    if tune.Tuner.can_restore(str(folder)):
        log(f"resuming sweep {spec.name!r}{extension} from {folder}")
        return tune.Tuner.restore(str(folder), trainable, resume_errored=True)
    trials = [t for t in plan.trials if t.key in set(part.trials)]
    callback = MlflowSweepCallback(plan.paths.tracking_uri, experiment_id, parent)
    return tune.Tuner(
        trainable,
        param_space=({POINT: tune.grid_search([t.to_ray() for t in trials])} if spec.optuna is None else {}),
        tune_config=_tune_config(plan, ledger),
        run_config=tune.RunConfig(
            name=folder.name,
            storage_path=str(folder.parent),
            callbacks=[
                callback,
                ProgressCallback(len(trials) if spec.optuna is None else plan.n_trials, _key_width(trials)),
                CSVLoggerCallback(),  # type: ignore[no-untyped-call]  # Ray leaves its __init__ unannotated
                JsonLoggerCallback(),  # type: ignore[no-untyped-call]  # Ray leaves its __init__ unannotated
                ScrubSecretsCallback(),  # an ended trial's checkpoints lose their secrets (sweeps.scrub)
            ],
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        ),
    )


def _key_width(trials: list[TrialPoint]) -> int:
    return max((len(t.key) for t in trials), default=0)


def _part_status(part: Part, ended: dict[str, str], sweep_complete: bool) -> str:
    """A part is complete when each of its trials ended (an Optuna search's one part: when the sweep is)."""
    if not part.trials:
        return COMPLETE if sweep_complete else INCOMPLETE
    return COMPLETE if all(ended.get(key) in N.ENDED for key in part.trials) else INCOMPLETE


def _log_parent_params(
    client: Any,
    parent: str,
    params: dict[str, Any],
    check: SweepCheck,
    extension: int,
    fingerprint: str,
) -> None:
    """The sweep-wide settings on the parent run. MLflow params cannot change: an extension's parent keeps the values
    the sweep started with, gains the params it did not have, and records the extension in the tag
    ``dpsweep.extension.<n>`` (what it added, the trials then) and its settings' fingerprint in
    ``dpsweep.fingerprint``."""
    from mlflow.entities import Param

    if check.extends:
        logged = client.get_run(parent).data.params
        params = {k: v for k, v in params.items() if k not in logged}
        client.set_tag(parent, f"{N.TAG_PREFIX}extension.{extension}", extension_summary(check, shown=0))
        client.set_tag(parent, f"{N.TAG_PREFIX}fingerprint", fingerprint)
        client.update_run(parent, "RUNNING")
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()])


def extension_summary(check: SweepCheck, shown: int = 10) -> str:
    """``(training.seed: [0] -> [0, 1]): 2 new trials (2 kept as they ran): <key>, <key>``, naming at most ``shown``
    of the new trials."""
    added = "; ".join(str(change) for change in check.changes)
    kept = len({key for part in check.parts for key in part.trials})
    names = ", ".join(check.new_trials[:shown]) + (", ..." if len(check.new_trials) > shown else "")
    return f"({added}): {len(check.new_trials)} new trials ({kept} kept as they ran)" + (f": {names}" if shown else "")


def check_sweep_state(spec: SweepSpec, paths: SweepPaths) -> SweepCheck:
    """What running ``spec`` would do with the sweep of its name (`SweepCheck`): start it, resume it, find it
    complete, or extend it with the trials of grid values it adds; raise `SpecError` if this dpsweep cannot continue
    it with this sweep file (another state format, settings changed other than by added grid values: each changed
    field is named, with its old and new value). `run_sweep` and the dry run (``dpsweep sweep --dry-run``) both ask
    it, so a dry run refuses what the real run would."""
    state_file = paths.sweep_dir(spec) / N.SWEEP_STATE_FILE
    if not state_file.exists():
        return SweepCheck(new_trials=tuple(grid_keys(spec)))
    try:
        state = SweepState.from_json(json.loads(state_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SpecError(
            f"{spec.source}: the sweep's state file {state_file} is unreadable or incomplete ({error!r:.200}); run "
            "again with --fresh to start the sweep over, or change `name`"
        ) from None
    if state.format not in RESUMABLE_FORMATS[spec.search]:
        change = FORMAT_CHANGES.get(state.format, "a format this dpsweep does not know")
        raise SpecError(
            f"{spec.source}: the sweep {spec.name!r} in {paths.runs_root} was started by an earlier dpsweep "
            f"(state format {state.format}, now {STATE_FORMAT}: {change}); its results stay where they are; run again "
            "with --fresh to start it over, or change `name`"
        )
    keys = grid_keys(spec)
    parts = state.parts or (Part(tuple(keys), state.status),)  # a state written before parts: its grid
    ran = {key for part in parts for key in part.trials}
    check = SweepCheck(state, parts, (), tuple(key for key in keys if key not in ran))
    if state.fingerprint == spec_fingerprint(spec):
        return check
    exists = f"{spec.source}: a sweep named {spec.name!r} already exists in {paths.runs_root} with other settings"
    way_out = "change `name`, or run again with --fresh to delete the old sweep's results"
    if state.settings is None:
        raise SpecError(f"{exists} (its sweep.json, written by an earlier dpsweep, does not record which); {way_out}")
    changes = setting_changes(state.settings, spec_settings(spec))
    if spec.search == "proxy":  # its phase 2 is chosen from the whole of phase 1: new grid values cannot be added
        raise SpecError(
            f"{exists} ({', '.join(str(change) for change in changes)}); a proxy sweep cannot be extended (phase 2 is "
            f"chosen from all of phase 1); {way_out}"
        )
    refused = {str(change): refusal(change, state.settings) for change in changes}
    if any(reason is not None for reason in refused.values()) or not ran <= set(keys):
        lines = [
            f"  {change}" + ("" if reason is None else f" ({reason})" if reason != OTHER_SETTING else "")
            for change, reason in refused.items()
        ]
        extendable = ", ".join(EXTENDABLE[:-1]) + f" or {EXTENDABLE[-1]}"
        raise SpecError(
            f"{exists}:\n" + "\n".join(lines) + f"\nonly values added to {extendable} (with the init_weights or "
            "pretrain of an added init) extend a sweep; run the file it ran with, "
            f"{way_out}"
        )
    return replace(check, changes=tuple(changes))


def grid_keys(spec: SweepSpec) -> list[str]:
    """The trial keys of the sweep's grid (none for an Optuna search: its trials are proposed as it runs)."""
    return [trial_key(spec, point) for point in spec.grid()] if spec.search == "grid" else []


def describe_sweep_state(spec: SweepSpec, paths: SweepPaths, check: SweepCheck) -> list[str]:
    """What the dry run says of the sweep in the runs folder: held by a running command, complete, incomplete, or
    extended (which new trials the real run would run)."""
    lines = []
    note = held_note(paths.sweep_dir(spec), spec.name)
    if note is not None:
        lines.append(f"{note}: the real run would be refused until it ends")
    if check.complete and (paths.sweep_dir(spec) / N.TRIALS_FILE).exists():
        lines.append(
            f"sweep {spec.name!r} is complete in {paths.runs_root}: it would run nothing (--fresh runs it again)"
        )
    elif check.extends:
        lines.append(f"sweep {spec.name!r} in {paths.runs_root} would be extended {extension_summary(check)}")
    elif check.state is not None:
        lines.append(f"sweep {spec.name!r} in {paths.runs_root} is {check.state.status}: the real run resumes it")
    return lines


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
    """--fresh: delete the sweep's tables and Ray state (its extensions' included), every trial checkpoint and the
    secrets of unfinished trials included (MLflow runs are kept, the parent is recreated). The lock this run holds
    stays."""
    sweep_dir = paths.sweep_dir(spec)
    for path in sweep_dir.iterdir() if sweep_dir.is_dir() else ():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != N.SWEEP_LOCK_FILE:
            path.unlink()
    if paths.ray_experiment(spec).exists():
        shutil.rmtree(paths.ray_experiment(spec))
    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], f"tags.`{N.SWEEP_TAG}` = '{spec.name}'"):
            client.set_tag(run.info.run_id, N.SWEEP_TAG, f"{spec.name} (replaced)")
            if run.data.tags.get(N.ROLE_TAG) == "sweep":
                client.set_terminated(run.info.run_id, "KILLED")
