"""A sweep's results read back: trial records from Ray's experiment folder or the MLflow tracking store, the
sweep's tables built from them, written to ``runs/<sweep>/`` by one writer (`SweepResults.write`) at the end of
`dpsweep sweep` and by `dpsweep table`.

    Ray experiment folder --experiment_records--> [TrialRecord] --+
    MLflow tracking store --mlflow_source.read_sweep--------------+--> analysis.tables.build_tables --> SweepResults
    --write--> runs/<sweep>/trials.parquet, epochs.parquet, groups, bootstrap and predictions.parquet

The privacy cost of the search is `sweeps.tuning_cost`; the console summary `sweeps.summary`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from analysis.tables import (
    EvaluationTables,
    RayTrialFolder,
    TableError,
    TrialRecord,
    build_tables,
    collect_trial_tables,
    evaluation_of_trials,
    ray_experiment_parts,
    ray_state_saved,
    write_sweep_tables,
)
from sweeps.plan import SweepPaths
from sweeps.spec import SweepSpec
from trainables import names as N
from trainables.point import POINT, TrialPoint

TableSource = Literal["auto", "ray", "mlflow"]
TABLE_SOURCES: tuple[str, ...] = ("auto", "ray", "mlflow")


@dataclass(frozen=True)
class SweepResults:
    """A sweep's tables as read from one source, before they are written to ``runs/<sweep>/`` (analysis reads them
    back from there as `analysis.tables.SweepTables`).

    Attributes:
        trials: the trial table (``trials.parquet``, schema in `analysis.tables`).
        epochs: the epoch table (``epochs.parquet``).
        evaluation: the finished trials' evaluation tables (empty, or None, where no trial finished).
        origin: where they were read from, in words.
    """

    trials: pd.DataFrame
    epochs: pd.DataFrame
    evaluation: EvaluationTables | None
    origin: str

    def write(self, sweep_dir: Path, ledger: tuple[Path, Sequence[str]] | None = None) -> list[Path]:
        """Write the tables into ``sweep_dir`` (`analysis.tables.write_sweep_tables`) and, given ``ledger`` (the data
        root and the training sets), their privacy ledgers' totals (`sweeps.ledger.write_ledger_summary`,
        ``ledger.json``): the end of a sweep and `dpsweep table` both write through here, so they write the same
        files. Returns the files written."""
        written = write_sweep_tables(sweep_dir, self.trials, self.epochs, self.evaluation)
        if ledger is not None:
            from sweeps.ledger import write_ledger_summary

            data_root, datasets = ledger
            written.append(write_ledger_summary(sweep_dir / N.LEDGER_SUMMARY_FILE, data_root, datasets))
        return written


def ray_results(experiment: Path, mlflow_runs: dict[str, str], released: set[str] | None = None) -> SweepResults:
    """The tables of every trial in a Ray experiment folder (INCOMPLETE ones included), with the finished trials'
    evaluation tables from their final checkpoints.

    Args:
        experiment: the Ray experiment folder (``runs/ray/<sweep>``).
        mlflow_runs: trial key -> MLflow child run id, for the ``mlflow_run_id`` column.
        released: a private selection's winners (`sweeps.selection`): only these trials' rows; the other candidates
            stay in the Ray folder (private storage). None: every trial.
    """
    records = experiment_records(experiment)
    evaluation = collect_trial_tables(experiment)
    if released is not None:
        records = [record for record in records if record.key in released]
        evaluation = evaluation_of_trials(evaluation, released)
    trials, epochs = build_tables(records, mlflow_runs)
    return SweepResults(trials, epochs, evaluation, f"Ray results at {experiment}")


def mlflow_results(tracking_uri: str, experiment: str, sweep: str) -> SweepResults:
    """The tables of a sweep's MLflow runs alone (trials that never started are absent), with the finished
    trials' evaluation tables downloaded from their ``evaluation/`` artifacts."""
    from analysis.mlflow_source import evaluation_tables_from_mlflow, read_sweep

    found = read_sweep(tracking_uri, experiment, sweep)
    trials, epochs = build_tables(found.records, found.run_ids)
    done = trials[trials["status"] == N.TERMINATED]
    finished = dict(zip(done["trial"], done["mlflow_run_id"], strict=True))
    evaluation = evaluation_tables_from_mlflow(tracking_uri, finished) if finished else None
    return SweepResults(trials, epochs, evaluation, f"MLflow runs at {tracking_uri} (experiment {experiment!r})")


def rebuild_tables(spec: SweepSpec, paths: SweepPaths, source: TableSource = "auto") -> SweepResults:
    """The tables of a sweep in any state (`dpsweep table`), written to ``runs/<sweep>/`` (`SweepResults.write`).

    ``source``: ``ray`` (`ray_results`: every trial, INCOMPLETE ones included), ``mlflow`` (`mlflow_results`: the
    tracking store alone, trials that never started are absent), or ``auto`` (ray if its folder exists, else
    mlflow).
    """
    experiment = paths.ray_experiment(spec)
    if source == "auto":
        source = "ray" if experiment.is_dir() else "mlflow"
    if source == "ray":
        if not experiment.exists():
            raise TableError(
                f"no Ray results for sweep {spec.name!r} at {experiment}; run "
                f"`dpsweep sweep {spec.source}`, or use --source mlflow"
            )
        released = None
        if spec.search == "private_selection":
            from sweeps.selection import read_winners

            released = read_winners(paths.sweep_dir(spec)) or set()  # no winners known yet: nothing released
        elif spec.proxy is not None and spec.proxy.top_k > 1:  # phase 1 and each cell's winner (sweeps.proxy)
            from sweeps.proxy import PROXY_SUFFIX
            from sweeps.selection import read_winners

            proxies = {r.key for r in experiment_records(experiment) if r.key.endswith(PROXY_SUFFIX[0])}
            released = proxies | (read_winners(paths.sweep_dir(spec)) or set())
        results = ray_results(experiment, _mlflow_run_ids(spec, paths), released)
    else:
        results = mlflow_results(paths.tracking_uri, spec.tracking.experiment or spec.name, spec.name)
    results.write(paths.sweep_dir(spec), ledger=(paths.data_root, spec.data.train))
    return results


def trial_record(
    point: TrialPoint, final: dict[str, Any], history: pd.DataFrame | None, status: str, error: str | None
) -> TrialRecord:
    """One trial as a plain record for `analysis.tables.build_tables` (analysis never imports Ray).

    ``status``: TERMINATED (final report received), STOPPED (stopped early by ASHA: no final evaluation), ERROR
    (failed after its retries) or INCOMPLETE (pending or running when the driver stopped; a resumed sweep
    continues it).
    """
    from trainables.trial import is_final_report

    finished = is_final_report(final)
    epoch_rows = []
    if history is not None and len(history):
        # Epoch rows: those without the final report's marker (Ray sets `done` on a stopped trial's last epoch).
        if N.BEST_EPOCH in history:
            history = history[history[N.BEST_EPOCH].isna()]
        epoch_rows = history.to_dict("records")
    return TrialRecord(
        key=point.key,
        status=N.TERMINATED if finished and status != N.ERROR else status,
        error=error,
        params=point.params,
        tags=point.tags,
        final=final if finished else {},
        epochs=epoch_rows,
    )


def experiment_records(experiment: Path) -> list[TrialRecord]:
    """Records of every trial in a sweep's Ray experiment folder and its extensions' (`ray_experiment_parts`; an
    extension Ray has not started yet has none), finished or not."""
    return [
        record
        for i, part in enumerate(ray_experiment_parts(experiment))
        if i == 0 or ray_state_saved(part)
        for record in _part_records(part)
    ]


def _part_records(experiment: Path) -> list[TrialRecord]:
    from ray.tune import ExperimentAnalysis

    from trainables.trial import is_final_report

    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        # Ray marks a trial TERMINATED when it returned or when the scheduler stopped it; only the first sent
        # the final report (trial_record turns that into TERMINATED).
        status = {"ERROR": N.ERROR, "TERMINATED": N.STOPPED}.get(trial.status, N.INCOMPLETE)
        error = f"failed; see {getattr(trial, 'path', trial.trial_id)}" if trial.status == "ERROR" else None
        history = frames.get(trial.trial_id)
        final = trial.last_result or {}
        if not is_final_report(final) and status != N.ERROR and trial.path is not None:
            # The driver's snapshot of results can lag the trial's own checkpoint (a driver killed right after a
            # trial finished): the final checkpoint then holds the final report and the whole epoch history.
            folder = RayTrialFolder(Path(trial.path))
            saved = folder.final_report()
            if saved is not None:
                final, history = saved, folder.final_table(N.EPOCHS_FILE)
        records.append(trial_record(TrialPoint.from_ray(trial.config[POINT]), final, history, status, error))
    return records


def _mlflow_run_ids(spec: SweepSpec, paths: SweepPaths) -> dict[str, str]:
    """Trial key -> MLflow child run id, for the tables' ``mlflow_run_id`` column (empty, with a warning, when the
    tracking store cannot be read: the tables are still useful)."""
    import mlflow.tracking

    try:
        client = mlflow.tracking.MlflowClient(paths.tracking_uri)
        experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
        if experiment is None:
            return {}
        parents = client.search_runs(
            [experiment.experiment_id], f"tags.`{N.SWEEP_TAG}` = '{spec.name}' and tags.`{N.ROLE_TAG}` = 'sweep'"
        )
        return run_ids(client, experiment.experiment_id, parents[0].info.run_id) if parents else {}
    except Exception as error:  # tables are still useful without run ids; say so
        print(f"warning: MLflow run ids not added ({error})")
        return {}


def run_ids(client: Any, experiment_id: str, parent: str) -> dict[str, str]:
    """Trial key -> MLflow child run id of the sweep's parent run ``parent``."""
    runs = client.search_runs([experiment_id], f"tags.`{N.PARENT_TAG}` = '{parent}'", max_results=10000)
    return {r.data.tags[N.TRIAL_KEY_TAG]: r.info.run_id for r in runs if N.TRIAL_KEY_TAG in r.data.tags}
