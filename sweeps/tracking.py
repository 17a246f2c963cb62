"""MLflow tracking from the driver: one parent run per sweep, one child run per trial, no duplicates.

Trials only report to Ray; this callback (running in the driver) is the single MLflow writer. Runs are
found again by tags (``dpsweep.sweep``, ``dpsweep.trial_key``), so a resumed sweep reuses its parent and
child runs and never logs an epoch, or a trial's final metrics, twice (a trial that had finished before the driver
was killed is restarted by Ray from its final checkpoint and reports the same final result again).
"""

from __future__ import annotations

import functools
import math
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

from sweeps.mlflow_ui import publish_views
from trainables import names as M
from trainables.names import (
    EVALUATION_ARTIFACT_DIR,
    FINAL_FILE,
    FINAL_MARKER,
    PARENT_TAG,
    RAY_TRIAL_ID_TAG,
    ROLE_TAG,
    STORED_INFINITY,
    SWEEP_TAG,
    TRIAL_KEY_TAG,
)
from trainables.trial import is_final_report

_INVALID = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_key(name: str) -> str:
    """MLflow allows letters, digits, ``_ - . / : `` and spaces in names; map anything else to ``_``."""
    return _INVALID.sub("_", name)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3 opens an untagged experiment on its GenAI overview; this kind opens it as a model-training experiment."""
MODEL_TRAINING_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The sweep's experiment, marked as a model-training experiment; artifacts go under ``artifact_root/<name>``
    (not MLflow's cwd default)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(
            name, artifact_location=(artifact_root / name).as_uri(), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    publish_views(client, experiment_id)  # the UI's saved views of the sweep (sweeps.mlflow_ui)
    return experiment_id


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, sweep: str, tags: dict[str, str]) -> str:
    """The sweep's parent run, reused when the sweep is resumed."""
    found = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'sweep'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=sweep, tags={SWEEP_TAG: sweep, ROLE_TAG: "sweep", **tags})
    return run.info.run_id


class MlflowSweepCallback(tune.Callback):
    """Ray Tune callback logging every trial as a child run of the sweep's parent run.

    Args:
        tracking_uri: MLflow tracking URI (sqlite file or server).
        experiment_id: the sweep's experiment.
        parent_run_id: the sweep's parent run.
        sweep: sweep name (tag on every run).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._logged_epochs: dict[str, set[int]] = {}
        self._logged_final: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles callbacks with the experiment state
        return {**self.__dict__, "_client": None, "_runs": {}, "_logged_epochs": {}, "_logged_final": set()}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_for(self, trial) -> str:
        """The trial's child run: found by its key under this sweep's parent, else created with params."""
        point = trial.config["point"]
        key = point["key"]
        if key in self._runs:
            return self._runs[key]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_KEY_TAG}` = '{key}'",
        )
        if found:
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, M.EPOCH)
            self._logged_epochs[run_id] = {int(m.value) for m in history}
            if FINAL_MARKER in found[0].data.metrics:
                self._logged_final.add(run_id)
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {
                PARENT_TAG: self.parent_run_id,
                SWEEP_TAG: self.sweep,
                ROLE_TAG: "trial",
                TRIAL_KEY_TAG: key,
                RAY_TRIAL_ID_TAG: trial.trial_id,
                **point["tags"],
            }
            run = self.client.create_run(self.experiment_id, run_name=key, tags=tags)
            run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in point["params"].items()]
            self.client.log_batch(run_id, params=params)
            self._logged_epochs[run_id] = set()
        self._runs[key] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        is_final = is_final_report(result)  # not `done` alone: Ray sets it on an early-stopped trial's epoch
        epoch = int(result.get(M.EPOCH, 0))
        logged = run_id in self._logged_final if is_final else epoch in self._logged_epochs[run_id]
        if logged:
            return  # reported again after a restart (a finished trial re-reports its final result): logged already
        step = epoch
        metrics = [
            Metric(metric_key(k), _finite(v), int(result.get("timestamp", 0)) * 1000, step)
            for k, v in result.items()
            if ("/" in k or k == M.EPOCH) and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        metrics.sort(key=lambda metric: metric.key == FINAL_MARKER)  # the marker goes last (in the last batch)
        for start in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(run_id, metrics=metrics[start : start + 900])
        if not is_final:
            self._logged_epochs[run_id].add(epoch)
        else:
            self._logged_final.add(run_id)
            self.client.set_tag(run_id, "dpsweep.epsilon_spent", str(result.get(M.EPSILON)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        checkpoint = trial.checkpoint
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                if (Path(folder) / FINAL_FILE).exists():
                    self._log_tables(run_id, Path(folder))
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_for(trial), "FAILED")

    def _log_tables(self, run_id: str, folder: Path) -> None:
        existing = {a.path for a in self.client.list_artifacts(run_id, EVALUATION_ARTIFACT_DIR)}
        for table in sorted(folder.glob("*.parquet")):
            if f"{EVALUATION_ARTIFACT_DIR}/{table.name}" not in existing:
                self.client.log_artifact(run_id, str(table), EVALUATION_ARTIFACT_DIR)


class ProgressCallback(tune.Callback):
    """One short aligned line per trial epoch and per finished trial, and after each finished trial the sweep's
    status (done / running / pending, elapsed, ETA), instead of Ray's wide status tables.

    Args:
        n_trials: trials the sweep will run (for "k of N" and the ETA).
        key_width: width the trial keys are padded to (the longest key).
        log: where lines go (default: print, flushed).
    """

    def __init__(self, n_trials: int = 0, key_width: int = 0, log=None):
        self.n_trials, self.key_width = n_trials, key_width
        self.log = log or functools.partial(print, flush=True)
        self._start: float | None = None

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles callbacks with the experiment state
        return {**self.__dict__, "log": None, "_start": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.log = functools.partial(print, flush=True)

    def setup(self, **info):  # Tune calls it when the run (or a resumed run) starts: the clock of "elapsed"
        self._start = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start = self._start or time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._start = self._start or time.monotonic()
        key = trial.config["point"]["key"].ljust(self.key_width)
        epsilon = result.get(M.EPSILON, math.nan)
        if is_final_report(result):
            self.log(f"  done   {key}  test AUROC {result.get(M.TEST_AUROC_MACRO, math.nan):.3f}  eps {epsilon:.3f}")
            self.log(self.status(trials, finishing=trial))
        else:
            self.log(
                f"  epoch {int(result.get(M.EPOCH, 0)):>2} {key}  val AUROC "
                f"{result.get(M.VAL_AUROC_MACRO, math.nan):.3f}  eps {epsilon:.3f}"
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"  FAILED {trial.config['point']['key']}: see {trial.local_path}")
        self.log(self.status(trials))

    def status(self, trials: list[Any], finishing: Any = None) -> str:
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


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{rest:02d}s"


def finish_parent(
    tracking_uri: str,
    parent_run_id: str,
    status: str,
    summary: dict[str, float] | None = None,
    artifacts: list[Path] = (),
) -> None:
    client = MlflowClient(tracking_uri)
    if summary:
        client.log_batch(parent_run_id, metrics=[Metric(metric_key(k), _finite(v), 0, 0) for k, v in summary.items()])
    for path in artifacts:
        client.log_artifact(parent_run_id, str(path))
    client.set_terminated(parent_run_id, status)


def _finite(value: float) -> float:
    """MLflow's SQL stores cannot hold inf; they (and we) store +/-STORED_INFINITY instead, e.g. for non-private
    epsilon."""
    value = float(value)
    if math.isinf(value):
        return math.copysign(STORED_INFINITY, value)
    return value
