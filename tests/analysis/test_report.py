"""The HTML report: written where expected, holds the study's tables and its figures, works offline."""

from __future__ import annotations

import re
import time

import pytest

from analysis.report import main, write_report
from tests.analysis.fixtures import SWEEP, make_sweep


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sweep_dir = make_sweep(tmp_path_factory.mktemp("runs"))
    start = time.perf_counter()
    index = write_report(sweep_dir)
    return sweep_dir, index, index.read_text(encoding="utf-8"), time.perf_counter() - start


def test_report_is_written_in_the_sweep_folder(report):
    sweep_dir, index, _, seconds = report
    assert index == sweep_dir / "report" / "index.html"
    assert seconds < 30


def test_report_holds_the_tables(report):
    _, _, page, _ = report
    assert page.startswith("<!DOCTYPE html>") and f"dpsweep report: {SWEEP}" in page
    for heading in (
        "On-domain test AUROC by init and epsilon bin",
        "Test fairness gap by init and epsilon bin",
        "Final models",
        "Cross-dataset generalization",
        "Subgroup test AUROC",
        "Fairness gaps on test",
        "Paired bootstrap comparison of inits",
        "Pareto front",
        "Failed or unfinished trials",
        "Privacy spent per epoch",
    ):
        assert f"<h2>{heading}" in page, heading
    assert page.count("<table") >= 10
    assert "<td>0.610</td>" in page  # random init, bin (0, 1]
    fairness = page.split("Test fairness gap by init and epsilon bin")[1].split("<h2>")[0]
    assert "<b>sex</b>" in fairness and "<b>age</b>" in fairness
    assert "<td>0.140</td>" in fairness  # age gap of random-eps3's epoch 1, the model chosen for random, (0, 1]
    assert "<td>0.211</td>" in page and "<td>0.842</td>" in page  # p-values 4/19 and 16/19
    assert "BudgetError: fake" in page  # the failed trial and its error
    assert "abc123" in page  # provenance: git commit
    assert "ext-b" in page


def test_report_figures_are_relative_pngs_that_exist(report):
    _, index, page, _ = report
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 5
    for source in sources:
        assert not source.startswith(("/", "http")) and source.startswith("figures/")
        assert (index.parent / source).read_bytes()[:4] == b"\x89PNG"
    assert "<script" not in page and "http" not in page  # nothing to fetch: readable offline


def test_report_without_bootstrap_tables_says_so(tmp_path):
    sweep_dir = make_sweep(tmp_path / "runs", with_ray=False)
    page = write_report(sweep_dir, out_dir=tmp_path / "elsewhere").read_text()
    assert "no per-trial evaluation tables" in page
    assert "p_1_better" not in page.split("Paired bootstrap")[1].split("<h2>")[0]


def test_report_without_per_epoch_fairness_gaps_says_so(tmp_path):
    import pandas as pd

    sweep_dir = make_sweep(tmp_path / "runs", with_ray=False)
    epochs = pd.read_parquet(sweep_dir / "epochs.parquet")
    epochs.drop(columns=[c for c in epochs.columns if "/fairness/" in c]).to_parquet(sweep_dir / "epochs.parquet")
    page = write_report(sweep_dir).read_text()
    section = page.split("Test fairness gap by init and epsilon bin")[1].split("<h2>")[0]
    assert "no per-epoch fairness gaps" in section and "<table" not in section


def test_cli(tmp_path, capsys):
    sweep_dir = make_sweep(tmp_path / "runs")
    main([str(sweep_dir), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "index.html").exists()
    assert "report:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="trials.parquet does not exist"):
        main([str(tmp_path / "missing")])
