"""A sweep's report: one static HTML page with the study's tables and figures, readable offline.

``python -m analysis.report runs/<sweep>`` writes ``runs/<sweep>/report/index.html``, every figure as a vector SVG
and a 300-dpi PNG in ``report/figures/`` (the page shows the PNG and links both) and every table as CSV and LaTeX
(booktabs) in ``report/tables/`` (linked under each table). Links are relative, so the folder can be copied or
zipped as a whole.

The report shows only what the trials already release: their final metrics, their per-epoch metrics and, in
"Intersectional subgroups", numbers recomputed from the selected models' stored test-set predictions joined with the
cache manifest's test rows (`analysis.subgroups`); nothing is computed from training data.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import struct
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from analysis import pareto, plots, subgroups, views
from analysis.export import TableFiles, format_number, write_table
from analysis.metric_labels import metric_label
from analysis.tables import (
    FINISHED,
    GUARANTEE_TEXT,
    SweepTables,
    TableError,
    image_unit_only,
    largest_train_fraction,
    load_tables,
    without_guarantee,
    without_proxy_phase,
)
from trainables import names

REPORT_DIR = "report"
INDEX_FILE = "index.html"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
DISPLAY_DPI = 110
"""The page shows each 300-dpi PNG at this many CSS pixels per figure inch (its size before paper-grade output)."""
DEFAULT_GROUP_BY: tuple[str, ...] = ("view",)
"""Manifest columns the "Intersectional subgroups" section also groups by, each alone (besides sex x age bin)."""
MIN_GROUP_IMAGES = 10
"""Groups with fewer test images get no AUROC in the report (counted, with a note); the notebook can lower it."""
TEST_SET = "test set"
"""Column of the intersectional tables naming the test set (the selection's ``dataset`` is the training dataset)."""
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
table.dataframe thead th { background: #f2f2f2; white-space: normal; max-width: 12em; vertical-align: bottom; }
table.notes td:last-child { white-space: normal; text-align: left; min-width: 18em; }
table.dataframe tbody th { background: #fafafa; text-align: left; font-weight: normal; }
.note { color: #555; font-size: 13px; max-width: 950px; }
.wide { overflow-x: auto; max-width: 100%; }
.files { font-size: 12px; color: #555; margin: -0.8em 0 1.2em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
@media print { .wide { overflow: visible; } table.dataframe { font-size: 8px; } }
figcaption { color: #555; font-size: 13px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    ray_experiment_dir: str | Path | None = None,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    data_root: str | Path | None = None,
) -> Path:
    """Render the sweep's report and return the path of its ``index.html``.

    Args:
        sweep_dir: ``runs/<sweep>`` holding ``trials.parquet`` and ``epochs.parquet``.
        out_dir: output folder; default ``<sweep_dir>/report``.
        ray_experiment_dir: where to collect per-trial bootstrap tables from when ``sweep_dir`` lacks them
            (see `analysis.tables.load_tables`; default ``<runs>/ray/<sweep>``).
        group_by: manifest columns for the "Intersectional subgroups" section, each a grouping of its own besides
            sex x age bin (e.g. ``("view", "site")``); a column the manifest lacks is named in a note.
        data_root: where the prepared datasets are (their manifests); default each trial's own ``data_root``.
    """
    tables = load_tables(sweep_dir, ray_experiment_dir)
    out_dir = Path(out_dir) if out_dir is not None else tables.sweep_dir / REPORT_DIR
    return render_report(tables, out_dir, group_by, data_root)


def render_report(
    tables: SweepTables,
    out_dir: str | Path,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    data_root: str | Path | None = None,
) -> Path:
    """Render the report of tables already read (`write_report` reads them from a sweep folder; `dpsweep release`
    passes the released trials' tables) into ``out_dir``; returns the path of its ``index.html``. Arguments as
    `write_report`'s."""
    out_dir = Path(out_dir)
    for folder, suffixes in ((FIGURES_DIR, (".png", ".svg")), (TABLES_DIR, (".csv", ".tex"))):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / folder).iterdir():  # a previous report's files: only this one's are linked
            if stale.is_file() and stale.suffix in suffixes:
                stale.unlink()
    page = _Page(out_dir)
    tables, proxy = without_proxy_phase(tables)
    _summary(page, tables)
    _proxy_phase(page, tables.sweep_dir / PROXY_FILE, proxy)
    tables = _study_unit(page, tables)
    _data_scale(page, tables)
    tables = _study_fraction(page, tables)
    _binned_auroc(page, tables)
    _binned_fairness(page, tables)
    selection = views.final_selection(tables.trials, tables.epochs)
    _final_models(page, tables, selection)
    _over_seeds(page, tables)
    _intersectional(page, tables, selection, group_by, data_root)
    _pareto(page, tables)
    _trajectories(page, tables)
    index = out_dir / INDEX_FILE
    index.write_text(page.render(f"dpsweep report: {tables.name}"), encoding="utf-8")
    return index


class _Page:
    """HTML body parts and the figures and table files they reference."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.table_names: set[str] = set()

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{text}</p>')

    def table(
        self, frame: pd.DataFrame, name: str, index: bool = True, caption: str | None = None, notes: bool = False
    ) -> None:
        """Show ``frame`` and write it as ``tables/<name>.csv`` and ``.tex`` (linked under it); ``notes``: its last
        column is free text that wraps. Header cells may break after ``_`` and ``/`` so wide tables stay narrow."""
        if frame.empty:
            self.note("(empty: no finished trial falls here)")
            return
        files = self._write(frame, name, index, caption)
        classes = "dataframe notes" if notes else "dataframe"
        body = frame.to_html(float_format=_fmt, na_rep="-", index=index, border=0, classes=classes, escape=True)
        body = re.sub(r"(<thead>.*?</thead>)", lambda m: _breakable_headers(m.group(1)), body, flags=re.S)
        self.parts.append(f'<div class="wide">{body}</div>')
        links = (self._link(files.csv, "CSV"), self._link(files.tex, "LaTeX"))
        self.parts.append(f'<p class="files">{html.escape(name)}: {" · ".join(links)}</p>')

    def files(self, frame: pd.DataFrame, name: str, what: str) -> None:
        """Write ``frame`` as ``tables/<name>.csv`` and ``.tex`` without showing it; a line links both."""
        files = self._write(frame, name, index=False)
        links = (self._link(files.csv, "CSV"), self._link(files.tex, "LaTeX"))
        self.parts.append(f'<p class="files">{html.escape(what)} ({html.escape(name)}): {" · ".join(links)}</p>')

    def _write(self, frame: pd.DataFrame, name: str, index: bool, caption: str | None = None) -> TableFiles:
        if name in self.table_names:
            raise ValueError(f"report: table name {name!r} used twice")
        self.table_names.add(name)
        return write_table(frame, self.out_dir / TABLES_DIR, name, index=index, caption=caption)

    def figure(self, name: str, make: Callable[[Path], object], caption: str) -> None:
        """Draw a figure with ``make(path)`` (which writes the SVG and PNG of `analysis.plots.save_figure`), show
        its PNG at `DISPLAY_DPI` and link both files."""
        svg, png = plots.figure_paths(self.out_dir / FIGURES_DIR / name)
        make(png)
        width, height = _png_size(png)
        scale = DISPLAY_DPI / plots.PNG_DPI
        self.parts.append(
            f'<figure><img src="{html.escape(self._relative(png))}" alt="{html.escape(name)}" '
            f'width="{round(width * scale)}" height="{round(height * scale)}">'
            f"<figcaption>{caption} Files: {self._link(svg, 'SVG (vector)')} · "
            f"{self._link(png, f'PNG ({plots.PNG_DPI} dpi)')}.</figcaption></figure>"
        )

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.out_dir).as_posix()

    def _link(self, path: Path, text: str) -> str:
        return f'<a href="{html.escape(self._relative(path))}">{html.escape(text)}</a>'

    def render(self, title: str) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(self.parts) + "</body></html>\n"
        )


def _private_selection(page: _Page, path: Path) -> None:
    """A private selection's cells (``selection.json``, `sweeps.selection`): each released trial's epsilon is its whole
    cell's, tuning included; the single-run epsilon each candidate was calibrated to; the trial count's distribution.
    Nothing where the sweep is not one."""
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    shape = f", shape {summary['shape']:g}" if summary.get("shape") is not None else ""
    page.note(
        "Private selection (Papernot &amp; Steinke 2022): each cell ran a secret number of candidates K "
        f"({html.escape(summary['distribution'])}, E[K] = {summary['mean_trials']:g}{shape}) with hyperparameters "
        "drawn at random, and released only its best by validation. The tuning-inclusive epsilon below covers the "
        "whole cell, the choice included; each candidate alone was calibrated to the single-run epsilon."
    )
    rows = pd.DataFrame(
        [
            {
                "cell": cell["cell"],
                "target_epsilon": cell["target_epsilon"],
                "tuning_inclusive_epsilon": cell["epsilon"],
                "single_run_epsilon": cell["single_run_epsilon"],
                "released": cell["winner"] or "none (no candidate finished)",
            }
            for cell in summary["cells"]
        ]
    )
    page.table(rows, "private_selection", index=False)


PROXY_FILE = "proxy.json"
"""``runs/<sweep>/proxy.json`` of a ``search: proxy`` sweep (`sweeps.proxy.PROXY_FILE`)."""


def _proxy_phase(page: _Page, path: Path, n_proxy: int) -> None:
    """A proxy sweep's phase 1 (``proxy.json``): each candidate's proxy validation AUROC on the public dataset, its rank
    in its cell and whether phase 2 trained it on the private data. Nothing where the sweep is not one."""
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    page.heading("Proxy phase (public data, not accounted)")
    page.note(
        f"Phase 1 ran {n_proxy} proxy trials on the public dataset <code>{html.escape(summary['dataset'])}</code> "
        f"with TAN scaling (expected batch {summary['batch_size']}, sigma scaled by B_sim / B_ref, the private "
        f"reference's steps); they are not private results and appear in no table below. Per cell the top "
        f"{summary['top_k']} by proxy validation AUROC was trained on the private data (phase 2, the trials below)."
    )
    rows = pd.DataFrame(
        [
            {
                "cell": c["cell"],
                "candidate": c["candidate"],
                "proxy_val_auroc": c["proxy_val_auroc"],
                "rank": c["rank"],
                "chosen": c["chosen"],
            }
            for c in summary["candidates"]
        ]
    )
    page.table(rows, "proxy_phase", index=False)


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
        page.table(pd.DataFrame({"value": provenance}).rename_axis("setting"), "provenance")
    page.heading("The guarantee")
    page.note(html.escape(GUARANTEE_TEXT))
    _private_selection(page, tables.sweep_dir / names.SELECTION_FILE)
    if names.GUARANTEE in trials:
        page.table(trials[["trial", names.GUARANTEE]], "guarantee", index=False)
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
        page.table(trials.loc[trials[names.EPSILON_PATIENT].notna(), shown], "patient_epsilon", index=False)
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
            "m canaries, each included by a secret fair coin. The audits of one <code>dpsweep audit</code> are one "
            "family: each lower bound holds at the stated (Bonferroni-corrected) confidence, all of them together at "
            "the command's confidence; a claim is refuted when its Holm-adjusted p-value is below 1 - that "
            "confidence. A bound below the claim is consistent with it (a single run cannot show a claim is tight); "
            "no outcome can give more than the ceiling. White-box canaries are gradient rows clipped after the "
            "engine's per-sample norms, so they never meet the bk engine's per-layer rules; the black-box audit "
            "trains through the trial's own engine and covers them."
        )
        columns = [
            "trial",
            "kind",
            "m",
            "claimed_epsilon",
            "epsilon_lower_bound",
            "confidence",
            "epsilon_ceiling",
            "correct",
            "guesses",
            "claim_p_value",
            "holm_p_value",
            "violates_claim",
        ]
        page.table(audit[[c for c in columns if c in audit]], "privacy_audit", index=False)
    unfinished = trials[trials["status"] != FINISHED]
    if len(unfinished):
        page.heading("Failed or unfinished trials")
        page.note("Kept in every table below only where marked; never on a Pareto front, never selected.")
        page.table(
            unfinished[[c for c in ("trial", "status", "error") if c in unfinished]], "unfinished_trials", index=False
        )


def _study_unit(page: _Page, tables: SweepTables) -> SweepTables:
    """A sweep with both units: the study's sections below keep the image-level trials (epsilons of different units
    never share a bin); the units view above compares the two."""
    image, patient_trials = image_unit_only(tables)
    if patient_trials:
        page.note(
            f"The sections below are the study's views of the {len(image.trials)} image-level trials only (image "
            "epsilon); the patient-level trials appear in the comparison above."
        )
    return image


SCALE_FIGURE = "auroc_vs_n_train"
"""The data-scale figure's file name (``figures/auroc_vs_n_train.{svg,png}``)."""


def _data_scale(page: _Page, tables: SweepTables) -> None:
    """Utility and fairness against N_train per init and epsilon bin (sweeps with several ``data.train_fraction``)."""
    if not views.several_train_fractions(tables.trials):
        return
    view = views.utility_by_train_size(tables.trials, tables.epochs)
    gaps = [m for m in (names.auroc_gap("test", a) for a in ("age", "sex")) if m in view][:1]
    page.heading("Data scale: test AUROC and fairness against the number of training images")
    page.note(
        "Each trial trained on a nested, patient-level subset of the training split (<code>data.train_fraction"
        "</code>: the first share of its patients in a keyed order, so a smaller subset lies inside every larger "
        "one; validation and test are whole). Its q, steps and noise were planned for the subset's own N_train. Per "
        "cell (init, fraction, bin of the epsilon spent by the whole run), the trial with the best validation macro "
        "AUROC at its selected epoch; its final test numbers. Test never chooses."
    )
    page.figure(
        SCALE_FIGURE,
        lambda path: plots.metrics_vs_train_size(view, [names.TEST_AUROC_MACRO, *gaps], save_to=path),
        "Test macro AUROC"
        + (f" (top) and {metric_label(gaps[0])} (bottom)" if gaps else "")
        + " against N_train (log scale), one line per init, one panel per epsilon bin.",
    )
    page.table(view, "utility_by_train_size", index=False)


def _study_fraction(page: _Page, tables: SweepTables) -> SweepTables:
    """A data-scale sweep: the study's sections below keep the trials on the largest training fraction (fractions
    would otherwise compete in one cell); the data-scale section above compares them."""
    kept, largest = largest_train_fraction(tables)
    if largest is not None:
        page.note(
            f"The sections below are the study's views of the {len(kept.trials)} trials on training fraction "
            f"{largest:g}; the other fractions appear in the data-scale section above."
        )
    return kept


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
    page.table(view, "units_at_patient_epsilon", index=False)


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
    page.table(views.bin_table(binned, names.TEST_AUROC_MACRO_AT_EPOCH), "auroc_by_bin")
    page.note("Chosen trial and epoch per cell:")
    page.table(binned, "auroc_by_bin_chosen", index=False)


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
        page.table(views.bin_table(binned, names.auroc_gap_at_epoch(attribute)), f"fairness_gap_by_bin_{attribute}")


def _final_models(page: _Page, tables: SweepTables, selection: pd.DataFrame) -> None:
    trials = tables.trials
    page.heading("Final models: the trial reported per cell")
    page.note(
        "The final-model tables use each trial's end-of-training evaluation (the epoch its training selected on "
        f"validation), binned by the epsilon spent by the whole run (<code>{names.EPSILON}</code>). Per cell "
        "(model, training dataset, init, bin) the trial with the best validation AUROC at its selected epoch is shown."
    )
    page.table(selection, "final_selection", index=False)
    page.figure(
        "auroc_vs_epsilon",
        lambda p: plots.auroc_vs_epsilon(trials, save_to=p),
        "Macro test AUROC of every finished trial against its spent epsilon, with 95% bootstrap CIs.",
    )

    page.heading("Cross-dataset generalization")
    page.note("Macro AUROC on the training dataset's own test split (on-domain) and on each external test set.")
    matrix = views.external_auroc_matrix(trials, selection)
    page.table(matrix, "cross_dataset_auroc")
    if not matrix.empty:
        page.figure(
            "cross_dataset",
            lambda p: plots.cross_dataset_heatmap(matrix, save_to=p),
            "Rows: init and training dataset; columns: test dataset; one panel per epsilon bin.",
        )

    page.heading("Subgroup test AUROC")
    page.note("Macro AUROC inside each sex and age group (groups without both classes for a label skip it).")
    page.table(views.subgroup_auroc_table(trials, selection), "subgroup_auroc")

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
        page.table(fairness.xs(attribute, axis=1, level="attribute"), f"fairness_{attribute}")
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
    if views.several_seeds(trials):  # compared seed by seed: never the best seed of one init against another's
        page.note(
            "With several seeds each seed's models are compared (the trial of each cell chosen within the seed, "
            "<code>seed</code> a cell column); the p-values are not pooled over seeds."
        )
        selection = views.final_selection(trials, tables.epochs, by=(*views.DEFAULT_BY, views.SEED))
    page.table(
        _format_p_values(views.paired_p_values(trials, selection, tables.evaluation.bootstrap)),
        "paired_bootstrap",
        index=False,
    )


def _over_seeds(page: _Page, tables: SweepTables) -> None:
    """Mean, sd and 95% interval over seeds of each test metric, per cell (`analysis.views.seed_summary`)."""
    trials = tables.trials
    page.heading("Over seeds: mean, sd and 95% interval per cell")
    if not views.several_seeds(trials):
        page.note(
            "Every cell (model, training dataset, init, privacy unit, target epsilon) has finished trials of one "
            "seed only: there is nothing to aggregate (a grid with several <code>training.seed</code> values gets "
            "mean, sd and interval over seeds here)."
        )
        return
    page.note(
        "Per cell (model, training dataset, init, privacy unit, <em>target</em> epsilon) and seed, the learning rate "
        "and clip norm are chosen on validation as above (the trial with the best validation macro AUROC at its "
        "selected epoch; test never chooses); each test metric of those trials is then summarised over the seeds: "
        "<code>n</code> seeds with a defined value, their <code>mean</code>, the sample standard deviation "
        "<code>sd</code> (ddof = 1) and the 95% Student-t interval <code>mean ± t(0.975, n − 1) · sd / √n</code> "
        "(<code>ci_low</code>, <code>ci_high</code>); '-' where one seed leaves sd and interval undefined. The seed "
        "fixes what is not the DP mechanism (model initialisation, non-private shuffling); every trial draws fresh "
        "secret noise and batches, so the spread includes their variation."
    )
    summary = views.seed_summary(trials, tables.epochs)
    cells = views.seed_cell_columns(trials)
    shown = [*cells, views.N_SEEDS, views.MEAN, views.SD, views.CI_LOW, views.CI_HIGH]
    for metric in dict.fromkeys(summary[views.METRIC]):
        page.note(f"<b>{html.escape(metric_label(metric))}</b> (<code>{html.escape(metric)}</code>):")
        rows = summary[summary[views.METRIC] == metric]
        page.table(rows[shown], f"seeds_{_slug(metric)}", index=False)
    page.files(summary, "seeds", "Every metric in one table")
    page.note("The trial chosen per cell and seed:")
    page.table(views.seed_selection(trials, tables.epochs), "seed_selection", index=False)


def _pareto(page: _Page, tables: SweepTables) -> None:
    page.heading("Pareto front: privacy, utility, fairness")
    objectives = [o for o in pareto.STUDY_OBJECTIVES if o.column in tables.trials]
    names_ = ", ".join(
        f"<code>{o.column}</code> ({'lower' if o.direction == 'min' else 'higher'} is better)" for o in objectives
    )
    page.note(
        f"Objectives: {names_}. A trial is on the front when no finished trial is at least as good in every "
        "objective and better in one; identical trials are all on it. Failed trials, trials without a guarantee "
        "and trials missing an objective take no part. The table lists the front only, numbered as in the figure, "
        "with what tells its members apart (init, target epsilon, clip norm, learning rate, seed)."
    )
    if not objectives:
        page.note("The trial table has none of the objective columns.")
        return
    front = pareto.pareto_front(tables.trials, objectives)
    members = pareto.front_table(front, objectives)
    eligible = int(front[pareto.ELIGIBLE].sum())
    page.note(
        f"{len(members)} of {eligible} eligible trial(s) are on the front ({eligible - len(members)} dominated; "
        f"{len(front) - eligible} not eligible)."
    )
    page.table(members, "pareto_front", index=False)
    page.figure(
        "pareto",
        lambda p: plots.pareto_plot(front, save_to=p),
        "Left: trials in the (spent epsilon, test macro AUROC) plane; right: (age AUROC gap, test macro AUROC). "
        "Filled, numbered markers are on the front over all three objectives (numbers as in the table), hollow ones "
        "are dominated; points sharing an epsilon are dodged sideways (<code>analysis.plots.DODGE_DECADES</code>).",
    )


def _intersectional(
    page: _Page, tables: SweepTables, selection: pd.DataFrame, group_by: Sequence[str], data_root: str | Path | None
) -> None:
    page.heading("Intersectional subgroups")
    page.note(
        "Recomputed from the stored per-image test scores of each final model (<code>predictions.parquet</code>) "
        "joined with the cache manifest's test rows (<code>analysis.subgroups.group_metrics</code>): macro AUROC "
        "(mean over the labels with both classes in the group) per sex x age bin (the trial's "
        "<code>age_edges</code>) and per manifest column. Every combination is listed with its image count; a group "
        f"with fewer than {MIN_GROUP_IMAGES} images, or without both classes of any label, has no AUROC and a note "
        "says why. The gap is max - min over the groups other than unknown sex, no age bin or a missing value (as "
        "in the trials' own fairness metrics)."
    )
    predictions = tables.evaluation.predictions if tables.evaluation is not None else None
    if predictions is None:
        page.note(
            "No stored predictions: the trials' final checkpoints hold no <code>predictions.parquet</code> (trials "
            "run before dpsweep stored them), or there are no evaluation tables ("
            + html.escape(tables.evaluation_note)
            + ")."
        )
        return
    cells = [c for c in selection.columns[: list(selection.columns).index("trial")]]
    chosen = selection[[*cells, "trial"]]
    without = sorted(set(chosen["trial"]) - set(predictions["trial"]))
    if without:
        page.note("Selected trials without stored predictions: " + ", ".join(html.escape(t) for t in without) + ".")
    chosen = chosen[chosen["trial"].isin(predictions["trial"])]
    if chosen.empty:
        page.note("No selected trial has stored predictions.")
        return
    stored = predictions[predictions["trial"].isin(chosen["trial"])]
    try:
        manifests = subgroups.load_manifests(tables.trials, sorted(stored["dataset"].unique()), data_root)
    except subgroups.GroupingError as error:
        page.note(html.escape(str(error)))
        return
    groupings = [list(subgroups.INTERSECTIONAL)]
    for column in group_by:
        if any(column not in m.columns for m in manifests.values()):
            page.note(f"Grouping by <code>{html.escape(column)}</code>: not a column of every manifest; left out.")
        else:
            groupings.append([column])
    for by in groupings:
        title = " x ".join(by)
        try:
            metrics = [
                subgroups.group_metrics(
                    rows,
                    manifests,
                    by=by,
                    age_edges=subgroups.trial_age_edges(tables.trials, str(trial)),
                    min_images=MIN_GROUP_IMAGES,
                )
                for trial, rows in stored.groupby("trial", sort=True)
            ]
        except subgroups.GroupingError as error:
            page.note(f"Grouped by <b>{html.escape(title)}</b>: {html.escape(str(error))}")
            continue
        groups = pd.concat(metrics, ignore_index=True)
        renamed = {"dataset": TEST_SET}  # the selection's own "dataset" is the training dataset
        table = chosen.merge(groups.rename(columns=renamed), on="trial", how="inner")
        gaps = chosen.merge(subgroups.group_gaps(groups, by).rename(columns=renamed), on="trial", how="inner")
        slug = "_".join(by)
        page.note(f"Grouped by <b>{html.escape(title)}</b>: gap per final model and test set.")
        page.table(gaps, f"groups_{slug}_gaps", index=False, notes=True)
        shown = [
            *cells,
            "trial",
            TEST_SET,
            *by,
            subgroups.N_IMAGES,
            subgroups.LABELS_DEFINED,
            subgroups.AUROC_MACRO,
            subgroups.IN_GAP,
            subgroups.NOTE,
        ]
        page.note(f"Grouped by <b>{html.escape(title)}</b>: every group.")
        page.table(table[shown], f"groups_{slug}", index=False, notes=True)


def _trajectories(page: _Page, tables: SweepTables) -> None:
    page.heading("Privacy spent per epoch")
    page.figure(
        "epsilon_trajectories",
        lambda p: plots.epsilon_trajectories(tables.epochs, save_to=p),
        "Epsilon spent after each epoch under the trial's accountant and delta; dotted: bin edges.",
    )


def _slug(metric: str) -> str:
    """A metric key as part of a file name: ``test/fairness/auroc_gap/sex`` -> ``test_fairness_auroc_gap_sex``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", metric).strip("_")


def _fmt(value: float) -> str:
    return format_number(value)


def _breakable_headers(thead: str) -> str:
    """Header text may wrap after ``_`` and ``/`` (``<wbr>``): long metric names then break at their parts."""
    return re.sub(r">([^<>]+)<", lambda m: ">" + re.sub(r"([_/])", r"\1<wbr>", m.group(1)) + "<", thead)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


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
    """``python -m analysis.report runs/<sweep> [--out DIR] [--ray-dir DIR] [--group-by COLUMN] [--data-root DIR]``."""
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
    parser.add_argument(
        "--group-by",
        action="append",
        default=None,
        metavar="COLUMN",
        help="a manifest column to group the intersectional section by (besides sex x age bin); repeat for several "
        f"(default: {', '.join(DEFAULT_GROUP_BY)})",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder of the prepared datasets, for their manifests (default: the trials' data_root)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    group_by = tuple(args.group_by) if args.group_by else DEFAULT_GROUP_BY
    try:
        index = write_report(args.sweep_dir, args.out, args.ray_dir, group_by=group_by, data_root=args.data_root)
    except TableError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"report: {index} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
