"""One call that evaluates a trained model's scores on one split: utility, bootstrap CIs and fairness.

A trial calls `fit_thresholds` on its validation scores and `evaluate_split` on its test (and external
test) scores at the end of training; `Evaluation.metrics` goes to the tracker as is, the two tables as
artifacts. Only labels, scores and demographics come in; no image, path or patient id goes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from trainables import names
from trainables.data.labels import LABELS
from trainables.evaluate.bootstrap import BootstrapAUROC, paired_bootstrap_auroc
from trainables.evaluate.fairness import (
    DEFAULT_AGE_EDGES,
    AttributeFairness,
    Grouping,
    attribute_fairness,
    make_grouping,
)
from trainables.evaluate.utility import (
    auroc_per_label,
    check_label_arrays,
    check_thresholds,
    macro_mean,
    thresholded_metrics,
    youden_thresholds,
)


@dataclass(frozen=True)
class Evaluation:
    """Everything a reviewer asks for about one model on one split.

    Attributes:
        metrics: flat ``split/family/name`` keys (see `trainables.names`) -> float, NaN where
            undefined; every key is a valid MLflow metric name.
        groups: tidy per-(attribute, group, label) table, see `fairness.group_table`.
        bootstrap: per-replicate AUROCs (float32, ``auroc_macro`` + one column per label, index
            ``replicate``), the input of `bootstrap.paired_p_value`; empty when ``n_boot = 0``.
        thresholds: the per-label thresholds used [k], in the units of ``y_score``.
        thresholds_fitted_here: True when the thresholds were fitted on this split itself (``thresholds``
            not given): optimistic for a test split, as in the reference study.
        worst_groups: attribute -> group with the lowest macro AUROC (None when no group is measurable);
            strings, for run tags rather than metrics.
    """

    metrics: dict[str, float]
    groups: pd.DataFrame
    bootstrap: pd.DataFrame
    thresholds: np.ndarray
    thresholds_fitted_here: bool
    worst_groups: dict[str, str | None]


def fit_thresholds(y_true_val: ArrayLike, y_score_val: ArrayLike) -> np.ndarray:
    """Youden thresholds per label [k] fitted on validation, to pass to `evaluate_split` for test.

    See `utility.youden_thresholds` (argmax TPR - FPR, highest threshold on ties, NaN for a label with
    one class on validation, which makes that label's thresholded test metrics NaN).
    """
    return youden_thresholds(y_true_val, y_score_val)


def evaluate_split(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    sex: ArrayLike,
    age: ArrayLike,
    thresholds: ArrayLike | None = None,
    age_edges: Sequence[float] = DEFAULT_AGE_EDGES,
    n_boot: int = 1000,
    boot_seed: int = 0,
    prefix: str = "test",
    labels: Sequence[str] = LABELS,
) -> Evaluation:
    """Evaluate one model's scores on one split.

    Metric keys (``p`` = ``prefix``, ``l`` = label, ``a`` = ``sex``/``age``, ``g`` = group key):

    - ``p/n_images``; ``p/auroc/l``; ``p/auroc_macro`` (NaN-skipping mean over labels).
    - ``p/auroc_macro_ci_low|high``, ``p/auroc_ci_low|high/l``: 95% percentile bootstrap CIs over
      `bootstrap.bootstrap_indices` (n, n_boot, boot_seed); ``p/bootstrap/n_boot``,
      ``p/bootstrap/undefined_replicates`` (left out of the macro CI). Omitted when ``n_boot = 0``.
    - ``p/threshold/l`` and ``p/sensitivity|specificity|accuracy|ppv|f1/l`` at those thresholds.
    - ``p/subgroup_auroc/a/g``: the group's macro AUROC.
    - ``p/fairness/<family>/a/l`` per label and ``p/fairness/<family>/a`` averaged over labels, for the
      families of `fairness` (auroc_gap, tpr_gap, fpr_gap, eod, aod, ppv_gap, spd, accuracy_gap), except
      ``p/fairness/auroc_gap/a`` = gap of the groups' macro AUROCs (`trainables.names.auroc_gap`); the
      label mean of AUROC gaps is ``p/fairness/auroc_gap_label_mean/a``.
    - ``p/fairness/worst_group_auroc/a``, ``p/fairness/skipped_groups/a`` ((group, label) pairs without
      positives or negatives), ``p/fairness/excluded_images/a`` (unknown sex, missing or out-of-range age).

    Args:
        y_true: 0/1 labels [n, k].
        y_score: scores [n, k] (probabilities or logits).
        sex: per image ``F``/``M``/``unknown``.
        age: per image age in years, NaN when missing.
        thresholds: per-label thresholds [k] from `fit_thresholds` on validation; None fits Youden
            thresholds on this split (right for the validation split itself, optimistic for test).
        age_edges: age bin edges in years, bins ``[e_i, e_i+1)``.
        n_boot: bootstrap replicates; 0 skips the bootstrap.
        boot_seed: bootstrap seed; keep it fixed per dataset so that trials are paired.
        prefix: key prefix: ``val``, ``test`` or ``external/<dataset>``.
        labels: label names, one per column.
    """
    y_true, y_score = check_label_arrays(y_true, y_score, where=prefix)
    n_labels = y_true.shape[1]
    labels = tuple(labels)
    if len(labels) != n_labels:
        raise ValueError(f"{prefix}: {len(labels)} label names {labels} for {n_labels} label columns")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 0:
        raise ValueError(f"{prefix}: n_boot must be an integer >= 0 (0 skips the bootstrap), got {n_boot!r}")
    fitted_here = thresholds is None
    thresholds = youden_thresholds(y_true, y_score) if thresholds is None else check_thresholds(thresholds, n_labels)

    metrics = _utility_metrics(y_true, y_score, thresholds, labels, prefix)
    bootstrap_frame = pd.DataFrame(columns=["auroc_macro", *labels], dtype=np.float32)
    if n_boot > 0:
        boot = paired_bootstrap_auroc(y_true, y_score, labels=labels, n_boot=n_boot, seed=boot_seed)
        metrics |= _bootstrap_metrics(boot, prefix)
        bootstrap_frame = boot.to_frame()

    tables, worst_groups = [], {}
    for grouping in (make_grouping("sex", sex), make_grouping("age", age, edges=age_edges)):
        result = attribute_fairness(y_true, y_score, thresholds, grouping, labels)
        metrics |= _fairness_metrics(result, grouping, labels, prefix)
        tables.append(result.table)
        worst_groups[grouping.attribute] = result.worst_group

    return Evaluation(
        metrics=metrics,
        groups=pd.concat(tables, ignore_index=True),
        bootstrap=bootstrap_frame,
        thresholds=thresholds,
        thresholds_fitted_here=fitted_here,
        worst_groups=worst_groups,
    )


def _utility_metrics(
    y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray, labels: tuple[str, ...], prefix: str
) -> dict[str, float]:
    per_label = auroc_per_label(y_true, y_score)
    metrics = {names.n_images(prefix): float(len(y_true)), names.auroc_macro(prefix): macro_mean(per_label)}
    metrics |= {names.auroc(prefix, label): float(v) for label, v in zip(labels, per_label, strict=True)}
    rates = {"threshold": thresholds} | thresholded_metrics(y_true, y_score, thresholds).as_dict()
    for family, values in rates.items():
        metrics |= {names.thresholded(prefix, family, label): float(v) for label, v in zip(labels, values, strict=True)}
    return metrics


def _bootstrap_metrics(boot: BootstrapAUROC, prefix: str) -> dict[str, float]:
    low, high = boot.macro_ci()
    metrics = {names.auroc_macro_ci(prefix, "low"): low, names.auroc_macro_ci(prefix, "high"): high}
    for label, (low, high) in zip(boot.labels, boot.per_label_ci(), strict=True):
        metrics[names.auroc_ci(prefix, label, "low")] = float(low)
        metrics[names.auroc_ci(prefix, label, "high")] = float(high)
    metrics[names.bootstrap_replicates(prefix)] = float(boot.n_boot)
    metrics[names.bootstrap_undefined(prefix)] = float(boot.n_undefined)
    return metrics


def _fairness_metrics(
    result: AttributeFairness, grouping: Grouping, labels: tuple[str, ...], prefix: str
) -> dict[str, float]:
    attribute = grouping.attribute
    metrics = {
        names.subgroup_auroc(prefix, attribute, key): float(result.group_macro_auroc[group])
        for group, key in zip(grouping.groups, grouping.keys, strict=True)
    }
    for family in names.FAIRNESS_METRICS:
        for label in labels:
            metrics[names.fairness(prefix, family, attribute, label)] = float(result.per_label.at[label, family])
        if family != "auroc_gap":  # the attribute-level auroc_gap key is the gap of macro AUROCs
            metrics[names.fairness(prefix, family, attribute)] = result.label_mean[family]
    metrics[names.fairness(prefix, "auroc_gap", attribute)] = result.macro_auroc_gap
    metrics[names.auroc_gap_label_mean(prefix, attribute)] = result.label_mean["auroc_gap"]
    metrics[names.worst_group_auroc(prefix, attribute)] = result.worst_group_auroc
    metrics[names.skipped_groups(prefix, attribute)] = float(result.n_skipped)
    metrics[names.excluded_images(prefix, attribute)] = float(result.n_excluded)
    return metrics
