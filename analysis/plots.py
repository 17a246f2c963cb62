"""The study's figures with matplotlib: each function returns a `matplotlib.figure.Figure` and, given
``save_to``, also writes it as a PNG.

Figures are built without pyplot (``Figure()`` + the Agg canvas), so nothing here touches matplotlib's
global backend or state: they render headless on a server and display inline in a notebook.

Epsilon axes are logarithmic. The non-private baseline (epsilon = inf) is drawn at a separate slot to
the right of the largest finite epsilon, past a dotted divider, and labelled "inf".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.pareto import ON_FRONT, non_dominated
from analysis.tables import FINISHED
from analysis.views import STUDY_BINS, EpsilonBin
from trainables import names

PNG_DPI = 110
INF_SLOT = 3.0
"""The inf slot sits this factor to the right of the largest finite epsilon on the log axis."""
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=PNG_DPI, bbox_inches="tight")
    return path


def auroc_vs_epsilon(trials: pd.DataFrame, by: str = "init", save_to: str | Path | None = None) -> Figure:
    """Macro test AUROC against spent epsilon, one line per ``by`` value, with bootstrap 95% CIs.

    One point per finished trial at its final ``privacy/epsilon`` and ``test/auroc_macro``; the error bar
    spans ``test/auroc_macro_ci_low`` to ``test/auroc_macro_ci_high``. Lines join a group's private points in
    order of epsilon (several trials at one epsilon are all drawn and joined in trial-key order); the
    non-private point stands alone in the inf slot.
    """
    return _metric_vs_epsilon(
        trials,
        names.TEST_AUROC_MACRO,
        by,
        "macro test AUROC",
        "Test AUROC vs privacy budget",
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
    return _metric_vs_epsilon(trials, metric, by, metric, f"{metric} vs privacy budget", ci=None, save_to=save_to)


def pareto_plot(
    front: pd.DataFrame,
    x: str = names.EPSILON,
    y: str = names.TEST_AUROC_MACRO,
    color_by: str = "init",
    save_to: str | Path | None = None,
) -> Figure:
    """Trials in the (``x``, ``y``) plane, front members filled and others hollow.

    Args:
        front: `analysis.pareto.pareto_front` output (needs its ``on_front`` column). The front may be over
            more objectives than the two drawn, so a front member can look dominated in this projection.
        x, y: the columns drawn; ``x`` is treated as an epsilon axis (log scale, inf slot).
        color_by: column giving each point's colour and marker.
    """
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.add_subplot()
    finished = front[front["status"] == FINISHED] if "status" in front else front
    finished = finished[finished[[x, y]].notna().all(axis=1)]
    if finished.empty:
        return _empty(figure, ax, "no finished trial with both values", save_to)
    positions = _EpsilonAxis(finished[x])
    for index, (group, rows) in enumerate(finished.groupby(color_by, sort=True)):
        colour, marker = f"C{index}", _MARKERS[index % len(_MARKERS)]
        on = rows[ON_FRONT].to_numpy(dtype=bool)
        xs, ys = positions(rows[x]), rows[y].to_numpy(dtype=float)
        if on.any():
            ax.scatter(xs[on], ys[on], color=colour, marker=marker, s=60, label=f"{group}: on the front", zorder=3)
        if (~on).any():
            ax.scatter(
                xs[~on],
                ys[~on],
                facecolors="none",
                edgecolors=colour,
                marker=marker,
                s=60,
                label=f"{group}: dominated",
                zorder=3,
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
            label=f"front of ({x}, {y}) alone",
        )
    positions.decorate(ax)
    ax.set_xlabel(f"{x} (log scale)")
    ax.set_ylabel(y)
    ax.set_title("Pareto front over the table's objectives (filled) and of this plane (dashed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
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
        image = ax.imshow(data, cmap="viridis", vmin=low, vmax=high, aspect="auto")
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
        ax.set_title(f"{panels} {value}", fontsize=9)
        ax.set_xlabel("test dataset", fontsize=8)
    axes[0].set_ylabel(f"{rows} | train dataset", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=list(axes), shrink=0.8, label="macro AUROC")
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

    Colour follows ``color_by`` and line style/marker ``style_by``, so trials whose accounting is identical
    (same noise, sampling rate and steps, e.g. two inits at one target) stay visible on top of each other.

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
        style = _LINESTYLES[style_values.index(str(rows[style_by].iloc[0])) % len(_LINESTYLES)] if style_values else "-"
        ax.plot(
            rows[names.EPOCH],
            rows[names.EPSILON],
            color=colour,
            ls=style,
            lw=1.4,
            alpha=0.85,
            marker=_MARKERS[style_values.index(str(rows[style_by].iloc[0])) % len(_MARKERS)] if style_values else "o",
            ms=4,
            label=trial,
        )
    ax.xaxis.get_major_locator().set_params(integer=True)
    top = float(finite[names.EPSILON].max())
    for edge in sorted({b.high for b in bins if math.isfinite(b.high)}):
        if edge <= top * 1.5:
            ax.axhline(edge, color="0.5", ls=":", lw=1)
            ax.annotate(
                f"eps = {edge:g}",
                (1, edge),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=7,
                color="0.4",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{names.EPSILON} (spent so far)")
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
        ticks = (
            list(self.ticks[:8]) if len(self.ticks) <= 8 else list(np.geomspace(self.min_finite, self.max_finite, 6))
        )
        labels = [f"{t:.3g}" for t in ticks]
        if self.has_inf:
            ax.axvline(math.sqrt(self.max_finite * self.slot), color="0.6", ls=":", lw=1)
            ticks.append(self.slot)
            labels.append("inf")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlim(self.min_finite / 1.6, (self.slot if self.has_inf else self.max_finite) * 1.6)


def _metric_vs_epsilon(
    trials: pd.DataFrame,
    metric: str,
    by: str,
    ylabel: str,
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
    for index, (group, rows) in enumerate(finished.groupby(by, sort=True)):
        rows = rows.sort_values([names.EPSILON, "trial"], kind="stable")
        xs, ys = positions(rows[names.EPSILON]), rows[metric].to_numpy(dtype=float)
        colour, marker = f"C{index}", _MARKERS[index % len(_MARKERS)]
        if ci is not None and all(c in rows for c in ci):
            low, high = rows[ci[0]].to_numpy(dtype=float), rows[ci[1]].to_numpy(dtype=float)
            ax.errorbar(xs, ys, yerr=np.vstack([ys - low, high - ys]), fmt="none", ecolor=colour, alpha=0.6, capsize=3)
        private = np.isfinite(rows[names.EPSILON].to_numpy(dtype=float))
        ax.plot(xs[private], ys[private], color=colour, lw=1.2)
        ax.scatter(xs, ys, color=colour, marker=marker, s=40, label=str(group), zorder=3)
    positions.decorate(ax)
    ax.set_xlabel(f"{names.EPSILON} spent (log scale)")
    ax.set_ylabel(ylabel + (" (95% bootstrap CI)" if ci else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=by, fontsize=8)
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
        save_png(figure, save_to)
    return figure
