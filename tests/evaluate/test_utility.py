"""AUROC, Youden thresholds and thresholded rates against sklearn and hand-computed values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainables.evaluate.utility import (
    auroc_per_label,
    check_label_arrays,
    confusion_counts,
    macro_mean,
    thresholded_metrics,
    youden_thresholds,
)


def _random_labels_and_scores(n: int, k: int, seed: int, levels: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.int64)
    score = rng.normal(size=(n, k)) + y
    if levels is not None:  # coarse scores: many ties, also across classes
        score = np.round(score * levels / 4) / levels
    return y, score


@pytest.mark.parametrize("levels", [None, 3])
def test_auroc_equals_sklearn_per_label(levels):
    y, score = _random_labels_and_scores(300, 4, seed=1, levels=levels)
    expected = [roc_auc_score(y[:, j], score[:, j]) for j in range(4)]
    np.testing.assert_allclose(auroc_per_label(y, score), expected, rtol=0, atol=1e-15)


def test_auroc_is_rank_based_probabilities_and_logits_agree():
    y, logits = _random_labels_and_scores(200, 3, seed=2)
    probabilities = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(auroc_per_label(y, logits), auroc_per_label(y, probabilities), atol=1e-15)


def test_auroc_nan_for_single_class_label_without_warning():
    y = np.array([[1, 0], [1, 1], [1, 0]])
    score = np.array([[0.2, 0.1], [0.5, 0.9], [0.7, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = auroc_per_label(y, score)
    assert np.isnan(result[0])
    assert result[1] == 1.0


def test_auroc_accepts_float_labels():
    y = np.array([[0.0], [1.0], [0.0], [1.0]])
    score = np.array([[0.1], [0.4], [0.5], [0.8]])  # 1 + 2 of 4 pairs ordered
    assert auroc_per_label(y, score)[0] == 0.75


def test_macro_mean_skips_nan_and_is_nan_when_nothing_is_measurable():
    assert macro_mean([0.8, np.nan, 0.6]) == pytest.approx(0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(macro_mean([np.nan, np.nan]))


def test_youden_thresholds_hand_made():
    y = np.array(
        [
            # columns: mixed | unique max | worse than chance | one class | tied scores
            [0, 0, 1, 1, 0],
            [1, 0, 1, 1, 1],
            [0, 1, 0, 1, 1],
            [1, 1, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ]
    )
    score = np.array(
        [
            [0.1, 0.1, 0.1, 0.3, 0.5],
            [0.2, 0.2, 0.2, 0.2, 0.5],
            [0.3, 0.3, 0.3, 0.1, 0.9],
            [0.4, 0.4, 0.4, 0.4, 0.1],
            [0.45, 0.05, 0.5, 0.5, 0.2],
        ]
    )
    # J = TPR - FPR at each threshold (decreasing), +inf first with J = 0:
    # col 0: 0.45 -1/3, 0.4 1/6, 0.3 -1/6, 0.2 1/3, 0.1 0 -> 0.2
    # col 1: positives 0.3, 0.4 above every negative: 0.4 1/2, 0.3 1 -> 0.3
    # col 2: positives score lowest, J <= 0 everywhere -> +inf (J = 0, first in decreasing order)
    # col 3: one class -> NaN
    # col 4: 0.9 1/3, 0.5 (a positive and a negative) 2/3 - 1/2 = 1/6, 0.2 1 - 1/2 = 1/2, 0.1 0 -> 0.2
    expected = np.array([0.2, 0.3, np.inf, np.nan, 0.2])
    np.testing.assert_array_equal(youden_thresholds(y, score), expected)


def test_youden_tie_breaks_to_highest_threshold():
    y = np.array([[0], [1], [0], [1]])
    score = np.array([[0.1], [0.2], [0.3], [0.4]])
    # J = 0.5 at 0.4 (TPR 1/2, FPR 0) and at 0.2 (TPR 1, FPR 1/2): the higher one wins.
    assert youden_thresholds(y, score)[0] == 0.4


def test_youden_threshold_reproduces_the_roc_point_and_commutes_with_monotone_maps():
    y, logits = _random_labels_and_scores(400, 3, seed=3)
    thresholds = youden_thresholds(y, logits)
    counts = confusion_counts(y, logits, thresholds)
    best_j = counts.sensitivity() - counts.fpr()
    for j in range(3):
        grid = np.unique(logits[:, j])
        pred = logits[:, j][:, None] >= grid[None, :]
        tpr = (pred & (y[:, j][:, None] == 1)).sum(0) / y[:, j].sum()
        fpr = (pred & (y[:, j][:, None] == 0)).sum(0) / (1 - y[:, j]).sum()
        assert best_j[j] == pytest.approx((tpr - fpr).max(), abs=1e-12)
    probabilities = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(youden_thresholds(y, probabilities), 1 / (1 + np.exp(-thresholds)), rtol=1e-12)


def test_thresholded_metrics_hand_made_fit_on_val_apply_to_test():
    y_val = np.array([[0], [0], [1], [1]])
    score_val = np.array([[0.1], [0.3], [0.6], [0.8]])
    thresholds = youden_thresholds(y_val, score_val)
    assert thresholds[0] == 0.6
    y_test = np.array([[1], [1], [1], [0], [0], [0], [0]])
    score_test = np.array([[0.9], [0.6], [0.2], [0.7], [0.3], [0.1], [0.6]])
    # score >= 0.6: TP = 2 (0.9, 0.6 counts as positive), FN = 1, FP = 2 (0.7, 0.6), TN = 2
    counts = confusion_counts(y_test, score_test, thresholds)
    assert (counts.tp[0], counts.fn[0], counts.fp[0], counts.tn[0]) == (2, 1, 2, 2)
    metrics = thresholded_metrics(y_test, score_test, thresholds)
    assert metrics.sensitivity[0] == pytest.approx(2 / 3)
    assert metrics.specificity[0] == pytest.approx(2 / 4)
    assert metrics.accuracy[0] == pytest.approx(4 / 7)
    assert metrics.ppv[0] == pytest.approx(2 / 4)
    assert metrics.f1[0] == pytest.approx(4 / 7)  # 2TP / (2TP + FP + FN) = 4 / 7
    assert counts.selection_rate()[0] == pytest.approx(4 / 7)


def test_thresholded_metrics_undefined_cases_are_nan():
    y = np.array([[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]])
    score = np.array([[0.1, 0.2, 0.9, 0.5], [0.2, 0.3, 0.8, 0.5], [0.3, 0.1, 0.7, 0.5]])
    thresholds = np.array([0.5, 0.5, 0.5, np.nan])
    m = thresholded_metrics(y, score, thresholds)
    # label 0: no positives, nothing predicted positive
    assert np.isnan(m.sensitivity[0]) and m.specificity[0] == 1 and np.isnan(m.ppv[0]) and np.isnan(m.f1[0])
    # label 1: positives but nothing predicted positive -> PPV undefined, F1 = 0, sensitivity 0
    assert m.sensitivity[1] == 0 and np.isnan(m.ppv[1]) and m.f1[1] == 0
    # label 2: no positives, all predicted positive -> specificity 0, PPV 0, F1 0
    assert np.isnan(m.sensitivity[2]) and m.specificity[2] == 0 and m.ppv[2] == 0 and m.f1[2] == 0
    # label 3: no threshold -> every rate NaN
    for values in m.as_dict().values():
        assert np.isnan(values[3])


@pytest.mark.parametrize(
    ("y", "score", "message"),
    [
        ([[0, 1], [1, -1]], [[0.1, 0.2], [0.3, 0.4]], r"y_true\[1, 1\] = -1"),
        ([[0, 1], [1, 0]], [[0.1, np.nan], [0.3, 0.4]], r"y_score\[0, 1\] = nan"),
        ([[0, 1], [1, 0]], [[0.1, 0.2]], "shape"),
        ([0, 1, 1], [0.1, 0.2, 0.3], "reshape"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "n = 0"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(y, score, message):
    with pytest.raises(ValueError, match=message):
        check_label_arrays(y, score, where="test")


def test_threshold_count_must_match_labels():
    with pytest.raises(ValueError, match=r"one value per label, shape \(2,\)"):
        confusion_counts([[0, 1]], [[0.1, 0.2]], [0.5])
