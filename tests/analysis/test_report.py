"""The HTML report: written where expected, holds the study's tables and its figures, works offline."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis.report import main, write_report
from tests.analysis.fixtures import DATASET, SWEEP, fake_manifest, fake_predictions, make_sweep
from trainables.data.labels import LABELS


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


def test_report_figures_are_relative_pngs_with_svg_copies_linked(report):
    _, index, page, _ = report
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 5
    for source in sources:
        assert not source.startswith(("/", "http")) and source.startswith("figures/")
        assert (index.parent / source).read_bytes()[:4] == b"\x89PNG"
        svg = source.removesuffix(".png") + ".svg"
        assert f'<a href="{svg}">SVG (vector)</a>' in page and f'<a href="{source}">PNG (300 dpi)</a>' in page
        assert "<svg" in (index.parent / svg).read_text(encoding="utf-8")
    assert "<script" not in page and "http" not in page  # nothing to fetch: readable offline


def test_every_table_has_csv_and_latex_files_linked(report):
    _, index, page, _ = report
    csv_links = re.findall(r'<a href="(tables/[^"]+\.csv)">CSV</a>', page)
    tex_links = re.findall(r'<a href="(tables/[^"]+\.tex)">LaTeX</a>', page)
    assert len(csv_links) == len(tex_links) == page.count("<table") >= 15
    assert len(set(csv_links)) == len(csv_links)
    for csv, tex in zip(csv_links, tex_links, strict=True):
        assert csv.removesuffix(".csv") == tex.removesuffix(".tex")
        assert len(pd.read_csv(index.parent / csv)) >= 1
        assert "\\toprule" in (index.parent / tex).read_text(encoding="utf-8")
    assert page.count('<div class="wide"><table') == page.count("<table")  # every table scrolls, none is cut off


def test_pareto_section_lists_only_the_front(report):
    _, index, page, _ = report
    section = page.split("<h2>Pareto front")[1].split("<h2>")[0]
    front = pd.read_csv(index.parent / "tables" / "pareto_front.csv")
    # Front over (epsilon down, AUROC up, age gap down): random-eps1-lr (0.95, 0.90, 0.10) and random-eps20 (19.5,
    # 0.91, 0.15); every other finished trial has a lower AUROC and no better gap or epsilon than one of them.
    assert front["trial"].tolist() == ["random-eps1-lr", "random-eps20"] and front["#"].tolist() == [1, 2]
    assert "domain-eps3" not in section
    assert "2 of 8 eligible trial(s) are on the front (6 dominated; 1 not eligible)" in section


def test_intersectional_section_matches_sklearn_on_the_stored_predictions(report):
    _, index, page, _ = report
    section = page.split("<h2>Intersectional subgroups")[1].split("<h2>")[0]
    assert "fewer than 10 images" in section and "not in the gap" in section
    groups = pd.read_csv(index.parent / "tables" / "groups_sex_age_bin.csv")
    manifest, predictions = fake_manifest(DATASET), fake_predictions("random-eps1")
    predictions = predictions[predictions["dataset"] == DATASET]
    rows = predictions["row"].to_numpy()
    age, sex = manifest["age"].to_numpy()[rows], manifest["sex"].to_numpy()[rows]
    mask = (sex == "F") & (age >= 0) & (age < 40)
    expected = np.mean(
        [
            roc_auc_score(manifest[label].to_numpy()[rows][mask], predictions[f"score/{label}"].to_numpy()[mask])
            for label in LABELS
        ]
    )
    row = groups[(groups["trial"] == "random-eps1") & (groups["test set"] == DATASET) & (groups["sex"] == "F")]
    row = row[row["age_bin"] == "[0,40)"].iloc[0]
    assert row["n_images"] == mask.sum() and row["auroc_macro"] == pytest.approx(expected, abs=1e-12)
    assert f"<td>{expected:.3f}</td>" in section
    # Every selected trial x both test sets x (F, M, unknown) x (3 bins + no bin): 6 x 2 x 12 rows.
    assert len(groups) == 6 * 2 * 12 and groups.groupby(["trial", "test set"])["n_images"].sum().unique().tolist() in (
        [100, 80],
        [80, 100],
    )
    view = pd.read_csv(index.parent / "tables" / "groups_view.csv")
    assert sorted(view["view"].unique()) == ["AP", "PA"]


def test_report_groups_by_a_chosen_column_and_names_an_unknown_one(tmp_path):
    sweep_dir = make_sweep(tmp_path / "runs")
    write_report(sweep_dir)
    assert (sweep_dir / "report" / "tables" / "groups_view.csv").is_file()
    page = write_report(sweep_dir, group_by=("site", "scanner")).read_text()
    assert (sweep_dir / "report" / "tables" / "groups_site.csv").is_file()
    assert not (sweep_dir / "report" / "tables" / "groups_view.csv").exists()  # the previous report's file is gone
    assert "Grouping by <code>scanner</code>: not a column of every manifest" in page
    moved = write_report(sweep_dir, out_dir=tmp_path / "moved", data_root=tmp_path / "nowhere").read_text()
    assert "not found at" in moved and "--data-root" in moved


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
    main([str(sweep_dir), "--out", str(tmp_path / "out"), "--group-by", "site", "--group-by", "view"])
    assert (tmp_path / "out" / "index.html").exists()
    assert (tmp_path / "out" / "tables" / "groups_site.csv").is_file()
    assert (tmp_path / "out" / "tables" / "groups_view.csv").is_file()
    assert "report:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="trials.parquet does not exist"):
        main([str(tmp_path / "missing")])
