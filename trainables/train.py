"""The training loop of one trial: plain PyTorch + Opacus, no Ray. Read it top to bottom.

    set up: load data -> build model from its init -> the stepper of the trial's kind, chosen once
            (`trainables.steps`: non-private, image-level or patient-level DP-SGD; a private one is wrapped and its
            per-sample gradients verified by `trainables.privacy.setup.make_private`) -> TrainState (+ resume)
    -> for each epoch: the stepper's steps -> validation AUROC + epsilon spent -> report/checkpoint
    -> final: pick the epoch (best validation AUROC), evaluate on test and external test sets.

`report(metrics, state)` is called once per epoch with the `TrainState.state_dict` checkpoint; the final
metrics, evaluation tables and selected model come back as a `TrialResult`. Resuming from a checkpoint
continues with exactly the same step count, accountant history and RNG streams.

What a private trial releases (the full list: docs/design.md, "What a private trial releases"): per epoch, the
validation (and test) metrics and epsilon spent, and at the end the selected model's evaluation, its epsilons and the
run's total training time. The loss of the private Poisson batches is not released (it is not clipped, noised or
accounted), nor is any per-epoch time (it tracks the secret batch sizes); non-private trials report ``train/loss``
and per-epoch ``system/`` timing figures.

Randomness (`trainables.privacy.randomness`). ``cfg.seed`` is published (an MLflow param), so it seeds only
what is not part of the DP mechanism: model initialisation, the rows of the per-sample-gradient check and the
non-private baseline's shuffling (the bootstrap has a fixed seed per dataset). A private trial's Poisson sampling
and noise come from:

- by default, generators seeded from ``os.urandom``; their seeds and states are kept only in the checkpoint,
  so a resumed trial continues the same secret streams bit for bit, until the trial ends (`scrub_secrets`).
  Checkpoints are private material: never log or publish them. Two runs of the same private config draw
  different noise.
- with ``privacy.secure_mode``, a `SecureRandom` (ChaCha20 under a fresh ``os.urandom`` key). There is nothing
  to checkpoint: a resumed trial draws from a new key. That keeps the guarantee: the steps lost with a killed
  process released nothing (a trial reports only together with its checkpoint), and the steps after the resume
  use randomness independent of everything released so far and secret; the step count and the accountant
  history are restored exactly, so the epsilon is the same. Bit-for-bit reproducibility is lost, on purpose.
- with ``privacy.reproducible_noise`` (debugging only), the seeded streams of ``cfg.seed``: the trial replays
  from its logged config and has no DP guarantee (`trainables.privacy.guarantee`).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from opacus.accountants.accountant import IAccountant
from torch import nn

from trainables import names as M
from trainables.config import ConfigError, TrialConfig
from trainables.data.labels import LABELS
from trainables.data.loaders import CacheSplitDataset, TrialData, load_trial_data, train_batches
from trainables.errors import UserError
from trainables.evaluate.bootstrap import dataset_bootstrap_seed
from trainables.evaluate.fairness import subgroup_auroc_gaps
from trainables.evaluate.report import Evaluation, evaluate_split, fit_thresholds
from trainables.evaluate.utility import macro_auroc
from trainables.models import ResolvedInit, create_model, predict
from trainables.privacy import accounting
from trainables.privacy.accounting import cross_check_epsilon, replace_one_epsilon
from trainables.privacy.label_counts import LabelCountRelease, PosWeight, patient_labels, train_pos_weight
from trainables.privacy.patients import group_patients
from trainables.privacy.planning import PlanError, check_plan
from trainables.privacy.randomness import MechanismRandomness, mechanism_randomness
from trainables.privacy.secure import SecureRandom
from trainables.privacy.units import images_per_patient, patient_epsilon
from trainables.steps import BudgetError, Stepper, TrainingRecords, make_stepper, per_sample_bce, step_settings
from trainables.throughput import throughput_metrics

__all__ = [
    "BudgetError",
    "ScrubbedCheckpointError",
    "TrainState",
    "TrialResult",
    "scrub_checkpoint",
    "scrub_secrets",
    "train_trial",
]

CHECKPOINT_FORMAT = 2
"""Version of `TrainState.state_dict`. Format 1, the unversioned dict written before `TrainState`, is refused."""
RESUME_IGNORED_KEYS = ("data_root",)
"""Config keys that may differ between a checkpoint and its resume (a moved data folder changes nothing)."""
SECRET_KEYS = ("secret_seeds", "sampler_rng", "noise_rng", "torch_rng")
"""What `scrub_secrets` removes from a checkpoint (its docstring says why each)."""
SCRUBBED = "scrubbed"
"""The checkpoint key `scrub_secrets` adds: how the trial had ended (a trial status of `trainables.names`, or
`SWEEP_COMPLETE`). A checkpoint without it is resumable."""
SWEEP_COMPLETE = "sweep complete"
"""`SCRUBBED` of a checkpoint scrubbed because its whole sweep had ended."""

Report = Callable[[dict[str, Any], dict[str, Any] | None], None]
Generator = torch.Generator | SecureRandom


@dataclass
class TrialResult:
    """What a finished trial returns.

    Attributes:
        metrics: the final report: test/external metrics of the selected epoch, its validation numbers, epsilon.
        tables: ``groups`` (subgroup table), ``bootstrap`` (per-replicate AUROCs), ``epochs`` (every epoch report).
        model: the model with the selected epoch's weights loaded.
    """

    metrics: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    model: nn.Module


def train_trial(
    cfg: TrialConfig,
    init: ResolvedInit,
    report: Report,
    state: dict[str, Any] | None = None,
    data: TrialData | None = None,
    epoch_timing: Callable[[dict[str, float]], None] | None = None,
) -> TrialResult:
    """Train and evaluate one trial, resuming from the checkpoint ``state`` when given: set up, the epoch loop, the
    final evaluation (module docstring).

    ``epoch_timing`` receives every epoch's system metrics (`trainables.throughput.throughput_metrics`), private
    trials' included, inside this process: for in-process measurements (benchmarks) only. ``report`` carries them
    for non-private trials alone; never pass a private trial's to anything that logs or publishes.
    """
    privacy = cfg.privacy
    torch.set_num_threads(cfg.speed.threads)
    device = resolve_device(cfg.speed.device)
    settings = step_settings(cfg.speed, device)  # fixed shapes, precision, CUDA kernels: speed only
    data = data or load_trial_data(cfg)
    records = training_records(cfg, data.train, device)  # images, or patients with their (capped) images
    if not cfg.proxy:  # a proxy trial trains on public data at a simulated plan (`TrialConfig.proxy`)
        check_planned_budget(cfg, records.n_records)

    # Model and loss; cfg.seed seeds the initialisation (not part of the DP mechanism).
    torch.manual_seed(cfg.seed)
    # torch's stubs lack Module.to(device, memory_format=...), which Module.to accepts (torch._C._nn._parse_to)
    model = create_model(cfg.model, init).to(device, memory_format=settings.memory_format)  # type: ignore[call-overload]
    model.train()
    randomness = mechanism_randomness(privacy, cfg.seed, device)  # secret unless reproducible_noise (its docstring)
    pos_weight = trial_pos_weight(cfg, data.train.split.labels, records, randomness, state)  # DP when private
    release = None if pos_weight is None else pos_weight.release
    loss_fn = per_sample_bce(None if pos_weight is None else pos_weight.values, device)
    # The kind of step, chosen once: shuffled batches + AdamW, or Poisson batches + verified DP-SGD (image or
    # patient records). A resumed trial's ledger already holds its label-count release.
    stepper = make_stepper(cfg, model, loss_fn, records, randomness, settings, release if state is None else None)
    train = TrainState(
        cfg,
        model,
        stepper.optimizer,
        stepper.accountant,
        randomness.sampler,
        randomness.noise,
        randomness.secret_seeds,
        None if release is None else release.to_dict(),
    )
    if state is not None:
        train.load_state_dict(state)

    while train.epoch < privacy.epochs:
        metrics, system = run_epoch(train, stepper, data, device)
        # Timing stays out of the history (names.SYSTEM_PREFIX), and a private epoch's time is never reported: it
        # tracks the epoch's secret Poisson batch sizes (docs/design.md, "Timing figures").
        report(dict(metrics) if privacy.is_private else metrics | system, train.state_dict())
        if epoch_timing is not None:
            epoch_timing(system)

    return final_evaluation(train, data)


def run_epoch(
    train: TrainState, stepper: Stepper, data: TrialData, device: torch.device
) -> tuple[dict[str, Any], dict[str, float]]:
    """One epoch: the stepper's batches and steps, then the epoch's evaluation and epsilon, recorded in ``train``.

    Returns:
        (the epoch's metrics, its system timing figures: throughput from expected counts, never the realized batches).

    Raises:
        BudgetError: the epsilon spent exceeds the target.
    """
    cfg, privacy = train.cfg, train.cfg.privacy
    losses = []
    started, steps_before = time.perf_counter(), train.steps
    for indices in stepper.epoch_batches():
        losses.append(stepper.step(indices.numpy(), train.steps + 1))
        train.steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # once per epoch: the steps' kernels have finished
    seconds = time.perf_counter() - started
    train.train_seconds += seconds
    system = throughput_metrics(
        seconds, train.steps - steps_before, stepper.expected_images_per_step, stepper.images_per_epoch
    )
    train.epoch += 1
    metrics: dict[str, Any] = {M.EPOCH: train.epoch, M.STEPS: train.steps}
    if not privacy.is_private:  # a private trial's batch losses are None: nothing to release
        metrics[M.TRAIN_LOSS] = mean_loss(losses)  # the epoch's one read of the step losses
    metrics |= epoch_evaluation(cfg, train.model, data, train.accountant)
    if metrics.get(M.EPSILON, math.nan) > privacy.target_epsilon:  # inf > inf, nan > x are False
        raise BudgetError(f"epsilon spent {metrics[M.EPSILON]:.4f} > target {privacy.target_epsilon}")
    train.record(metrics)
    return metrics, system


def training_records(cfg: TrialConfig, train: CacheSplitDataset, device: torch.device) -> TrainingRecords:
    """The training split as the steps see it: its batches on ``device`` and, for a private patient-level trial,
    its images grouped by patient with the public cap applied (`trainables.privacy.patients.group_patients`)."""
    privacy = cfg.privacy
    patients = None
    if privacy.is_private and privacy.privacy_unit == "patient":
        cap = privacy.max_images_per_patient
        if cap is None:  # PrivacyConfig refuses this when it is built; a config that got around it stops here
            raise ConfigError(
                "privacy.max_images_per_patient", cap, ": a patient-level trial needs the public cap, e.g. 4"
            )
        patients = group_patients(train.split.patient_id, cap)
    return TrainingRecords(train_batches(train, device, cfg.speed.data_on_device), len(train), patients)


@dataclass
class TrainState:
    """Everything a trial carries from epoch to epoch; `state_dict` is its checkpoint, `load_state_dict` resumes it.

    The live objects (model, optimizer, accountant, the mechanism's generators) are shared with the loop; the
    counters and the selection are plain fields. Selection (``cfg.model_selection``): ``best_val`` keeps the
    epoch with the highest validation macro AUROC (NaN counts as -inf; the first such epoch on ties), ``last``
    the latest epoch. A private trial's checkpoint holds its secret seeds and generator states: it is private
    material, never logged or published, and loses them when the trial ends (`scrub_secrets`).
    """

    cfg: TrialConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    accountant: IAccountant | None
    sampler_rng: Generator
    noise_rng: Generator | None
    secret_seeds: dict[str, int] | None = None
    """The default mode's ``os.urandom`` seeds of the two generators (`trainables.privacy.randomness`)."""
    label_counts: dict[str, Any] | None = None
    """The accounted label-count release of ``pos_weight: train`` (`LabelCountRelease.to_dict`): a resumed trial
    reuses it, since drawing again would be a second, unaccounted release."""
    epoch: int = 0
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """The epoch reports, epoch 1 first."""
    best_epoch: int = 0
    """The selected epoch (1-based; 0 before the first)."""
    best_score: float = -math.inf
    best_weights: dict[str, torch.Tensor] | None = None
    train_seconds: float = 0.0
    """Wall seconds of the training steps this process ran (`names.SYSTEM_TOTAL_TRAIN_S`); not in the checkpoint:
    two runs of one trial differ in it."""

    @property
    def selected(self) -> dict[str, Any]:
        """The selected epoch's report."""
        return self.history[self.best_epoch - 1]

    def record(self, metrics: dict[str, Any]) -> None:
        """Keep the epoch's report, update the selection, and add the selected epoch's validation AUROC to the
        report (what the trial would deliver if stopped now: ASHA's metric)."""
        self.history.append(metrics)
        val_auroc = metrics[M.VAL_AUROC_MACRO]
        score = -math.inf if math.isnan(val_auroc) else val_auroc  # NaN: validation has a single class
        if self.best_weights is None or score > self.best_score or self.cfg.model_selection == "last":
            self.best_epoch, self.best_score = self.epoch, score
            self.best_weights = copy.deepcopy(self.model.state_dict())
        metrics[M.VAL_SELECTED_AUROC_MACRO] = self.selected[M.VAL_AUROC_MACRO]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, privacy ledger, RNG streams and secret seeds
        (None for a `SecureRandom`, which has no state to save). Tensors are the live ones, not copies."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_flat(),
            "epoch": self.epoch,
            "steps": self.steps,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "best_weights": self.best_weights,
            "model": self.model.state_dict(),
            "optimizer": _unwrapped(self.optimizer).state_dict(),
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "sampler_rng": _generator_state(self.sampler_rng),
            "noise_rng": _generator_state(self.noise_rng),
            "secret_seeds": self.secret_seeds,
            "label_counts": self.label_counts,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a `state_dict` of the same trial configuration (``RESUME_IGNORED_KEYS`` aside).

        Raises:
            ScrubbedCheckpointError: the checkpoint lost its secrets when the trial ended (`scrub_secrets`).
            ValueError: another checkpoint format, or another trial configuration.
            BudgetError: the privacy ledger does not account for exactly the steps taken.
        """
        if state.get(SCRUBBED) is not None:
            raise ScrubbedCheckpointError(
                f"this epoch-{state['epoch']} checkpoint of a trial of sweep {state['config'].get('sweep')!r} cannot "
                f"be resumed: the trial had ended ({state[SCRUBBED]}), so its secret seeds and generator states were "
                "removed and it cannot continue its secret noise and sampling streams; start it afresh (`dpsweep "
                "sweep --fresh` for a whole sweep)"
            )
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format', 1)} cannot be resumed by this version (format "
                f"{CHECKPOINT_FORMAT}); start the trial afresh (`dpsweep sweep --fresh` for a whole sweep)"
            )
        saved, current = state["config"], self.cfg.to_flat()
        changed = sorted(
            k for k in set(saved) | set(current) if k not in RESUME_IGNORED_KEYS and saved.get(k) != current.get(k)
        )
        if changed:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in changed)
            raise ValueError(f"checkpoint belongs to a different trial configuration ({details}); refusing to resume")
        self.model.load_state_dict(state["model"])
        _unwrapped(self.optimizer).load_state_dict(state["optimizer"])
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
            check_ledger(self.accountant, self.cfg, state["steps"])
        for rng, saved_rng in ((self.sampler_rng, state["sampler_rng"]), (self.noise_rng, state["noise_rng"])):
            if isinstance(rng, torch.Generator):  # a SecureRandom keeps its fresh key (module docstring)
                rng.set_state(saved_rng)
        self.secret_seeds = state["secret_seeds"]
        self.label_counts = state.get("label_counts")
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.steps, self.history = state["epoch"], state["steps"], list(state["history"])
        self.best_epoch, self.best_score, self.best_weights = (
            state["best_epoch"],
            state["best_score"],
            state["best_weights"],
        )


class ScrubbedCheckpointError(UserError, ValueError):
    """A resume from a checkpoint whose secrets `scrub_secrets` removed."""


def scrub_secrets(state: dict[str, Any], ended: str) -> dict[str, Any]:
    """The checkpoint ``state`` (a `TrainState.state_dict`) of a trial that ended as ``ended``, without the
    mechanism's secrets (`SECRET_KEYS`) and marked `SCRUBBED` = ``ended``; ``state`` itself is not changed.

    An ended trial is never resumed, and with its secrets its checkpoint would let whoever holds it replay the
    trial's Poisson batches and noise bit for bit: knowing the other records, one trains the trial with and without
    a record and compares both with the released model, a membership attack DP-SGD's epsilon does not bound
    (docs/design.md, "Randomness"). Removed:

    - ``secret_seeds``: the default mode's 128-bit ``os.urandom`` seeds of the sampler and noise generators.
    - ``sampler_rng``, ``noise_rng``: the generators' states. They give the streams from the checkpoint on and,
      since the Mersenne Twister's step can be inverted, the CPU sampler's earlier draws too. (Of a secure-mode
      trial they are None; of a non-private or ``reproducible_noise`` trial they come from the published seed:
      removed all the same, one rule for every trial.)
    - ``torch_rng``: the global CPU stream, seeded from the public ``cfg.seed`` for the model's initialisation.
      Nothing of the mechanism draws from it: Poisson sampling and noise use their own generators, timm's drop
      path is off and the models have no dropout, so it does not move after the initialisation (measured on
      test_convnext: the same state after every epoch) and holds nothing secret today. It is removed anyway:
      only a resume uses it, and a later draw from it during the private steps (dropout on a Poisson batch,
      whose size is secret) would make it a function of the batches.

    Kept: the selected epoch's and the last weights, the optimizer, the accountant's ledger, the history and the
    selection, the label-count release and the config: the mechanism's outputs and what is computed from them
    (docs/design.md, "What a private trial releases"), which the selected model and the tables need.
    `TrainState.load_state_dict` refuses the result: it cannot continue the secret streams, and a resume with fresh
    randomness would silently break the promise that a resumed trial ends exactly as an uninterrupted one.

    Args:
        state: the checkpoint.
        ended: how the trial ended (``names.TERMINATED``, ``STOPPED`` or ``ERROR``, or `SWEEP_COMPLETE`); the
            trainable reads it when Ray restarts a trial that had ended (`trainables.trial`).
    """
    return {**{k: v for k, v in state.items() if k not in SECRET_KEYS}, SCRUBBED: ended}


def scrub_checkpoint(path: Path, ended: str) -> bool:
    """Replace the checkpoint file ``path`` (a saved `TrainState.state_dict`) by its `scrub_secrets` version, through
    a temporary file in the same folder renamed over it: a crash leaves the old or the new file, never half of one.

    Only the file is replaced; the disk blocks of the old one are freed, not overwritten.

    Returns:
        Whether the file was rewritten (False: it was scrubbed already).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get(SCRUBBED) is not None:
        return False
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(scrub_secrets(state, ended), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when visible (Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("speed.device = cuda but no GPU is visible to this trial; give trials resources.gpu > 0")
    return torch.device(name)


def mean_loss(losses: list[torch.Tensor | None]) -> float:
    """The mean of an epoch's step losses (NaN steps ignored; NaN if none): one device read for the epoch."""
    values = [loss for loss in losses if loss is not None]
    if not values:
        return math.nan
    # numpy's float64 nanmean over the exact float64 values, as when each step returned loss.item()
    return float(np.nanmean(torch.stack(values).cpu().numpy().astype(np.float64)))


def epoch_evaluation(
    cfg: TrialConfig, model: nn.Module, data: TrialData, accountant: IAccountant | None
) -> dict[str, float]:
    """Validation macro AUROC, epsilon spent so far (inf when non-private), validation subgroup gaps, and with
    ``test_every_epoch`` the test ones (never used to select)."""
    val_scores, val_labels = predict(model, data.val, cfg.speed.eval_batch_size)
    metrics = {M.VAL_AUROC_MACRO: macro_auroc(val_labels, val_scores)}
    if not cfg.proxy:  # a proxy trial's data is public: no epsilon (`TrialConfig.proxy`)
        metrics[M.EPSILON] = accountant.get_epsilon(cfg.privacy.delta) if accountant else math.inf
    for attribute, gap in _gaps(cfg, val_labels, val_scores, data.val).items():
        metrics[M.auroc_gap("val", attribute)] = gap
    if cfg.test_every_epoch:
        test_scores, test_labels = predict(model, data.test, cfg.speed.eval_batch_size)
        metrics[M.TEST_AUROC_MACRO_AT_EPOCH] = macro_auroc(test_labels, test_scores)
        for attribute, gap in _gaps(cfg, test_labels, test_scores, data.test).items():
            metrics[M.auroc_gap_at_epoch(attribute)] = gap
    return metrics


def _gaps(cfg: TrialConfig, labels: np.ndarray, scores: np.ndarray, dataset: CacheSplitDataset) -> dict[str, float]:
    return subgroup_auroc_gaps(labels, scores, dataset.split.sex, dataset.split.age, cfg.age_edges)


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The AdamW under Opacus' DPOptimizer (its state is what a checkpoint needs)."""
    return getattr(optimizer, "original_optimizer", optimizer)


def _generator_state(rng: Generator | None) -> torch.Tensor | None:
    return rng.get_state() if isinstance(rng, torch.Generator) else None


# ----------------------------------------------------------------------------------------------------
# Privacy guards


def check_planned_budget(cfg: TrialConfig, n_records: int) -> None:
    """Refuse to start unless the driver's (sigma, q, steps) match this data and end at or below the target
    (`trainables.privacy.planning.check_plan`).

    ``n_records``: training images, or training patients for ``privacy_unit: patient``."""
    try:
        check_plan(cfg.privacy, n_records)
    except PlanError as error:
        raise BudgetError(str(error)) from None


def check_ledger(accountant: IAccountant, cfg: TrialConfig, steps: int) -> None:
    """The accountant must account for exactly the steps taken, at the trial's (sigma, q), after its one
    label-count release when it makes one: a lost, doubled or foreign ledger would misreport epsilon silently."""
    privacy = cfg.privacy
    try:
        accounting.check_ledger(
            accountant.history,
            privacy.noise_multiplier,
            privacy.sample_rate,
            steps,
            privacy.label_count_noise_multiplier,
        )
    except ValueError as error:
        raise BudgetError(str(error)) from None


def patient_epsilons(cfg: TrialConfig, steps: int, patient_ids: np.ndarray) -> dict[str, float]:
    """What an image-level private trial means for a patient: epsilon for the training split's patient with the most
    images and for the 99th percentile (`trainables.privacy.units`; the counts are treated as public, like N)."""
    privacy = cfg.privacy
    counts = images_per_patient(patient_ids)
    epsilons: dict[int, float] = {}
    for k in {counts.maximum, counts.p99}:
        epsilons[k] = patient_epsilon(
            privacy.noise_multiplier,
            privacy.sample_rate,
            steps,
            privacy.delta,
            k,
            label_count_noise_multiplier=privacy.label_count_noise_multiplier,
        )
    return {
        M.EPSILON_PATIENT: epsilons[counts.maximum],
        M.PATIENT_IMAGES: counts.maximum,
        M.EPSILON_PATIENT_P99: epsilons[counts.p99],
        M.PATIENT_IMAGES_P99: counts.p99,
    }


def trial_pos_weight(
    cfg: TrialConfig,
    labels: np.ndarray,
    records: TrainingRecords,
    randomness: MechanismRandomness,
    state: dict[str, Any] | None,
) -> PosWeight | None:
    """The BCE positive weights: none (``uniform``), or for ``train`` the Gaussian-noised label counts of a private
    trial (an accounted release, reused from the checkpoint on resume) or exact counts of a non-private one.

    ``labels`` are the training split's; a private patient-level trial counts only the images its patients train on
    (each one's first ``max_images_per_patient``, ``records.patients``), so that removing a patient moves each count
    by at most the cap (`trainables.privacy.label_counts`, sensitivity K sqrt(L))."""
    if cfg.pos_weight == "uniform":
        return None
    patients = records.patients
    if patients is not None:
        labels = patient_labels(labels, patients.images)
    saved = (state or {}).get("label_counts")
    return train_pos_weight(
        labels,
        target_epsilon=cfg.privacy.target_epsilon,
        noise_multiplier=cfg.privacy.label_count_noise_multiplier,
        rng=randomness.noise if isinstance(randomness.noise, SecureRandom) else None,
        restored=None if saved is None else LabelCountRelease.from_dict(saved),
        max_images_per_patient=None if patients is None else patients.max_images_per_patient,
    )


# ----------------------------------------------------------------------------------------------------
# Final evaluation


def final_evaluation(train: TrainState, data: TrialData) -> TrialResult:
    """Test and external-test metrics of the selected epoch's weights; thresholds fitted on validation."""
    cfg, model, privacy = train.cfg, train.model, train.cfg.privacy
    if train.best_weights is None:
        raise RuntimeError(f"no epoch was selected after {train.epoch} epoch(s): the trial has no weights to evaluate")
    model.load_state_dict(train.best_weights)
    val_scores, val_labels = predict(model, data.val, cfg.speed.eval_batch_size)
    thresholds = fit_thresholds(val_labels, val_scores)

    predictions = []

    def evaluate(name: str, dataset: CacheSplitDataset, prefix: str) -> Evaluation:
        scores, labels = predict(model, dataset, cfg.speed.eval_batch_size)
        predictions.append(prediction_table(name, dataset.split.rows, scores))
        return evaluate_split(
            labels,
            scores,
            sex=dataset.split.sex,
            age=dataset.split.age,
            thresholds=thresholds,
            age_edges=cfg.age_edges,
            n_boot=cfg.n_boot,
            boot_seed=dataset_bootstrap_seed(name),
            prefix=prefix,
        )

    evaluation = evaluate(cfg.dataset, data.test, "test")
    metrics = dict(evaluation.metrics)
    metrics[M.BEST_EPOCH] = train.best_epoch
    metrics[M.STEPS] = train.steps
    selected = train.selected  # the selected epoch's validation numbers: Optuna's objectives
    metrics[M.VAL_SELECTED_AUROC_MACRO] = selected[M.VAL_AUROC_MACRO]
    for attribute in ("sex", "age"):
        metrics[M.val_selected_auroc_gap(attribute)] = selected.get(M.auroc_gap("val", attribute), math.nan)
    if train.accountant is not None:
        check_ledger(train.accountant, cfg, train.steps)
    if train.accountant is not None and not cfg.proxy:  # a proxy trial's data is public: it reports no epsilon
        metrics[M.EPSILON] = train.accountant.get_epsilon(privacy.delta)
        metrics[M.EPSILON_AT_BEST_EPOCH] = selected[M.EPSILON]
        cross = cross_check_epsilon(
            privacy.noise_multiplier,
            privacy.sample_rate,
            train.steps,
            privacy.delta,
            label_count_noise_multiplier=privacy.label_count_noise_multiplier,
        )
        metrics[M.EPSILON_CROSS_CHECK_RDP] = cross["rdp"]
        metrics[M.EPSILON_CROSS_CHECK_PLD] = cross["pld"]
        metrics[M.EPSILON_REPLACE_ONE] = replace_one_epsilon(  # the same run with N fixed (names.EPSILON_REPLACE_ONE)
            privacy.noise_multiplier,
            privacy.sample_rate,
            train.steps,
            privacy.delta,
            label_count_noise_multiplier=privacy.label_count_noise_multiplier,
        )
        if privacy.privacy_unit == "image":
            metrics |= patient_epsilons(cfg, train.steps, data.train.split.patient_id)
    elif train.accountant is None:
        metrics[M.EPSILON] = math.inf
        metrics[M.EPSILON_AT_BEST_EPOCH] = math.inf
    # The run's one timing figure (a private trial reports no per-epoch time); NaN if this process trained no epoch.
    metrics[M.SYSTEM_TOTAL_TRAIN_S] = train.train_seconds if train.train_seconds > 0 else math.nan
    parts = {
        "groups": [evaluation.groups.assign(dataset=cfg.dataset)],
        "bootstrap": [evaluation.bootstrap.reset_index().assign(dataset=cfg.dataset)],
    }
    for name, dataset in data.external.items():
        external = evaluate(name, dataset, f"external/{name}")
        metrics.update(external.metrics)
        parts["groups"].append(external.groups.assign(dataset=name))
        parts["bootstrap"].append(external.bootstrap.reset_index().assign(dataset=name))
    tables = {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}
    tables["epochs"] = pd.DataFrame(train.history)
    tables["predictions"] = pd.concat(predictions, ignore_index=True)
    return TrialResult(metrics, tables, model)


def prediction_table(dataset: str, rows: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The selected model's sigmoid scores on one evaluated split, one row per image: ``dataset``, ``row`` (the
    image's row in that dataset's cache manifest, nothing else identifying) and ``score/<label>`` (float32). Any
    metric can be recomputed from it and the manifest (labels, sex, age) without retraining."""
    table = pd.DataFrame({"dataset": dataset, "row": np.asarray(rows, dtype=np.int64)})
    for j, label in enumerate(LABELS):
        table[M.prediction_score(label)] = scores[:, j].astype(np.float32)
    return table
