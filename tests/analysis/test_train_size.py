"""The data-scale view and figure (``data.train_fraction``): per init, training fraction and epsilon bin the trial
chosen on validation with its N_train and test numbers; the report's AUROC-against-N figure, and the study's other
sections kept to the largest fraction."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import plots, views
from analysis.report import SCALE_FIGURE, write_report
from tests.analysis.fixtures import make_sweep
from trainables import names

AGE_GAP = names.auroc_gap("test", "age")


def row(trial, init, fraction, n_train, epsilon, val, test, gap=0.1, status="TERMINATED"):
    return {
        "trial": trial,
        "status": status,
        "model": "test_convnext",
        "dataset": "synthetic-a",
        "init": init,
        "train_fraction": fraction,
        "n_train": n_train,
        names.EPSILON: epsilon,
        names.VAL_SELECTED_AUROC_MACRO: val,
        names.TEST_AUROC_MACRO: test,
        AGE_GAP: gap,
    }


TRIALS = pd.DataFrame(
    [
        row("r-q", "random", 0.25, 100, 1.9, 0.60, 0.58),
        row("r-q-lr", "random", 0.25, 100, 1.95, 0.65, 0.55),  # better on validation: chosen, though worse on test
        row("r-h", "random", 0.5, 210, 1.9, 0.66, 0.62),
        row("r-w", "random", None, 400, 1.9, 0.70, 0.68),  # whole split: no fraction in its params
        row("r-w-inf", "random", None, 400, math.inf, 0.80, 0.79),
        row("d-q", "domain", 0.25, 100, 1.9, 0.72, 0.70, gap=0.2),
        row("d-w", "domain", 1.0, 400, 1.9, 0.78, 0.77, gap=0.05),
        row("d-h", "domain", 0.5, 210, 1.9, 0.99, 0.99, status="ERROR"),  # unfinished: takes no part
    ]
)


def test_the_view_chooses_on_validation_per_init_fraction_and_bin():
    view = views.utility_by_train_size(TRIALS, None)
    cells = {(r.init, r.train_fraction, r.bin): r for r in view.itertuples(index=False)}
    assert sorted(cells) == sorted(
        [
            ("domain", 0.25, "(1, 3]"),
            ("domain", 1.0, "(1, 3]"),
            ("random", 0.25, "(1, 3]"),
            ("random", 0.5, "(1, 3]"),
            ("random", 1.0, "(1, 3]"),
            ("random", 1.0, "inf"),
        ]
    )
    chosen = cells[("random", 0.25, "(1, 3]")]
    assert (chosen.trial, chosen.candidate_trials, chosen.n_train) == ("r-q-lr", 2, 100)
    assert view.set_index("trial").loc["r-q-lr", names.TEST_AUROC_MACRO] == 0.55
    assert view.set_index("trial").loc["d-q", AGE_GAP] == 0.2
    assert views.several_train_fractions(TRIALS) and not views.several_train_fractions(
        TRIALS.drop(columns="train_fraction")
    )


def test_n_train_as_mlflow_text_is_read_as_a_number():
    text = TRIALS.assign(n_train=TRIALS["n_train"].astype(str), train_fraction=TRIALS["train_fraction"].astype(str))
    assert (
        views.utility_by_train_size(text, None)["n_train"].tolist()
        == views.utility_by_train_size(TRIALS, None)["n_train"].tolist()
    )


def test_the_figure_has_a_panel_per_bin_and_a_row_per_metric_with_a_line_per_init(tmp_path):
    view = views.utility_by_train_size(TRIALS, None)
    figure = plots.metrics_vs_train_size(view, [names.TEST_AUROC_MACRO, AGE_GAP], save_to=tmp_path / "scale")
    axes = figure.axes
    assert len(axes) == 2 * 2  # bins (1, 3] and inf, two metrics
    lines = {line.get_gid(): line for ax in axes for line in ax.get_lines()}
    random = lines[f"line random (1, 3] {names.TEST_AUROC_MACRO}"]
    assert random.get_xdata().tolist() == [100, 210, 400] and random.get_ydata().tolist() == [0.55, 0.62, 0.68]
    assert lines[f"line domain (1, 3] {AGE_GAP}"].get_xdata().tolist() == [100, 400]
    assert lines[f"line domain (1, 3] {AGE_GAP}"].get_ydata().tolist() == [0.2, 0.05]
    assert (tmp_path / "scale.svg").is_file() and (tmp_path / "scale.png").is_file()


@pytest.fixture(scope="module")
def scale_report(tmp_path_factory):
    """The analysis fixture's sweep, its random-init trials at epsilon 1 put on subsets (0.25 and 0.5)."""
    sweep_dir = make_sweep(tmp_path_factory.mktemp("runs"))
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    fraction = trials["trial"].map({"random-eps1": 0.5, "random-eps1-lr": 0.25})
    trials["train_fraction"] = fraction
    trials["n_train"] = (400 * fraction.fillna(1.0)).astype(int)
    trials.to_parquet(sweep_dir / "trials.parquet", index=False)
    return sweep_dir, write_report(sweep_dir).read_text(encoding="utf-8")


def test_the_report_plots_auroc_against_n_and_keeps_the_study_to_the_largest_fraction(scale_report):
    sweep_dir, page = scale_report
    assert "Data scale: test AUROC and fairness against the number of training images" in page
    assert (
        f"figures/{SCALE_FIGURE}.png" in page and (sweep_dir / "report" / "figures" / f"{SCALE_FIGURE}.svg").is_file()
    )
    table = pd.read_csv(sweep_dir / "report" / "tables" / "utility_by_train_size.csv")
    assert sorted(table.loc[table["init"] == "random", "n_train"].unique()) == [100, 200, 400]
    assert "the study's views of the 7 trials on training fraction 1" in page


def test_a_report_without_fractions_has_no_data_scale_section(tmp_path):
    page = write_report(make_sweep(tmp_path)).read_text(encoding="utf-8")
    assert "Data scale" not in page and "training fraction" not in page
