"""Evaluation of a trained model's scores: utility, paired bootstrap, subgroup fairness (pure numpy/sklearn).

No torch, Ray or MLflow here: every function takes arrays and returns numbers or tables. A trial calls
`fit_thresholds` on validation and `evaluate_split` on each test split; analysis compares trials with
`paired_p_value` on the stored per-replicate AUROCs.
"""

from trainables.evaluate.bootstrap import (
    BootstrapAUROC,
    bootstrap_auroc,
    bootstrap_indices,
    paired_bootstrap_auroc,
    paired_p_value,
    percentile_ci,
)
from trainables.evaluate.fairness import (
    ATTRIBUTES,
    AttributeFairness,
    Grouping,
    attribute_fairness,
    make_grouping,
)
from trainables.evaluate.report import Evaluation, evaluate_split, fit_thresholds
from trainables.evaluate.utility import (
    auroc_per_label,
    macro_mean,
    thresholded_metrics,
    youden_thresholds,
)

__all__ = [
    "ATTRIBUTES",
    "AttributeFairness",
    "BootstrapAUROC",
    "Evaluation",
    "Grouping",
    "attribute_fairness",
    "auroc_per_label",
    "bootstrap_auroc",
    "bootstrap_indices",
    "evaluate_split",
    "fit_thresholds",
    "macro_mean",
    "make_grouping",
    "paired_bootstrap_auroc",
    "paired_p_value",
    "percentile_ci",
    "thresholded_metrics",
    "youden_thresholds",
]
