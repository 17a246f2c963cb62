"""Metric names: the one place where the keys trials report, MLflow stores and analysis reads are defined.

Names follow ``split/family/name`` (``family`` omitted for headline numbers). Sweep objectives and
analysis refer to these constants, never to string literals; a test ties them to what trials report.
"""

from __future__ import annotations

from trainables.data.labels import LABELS

# Per-epoch, reported to Ray every epoch.
EPOCH = "epoch"
TRAIN_LOSS = "train/loss"
VAL_AUROC_MACRO = "val/auroc_macro"
VAL_LOSS = "val/loss"
EPSILON = "privacy/epsilon"  # epsilon spent so far under the trial's accountant, at the trial's delta
STEPS = "privacy/steps"  # DP-SGD steps taken so far (logical batches)
TEST_AUROC_MACRO_AT_EPOCH = "test/auroc_macro_at_epoch"  # for epsilon-binned tables; never used to select
# also per epoch: auroc_gap("val", attribute) and, with eval_test_every_epoch, auroc_gap_at_epoch(attribute)

# Final, reported once after training.
TEST_AUROC_MACRO = "test/auroc_macro"
BEST_EPOCH = "val/best_epoch"
VAL_SELECTED_AUROC_MACRO = "val/selected/auroc_macro"
"""Validation macro AUROC of the epoch the trial selects: in the final report (an Optuna objective) and, per epoch,
of the epoch it would select if stopped now (ASHA's metric)."""
EPSILON_AT_BEST_EPOCH = "privacy/epsilon_at_best_epoch"
EPSILON_CROSS_CHECK_RDP = "privacy/epsilon_dp_accounting_rdp"
EPSILON_CROSS_CHECK_PLD = "privacy/epsilon_dp_accounting_pld"

# Sweep-level, on the MLflow parent run.
TUNING_EPSILON = "privacy/tuning_epsilon"  # releasing the best private trial after the whole grid (RDP composition)


def test_auroc(label: str) -> str:
    """Test AUROC of one label, e.g. ``test/auroc/cardiomegaly``."""
    _check_label(label)
    return f"test/auroc/{label}"


def subgroup_auroc(split: str, attribute: str, group: str) -> str:
    """Macro AUROC inside one subgroup, e.g. ``test/subgroup_auroc/age/70-100`` (group keys avoid brackets,
    which MLflow refuses in metric names)."""
    return f"{split}/subgroup_auroc/{attribute}/{group}"


def auroc_gap(split: str, attribute: str) -> str:
    """Max minus min subgroup macro AUROC over one attribute's groups, e.g. ``test/fairness/auroc_gap/age``.

    The protocol's per-label variant (gap per label, then averaged over labels) is
    ``<split>/fairness/auroc_gap_label_mean/<attribute>`` (`trainables.evaluate.names`).
    """
    return f"{split}/fairness/auroc_gap/{attribute}"


def auroc_gap_at_epoch(attribute: str) -> str:
    """`auroc_gap` on the test split after every epoch, e.g. ``test/fairness/auroc_gap_at_epoch/age``.

    Reported per epoch when ``eval_test_every_epoch`` is on, for epsilon-binned tables; never used to select.
    The validation split's per-epoch gap is ``auroc_gap("val", attribute)``.
    """
    return f"test/fairness/auroc_gap_at_epoch/{attribute}"


def val_selected_auroc_gap(attribute: str) -> str:
    """Validation subgroup AUROC gap of the selected epoch (final report; an Optuna objective), e.g.
    ``val/selected/fairness/auroc_gap/age``."""
    return f"val/selected/fairness/auroc_gap/{attribute}"


def external_auroc(dataset: str) -> str:
    """Macro AUROC of the final model on an external dataset's test split, e.g. ``external/synthetic-b/auroc_macro``."""
    return f"external/{dataset}/auroc_macro"


def _check_label(label: str) -> None:
    if label not in LABELS:
        raise KeyError(f"unknown label {label!r}; expected one of {LABELS}")
