"""Subgroup metrics and fairness gaps: a hand-computed table, sklearn per slice, fairlearn's definitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import roc_auc_score

from trainables.evaluate.fairness import (
    age_grouping,
    attribute_fairness,
    group_table,
    make_grouping,
    sex_grouping,
)

LABELS2 = ("l0", "l1")
THRESHOLDS = np.array([0.5, 0.5])

# Hand-made split: 15 images, 2 labels. Unknown sex (rows 12, 13) is excluded from sex only; missing
# age (row 11) and age 101 (row 14) from age only. Age 40 (row 12) falls in [40,70).
# fmt: off
HAND = pd.DataFrame(
    [
        # sex        age     y0 s0    y1 s1
        ("F",        30,     1, 0.9,  1, 0.8),
        ("F",        35,     1, 0.4,  0, 0.3),
        ("F",        50,     0, 0.6,  0, 0.2),
        ("F",        55,     0, 0.3,  0, 0.6),
        ("F",        75,     1, 0.7,  0, 0.1),
        ("F",        80,     0, 0.2,  0, 0.35),
        ("M",        25,     1, 0.8,  0, 0.7),
        ("M",        45,     0, 0.7,  0, 0.2),
        ("M",        60,     1, 0.6,  0, 0.9),
        ("M",        65,     0, 0.4,  0, 0.3),
        ("M",        72,     1, 0.3,  0, 0.5),
        ("M",        np.nan, 0, 0.5,  0, 0.1),
        ("unknown",  40,     1, 0.9,  1, 0.9),
        ("unknown",  85,     0, 0.1,  0, 0.8),
        ("F",        101,    0, 0.55, 1, 0.35),
    ],
    columns=["sex", "age", "y0", "s0", "y1", "s1"],
)
# fmt: on
Y = HAND[["y0", "y1"]].to_numpy()
S = HAND[["s0", "s1"]].to_numpy()


def _row(table: pd.DataFrame, group: str, label: str) -> pd.Series:
    return table[(table["group"] == group) & (table["label"] == label)].iloc[0]


def test_sex_hand_computed():
    result = attribute_fairness(Y, S, THRESHOLDS, sex_grouping(HAND["sex"]), LABELS2)
    table = result.table
    # F, l0: positives {.9,.4,.7}, negatives {.6,.3,.2,.55}: 10 of 12 pairs ordered. At >= .5:
    # TP 2, FN 1, FP 2, TN 2.
    f0 = _row(table, "F", "l0")
    assert (f0.n, f0.n_pos, f0.n_neg) == (7, 3, 4)
    assert f0.auroc == pytest.approx(10 / 12)
    assert (f0.tpr, f0.fpr, f0.ppv) == pytest.approx((2 / 3, 2 / 4, 2 / 4))
    assert (f0.selection_rate, f0.accuracy) == pytest.approx((4 / 7, 4 / 7))
    # M, l0: positives {.8,.6,.3}, negatives {.7,.4,.5}: 5 of 9. TP 2, FN 1, FP 2 (.7, .5 >= .5), TN 1.
    m0 = _row(table, "M", "l0")
    assert m0.auroc == pytest.approx(5 / 9)
    assert (m0.tpr, m0.fpr, m0.ppv, m0.selection_rate, m0.accuracy) == pytest.approx((2 / 3, 2 / 3, 0.5, 4 / 6, 3 / 6))
    # F, l1: positives {.8,.35}, negatives {.3,.2,.6,.1,.35}: 5 + 3 + one tie (1/2) of 10 pairs.
    assert _row(table, "F", "l1").auroc == pytest.approx(8.5 / 10)
    # M has no l1 positive: skipped for l1, so l1 has a single measurable group and no gap.
    assert not _row(table, "M", "l1").measurable and np.isnan(_row(table, "M", "l1").auroc)

    l0 = result.per_label.loc["l0"]
    assert l0.auroc_gap == pytest.approx(10 / 12 - 5 / 9)
    assert l0.tpr_gap == pytest.approx(0.0)
    assert l0.fpr_gap == pytest.approx(2 / 3 - 1 / 2)
    assert l0.eod == pytest.approx(1 / 6)
    assert l0.aod == pytest.approx(1 / 12)
    assert l0.ppv_gap == pytest.approx(0.0)
    assert l0.spd == pytest.approx(4 / 6 - 4 / 7)
    assert l0.accuracy_gap == pytest.approx(4 / 7 - 3 / 6)
    assert l0.worst_group == "M" and l0.n_measurable_groups == 2 and l0.n_skipped_groups == 0
    l1 = result.per_label.loc["l1"]
    assert np.isnan(l1[["auroc_gap", "eod", "aod", "ppv_gap", "spd", "accuracy_gap"]].astype(float)).all()
    assert l1.n_skipped_groups == 1 and l1.worst_group == "F"

    assert result.label_mean["eod"] == pytest.approx(1 / 6)  # l1 undefined: mean over l0 only
    assert result.label_mean["auroc_gap"] == pytest.approx(10 / 12 - 5 / 9)
    assert result.group_macro_auroc["F"] == pytest.approx((10 / 12 + 8.5 / 10) / 2)
    assert result.group_macro_auroc["M"] == pytest.approx(5 / 9)  # l1 unmeasurable in M
    assert result.macro_auroc_gap == pytest.approx((10 / 12 + 8.5 / 10) / 2 - 5 / 9)
    assert (result.worst_group, result.worst_group_auroc) == ("M", pytest.approx(5 / 9))
    assert (result.n_skipped, result.n_excluded) == (1, 2)


def test_age_hand_computed():
    grouping = age_grouping(HAND["age"])
    assert grouping.groups == ("[0,40)", "[40,70)", "[70,100)")
    assert grouping.keys == ("0-40", "40-70", "70-100")
    np.testing.assert_array_equal(grouping.codes, [0, 0, 1, 1, 2, 2, 0, 1, 1, 1, 2, -1, 1, 2, -1])
    result = attribute_fairness(Y, S, THRESHOLDS, grouping, LABELS2)
    table = result.table
    # [40,70), l0: positives {.6,.9}, negatives {.6,.3,.7,.4}: 4 + 2 + one tie of 8 pairs.
    # TP 2, FN 0, FP 2, TN 2.
    mid0 = _row(table, "[40,70)", "l0")
    assert mid0.auroc == pytest.approx(6.5 / 8)
    assert (mid0.tpr, mid0.fpr, mid0.ppv, mid0.selection_rate, mid0.accuracy) == pytest.approx(
        (1, 0.5, 0.5, 4 / 6, 4 / 6)
    )
    # [70,100), l0: positives {.7,.3}, negatives {.2,.1}. TP 1, FN 1, FP 0, TN 2.
    old0 = _row(table, "[70,100)", "l0")
    assert old0.auroc == 1.0
    assert (old0.tpr, old0.fpr, old0.ppv, old0.selection_rate, old0.accuracy) == pytest.approx(
        (0.5, 0, 1, 1 / 4, 3 / 4)
    )
    assert not _row(table, "[0,40)", "l0").measurable  # three positives, no negative
    # l1: [0,40) positives {.8}, negatives {.3,.7}; [40,70) positive {.9}, negatives {.2,.6,.2,.9,.3}
    young1, mid1 = _row(table, "[0,40)", "l1"), _row(table, "[40,70)", "l1")
    assert (young1.auroc, mid1.auroc) == pytest.approx((1.0, 4.5 / 5))
    assert (young1.tpr, young1.fpr, young1.ppv, young1.selection_rate) == pytest.approx((1, 0.5, 0.5, 2 / 3))
    assert (mid1.tpr, mid1.fpr, mid1.ppv, mid1.selection_rate) == pytest.approx((1, 0.4, 1 / 3, 0.5))
    assert not _row(table, "[70,100)", "l1").measurable  # no positive

    gaps = result.per_label
    expected = {
        "l0": {"auroc_gap": 1 - 6.5 / 8, "tpr_gap": 0.5, "fpr_gap": 0.5, "eod": 0.5, "aod": 0.5,
               "ppv_gap": 0.5, "spd": 4 / 6 - 1 / 4, "accuracy_gap": 3 / 4 - 4 / 6},
        "l1": {"auroc_gap": 0.1, "tpr_gap": 0.0, "fpr_gap": 0.1, "eod": 0.1, "aod": 0.05,
               "ppv_gap": 0.5 - 1 / 3, "spd": 2 / 3 - 1 / 2, "accuracy_gap": 0.0},
    }  # fmt: skip
    for label, values in expected.items():
        for family, value in values.items():
            assert gaps.at[label, family] == pytest.approx(value, abs=1e-12), (label, family)
    assert gaps.at["l0", "worst_group"] == "[40,70)" and gaps.at["l1", "worst_group"] == "[40,70)"
    assert result.label_mean["eod"] == pytest.approx(0.3)
    assert result.label_mean["spd"] == pytest.approx(7 / 24)
    macro = result.group_macro_auroc
    assert (macro["[0,40)"], macro["[40,70)"], macro["[70,100)"]) == pytest.approx((1.0, (6.5 / 8 + 0.9) / 2, 1.0))
    assert result.worst_group == "[40,70)"
    assert result.macro_auroc_gap == pytest.approx(1 - (6.5 / 8 + 0.9) / 2)
    assert (result.n_skipped, result.n_excluded) == (2, 2)


def test_every_subgroup_auroc_equals_sklearn_on_the_slice():
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random((n, 3)) < 0.25).astype(int)
    score = np.round(rng.normal(size=(n, 3)) + y, 1)  # ties
    sex = rng.choice(["F", "M", "unknown"], n)
    age = rng.uniform(0, 110, n)
    age[rng.random(n) < 0.1] = np.nan
    for grouping in (sex_grouping(sex), age_grouping(age, edges=(0, 30, 50, 70, 90))):
        table = group_table(y, score, [0.5, 0.5, 0.5], grouping, ("a", "b", "c"))
        for code, group in enumerate(grouping.groups):
            members = grouping.codes == code
            for j, label in enumerate(("a", "b", "c")):
                expected = roc_auc_score(y[members, j], score[members, j])
                assert _row(table, group, label).auroc == pytest.approx(expected, abs=1e-15)


def test_gaps_equal_fairlearn_when_every_group_is_measurable():
    rng = np.random.default_rng(1)
    n = 900
    y = (rng.random((n, 2)) < 0.3).astype(int)
    age = rng.uniform(5, 95, n)
    score = y * (1.2 - age[:, None] / 100) + rng.normal(size=(n, 2))  # worse for the old
    thresholds = np.array([0.3, 0.6])
    grouping = age_grouping(age)
    result = attribute_fairness(y, score, thresholds, grouping, ("a", "b"))
    groups = np.array(grouping.groups, dtype=object)[grouping.codes]
    for j, label in enumerate(("a", "b")):
        prediction = (score[:, j] >= thresholds[j]).astype(int)
        args = (y[:, j], prediction)
        eod = equalized_odds_difference(*args, sensitive_features=groups)
        aod = equalized_odds_difference(*args, sensitive_features=groups, agg="mean")
        spd = demographic_parity_difference(*args, sensitive_features=groups)
        assert result.per_label.at[label, "eod"] == pytest.approx(eod, abs=1e-12)
        assert result.per_label.at[label, "aod"] == pytest.approx(aod, abs=1e-12)
        assert result.per_label.at[label, "spd"] == pytest.approx(spd, abs=1e-12)
        frame = MetricFrame(
            metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "selection_rate": selection_rate},
            y_true=y[:, j],
            y_pred=prediction,
            sensitive_features=pd.Series(groups, name="group"),
        ).by_group
        ours = result.table[result.table["label"] == label].set_index("group")
        for column in ("tpr", "fpr", "selection_rate"):
            np.testing.assert_allclose(ours.loc[frame.index, column], frame[column], atol=1e-12)


def test_empty_group_is_listed_skipped_and_counted():
    y = np.array([[1], [0], [1], [0]])
    score = np.array([[0.9], [0.1], [0.2], [0.6]])
    result = attribute_fairness(y, score, [0.5], age_grouping([45, 50, 75, 80]), ("a",))
    young = _row(result.table, "[0,40)", "a")
    assert (young.n, young.measurable) == (0, False) and np.isnan(young.auroc)
    assert result.per_label.at["a", "n_skipped_groups"] == 1
    assert np.isnan(result.group_macro_auroc["[0,40)"])
    assert result.per_label.at["a", "auroc_gap"] == pytest.approx(1.0)  # [40,70) 1.0, [70,100) 0.0


def test_last_edge_inf_keeps_every_age():
    grouping = age_grouping([10, 101, np.nan], edges=(0, 70, np.inf))
    assert grouping.groups == ("[0,70)", "[70,inf)") and grouping.keys == ("0-70", "70-inf")
    np.testing.assert_array_equal(grouping.codes, [0, 1, -1])
    assert grouping.n_excluded == 1


def test_registry_and_input_errors():
    assert make_grouping("age", [30, 50], edges=(0, 40, 100)).groups == ("[0,40)", "[40,100)")
    with pytest.raises(KeyError, match=r"unknown fairness attribute 'race'; expected one of \['age', 'sex'\]"):
        make_grouping("race", ["x"])
    with pytest.raises(ValueError, match=r"sex: value 'female' at position 1"):
        sex_grouping(["F", "female", "M"])
    with pytest.raises(ValueError, match=r"sex: value <NA> at position 1 .*\(missing -> 'unknown'\)"):
        sex_grouping(pd.Series(["F", None], dtype="string"))
    with pytest.raises(ValueError, match="strictly increasing"):
        age_grouping([30], edges=(0, 70, 40))
    with pytest.raises(ValueError, match="3 attribute values for 2 images"):
        group_table([[0], [1]], [[0.1], [0.2]], [0.5], sex_grouping(["F", "M", "F"]), ("a",))
