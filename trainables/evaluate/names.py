"""Metric keys written by `trainables.evaluate`, in the ``split/family/name`` style of `trainables.metrics`.

Keys that `trainables.metrics` already defines (``test/auroc_macro``, ``test/auroc/<label>``,
``<split>/subgroup_auroc/<attribute>/<group>``, ``<split>/fairness/auroc_gap/<attribute>``) are built by
its functions, so both modules always agree; the rest are new and live here until they move there.

``split`` is the evaluation prefix: ``val``, ``test`` or ``external/<dataset>`` (so that
``external_auroc(dataset)`` equals ``auroc_macro(f"external/{dataset}")``).
"""

from __future__ import annotations

from trainables import metrics
from trainables.data.labels import LABELS

THRESHOLDED_METRICS: tuple[str, ...] = ("threshold", "sensitivity", "specificity", "accuracy", "ppv", "f1")
"""Per-label families at the Youden thresholds (``threshold`` is the cut-off itself)."""

FAIRNESS_METRICS: tuple[str, ...] = (
    "auroc_gap",
    "tpr_gap",
    "fpr_gap",
    "eod",
    "aod",
    "ppv_gap",
    "spd",
    "accuracy_gap",
)
"""Per-label fairness families; see `trainables.evaluate.fairness` for each exact definition."""

CI_BOUNDS: tuple[str, ...] = ("low", "high")


def auroc_macro(split: str) -> str:
    """Unweighted mean AUROC over labels, e.g. ``test/auroc_macro``."""
    return f"{split}/auroc_macro"


def auroc(split: str, label: str) -> str:
    """AUROC of one label, e.g. ``test/auroc/cardiomegaly`` (equals `metrics.test_auroc` on ``test``)."""
    if split == "test" and label in LABELS:
        return metrics.test_auroc(label)
    return f"{split}/auroc/{label}"


def auroc_macro_ci(split: str, bound: str) -> str:
    """Bootstrap percentile-CI bound of the macro AUROC, e.g. ``test/auroc_macro_ci_low``."""
    _check_bound(bound)
    return f"{split}/auroc_macro_ci_{bound}"


def auroc_ci(split: str, label: str, bound: str) -> str:
    """Bootstrap percentile-CI bound of one label's AUROC, e.g. ``test/auroc_ci_high/pneumonia``."""
    _check_bound(bound)
    return f"{split}/auroc_ci_{bound}/{label}"


def bootstrap_replicates(split: str) -> str:
    """Number of bootstrap replicates drawn, e.g. ``test/bootstrap/n_boot``."""
    return f"{split}/bootstrap/n_boot"


def bootstrap_undefined(split: str) -> str:
    """Replicates with an undefined macro AUROC, e.g. ``test/bootstrap/undefined_replicates``.

    A replicate is undefined when a label measurable on the full split drew a single class.
    """
    return f"{split}/bootstrap/undefined_replicates"


def n_images(split: str) -> str:
    """Number of evaluated images, e.g. ``test/n_images``."""
    return f"{split}/n_images"


def thresholded(split: str, family: str, label: str) -> str:
    """A per-label metric at the Youden threshold, e.g. ``test/sensitivity/atelectasis``."""
    if family not in THRESHOLDED_METRICS:
        raise KeyError(f"unknown thresholded metric {family!r}; expected one of {THRESHOLDED_METRICS}")
    return f"{split}/{family}/{label}"


def subgroup_auroc(split: str, attribute: str, group: str) -> str:
    """Macro AUROC inside one subgroup, e.g. ``test/subgroup_auroc/sex/F`` (from `trainables.metrics`)."""
    return metrics.subgroup_auroc(split, attribute, group)


def fairness(split: str, family: str, attribute: str, label: str | None = None) -> str:
    """A fairness number of one attribute: per label, or averaged over labels when ``label`` is None.

    ``test/fairness/eod/age/cardiomegaly`` is one label's value; ``test/fairness/eod/age`` is the
    unweighted mean over labels where it is defined. One exception, kept for `trainables.metrics`:
    ``<split>/fairness/auroc_gap/<attribute>`` is the max minus min of the groups' *macro* AUROC, and the
    label mean of the per-label AUROC gaps is `auroc_gap_label_mean`.
    """
    if family not in FAIRNESS_METRICS:
        raise KeyError(f"unknown fairness metric {family!r}; expected one of {FAIRNESS_METRICS}")
    if label is not None:
        return f"{split}/fairness/{family}/{attribute}/{label}"
    if family == "auroc_gap":
        return metrics.auroc_gap(split, attribute)
    return f"{split}/fairness/{family}/{attribute}"


def auroc_gap_label_mean(split: str, attribute: str) -> str:
    """Mean over labels of the per-label AUROC gap, e.g. ``test/fairness/auroc_gap_label_mean/age``."""
    return f"{split}/fairness/auroc_gap_label_mean/{attribute}"


def worst_group_auroc(split: str, attribute: str) -> str:
    """Lowest subgroup macro AUROC of one attribute's groups, e.g. ``test/fairness/worst_group_auroc/age``."""
    return f"{split}/fairness/worst_group_auroc/{attribute}"


def skipped_groups(split: str, attribute: str) -> str:
    """(group, label) pairs without positives or negatives, e.g. ``test/fairness/skipped_groups/sex``."""
    return f"{split}/fairness/skipped_groups/{attribute}"


def excluded_images(split: str, attribute: str) -> str:
    """Images in no group (unknown sex, missing/out-of-range age): ``test/fairness/excluded_images/age``."""
    return f"{split}/fairness/excluded_images/{attribute}"


def _check_bound(bound: str) -> None:
    if bound not in CI_BOUNDS:
        raise KeyError(f"unknown CI bound {bound!r}; expected one of {CI_BOUNDS}")
