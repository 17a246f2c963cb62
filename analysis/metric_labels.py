"""Human labels for metric keys, for figure axes, legends and the report's LaTeX tables.

One mapping from the metric-name constants of `trainables.names` to the words a paper uses ("Test macro AUROC",
"ε spent", "AUROC gap (sex)"). Fixed keys are looked up in `METRIC_LABELS`; keys with an attribute, group, dataset
or label in them (``test/fairness/auroc_gap/sex``, ``external/<name>/auroc_macro``, ...) are recognised by building
the same key with the `trainables.names` functions, so a renamed key changes its label here too. A key this module
does not know is returned unchanged (it is still a valid, if raw, label).
"""

from __future__ import annotations

import functools

from trainables import names
from trainables.data.labels import LABELS
from trainables.evaluate.fairness import ATTRIBUTES

SPLITS: dict[str, str] = {"test": "Test", "val": "Validation"}
"""Split prefixes of metric keys and their words."""

METRIC_LABELS: dict[str, str] = {
    names.EPSILON: "ε spent",
    names.EPSILON_AT_BEST_EPOCH: "ε spent at the selected epoch",
    names.EPSILON_REPLACE_ONE: "ε spent, read as replace-one",
    names.EPSILON_PATIENT: "ε per patient (largest patient)",
    names.EPSILON_PATIENT_P99: "ε per patient (99th percentile)",
    names.PATIENT_IMAGES: "Images of the largest patient",
    names.PATIENT_IMAGES_P99: "Images per patient (99th percentile)",
    names.STEPS: "DP-SGD steps",
    names.RELEASED_STEPS: "Released DP-SGD steps",
    names.TUNING_EPSILON: "Tuning ε",
    names.SYSTEM_TOTAL_TRAIN_S: "Training time (s)",
    names.EPOCH: "Epoch",
    names.TRAIN_LOSS: "Training loss",
    names.VAL_LOSS: "Validation loss",
    names.VAL_AUROC_MACRO: "Validation macro AUROC",
    names.VAL_SELECTED_AUROC_MACRO: "Validation macro AUROC (selected epoch)",
    names.TEST_AUROC_MACRO: "Test macro AUROC",
    names.TEST_AUROC_MACRO_AT_EPOCH: "Test macro AUROC (per epoch)",
    names.BEST_EPOCH: "Selected epoch",
    names.auroc_macro_ci("test", "low"): "Test macro AUROC, 95% CI low",
    names.auroc_macro_ci("test", "high"): "Test macro AUROC, 95% CI high",
    "target_epsilon": "Target ε",
    "max_grad_norm": "Clip norm",
    "lr": "Learning rate",
    "init": "Init",
    "bin": "ε bin",
    "trial": "Trial",
    "model": "Model",
    "dataset": "Dataset",
    "seed": "Seed",
    "status": "Status",
    "auroc_gap_label_mean": "AUROC gap, label mean",
    "worst_group_auroc": "Worst-group macro AUROC",
    "n_images": "Images",
    "labels_defined": "Labels with both classes",
    "auroc_macro": "Macro AUROC",
    "in_gap": "In the gap",
    "note": "Note",
}
"""Fixed keys (metric-name constants and the trial table's parameter columns) -> label."""

_FAIRNESS_WORDS: dict[str, str] = {
    "auroc_gap": "AUROC gap",
    "tpr_gap": "TPR gap",
    "fpr_gap": "FPR gap",
    "eod": "Equalized-odds difference",
    "aod": "Average-odds difference",
    "ppv_gap": "PPV gap",
    "spd": "Statistical-parity difference",
    "accuracy_gap": "Accuracy gap",
}
"""Words of each `trainables.names.FAIRNESS_METRICS` family."""


def metric_label(key: str) -> str:
    """The human label of a metric key or trial-table column, e.g. ``test/fairness/auroc_gap/sex`` ->
    ``"AUROC gap (sex)"``; an unknown key comes back unchanged.

    Test-split fairness keys carry no split word (the study's fairness numbers are on test); validation ones start
    with "Validation". External sets read ``"External macro AUROC (<dataset>)"``.
    """
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    return _fixed_labels().get(key) or _subgroup_label(key) or _external_label(key) or key


@functools.cache
def _fixed_labels() -> dict[str, str]:
    """Labels of every key the name functions make from the fixed attributes, splits, families and labels (the first
    rule that names a key wins)."""
    labels = dict(_FAIRNESS_WORDS)  # a family alone, as a column of the fairness tables
    for attribute in ATTRIBUTES:
        labels.setdefault(names.auroc_gap_at_epoch(attribute), f"AUROC gap ({attribute}, per epoch)")
        labels.setdefault(
            names.val_selected_auroc_gap(attribute), f"Validation AUROC gap ({attribute}, selected epoch)"
        )
        for split, word in SPLITS.items():
            prefix = "" if split == "test" else f"{word} "
            for family, words in _FAIRNESS_WORDS.items():
                labels.setdefault(names.fairness(split, family, attribute), f"{prefix}{words} ({attribute})")
            labels.setdefault(
                names.auroc_gap_label_mean(split, attribute), f"{prefix}AUROC gap, label mean ({attribute})"
            )
            labels.setdefault(
                names.worst_group_auroc(split, attribute), f"{prefix}Worst-group macro AUROC ({attribute})"
            )
    for split, word in SPLITS.items():
        for label in LABELS:
            labels.setdefault(names.auroc(split, label), f"{word} AUROC ({label.replace('_', ' ')})")
    return labels


def _subgroup_label(key: str) -> str | None:
    """``<word> macro AUROC (<attribute> <group>)`` for a subgroup's AUROC key, any group name."""
    for attribute in ATTRIBUTES:
        for split, word in SPLITS.items():
            group = key.removeprefix(names.subgroup_auroc(split, attribute, ""))
            if group != key and group and key == names.subgroup_auroc(split, attribute, group):
                return f"{word} macro AUROC ({attribute} {group})"
    return None


def _external_label(key: str) -> str | None:
    if key.startswith("external/"):
        dataset = key.removeprefix("external/").rpartition("/")[0]
        if dataset and key == names.external_auroc(dataset):
            return f"External macro AUROC ({dataset})"
    return None
