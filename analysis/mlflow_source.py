"""Trial records read back from the MLflow tracking store alone, for `analysis.tables.build_tables`.

`dpsweep table --source mlflow` uses this when the Ray experiment folder is gone (or was never on this
machine): the MLflow store that `sweeps.tracking.MlflowSweepCallback` wrote during the sweep is enough to
rebuild ``trials.parquet`` and ``epochs.parquet`` in the same schema as the Ray path.

**What the callback wrote, and how it is read back.**

- The sweep's parent run carries the tags ``dpsweep.sweep = <sweep>`` and ``dpsweep.role = sweep``; when
  several match (it should not happen), the most recently started one is used, as the callback does.
- One child run per *started* trial (``mlflow.parentRunId`` = the parent, ``dpsweep.trial_key`` = the
  grid point's key), with the trial's parameters as MLflow params (strings; parsed back to ``int``,
  ``float``, ``bool``, ``None`` or ``str`` as Python wrote them, ``inf`` included) and its provenance tags.
  The ``budget`` param (`names.BUDGET_PARAM`, derived from ``target_epsilon``) is not a trial parameter and is
  left out. Trials of the plan that never started have no child run and are **absent** from the tables (the
  Ray path lists them as ``INCOMPLETE``).
- Per-epoch reports are logged whole at MLflow step = ``epoch`` (1, 2, ...; they hold only
  `names.EPOCH_HEADLINES`); every step >= 1 is one epoch row, and a value logged twice at one step counts
  once, the latest.
- The final report's headline metrics (`names.is_headline`) are logged at step 0, its marker metric
  ``val/best_epoch`` (`FINAL_MARKER`) last, after the artifact ``evaluation/metrics.parquet`` that holds the
  *whole* final report (`read_final_metrics`): the marker's presence means both arrived, and the final metrics
  are read from the artifact, ints and infinities exactly as the trial reported them.
- A non-private run (tag ``dpsweep.private = false``) logs no epsilon metric; its per-epoch epsilon is ``inf``
  again here, as the trial reported it. Stores written by an earlier dpsweep held ``+-inf`` as ``+-1e308``
  (`names.STORED_INFINITY`), which is read back as ``+-inf``. Per-epoch counts the trials report as ``int``
  (`INTEGER_METRICS`) become ``int`` again; every other per-epoch metric is a float, as in Ray's results. Only
  numbers reach MLflow: a trial's string-valued results (``ray/node_id``) are not in these tables.
- Artifacts are read through `artifact_repository`: a sqlite store's ``mlflow-artifacts:/`` locations resolve
  to the ``mlartifacts/`` folder beside the database (`experiment_artifact_location`), so a moved store reads.
  MLflow's own client does the same once dpsweep is installed: `mlflow_artifacts_repository` is registered for
  that scheme (the ``mlflow.artifact_repository`` entry point in ``pyproject.toml``), so
  ``mlflow.artifacts.download_artifacts(run_id=..., artifact_path=..., tracking_uri="sqlite:///runs/mlflow.db")``
  and ``MlflowClient("sqlite:///runs/mlflow.db").list_artifacts(run_id)`` work without a server.

**Status**, as `sweeps.launch.trial_record` decides it from Ray's results: ``TERMINATED`` when the final
report arrived (`FINAL_MARKER` at step 0) and the run is not ``FAILED``;
``ERROR`` for a ``FAILED`` run; ``STOPPED`` for a ``FINISHED`` run without a final report (stopped early by
the ASHA scheduler: the callback ends it when Ray does); ``INCOMPLETE`` for anything else (``RUNNING`` when the
driver stopped, ``KILLED``).
"""

from __future__ import annotations

import ast
import math
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.tables import EvaluationTables, TableError, TrialRecord, build_tables
from trainables import names
from trainables.names import (
    BOOTSTRAP_FILE,
    BUDGET_PARAM,
    ERROR,
    EVALUATION_ARTIFACT_DIR,
    FINAL_MARKER,
    FINAL_STEP,
    GROUPS_FILE,
    INCOMPLETE,
    METRICS_FILE,
    MLFLOW_ARTIFACTS_DIR,
    PARENT_TAG,
    PREDICTIONS_FILE,
    PRIVATE_TAG,
    RAY_TRIAL_ID_TAG,
    ROLE_TAG,
    STOPPED,
    STORED_INFINITY,
    SWEEP_TAG,
    TERMINATED,
    TRIAL_KEY_TAG,
)

if TYPE_CHECKING:  # for annotations only: the functions below import MLflow where they use it
    from mlflow.entities import Run
    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.tracking import MlflowClient

INTEGER_METRICS: tuple[str, ...] = (names.EPOCH, names.STEPS, names.BEST_EPOCH)
"""Metrics the trials report as ``int`` (MLflow returns every metric as a float)."""
_PAGE = 1000


@dataclass(frozen=True)
class MlflowSweep:
    """A sweep as the tracking store holds it.

    Attributes:
        records: one `analysis.tables.build_tables` record per child run, in Ray's trial order (by the
            ``ray.trial_id`` tag, which ends in the trial's index in the grid), then by start time.
        run_ids: trial key -> child run id.
        parent_run_id: the sweep's parent run.
    """

    records: list[TrialRecord]
    run_ids: dict[str, str]
    parent_run_id: str


def read_sweep(tracking_uri: str, experiment: str, sweep: str) -> MlflowSweep:
    """Read a sweep's parent run, its child runs and their metric histories (see the module docstring).

    Args:
        tracking_uri: the sweep's tracking URI (``sqlite:///.../mlflow.db`` or a server URL).
        experiment: the MLflow experiment name (the spec's ``tracking.experiment``, default the sweep name).
        sweep: the sweep's name (``dpsweep.sweep`` tag).

    Raises:
        TableError: the experiment or the parent run does not exist, or two child runs carry one trial key.
    """
    from mlflow.tracking import MlflowClient

    _check_store_exists(tracking_uri)
    client = MlflowClient(tracking_uri)
    meta = client.get_experiment_by_name(experiment)
    if meta is None:
        raise TableError(
            f"no MLflow experiment {experiment!r} at {tracking_uri}; run the sweep first, or give the "
            "tracking URI the sweep used (the spec's tracking.uri, or $MLFLOW_TRACKING_URI)"
        )
    parents = _search(client, meta.experiment_id, f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'sweep'")
    if not parents:
        raise TableError(
            f"MLflow experiment {experiment!r} at {tracking_uri} has no parent run of sweep {sweep!r} "
            f"(tags {SWEEP_TAG}={sweep}, {ROLE_TAG}=sweep)"
        )
    parent = parents[0].info.run_id
    children = [
        r
        for r in _search(client, meta.experiment_id, f"tags.`{PARENT_TAG}` = '{parent}'")
        if TRIAL_KEY_TAG in r.data.tags
    ]
    by_key: dict[str, list[str]] = {}
    for run in children:
        by_key.setdefault(run.data.tags[TRIAL_KEY_TAG], []).append(run.info.run_id)
    repeated = {key: ids for key, ids in by_key.items() if len(ids) > 1}
    if repeated:
        raise TableError(
            f"sweep {sweep!r}: several MLflow child runs carry one trial key ({repeated}); delete the "
            "stray runs (the callback reuses a trial's run, so this is not a normal state)"
        )
    if not children:
        raise TableError(f"sweep {sweep!r}: its MLflow parent run {parent} has no trial runs yet; nothing to tabulate")
    children.sort(key=lambda r: (r.data.tags.get(RAY_TRIAL_ID_TAG, ""), r.info.start_time or 0))
    records = [_record(client, tracking_uri, run) for run in children]
    return MlflowSweep(records, {r.key: r.run_id for r in records if r.run_id}, parent)


def tables_from_mlflow(tracking_uri: str, experiment: str, sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``trials.parquet`` and ``epochs.parquet`` of a sweep, built from its MLflow runs alone."""
    found = read_sweep(tracking_uri, experiment, sweep)
    return build_tables(found.records, found.run_ids)


def evaluation_tables_from_mlflow(tracking_uri: str, run_ids: dict[str, str]) -> EvaluationTables:
    """The per-trial evaluation tables (as `analysis.tables.collect_trial_tables` gathers them from Ray's final
    checkpoints) from the ``evaluation/`` artifacts of the given child runs; runs without them (unfinished,
    failed) contribute no rows.

    Args:
        tracking_uri: the sweep's tracking URI.
        run_ids: trial key -> child run id, e.g. `MlflowSweep.run_ids` of the finished trials.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parts: dict[str, list[pd.DataFrame]] = {GROUPS_FILE: [], BOOTSTRAP_FILE: [], PREDICTIONS_FILE: []}
    with tempfile.TemporaryDirectory() as folder:
        for key, run_id in run_ids.items():
            repository = run_artifact_repository(client, tracking_uri, run_id)
            present = {a.path for a in repository.list_artifacts(EVALUATION_ARTIFACT_DIR)}
            for file, frames in parts.items():
                path = f"{EVALUATION_ARTIFACT_DIR}/{file}"
                if path in present:
                    local = download(repository, path, Path(folder) / run_id)
                    table = pd.read_parquet(local)
                    table.insert(0, "trial", key)
                    frames.append(table)
    groups, bootstrap = (
        pd.concat(parts[f], ignore_index=True) if parts[f] else pd.DataFrame(columns=["trial"])
        for f in (GROUPS_FILE, BOOTSTRAP_FILE)
    )
    predictions = pd.concat(parts[PREDICTIONS_FILE], ignore_index=True) if parts[PREDICTIONS_FILE] else None
    return EvaluationTables(
        groups=groups, bootstrap=bootstrap, source=f"MLflow artifacts at {tracking_uri}", predictions=predictions
    )


# ---------------------------------------------------------------------------------------------------------
# Where artifacts live: relative to the store, so that a store can be moved.

ARTIFACTS_SCHEME = "mlflow-artifacts"


def experiment_artifact_location(tracking_uri: str, experiment: str, file_root: Path) -> str:
    """The artifact location a new experiment is created with.

    A sqlite store or a tracking server: ``mlflow-artifacts:/<experiment>``, MLflow's proxied-artifact URI,
    relative to whatever serves it. A tracking server (``mlflow server``, which serves artifacts by default) maps
    it into its ``--artifacts-destination``; for a sqlite store dpsweep maps it to `local_artifact_root` (the
    ``mlartifacts/`` folder beside the database), and so does the UI that `dpsweep ui` starts (its
    ``--artifacts-destination``). Moving the folder that holds ``mlflow.db`` and ``mlartifacts/`` keeps every
    artifact reachable. Any other store (``postgresql://``, ...) has no folder of its own: artifacts go to the
    absolute ``file_root/<experiment>`` as before (not movable). Characters other than letters, digits and ``._-``
    become ``_`` in the folder name.

    Args:
        tracking_uri: the sweep's tracking URI.
        experiment: the experiment's name.
        file_root: the fallback folder (``runs/mlartifacts``).
    """
    if local_artifact_root(tracking_uri) is not None or _is_server(tracking_uri):
        # A plain folder name: MLflow's local repository unquotes %-escapes and the server's proxy does not, so a
        # quoted name would land in two folders. Run ids (UUIDs) keep two experiments sharing a slug apart.
        return f"{ARTIFACTS_SCHEME}:/{re.sub(r'[^A-Za-z0-9._-]', '_', experiment)}"
    return (Path(file_root) / experiment).resolve().as_uri()


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where ``mlflow-artifacts:/`` URIs of a sqlite store resolve: ``<folder of the .db>/mlartifacts``
    (None for any other store). A relative ``sqlite:///`` path is relative to the working directory."""
    path = sqlite_path(tracking_uri)
    return None if path is None else path.parent / MLFLOW_ARTIFACTS_DIR


def artifact_repository(tracking_uri: str, artifact_uri: str) -> ArtifactRepository:
    """An MLflow ``ArtifactRepository`` for ``artifact_uri`` as seen from ``tracking_uri``: for a sqlite store a
    ``mlflow-artifacts:/<path>`` URI is the local folder ``local_artifact_root(tracking_uri)/<path>`` (MLflow's
    client only resolves that scheme through a tracking server); anything else is MLflow's own repository
    (a server's proxy, ``file://``, ``s3://``, ...).

    Raises:
        TableError: a ``mlflow-artifacts:`` URI on a store that is neither sqlite nor a server.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if urllib.parse.urlparse(artifact_uri).scheme != ARTIFACTS_SCHEME or _is_server(tracking_uri):
        return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    local = _local_repository(artifact_uri, tracking_uri)
    if local is None:
        raise TableError(
            f"artifact location {artifact_uri} needs a tracking server or a sqlite store, but the tracking URI is "
            f"{tracking_uri}; use the server's http:// URI"
        )
    return local


def mlflow_artifacts_repository(
    artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
) -> ArtifactRepository:
    """MLflow's artifact repository for a ``mlflow-artifacts:`` URI, as dpsweep registers it with MLflow (the
    ``mlflow.artifact_repository`` entry point named ``mlflow-artifacts`` in ``pyproject.toml``; MLflow registers
    plugins after its own schemes, so this one is used in every process of an environment where dpsweep is installed).

    With a sqlite tracking URI (given, else MLflow's current one) the URI is the folder beside the database, as in
    `artifact_repository`: MLflow's own client, which refuses such a URI without a server, then reads and writes a
    sqlite store's artifacts wherever the store was moved. With any other tracking URI it is MLflow's own
    ``MlflowArtifactsRepository`` (a tracking server's proxy), unchanged.
    """
    import mlflow
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    local = _local_repository(artifact_uri, tracking_uri or mlflow.get_tracking_uri())
    if local is not None:
        return local
    return MlflowArtifactsRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)


def _local_repository(artifact_uri: str, tracking_uri: str) -> LocalArtifactRepository | None:
    """The local folder of a ``mlflow-artifacts:/<path>`` URI beside a sqlite store; None for any other store."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    root = local_artifact_root(tracking_uri)
    if root is None:
        return None
    return LocalArtifactRepository(str(root / urllib.parse.urlparse(artifact_uri).path.lstrip("/")))


def run_artifact_repository(client: MlflowClient, tracking_uri: str, run_id: str) -> ArtifactRepository:
    """`artifact_repository` of one run's artifact root (``<experiment location>/<run id>/artifacts``)."""
    return artifact_repository(tracking_uri, client.get_run(run_id).info.artifact_uri)


def download(repository: ArtifactRepository, path: str, folder: Path) -> str:
    """Download one artifact into ``folder`` (created), without MLflow's progress bar; returns the local path."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        # MLflow leaves download_artifacts unannotated (it returns the local path)
        local: str = repository.download_artifacts(path, str(folder))  # type: ignore[no-untyped-call]
        return local
    finally:
        if previous is None:
            del os.environ[_PROGRESS_BAR]
        else:
            os.environ[_PROGRESS_BAR] = previous


_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _is_server(tracking_uri: str) -> bool:
    return urllib.parse.urlparse(tracking_uri).scheme in ("http", "https")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (a relative path is relative to the working directory);
    None for any other URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return path if path.is_absolute() else Path.cwd() / path


def parse_param(text: str) -> Any:
    """An MLflow param back as the Python value whose ``str()`` it is (``"inf"`` -> inf, ``"None"`` -> None,
    ``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"True"`` -> True); anything else stays the string."""
    if text in ("inf", "-inf", "nan"):
        return float(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, int | float | bool | type(None)) else text


def _record(client: MlflowClient, tracking_uri: str, run: Run) -> TrialRecord:
    run_id, tags, status = run.info.run_id, run.data.tags, run.info.status
    by_step = _values_by_step(client, run)
    marked = FINAL_MARKER in by_step.pop(FINAL_STEP, {})  # without it the driver died while logging: not arrived
    final = read_final_metrics(client, tracking_uri, run_id) if marked else {}
    epochs = [{names.EPOCH: step, **values} for step, values in sorted(by_step.items())]
    if tags.get(PRIVATE_TAG) == "false":  # a non-private run logs no epsilon: it is infinite, as the trial reported
        for epoch in epochs:
            epoch.setdefault(names.EPSILON, math.inf)
    finished = bool(final) and status != "FAILED"
    return TrialRecord(
        key=tags[TRIAL_KEY_TAG],
        run_id=run_id,
        status=(
            TERMINATED if finished else ERROR if status == "FAILED" else STOPPED if status == "FINISHED" else INCOMPLETE
        ),
        error=f"failed; see MLflow run {run_id}" if status == "FAILED" else None,
        params={k: parse_param(v) for k, v in run.data.params.items() if k != BUDGET_PARAM},
        tags=dict(tags),
        final=final,
        epochs=epochs,
    )


def read_final_metrics(client: MlflowClient, tracking_uri: str, run_id: str) -> dict[str, float | int]:
    """A child run's whole final report from its ``evaluation/metrics.parquet`` artifact (`names.METRICS_FILE`):
    metric -> value, ``int`` where the trial reported an ``int``, infinities as ``inf``.

    Raises:
        TableError: the run carries the final marker but not the artifact (written by an earlier dpsweep, whose
            runs logged every metric: rebuild the tables with ``--source ray``).
    """
    path = f"{EVALUATION_ARTIFACT_DIR}/{METRICS_FILE}"
    repository = run_artifact_repository(client, tracking_uri, run_id)
    if path not in {a.path for a in repository.list_artifacts(EVALUATION_ARTIFACT_DIR)}:
        raise TableError(
            f"MLflow run {run_id} has its final metrics marker ({FINAL_MARKER}) but no {path} artifact at "
            f"{client.get_run(run_id).info.artifact_uri}: it was written by an earlier dpsweep, or its artifacts "
            "were not moved with the store; use `dpsweep table --source ray`, or move the artifacts folder too"
        )
    with tempfile.TemporaryDirectory() as folder:
        table = pd.read_parquet(download(repository, path, Path(folder)))
    return {
        str(metric): int(value) if integer else float(value)
        for metric, value, integer in zip(table["metric"], table["value"], table["integer"], strict=True)
    }


def _values_by_step(client: MlflowClient, run: Run) -> dict[int, dict[str, Any]]:
    """step -> {metric: value}. A metric whose latest entry sits at the final step was logged only there
    (epochs use steps >= 1), so that entry is all there is; only the per-epoch metrics need their history
    (a handful of calls per run instead of one per final metric)."""
    run_id = run.info.run_id
    latest = getattr(run.data, "_metric_objs", None)  # MLflow's latest entry per key, with its step
    if latest is None:
        latest_steps = dict.fromkeys(run.data.metrics, FINAL_STEP + 1)  # unknown: read every history
        values = {}
    else:
        latest_steps = {m.key: int(m.step) for m in latest}
        values = {m.key: m.value for m in latest}
    steps: dict[int, dict[str, Any]] = {}
    for key, step in latest_steps.items():
        if step == FINAL_STEP:
            steps.setdefault(FINAL_STEP, {})[key] = _value(key, values[key])
            continue
        entries = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        for entry in entries:  # the later of two entries at one step wins
            steps.setdefault(int(entry.step), {})[key] = _value(key, entry.value)
    return steps


def _value(key: str, value: float) -> float | int:
    value = float(value)
    if abs(value) >= STORED_INFINITY:
        return math.copysign(math.inf, value)
    if key in INTEGER_METRICS and value.is_integer():
        return int(value)
    return value


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every run matching the filter, newest first (MLflow pages its answers)."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=_PAGE, order_by=["attributes.start_time DESC"], page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _check_store_exists(tracking_uri: str) -> None:
    """Reading a ``sqlite:///`` URI whose file is missing would create an empty store: refuse instead."""
    path = sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise TableError(
            f"no MLflow database at {path} (tracking URI {tracking_uri}); run the sweep first, or "
            "give the tracking URI it used (the spec's tracking.uri, or $MLFLOW_TRACKING_URI)"
        )
