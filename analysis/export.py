"""Report tables as files: CSV (every value at full precision, raw column names) and LaTeX (booktabs, human labels).

The LaTeX writer is our own (a ``tabular`` with ``\\toprule``/``\\midrule``/``\\bottomrule``, needing
``\\usepackage{booktabs}``), so the tables do not depend on jinja2 (pandas' ``to_latex``) and use the same number
format as the HTML report. Header cells are the human labels of `analysis.metric_labels`; a MultiIndex of columns
becomes one header row per level, with a ``\\multicolumn`` and a ``\\cmidrule`` over each run of equal values.
Missing values are ``--``, infinity is ``$\\infty$``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.metric_labels import metric_label

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "ε": r"$\varepsilon$",
    "δ": r"$\delta$",
    "×": r"$\times$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "∞": r"$\infty$",
}


@dataclass(frozen=True)
class TableFiles:
    """The files one table was written to.

    Attributes:
        csv: ``<name>.csv``.
        tex: ``<name>.tex``.
    """

    csv: Path
    tex: Path


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (and ε, δ, ×, ≤, ≥, ∞ as math)."""
    return "".join(_LATEX_SPECIAL.get(character, character) for character in text)


def format_number(value: float) -> str:
    """The report's number format: 3 decimals, 4 significant digits from 100 up, 3 below 0.001 (learning rates such
    as 3e-4 stay readable), ``inf`` for infinity."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and abs(value) < 0.001:
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"


def write_table(
    frame: pd.DataFrame,
    folder: str | Path,
    name: str,
    index: bool = True,
    caption: str | None = None,
    float_format: Callable[[float], str] = format_number,
) -> TableFiles:
    """Write ``frame`` as ``<folder>/<name>.csv`` and ``<folder>/<name>.tex`` (folder created).

    Args:
        frame: the table as the report shows it.
        folder: output folder.
        name: file stem (letters, digits, ``-`` and ``_``).
        index: whether the index is part of the table (as in ``DataFrame.to_html``).
        caption: LaTeX caption; with one the tabular is wrapped in a ``table`` float labelled ``tab:<name>``.
        float_format: number format of the LaTeX cells (the CSV keeps full precision).
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"write_table: name {name!r} must be letters, digits, '-' or '_'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = TableFiles(folder / f"{name}.csv", folder / f"{name}.tex")
    frame.to_csv(files.csv, index=index)
    files.tex.write_text(to_latex(frame, index=index, caption=caption, label=f"tab:{name}", float_format=float_format))
    return files


def to_latex(
    frame: pd.DataFrame,
    index: bool = True,
    caption: str | None = None,
    label: str | None = None,
    float_format: Callable[[float], str] = format_number,
) -> str:
    """A booktabs ``tabular`` of ``frame`` (module docstring); wrapped in a ``table`` float when ``caption`` is given.

    Numeric columns are right-aligned, others left-aligned. Index levels (with ``index``) come first, headed by
    their names.
    """
    body = frame.reset_index() if index else frame.reset_index(drop=True)
    n_index = frame.index.nlevels if index else 0
    levels = frame.columns.nlevels
    value_columns = list(frame.columns)
    index_names = [metric_label(str(n)) if n is not None else "" for n in frame.index.names] if index else []
    if n_index == 1 and index and frame.index.names[0] is None:
        index_names = [""]
    tuples = [c if isinstance(c, tuple) else (c,) for c in value_columns]
    header_rows = []
    for level in range(levels):
        cells = [(index_names[i] if level == levels - 1 else "") for i in range(n_index)]
        rules = []
        position = n_index + 1
        start = 0
        while start < len(tuples):
            end = start + 1
            if level < levels - 1:
                while end < len(tuples) and tuples[end][: level + 1] == tuples[start][: level + 1]:
                    end += 1
            text = latex_escape(metric_label(str(tuples[start][level])))
            span = end - start
            cells.append(text if span == 1 else rf"\multicolumn{{{span}}}{{c}}{{{text}}}")
            if level < levels - 1 and span > 1:
                rules.append(rf"\cmidrule(lr){{{position}-{position + span - 1}}}")
            position += span
            start = end
        header_rows.append(" & ".join(cells) + r" \\" + (" " + " ".join(rules) if rules else ""))
    align = "".join(
        "r"
        if pd.api.types.is_numeric_dtype(body.iloc[:, j]) and not pd.api.types.is_bool_dtype(body.iloc[:, j])
        else "l"
        for j in range(body.shape[1])
    )
    rows = [" & ".join(_latex_cell(v, float_format) for v in row) + r" \\" for row in body.itertuples(index=False)]
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", *header_rows, r"\midrule", *rows, r"\bottomrule"]
    lines.append(r"\end{tabular}")
    if caption is not None:
        head = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(caption)}}}"]
        if label is not None:
            head.append(rf"\label{{{label}}}")
        lines = [*head, *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"


def _latex_cell(value: object, float_format: Callable[[float], str]) -> str:
    if value is None or value is pd.NA or value is pd.NaT:
        return "--"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "--"
        if math.isinf(value):
            return r"$\infty$" if value > 0 else r"$-\infty$"
        return latex_escape(float_format(float(value)))
    return latex_escape(str(value))
