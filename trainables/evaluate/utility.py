"""Utility metrics of a multi-label classifier: AUROC, Youden thresholds and thresholded rates.

Conventions shared by the whole `trainables.evaluate` package:

- ``y_true``: array [n, k] of 0/1 (any int, bool or float dtype), one column per label.
- ``y_score``: float array [n, k] of the model's scores (sigmoid probabilities or logits). AUROC and
  Youden thresholds depend only on the order of the scores, so both give the same ranking results; a
  threshold is in the units of the scores it was fitted on and must be applied to scores of that kind.
- A label whose slice holds only one class has no AUROC, no Youden threshold, and NaN for every rate
  whose denominator is empty; NaN is the value, never a silent 0 or 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score, roc_curve


def check_label_arrays(
    y_true: ArrayLike, y_score: ArrayLike, where: str = "evaluation"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a (labels, scores) pair to (int8 [n, k], float64 [n, k]).

    Args:
        y_true: 0/1 labels [n, k].
        y_score: finite scores [n, k].
        where: what is being evaluated, for error messages (e.g. ``"test"``).

    Raises:
        ValueError: naming the problem (shape, a non-0/1 label, a non-finite score) and where it is.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_score.ndim != 2:
        raise ValueError(
            f"{where}: y_true and y_score must be 2-D [n_images, n_labels], got shapes {y_true.shape} and "
            f"{y_score.shape}; for a single label pass a column (x.reshape(-1, 1))"
        )
    if y_true.shape != y_score.shape:
        raise ValueError(f"{where}: y_true has shape {y_true.shape} but y_score has shape {y_score.shape}")
    if y_true.shape[0] == 0:
        raise ValueError(f"{where}: no images to evaluate (n = 0)")
    not_binary = ~np.isin(y_true, (0, 1))
    if not_binary.any():
        row, col = np.argwhere(not_binary)[0]
        raise ValueError(
            f"{where}: y_true[{row}, {col}] = {y_true[row, col].item()!r} ({not_binary.sum()} such entries); "
            "labels must be 0 or 1 (drop or map uncertain labels when preparing the dataset)"
        )
    not_finite = ~np.isfinite(y_score)
    if not_finite.any():
        row, col = np.argwhere(not_finite)[0]
        raise ValueError(
            f"{where}: y_score[{row}, {col}] = {y_score[row, col]} ({not_finite.sum()} non-finite scores); "
            "scores must be finite (a diverged model produces NaN logits)"
        )
    return y_true.astype(np.int8), y_score


def has_both_classes(y_true: np.ndarray) -> np.ndarray:
    """Per label [k]: True when the column holds at least one positive and one negative."""
    n_pos: np.ndarray = y_true.sum(axis=0)
    both: np.ndarray = (n_pos > 0) & (n_pos < y_true.shape[0])
    return both


def auroc_per_label(y_true: ArrayLike, y_score: ArrayLike) -> np.ndarray:
    """AUROC of each label [k], equal to `sklearn.metrics.roc_auc_score` on that column.

    AUROC is the probability that a random positive scores higher than a random negative, ties counted
    one half (the trapezoidal area under the ROC curve). It is NaN for a label whose column holds only
    one class.
    """
    y_true, y_score = check_label_arrays(y_true, y_score)
    measurable = has_both_classes(y_true)
    return np.array(
        [roc_auc_score(y_true[:, j], y_score[:, j]) if measurable[j] else np.nan for j in range(y_true.shape[1])]
    )


def macro_mean(per_label: ArrayLike) -> float:
    """Unweighted mean over labels, ignoring NaN (unmeasurable) labels; NaN when no label is measurable.

    This is the headline "macro AUROC": a label absent from a slice (e.g. no pneumonia positives in a
    subgroup) drops out of that slice's mean instead of being counted as 0.5.
    """
    values = np.asarray(per_label, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def macro_auroc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Unweighted mean over labels of per-label AUROC (`auroc_per_label`, then `macro_mean`: labels with one
    class in the split are skipped)."""
    return macro_mean(auroc_per_label(y_true, y_score))


def youden_thresholds(y_true: ArrayLike, y_score: ArrayLike) -> np.ndarray:
    """Per-label threshold maximizing Youden's J = TPR - FPR over the ROC curve [k].

    Candidates are all of `sklearn.metrics.roc_curve`'s thresholds with ``drop_intermediate=False``:
    every distinct score of the column plus ``+inf`` (nothing predicted positive, J = 0). The threshold
    is applied as ``prediction = score >= threshold``, which reproduces that ROC point exactly.

    Tie-breaking: among thresholds with equal maximal J, the highest threshold wins (the first in
    ``roc_curve``'s decreasing order), i.e. the most conservative cut-off with the fewest positive
    predictions. If no threshold has J > 0 the result is ``+inf``. A label with one class gets NaN.

    Args:
        y_true: 0/1 labels [n, k] of the split the thresholds are fitted on (validation in dpsweep).
        y_score: scores [n, k] on the same split; thresholds are in the same units.
    """
    y_true, y_score = check_label_arrays(y_true, y_score)
    measurable = has_both_classes(y_true)
    thresholds = np.full(y_true.shape[1], np.nan)
    for j in np.flatnonzero(measurable):
        fpr, tpr, candidates = roc_curve(y_true[:, j], y_score[:, j], drop_intermediate=False)
        thresholds[j] = candidates[np.argmax(tpr - fpr)]
    return thresholds


@dataclass(frozen=True)
class ConfusionCounts:
    """Confusion counts per label [k] at given thresholds (``prediction = score >= threshold``).

    Counts are float64 so that a label without a threshold (NaN) carries NaN counts and NaN rates.

    Attributes:
        tp: positives predicted positive.
        fp: negatives predicted positive.
        tn: negatives predicted negative.
        fn: positives predicted negative.
    """

    tp: np.ndarray
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray

    @property
    def n(self) -> np.ndarray:
        total: np.ndarray = self.tp + self.fp + self.tn + self.fn
        return total

    def sensitivity(self) -> np.ndarray:
        """TPR = TP / (TP + FN); NaN without positives."""
        return _ratio(self.tp, self.tp + self.fn)

    def specificity(self) -> np.ndarray:
        """TNR = TN / (TN + FP); NaN without negatives."""
        return _ratio(self.tn, self.tn + self.fp)

    def fpr(self) -> np.ndarray:
        """FPR = FP / (FP + TN) = 1 - specificity; NaN without negatives."""
        return _ratio(self.fp, self.fp + self.tn)

    def accuracy(self) -> np.ndarray:
        """(TP + TN) / n; NaN for an empty slice."""
        return _ratio(self.tp + self.tn, self.n)

    def ppv(self) -> np.ndarray:
        """Precision = TP / (TP + FP); NaN when nothing is predicted positive."""
        return _ratio(self.tp, self.tp + self.fp)

    def f1(self) -> np.ndarray:
        """F1 = 2 TP / (2 TP + FP + FN), the harmonic mean of PPV and sensitivity where both exist.

        It is 0 when there are positives but none is found (PPV undefined, sensitivity 0), and NaN only
        when there are neither positives nor positive predictions.
        """
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def selection_rate(self) -> np.ndarray:
        """Positive-prediction rate (TP + FP) / n; NaN for an empty slice."""
        return _ratio(self.tp + self.fp, self.n)


def confusion_counts(y_true: ArrayLike, y_score: ArrayLike, thresholds: ArrayLike) -> ConfusionCounts:
    """Count TP/FP/TN/FN per label with ``prediction = score >= threshold``.

    Args:
        y_true: 0/1 labels [n, k].
        y_score: scores [n, k], in the units the thresholds were fitted in.
        thresholds: one threshold per label [k]; NaN (no threshold) gives NaN counts for that label.
    """
    y_true, y_score = check_label_arrays(y_true, y_score)
    thresholds = check_thresholds(thresholds, y_true.shape[1])
    positive = y_true.astype(bool)
    predicted = y_score >= thresholds[None, :]
    counts = {
        "tp": (predicted & positive).sum(axis=0),
        "fp": (predicted & ~positive).sum(axis=0),
        "tn": (~predicted & ~positive).sum(axis=0),
        "fn": (~predicted & positive).sum(axis=0),
    }
    undefined = np.isnan(thresholds)
    return ConfusionCounts(**{name: np.where(undefined, np.nan, c.astype(np.float64)) for name, c in counts.items()})


@dataclass(frozen=True)
class ThresholdedMetrics:
    """Per-label [k] rates at fixed thresholds; NaN where a denominator is empty (see `ConfusionCounts`).

    Attributes:
        sensitivity: TP / (TP + FN).
        specificity: TN / (TN + FP).
        accuracy: (TP + TN) / n.
        ppv: TP / (TP + FP).
        f1: 2 TP / (2 TP + FP + FN).
    """

    sensitivity: np.ndarray
    specificity: np.ndarray
    accuracy: np.ndarray
    ppv: np.ndarray
    f1: np.ndarray

    @classmethod
    def from_counts(cls, counts: ConfusionCounts) -> ThresholdedMetrics:
        return cls(
            sensitivity=counts.sensitivity(),
            specificity=counts.specificity(),
            accuracy=counts.accuracy(),
            ppv=counts.ppv(),
            f1=counts.f1(),
        )

    def as_dict(self) -> dict[str, np.ndarray]:
        """Family name (as in `names.THRESHOLDED_METRICS`) -> per-label array."""
        return {
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "accuracy": self.accuracy,
            "ppv": self.ppv,
            "f1": self.f1,
        }


def thresholded_metrics(y_true: ArrayLike, y_score: ArrayLike, thresholds: ArrayLike) -> ThresholdedMetrics:
    """Sensitivity, specificity, accuracy, PPV and F1 per label at ``prediction = score >= threshold``."""
    return ThresholdedMetrics.from_counts(confusion_counts(y_true, y_score, thresholds))


def check_thresholds(thresholds: ArrayLike, n_labels: int) -> np.ndarray:
    """Validate one threshold per label (NaN allowed: no threshold) and return them as float64 [k]."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (n_labels,):
        raise ValueError(
            f"thresholds must have one value per label, shape ({n_labels},), got shape {thresholds.shape}; "
            "fit them with fit_thresholds(y_true_val, y_score_val)"
        )
    return thresholds


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
