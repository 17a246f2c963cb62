"""The trial and epoch tables: one schema, one row per trial (or per trial epoch), with provenance.

Both sources of a sweep's results give these tables through `build_tables`: Ray's results
(`sweeps.results`) and the MLflow tracking store (`analysis.mlflow_source`). Ray's experiment folder is read
through one reader, `RayTrialFolder`; a sweep's tables are written by one writer, `write_sweep_tables`.

``trials.parquet`` columns: ``trial`` (the grid point's key), ``status`` (TERMINATED: final report received;
STOPPED: stopped early by ASHA, epsilon and steps of its last epoch; ERROR: failed; INCOMPLETE: pending or
running when the sweep stopped),
``error``, ``mlflow_run_id``, the trial's parameters (``init``, ``target_epsilon``, ``noise_multiplier``,
``sample_rate``, ``steps``, ``delta``, ``accountant``, ``max_grad_norm``, ``lr``, ``seed``, ``model``,
``privacy_unit``, ...), provenance (``git_commit``, ``*_version``) and every final metric under its
metric-name constant (``test/auroc_macro``, ``privacy/epsilon``, ...; non-private epsilon is ``inf``).

``epochs.parquet``: ``trial``, ``init``, ``target_epsilon``, ``max_grad_norm``, ``lr``, ``seed`` and the
per-epoch metrics (``epoch``, ``privacy/epsilon``, ``val/auroc_macro``, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.errors import UserError
from trainables.names import (
    BOOTSTRAP_FILE,
    EPOCHS_FILE,
    EPSILON,
    FINAL_FILE,
    GROUPS_FILE,
    PREDICTIONS_FILE,
    RAY_PARAMS_FILE,
    RELEASED_STEPS,
    STEPS,
    STOPPED,
    TAG_PREFIX,
    TERMINATED,
    TRIALS_FILE,
)
from trainables.provenance import version_keys

EPOCH_ID_COLUMNS = (
    "trial",
    "model",
    "dataset",
    "init",
    "target_epsilon",
    "max_grad_norm",
    "lr",
    "seed",
    "reproducible_noise",
)
FINISHED = TERMINATED
"""``status`` of a trial that ran to the end and reported its final metrics."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial as both sources (Ray's results, the MLflow store) give it to `build_tables`.

    Attributes:
        key: the trial key (``<init>-eps<eps>-clip<C>-lr<lr>-seed<seed>``).
        status: TERMINATED, STOPPED, ERROR or INCOMPLETE (`trainables.names`).
        params: the trial's parameters (its MLflow params: `TrialConfig.to_flat` plus n_train, search, ...).
        tags: its MLflow tags (provenance, privacy unit, ...).
        final: final-report metrics (empty unless TERMINATED).
        epochs: one dict of metrics per reported epoch.
        error: what failed, for ERROR trials.
        run_id: its MLflow child run, when known.
    """

    key: str
    status: str
    params: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    run_id: str | None = None


def build_tables(
    records: list[TrialRecord], mlflow_runs: dict[str, str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and epoch tables from trial records.

    Args:
        records: one `TrialRecord` per trial.
        mlflow_runs: trial key -> MLflow run id.
    """
    mlflow_runs = mlflow_runs or {}
    trial_rows, epoch_rows = [], []
    for record in records:
        tags = {k.removeprefix(TAG_PREFIX): v for k, v in record.tags.items()}
        row = {
            "trial": record.key,
            "status": record.status,
            "error": record.error,
            "mlflow_run_id": mlflow_runs.get(record.key),
            **record.params,
            **{k: tags[k] for k in ("git_commit", *version_keys()) if k in tags},
        }
        row.update({k: v for k, v in record.final.items() if _is_metric(k)})
        last = max(record.epochs, key=lambda epoch: epoch.get("epoch", 0)) if record.epochs else {}
        if record.status == STOPPED and last:
            # Stopped early (no final report): the privacy it spent is its last epoch's.
            row.update({k: last[k] for k in (EPSILON, STEPS) if k in last})
        # What it released so far was computed from this many steps (a failed or unfinished trial included).
        row[RELEASED_STEPS] = int(record.final.get(STEPS, last.get(STEPS, 0)) or 0)
        trial_rows.append(row)
        ids = {c: row.get(c) for c in EPOCH_ID_COLUMNS}
        for epoch in record.epochs:
            epoch_rows.append({**ids, **{k: v for k, v in epoch.items() if _is_metric(k)}})
    trials = pd.DataFrame(trial_rows)
    epochs = pd.DataFrame(epoch_rows, columns=None if epoch_rows else list(EPOCH_ID_COLUMNS))
    if len(epochs) and "epoch" in epochs:
        epochs = epochs.sort_values(["trial", "epoch"]).drop_duplicates(["trial", "epoch"], keep="last")
        epochs["epoch"] = epochs["epoch"].astype("int64")
        # Ray's per-report frames carry every key ever reported; drop final-only metrics (all NaN per epoch).
        epochs = epochs.dropna(axis="columns", how="all")
    return trials.reset_index(drop=True), epochs.reset_index(drop=True)


GUARANTEE_TEXT = (
    "What the epsilon of a private trial means. Each private trial trains with DP-SGD: every training image is "
    "included in a step independently at random (Poisson sampling), its gradient is clipped to a fixed norm, and "
    "Gaussian noise is added to the sum, with noise and sampling drawn from secret randomness (seeded from the "
    "operating system, never from anything logged). The reported (epsilon, delta) bounds how much the released "
    "model updates, and everything computed from them, can reveal about whether any one training image was used "
    "(add/remove adjacency; the number of training images is treated as public), under the accountant named on "
    "the run. It does not cover a patient with several images as a whole (each image-level trial reports "
    "privacy/epsilon_patient, the guarantee for its largest training patient; trials with privacy_unit patient "
    "protect a patient with all its images), nor the "
    "validation and test images (used for selection and evaluation, not protected), nor choosing "
    "the best of many trials (see the sweep's tuning epsilon). Trial checkpoints hold the secret noise seeds and "
    "are private material. Trials marked reproducible_noise (debugging) or non-private have no guarantee."
)
"""The guarantee in plain words: the summary, the report and the README say the same."""


def without_guarantee(trials: pd.DataFrame) -> pd.Series:
    """Which rows are private trials whose epsilon is no guarantee: ``privacy.reproducible_noise`` trials replay
    their noise from a published seed (`trainables.privacy.guarantee`). Analysis never bins them as private."""
    if "reproducible_noise" not in trials or "target_epsilon" not in trials:
        return pd.Series(False, index=trials.index)
    finite = pd.to_numeric(trials["target_epsilon"], errors="coerce").map(lambda e: e == e and e != float("inf"))
    return trials["reproducible_noise"].fillna(False).astype(bool) & finite.astype(bool)


def _is_metric(key: str) -> bool:
    """Our metric names (``split/family/name`` and ``epoch``), not Ray's flattened ``config/...`` keys."""
    return ("/" in key and not key.startswith("config/")) or key == "epoch"


# ---------------------------------------------------------------------------------------------------------
# Reading a finished sweep back: the two sweep tables plus the per-trial evaluation tables.


class TableError(UserError, ValueError):
    """A sweep's tables are missing, or not in the schema this module writes."""


@dataclass(frozen=True)
class EvaluationTables:
    """Per-trial evaluation tables of a sweep, each with a leading ``trial`` column.

    Attributes:
        groups: one row per (trial, dataset, attribute, group, label): the subgroup counts, AUROC and
            thresholded rates of `trainables.evaluate.fairness.group_table`, for the test split
            (``dataset`` = the training dataset) and every external test set.
        bootstrap: one row per (trial, dataset, replicate): float32 ``auroc_macro`` and one AUROC column per
            label. Replicate ``b`` of one dataset used the same resampled indices in every trial of the
            sweep (fixed seed per dataset), so two trials' rows pair up by ``replicate``.
        source: where the tables were read from (a folder), for the report.
    """

    groups: pd.DataFrame
    bootstrap: pd.DataFrame
    source: str
    predictions: pd.DataFrame | None = None
    """One row per (trial, dataset, image): the selected model's scores (`trainables.train.prediction_table`);
    None where the trials wrote none (older checkpoints)."""


@dataclass(frozen=True)
class SweepTables:
    """Everything analysis reads about one sweep.

    Attributes:
        sweep_dir: ``runs/<sweep>``.
        trials: ``trials.parquet`` (schema in this module's docstring).
        epochs: ``epochs.parquet``.
        evaluation: the per-trial evaluation tables, or None when neither ``sweep_dir`` nor the Ray
            experiment folder holds them (see `load_tables`); ``evaluation_note`` says why.
        evaluation_note: where ``evaluation`` came from, or why it is missing.
    """

    sweep_dir: Path
    trials: pd.DataFrame
    epochs: pd.DataFrame
    evaluation: EvaluationTables | None
    evaluation_note: str

    @property
    def name(self) -> str:
        return self.sweep_dir.name


def default_ray_experiment_dir(sweep_dir: str | Path) -> Path:
    """Where `sweeps.launch` keeps a sweep's Ray experiment: ``<runs>/ray/<sweep>`` for ``<runs>/<sweep>``."""
    sweep_dir = Path(sweep_dir)
    return sweep_dir.parent / "ray" / sweep_dir.name


def load_tables(sweep_dir: str | Path, ray_experiment_dir: str | Path | None = None) -> SweepTables:
    """Read a sweep's trial and epoch tables, and its per-trial evaluation tables where they exist.

    The evaluation tables are looked up in this order, and `SweepTables.evaluation_note` records which
    one was used: (1) the final checkpoints under ``ray_experiment_dir`` when it is given (it must exist);
    (2) ``sweep_dir/groups.parquet`` and ``sweep_dir/bootstrap.parquet`` (as written by
    `write_evaluation_tables`; with ``sweep_dir/predictions.parquet`` where present); (3) the final
    checkpoints under `default_ray_experiment_dir`; (4) none (``evaluation`` is None). From a Ray folder, only
    the rows of the trials in ``trials.parquet`` are kept (a private selection's also holds candidates never
    released).

    Raises:
        TableError: ``trials.parquet`` or ``epochs.parquet`` is missing or lacks its key columns, a trial
            key repeats, or an explicitly given Ray folder does not exist.
    """
    sweep_dir = Path(sweep_dir)
    trials = _read_table(sweep_dir / TRIALS_FILE, ("trial", "status"))
    epochs = _read_table(sweep_dir / EPOCHS_FILE, ("trial",))
    repeated = trials["trial"][trials["trial"].duplicated()].tolist()
    if repeated:
        raise TableError(f"{sweep_dir / TRIALS_FILE}: trial keys repeat ({repeated[:5]}); one row per trial expected")
    default_ray_dir = default_ray_experiment_dir(sweep_dir)
    evaluation = None
    if ray_experiment_dir is not None:
        if not Path(ray_experiment_dir).is_dir():
            raise TableError(
                f"Ray experiment folder {ray_experiment_dir} does not exist; pass the folder that holds "
                "the sweep's trial folders (runs/ray/<sweep>)"
            )
        evaluation = evaluation_of_trials(collect_trial_tables(ray_experiment_dir), set(trials["trial"]))
        note = f"per-trial evaluation tables collected from the final checkpoints under {ray_experiment_dir}"
    elif (sweep_dir / GROUPS_FILE).exists() and (sweep_dir / BOOTSTRAP_FILE).exists():
        evaluation = EvaluationTables(
            groups=_read_table(sweep_dir / GROUPS_FILE, ("trial", "dataset")),
            bootstrap=_read_table(sweep_dir / BOOTSTRAP_FILE, ("trial", "dataset", "replicate")),
            source=str(sweep_dir),
            predictions=(
                _read_table(sweep_dir / PREDICTIONS_FILE, ("trial", "dataset", "row"))
                if (sweep_dir / PREDICTIONS_FILE).is_file()
                else None
            ),
        )
        note = f"per-trial evaluation tables read from {sweep_dir}"
    elif default_ray_dir.is_dir():
        evaluation = evaluation_of_trials(collect_trial_tables(default_ray_dir), set(trials["trial"]))
        note = f"per-trial evaluation tables collected from the final checkpoints under {default_ray_dir}"
    else:
        note = (
            f"no per-trial evaluation tables: neither {sweep_dir / BOOTSTRAP_FILE} nor the Ray experiment "
            f"folder {default_ray_dir} exists, so views that need per-replicate AUROCs are left out"
        )
    return SweepTables(sweep_dir, trials, epochs, evaluation, note)


def restricted(tables: SweepTables, keep: pd.Series) -> SweepTables:
    """The tables of the trials where ``keep`` (one bool per row of ``tables.trials``) holds: their trial, epoch and
    evaluation rows."""
    trials = tables.trials[keep.to_numpy(bool)].reset_index(drop=True)
    keys = set(trials["trial"])
    epochs = tables.epochs
    if "trial" in epochs:
        epochs = epochs[epochs["trial"].isin(keys)].reset_index(drop=True)
    evaluation = None if tables.evaluation is None else evaluation_of_trials(tables.evaluation, keys)
    return replace(tables, trials=trials, epochs=epochs, evaluation=evaluation)


def without_proxy_phase(tables: SweepTables) -> tuple[SweepTables, int]:
    """The tables of the trials that trained on private data, and how many proxy trials were left out: a ``search:
    proxy`` sweep's phase 1 (``phase = proxy``, public data, no epsilon) is never in an epsilon bin, the Pareto front or
    the headline tables."""
    if "phase" not in tables.trials:
        return tables, 0
    proxy = tables.trials["phase"].astype(str) == "proxy"
    return restricted(tables, ~proxy), int(proxy.sum())


def image_unit_only(tables: SweepTables) -> tuple[SweepTables, int]:
    """A sweep with both privacy units: its image-level trials (epsilons of different units never share a bin), and
    how many patient-level trials were left out; any other sweep unchanged (0)."""
    trials = tables.trials
    if "privacy_unit" not in trials or trials["privacy_unit"].nunique() < 2:
        return tables, 0
    image = trials["privacy_unit"] == "image"
    return restricted(tables, image), int((~image).sum())


def train_fractions(trials: pd.DataFrame) -> pd.Series:
    """Each trial's share of the training patients (``data.train_fraction``) as a float: 1 where the column or a value
    is missing (sweeps before the axis, trials on the whole split); MLflow gives params as text."""
    given = trials["train_fraction"] if "train_fraction" in trials else pd.Series(float("nan"), index=trials.index)
    return pd.to_numeric(given, errors="coerce").fillna(1.0).astype(float)


def largest_train_fraction(tables: SweepTables) -> tuple[SweepTables, float | None]:
    """A data-scale sweep (several ``data.train_fraction``): its trials on the largest fraction (fractions would
    otherwise compete in one cell) and that fraction; any other sweep unchanged (None)."""
    fraction = train_fractions(tables.trials)
    if fraction.nunique() < 2:
        return tables, None
    largest = float(fraction.max())
    return restricted(tables, fraction == largest), largest


def evaluation_of_trials(evaluation: EvaluationTables, keys: set[str]) -> EvaluationTables:
    """The evaluation tables' rows of the trials in ``keys``."""

    def kept(table: pd.DataFrame) -> pd.DataFrame:
        return table[table["trial"].isin(keys)].reset_index(drop=True) if "trial" in table else table

    predictions = evaluation.predictions
    return EvaluationTables(
        kept(evaluation.groups),
        kept(evaluation.bootstrap),
        evaluation.source,
        None if predictions is None else kept(predictions),
    )


def collect_trial_tables(ray_experiment_dir: str | Path) -> EvaluationTables:
    """Gather ``groups.parquet`` and ``bootstrap.parquet`` (and ``predictions.parquet`` where present) from every
    finished trial's final checkpoint (`ray_trial_folders`, `RayTrialFolder.final_checkpoint`). Trials without one
    (failed or unfinished) contribute no rows.

    Raises:
        TableError: the folder does not exist, two trial folders carry the same key, or a final checkpoint
            lacks one of the two tables.
    """
    ray_dir = Path(ray_experiment_dir)
    parts: dict[str, list[pd.DataFrame]] = {GROUPS_FILE: [], BOOTSTRAP_FILE: []}
    predictions: list[pd.DataFrame] = []
    for trial in ray_trial_folders(ray_dir):
        final = trial.final_checkpoint()
        if final is None:
            continue
        for file, frames in parts.items():
            table = trial.final_table(file)
            if table is None:
                raise TableError(
                    f"{final} holds {FINAL_FILE} but not {file}; the trial's final checkpoint is incomplete: "
                    "re-run that trial"
                )
            table.insert(0, "trial", trial.key)
            frames.append(table)
        table = trial.final_table(PREDICTIONS_FILE)
        if table is not None:
            table.insert(0, "trial", trial.key)
            predictions.append(table)
    groups, bootstrap = (
        pd.concat(parts[f], ignore_index=True) if parts[f] else pd.DataFrame(columns=["trial"])
        for f in (GROUPS_FILE, BOOTSTRAP_FILE)
    )
    return EvaluationTables(
        groups=groups,
        bootstrap=bootstrap,
        source=str(ray_dir),
        predictions=pd.concat(predictions, ignore_index=True) if predictions else None,
    )


def write_sweep_tables(
    sweep_dir: str | Path, trials: pd.DataFrame, epochs: pd.DataFrame, evaluation: EvaluationTables | None = None
) -> list[Path]:
    """Write ``trials.parquet`` and ``epochs.parquet``, and the evaluation tables where given
    (`_evaluation_files`), into ``sweep_dir`` (created if needed); returns the files written."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tables = {TRIALS_FILE: trials, EPOCHS_FILE: epochs} | _evaluation_files(evaluation)
    for file, table in tables.items():
        table.to_parquet(sweep_dir / file, index=False)
    return [sweep_dir / file for file in tables]


def write_evaluation_tables(sweep_dir: str | Path, ray_experiment_dir: str | Path | None = None) -> list[Path]:
    """Collect the per-trial evaluation tables (`collect_trial_tables`) into ``sweep_dir``; returns the files.

    After this the sweep folder alone is enough for every analysis view, e.g. once the Ray folder is gone.
    """
    sweep_dir = Path(sweep_dir)
    ray_dir = Path(ray_experiment_dir) if ray_experiment_dir is not None else default_ray_experiment_dir(sweep_dir)
    tables = _evaluation_files(collect_trial_tables(ray_dir))
    for file, table in tables.items():
        table.to_parquet(sweep_dir / file, index=False)
    return [sweep_dir / file for file in tables]


def _evaluation_files(evaluation: EvaluationTables | None) -> dict[str, pd.DataFrame]:
    """File name -> table of the evaluation tables to write: ``groups`` and ``bootstrap`` (and ``predictions``
    where the trials wrote them); none when no trial has any, rather than empty tables without their columns (which
    `load_tables` would refuse)."""
    if evaluation is None or evaluation.groups.empty or evaluation.bootstrap.empty:
        return {}
    files = {GROUPS_FILE: evaluation.groups, BOOTSTRAP_FILE: evaluation.bootstrap}
    return files | ({PREDICTIONS_FILE: evaluation.predictions} if evaluation.predictions is not None else {})


# ---------------------------------------------------------------------------------------------------------
# Ray's experiment folder on disk. The one reader of its layout: `collect_trial_tables` here, and the sweep's
# records (`sweeps.results`, which asks Ray itself only for what Ray alone records: each trial's status and reports).


@dataclass(frozen=True)
class RayTrialFolder:
    """One trial's folder in a Ray experiment folder (``runs/ray/<sweep>/<trial folder>/``).

    Ray writes the trial's config to ``params.json`` (its grid point under ``point``, the trial key at
    ``point.key``) and each checkpoint the trial saves to a ``checkpoint_<n>`` folder (zero-padded ``n``, so name
    order is save order). At the end of training the trial (`trainables.trial`) saves its final checkpoint: the one
    that holds ``final.json`` (its final report) beside its tables (``epochs``, ``groups``, ``bootstrap`` and
    ``predictions.parquet``). Checkpoints are private material (they hold the noise seeds): only the final report
    and these tables are read from them.
    """

    path: Path

    @property
    def key(self) -> str:
        """The trial key, ``point.key`` of ``params.json``.

        Raises:
            TableError: ``params.json`` holds no trial key (not a dpsweep trial).
        """
        try:
            return str(json.loads((self.path / RAY_PARAMS_FILE).read_text())["point"]["key"])
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise TableError(
                f"{self.path / RAY_PARAMS_FILE}: no trial key at point.key ({error!r}); is this a dpsweep Ray "
                "experiment?"
            ) from None

    def final_checkpoint(self) -> Path | None:
        """The highest-numbered ``checkpoint_*`` folder holding ``final.json``; None before the trial finished."""
        found = sorted(p.parent for p in self.path.glob(f"checkpoint_*/{FINAL_FILE}"))
        return found[-1] if found else None

    def final_report(self) -> dict[str, Any] | None:
        """The final report saved in the final checkpoint (the metrics of the trial's last `tune.report`)."""
        final = self.final_checkpoint()
        return json.loads((final / FINAL_FILE).read_text()) if final is not None else None

    def final_table(self, file: str) -> pd.DataFrame | None:
        """One of the final checkpoint's tables (``EPOCHS_FILE``, ``GROUPS_FILE``, ...); None where it has none."""
        final = self.final_checkpoint()
        path = final / file if final is not None else None
        return pd.read_parquet(path) if path is not None and path.is_file() else None


EXTENSION_PART = "extension-{}"
"""The Ray experiment of a sweep's n-th extension (n >= 1: new grid values added to a sweep that ran, `sweeps.state`),
a folder inside the sweep's own Ray experiment folder (`ray_part_dir`)."""


def ray_part_dir(ray_experiment_dir: str | Path, part: int) -> Path:
    """The Ray experiment folder of a sweep's part: ``runs/ray/<sweep>`` for its first grid (part 0), and
    ``runs/ray/<sweep>/extension-<n>`` for its n-th extension, so that the sweep's Ray state stays one folder."""
    ray_dir = Path(ray_experiment_dir)
    return ray_dir / EXTENSION_PART.format(part) if part else ray_dir


def ray_experiment_parts(ray_experiment_dir: str | Path) -> list[Path]:
    """The Ray experiment folders of a sweep's parts that exist (`ray_part_dir`), in order: the sweep's own folder,
    then one per extension."""
    parts = [Path(ray_experiment_dir)]
    while (folder := ray_part_dir(ray_experiment_dir, len(parts))).is_dir():
        parts.append(folder)
    return parts


def ray_state_saved(ray_part: Path) -> bool:
    """Whether Ray saved its experiment state in the folder (``experiment_state-<time>.json``): an extension whose
    driver was stopped before Ray started it has none, and no trials."""
    return any(ray_part.glob("experiment_state-*.json"))


def ray_trial_folders(ray_experiment_dir: str | Path) -> list[RayTrialFolder]:
    """The trial folders of a sweep's Ray experiment folder (subfolders holding ``params.json``), in name order, and
    then those of each of its extensions (`ray_experiment_parts`).

    Raises:
        TableError: the folder does not exist, a trial folder holds no trial key, or two trial folders carry the
            same key (a stale folder left by an earlier run).
    """
    ray_dir = Path(ray_experiment_dir)
    if not ray_dir.is_dir():
        raise TableError(f"Ray experiment folder {ray_dir} does not exist")
    trials = [
        RayTrialFolder(p)
        for part in ray_experiment_parts(ray_dir)
        for p in sorted(part.iterdir())
        if (p / RAY_PARAMS_FILE).is_file()
    ]
    seen: dict[str, Path] = {}
    for trial in trials:
        key = trial.key
        if key in seen:
            raise TableError(
                f"trial {key!r} appears twice in {ray_dir}: {seen[key].name} and {trial.path.name}; "
                "remove the stale folder (or re-run the sweep with --fresh)"
            )
        seen[key] = trial.path
    return trials


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise TableError(
            f"{path} does not exist; run the sweep first (`dpsweep sweep <spec>`), or pass the folder "
            "runs/<sweep> that holds it"
        )
    table = pd.read_parquet(path)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; was it written by dpsweep?")
    return table


def main(argv: list[str] | None = None) -> None:
    """``python -m analysis.tables runs/<sweep> [ray folder]``: copy the evaluation tables into the sweep folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m analysis.tables", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("ray_experiment_dir", type=Path, nargs="?", default=None)
    args = parser.parse_args(argv)
    for path in write_evaluation_tables(args.sweep_dir, args.ray_experiment_dir):
        print(path)


if __name__ == "__main__":
    main()
