"""Human labels for metric keys, for figure axes, legends and the report's LaTeX tables.

One mapping from the metric-name constants of `trainables.names` to the words a paper uses ("Test macro AUROC",
"ε spent", "AUROC gap (sex)"). Fixed keys are looked up in `METRIC_LABELS`; keys with an attribute, group, dataset
or label in them (``test/fairness/auroc_gap/sex``, ``external/<name>/auroc_macro``, ...) are recognised by building
the same key with the `trainables.names` functions, so a renamed key changes its label here too. A key this module
does not know is returned unchanged (it is still a valid, if raw, label).
"""

from __future__ import annotations

from trainables import names
from trainables.data.labels import LABELS
from trainables.evaluate.fairness import ATTRIBUTES

SPLITS: dict[str, str] = {"test": "Test", "val": "Validation"}
"""Split prefixes of metric keys and their words."""

METRIC_LABELS: dict[str, str] = {
    names.EPSILON: "ε spent",
    names.EPSILON_AT_BEST_EPOCH: "ε spent at the selected epoch",
    names.EPSILON_PATIENT: "ε per patient (largest patient)",
    names.EPSILON_PATIENT_P99: "ε per patient (99th percentile)",
    names.PATIENT_IMAGES: "Images of the largest patient",
    names.PATIENT_IMAGES_P99: "Images per patient (99th percentile)",
    names.STEPS: "DP-SGD steps",
    names.RELEASED_STEPS: "Released DP-SGD steps",
    names.TUNING_EPSILON: "Tuning ε",
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
    if key in _FAIRNESS_WORDS:  # a family alone, as a column of the fairness tables
        return _FAIRNESS_WORDS[key]
    for attribute in ATTRIBUTES:
        if key == names.auroc_gap_at_epoch(attribute):
            return f"AUROC gap ({attribute}, per epoch)"
        if key == names.val_selected_auroc_gap(attribute):
            return f"Validation AUROC gap ({attribute}, selected epoch)"
        for split, word in SPLITS.items():
            prefix = "" if split == "test" else f"{word} "
            for family, words in _FAIRNESS_WORDS.items():
                if key == names.fairness(split, family, attribute):
                    return f"{prefix}{words} ({attribute})"
            if key == names.auroc_gap_label_mean(split, attribute):
                return f"{prefix}AUROC gap, label mean ({attribute})"
            if key == names.worst_group_auroc(split, attribute):
                return f"{prefix}Worst-group macro AUROC ({attribute})"
            group = key.removeprefix(names.subgroup_auroc(split, attribute, ""))
            if group != key and group and key == names.subgroup_auroc(split, attribute, group):
                return f"{word} macro AUROC ({attribute} {group})"
    for split, word in SPLITS.items():
        for label in LABELS:
            if key == names.auroc(split, label):
                return f"{word} AUROC ({label.replace('_', ' ')})"
    if key.startswith("external/"):
        dataset = key.removeprefix("external/").rpartition("/")[0]
        if dataset and key == names.external_auroc(dataset):
            return f"External macro AUROC ({dataset})"
    return key
