"""A sweep's report: one static HTML page with the study's tables and figures, readable offline.

``python -m analysis.report runs/<sweep>`` writes ``runs/<sweep>/report/index.html`` and its PNG figures in
``report/figures/`` (referenced by relative paths, so the folder can be copied or zipped as a whole).
"""

from __future__ import annotations

import argparse
import html
import math
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from analysis import pareto, plots, views
from analysis.tables import FINISHED, GUARANTEE_TEXT, SweepTables, TableError, load_tables, without_guarantee
from trainables import names

REPORT_DIR = "report"
INDEX_FILE = "index.html"
FIGURES_DIR = "figures"
PROVENANCE_COLUMNS = (
    "model",
    "dataset",
    "accountant",
    "delta",
    "privacy_unit",
    "git_commit",
    "torch_version",
    "opacus_version",
    "timm_version",
    "ray_version",
    "mlflow_version",
    "numpy_version",
    "scikit_learn_version",
)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table.dataframe { border-collapse: collapse; font-size: 12px; margin: 0.6em 0 1.2em; }
table.dataframe th, table.dataframe td { border: 1px solid #ccc; padding: 3px 7px; text-align: right;
                                        white-space: nowrap; }
table.dataframe thead th { background: #f2f2f2; }
table.dataframe tbody th { background: #fafafa; text-align: left; font-weight: normal; }
.note { color: #555; font-size: 13px; max-width: 950px; }
.wide { overflow-x: auto; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def write_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, ray_experiment_dir: str | Path | None = None
) -> Path:
    """Render the sweep's report and return the path of its ``index.html``.

    Args:
        sweep_dir: ``runs/<sweep>`` holding ``trials.parquet`` and ``epochs.parquet``.
        out_dir: output folder; default ``<sweep_dir>/report``.
        ray_experiment_dir: where to collect per-trial bootstrap tables from when ``sweep_dir`` lacks them
            (see `analysis.tables.load_tables`; default ``<runs>/ray/<sweep>``).
    """
    tables = load_tables(sweep_dir, ray_experiment_dir)
    out_dir = Path(out_dir) if out_dir is not None else tables.sweep_dir / REPORT_DIR
    figures_dir = out_dir / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    page = _Page(out_dir)
    _summary(page, tables)
    tables = _study_unit(page, tables)
    _binned_auroc(page, tables)
    _binned_fairness(page, tables)
    selection = views.final_selection(tables.trials, tables.epochs)
    _final_models(page, tables, selection)
    _pareto(page, tables)
    _trajectories(page, tables)
    index = out_dir / INDEX_FILE
    index.write_text(page.render(f"dpsweep report: {tables.name}"), encoding="utf-8")
    return index


class _Page:
    """HTML body parts and the figures they reference."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{text}</p>')

    def table(self, frame: pd.DataFrame, index: bool = True) -> None:
        if frame.empty:
            self.note("(empty: no finished trial falls here)")
            return
        body = frame.to_html(float_format=_fmt, na_rep="-", index=index, border=0, classes="dataframe", escape=True)
        self.parts.append(f'<div class="wide">{body}</div>')

    def figure(self, name: str, make: Callable[[Path], object], caption: str) -> None:
        path = self.out_dir / FIGURES_DIR / f"{name}.png"
        make(path)
        relative = path.relative_to(self.out_dir).as_posix()
        self.parts.append(
            f'<figure><img src="{html.escape(relative)}" alt="{html.escape(name)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    def render(self, title: str) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(self.parts) + "</body></html>\n"
        )


def _summary(page: _Page, tables: SweepTables) -> None:
    trials = tables.trials
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    counts = trials["status"].value_counts().to_dict()
    page.note(
        f"Sweep folder <code>{html.escape(str(tables.sweep_dir))}</code>, {len(trials)} trials "
        f"({', '.join(f'{html.escape(str(k))}: {v}' for k, v in counts.items())}), "
        f"{len(tables.epochs)} epoch rows. Generated {generated}. Evaluation tables: "
        f"{html.escape(tables.evaluation_note)}."
    )
    provenance = {c: ", ".join(map(str, trials[c].dropna().unique())) for c in PROVENANCE_COLUMNS if c in trials}
    if provenance:
        page.table(pd.DataFrame({"value": provenance}).rename_axis("setting"))
    page.heading("The guarantee")
    page.note(html.escape(GUARANTEE_TEXT))
    if names.GUARANTEE in trials:
        page.table(trials[["trial", names.GUARANTEE]], index=False)
    if names.EPSILON_PATIENT in trials and trials[names.EPSILON_PATIENT].notna().any():
        page.note(
            f"The epsilon above protects one image. For a patient it is larger: <code>{names.EPSILON_PATIENT}"
            f"</code> is the guarantee for the training split's patient with the most images (k = <code>"
            f"{names.PATIENT_IMAGES}</code>; <code>{names.EPSILON_PATIENT_P99}</code> for the 99th percentile), "
            "computed tightly for k images sharing each step's noise (privacy-loss distribution of the "
            "Binomial(k, q) mixture). Images per patient are treated as public metadata, like N."
        )
        shown = [
            c
            for c in (
                "trial",
                names.EPSILON,
                names.EPSILON_PATIENT,
                names.PATIENT_IMAGES,
                names.EPSILON_PATIENT_P99,
                names.PATIENT_IMAGES_P99,
            )
            if c in trials
        ]
        page.table(trials.loc[trials[names.EPSILON_PATIENT].notna(), shown], index=False)
    _units(page, trials)
    no_guarantee = trials[without_guarantee(trials)]
    if len(no_guarantee):
        page.note(
            f"{len(no_guarantee)} private trial(s) ran with <code>privacy.reproducible_noise</code> (their noise "
            "seed is published, so their epsilon is no guarantee); they are left out of every epsilon bin and "
            "Pareto front: " + ", ".join(html.escape(str(k)) for k in no_guarantee["trial"])
        )
    audit_file = tables.sweep_dir / names.AUDIT_FILE
    if audit_file.is_file():
        audit = pd.read_parquet(audit_file)
        page.heading("Empirical privacy audit")
        page.note(
            "One-run audit (Steinke, Nasr &amp; Jagielski 2023) of the first grid point of each audited cell: "
            "m canaries, each included by a secret fair coin. The lower bound holds with the stated "
            "confidence; a bound above the claimed epsilon refutes the claim, one below it is consistent "
            "with it (a single run cannot show a claim is tight)."
        )
        columns = [
            "trial",
            "kind",
            "m",
            "claimed_epsilon",
            "epsilon_lower_bound",
            "confidence",
            "correct",
            "guesses",
            "violates_claim",
        ]
        page.table(audit[[c for c in columns if c in audit]], index=False)
    unfinished = trials[trials["status"] != FINISHED]
    if len(unfinished):
        page.heading("Failed or unfinished trials")
        page.note("Kept in every table below only where marked; never on a Pareto front, never selected.")
        page.table(unfinished[[c for c in ("trial", "status", "error") if c in unfinished]], index=False)


def _study_unit(page: _Page, tables: SweepTables) -> SweepTables:
    """A sweep with both units: the study's sections below keep the image-level trials (epsilons of different units
    never share a bin); the units view above compares the two."""
    trials = tables.trials
    if "privacy_unit" not in trials or trials["privacy_unit"].nunique() < 2:
        return tables
    image = trials[trials["privacy_unit"] == "image"]
    page.note(
        f"The sections below are the study's views of the {len(image)} image-level trials only (image "
        "epsilon); the patient-level trials appear in the comparison above."
    )
    epochs = tables.epochs[tables.epochs["trial"].isin(image["trial"])] if "trial" in tables.epochs else tables.epochs
    return replace(tables, trials=image.reset_index(drop=True), epochs=epochs.reset_index(drop=True))


def _units(page: _Page, trials: pd.DataFrame) -> None:
    """Image-level vs patient-level training at the same patient-level epsilon (sweeps with both units)."""
    if "privacy_unit" not in trials or trials["privacy_unit"].nunique() < 2:
        return
    view = views.units_at_patient_epsilon(trials)
    page.heading("Image-level vs patient-level training at the same patient-level epsilon")
    page.note(
        "Each private trial binned by its guarantee for one patient: a patient-level trial's epsilon, an "
        f"image-level trial's <code>{names.EPSILON_PATIENT}</code> (its largest training patient). Per cell "
        "and unit, the trial with the best validation AUROC at its selected epoch."
    )
    page.table(view, index=False)


def _binned_auroc(page: _Page, tables: SweepTables) -> None:
    page.heading("On-domain test AUROC by init and epsilon bin (every epoch)")
    page.note(
        "Bins of <em>spent</em> epsilon: (0, 1], (1, 3], (3, 10] and the non-private baseline (inf). Every "
        "epoch's checkpoint counts, binned by the epsilon spent when it was written. Per trial and bin the epoch "
        f"with the best validation macro AUROC (<code>{names.VAL_AUROC_MACRO}</code>) among the epochs in the "
        f"bin is chosen, and its test AUROC (<code>{names.TEST_AUROC_MACRO_AT_EPOCH}</code>) is reported; when "
        "several trials fall in one cell, the one with the best validation AUROC. Test AUROC never selects."
    )
    binned = views.auroc_by_bin(tables.trials, tables.epochs)
    page.table(views.bin_table(binned, names.TEST_AUROC_MACRO_AT_EPOCH))
    page.note("Chosen trial and epoch per cell:")
    page.table(binned, index=False)


def _binned_fairness(page: _Page, tables: SweepTables) -> None:
    page.heading("Test fairness gap by init and epsilon bin (every epoch)")
    attributes = views.per_epoch_fairness_attributes(tables.epochs)
    if not attributes:
        page.note(
            f"The epoch table has no per-epoch fairness gaps (<code>{names.auroc_gap_at_epoch('&lt;attribute&gt;')}"
            "</code>): the trials did not report them (they need <code>evaluation.test_every_epoch: true</code> "
            "and a dpsweep version that reports them)."
        )
        return
    page.note(
        "Subgroup macro-AUROC gap (max - min over the attribute's groups; lower is fairer) on test, of the same "
        "model per cell as the AUROC table above: per trial and bin the epoch with the best validation AUROC among "
        "the epochs whose spent epsilon lies in the bin, per cell the trial with the best such validation AUROC. "
        "The gap never selects."
    )
    binned = views.fairness_gap_by_bin(tables.trials, tables.epochs, attributes)
    for attribute in attributes:
        page.note(f"Attribute <b>{html.escape(attribute)}</b>:")
        page.table(views.bin_table(binned, names.auroc_gap_at_epoch(attribute)))


def _final_models(page: _Page, tables: SweepTables, selection: pd.DataFrame) -> None:
    trials = tables.trials
    page.heading("Final models: the trial reported per cell")
    page.note(
        "The final-model tables use each trial's end-of-training evaluation (the epoch its training selected on "
        f"validation), binned by the epsilon spent by the whole run (<code>{names.EPSILON}</code>). Per cell "
        "(model, training dataset, init, bin) the trial with the best validation AUROC at its selected epoch is shown."
    )
    page.table(selection, index=False)
    page.figure(
        "auroc_vs_epsilon",
        lambda p: plots.auroc_vs_epsilon(trials, save_to=p),
        "Macro test AUROC of every finished trial against its spent epsilon, with 95% bootstrap CIs.",
    )

    page.heading("Cross-dataset generalization")
    page.note("Macro AUROC on the training dataset's own test split (on-domain) and on each external test set.")
    matrix = views.external_auroc_matrix(trials, selection)
    page.table(matrix)
    if not matrix.empty:
        page.figure(
            "cross_dataset",
            lambda p: plots.cross_dataset_heatmap(matrix, save_to=p),
            "Rows: init and training dataset; columns: test dataset; one panel per epsilon bin.",
        )

    page.heading("Subgroup test AUROC")
    page.note("Macro AUROC inside each sex and age group (groups without both classes for a label skip it).")
    page.table(views.subgroup_auroc_table(trials, selection))

    page.heading("Fairness gaps on test")
    page.note(
        "Per attribute: <code>auroc_gap</code> = max - min subgroup macro AUROC; <code>tpr_gap</code>, "
        "<code>fpr_gap</code>, <code>eod</code> (equalized odds: max of the two), <code>aod</code> (their mean), "
        "<code>ppv_gap</code>, <code>spd</code> (positive-prediction rate gap) and <code>accuracy_gap</code> are "
        "per-label gaps at the validation-fitted Youden thresholds, averaged over labels; "
        "<code>auroc_gap_label_mean</code> averages per-label AUROC gaps; <code>worst_group_auroc</code> is the "
        "lowest subgroup macro AUROC. Definitions: <code>trainables/evaluate/fairness.py</code>."
    )
    fairness = views.fairness_table(trials, selection)
    for attribute in dict.fromkeys(fairness.columns.get_level_values("attribute")):
        page.note(f"Attribute <b>{html.escape(str(attribute))}</b>:")
        page.table(fairness.xs(attribute, axis=1, level="attribute"))
    if fairness.columns.empty:
        page.note("The trial table has no fairness columns.")
    page.figure(
        "fairness_vs_epsilon",
        lambda p: plots.fairness_vs_epsilon(trials, save_to=p),
        "Age subgroup macro-AUROC gap against spent epsilon (lower is fairer).",
    )

    page.heading("Paired bootstrap comparison of inits")
    if tables.evaluation is None or tables.evaluation.bootstrap.empty:
        page.note(html.escape(tables.evaluation_note) + ".")
        return
    page.note(
        "For each cell pair (same training dataset and bin, two inits) and test set: <code>p_1_better</code> is "
        "the share of paired bootstrap replicates (same resampled test images for both models) in which init 1's "
        'macro AUROC is not higher than init 2\'s: a one-sided p-value for "init 1 is better"; '
        "<code>p_2_better</code> the reverse. A p-value of 0 means no replicate contradicted, i.e. p &lt; "
        "1/<code>n_replicates</code>. Uncorrected for the number of comparisons."
    )
    page.table(_format_p_values(views.paired_p_values(trials, selection, tables.evaluation.bootstrap)), index=False)


def _pareto(page: _Page, tables: SweepTables) -> None:
    page.heading("Pareto front: privacy, utility, fairness")
    objectives = [o for o in pareto.STUDY_OBJECTIVES if o.column in tables.trials]
    names_ = ", ".join(
        f"<code>{o.column}</code> ({'lower' if o.direction == 'min' else 'higher'} is better)" for o in objectives
    )
    page.note(
        f"Objectives: {names_}. A trial is on the front when no finished trial is at least as good in every "
        "objective and better in one; identical trials are all on it. Failed trials and trials missing an "
        "objective have no rank."
    )
    if not objectives:
        page.note("The trial table has none of the objective columns.")
        return
    front = pareto.pareto_front(tables.trials, objectives)
    shown = [
        "trial",
        *(c for c in ("init", "target_epsilon") if c in front),
        "status",
        *(o.column for o in objectives),
        pareto.RANK,
        pareto.ON_FRONT,
    ]
    page.table(front[shown].sort_values([pareto.RANK, "trial"], na_position="last"), index=False)
    page.figure(
        "pareto",
        lambda p: plots.pareto_plot(front, save_to=p),
        "Trials in the (epsilon, test AUROC) plane; filled markers are on the front over all objectives.",
    )


def _trajectories(page: _Page, tables: SweepTables) -> None:
    page.heading("Privacy spent per epoch")
    page.figure(
        "epsilon_trajectories",
        lambda p: plots.epsilon_trajectories(tables.epochs, save_to=p),
        "Epsilon spent after each epoch under the trial's accountant and delta; dotted: bin edges.",
    )


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"


def _format_p_values(p_values: pd.DataFrame) -> pd.DataFrame:
    """p-values as text; 0 (no replicate contradicted) shown as ``< 1/n`` with that row's replicate count."""
    shown = p_values.copy()
    for column in ("p_1_better", "p_2_better"):
        shown[column] = [
            "-" if pd.isna(p) else (f"< {1 / n:.2g}" if p == 0 and n > 0 else f"{p:.3f}")
            for p, n in zip(p_values[column], p_values["n_replicates"], strict=True)
        ]
    return shown


def main(argv: list[str] | None = None) -> None:
    """``python -m analysis.report runs/<sweep> [--out DIR] [--ray-dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report", description="Write a sweep's HTML report (tables and figures)."
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep's folder, e.g. runs/smoke")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    parser.add_argument(
        "--ray-dir",
        type=Path,
        default=None,
        help="Ray experiment folder with the per-trial bootstrap tables (default: <runs>/ray/<sweep>)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        index = write_report(args.sweep_dir, args.out, args.ray_dir)
    except TableError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"report: {index} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
