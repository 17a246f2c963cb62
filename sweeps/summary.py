"""What `dpsweep sweep` and `dpsweep table` print at the end: the results table, what the epsilons mean, where the
outputs are, the privacy cost of the search (`sweeps.tuning_cost`) and any budget warning."""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import views
from analysis.tables import GUARANTEE_TEXT, without_guarantee
from sweeps.plan import trial_key
from sweeps.spec import SweepSpec
from sweeps.tuning_cost import adaptive_tuning_bounds, patient_level_sweep_epsilon, tuning_costs
from trainables import names as N

SUMMARY_COLUMNS = {
    "trial": "trial",
    "status": "status",
    "target_epsilon": "target",
    N.EPSILON: "spent",
    N.EPSILON_REPLACE_ONE: "repl",
    "noise_multiplier": "sigma",
    N.VAL_SELECTED_AUROC_MACRO: "val",
    N.TEST_AUROC_MACRO: "test",
    N.auroc_gap("test", "age"): "age gap",
    N.auroc_gap("test", "sex"): "sex gap",
    N.EPSILON_PATIENT: "pat eps",
    N.PATIENT_IMAGES: "k",
}
"""The console table's columns (trials.parquet column -> header); epsilons at the trial's delta (``spent``: add/remove
one record with N public, the guarantee; ``repl``: the same run read as replace-one, `adjacency_line`), AUROCs
macro."""
SUMMARY_WIDTH = 100
"""Console lines stay within this many characters: the text wraps at it, and the results table (its key column is as
wide as the longest trial key) fits for keys up to 37 characters when every trial finished (a status column adds
11)."""
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
        for column in (N.EPSILON, N.EPSILON_REPLACE_ONE, N.EPSILON_PATIENT):
            if column in table:
                table[column] = [
                    f"{v:.3f}" if ok and v == v else "-" for v, ok in zip(table[column], finite, strict=True)
                ]
    if N.PATIENT_IMAGES in table:  # a count; non-private trials have none
        table[N.PATIENT_IMAGES] = [f"{v:.0f}" if v == v else "-" for v in table[N.PATIENT_IMAGES]]
    for column in table.select_dtypes("float").columns:  # as text: no sign column, so the table stays narrow
        table[column] = [f"{v:.3f}" if v == v else "-" for v in table[column]]
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


SEED_COLUMNS = {
    N.TEST_AUROC_MACRO: "test AUROC",
    N.auroc_gap("test", "age"): "age gap",
    N.auroc_gap("test", "sex"): "sex gap",
}
"""The seed table's metrics (trials.parquet column -> header), left to right; the last ones are left out when the
table would be wider than `SUMMARY_WIDTH` (the report has every metric)."""
SEED_CELL_HEADERS = {"model": "model", "dataset": "dataset", "init": "init", "privacy_unit": "unit"}
"""Cell columns: ``init`` and ``target`` always shown, the others where cells differ in them."""


def seed_table(trials: pd.DataFrame) -> str | None:
    """Per cell (model, dataset, init, privacy unit, target epsilon; `analysis.views.SEED_CELL`), each headline test
    metric over seeds as ``mean +/- sd (n)`` and the 95% Student-t interval of the test AUROC's mean, the learning
    rate and clip norm chosen within each seed on validation (`analysis.views.seed_summary`); None when no cell has
    finished trials of more than one seed. One seed leaves sd and interval ``-``. Model, dataset and privacy unit are
    columns only where cells differ in them (init and target always are); metric columns are left out from the right
    (and named below the table) until it fits `SUMMARY_WIDTH`; the cell columns, the test AUROC and its interval
    always stay."""
    if not views.several_seeds(trials):
        return None
    metrics = [m for m in SEED_COLUMNS if m in trials.columns]
    cells = views.seed_cell_columns(trials)
    rows = []
    for key, group in views.seed_summary(trials, metrics=metrics).groupby(cells, sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(cells, key, strict=True))
        if "target_epsilon" in row:
            target = float(row["target_epsilon"])
            row["target"] = f"{target:g}" if math.isfinite(target) else NON_PRIVATE
        for spread in group.itertuples(index=False):
            metric, mean, sd, n = (getattr(spread, c) for c in (views.METRIC, views.MEAN, views.SD, views.N_SEEDS))
            row[SEED_COLUMNS[metric]] = f"{_three(mean)} +/- {_three(sd)} ({n})"
            if metric == N.TEST_AUROC_MACRO:
                low, high = spread.ci_low, spread.ci_high
                row["95% interval"] = "-" if low != low else f"[{low:.3f}, {high:.3f}]"
        rows.append(row)
    table = pd.DataFrame(rows)
    shown = [c for c in cells if c == "init" or (c != "target_epsilon" and table[c].nunique(dropna=False) > 1)]
    table = table[shown + [c for c in table.columns if c not in cells]].rename(columns=SEED_CELL_HEADERS)
    text = table.to_string(index=False)
    left_out: list[str] = []
    while max(map(len, text.splitlines())) > SUMMARY_WIDTH and len(table.columns) > len(shown) + 3:
        left_out.insert(0, table.columns[-1])
        table = table.iloc[:, :-1]
        text = table.to_string(index=False)
    intro = (
        "over seeds, per cell: mean +/- sd (n seeds) of the model chosen in each seed on validation (learning rate, "
        "clip norm); the test AUROC mean's 95% t-interval"
    )
    lines = [textwrap.fill(intro, SUMMARY_WIDTH), text]
    if left_out:
        lines.append(f"(left out for width: {', '.join(left_out)}; the report has every metric)")
    return "\n".join(lines)


def _three(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def adjacency_line(trials: pd.DataFrame) -> str:
    """The adjacency the epsilons use, and the replace-one reading of the private trials per target: the largest
    `names.EPSILON_REPLACE_ONE` of the trials with a guarantee at each target epsilon (the ``repl`` column)."""
    line = (
        "Adjacency: add/remove one record (an image; a patient with privacy_unit patient), the number of records N "
        "treated as public."
    )
    if N.EPSILON_REPLACE_ONE not in trials or "target_epsilon" not in trials:
        return line
    targets = pd.to_numeric(trials["target_epsilon"], errors="coerce")
    guaranteed = trials[targets.map(math.isfinite) & ~without_guarantee(trials)]
    replaced = guaranteed.groupby("target_epsilon")[N.EPSILON_REPLACE_ONE].max().dropna()
    if replaced.empty:
        return line
    readings = ", ".join(f"{epsilon:.3f} at target {target:g}" for target, epsilon in replaced.items())
    return (
        f"{line} A public N fixes the size, which strictly means replace-one adjacency: read so (dp-accounting PLD, "
        f"column repl), the same runs spend epsilon {readings}."
    )


def _private_phase(trials: pd.DataFrame) -> pd.DataFrame:
    from sweeps.proxy import private_phase

    return private_phase(trials)


def summary_text(trials: pd.DataFrame, sweep_dir: Path, tracking_uri: str, spec: SweepSpec | None = None) -> str:
    """The results table, where the outputs are, the privacy cost of the search and any budget warning (with the
    sweep's ``spec``, an Optuna sweep's adaptive tuning bounds too). Lines other than the tables' rows wrap at
    `SUMMARY_WIDTH`."""
    if spec is not None and spec.search == "grid":  # grid order (the sweep file's), not Ray's completion order
        order = {trial_key(spec, point): i for i, point in enumerate(spec.grid())}
        trials = trials.sort_values("trial", key=lambda keys: keys.map(order).fillna(len(order)), kind="stable")
    seeds = seed_table(trials)
    lines = [
        results_table(trials),
        *(["", seeds] if seeds else []),
        "",
        textwrap.fill(GUARANTEE_TEXT, SUMMARY_WIDTH),
        textwrap.fill(adjacency_line(trials), SUMMARY_WIDTH),
        f"Each trial's guarantee in full: the `{N.GUARANTEE}` column of trials.parquet and MLflow param.",
        "",
        f"tables: {sweep_dir / N.TRIALS_FILE}, {sweep_dir / N.EPOCHS_FILE}",
        f"MLflow: {tracking_uri}\n  open the UI with `make ui` (http://127.0.0.1:5000)",
    ]
    wrap = functools.partial(
        textwrap.fill, width=SUMMARY_WIDTH, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )
    if spec is not None and (spec.search == "private_selection" or (spec.proxy is not None and spec.proxy.top_k > 1)):
        from sweeps.selection import summary_lines

        # The cost is each cell's selection bound, not a composition of the released trials.
        lines.extend(wrap(line, subsequent_indent="    ") for line in summary_lines(sweep_dir))
        costs = {}
    else:
        costs = tuning_costs(_private_phase(trials))  # a proxy sweep's phase 1 trained on public data
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
                f"privacy of releasing the best trial{where} after the whole sweep (not the per-trial epsilon; every "
                f"trial that started, at its planned steps, label-count releases included): {cost.sentence}"
            )
        )
    for dataset, epsilon in patient_level_sweep_epsilon(_private_phase(trials)).items():
        lines.append(
            wrap(
                f"privacy for one patient{f' on {dataset}' if len(costs) > 1 else ''} of releasing every private "
                f"trial of the sweep, both units composed at the patient level (image-level trials as groups of "
                f"their largest patient's images; PLD, planned steps, label-count releases included): "
                f"epsilon={epsilon:.3g}"
            )
        )
    if N.EPSILON in trials:
        private = trials[trials["target_epsilon"].map(math.isfinite).astype(bool)]  # a bool mask even with no rows
        over = private[private[N.EPSILON] > private["target_epsilon"]]
        if len(over):
            lines.append(f"WARNING: {len(over)} trials spent more epsilon than their target")
    return "\n".join(lines)
