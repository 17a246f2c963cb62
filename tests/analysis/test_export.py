"""Table files: the CSV holds the table at full precision; the LaTeX is a booktabs tabular written out by hand here."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.export import format_number, latex_escape, to_latex, write_table
from analysis.metric_labels import metric_label
from trainables import names


def test_latex_of_a_small_table_by_hand():
    frame = pd.DataFrame(
        {
            "trial": ["a_1", "b&2"],
            names.EPSILON: [0.5, math.inf],
            names.TEST_AUROC_MACRO: [0.81234, math.nan],
            "n": [3, 40],
        }
    )
    assert to_latex(frame, index=False) == (
        "\\begin{tabular}{lrrr}\n"
        "\\toprule\n"
        "Trial & $\\varepsilon$ spent & Test macro AUROC & n \\\\\n"
        "\\midrule\n"
        "a\\_1 & 0.500 & 0.812 & 3 \\\\\n"
        "b\\&2 & $\\infty$ & -- & 40 \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
    )


def test_multiindex_columns_become_spanned_header_rows_with_rules():
    columns = pd.MultiIndex.from_tuples([("sex", "F"), ("sex", "M"), ("age", "0-40")], names=["attribute", "group"])
    index = pd.MultiIndex.from_tuples([("random", "t1")], names=["init", "trial"])
    tex = to_latex(pd.DataFrame([[0.7, 0.6, 0.5]], index=index, columns=columns), caption="Groups 100%")
    lines = tex.splitlines()
    assert lines[:3] == ["\\begin{table}[ht]", "\\centering", "\\caption{Groups 100\\%}"]
    assert "\\begin{tabular}{llrrr}" in lines
    assert " &  & \\multicolumn{2}{c}{sex} & age \\\\ \\cmidrule(lr){3-4}" in lines
    assert "Init & Trial & F & M & 0-40 \\\\" in lines
    assert "random & t1 & 0.700 & 0.600 & 0.500 \\\\" in lines
    assert lines[-1] == "\\end{table}"


def test_write_table_writes_csv_at_full_precision_and_tex(tmp_path):
    frame = pd.DataFrame({"x": [1 / 3, math.inf, math.nan]}, index=pd.Index(["a", "b", "c"], name="k"))
    files = write_table(frame, tmp_path / "tables", "my_table", caption="A table")
    back = pd.read_csv(files.csv, index_col="k")
    pd.testing.assert_frame_equal(back, frame)
    tex = files.tex.read_text()
    assert "\\label{tab:my_table}" in tex and "\\caption{A table}" in tex and "0.333" in tex
    with pytest.raises(ValueError, match="must be letters"):
        write_table(frame, tmp_path, "../escape")


def test_number_format():
    assert [format_number(v) for v in (0.81234, 123.456, 3e-4, 0.0, math.inf, -math.inf)] == [
        "0.812",
        "123.5",
        "0.0003",
        "0.000",
        "inf",
        "-inf",
    ]


def test_escape_and_labels():
    assert latex_escape("a_b & 50% #1 {x} ~ ^ \\ ε") == (
        "a\\_b \\& 50\\% \\#1 \\{x\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{} $\\varepsilon$"
    )
    assert metric_label(names.auroc_gap("test", "sex")) == "AUROC gap (sex)"
    assert metric_label(names.auroc_gap("val", "age")) == "Validation AUROC gap (age)"
    assert metric_label(names.fairness("test", "eod", "age")) == "Equalized-odds difference (age)"
    assert metric_label(names.subgroup_auroc("test", "age", "70-100")) == "Test macro AUROC (age 70-100)"
    assert metric_label(names.external_auroc("ext-b")) == "External macro AUROC (ext-b)"
    assert metric_label(names.test_auroc("pleural_effusion")) == "Test AUROC (pleural effusion)"
    assert metric_label("something/else") == "something/else"
