"""Figures: each returns a Figure, saves a PNG, places epsilon = inf at its own slot, survives empty input."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from analysis import pareto, plots, views
from analysis.tables import load_tables
from tests.analysis.fixtures import make_sweep
from trainables import names

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return load_tables(make_sweep(tmp_path_factory.mktemp("runs")))


def figures(tables):
    selection = views.final_selection(tables.trials, tables.epochs)
    return {
        "auroc": lambda path: plots.auroc_vs_epsilon(tables.trials, save_to=path),
        "fairness": lambda path: plots.fairness_vs_epsilon(tables.trials, save_to=path),
        "pareto": lambda path: plots.pareto_plot(pareto.pareto_front(tables.trials), save_to=path),
        "heatmap": lambda path: plots.cross_dataset_heatmap(
            views.external_auroc_matrix(tables.trials, selection), save_to=path
        ),
        "trajectories": lambda path: plots.epsilon_trajectories(tables.epochs, save_to=path),
    }


def test_every_figure_returns_a_figure_and_saves_a_png(tables, tmp_path):
    for name, make in figures(tables).items():
        path = tmp_path / "sub" / f"{name}.png"
        figure = make(path)
        assert isinstance(figure, Figure), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert path.stat().st_size > 5000, name


def test_infinite_epsilon_has_its_own_slot(tables):
    figure = plots.auroc_vs_epsilon(tables.trials)
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "inf"
    finished = tables.trials[tables.trials["status"] == "TERMINATED"]
    largest = finished[names.EPSILON].replace(np.inf, np.nan).max()
    assert ax.get_xticks()[-1] == pytest.approx(largest * plots.INF_SLOT)
    points = np.concatenate(
        [
            c.get_offsets()
            for c in ax.collections
            if c.get_offsets().shape[1] == 2 and len(c.get_offsets()) and not hasattr(c, "get_segments")
        ]
    )
    assert len(points) == len(finished)  # one marker per finished trial, the failed one left out
    assert np.isclose(points[:, 0], largest * plots.INF_SLOT).sum() == 2  # the two non-private baselines
    assert ax.get_xscale() == "log"


def test_pareto_plot_fills_exactly_the_front(tables):
    front = pareto.pareto_front(tables.trials)
    ax = plots.pareto_plot(front).axes[0]
    filled = sum(len(c.get_offsets()) for c in ax.collections if "on the front" in c.get_label())
    hollow = sum(len(c.get_offsets()) for c in ax.collections if "dominated" in c.get_label())
    assert filled == int(front[pareto.ON_FRONT].sum())
    assert filled + hollow == int(front[pareto.ELIGIBLE].sum())


def test_trajectories_skip_non_private_trials(tables):
    ax = plots.epsilon_trajectories(tables.epochs).axes[0]
    assert len(ax.get_lines()) - len([line for line in ax.get_lines() if line.get_linestyle() == ":"]) >= 1
    plotted = {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert plotted == {
        "random-eps1",
        "random-eps1-lr",
        "random-eps3",
        "random-eps20",
        "domain-eps1",
        "domain-eps3",
        "domain-eps8",
    }
    assert "2 non-private" in ax.get_title()


def test_empty_inputs_draw_a_message_instead_of_failing(tables, tmp_path):
    failed = tables.trials.assign(status="ERROR")
    selection = views.final_selection(failed, tables.epochs)
    for figure in (
        plots.auroc_vs_epsilon(failed),
        plots.fairness_vs_epsilon(failed),
        plots.pareto_plot(pareto.pareto_front(failed)),
        plots.cross_dataset_heatmap(views.external_auroc_matrix(failed, selection)),
        plots.epsilon_trajectories(tables.epochs.iloc[:0]),
    ):
        assert isinstance(figure, Figure)
        assert any(text.get_text().startswith("no ") for text in figure.axes[0].texts)
    plots.save_png(plots.auroc_vs_epsilon(failed), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_columns_are_named(tables):
    with pytest.raises(KeyError, match="lacks column 'test/fairness/eod/age'"):
        plots.fairness_vs_epsilon(tables.trials.drop(columns="test/fairness/eod/age"), metric="test/fairness/eod/age")
