"""A sweep's results: trial records from Ray or MLflow, the trial and epoch tables, the privacy cost of the search,
and the summary printed at the end of `dpsweep sweep` and `dpsweep table`.

    Ray experiment folder --experiment_records--> [TrialRecord] --+
    MLflow tracking store --mlflow_source.read_sweep--------------+--> analysis.tables.build_tables
                                                                       --> runs/<sweep>/trials.parquet, epochs.parquet
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from analysis.tables import (
    GUARANTEE_TEXT,
    TableError,
    TrialRecord,
    build_tables,
    without_guarantee,
    write_sweep_tables,
)
from sweeps.plan import SweepPaths
from sweeps.spec import SweepSpec
from trainables import names as N

TableSource = Literal["auto", "ray", "mlflow"]
TABLE_SOURCES: tuple[str, ...] = ("auto", "ray", "mlflow")


def trial_record(point: dict[str, Any], final: dict[str, Any], history: pd.DataFrame | None, status: str,
                 error: str | None) -> TrialRecord:
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
    return TrialRecord(key=point["key"], status=N.TERMINATED if finished and status != N.ERROR else status,
                       error=error, params=point["params"], tags=point["tags"], final=final if finished else {},
                       epochs=epoch_rows)


def experiment_records(experiment: Path) -> list[TrialRecord]:
    """Records of every trial in a Ray experiment folder, finished or not."""
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
        if not is_final_report(final) and status != N.ERROR:
            # The driver's snapshot of results can lag the trial's own checkpoint (a driver killed right after a
            # trial finished): the final checkpoint then holds the final report and the whole epoch history.
            saved = _final_checkpoint(Path(trial.path))
            if saved is not None:
                final, history = saved
        records.append(trial_record(trial.config["point"], final, history, status, error))
    return records


def _final_checkpoint(trial_dir: Path) -> tuple[dict[str, Any], pd.DataFrame | None] | None:
    """The final report (``final.json``) and epoch history of a trial's final checkpoint, if it wrote one."""
    found = sorted(trial_dir.glob(f"checkpoint_*/{N.FINAL_FILE}"))
    if not found:
        return None
    epochs_file = found[-1].parent / N.EPOCHS_FILE
    history = pd.read_parquet(epochs_file) if epochs_file.exists() else None
    return json.loads(found[-1].read_text()), history


def rebuild_tables(spec: SweepSpec, paths: SweepPaths, source: TableSource = "auto"
                   ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Trial and epoch tables of a sweep in any state (`dpsweep table`), written to ``runs/<sweep>/``.

    ``source``: ``ray`` (the Ray experiment folder: every trial, INCOMPLETE ones included), ``mlflow`` (the tracking
    store alone: trials that never started are absent; the finished trials' evaluation tables are downloaded too),
    or ``auto`` (ray if its folder exists, else mlflow). Returns (trials, epochs, where they came from).
    """
    experiment = paths.ray_experiment(spec)
    if source == "auto":
        source = "ray" if experiment.is_dir() else "mlflow"
    if source == "ray":
        if not experiment.exists():
            raise TableError(f"no Ray results for sweep {spec.name!r} at {experiment}; run "
                             f"`dpsweep sweep {spec.source}`, or use --source mlflow")
        trials, epochs = build_tables(experiment_records(experiment), _mlflow_run_ids(spec, paths))
        write_sweep_tables(paths.sweep_dir(spec), trials, epochs)
        return trials, epochs, f"Ray results at {experiment}"
    from analysis.mlflow_source import evaluation_tables_from_mlflow, read_sweep

    experiment_name = spec.tracking.experiment or spec.name
    found = read_sweep(paths.tracking_uri, experiment_name, spec.name)
    trials, epochs = build_tables(found.records, found.run_ids)
    done = trials[trials["status"] == N.TERMINATED]
    finished = dict(zip(done["trial"], done["mlflow_run_id"], strict=True))
    evaluation = evaluation_tables_from_mlflow(paths.tracking_uri, finished) if finished else None
    if evaluation is not None and (evaluation.groups.empty or evaluation.bootstrap.empty):
        evaluation = None  # no finished run logged its evaluation artifacts
    write_sweep_tables(paths.sweep_dir(spec), trials, epochs, evaluation)
    return trials, epochs, f"MLflow runs at {paths.tracking_uri} (experiment {experiment_name!r})"


def _mlflow_run_ids(spec: SweepSpec, paths: SweepPaths) -> dict[str, str]:
    """Trial key -> MLflow child run id, for the tables' ``mlflow_run_id`` column (empty, with a warning, when the
    tracking store cannot be read: the tables are still useful)."""
    import mlflow.tracking

    try:
        client = mlflow.tracking.MlflowClient(paths.tracking_uri)
        experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
        if experiment is None:
            return {}
        parents = client.search_runs([experiment.experiment_id],
                                     f"tags.`{N.SWEEP_TAG}` = '{spec.name}' and tags.`{N.ROLE_TAG}` = 'sweep'")
        return run_ids(client, experiment.experiment_id, parents[0].info.run_id) if parents else {}
    except Exception as error:  # noqa: BLE001 - tables are still useful without run ids; say so
        print(f"warning: MLflow run ids not added ({error})")
        return {}


def run_ids(client: Any, experiment_id: str, parent: str) -> dict[str, str]:
    runs = client.search_runs([experiment_id], f"tags.`{N.PARENT_TAG}` = '{parent}'", max_results=10000)
    return {r.data.tags[N.TRIAL_KEY_TAG]: r.info.run_id for r in runs if N.TRIAL_KEY_TAG in r.data.tags}


def tuning_costs(trials: pd.DataFrame) -> dict[str, Any]:
    """Per private training set: epsilon of releasing the best trial after the whole sweep (`tuning_cost`)."""
    if "dataset" not in trials or trials.empty:
        return {}
    costs = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        cost = tuning_cost(group)
        if cost is not None:
            costs[str(dataset)] = cost
    return costs


def tuning_cost(trials: pd.DataFrame) -> Any:
    """Epsilon of releasing the best trial after the whole grid (RDP composition of every private trial run
    on the same data: the grid's trial count is fixed, so Papernot-Steinke random-count bounds do not apply).

    Every trial that released anything is composed at the steps behind its releases (`names.RELEASED_STEPS`):
    finished ones at their final steps, early-stopped, failed and unfinished ones at their last reported epoch's
    (an unfinished trial's released epochs are published in MLflow and the tables too). None when no private
    trial released anything. For ``search: optuna`` see `sweeps.search` and docs/sweep-spec.md: Optuna picks each
    trial's parameters from earlier results, which this fixed-schedule composition does not cover; the summary then
    also states the bounds that do."""
    from trainables.privacy.tuning import TrialMechanism, tuning_epsilon

    released = _released_steps(trials)
    ran = trials[released > 0]
    private = ran[ran["noise_multiplier"] > 0]
    if private.empty:
        return None
    q = float(private["sample_rate"].iloc[0])  # non-private rows carry q = 0; their sigma 0 is what matters
    mechanisms = [TrialMechanism(float(r.noise_multiplier), float(r.sample_rate) or q, int(steps))
                  for r, steps in zip(ran.itertuples(), released[released > 0], strict=True)]
    return tuning_epsilon(mechanisms, float(private["delta"].iloc[0]), "fixed",
                          private_trials_only=len(private) < len(ran))


def _released_steps(trials: pd.DataFrame) -> pd.Series:
    """Per trial, the steps behind what it released (`analysis.tables.build_tables` writes the column)."""
    if N.RELEASED_STEPS not in trials:
        raise TableError(f"the trial table has no {N.RELEASED_STEPS!r} column (written by an earlier dpsweep); "
                         "rebuild it with `dpsweep table <sweep file>`")
    return trials[N.RELEASED_STEPS].fillna(0).astype(int)


def adaptive_tuning_bounds(trials: pd.DataFrame) -> dict[str, str]:
    """Per dataset of a ``search: optuna`` sweep: the basic-composition bound (Dwork, Kenthapadi, McSherry,
    Mironov, Naor 2006; holds for adaptively chosen mechanisms, Dwork and Roth 2014, Thm. 3.16) of the k
    private trials that ran, each (target epsilon, delta)-DP by construction: (k x max target, k x delta)."""
    if "search" not in trials or not (trials["search"] == "optuna").any():
        return {}
    ran = trials[(_released_steps(trials) > 0) & (trials["noise_multiplier"] > 0)]  # each at most its target
    bounds = {}
    for dataset, group in ran.groupby("dataset", sort=False):
        k, eps, delta = len(group), float(group["target_epsilon"].max()), float(group["delta"].iloc[0])
        bounds[str(dataset)] = (f"epsilon <= {k * eps:.4g} at delta = {k * delta:.3g} (basic composition of {k} "
                                f"trials, each (epsilon <= {eps:g}, delta = {delta:g})-DP; private trials only)")
    return bounds


def tuning_summary(trials: pd.DataFrame, single_dataset: bool) -> dict[str, float]:
    """The parent run's tuning-cost metrics: ``privacy/tuning_epsilon`` (``/<dataset>`` with several datasets)."""
    return {N.TUNING_EPSILON if single_dataset else f"{N.TUNING_EPSILON}/{dataset}": cost.epsilon
            for dataset, cost in tuning_costs(trials).items()}


SUMMARY_COLUMNS = {"trial": "trial", "status": "status", "target_epsilon": "eps target", N.EPSILON: "eps spent",
                   "noise_multiplier": "sigma", N.VAL_SELECTED_AUROC_MACRO: "val AUROC",
                   N.TEST_AUROC_MACRO: "test AUROC", N.auroc_gap("test", "age"): "age gap",
                   N.auroc_gap("test", "sex"): "sex gap"}


def summary_text(trials: pd.DataFrame, sweep_dir: Path, tracking_uri: str) -> str:
    """The results table, where the outputs are, the privacy cost of the search and any budget warning."""
    columns = dict(SUMMARY_COLUMNS)
    external = sorted(c for c in trials.columns if c.startswith("external/") and c.endswith("/auroc_macro"))
    columns.update({c: c.split("/")[1] for c in external})
    table = trials[[c for c in columns if c in trials.columns]].rename(columns=columns)
    if "target_epsilon" in trials:
        private = trials["target_epsilon"].map(math.isfinite)
        table.insert(2, "DP", private.map({True: "yes", False: "non-private"}).where(~without_guarantee(trials),
                                                                                     "none: seed published"))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        lines = [table.to_string(index=False)]
    lines += ["", textwrap.fill(GUARANTEE_TEXT, 116),
              f"Each trial's guarantee in full: the `{N.GUARANTEE}` column of trials.parquet and MLflow param.",
              "", f"tables: {sweep_dir / N.TRIALS_FILE}, {sweep_dir / N.EPOCHS_FILE}",
              f"MLflow: {tracking_uri}\n  open the UI with `make ui` (http://127.0.0.1:5000)"]
    costs = tuning_costs(trials)
    adaptive = adaptive_tuning_bounds(trials)
    for dataset, cost in costs.items():
        where = f" on {dataset}" if len(costs) > 1 else ""
        lines.append(f"privacy of releasing the best trial{where} after the whole sweep (not the per-trial epsilon): "
                     f"{cost.sentence}")
        if dataset in adaptive:
            lines.append(f"  Optuna chose trials adaptively; the bound that covers that: {adaptive[dataset]}")
    if N.EPSILON in trials:
        private = trials[trials["target_epsilon"].map(math.isfinite)]
        over = private[private[N.EPSILON] > private["target_epsilon"]]
        if len(over):
            lines.append(f"WARNING: {len(over)} trials spent more epsilon than their target")
    return "\n".join(lines)
