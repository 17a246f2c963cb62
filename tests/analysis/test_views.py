"""The study's views on the hand-made sweep of `tests.analysis.fixtures`, whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import views
from analysis.tables import load_tables
from analysis.views import STUDY_BINS, EpsilonBin
from tests.analysis.fixtures import DATASET, EXTERNAL, TRIALS, make_sweep, replicates
from trainables import names
from trainables.evaluate.bootstrap import paired_p_value

TEST_AT_EPOCH, VAL, EPS = names.TEST_AUROC_MACRO_AT_EPOCH, names.VAL_AUROC_MACRO, names.EPSILON
BY_KEY = {t.key: t for t in TRIALS}


@pytest.fixture
def tables(tmp_path):
    return load_tables(make_sweep(tmp_path))


@pytest.fixture
def selection(tables):
    return views.final_selection(tables.trials, tables.epochs)


MODEL = "test_convnext"  # the fixtures' model (`tests.analysis.fixtures`)


def cell(frame: pd.DataFrame, init: str, bin_label: str) -> pd.Series:
    rows = frame[(frame["init"] == init) & (frame["bin"] == bin_label)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_bin_edges():
    epsilon = [0.0, 1e-9, 1.0, 1.0000001, 3.0, 10.0, 10.01, math.inf, math.nan, -1.0]
    assert list(views.assign_bins(epsilon)) == [
        np.nan,
        "(0, 1]",
        "(0, 1]",
        "(1, 3]",
        "(1, 3]",
        "(3, 10]",
        np.nan,
        "inf",
        np.nan,
        np.nan,
    ]
    assert list(views.assign_bins(epsilon).categories) == [b.label for b in STUDY_BINS]
    assert STUDY_BINS[-1].is_non_private and not STUDY_BINS[0].is_non_private


def test_bins_are_validated():
    with pytest.raises(ValueError, match="need 0 <= low < high"):
        EpsilonBin("bad", 3.0, 1.0)
    with pytest.raises(ValueError, match="overlap"):
        views.check_bins([EpsilonBin("a", 0, 2), EpsilonBin("b", 1, 3)])
    with pytest.raises(ValueError, match="distinct"):
        views.check_bins([EpsilonBin("a", 0, 1), EpsilonBin("a", 1, 3)])
    with pytest.raises(ValueError, match="both the non-private bin"):
        views.check_bins([EpsilonBin("a", math.inf, math.inf), EpsilonBin("b", math.inf, math.inf)])
    custom = (EpsilonBin("<=8", 0, 8), EpsilonBin("(8, 20]", 8, 20))
    assert list(views.assign_bins([8.0, 19.5, math.inf], custom)) == ["<=8", "(8, 20]", np.nan]


def test_best_epoch_per_trial_and_bin_uses_validation_not_test(tables):
    best = views.best_epochs_by_bin(tables.epochs).set_index(["trial", "bin"])
    expected = {  # (trial, bin): (epoch, test AUROC at that epoch, selectable epochs in the bin)
        ("random-eps1", "(0, 1]"): (2, 0.62, 3),  # epoch 3 has the best test AUROC (.66) but not the best val
        ("random-eps1-lr", "(0, 1]"): (3, 0.90, 3),
        ("random-eps3", "(0, 1]"): (1, 0.61, 1),  # epoch 1 spent 0.9: it belongs to the (0, 1] bin
        ("random-eps3", "(1, 3]"): (3, 0.69, 2),
        ("random-eps20", "(3, 10]"): (1, 0.52, 1),  # epochs at 12 and 19.5 are in no bin
        ("random-epsinf", "inf"): (2, 0.81, 3),  # val tie .82/.82: the earlier epoch
        ("domain-eps1", "(0, 1]"): (1, 0.73, 3),  # val tie .75/.75
        ("domain-eps3", "(0, 1]"): (1, 0.71, 1),
        ("domain-eps3", "(1, 3]"): (2, 0.77, 1),  # epoch 3 has NaN val AUROC: not selectable
        ("domain-epsinf", "inf"): (2, 0.85, 3),
        ("domain-eps8", "(3, 10]"): (1, 0.99, 1),  # epochs alone do not know the trial failed
    }
    assert set(best.index) == set(expected)
    for key, (epoch, test, count) in expected.items():
        row = best.loc[key]
        assert (row[names.EPOCH], row[TEST_AT_EPOCH], row[views.CANDIDATE_EPOCHS]) == (epoch, test, count), key


def test_best_epoch_requires_the_per_epoch_test_column(tables):
    with pytest.raises(KeyError, match="test_every_epoch: true"):
        views.best_epochs_by_bin(tables.epochs.drop(columns=TEST_AT_EPOCH))


def test_auroc_by_init_and_bin(tables):
    binned = views.auroc_by_bin(tables.trials, tables.epochs)
    # random (0, 1]: three trials have epochs there; random-eps3's epoch 1 has the best val AUROC (.70).
    row = cell(binned, "random", "(0, 1]")
    assert (row["trial"], row[names.EPOCH], row[TEST_AT_EPOCH], row[views.CANDIDATE_TRIALS]) == (
        "random-eps3",
        1,
        0.61,
        3,
    )
    assert cell(binned, "domain", "(0, 1]")["trial"] == "domain-eps1"  # val .75 beats domain-eps3's .70
    assert cell(binned, "domain", "(1, 3]")[TEST_AT_EPOCH] == 0.77
    assert cell(binned, "random", "(3, 10]")["trial"] == "random-eps20"
    assert cell(binned, "random", "inf")[TEST_AT_EPOCH] == 0.81
    # The failed domain-eps8 never appears, so domain has no (3, 10] cell.
    assert "domain-eps8" not in set(binned["trial"])
    assert len(binned) == 7

    wide = views.bin_table(binned, TEST_AT_EPOCH)
    assert list(wide.columns) == [b.label for b in STUDY_BINS]
    assert list(wide.index) == [(MODEL, DATASET, "domain"), (MODEL, DATASET, "random")]
    assert wide.loc[(MODEL, DATASET, "random")].tolist() == [0.61, 0.69, 0.52, 0.81]
    assert math.isnan(wide.loc[(MODEL, DATASET, "domain"), "(3, 10]"])


def test_final_selection(selection):
    assert selection.columns[:5].tolist() == ["model", "dataset", "init", "bin", "trial"]
    row = cell(selection, "random", "(0, 1]")
    # random-eps1 (val .65 at its best epoch) beats random-eps1-lr (.63); both spent <= 1 in total.
    assert (row["trial"], row[views.CANDIDATE_TRIALS], row[VAL]) == ("random-eps1", 2, 0.65)
    # random-eps3's selected model is epoch 1 (0.9 spent then), but the run spent 2.95: bin (1, 3].
    assert cell(selection, "random", "(1, 3]")["trial"] == "random-eps3"
    assert cell(selection, "domain", "(1, 3]")[names.BEST_EPOCH] == 2
    assert set(selection["trial"]) == {
        "random-eps1",
        "random-eps3",
        "random-epsinf",
        "domain-eps1",
        "domain-eps3",
        "domain-epsinf",
    }  # eps 19.5 is in no bin; domain-eps8 failed


def test_final_selection_tie_goes_to_lower_epsilon_then_key(tables):
    trials = tables.trials.copy()
    epochs = tables.epochs.copy()
    epochs.loc[(epochs["trial"] == "random-eps1-lr") & (epochs[names.EPOCH] == 3), VAL] = 0.65  # tie with eps1
    chosen = cell(views.final_selection(trials, epochs), "random", "(0, 1]")
    assert chosen["trial"] == "random-eps1-lr"  # spent 0.95 < 0.99
    trials.loc[trials["trial"] == "random-eps1-lr", EPS] = 0.99
    chosen = cell(views.final_selection(trials, epochs), "random", "(0, 1]")
    assert chosen["trial"] == "random-eps1"  # full tie: trial key order


def test_external_auroc_matrix(tables, selection):
    matrix = views.external_auroc_matrix(tables.trials, selection)
    assert list(matrix.columns) == [DATASET, EXTERNAL] and matrix.columns.name == "test dataset"
    assert matrix.index.names == ["model", "dataset", "init", "bin", "trial"]
    final = tables.trials.set_index("trial")
    for (_, _, _, _, trial), row in matrix.iterrows():
        assert row[DATASET] == final.at[trial, names.TEST_AUROC_MACRO]
        assert row[EXTERNAL] == final.at[trial, names.external_auroc(EXTERNAL)]
    assert matrix.xs("random-eps1", level="trial")[DATASET].item() == 0.62
    assert views.external_datasets(tables.trials) == [EXTERNAL]


def test_subgroup_and_fairness_tables(tables, selection):
    subgroups = views.subgroup_auroc_table(tables.trials, selection)
    assert list(subgroups.columns) == [("sex", "F"), ("sex", "M"), ("age", "0-40"), ("age", "40-70"), ("age", "70-100")]
    row = subgroups.xs("domain-eps1", level="trial").iloc[0]
    assert row[("sex", "F")] == pytest.approx(0.74) and row[("age", "0-40")] == pytest.approx(0.78)

    fairness = views.fairness_table(tables.trials, selection)
    expected = [
        (a, f)
        for a in ("sex", "age")
        for f in (*names.FAIRNESS_METRICS, *views.FAIRNESS_EXTRAS)
        if (a, f) not in {("sex", "auroc_gap_label_mean"), ("sex", "worst_group_auroc")}
    ]
    assert list(fairness.columns) == expected  # per-label columns never leak in; absent ones left out
    final = tables.trials.set_index("trial")
    for trial in selection["trial"]:
        row = fairness.xs(trial, level="trial").iloc[0]
        assert row[("age", "auroc_gap")] == final.at[trial, names.auroc_gap("test", "age")]
        assert row[("sex", "eod")] == final.at[trial, names.fairness("test", "eod", "sex")]


def test_paired_p_values(tables, selection):
    p_values = views.paired_p_values(tables.trials, selection, tables.evaluation.bootstrap)
    # Cells with both inits: (0, 1], (1, 3], inf; two test sets each.
    assert len(p_values) == 6
    assert set(p_values["init_1"]) == {"domain"} and set(p_values["init_2"]) == {"random"}
    assert p_values["test dataset"].tolist() == [DATASET, EXTERNAL] * 3  # on-domain first
    np.testing.assert_allclose(p_values["p_1_better"], 4 / 19)
    np.testing.assert_allclose(p_values["p_2_better"], 16 / 19)
    assert (p_values["n_replicates"] == 19).all()
    first = p_values.iloc[0]
    assert first["p_1_better"] == paired_p_value(
        replicates("domain-eps1", DATASET).astype(np.float32), replicates("random-eps1", DATASET).astype(np.float32)
    )
    final = tables.trials.set_index("trial")
    assert first["auroc_1"] == final.at[first["trial_1"], names.TEST_AUROC_MACRO]
    external = p_values.iloc[1]
    assert external["auroc_2"] == final.at[external["trial_2"], names.external_auroc(EXTERNAL)]


def test_paired_p_values_refuse_unpaired_replicates(tables, selection):
    bootstrap = tables.evaluation.bootstrap
    short = bootstrap[~((bootstrap["trial"] == "random-eps1") & (bootstrap["replicate"] == 5))]
    with pytest.raises(ValueError, match="different bootstrap replicates on 'synthetic-a'"):
        views.paired_p_values(tables.trials, selection, short)
    missing = bootstrap[bootstrap["trial"] != "domain-eps1"]
    with pytest.raises(ValueError, match="no bootstrap replicates for selected trial 'domain-eps1'"):
        views.paired_p_values(tables.trials, selection, missing)
    trials = tables.trials.copy()
    trials.loc[trials["trial"] == "random-eps1", names.n_images("test")] = 99
    with pytest.raises(ValueError, match="100 test images for 'domain-eps1' but 99"):
        views.paired_p_values(trials, selection, bootstrap)
    with pytest.raises(ValueError, match="compare='seed' is not a cell column"):
        views.paired_p_values(tables.trials, selection, bootstrap, compare="seed")


def test_views_on_a_sweep_without_finished_trials(tables):
    trials = tables.trials.assign(status="ERROR")
    assert views.auroc_by_bin(trials, tables.epochs).empty
    selection = views.final_selection(trials, tables.epochs)
    assert selection.empty
    assert views.external_auroc_matrix(trials, selection).empty
    assert views.subgroup_auroc_table(trials, selection).empty
    assert views.fairness_table(trials, selection).empty
    assert views.paired_p_values(trials, selection, tables.evaluation.bootstrap).empty
    assert views.bin_table(views.auroc_by_bin(trials, tables.epochs), TEST_AT_EPOCH).empty


def test_fixture_table_is_what_the_docstring_says():
    assert sum(t.status == "TERMINATED" for t in TRIALS) == 8
    assert BY_KEY["domain-eps3"].best_epoch == 2


# --- per-epoch fairness gap by bin -----------------------------------------------------------------------------


def test_fairness_gap_by_bin_shows_the_models_the_auroc_view_selects(tables):
    gaps = views.fairness_gap_by_bin(tables.trials, tables.epochs)
    binned = views.auroc_by_bin(tables.trials, tables.epochs)
    cells = ["model", "dataset", "init", "bin", "trial", names.EPOCH, views.CANDIDATE_EPOCHS, views.CANDIDATE_TRIALS]
    pd.testing.assert_frame_equal(gaps[cells], binned[cells])  # one selection rule, not a second copy
    gap_columns = [
        names.auroc_gap_at_epoch("sex"),
        names.auroc_gap("val", "sex"),
        names.auroc_gap_at_epoch("age"),
        names.auroc_gap("val", "age"),
    ]
    assert list(gaps.columns[8:-2]) == [TEST_AT_EPOCH, *gap_columns]
    for _, row in gaps.iterrows():
        trial, epoch = BY_KEY[row["trial"]], row[names.EPOCH]
        for attribute in ("sex", "age"):
            np.testing.assert_equal(row[names.auroc_gap_at_epoch(attribute)], trial.test_gap(attribute, epoch))
            assert row[names.auroc_gap("val", attribute)] == trial.val_gap(attribute, epoch)
    # random (0, 1]: random-eps3's epoch 1 (best val AUROC .70 in the bin); age gap 0.1 * 1 + 0.01 * (11 % 7).
    assert cell(gaps, "random", "(0, 1]")[names.auroc_gap_at_epoch("age")] == pytest.approx(0.14)
    # domain (0, 1]: domain-eps1's epoch 1 has a NaN gap; it stays the chosen model (the gap never selects).
    row = cell(gaps, "domain", "(0, 1]")
    assert (row["trial"], row[names.EPOCH]) == ("domain-eps1", 1)
    assert math.isnan(row[names.auroc_gap_at_epoch("age")])

    wide = views.bin_table(gaps, names.auroc_gap_at_epoch("sex"))
    assert list(wide.columns) == [b.label for b in STUDY_BINS]
    assert wide.loc[(MODEL, DATASET, "random")].tolist() == pytest.approx([0.01, 0.03, 0.01, 0.02])


def test_fairness_gap_by_bin_on_a_hand_made_table():
    """Two trials in one cell; the lower gap loses because validation AUROC chooses, and test columns are optional."""
    gap = names.auroc_gap_at_epoch("age")
    trials = pd.DataFrame(
        {
            "trial": ["a", "b"],
            "status": ["TERMINATED"] * 2,
            "model": ["m"] * 2,
            "dataset": ["d"] * 2,
            "init": ["random"] * 2,
        }
    )
    epochs = pd.DataFrame(
        {
            "trial": ["a", "a", "b", "b"],
            names.EPOCH: [1, 2, 1, 2],
            EPS: [0.5, 2.0, 0.6, 0.9],
            VAL: [0.70, 0.80, 0.60, 0.75],
            gap: [0.30, 0.05, 0.01, 0.20],
        }
    )
    gaps = views.fairness_gap_by_bin(trials, epochs)
    assert gaps[["bin", "trial", names.EPOCH, gap]].astype({"bin": str}).values.tolist() == [
        ["(0, 1]", "b", 2, 0.20],  # b's epoch 2 (val .75) beats a's epoch 1 (val .70); b's epoch 1 has the lowest gap
        ["(1, 3]", "a", 2, 0.05],
    ]
    assert TEST_AT_EPOCH not in gaps.columns


def test_fairness_gap_by_bin_says_what_is_missing(tables):
    gap_columns = [c for c in tables.epochs.columns if "/fairness/" in c]
    with pytest.raises(KeyError, match="no per-epoch fairness gap columns.*test_every_epoch"):
        views.fairness_gap_by_bin(tables.trials, tables.epochs.drop(columns=gap_columns))
    with pytest.raises(KeyError, match="auroc_gap_at_epoch/race"):
        views.fairness_gap_by_bin(tables.trials, tables.epochs, attributes=["race"])
    only_age = views.fairness_gap_by_bin(tables.trials, tables.epochs, attributes=["age"])
    assert names.auroc_gap_at_epoch("sex") not in only_age.columns
    assert views.per_epoch_fairness_attributes(tables.epochs) == ["sex", "age"]


def test_trials_whose_noise_seed_is_published_are_never_binned_as_private(tables):
    """A `privacy.reproducible_noise` trial's epsilon is no guarantee: it leaves every bin (and the Pareto front)."""
    trials = tables.trials.assign(reproducible_noise=False)
    trials.loc[trials["trial"] == "random-eps3", "reproducible_noise"] = True
    trials.loc[trials["trial"] == "random-epsinf", "reproducible_noise"] = True  # non-private: it has no mechanism
    binned = views.auroc_by_bin(trials, tables.epochs)
    assert "random-eps3" not in set(binned["trial"])
    assert cell(binned, "random", "(0, 1]")["trial"] != "random-eps3"
    assert cell(binned, "random", "inf")["trial"] == "random-epsinf"  # still the baseline
    assert "random-eps3" not in set(views.final_selection(trials, tables.epochs)["trial"])
