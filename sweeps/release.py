"""`dpsweep release`: a sweep's results that its reported epsilon covers, in a folder that may be shared.

A sweep's own outputs (``runs/``, the MLflow experiment, the report) hold the non-private baselines' exact numbers
beside the private trials', and checkpoints hold secret noise seeds: they are private material as a whole. A release
copies out only the trials with a DP guarantee (private, secret noise: `trainables.privacy.guarantee.has_dp_guarantee`)
and writes ``PRIVACY.md`` stating what covers them::

    DIR/PRIVACY.md      the bundle's epsilon first; unit, adjacency, delta, accountant; each trial's epsilon; the
                        tuning epsilon of the released trials; the dataset's ledger epsilon; what is not covered; files
    DIR/tables/         trials, epochs, groups, bootstrap (parquet and CSV) of the released trials
    DIR/report/         `analysis.report` of those tables (figures, tables)
    DIR/models/         with ``--models``: each finished released trial's selected weights (``<trial>.safetensors``)
    DIR/tables/predictions.*   with ``--predictions`` only: per-image test scores (row-level data on test patients)

What never goes in: checkpoints (noise seeds, optimizer and RNG states), the ledger, the data or its splits, anything
from ``runs/ray`` but the final weights file, ``train/loss`` (computed on private images outside the mechanism), the
``system/*`` timings (outside the guarantee: docs/design.md), local paths and MLflow run ids. Non-private and
``reproducible_noise`` trials go in only with ``--include-non-private``; the bundle's epsilon is then ``inf``, said
first. Every refusal happens before anything is written.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.tables import EvaluationTables, RayTrialFolder, SweepTables, load_tables, ray_trial_folders
from sweeps.ledger import ledger_lines
from sweeps.plan import SweepPaths
from sweeps.spec import SweepSpec
from sweeps.tuning_cost import adaptive_tuning_bounds, patient_level_sweep_epsilon, tuning_costs
from trainables import names as N
from trainables.errors import UserError

PRIVACY_FILE = "PRIVACY.md"
TABLES_DIR = "tables"
REPORT_DIR = "report"
MODELS_DIR = "models"
EPSILON_REPLACE_ONE = "privacy/epsilon_replace_one"
"""A trial's epsilon read under replace-one adjacency, where the trial table has it (newer dpsweep); skipped if not."""
UNRELEASED_COLUMNS = ("mlflow_run_id", "error", "data_root", "init_weights", N.NODE_ID)
"""Trial-table columns left out: ids into the private MLflow store and local paths (no numbers, nothing a reader
needs)."""
UNRELEASED_EPOCH_COLUMNS = (N.TRAIN_LOSS,)
"""Epoch-table columns left out: a non-private trial's ``train/loss`` is computed on the private training images with
no DP mechanism (private trials never report it); the ``system/*`` timings go too (`SYSTEM_PREFIX`)."""
_PRIVATE_NAME_PARTS = ("secret", "rng", "split_key")
"""Column names no release may carry whatever a future table holds (seeds and generator states of the mechanism,
split keys): refused, not dropped, as they would mean the tables themselves are wrong."""


class ReleaseError(UserError):
    """A release that cannot be written as asked (the message names the option, the value and the fix)."""


@dataclass(frozen=True)
class Release:
    """What `write_release` wrote.

    Attributes:
        out: the bundle's folder.
        trials: the released trial keys, in the trial table's order.
        epsilon: the bundle's epsilon per training set (``inf`` with a trial without a guarantee).
        files: every file written, relative to ``out``, sorted.
    """

    out: Path
    trials: list[str]
    epsilon: dict[str, float]
    files: list[str]


def has_guarantee(trials: pd.DataFrame) -> pd.Series:
    """Per trial, whether its (epsilon, delta) holds: a finite target (private) and its noise seed not published
    (not ``reproducible_noise``), as `trainables.privacy.guarantee.has_dp_guarantee` for a config, and its
    ``privacy/guarantee`` statement (where the table has it) not "none". Fails closed: any doubt is no guarantee."""
    target = pd.to_numeric(trials["target_epsilon"], errors="coerce")
    private = target.map(lambda e: e == e and math.isfinite(e) and e > 0)
    if "noise_multiplier" in trials:
        private &= pd.to_numeric(trials["noise_multiplier"], errors="coerce").fillna(0) > 0
    reproducible = (
        trials["reproducible_noise"].map(lambda v: not (isinstance(v, bool | int | float | np.bool_) and v == 0))
        if "reproducible_noise" in trials
        else pd.Series(True, index=trials.index)  # unknown randomness: no guarantee
    )
    stated = (
        trials[N.GUARANTEE].map(lambda g: isinstance(g, str) and not g.startswith("none"))
        if N.GUARANTEE in trials
        else pd.Series(True, index=trials.index)
    )
    return (private & ~reproducible & stated).astype(bool)


def write_release(
    spec: SweepSpec,
    paths: SweepPaths,
    out: str | Path,
    *,
    include_non_private: bool = False,
    models: bool = False,
    predictions: bool = False,
) -> Release:
    """Write the release of a sweep's tables into ``out`` (module docstring).

    Args:
        spec, paths: the sweep and where its runs and data are.
        out: a new or empty folder.
        include_non_private: also release the trials without a guarantee (non-private, ``reproducible_noise``);
            the bundle's epsilon is then ``inf``.
        models: copy each finished released trial's selected weights from its final checkpoint.
        predictions: also release the per-image test and external-test scores.

    Raises:
        ReleaseError: ``out`` exists and is not empty, the sweep has no tables, no trial is left to release, or
            ``models`` finds no weights.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(
            f"--out {out}: exists and is not empty; a release is written into a new or empty folder (name another "
            "one, or remove this one first)"
        )
    sweep_dir = paths.sweep_dir(spec)
    if not (sweep_dir / N.TRIALS_FILE).is_file():
        raise ReleaseError(
            f"sweep {spec.name!r}: no trial table at {sweep_dir / N.TRIALS_FILE}; build the tables first with "
            f"`dpsweep table {spec.source}` (or run `dpsweep sweep {spec.source}`)"
        )
    tables = load_tables(sweep_dir)
    from sweeps.proxy import private_phase

    guaranteed = has_guarantee(tables.trials)
    # A proxy sweep's phase 1 trained on public data: its ranking is in proxy.json, its runs are no private result.
    chosen = (guaranteed | include_non_private) & tables.trials.index.isin(private_phase(tables.trials).index)
    if not chosen.any():
        raise ReleaseError(
            f"sweep {spec.name!r}: none of its {len(tables.trials)} trials has a DP guarantee (non-private or "
            "reproducible_noise), so nothing is covered by an epsilon; run private trials, or pass "
            "--include-non-private to release them anyway (the bundle's epsilon is then inf)"
        )
    released = _released_tables(tables, chosen, out)
    weights = _final_weights(spec, paths, released.trials) if models else {}
    missing = [str(k) for k in released.trials["trial"] if str(k) not in weights] if models else []
    privacy = _privacy_sections(spec, paths, tables.trials, released.trials, chosen, predictions, models, missing)

    out.mkdir(parents=True, exist_ok=True)
    _write_tables(out / TABLES_DIR, released, predictions)
    if (sweep_dir / N.SELECTION_FILE).is_file():  # a private selection's public plan: the report shows it
        shutil.copyfile(sweep_dir / N.SELECTION_FILE, out / N.SELECTION_FILE)
    from analysis.report import render_report  # matplotlib: only when a release is written

    render_report(released, out / REPORT_DIR, data_root=paths.data_root)
    for key, source in weights.items():
        (out / MODELS_DIR).mkdir(exist_ok=True)
        shutil.copyfile(source, out / MODELS_DIR / f"{key}.safetensors")  # the weights file alone, nothing beside it
    files = sorted({*(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()), PRIVACY_FILE})
    (out / PRIVACY_FILE).write_text(privacy.text(files), encoding="utf-8")
    return Release(out, released.trials["trial"].tolist(), privacy.epsilon, files)


def _released_tables(tables: SweepTables, chosen: pd.Series, out: Path) -> SweepTables:
    """The released trials' rows of every table, without the unreleased columns; the predictions stay in memory for
    the report's intersectional tables (they are written only with ``--predictions``). Their folder is the bundle's
    (the report names it and reads nothing else from it: not the sweep folder's audit table).

    Raises:
        ReleaseError: a table has a column named like secret material (`_PRIVATE_NAME_PARTS`).
    """
    trials = tables.trials[chosen.to_numpy()]
    keys = set(trials["trial"])
    epochs = tables.epochs[tables.epochs["trial"].isin(keys)] if "trial" in tables.epochs else tables.epochs
    timing = [c for c in epochs.columns if c.startswith(N.SYSTEM_PREFIX)]
    trials = trials.drop(columns=[c for c in UNRELEASED_COLUMNS if c in trials]).reset_index(drop=True)
    epochs = epochs.drop(columns=[c for c in (*UNRELEASED_EPOCH_COLUMNS, *timing) if c in epochs])
    evaluation = tables.evaluation
    if evaluation is not None:

        def kept(table: pd.DataFrame) -> pd.DataFrame:
            return table[table["trial"].isin(keys)].reset_index(drop=True)

        evaluation = EvaluationTables(
            groups=kept(evaluation.groups),
            bootstrap=kept(evaluation.bootstrap),
            source="the released trials' evaluation tables",
            predictions=None if evaluation.predictions is None else kept(evaluation.predictions),
        )
    for name, table in (("trials", trials), ("epochs", epochs)):
        secret = [c for c in table.columns if any(part in c.lower() for part in _PRIVATE_NAME_PARTS)]
        if secret:
            raise ReleaseError(
                f"the sweep's {name} table has column(s) {secret}, named like secret material (seeds, generator "
                "states, split keys); nothing is released: rebuild the tables with `dpsweep table`, and report it "
                "if they remain"
            )
    note = (
        "the released trials' evaluation tables (tables/); the intersectional section uses their per-image test "
        "scores, which the bundle holds only when released with --predictions"
    )
    return SweepTables(out, trials, epochs.reset_index(drop=True), evaluation, note)


def _write_tables(folder: Path, tables: SweepTables, predictions: bool) -> None:
    """Each table as parquet and CSV; predictions only when asked."""
    folder.mkdir(parents=True)
    written = {N.TRIALS_FILE: tables.trials, N.EPOCHS_FILE: tables.epochs}
    if tables.evaluation is not None:
        written |= {N.GROUPS_FILE: tables.evaluation.groups, N.BOOTSTRAP_FILE: tables.evaluation.bootstrap}
        if predictions and tables.evaluation.predictions is not None:
            written[N.PREDICTIONS_FILE] = tables.evaluation.predictions
    for file, table in written.items():
        table.to_parquet(folder / file, index=False)
        table.to_csv((folder / file).with_suffix(".csv"), index=False)


def _final_weights(spec: SweepSpec, paths: SweepPaths, trials: pd.DataFrame) -> dict[str, Path]:
    """Trial key -> its final checkpoint's weights file, for every finished released trial that has one.

    Raises:
        ReleaseError: no Ray experiment folder, or no released trial has weights.
    """
    ray_dir = paths.ray_experiment(spec)
    if not ray_dir.is_dir():
        raise ReleaseError(
            f"--models: no Ray experiment folder at {ray_dir} (the trials' final checkpoints hold the weights); "
            "release from the machine that ran the sweep, or leave out --models"
        )
    folders: dict[str, RayTrialFolder] = {folder.key: folder for folder in ray_trial_folders(ray_dir)}
    weights = {}
    for key in trials.loc[trials["status"] == N.TERMINATED, "trial"]:
        final = folders[key].final_checkpoint() if key in folders else None
        if final is not None and (final / N.FINAL_WEIGHTS_FILE).is_file():
            weights[key] = final / N.FINAL_WEIGHTS_FILE
    if not weights:
        raise ReleaseError(
            f"--models: none of the {len(trials)} released trials of {spec.name!r} has weights in its final "
            f"checkpoint ({N.FINAL_WEIGHTS_FILE}; trials finished by an earlier dpsweep kept none); re-run the sweep "
            "with --fresh to get them, or leave out --models"
        )
    return weights


# ---------------------------------------------------------------------------------------------------------
# PRIVACY.md


def epsilon_text(value: float) -> str:
    """An epsilon for PRIVACY.md: 4 significant digits, rounded **up** (a stated guarantee is never smaller than
    the computed one); ``inf`` as is."""
    if not math.isfinite(value):
        return "inf"
    if value <= 0:
        return f"{value:g}"
    scale = 10 ** (3 - math.floor(math.log10(value)))
    return f"{math.ceil(value * scale - 1e-9) / scale:.4g}"


@dataclass(frozen=True)
class _Privacy:
    sections: list[str]
    epsilon: dict[str, float]

    def text(self, files: Sequence[str]) -> str:
        listing = "\n".join(f"- `{file}`" for file in files)
        return "\n\n".join([*self.sections, f"## Files in this bundle\n\n{listing}"]) + "\n"


def _privacy_sections(
    spec: SweepSpec,
    paths: SweepPaths,
    everything: pd.DataFrame,
    released: pd.DataFrame,
    chosen: pd.Series,
    predictions: bool,
    models: bool,
    without_weights: list[str],
) -> _Privacy:
    """PRIVACY.md without its file list (known once everything is written)."""
    guaranteed = has_guarantee(released)
    without = released[~guaranteed.to_numpy()]
    private = released[guaranteed.to_numpy()]
    costs = _bundle_costs(spec, paths, released)
    epsilon = {dataset: (math.inf if len(without) else eps) for dataset, eps in costs.items()}
    if len(without) and not epsilon:
        epsilon = {str(d): math.inf for d in released["dataset"].unique()}
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [f"# Privacy of this release: sweep `{spec.name}`"]
    if len(without):
        sections.append(
            "**Epsilon of this bundle: inf.** It holds "
            f"{len(without)} trial(s) without a DP guarantee, included on request (`--include-non-private`): "
            + ", ".join(f"`{k}` ({_no_guarantee_reason(row)})" for k, row in without.set_index("trial").iterrows())
            + ". Their numbers are computed from the private training images with no bound on what they reveal, so "
            "the bundle as a whole has no finite epsilon. Only a bundle of the private trials alone (made without "
            "the flag) is covered by the epsilons below."
        )
    else:
        bound = ", ".join(f"{epsilon_text(e)} on {d}" for d, e in epsilon.items())
        sections.append(
            f"**Epsilon of this bundle: {bound}** at delta {_deltas(private)} (every released trial composed: "
            "the tuning epsilon of the released trials, below). Every file here is computed from those trials' "
            "DP-trained models and non-training data, or is public."
        )
    sections.append(
        f"Written by `dpsweep release {spec.source}` on {when} from {len(everything)} trial(s) of the sweep; "
        f"{len(released)} released ({len(private)} with a DP guarantee"
        + (f", {len(without)} without" if len(without) else "")
        + f"); {int((~chosen).sum())} left out (non-private or reproducible_noise)."
    )
    sections.append(_guarantee_section(private))
    sections.append(_trials_section(released, guaranteed))
    sections.append(_tuning_section(spec, everything, released, costs))
    sections.append(_ledger_section(paths, released, private))
    sections.append(_not_covered_section(released, without, predictions, models, without_weights))
    return _Privacy(sections, epsilon)


def _bundle_costs(spec: SweepSpec, paths: SweepPaths, released: pd.DataFrame) -> dict[str, float]:
    """Per training set (and unit, when both are released) the epsilon of publishing every released trial: Optuna
    sweeps' worst-case adaptive bound, grid sweeps' composition of the released trials (`tuning_costs`), private
    selections' composition of the released cells' selection bounds (`sweeps.selection`)."""
    if spec.search == "private_selection":  # each released winner costs its whole cell's selection
        from sweeps.selection import released_selection_epsilons

        return released_selection_epsilons(paths.sweep_dir(spec), set(released["trial"]), spec.privacy.delta)
    adaptive = adaptive_tuning_bounds(spec, released)
    costs = {dataset: cost.epsilon for dataset, cost in tuning_costs(released).items()}
    return costs | {dataset: bounds[0].epsilon for dataset, bounds in adaptive.items()}


def _guarantee_section(private: pd.DataFrame) -> str:
    lines = ["## The guarantee"]
    if private.empty:
        return "\n\n".join([*lines, "No released trial has a DP guarantee."])
    units = []
    for (dataset, unit), group in private.groupby(["dataset", "privacy_unit"], sort=False):
        n_train = ", ".join(str(int(n)) for n in group["n_train"].dropna().unique()) if "n_train" in group else "?"
        if unit == "patient":
            cap = ", ".join(str(int(m)) for m in group["max_images_per_patient"].dropna().unique())
            units.append(
                f"- `{dataset}`, patient-level trials: the unit is **one patient** with all of their training images "
                f"(at most {cap} per patient are used); **add/remove adjacency**: one patient added to or removed "
                f"from the training split; the number of training patients (from {n_train} training images) is "
                "treated as public."
            )
        else:
            units.append(
                f"- `{dataset}`, image-level trials: the unit is **one training image**; **add/remove adjacency**: "
                f"one image added to or removed from the training split; N = {n_train} training images is treated "
                "as public (q = 1/ceil(N/B) and the step count are derived from it and released)."
            )
    accountants = ", ".join(f"`{a}`" for a in private["accountant"].dropna().unique())
    lines += [
        "\n".join(units),
        f"- **delta**: {_deltas(private)}.",
        f"- **Accountant**: {accountants} (Opacus), for DP-SGD with Poisson sampling, per-record clipping to C and "
        "Gaussian noise from secret randomness; each trial's final epsilon is cross-checked with Google's "
        "dp-accounting (`privacy/epsilon_dp_accounting_rdp`, `_pld` in `tables/trials.csv`).",
        "- What it means: adding or removing one unit changes the probability of any outcome of a trial (its model "
        "and every number computed from it) by a factor of at most e^epsilon, up to delta. Each trial's guarantee "
        f"in words is its `{N.GUARANTEE}` column.",
    ]
    return "\n\n".join(lines[:1] + ["\n".join(lines[1:])])


def _trials_section(released: pd.DataFrame, guaranteed: pd.Series) -> str:
    columns = {
        "trial": "trial",
        "status": "status",
        "privacy_unit": "unit",
        "target_epsilon": "target",
        N.EPSILON: "epsilon",
        EPSILON_REPLACE_ONE: "epsilon (replace-one)",
        N.EPSILON_PATIENT: "epsilon per patient",
        N.PATIENT_IMAGES: "k",
        "delta": "delta",
    }
    shown = {c: h for c, h in columns.items() if c in released}
    rows = []
    for (_, row), ok in zip(released.iterrows(), guaranteed, strict=True):
        cells = []
        for column in shown:
            value = row[column]
            if column == "trial":
                cells.append(f"`{value}`")
            elif column in (N.EPSILON, EPSILON_REPLACE_ONE, N.EPSILON_PATIENT, "target_epsilon"):
                cells.append(("inf" if not ok else "-") if value is None or value != value else epsilon_text(value))
            elif column == N.PATIENT_IMAGES:
                cells.append("-" if value is None or value != value else f"{value:.0f}")
            else:
                cells.append(str(value))
        if not ok:
            cells[0] += " (no guarantee)"
        rows.append("| " + " | ".join(cells) + " |")
    head = "| " + " | ".join(shown.values()) + " |\n|" + "---|" * len(shown)
    notes = [
        "## Each released trial's epsilon",
        "Epsilons rounded up to 4 significant digits (exact values in `tables/trials.csv`), each at the trial's delta "
        "over its whole run (the selected epoch's weights depend on every epoch through selection).",
        head + "\n" + "\n".join(rows),
    ]
    if EPSILON_REPLACE_ONE in released:
        notes.append(
            "The replace-one column reads the same mechanism under replace-one adjacency (one image swapped for "
            "another with N fixed), the reading a public N suggests; the guarantee stated is add/remove."
        )
    if N.EPSILON_PATIENT in released and released[N.EPSILON_PATIENT].notna().any():
        notes.append(
            "An image-level trial protects one image. A patient with k images is protected only at the "
            f"per-patient epsilon (`{N.EPSILON_PATIENT}`, for the training split's patient with the most images, "
            f"k = `{N.PATIENT_IMAGES}`; `{N.EPSILON_PATIENT_P99}` for the 99th percentile)."
        )
    return "\n\n".join(notes)


def _tuning_section(spec: SweepSpec, everything: pd.DataFrame, released: pd.DataFrame, costs: dict[str, float]) -> str:
    if spec.search == "private_selection":
        selected = "\n".join(
            f"- `{d}`: epsilon {epsilon_text(e)} at delta {spec.privacy.delta:g}." for d, e in costs.items()
        )
        return (
            "## Tuning epsilon (private selection)\n\nEach released trial is the best, by validation, of a secret "
            "number of candidates of its cell (Papernot & Steinke 2022); its cell's epsilon includes that choice "
            f"(`{N.SELECTION_FILE}`: the distribution, the single-run and the tuning-inclusive epsilon). The released "
            "cells' selections composed (RDP):\n\n" + (selected or "- no cell released a winner: nothing to compose.")
        )
    lines = [
        "## Tuning epsilon (all released trials together)",
        "Publishing several trials trained on the same data, or the best of them, costs more than any one trial: the "
        "tuning epsilon composes every released trial that started, at its planned steps, label-count releases "
        "included (`sweeps.tuning_cost`).",
    ]
    released_costs = tuning_costs(released)
    whole = tuning_costs(everything)
    for dataset, cost in released_costs.items():
        line = f"- `{dataset}`: epsilon {epsilon_text(cost.epsilon)} at delta {cost.delta:g} ({cost.n_trials} trials)"
        if cost.n_non_private_excluded:
            line += (
                f"; private trials only: the {cost.n_non_private_excluded} non-private trial(s) released here are "
                "outside it"
            )
        other = whole.get(dataset)
        if other is not None and (other.epsilon != cost.epsilon or other.n_trials != cost.n_trials):
            line += (
                f"; the whole sweep's is {epsilon_text(other.epsilon)} ({other.n_trials} trials: it also composes "
                "trials this bundle leaves out)"
            )
        lines.append(line + ".")
    for dataset, bounds in adaptive_tuning_bounds(spec, released).items():
        lines.append(
            f"- `{dataset}` (`search: optuna`): Optuna chose each trial from earlier results, so only bounds that hold "
            f"under adaptive selection apply; the bundle's epsilon is the first: "
            + " ".join(f"{b.description} (epsilon {epsilon_text(b.epsilon)})" for b in bounds)
        )
    for dataset, epsilon in patient_level_sweep_epsilon(released).items():
        lines.append(
            f"- `{dataset}`, for one patient, every released private trial composed at the patient level: epsilon "
            f"{epsilon_text(epsilon)}."
        )
    if not released_costs and not costs:
        lines.append("- no released private trial started: nothing to compose.")
    return "\n\n".join(lines[:2] + ["\n".join(lines[2:])])


def _ledger_section(paths: SweepPaths, released: pd.DataFrame, private: pd.DataFrame) -> str:
    from trainables.data.ledger import LEDGER_DIR, read_ledger
    from trainables.privacy.ledger import compose_ledger

    lines = [
        "## The dataset's ledger epsilon",
        "Everything ever run on the same private training split (this and other sweeps, audits, runs replaced by "
        "`--fresh`, by anyone) composed: the epsilon of publishing this bundle together with anything else released "
        "from that split. This bundle's own epsilon is at most this, as long as the ledger is complete.",
    ]
    delta = float(private["delta"].min()) if len(private) else None
    for dataset in dict.fromkeys(released["dataset"]):
        entries = read_ledger(paths.data_root, str(dataset))
        if not entries:
            lines.append(f"- `{dataset}`: no runs recorded (its `{LEDGER_DIR}/` beside the prepared data is empty).")
            continue
        total = compose_ledger(entries, delta)
        lines.append(f"- `{dataset}`: " + "; ".join(ledger_lines(total)) + ".")
    return "\n\n".join(lines[:2] + ["\n".join(lines[2:])])


def _not_covered_section(
    released: pd.DataFrame, without: pd.DataFrame, predictions: bool, models: bool, without_weights: list[str]
) -> str:
    items = [
        "- **Validation and test images** (and the external test sets): the models are selected and thresholded on "
        "validation and evaluated on test; those images are not protected by any epsilon here. The tables and "
        "report hold aggregates over them (per group, per label, bootstrap replicates).",
    ]
    if (released.get("privacy_unit") == "image").any():
        items.append(
            "- **Patients with several images**, in image-level trials: protected only at "
            f"`{N.EPSILON_PATIENT}` (group privacy for their k images), not at the image epsilon."
        )
    items.append(
        "- **Dataset sizes**: N (`n_train`) and, for image-level trials, the largest images per patient (k) are "
        "released and treated as public metadata of the dataset; strictly they depend on the data and are not "
        "accounted."
    )
    if len(without):
        items.append(
            f"- **{len(without)} trial(s) without a DP guarantee** (non-private or reproducible_noise), included with "
            "`--include-non-private`: hence the bundle's epsilon inf."
        )
    items.append(
        "- **Per-image predictions** "
        + (
            "are included (`tables/predictions.*`, `--predictions`): one row per test and external-test image. "
            "They reveal nothing more about the training images than the model does, but they are row-level data "
            "about test patients, whom no epsilon protects: share them only where those patients' data may go."
            if predictions
            else "are left out: they are row-level data about test patients (one score per image), whom no epsilon "
            "protects. The report's intersectional tables are aggregates of them (groups of fewer than 10 images "
            "get no AUROC)."
        )
    )
    if models:
        items.append(
            "- **Model weights** (`models/`): each finished released trial's selected weights, DP-SGD's output, "
            "covered by its epsilon like every number computed from them (`model.state_dict()` only: no optimizer, "
            "RNG state or seed)."
            + (
                f" Released without weights ({len(without_weights)}: not finished, or finished before dpsweep kept "
                "the selected weights): " + ", ".join(f"`{key}`" for key in without_weights) + "."
                if without_weights
                else ""
            )
        )
    items += [
        "- **Never in a release**: checkpoints (secret noise seeds, optimizer and RNG states), the ledger, the data "
        f"and its splits, `{N.TRAIN_LOSS}` of non-private trials (computed on private images with no mechanism), "
        "the `system/*` timings (outside the guarantee, docs/design.md), the audit's results (its runs are other "
        "mechanisms on the same split, composed in the ledger only), local paths and MLflow run ids.",
    ]
    return "\n\n".join(["## What is not covered, and what is left out", "\n".join(items)])


def _deltas(trials: pd.DataFrame) -> str:
    return ", ".join(f"{d:g}" for d in trials["delta"].dropna().unique()) if "delta" in trials else "?"


def _no_guarantee_reason(row: Any) -> str:
    target = row.get("target_epsilon")
    if target is None or target != target or not math.isfinite(float(target)):
        return "non-private baseline"
    return "reproducible_noise: its noise replays from a published seed"
