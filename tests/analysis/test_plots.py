"""Figures: each returns a Figure, saves a PNG, places epsilon = inf at its own slot, survives empty input."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

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


def test_every_figure_returns_a_figure_and_saves_svg_and_300_dpi_png(tables, tmp_path):
    for name, make in figures(tables).items():
        path = tmp_path / "sub" / f"{name}.png"
        figure = make(path)
        assert isinstance(figure, Figure), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert path.stat().st_size > 5000, name
        with Image.open(path) as image:
            assert image.info["dpi"] == pytest.approx((300, 300), abs=0.1), name
            width_inches = image.size[0] / 300
        assert 3 < width_inches < 20, name  # the figure's size in inches, at 300 dpi
        svg = path.with_suffix(".svg").read_text(encoding="utf-8")
        assert svg.startswith("<?xml") and "<svg" in svg and "<image" not in svg, name  # vector, no raster inside


def test_axes_carry_human_labels_not_metric_keys(tables):
    ax = plots.auroc_vs_epsilon(tables.trials).axes[0]
    assert ax.get_xlabel() == "ε spent (log scale)"
    assert ax.get_ylabel() == "Test macro AUROC (95% bootstrap CI)"
    assert ax.get_legend().get_title().get_text() == "Init"
    ax = plots.fairness_vs_epsilon(tables.trials, metric=names.auroc_gap("test", "sex")).axes[0]
    assert ax.get_ylabel() == "AUROC gap (sex)"
    for figure in (plots.pareto_plot(pareto.pareto_front(tables.trials)), plots.epsilon_trajectories(tables.epochs)):
        texts = [a.get_xlabel() for a in figure.axes] + [a.get_ylabel() for a in figure.axes]
        assert not [t for t in texts if "/" in t], texts  # no raw key such as privacy/epsilon


def marker_points(ax) -> np.ndarray:
    return np.concatenate(
        [
            c.get_offsets()
            for c in ax.collections
            if c.get_offsets().shape[1] == 2 and len(c.get_offsets()) and not hasattr(c, "get_segments")
        ]
    )


def test_infinite_epsilon_has_its_own_slot_and_shared_epsilons_are_dodged(tables):
    figure = plots.auroc_vs_epsilon(tables.trials)
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "non-private"
    finished = tables.trials[tables.trials["status"] == "TERMINATED"]
    largest = finished[names.EPSILON].replace(np.inf, np.nan).max()
    slot = largest * plots.INF_SLOT
    assert ax.get_xticks()[-1] == pytest.approx(slot)
    points = marker_points(ax)
    assert len(points) == len(finished)  # one marker per finished trial, the failed one left out
    # The two non-private baselines (domain, random: the groups in sorted order) sit half a dodge either side
    # of the slot, and so do domain-eps1 and random-eps1 at their shared epsilon 0.99.
    half = 10 ** (plots.DODGE_DECADES / 2)
    for epsilon in (slot, 0.99):
        for x in (epsilon / half, epsilon * half):
            assert np.isclose(points[:, 0], x, rtol=1e-9).sum() == 1, (epsilon, x)
        assert not np.isclose(points[:, 0], epsilon, rtol=1e-9).any(), epsilon
    assert len(np.unique(points[:, 0].round(9))) == len(points)  # no two markers at one x
    assert ax.get_xscale() == "log"
    styles = {line.get_gid(): line.get_linestyle() for line in ax.get_lines() if line.get_gid()}
    assert styles == {"line domain": "-", "line random": "--"}  # the two inits' lines are told apart by style


def test_dodge_factors_by_hand():
    factors = plots.dodge_factors(
        np.array([1.0, 2.0, 1.0, 1.0, 2.0]), [(1, "b"), (0, "x"), (0, "a"), (1, "a"), (1, "y")]
    )
    step = 10**plots.DODGE_DECADES
    # At 1.0: (0, "a") first, then (1, "a"), then (1, "b"); at 2.0: (0, "x"), then (1, "y").
    assert factors == pytest.approx([step, step**-0.5, 1 / step, 1.0, step**0.5])


def test_tick_labels_of_close_epsilons_do_not_collide(tables):
    ax = plots.auroc_vs_epsilon(tables.trials).axes[0]
    ticks = [t for t in ax.get_xticks() if t < ax.get_xticks()[-1]]
    assert np.diff(np.log10(ticks)).min() >= plots.TICK_SPACING_DECADES  # 0.95 and 0.99 would overlap: one shown


def test_pareto_plot_numbers_the_front_as_the_front_table(tables):
    front = pareto.pareto_front(tables.trials)
    figure = plots.pareto_plot(front)
    table = pareto.front_table(front)
    assert len(figure.axes) == 2  # (epsilon, AUROC) and (age gap, AUROC)
    for ax in figure.axes:
        assert sorted(int(t.get_text()) for t in ax.texts) == table[pareto.FRONT_ID].tolist()
    assert figure.axes[1].get_xlabel() == "AUROC gap (age) (lower is fairer)"


def test_pareto_plot_fills_exactly_the_front(tables):
    front = pareto.pareto_front(tables.trials)
    ax = plots.pareto_plot(front).axes[0]
    filled = sum(len(c.get_offsets()) for c in ax.collections if "on the front" in c.get_label())
    hollow = sum(len(c.get_offsets()) for c in ax.collections if "dominated" in c.get_label())
    assert filled == int(front[pareto.ON_FRONT].sum())
    assert filled + hollow == int(front[pareto.ELIGIBLE].sum())


def test_trajectories_of_two_inits_are_side_by_side(tables):
    ax = plots.epsilon_trajectories(tables.epochs).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    domain, random = lines["domain-eps1"], lines["random-eps1"]
    assert np.array_equal(domain.get_ydata(), random.get_ydata())  # identical ledgers
    assert random.get_xdata() - domain.get_xdata() == pytest.approx([plots.EPOCH_DODGE] * 3)
    assert domain.get_linestyle() != random.get_linestyle() and domain.get_marker() != random.get_marker()


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
