"""A sweep's results: trial records from Ray or MLflow, the trial and epoch tables, the privacy cost of the search,
and the summary printed at the end of `dpsweep sweep` and `dpsweep table`.

    Ray experiment folder --experiment_records--> [TrialRecord] --+
    MLflow tracking store --mlflow_source.read_sweep--------------+--> analysis.tables.build_tables
                                                                       --> runs/<sweep>/trials.parquet, epochs.parquet
"""

from __future__ import annotations

import functools
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
from sweeps.plan import SweepPaths, label_count_noise_multiplier, trial_key
from sweeps.spec import SweepSpec
from trainables import names as N

TableSource = Literal["auto", "ray", "mlflow"]
TABLE_SOURCES: tuple[str, ...] = ("auto", "ray", "mlflow")


def trial_record(
    point: dict[str, Any], final: dict[str, Any], history: pd.DataFrame | None, status: str, error: str | None
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
        key=point["key"],
        status=N.TERMINATED if finished and status != N.ERROR else status,
        error=error,
        params=point["params"],
        tags=point["tags"],
        final=final if finished else {},
        epochs=epoch_rows,
    )


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


def rebuild_tables(
    spec: SweepSpec, paths: SweepPaths, source: TableSource = "auto"
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
            raise TableError(
                f"no Ray results for sweep {spec.name!r} at {experiment}; run "
                f"`dpsweep sweep {spec.source}`, or use --source mlflow"
            )
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
        parents = client.search_runs(
            [experiment.experiment_id], f"tags.`{N.SWEEP_TAG}` = '{spec.name}' and tags.`{N.ROLE_TAG}` = 'sweep'"
        )
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
    mixed = "privacy_unit" in trials and trials["privacy_unit"].nunique() > 1
    for dataset, group in trials.groupby("dataset", sort=False):
        # Units are never composed with each other here (each cost is at its own unit, over its own trials);
        # `patient_level_sweep_epsilon` composes everything at the patient level.
        parts = group.groupby("privacy_unit", sort=False) if mixed else [(None, group)]
        for unit, part in parts:
            cost = tuning_cost(part)
            if cost is not None:
                costs[str(dataset) if unit is None else f"{dataset} ({unit}-level trials only)"] = cost
    return costs


def patient_level_sweep_epsilon(trials: pd.DataFrame) -> dict[str, float]:
    """Per training set of a sweep with patient-level trials, epsilon for one patient of releasing every private trial
    (`trainables.privacy.units.composed_patient_epsilon`): patient-level trials at k = 1, image-level ones at k =
    their training split's largest images per patient (``privacy/patient_images``). Empty when no trial is
    patient-level, or k is unknown (no image-level trial finished). Label-count releases are not included."""
    from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

    if "privacy_unit" not in trials or not (trials["privacy_unit"] == "patient").any():
        return {}
    results = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        released = _released_steps(group)
        ran = group[(released > 0) & (group["noise_multiplier"] > 0)]
        k_known = group[N.PATIENT_IMAGES].dropna() if N.PATIENT_IMAGES in group else pd.Series(dtype=float)
        if ran.empty or ((ran["privacy_unit"] == "image").any() and k_known.empty):
            continue
        k_image = int(k_known.max()) if len(k_known) else 1
        mechanisms = [
            PatientMechanism(
                float(r.noise_multiplier),
                float(r.sample_rate),
                int(steps),
                1 if r.privacy_unit == "patient" else k_image,
            )
            for r, steps in zip(ran.itertuples(), released[ran.index], strict=True)
        ]
        results[str(dataset)] = composed_patient_epsilon(mechanisms, float(ran["delta"].iloc[0]))
    return results


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
    mechanisms = [
        TrialMechanism(float(r.noise_multiplier), float(r.sample_rate) or q, int(steps))
        for r, steps in zip(ran.itertuples(), released[released > 0], strict=True)
    ]
    return tuning_epsilon(
        mechanisms, float(private["delta"].iloc[0]), "fixed", private_trials_only=len(private) < len(ran)
    )


def _released_steps(trials: pd.DataFrame) -> pd.Series:
    """Per trial, the steps behind what it released (`analysis.tables.build_tables` writes the column)."""
    if N.RELEASED_STEPS not in trials:
        raise TableError(
            f"the trial table has no {N.RELEASED_STEPS!r} column (written by an earlier dpsweep); "
            "rebuild it with `dpsweep table <sweep file>`"
        )
    return trials[N.RELEASED_STEPS].fillna(0).astype(int)


def adaptive_tuning_bounds(spec: SweepSpec, trials: pd.DataFrame) -> dict[str, list[Any]]:
    """Per training set of a ``search: optuna`` sweep, bounds on the privacy of all its private trials together
    that hold although Optuna picked each trial's mechanism from earlier results (`trainables.privacy.tuning`):

    - the worst-case RDP composition: each cell's ``optuna.trials_per_target`` trials, each at most the
      order-wise supremum of the RDP curves of every proposal the cell could train (the search ranges cut by the
      accountant's feasibility check), composed (Mironov 2017, Prop. 1: adaptive composition with curves fixed
      in advance);
    - basic composition of the targets of the private trials that released anything (Dwork and Roth 2014,
      Thm. 3.16).

    The realized-curve composition of `tuning_cost` is not such a bound; the summary says so."""
    from trainables.privacy.tuning import AdmissibleSet, adaptive_tuning_bound, basic_composition_bound

    o = spec.optuna
    if o is None or "dataset" not in trials or trials.empty:
        return {}
    p, released = spec.privacy, _released_steps(trials)
    bounds: dict[str, list[Any]] = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        n_train = int(group["n_train"].iloc[0])
        targets = [
            float(c["target_epsilon"])
            for c in spec.cells()
            if c["dataset"] == dataset and math.isfinite(c["target_epsilon"])
        ]
        cells = [
            (
                AdmissibleSet(
                    n_train,
                    target,
                    p.delta,
                    noise_multiplier=_range(o.noise_multiplier),
                    expected_batch_size=_range(o.expected_batch_size, int),
                    epochs=_range(o.epochs, int),
                    accountant=p.accountant,
                    label_count_noise_multiplier=label_count_noise_multiplier(spec, True),
                ),
                o.trials_per_target,
            )
            for target in targets
        ]
        if not cells:
            continue
        ran = group[(released[group.index] > 0) & (group["noise_multiplier"] > 0)]
        found = [adaptive_tuning_bound(cells)]
        if len(ran):
            found.append(basic_composition_bound([float(t) for t in ran["target_epsilon"]], p.delta))
        bounds[str(dataset)] = found
    return bounds


def _range(bounds: tuple[Any, ...], kind: type = float) -> tuple[Any, Any]:
    """An ``optuna.*`` range as (low, high); a fixed ``[value]`` is (value, value)."""
    return kind(bounds[0]), kind(bounds[-1])


def tuning_summary(spec: SweepSpec, trials: pd.DataFrame) -> dict[str, float]:
    """The parent run's tuning-cost metrics (``/<dataset>`` suffixed with several datasets): grid sweeps'
    ``privacy/tuning_epsilon`` (RDP composition of the trials run); Optuna sweeps' bounds that hold under adaptive
    selection, ``privacy/tuning_epsilon`` (worst-case RDP composition) and ``privacy/tuning_epsilon_basic``."""

    def key(name: str, dataset: str) -> str:
        return name if len(spec.data.train) == 1 else f"{name}/{dataset}"

    if spec.optuna is not None:
        return {
            key(name, dataset): bound.epsilon
            for dataset, bounds in adaptive_tuning_bounds(spec, trials).items()
            for name, bound in zip((N.TUNING_EPSILON, N.TUNING_EPSILON_BASIC), bounds, strict=False)
        }
    return {key(N.TUNING_EPSILON, dataset): cost.epsilon for dataset, cost in tuning_costs(trials).items()}


SUMMARY_COLUMNS = {
    "trial": "trial",
    "status": "status",
    "target_epsilon": "target",
    N.EPSILON: "spent",
    "noise_multiplier": "sigma",
    N.VAL_SELECTED_AUROC_MACRO: "val",
    N.TEST_AUROC_MACRO: "test",
    N.auroc_gap("test", "age"): "age gap",
    N.auroc_gap("test", "sex"): "sex gap",
    N.EPSILON_PATIENT: "pat eps",
    N.PATIENT_IMAGES: "k",
}
"""The console table's columns (trials.parquet column -> header); epsilons at the trial's delta, AUROCs macro."""
SUMMARY_WIDTH = 100
"""Console lines stay within this many characters (the tables for trial keys up to 40 characters: the key column is
as wide as the longest key)."""
NON_PRIVATE = "non-DP"
NO_GUARANTEE_MARK = "*"


def results_table(trials: pd.DataFrame) -> str:
    """The console's results table: one row per trial (in the given order), epsilons and AUROCs to 3 decimals.

    ``status`` is shown only when some trial did not finish; a non-private trial's target reads ``non-DP`` and its
    spent epsilon ``-``; a private trial whose epsilon is no guarantee (``reproducible_noise``) has its target marked
    ``*``. External test sets go into a second table (macro AUROC per external dataset), so both stay narrow.
    """
    columns = dict(SUMMARY_COLUMNS)
    if "status" in trials and (trials["status"] == N.TERMINATED).all():
        del columns["status"]
    table = trials[[c for c in columns if c in trials.columns]].copy()
    if "target_epsilon" in table:
        finite = table["target_epsilon"].map(lambda e: isinstance(e, int | float) and math.isfinite(e))
        unguaranteed = without_guarantee(trials)
        table["target_epsilon"] = [
            NON_PRIVATE if not ok else f"{e:g}{NO_GUARANTEE_MARK if bad else ''}"
            for e, ok, bad in zip(trials["target_epsilon"], finite, unguaranteed, strict=True)
        ]
        for column in (N.EPSILON, N.EPSILON_PATIENT):
            if column in table:
                table[column] = [
                    f"{v:.3f}" if ok and v == v else "-" for v, ok in zip(table[column], finite, strict=True)
                ]
    if N.PATIENT_IMAGES in table:  # a count; non-private trials have none
        table[N.PATIENT_IMAGES] = [f"{v:.0f}" if v == v else "-" for v in table[N.PATIENT_IMAGES]]
    table = table.rename(columns=columns)
    with pd.option_context("display.width", 400, "display.max_columns", 40, "display.float_format", "{:.3f}".format):
        lines = [table.to_string(index=False)]
        external = sorted(c for c in trials.columns if c.startswith("external/") and c.endswith("/auroc_macro"))
        if external:
            sites = trials[["trial", *external]].rename(columns={c: c.split("/")[1] for c in external})
            lines += ["", "external test sets (macro AUROC of the selected model):", sites.to_string(index=False)]
    if "target_epsilon" in trials and without_guarantee(trials).any():
        lines.append(f"{NO_GUARANTEE_MARK} reproducible_noise: the noise replays from a published seed; no guarantee")
    return "\n".join(lines)


def summary_text(trials: pd.DataFrame, sweep_dir: Path, tracking_uri: str, spec: SweepSpec | None = None) -> str:
    """The results table, where the outputs are, the privacy cost of the search and any budget warning (with the
    sweep's ``spec``, an Optuna sweep's adaptive tuning bounds too). Lines other than the tables' rows wrap at
    `SUMMARY_WIDTH`."""
    if spec is not None and spec.optuna is None:  # grid order (the sweep file's), not Ray's completion order
        order = {trial_key(spec, point): i for i, point in enumerate(spec.grid())}
        trials = trials.sort_values("trial", key=lambda keys: keys.map(order).fillna(len(order)), kind="stable")
    lines = [
        results_table(trials),
        "",
        textwrap.fill(GUARANTEE_TEXT, SUMMARY_WIDTH),
        f"Each trial's guarantee in full: the `{N.GUARANTEE}` column of trials.parquet and MLflow param.",
        "",
        f"tables: {sweep_dir / N.TRIALS_FILE}, {sweep_dir / N.EPOCHS_FILE}",
        f"MLflow: {tracking_uri}\n  open the UI with `make ui` (http://127.0.0.1:5000)",
    ]
    wrap = functools.partial(
        textwrap.fill, width=SUMMARY_WIDTH, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )
    costs = tuning_costs(trials)
    adaptive = adaptive_tuning_bounds(spec, trials) if spec is not None else {}
    for dataset, cost in costs.items():
        where = f" on {dataset}" if len(costs) > 1 else ""
        if dataset in adaptive:
            lines.append(
                wrap(
                    f"privacy of the whole search{where}: Optuna chose each trial from earlier results, so only "
                    "bounds that hold under adaptive selection apply (private trials only):"
                )
            )
            lines.extend(
                wrap(f"  {bound.description}", subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
                for bound in adaptive[dataset]
            )
            lines.append(
                wrap(f"  (composing the trials that happened to run, {cost.epsilon:.3g}, is not such a bound)")
            )
            continue
        lines.append(
            wrap(
                f"privacy of releasing the best trial{where} after the whole sweep (not the per-trial epsilon): "
                f"{cost.sentence}"
            )
        )
    for dataset, epsilon in patient_level_sweep_epsilon(trials).items():
        lines.append(
            wrap(
                f"privacy for one patient{f' on {dataset}' if len(costs) > 1 else ''} of releasing every private "
                f"trial of the sweep, both units composed at the patient level (image-level trials as groups of "
                f"their largest patient's images; PLD, label counts not included): epsilon={epsilon:.3g}"
            )
        )
    if N.EPSILON in trials:
        private = trials[trials["target_epsilon"].map(math.isfinite)]
        over = private[private[N.EPSILON] > private["target_epsilon"]]
        if len(over):
            lines.append(f"WARNING: {len(over)} trials spent more epsilon than their target")
    return "\n".join(lines)
