"""The schema: every name that trials report, MLflow stores, the tables carry and analysis reads, in one place.

- **Metric keys** follow ``split/family/name`` (``family`` omitted for headline numbers); ``split`` is ``val``,
  ``test`` or ``external/<dataset>``. Constants for fixed keys, functions for keys with a label, attribute or
  group in them (unknown families are refused). Sweep objectives and analysis refer to these, never to string
  literals; a test ties them to what trials report.
- **MLflow tags** that find a sweep's runs again, **trial statuses** of the tables, **file names** of checkpoints,
  caches and sweep outputs, the **stored-infinity** constant and `dataset_dir`.

This module imports nothing heavy (no torch, Ray or MLflow) and nothing from ``trainables.data`` (the data modules
import it): analysis and the driver use it alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

LABELS: tuple[str, ...] = ("atelectasis", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding")
"""The five study labels, in the fixed column order of every label matrix (per-label metric keys and prediction
columns name them; `trainables.data.labels` re-exports them for the data modules)."""

# ---------------------------------------------------------------------------------------------------------
# Per-epoch metrics, reported to Ray every epoch.
EPOCH: Final = "epoch"
TRAIN_LOSS: Final = "train/loss"
"""Mean training-batch loss of an epoch: reported by non-private trials only (a private trial's batch loss is
computed from private records outside the mechanism and is never released)."""
VAL_AUROC_MACRO: Final = "val/auroc_macro"
VAL_LOSS: Final = "val/loss"
EPSILON: Final = "privacy/epsilon"  # epsilon spent so far under the trial's accountant, at the trial's delta
STEPS: Final = "privacy/steps"  # DP-SGD steps taken so far (logical batches)
TEST_AUROC_MACRO_AT_EPOCH: Final = "test/auroc_macro_at_epoch"  # for epsilon-binned tables; never used to select
# also per epoch: auroc_gap("val", attribute) and, with test_every_epoch, auroc_gap_at_epoch(attribute)

# System metrics: how fast the machine trained (timing figures of the machine, not results; `train.throughput_metrics`).
# Non-private trials report them every epoch next to the results; private trials never report a per-epoch time (an
# epoch's wall time tracks its secret Poisson batch sizes), only `SYSTEM_TOTAL_TRAIN_S` in the final report, which
# every trial carries. Not in the checkpoint's history: two runs of one trial differ in them and nowhere else.
# docs/design.md "Timing figures" says what they can reveal.
SYSTEM_PREFIX: Final = "system/"
SYSTEM_TRAIN_S: Final = "system/train_s"  # wall seconds of the epoch's training steps (no evaluation)
SYSTEM_STEP_S: Final = "system/step_s"  # mean wall seconds per logical batch (one DP-SGD step) in that time
SYSTEM_STEPS_PER_S: Final = "system/steps_per_s"  # logical batches per second
SYSTEM_IMAGES_PER_S: Final = "system/images_per_s"
"""Training images per second from *expected* counts: private trials q x (training images of the sampled records) per
step times steps per second, never the realized Poisson batch sizes; non-private trials N per epoch."""
SYSTEM_METRICS: Final = (SYSTEM_TRAIN_S, SYSTEM_STEP_S, SYSTEM_STEPS_PER_S, SYSTEM_IMAGES_PER_S)
"""The per-epoch system metrics: non-private trials only."""
SYSTEM_TOTAL_TRAIN_S: Final = "system/total_train_s"
"""Final report, every trial: wall seconds of all the training steps the reporting process ran (a resumed trial: the
epochs since its resume; NaN when it trained none), the one timing figure a private trial releases."""

# Final, reported once after training.
TEST_AUROC_MACRO: Final = "test/auroc_macro"
BEST_EPOCH: Final = "val/best_epoch"
VAL_SELECTED_AUROC_MACRO: Final = "val/selected/auroc_macro"
"""Validation macro AUROC of the epoch the trial selects: in the final report (an Optuna objective) and, per epoch,
of the epoch it would select if stopped now (ASHA's metric)."""
EPSILON_AT_BEST_EPOCH: Final = "privacy/epsilon_at_best_epoch"
EPSILON_CROSS_CHECK_RDP: Final = "privacy/epsilon_dp_accounting_rdp"
EPSILON_CROSS_CHECK_PLD: Final = "privacy/epsilon_dp_accounting_pld"
EPSILON_REPLACE_ONE: Final = "privacy/epsilon_replace_one"
"""Private trials: the same run's epsilon under replace-one adjacency (N fixed; dp-accounting PLD,
`trainables.privacy.accounting.replace_one_epsilon`), beside ``privacy/epsilon``'s add/remove one with N public."""
EPSILON_PATIENT: Final = "privacy/epsilon_patient"
"""Image-level private trials: epsilon at the trial's delta for the training split's patient with the most images
(`PATIENT_IMAGES` of them): the tight PLD of the k-image group (`trainables.privacy.units.patient_epsilon`). The
images-per-patient figures are treated as public dataset metadata, like N."""
PATIENT_IMAGES: Final = "privacy/patient_images"  # that k: the largest number of training images of one patient
EPSILON_PATIENT_P99: Final = "privacy/epsilon_patient_p99"  # the same for the 99th percentile of images per patient
PATIENT_IMAGES_P99: Final = "privacy/patient_images_p99"  # that k (an observed count, rounded up)

RELEASED_STEPS: Final = "privacy/released_steps"
"""Trials table: the DP-SGD steps behind everything a trial released so far (the final report's steps; for a
stopped, failed or unfinished trial, its last reported epoch's; 0 when it reported nothing): what it published.
The tuning cost composes every trial that started at its planned steps (``steps``) instead: where a trial stopped
may depend on the data (`sweeps.tuning_cost`)."""

GUARANTEE: Final = "privacy/guarantee"
"""A trial's guarantee in words (an MLflow param and a trials.parquet column; `trainables.privacy.guarantee`):
the (epsilon, delta) statement with unit, adjacency, accountant and what is outside it, or ``none (...)``."""

# Sweep-level, on the MLflow parent run.
TUNING_EPSILON: Final = "privacy/tuning_epsilon"  # releasing the best private trial after the whole sweep
"""Grid: RDP composition of every private trial that started, at its planned steps. Optuna: the worst-case RDP
composition that holds under adaptive selection (`trainables.privacy.tuning.adaptive_tuning_bound`)."""
TUNING_EPSILON_BASIC: Final = "privacy/tuning_epsilon_basic"  # Optuna: basic composition of the trials' targets
SELECTION_EPSILON: Final = "privacy/selection_epsilon"  # private selection, ``/<cell>``: the cell's tuning-inclusive
"""`search: private_selection`: the epsilon of a cell's whole selection (its secret number of candidates and the release
of its best, Papernot & Steinke), at most the cell's target; ``privacy/tuning_epsilon`` composes the cells."""
SELECTION_SINGLE_RUN_EPSILON: Final = "privacy/selection_single_run_epsilon"  # ``/<cell>``: each candidate's alone
LEDGER_EPSILON: Final = "privacy/ledger_epsilon"  # the training set's whole ledger when the sweep ended
"""Image-level RDP composition of every private run recorded on the sweep's training set, by any sweep, audit or
rerun (`trainables.privacy.ledger.compose_ledger`); at least the sweep's own tuning epsilon."""

# Keys of a trial's final report that are not metrics (kept as trials.parquet columns, not logged to MLflow).
DONE: Final = "done"
"""Key set to True in a trial's final report (and only there). It is Ray Tune's own ``done``: Tune ends the trial on
that report, so its saved experiment state records the end together with the final checkpoint and a resumed sweep
does not restart a finished trial."""
NODE_ID: Final = "ray/node_id"
"""Hex id of the Ray node that ran the trial's final evaluation (a string)."""


def test_auroc(label: str) -> str:
    """Test AUROC of one of the study's labels, e.g. ``test/auroc/cardiomegaly`` (unknown labels are refused)."""
    _check_label(label)
    return auroc("test", label)


def auroc_macro(split: str) -> str:
    """Unweighted mean AUROC over labels, e.g. ``test/auroc_macro``."""
    return f"{split}/auroc_macro"


def auroc(split: str, label: str) -> str:
    """AUROC of one label (of any label set), e.g. ``test/auroc/cardiomegaly``."""
    return f"{split}/auroc/{label}"


def subgroup_auroc(split: str, attribute: str, group: str) -> str:
    """Macro AUROC inside one subgroup, e.g. ``test/subgroup_auroc/age/70-100`` (group keys avoid brackets,
    which MLflow refuses in metric names)."""
    return f"{split}/subgroup_auroc/{attribute}/{group}"


def auroc_gap(split: str, attribute: str) -> str:
    """Max minus min subgroup macro AUROC over one attribute's groups, e.g. ``test/fairness/auroc_gap/age``.

    The protocol's per-label variant (gap per label, then averaged over labels) is `auroc_gap_label_mean`.
    """
    return f"{split}/fairness/auroc_gap/{attribute}"


def auroc_gap_at_epoch(attribute: str) -> str:
    """`auroc_gap` on the test split after every epoch, e.g. ``test/fairness/auroc_gap_at_epoch/age``.

    Reported per epoch when ``test_every_epoch`` is on, for epsilon-binned tables; never used to select.
    The validation split's per-epoch gap is ``auroc_gap("val", attribute)``.
    """
    return f"test/fairness/auroc_gap_at_epoch/{attribute}"


def val_selected_auroc_gap(attribute: str) -> str:
    """Validation subgroup AUROC gap of the selected epoch (final report; an Optuna objective), e.g.
    ``val/selected/fairness/auroc_gap/age``."""
    return f"val/selected/fairness/auroc_gap/{attribute}"


def external_auroc(dataset: str) -> str:
    """Macro AUROC of the final model on an external dataset's test split, e.g. ``external/synthetic-b/auroc_macro``
    (equals ``auroc_macro(f"external/{dataset}")``)."""
    return auroc_macro(f"external/{dataset}")


# Families written by `trainables.evaluate`.
THRESHOLDED_METRICS: Final[tuple[str, ...]] = ("threshold", "sensitivity", "specificity", "accuracy", "ppv", "f1")
"""Per-label families at the Youden thresholds (``threshold`` is the cut-off itself)."""
FAIRNESS_METRICS: Final[tuple[str, ...]] = (
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
CI_BOUNDS: Final[tuple[str, ...]] = ("low", "high")


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


def fairness(split: str, family: str, attribute: str, label: str | None = None) -> str:
    """A fairness number of one attribute: per label, or averaged over labels when ``label`` is None.

    ``test/fairness/eod/age/cardiomegaly`` is one label's value; ``test/fairness/eod/age`` is the
    unweighted mean over labels where it is defined. One exception: ``<split>/fairness/auroc_gap/<attribute>``
    is the max minus min of the groups' *macro* AUROC (`auroc_gap`), and the label mean of the per-label AUROC
    gaps is `auroc_gap_label_mean`.
    """
    if family not in FAIRNESS_METRICS:
        raise KeyError(f"unknown fairness metric {family!r}; expected one of {FAIRNESS_METRICS}")
    if label is not None:
        return f"{split}/fairness/{family}/{attribute}/{label}"
    if family == "auroc_gap":
        return auroc_gap(split, attribute)
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


def prediction_score(label: str) -> str:
    """Column of a predictions table (``predictions.parquet``) holding one label's sigmoid score, e.g.
    ``score/cardiomegaly``."""
    return f"score/{label}"


def _check_label(label: str) -> None:
    if label not in LABELS:
        raise KeyError(f"unknown label {label!r}; expected one of {LABELS}")


def _check_bound(bound: str) -> None:
    if bound not in CI_BOUNDS:
        raise KeyError(f"unknown CI bound {bound!r}; expected one of {CI_BOUNDS}")


def audit_metric(kind: str, name: str) -> str:
    """An empirical privacy audit's number, e.g. ``audit/white_box/epsilon_lower_bound`` (`trainables.privacy.audit`;
    ``kind`` is ``white_box`` or ``black_box``)."""
    if kind not in ("white_box", "black_box"):
        raise KeyError(f"unknown audit kind {kind!r}; expected 'white_box' or 'black_box'")
    return f"audit/{kind}/{name}"


# ---------------------------------------------------------------------------------------------------------
# Headline metrics: the few a child run logs to MLflow as metrics (columns, charts, compare view).
HEADLINE_ATTRIBUTES: Final[tuple[str, ...]] = ("sex", "age")
"""Attributes whose fairness gaps are headline metrics."""
EPOCH_HEADLINES: Final[tuple[str, ...]] = (
    EPOCH,
    EPSILON,
    STEPS,
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_AUROC_MACRO,
    VAL_SELECTED_AUROC_MACRO,
    *(auroc_gap("val", a) for a in HEADLINE_ATTRIBUTES),
    TEST_AUROC_MACRO_AT_EPOCH,
    *(auroc_gap_at_epoch(a) for a in HEADLINE_ATTRIBUTES),
    *SYSTEM_METRICS,
)
"""Every metric an epoch report can carry (the trainable reports exactly these, see `trainables.train`); all are
logged per epoch, so the MLflow history is the whole epoch table. The ``system/`` timing figures are MLflow system
metrics (the UI shows them in its system-metrics section)."""
FINAL_HEADLINES: Final[tuple[str, ...]] = (
    TEST_AUROC_MACRO,
    auroc_macro_ci("test", "low"),
    auroc_macro_ci("test", "high"),
    *(auroc_gap("test", a) for a in HEADLINE_ATTRIBUTES),
    *(worst_group_auroc("test", a) for a in HEADLINE_ATTRIBUTES),
    BEST_EPOCH,
    VAL_SELECTED_AUROC_MACRO,
    *(val_selected_auroc_gap(a) for a in HEADLINE_ATTRIBUTES),
    EPSILON,
    STEPS,
    EPSILON_AT_BEST_EPOCH,
    EPSILON_CROSS_CHECK_RDP,
    EPSILON_CROSS_CHECK_PLD,
    EPSILON_REPLACE_ONE,
    EPSILON_PATIENT,
    PATIENT_IMAGES,
    EPSILON_PATIENT_P99,
    PATIENT_IMAGES_P99,
    SYSTEM_TOTAL_TRAIN_S,
)
"""The final report's fixed headline keys; ``external/<dataset>/auroc_macro`` of every external set is one too."""
MAX_HEADLINES: Final = 40
"""Most metric keys one child run may carry: 14 per-epoch keys reach MLflow (`EPOCH_HEADLINES` less train loss or
epsilon, and val/loss, which no trial reports today; the 4 system metrics, which only non-private runs report,
included), 19 more final keys, and one per external set: 38 with the paper's 5 external sets."""


def is_headline(key: str) -> bool:
    """Whether a trial's metric is logged to MLflow as a metric (the rest of its final report goes into the run's
    ``evaluation/metrics.parquet`` artifact; Ray's results and trials.parquet keep every metric).

    Headlines, per epoch: ``epoch``, ``privacy/epsilon``, ``privacy/steps``, ``train/loss`` (non-private),
    ``val/loss``, ``val/auroc_macro``, ``val/selected/auroc_macro``, ``val/fairness/auroc_gap/{sex,age}``,
    ``test/auroc_macro_at_epoch`` and ``test/fairness/auroc_gap_at_epoch/{sex,age}`` (with ``test_every_epoch``).
    Final: ``test/auroc_macro`` with ``test/auroc_macro_ci_{low,high}``, ``test/fairness/auroc_gap/{sex,age}``,
    ``test/fairness/worst_group_auroc/{sex,age}``, ``val/best_epoch`` (`FINAL_MARKER`),
    ``val/selected/auroc_macro``, ``val/selected/fairness/auroc_gap/{sex,age}``, ``privacy/epsilon``,
    ``privacy/steps``, ``privacy/epsilon_at_best_epoch``, the dp-accounting cross-checks
    ``privacy/epsilon_dp_accounting_{rdp,pld}``, ``privacy/epsilon_replace_one``, ``privacy/epsilon_patient(_p99)``
    with ``privacy/patient_images(_p99)``, ``system/total_train_s`` and ``external/<dataset>/auroc_macro`` per external
    set. The per-epoch ``system/`` figures are non-private runs' only. A non-private run
    logs none of the epsilon keys (its epsilon is infinite; `PRIVATE_TAG` and `BUDGET_PARAM` say non-private).
    """
    if key in _HEADLINES:
        return True
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "external" and parts[1] != "" and parts[2] == "auroc_macro"


_HEADLINES: Final = frozenset(EPOCH_HEADLINES) | frozenset(FINAL_HEADLINES)


# ---------------------------------------------------------------------------------------------------------
# MLflow: tags that find a sweep's runs again, and what the SQL stores keep for infinity.
SWEEP_TAG: Final = "dpsweep.sweep"
ROLE_TAG: Final = "dpsweep.role"  # "sweep" (the parent run) or "trial" (a child run)
TRIAL_KEY_TAG: Final = "dpsweep.trial_key"
PARENT_TAG: Final = "mlflow.parentRunId"
RAY_TRIAL_ID_TAG: Final = "ray.trial_id"
AUDITED_TRIAL_TAG: Final = "dpsweep.audited_trial"  # an audit run (role "audit") names the grid point it audited
TAG_PREFIX: Final = "dpsweep."  # every other dpsweep tag (provenance, privacy unit, ...) starts with it
FINAL_MARKER: Final = BEST_EPOCH
"""A metric only a trial's final report carries, logged in its last batch: present = final metrics complete."""
FINAL_STEP: Final = 0
"""MLflow step of the final report (it carries no ``epoch``); epochs are logged at step = epoch >= 1."""
STORED_INFINITY: Final = 1e308
"""What MLflow's SQL stores keep for an infinite metric (they cannot hold inf). dpsweep never logs one (a non-private
run logs no epsilon at all); readers still map it back to inf for stores written by an earlier dpsweep."""
PRIVATE_TAG: Final = "dpsweep.private"
"""Child-run tag: ``true`` for a private trial (finite target epsilon: trained with DP-SGD), ``false`` for a
non-private baseline. A ``reproducible_noise`` trial is ``true`` here but has no guarantee: its `GUARANTEE` param says
``none (...)``."""
BUDGET_PARAM: Final = "budget"
"""Child-run param holding `budget_value`: ``eps=<target>`` or ``non-private`` (an MLflow column that shows the
baselines beside the private runs; non-private runs log no epsilon metric)."""
NON_PRIVATE_BUDGET: Final = "non-private"


def budget_value(target_epsilon: float) -> str:
    """The `BUDGET_PARAM` value of a trial: ``eps=<target epsilon as the trial key writes it>`` (``eps=1``,
    ``eps=0.5``, ``eps=8``) for a private trial, ``non-private`` for an infinite target."""
    target_epsilon = float(target_epsilon)
    return NON_PRIVATE_BUDGET if target_epsilon == float("inf") else f"eps={target_epsilon:g}"


# ---------------------------------------------------------------------------------------------------------
# Trial statuses (the ``status`` column of trials.parquet).
TERMINATED: Final = "TERMINATED"
"""Ran to the end and reported its final metrics."""
STOPPED: Final = "STOPPED"
"""Stopped early by the scheduler (ASHA): no final evaluation; its epsilon and steps are its last epoch's."""
ERROR: Final = "ERROR"
"""Failed after its retries."""
INCOMPLETE: Final = "INCOMPLETE"
"""Pending or running when the driver stopped; a resumed sweep continues it."""
ENDED: Final[tuple[str, ...]] = (TERMINATED, STOPPED)
"""Statuses that need no more work."""

# ---------------------------------------------------------------------------------------------------------
# Files.
CHECKPOINT_STATE_FILE: Final = "state.pt"  # a trial's epoch checkpoint (private material: holds the RNG states)
FINAL_FILE: Final = "final.json"  # a trial's final report, in its final checkpoint
FINAL_WEIGHTS_FILE: Final = "model.safetensors"  # a trial's selected weights (state dict only), in its final checkpoint
TRIALS_FILE: Final = "trials.parquet"
EPOCHS_FILE: Final = "epochs.parquet"
GROUPS_FILE: Final = "groups.parquet"
PREDICTIONS_FILE: Final = "predictions.parquet"  # the selected model's per-image scores (test and external sets)
BOOTSTRAP_FILE: Final = "bootstrap.parquet"
RAY_PARAMS_FILE: Final = "params.json"
RAY_RESULT_FILE: Final = "result.json"  # a Ray trial folder's reports, one JSON object per line
SELECTION_FILE: Final = "selection.json"  # runs/<sweep>/selection.json: a private selection's public plan and winners
SWEEP_STATE_FILE: Final = "sweep.json"  # runs/<sweep>/sweep.json: fingerprint and status of a sweep
SWEEP_LOCK_FILE: Final = "sweep.lock"  # runs/<sweep>/sweep.lock: the command running the sweep (sweeps.lock)
CALIBRATION_CACHE_FILE: Final = "calibration_cache.json"
OPTUNA_DB_FILE: Final = "optuna.db"
MANIFEST_FILE: Final = "manifest.parquet"
CARD_FILE: Final = "card.json"
IMAGES_FILE: Final = "images.npy"
PRETRAINED_WEIGHTS_FILE: Final = "model.safetensors"
LEDGER_SUMMARY_FILE: Final = "ledger.json"  # runs/<sweep>/ledger.json: its datasets' ledger totals when it ended
AUDIT_FILE: Final = "audit.parquet"  # runs/<sweep>/audit.parquet: `dpsweep audit`'s results
EVALUATION_ARTIFACT_DIR: Final = "evaluation"
"""Artifact folder of a child run: its full final metrics (`METRICS_FILE`), and once finished its ``groups``,
``bootstrap``, ``epochs`` and ``predictions`` tables (each parquet with a ``.csv`` twin the MLflow UI previews)."""
METRICS_FILE: Final = "metrics.parquet"
"""A finished trial's whole final report in long form (``trial``, ``metric``, ``value``, ``integer``): every metric
the trial reported to Ray, headline or not, infinities included; logged before the headline metrics."""
REPORT_ARTIFACT_DIR: Final = "report"  # `dpsweep report`'s folder, logged to the sweep's parent run
MLFLOW_DB_FILE: Final = "mlflow.db"  # runs/mlflow.db: the default tracking store
MLFLOW_ARTIFACTS_DIR: Final = "mlartifacts"
"""Beside a sqlite store, the folder its ``mlflow-artifacts:/`` artifact locations resolve to (MLflow's own
default ``--artifacts-destination``); moving runs/ moves both."""


def dataset_dir(root: str | Path, name: str, image_size: int) -> Path:
    """A prepared dataset's cache folder: ``<root>/<name>/<image_size>/``."""
    return Path(root) / name / str(image_size)
