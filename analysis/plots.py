"""The study's figures with matplotlib: each function returns a `matplotlib.figure.Figure` and, given
``save_to``, also writes it as a vector SVG and a 300-dpi PNG (`save_figure`).

Figures are built without pyplot (``Figure()`` + the Agg canvas), so nothing here touches matplotlib's
global backend or state: they render headless on a server and display inline in a notebook. Axis labels are
the human labels of `analysis.metric_labels` ("Test macro AUROC", "ε spent"), never raw metric keys.

Epsilon axes are logarithmic. The non-private baseline (epsilon = inf) is drawn at a separate slot to
the right of the largest finite epsilon, past a dotted divider, and labelled "non-private".

**Overlapping points are dodged.** Points of one figure that share an epsilon exactly (several non-private
trials, or two inits whose accounting is identical) are spread sideways: the r-th of n such points (in order of
group, then trial key) is drawn at ``epsilon * 10 ** (DODGE_DECADES * (r - (n - 1) / 2))``, a shift of the
marker only (tick labels and the tables give the exact epsilon). Each group also has its own colour, marker and
line style, so two init lines never hide one another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.metric_labels import metric_label
from analysis.pareto import FRONT_ID, ON_FRONT, front_table, non_dominated
from analysis.tables import FINISHED
from analysis.views import BIN, N_TRAIN, STUDY_BINS, EpsilonBin
from trainables import names

PNG_DPI = 300
"""Resolution of the PNG copy of every figure (the SVG copy is resolution-free)."""
INF_SLOT = 3.0
"""The inf slot sits this factor to the right of the largest finite epsilon on the log axis."""
INF_LABEL = "non-private"
"""Tick label of the inf slot."""
DODGE_DECADES = 0.04
"""Sideways spacing, in decades of the log epsilon axis, between points that share an epsilon (module docstring)."""
EPOCH_DODGE = 0.08
"""Sideways spacing, in epochs, between the line styles of `epsilon_trajectories` (identical ledgers stay visible)."""
TICK_SPACING_DECADES = 0.12
"""Epsilon ticks closer than this (decades) to the previous tick are left out (their labels would overlap)."""
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")
_SVG_METADATA = {"Date": None}  # no timestamp: the same figure gives the same file


def figure_paths(path: str | Path) -> tuple[Path, Path]:
    """The (SVG, PNG) files `save_figure` writes for ``path`` (whatever its suffix): ``x.svg`` and ``x.png``."""
    path = Path(path)
    return path.with_suffix(".svg"), path.with_suffix(".png")


def save_figure(figure: Figure, path: str | Path) -> tuple[Path, Path]:
    """Write ``figure`` as a vector SVG and a `PNG_DPI` PNG next to each other (parent folders created).

    Args:
        figure: the figure.
        path: ``<folder>/<name>`` with any suffix (``.png``, ``.svg`` or none); see `figure_paths`.

    Returns:
        The SVG and PNG paths.
    """
    svg, png = figure_paths(path)
    svg.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(svg, format="svg", bbox_inches="tight", metadata=_SVG_METADATA)
    figure.savefig(png, format="png", dpi=PNG_DPI, bbox_inches="tight")
    return svg, png


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a `PNG_DPI` PNG only (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=PNG_DPI, bbox_inches="tight")
    return path


def dodge_factors(positions: np.ndarray, order: Sequence[tuple[Any, ...]]) -> np.ndarray:
    """Multiplicative x offsets [n] that spread points sharing a position on a log axis (module docstring).

    Args:
        positions: x positions [n] (> 0; the inf slot already substituted).
        order: one sortable key per point (e.g. ``(group index, trial key)``): the order of the points that share a
            position, left to right.

    Returns:
        ``10 ** (DODGE_DECADES * (r - (n_x - 1) / 2))`` per point, r its rank among the n_x points at its position
        (1.0 for a point alone at its position).
    """
    positions = np.asarray(positions, dtype=np.float64)
    factors = np.ones(len(positions))
    rounded = np.round(np.log10(positions), 9)
    for value in np.unique(rounded):
        members = np.flatnonzero(rounded == value)
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda i: order[int(i)])
        for rank, i in enumerate(ranked):
            factors[i] = 10 ** (DODGE_DECADES * (rank - (len(members) - 1) / 2))
    return factors


def auroc_vs_epsilon(trials: pd.DataFrame, by: str = "init", save_to: str | Path | None = None) -> Figure:
    """Macro test AUROC against spent epsilon, one line per ``by`` value, with bootstrap 95% CIs.

    One point per finished trial at its final ``privacy/epsilon`` and ``test/auroc_macro``; the error bar
    spans ``test/auroc_macro_ci_low`` to ``test/auroc_macro_ci_high``. Lines join a group's private points in
    order of epsilon (several trials at one epsilon are all drawn, dodged, and joined in trial-key order); the
    non-private points stand alone in the inf slot, dodged per group.
    """
    return _metric_vs_epsilon(
        trials,
        names.TEST_AUROC_MACRO,
        by,
        "Test macro AUROC vs privacy budget",
        ci=(names.auroc_macro_ci("test", "low"), names.auroc_macro_ci("test", "high")),
        save_to=save_to,
    )


def fairness_vs_epsilon(
    trials: pd.DataFrame,
    metric: str = names.auroc_gap("test", "age"),
    by: str = "init",
    save_to: str | Path | None = None,
) -> Figure:
    """A fairness gap (default: age subgroup macro-AUROC gap on test) against spent epsilon per ``by`` value."""
    return _metric_vs_epsilon(trials, metric, by, f"{metric_label(metric)} vs privacy budget", ci=None, save_to=save_to)


def pareto_plot(
    front: pd.DataFrame,
    x: str = names.EPSILON,
    y: str = names.TEST_AUROC_MACRO,
    color_by: str = "init",
    fairness: str | None = names.auroc_gap("test", "age"),
    save_to: str | Path | None = None,
) -> Figure:
    """The Pareto front marked: trials in the (``x``, ``y``) plane and, when ``fairness`` is a column, in the
    (``fairness``, ``y``) plane beside it; front members filled and numbered, the others hollow.

    Args:
        front: `analysis.pareto.pareto_front` output (needs its ``on_front`` column). Front members are numbered
            as in `analysis.pareto.front_table` (its ``#`` column), so a point can be looked up in that table. The
            front may be over more objectives than one panel draws, so a front member can look dominated there.
        x, y: the columns of the first panel; ``x`` is treated as an epsilon axis (log scale, inf slot, dodged).
        color_by: column giving each point's colour and marker.
        fairness: the fairness-gap column of the second panel (linear axis, lower is better); None or a column
            absent from ``front`` for one panel only.
    """
    if fairness is not None and not (fairness in front and front[fairness].notna().any()):
        fairness = None  # absent or empty: one panel
    two = fairness is not None
    figure = Figure(figsize=(10.4 if two else 6.4, 4.4))
    axes = figure.subplots(1, 2 if two else 1, squeeze=False, sharey=True)[0]
    ax = axes[0]
    finished = front[front["status"] == FINISHED] if "status" in front else front
    finished = finished[finished[[x, y]].notna().all(axis=1)]
    if finished.empty:
        for extra in axes[1:]:
            figure.delaxes(extra)
        return _empty(figure, ax, "no finished trial with both values", save_to)
    numbers = front_table(front).set_index("trial")[FRONT_ID] if "trial" in front else pd.Series(dtype="int64")
    positions = _EpsilonAxis(finished[x])
    group_values = sorted(finished[color_by].astype(str).unique())
    group_index = finished[color_by].astype(str).map(group_values.index).to_numpy()
    trial_keys = finished["trial"].astype(str).tolist() if "trial" in finished else [""] * len(finished)
    raw = positions(finished[x])
    xs_all = raw * dodge_factors(raw, list(zip(group_index.tolist(), trial_keys, strict=True)))
    for index, group in enumerate(group_values):
        mask = group_index == index
        rows = finished[mask]
        colour, marker = f"C{index}", _MARKERS[index % len(_MARKERS)]
        on = rows[ON_FRONT].to_numpy(dtype=bool)
        ys = rows[y].to_numpy(dtype=float)
        for panel, xs in ((ax, xs_all[mask]), *(((axes[1], rows[fairness].to_numpy(dtype=float)),) if two else ())):
            label = panel is ax
            if on.any():
                panel.scatter(
                    xs[on],
                    ys[on],
                    color=colour,
                    marker=marker,
                    s=60,
                    zorder=3,
                    label=f"{group}: on the front" if label else None,
                )
            if (~on).any():
                panel.scatter(
                    xs[~on],
                    ys[~on],
                    facecolors="none",
                    edgecolors=colour,
                    marker=marker,
                    s=60,
                    zorder=3,
                    label=f"{group}: dominated" if label else None,
                )
            for key, px, py, is_on in zip(rows["trial"] if "trial" in rows else [], xs, ys, on, strict=False):
                if is_on and key in numbers.index and not math.isnan(px):
                    panel.annotate(
                        str(numbers[key]), (px, py), xytext=(4, 4), textcoords="offset points", fontsize=7, zorder=4
                    )
    # The front of the drawn plane alone (x down, y up), as a staircase: a reference for the projection.
    plane = np.column_stack([finished[x].to_numpy(dtype=float), -finished[y].to_numpy(dtype=float)])
    staircase = finished[non_dominated(plane)].sort_values([x, y])
    if len(staircase):
        ax.step(
            positions(staircase[x]),
            staircase[y],
            where="post",
            color="0.55",
            lw=1,
            ls="--",
            zorder=1,
            label=f"front of ({metric_label(x)}, {metric_label(y)}) alone",
        )
    positions.decorate(ax)
    ax.set_xlabel(f"{metric_label(x)} (log scale)")
    ax.set_ylabel(metric_label(y))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if fairness is not None:
        axes[1].set_xlabel(f"{metric_label(fairness)} (lower is fairer)")
        axes[1].grid(alpha=0.3)
    figure.suptitle(
        "Pareto front over every objective (filled, numbered as in the front table); dashed: front of the left plane",
        fontsize=9,
    )
    return _finish(figure, save_to)


def cross_dataset_heatmap(
    matrix: pd.DataFrame, rows: str = "init", panels: str = "bin", save_to: str | Path | None = None
) -> Figure:
    """Heatmaps of `analysis.views.external_auroc_matrix`: one panel per ``panels`` value (default: bin),
    rows = ``rows`` x training dataset, columns = test dataset, each cell annotated with its AUROC."""
    levels = list(matrix.index.names)
    if matrix.empty:
        figure = Figure(figsize=(5, 3))
        return _empty(figure, figure.add_subplot(), "no finished trial in any bin", save_to)
    for level in (rows, panels, "dataset"):
        if level not in levels:
            raise KeyError(f"cross_dataset_heatmap: index level {level!r} not in {levels}")
    panel_values = list(dict.fromkeys(matrix.index.get_level_values(panels)))
    values = matrix.to_numpy(dtype=float)
    defined = values[np.isfinite(values)]
    low, high = (float(defined.min()), float(defined.max())) if defined.size else (0.5, 1.0)
    n_rows = len(matrix.xs(panel_values[0], level=panels))
    width = 1.2 + 1.1 * len(matrix.columns) * len(panel_values)
    figure = Figure(figsize=(max(width, 5.0), 1.4 + 0.45 * max(n_rows, 2)), layout="constrained")
    axes = figure.subplots(1, len(panel_values), squeeze=False)[0]
    image = None
    for ax, value in zip(axes, panel_values, strict=True):
        panel = matrix.xs(value, level=panels)
        labels = [
            f"{r} | {d}"
            for r, d in zip(panel.index.get_level_values(rows), panel.index.get_level_values("dataset"), strict=True)
        ]
        data = panel.to_numpy(dtype=float)
        # pcolormesh (not imshow) keeps the cells vector shapes in the SVG; rows top-down as in the table.
        image = ax.pcolormesh(
            np.arange(data.shape[1] + 1) - 0.5,
            np.arange(data.shape[0] + 1) - 0.5,
            data,
            cmap="viridis",
            vmin=low,
            vmax=high,
        )
        ax.set_ylim(data.shape[0] - 0.5, -0.5)
        for (i, j), cell in np.ndenumerate(data):
            text = "-" if math.isnan(cell) else f"{cell:.3f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if not math.isnan(cell) and cell < (low + high) / 2 else "black",
            )
        ax.set_xticks(range(len(panel.columns)), [str(c) for c in panel.columns], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.set_title(f"{metric_label(panels)} {value}", fontsize=9)
        ax.set_xlabel("Test dataset", fontsize=8)
    axes[0].set_ylabel(f"{metric_label(rows)} | training dataset", fontsize=8)
    if image is not None:
        colorbar = figure.colorbar(image, ax=list(axes), shrink=0.8, label="Macro AUROC")
        if colorbar.solids is not None:  # None only for a contour set's colorbar, which has no colour ramp
            colorbar.solids.set_rasterized(False)  # matplotlib rasterizes long colour ramps; keep the SVG all vector
    figure.suptitle("Cross-dataset macro AUROC (final models)", fontsize=10)
    return _finish(figure, save_to, tight=False)


def epsilon_trajectories(
    epochs: pd.DataFrame,
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    color_by: str = "target_epsilon",
    style_by: str = "init",
    save_to: str | Path | None = None,
) -> Figure:
    """Spent epsilon after each epoch, one line per private trial; dotted lines at the finite bin edges.

    Colour follows ``color_by`` and line style/marker ``style_by``; the i-th of k ``style_by`` values is drawn
    ``EPOCH_DODGE * (i - (k - 1) / 2)`` epochs to the side, so trials whose accounting is identical (same noise,
    sampling rate and steps, e.g. two inits at one target) stay visible beside each other.

    Non-private trials (epsilon = inf at every epoch) have no trajectory and are counted in the title.
    """
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.add_subplot()
    needed = ["trial", names.EPOCH, names.EPSILON]
    missing = [c for c in needed if c not in epochs]
    if missing:
        raise KeyError(f"epsilon_trajectories: epochs table lacks {missing}")
    finite = epochs[np.isfinite(epochs[names.EPSILON].to_numpy(dtype=float))]
    non_private = epochs.loc[~epochs["trial"].isin(finite["trial"]), "trial"].nunique()
    if finite.empty:
        return _empty(figure, ax, "no private trial", save_to)
    colour_values = sorted(finite[color_by].unique()) if color_by in finite else []
    style_values = sorted(finite[style_by].astype(str).unique()) if style_by in finite else []
    for index, (trial, rows) in enumerate(finite.sort_values(names.EPOCH).groupby("trial", sort=True)):
        colour = f"C{colour_values.index(rows[color_by].iloc[0])}" if colour_values else f"C{index}"
        style_index = style_values.index(str(rows[style_by].iloc[0])) if style_values else 0
        shift = EPOCH_DODGE * (style_index - (max(len(style_values), 1) - 1) / 2)
        ax.plot(
            rows[names.EPOCH].to_numpy(dtype=float) + shift,
            rows[names.EPSILON],
            color=colour,
            ls=_LINESTYLES[style_index % len(_LINESTYLES)],
            lw=1.4,
            alpha=0.85,
            marker=_MARKERS[style_index % len(_MARKERS)],
            ms=4,
            label=trial,
        )
    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # matplotlib's default AutoLocator is one
        locator.set_params(integer=True)
    top = float(finite[names.EPSILON].max())
    for edge in sorted({b.high for b in bins if math.isfinite(b.high)}):
        if edge <= top * 1.5:
            ax.axhline(edge, color="0.5", ls=":", lw=1)
            ax.annotate(
                f"ε = {edge:g}",
                (1, edge),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=7,
                color="0.4",
            )
    ax.set_xlabel(metric_label(names.EPOCH))
    ax.set_ylabel(f"{metric_label(names.EPSILON)} so far")
    title = "Privacy spent per epoch"
    ax.set_title(title + (f" ({non_private} non-private trial(s) not shown)" if non_private else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", ncol=1 if finite["trial"].nunique() <= 8 else 2)
    return _finish(figure, save_to)


class _EpsilonAxis:
    """Maps epsilons to x positions on a log axis, with inf at a slot right of the largest finite value."""

    def __init__(self, epsilon: pd.Series):
        values = epsilon.to_numpy(dtype=float)
        finite = values[np.isfinite(values) & (values > 0)]
        self.max_finite = float(finite.max()) if finite.size else 1.0
        self.min_finite = float(finite.min()) if finite.size else 1.0
        self.has_inf = bool(np.isposinf(values).any())
        self.slot = self.max_finite * INF_SLOT
        self.ticks = sorted(set(np.round(finite, 6).tolist()))

    def __call__(self, epsilon: pd.Series | np.ndarray) -> np.ndarray:
        values = np.asarray(epsilon, dtype=float)
        return np.where(np.isposinf(values), self.slot, values)

    def decorate(self, ax: Axes) -> None:
        ax.set_xscale("log")
        ticks: list[float] = []
        for tick in self.ticks:  # the trials' epsilons, thinned so that no two tick labels collide
            if not ticks or math.log10(tick / ticks[-1]) >= TICK_SPACING_DECADES:
                ticks.append(tick)
        if len(ticks) > 8:
            ticks = list(np.geomspace(self.min_finite, self.max_finite, 6))
        labels = [f"{t:.3g}" for t in ticks]
        if self.has_inf:
            ax.axvline(math.sqrt(self.max_finite * self.slot), color="0.6", ls=":", lw=1)
            ticks.append(self.slot)
            labels.append(INF_LABEL)
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlim(self.min_finite / 1.6, (self.slot if self.has_inf else self.max_finite) * 1.6)


def _metric_vs_epsilon(
    trials: pd.DataFrame,
    metric: str,
    by: str,
    title: str,
    ci: tuple[str, str] | None,
    save_to: str | Path | None,
) -> Figure:
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.add_subplot()
    for column in ("status", by, names.EPSILON, metric):
        if column not in trials:
            raise KeyError(f"{title}: trial table lacks column {column!r}")
    finished = trials[(trials["status"] == FINISHED) & trials[[names.EPSILON, metric]].notna().all(axis=1)]
    if finished.empty:
        return _empty(figure, ax, "no finished trial", save_to)
    positions = _EpsilonAxis(finished[names.EPSILON])
    finished = finished.assign(_group=finished[by].astype(str)).sort_values(
        ["_group", names.EPSILON, "trial"], kind="stable"
    )
    group_values = list(dict.fromkeys(finished["_group"]))
    group_index = finished["_group"].map(group_values.index).to_numpy()
    raw = positions(finished[names.EPSILON])
    dodged = raw * dodge_factors(raw, list(zip(group_index.tolist(), finished["trial"].astype(str), strict=True)))
    for index, group in enumerate(group_values):
        mask = group_index == index
        rows = finished[mask]
        xs, ys = dodged[mask], rows[metric].to_numpy(dtype=float)
        colour, marker = f"C{index}", _MARKERS[index % len(_MARKERS)]
        if ci is not None and all(c in rows for c in ci):
            low, high = rows[ci[0]].to_numpy(dtype=float), rows[ci[1]].to_numpy(dtype=float)
            ax.errorbar(xs, ys, yerr=np.vstack([ys - low, high - ys]), fmt="none", ecolor=colour, alpha=0.6, capsize=3)
        private = np.isfinite(rows[names.EPSILON].to_numpy(dtype=float))
        ax.plot(
            xs[private],
            ys[private],
            color=colour,
            lw=1.2,
            ls=_LINESTYLES[index % len(_LINESTYLES)],
            gid=f"line {group}",
        )
        ax.scatter(xs, ys, color=colour, marker=marker, s=40, label=group, zorder=3)
    positions.decorate(ax)
    ax.set_xlabel(f"{metric_label(names.EPSILON)} (log scale)")
    ax.set_ylabel(metric_label(metric) + (" (95% bootstrap CI)" if ci else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=metric_label(by), fontsize=8)
    return _finish(figure, save_to)


def metrics_vs_train_size(
    view: pd.DataFrame,
    metrics: Sequence[str] = (names.TEST_AUROC_MACRO,),
    by: str = "init",
    save_to: str | Path | None = None,
) -> Figure:
    """Each metric against the number of training images, one line per ``by`` value, one panel per epsilon bin.

    Args:
        view: `analysis.views.utility_by_train_size` (one row per cell: ``by``, train fraction, bin, ``n_train`` and
            the metrics).
        metrics: one row of panels each (e.g. test macro AUROC, then a fairness gap); a metric the view lacks is
            left out.
        by: the column whose values are the lines (the init).

    Panels are the bins that hold a row, in the bins' order; the x axis is N_train on a log scale (base 2), shared
    by all panels; a line joins one group's points in order of N."""
    metrics = [m for m in metrics if m in view]
    rows = view[view[[N_TRAIN, *metrics]].notna().all(axis=1)] if metrics else view.iloc[:0]
    bins = [b for b in (view[BIN].cat.categories if hasattr(view[BIN], "cat") else []) if (rows[BIN] == b).any()]
    if not bins:
        figure = Figure(figsize=(6.4, 4.4))
        return _empty(figure, figure.add_subplot(), "no finished trial with N_train and the metric", save_to)
    figure = Figure(figsize=(3.4 * len(bins) + 0.8, 3.0 * len(metrics) + 0.6))
    axes = figure.subplots(len(metrics), len(bins), squeeze=False, sharex=True, sharey="row")
    groups = list(dict.fromkeys(rows[by].astype(str)))
    for column, bin_label in enumerate(bins):
        in_bin = rows[rows[BIN] == bin_label]
        for row, metric in enumerate(metrics):
            ax = axes[row][column]
            for index, group in enumerate(groups):
                points = in_bin[in_bin[by].astype(str) == group].sort_values(N_TRAIN, kind="stable")
                if points.empty:
                    continue
                ax.plot(
                    points[N_TRAIN].to_numpy(dtype=float),
                    points[metric].to_numpy(dtype=float),
                    color=f"C{index}",
                    marker=_MARKERS[index % len(_MARKERS)],
                    ls=_LINESTYLES[index % len(_LINESTYLES)],
                    lw=1.2,
                    label=group,
                    gid=f"line {group} {bin_label} {metric}",
                )
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if row == 0:
                title = "non-private" if bin_label == "inf" else f"ε spent in {bin_label}"
                ax.set_title(title, fontsize=10)
            if row == len(metrics) - 1:
                ax.set_xlabel("N_train (training images, log scale)")
            if column == 0:
                ax.set_ylabel(metric_label(metric))
    axes[0][0].legend(title=metric_label(by), fontsize=8)
    return _finish(figure, save_to)


def _empty(figure: Figure, ax: Axes, message: str, save_to: str | Path | None) -> Figure:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return _finish(figure, save_to)


def _finish(figure: Figure, save_to: str | Path | None, tight: bool = True) -> Figure:
    FigureCanvasAgg(figure)
    if tight:
        figure.tight_layout()
    if save_to is not None:
        save_figure(figure, save_to)
    return figure
