"""MLflow tracking from the driver: one parent run per sweep, one child run per trial, no duplicates.

Trials only report to Ray; this callback (running in the driver) is the single MLflow writer. Runs are
found again by tags (``dpsweep.sweep``, ``dpsweep.trial_key``), so a resumed sweep reuses its parent and
child runs and never logs an epoch, or a trial's final metrics, twice (a trial that had finished before the driver
was killed is restarted by Ray from its final checkpoint and reports the same final result again).

What a child run holds (Ray's results and trials.parquet keep everything, unchanged):

- name, tags and params: the trial point's (`trainables.point.TrialPoint`, made with the trial): its short run name
  (the key is the ``dpsweep.trial_key`` tag), its tags (sweep, role, key, ``dpsweep.private``, privacy setup,
  provenance) plus the parent run and Ray's trial id, which only the driver knows; its params and ``budget``
  (`names.BUDGET_PARAM`: ``eps=<target>`` or ``non-private``).
- metrics: only headlines (`names.is_headline`, at most `names.MAX_HEADLINES` keys): every per-epoch metric at
  step = epoch, the final report's headlines at step 0. A private trial's metrics all carry the run's start time as
  their timestamp (Ray's per-report times would time its epochs, docs/design.md "Timing figures"). No infinite value
  is logged (MLflow's SQL stores cannot hold one): the only infinity a trial reports is a non-private run's epsilon,
  which therefore has no epsilon metric at all.
- never ``train/loss`` (`NOT_SHARED`): a non-private trial's training loss is computed on the private training
  images with no DP mechanism; Ray's results and ``runs/<sweep>/epochs.parquet`` keep it, the experiment does not
  (neither as a metric nor as a column of a logged table).
- artifacts under ``evaluation/``: ``metrics.parquet`` (the whole final report, long form) with its ``metrics.csv``
  preview, logged before the final headlines, whose marker (`FINAL_MARKER`) goes last; and once the trial ends,
  the final checkpoint's tables (``groups``, ``bootstrap``, ``epochs``, ``predictions``), each parquet with a
  ``.csv`` twin up to `PREVIEW_MAX_ROWS` rows.

Artifacts are written through `analysis.mlflow_source.artifact_repository` (a sqlite store's ``mlflow-artifacts:/``
locations are the ``mlartifacts/`` folder beside the database), so the store can be moved.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.parquet as pq
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

from analysis.mlflow_source import experiment_artifact_location, run_artifact_repository, sqlite_path
from sweeps.mlflow_ui import publish_views
from trainables import names as M
from trainables.names import (
    EVALUATION_ARTIFACT_DIR,
    FINAL_FILE,
    FINAL_MARKER,
    METRICS_FILE,
    PARENT_TAG,
    RAY_TRIAL_ID_TAG,
    REPORT_ARTIFACT_DIR,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_KEY_TAG,
    is_headline,
)
from trainables.point import POINT, TrialPoint
from trainables.trial import is_final_report

if TYPE_CHECKING:
    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from ray.tune.experiment import Trial
    from ray.tune.stopper import Stopper

_INVALID = re.compile(r"[^A-Za-z0-9_\-. /:]")
PREVIEW_MAX_ROWS = 20_000
"""A parquet artifact gets a ``.csv`` twin (which the MLflow UI previews; it does not preview parquet) when it has
at most this many rows: the evaluation tables always, the per-image predictions of small test sets only."""
_BATCH = 900  # MLflow caps a batch at 1000 metrics
NOT_SHARED: frozenset[str] = frozenset({M.TRAIN_LOSS})
"""Metrics, and table columns, never logged to the shared experiment: ``train/loss``, the mean loss of a non-private
trial's training batches, is computed on the private training images with no DP mechanism (private trials never
report it). Ray's results and ``runs/<sweep>/epochs.parquet`` keep it, labelled (docs/outputs.md)."""


def metric_key(name: str) -> str:
    """MLflow allows letters, digits, ``_ - . / : `` and spaces in names; map anything else to ``_``."""
    return _INVALID.sub("_", name)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3 opens an untagged experiment on its GenAI overview; this kind opens it as a model-training experiment."""
MODEL_TRAINING_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The sweep's experiment, marked as a model-training experiment. A new one stores its artifacts at
    `analysis.mlflow_source.experiment_artifact_location` (``mlflow-artifacts:/<name>``, relative to the store, for
    a sqlite store or a tracking server; ``artifact_root/<name>`` for any other store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(
            name,
            artifact_location=experiment_artifact_location(client.tracking_uri, name, artifact_root),
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    publish_views(client, experiment_id)  # the UI's saved views of the sweep (sweeps.mlflow_ui)
    return experiment_id


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, sweep: str, tags: dict[str, str]) -> str:
    """The sweep's parent run, reused when the sweep is resumed."""
    found = find_parent_run(client, experiment_id, sweep)
    if found is not None:
        return found
    run = client.create_run(experiment_id, run_name=sweep, tags={SWEEP_TAG: sweep, ROLE_TAG: "sweep", **tags})
    run_id: str = run.info.run_id  # MLflow's untyped @searchable_attribute makes it Any
    return run_id


def find_parent_run(client: MlflowClient, experiment_id: str, sweep: str) -> str | None:
    """The sweep's parent run id (the newest, should there be several), or None."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
    )
    return found[0].info.run_id if found else None


class MlflowSweepCallback(tune.Callback):
    """Ray Tune callback logging every trial as a child run of the sweep's parent run.

    Args:
        tracking_uri: MLflow tracking URI (sqlite file or server).
        experiment_id: the sweep's experiment.
        parent_run_id: the sweep's parent run.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._start_ms: dict[str, int] = {}  # run id -> its start time: the timestamp of a private trial's metrics
        self._logged_epochs: dict[str, set[int]] = {}
        self._logged_final: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles callbacks with the experiment state
        return {
            **self.__dict__,
            "_client": None,
            "_runs": {},
            "_start_ms": {},
            "_logged_epochs": {},
            "_logged_final": set(),
        }

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_for(self, trial: Trial) -> str:
        """The trial's child run: found by its key under this sweep's parent, else created with the point's run
        name, tags and params (`trainables.point.TrialPoint`) and the two tags only the driver knows: the parent
        run and Ray's trial id."""
        point = TrialPoint.from_ray(trial.config[POINT])
        key = point.key
        if key in self._runs:
            return self._runs[key]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_KEY_TAG}` = '{key}'",
        )
        if found:
            run_id: str = found[0].info.run_id  # MLflow's untyped @searchable_attribute makes it Any
            self._start_ms[run_id] = found[0].info.start_time
            history = self.client.get_metric_history(run_id, M.EPOCH)
            self._logged_epochs[run_id] = {int(m.value) for m in history}
            if FINAL_MARKER in found[0].data.metrics:
                self._logged_final.add(run_id)
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**point.tags, PARENT_TAG: self.parent_run_id, RAY_TRIAL_ID_TAG: trial.trial_id}
            run = self.client.create_run(self.experiment_id, run_name=point.run_name, tags=tags)
            run_id = run.info.run_id
            self._start_ms[run_id] = run.info.start_time
            params = point.mlflow_params()
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            self._logged_epochs[run_id] = set()
        self._runs[key] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.run_for(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        run_id = self.run_for(trial)
        is_final = is_final_report(result)  # not `done` alone: Ray sets it on an early-stopped trial's epoch
        epoch = int(result.get(M.EPOCH, 0))
        logged = run_id in self._logged_final if is_final else epoch in self._logged_epochs[run_id]
        if logged:
            return  # reported again after a restart (a finished trial re-reports its final result): logged already
        timestamp = int(result.get("timestamp", 0)) * 1000
        if math.isfinite(result.get(M.EPSILON, math.inf)):  # private: Ray's report times would time its epochs
            timestamp = self._start_ms[run_id]
        reported = trial_metrics(result)
        if is_final:
            # The whole report first, as an artifact: the marker metric (logged last) then implies it exists.
            self._log_final_metrics(run_id, TrialPoint.from_ray(trial.config[POINT]).key, reported)
            reported = {k: v for k, v in reported.items() if is_headline(k)}
        metrics = [Metric(metric_key(k), float(v), timestamp, epoch) for k, v in reported.items() if not math.isinf(v)]
        metrics.sort(key=lambda metric: metric.key == FINAL_MARKER)  # the marker goes last (in the last batch)
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + _BATCH])
        if not is_final:
            self._logged_epochs[run_id].add(epoch)
        else:
            self._logged_final.add(run_id)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self.run_for(trial)
        checkpoint = trial.checkpoint
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                if (Path(folder) / FINAL_FILE).exists():
                    self._log_tables(run_id, Path(folder))
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.client.set_terminated(self.run_for(trial), "FAILED")

    def _repository(self, run_id: str) -> ArtifactRepository:
        return run_artifact_repository(self.client, self.tracking_uri, run_id)

    def _log_final_metrics(self, run_id: str, key: str, metrics: dict[str, float | int]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            table = metrics_table(key, metrics)
            table.to_parquet(Path(folder) / METRICS_FILE, index=False)
            table.drop(columns="integer").to_csv(Path(folder) / Path(METRICS_FILE).with_suffix(".csv"), index=False)
            repository = self._repository(run_id)  # its log_artifacts is unannotated in MLflow
            repository.log_artifacts(folder, EVALUATION_ARTIFACT_DIR)  # type: ignore[no-untyped-call]

    def _log_tables(self, run_id: str, folder: Path) -> None:
        repository = self._repository(run_id)
        existing = {a.path for a in repository.list_artifacts(EVALUATION_ARTIFACT_DIR)}
        logged = {path.removeprefix(f"{EVALUATION_ARTIFACT_DIR}/") for path in existing}
        for table in sorted(folder.glob("*.parquet")):  # a resumed driver logs only what is missing
            log_with_preview(repository, table, EVALUATION_ARTIFACT_DIR, skip=logged)


def trial_metrics(result: dict[str, Any]) -> dict[str, float | int]:
    """The metrics of one Ray result that MLflow gets: our keys (``split/family/name`` and ``epoch``) with a number
    value; not Ray's bookkeeping (``timestamp``, ``training_iteration``, ...), ``done``, strings (``ray/node_id``) or
    `NOT_SHARED` metrics."""
    return {
        k: v
        for k, v in result.items()
        if ("/" in k or k == M.EPOCH) and isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_SHARED
    }


def metrics_table(key: str, metrics: dict[str, float | int]) -> pd.DataFrame:
    """A final report in long form, the ``evaluation/metrics.parquet`` artifact (`names.METRICS_FILE`): ``trial``,
    ``metric``, ``value`` (float64, infinities kept) and ``integer`` (the trial reported an ``int``)."""
    return pd.DataFrame(
        {
            "trial": key,
            "metric": list(metrics),
            "value": [float(v) for v in metrics.values()],
            "integer": [isinstance(v, int) for v in metrics.values()],
        },
        columns=["trial", "metric", "value", "integer"],
    )


def log_with_preview(
    repository: ArtifactRepository,
    table: Path,
    artifact_path: str | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Log a parquet file and, when it has at most `PREVIEW_MAX_ROWS` rows, a ``.csv`` twin beside it (MLflow's UI
    previews CSV, not parquet); file names in ``skip`` are logged already. A table with a `NOT_SHARED` column is
    logged, under its own name, without it."""
    with tempfile.TemporaryDirectory() as folder:
        table = _shared_copy(table, Path(folder))
        if table.name not in skip:
            repository.log_artifact(str(table), artifact_path)  # type: ignore[no-untyped-call]  # unannotated in MLflow
        rows = pq.ParquetFile(table).metadata.num_rows
        if rows <= PREVIEW_MAX_ROWS and table.with_suffix(".csv").name not in skip:
            twin = Path(folder) / table.with_suffix(".csv").name
            pd.read_parquet(table).to_csv(twin, index=False)
            repository.log_artifact(str(twin), artifact_path)  # type: ignore[no-untyped-call]  # unannotated in MLflow


def _shared_copy(table: Path, folder: Path) -> Path:
    """``table`` itself, or, when it has `NOT_SHARED` columns, a copy without them in ``folder``."""
    hidden = [c for c in pq.read_schema(table).names if c in NOT_SHARED]
    if not hidden:
        return table
    copy = folder / table.name
    pd.read_parquet(table).drop(columns=hidden).to_parquet(copy, index=False)
    return copy


class _ConsoleCallback(tune.Callback):
    """A console callback's clock and printer: ``log`` (default: print, flushed) is dropped when Ray pickles the
    callback with the experiment state and restored as print; ``_start`` (the clock of "elapsed") restarts when Tune
    starts the run or resumes it."""

    def __init__(self, log: Callable[[str], object] | None = None):
        self.log: Callable[[str], object] = log or functools.partial(print, flush=True)
        self._start: float | None = None

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles callbacks with the experiment state
        return {**self.__dict__, "log": None, "_start": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.log = functools.partial(print, flush=True)

    def setup(
        self,
        stop: Stopper | None = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self._start = time.monotonic()


class ProgressCallback(_ConsoleCallback):
    """One short aligned line per trial epoch and per finished trial, and after each finished trial the sweep's
    status (done / running / pending, elapsed, ETA), instead of Ray's wide status tables.

    Args:
        n_trials: trials the sweep will run (for "k of N" and the ETA).
        key_width: width the trial keys are padded to (the longest key).
        log: where lines go (default: print, flushed).
    """

    def __init__(self, n_trials: int = 0, key_width: int = 0, log: Callable[[str], object] | None = None):
        super().__init__(log)
        self.n_trials, self.key_width = n_trials, key_width

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._start = self._start or time.monotonic()

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        self._start = self._start or time.monotonic()
        key = TrialPoint.from_ray(trial.config[POINT]).key.ljust(self.key_width)
        epsilon = result.get(M.EPSILON, math.nan)
        spent = "non-DP" if math.isinf(epsilon) else f"eps {epsilon:.3f}"  # a baseline spends no finite epsilon
        if M.EPSILON not in result:  # a proxy trial (public data, `sweeps.proxy`) reports none
            spent = "proxy (public data)"
        if is_final_report(result):
            self.log(f"  done   {key}  test AUROC {result.get(M.TEST_AUROC_MACRO, math.nan):.3f}  {spent}")
            self.log(self.status(trials, finishing=trial))
        else:
            self.log(
                f"  epoch {int(result.get(M.EPOCH, 0)):>2} {key}  val AUROC "
                f"{result.get(M.VAL_AUROC_MACRO, math.nan):.3f}  {spent}"
            )

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.log(f"  FAILED {TrialPoint.from_ray(trial.config[POINT]).key}: see {trial.local_path}")
        self.log(self.status(trials))

    def status(self, trials: list[Trial], finishing: Trial | None = None) -> str:
        """``[3/8 done, 2 running, 3 pending | 4m10s elapsed, ETA 7m00s]``."""
        states = [t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in states) + (
            finishing is not None and finishing.status not in ("TERMINATED", "ERROR")
        )
        running = sum(s == "RUNNING" for s in states) - (finishing is not None and finishing.status == "RUNNING")
        total = max(self.n_trials, len(trials))
        elapsed = time.monotonic() - (self._start or time.monotonic())
        eta = f", ETA {_clock(elapsed * (total - done) / done)}" if 0 < done < total else ""
        return (
            f"  [{done}/{total} done, {running} running, {max(total - done - running, 0)} pending | "
            f"{_clock(elapsed)} elapsed{eta}]"
        )


class CellProgressCallback(_ConsoleCallback):
    """Console progress of a private selection (`sweeps.selection`): one line when all of a cell's candidates have
    ended, with the count of cells done; never a trial's key, epoch, result or count (each would reveal the secret
    number of candidates).

    Args:
        cell_of: candidate trial key -> its cell's key.
        cells: every cell's key, in the sweep's order.
        log: where lines go (default: print, flushed).
    """

    def __init__(self, cell_of: dict[str, str], cells: list[str], log: Callable[[str], object] | None = None):
        super().__init__(log)
        self.cell_of, self.cells = cell_of, cells
        self._announced: set[str] = set()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._cells_ended(trials, trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._cells_ended(trials, trial)

    def _cells_ended(self, trials: list[Trial], finishing: Trial) -> None:
        ended = {TrialPoint.from_ray(finishing.config[POINT]).key} | {
            TrialPoint.from_ray(t.config[POINT]).key for t in trials if t.status in ("TERMINATED", "ERROR")
        }
        pending = {cell for key, cell in self.cell_of.items() if key not in ended}
        for cell in self.cells:
            if cell not in pending and cell not in self._announced:
                self._announced.add(cell)
                elapsed = time.monotonic() - (self._start or time.monotonic())
                self.log(
                    f"  cell {cell}: candidates ended  [{len(self._announced)}/{len(self.cells)} cells done | "
                    f"{_clock(elapsed)} elapsed]"
                )


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{rest:02d}s"


def finish_parent(
    tracking_uri: str,
    parent_run_id: str,
    status: str,
    summary: dict[str, float] | None = None,
    artifacts: Sequence[Path] = (),
    step: int = 0,
) -> None:
    """End the sweep's parent run, with its summary metrics (the tuning epsilon: finite, it composes private trials
    only) and artifacts (parquet tables get a ``.csv`` twin, `log_with_preview`), after refreshing the experiment's
    saved UI views (`sweeps.mlflow_ui.publish_views`). ``step``: the summary's step, the sweep's part (0; n for its
    n-th extension, whose summary covers all its trials: a higher step makes it the run's latest value).

    Raises:
        ValueError: a summary value is infinite (MLflow cannot hold it; nothing is logged).
    """
    client = MlflowClient(tracking_uri)
    if summary:
        infinite = sorted(k for k, v in summary.items() if math.isinf(v))
        if infinite:
            raise ValueError(f"parent run summary {infinite} is infinite; MLflow cannot hold it")
        client.log_batch(parent_run_id, metrics=[Metric(metric_key(k), float(v), 0, step) for k, v in summary.items()])
    repository = run_artifact_repository(client, tracking_uri, parent_run_id)
    for path in artifacts:
        if path.suffix == ".parquet":
            log_with_preview(repository, path)
        else:
            repository.log_artifact(str(path))  # type: ignore[no-untyped-call]  # unannotated in MLflow
    # The saved views again, now that the trials logged their external sets (their columns and charts): a tracking
    # server's users never run `dpsweep ui`, which refreshes them too.
    publish_views(client, client.get_run(parent_run_id).info.experiment_id)
    client.set_terminated(parent_run_id, status)


def log_report(tracking_uri: str, experiment: str, sweep: str, folder: Path) -> str:
    """Log `dpsweep report`'s folder (index.html, figures, tables) under ``report/`` of the sweep's parent run,
    replacing the copy an earlier ``dpsweep report`` logged (on a store that cannot delete artifacts, the new files
    overwrite theirs and files the new report no longer has stay). Returns the artifact URI of the copy.

    Raises:
        LookupError: the store has no such experiment or no parent run of the sweep.
    """
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():  # opening it would create an empty store
        raise LookupError(f"no MLflow database at {database}")
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    parent = find_parent_run(client, found.experiment_id, sweep) if found is not None else None
    if parent is None:
        raise LookupError(f"no MLflow parent run of sweep {sweep!r} in experiment {experiment!r} at {tracking_uri}")
    repository = run_artifact_repository(client, tracking_uri, parent)
    if any(a.path == REPORT_ARTIFACT_DIR for a in repository.list_artifacts()):
        repository.delete_artifacts(REPORT_ARTIFACT_DIR)  # type: ignore[no-untyped-call]  # unannotated in MLflow
    repository.log_artifacts(str(folder), REPORT_ARTIFACT_DIR)  # type: ignore[no-untyped-call]  # unannotated in MLflow
    return f"{client.get_run(parent).info.artifact_uri}/{REPORT_ARTIFACT_DIR}"
