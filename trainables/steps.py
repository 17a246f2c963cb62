"""What one training step of a trial does: one small stepper per kind of step, behind one interface, chosen once.

    kind                    batches (one epoch)                              step
    non-private baseline    a shuffled permutation cut into batches of B     AdamW on the batch's mean loss
    image-level DP-SGD      Poisson-sampled images at rate q                 clip each image, noise once, AdamW
    patient-level DP-SGD    Poisson-sampled patients at rate q               clip each patient's summed gradient

`make_stepper` picks the kind from the trial config and, for the private kinds, builds the mechanism with
`trainables.privacy.setup.make_private` (wrap, self-check, accountant, DP optimizer). Speed knobs (bf16 autocast,
fixed-shape padding, physical chunk size) are settings of a stepper (`StepSettings`), never separate code paths.

A stepper's ``step(indices, number)`` gets the step's 1-based number in the trial (resumes included): a private
stepper refuses a step beyond the planned ones, which would release more than the accountant was planned for.
The loss of a private batch is not clipped, noised or accounted, so private steps return None: it is never released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch
from opacus.accountants.accountant import IAccountant
from torch import nn

from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig
from trainables.data.loaders import TrainBatches
from trainables.privacy.engine import poisson_batches, private_step
from trainables.privacy.label_counts import LabelCountRelease
from trainables.privacy.patients import PatientIndex, private_patient_step
from trainables.privacy.randomness import MechanismRandomness
from trainables.privacy.secure import SecureRandom
from trainables.privacy.setup import PrivateSetup, SelfCheckBatch, make_private

GRAD_CHECK_SAMPLES = 4
"""Images the per-sample-gradient self-check runs on."""
GRAD_CHECK_PATIENTS = 2
"""Patient-level trials also check the grouped path on this many of the patients with the most (capped) images."""

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BudgetError(RuntimeError):
    """Training would spend more epsilon than the trial's target."""


class Stepper(Protocol):
    """One kind of training step (module docstring).

    Attributes:
        optimizer: what the trial checkpoints (the AdamW, or the DP optimizer around it).
        accountant: the privacy ledger; None for the non-private baseline.
        images_per_epoch: the images one epoch draws from (all training images, or the patients' capped ones).
        expected_images_per_step: q times ``images_per_epoch`` for the private kinds (throughput figures use
            expected counts only, never the secret realized batch sizes); None for the baseline.
    """

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def accountant(self) -> IAccountant | None: ...

    @property
    def images_per_epoch(self) -> int: ...

    @property
    def expected_images_per_step(self) -> float | None: ...

    def epoch_batches(self) -> Iterator[torch.Tensor]:
        """One epoch's batches: record indices (images, or patients) per step."""
        ...

    def step(self, indices: np.ndarray, number: int) -> torch.Tensor | None:
        """Train on the records ``indices`` as the trial's step ``number`` (1-based); the batch's mean loss as a
        0-dim tensor on the device for the baseline, None for the private kinds (never released)."""
        ...


@dataclass(frozen=True)
class StepSettings:
    """How training steps run on this device (`step_settings`); speed only, never the mechanism.

    Attributes:
        pad_multiple: the padding granule of fixed-shape chunks (``speed.fixed_shapes``), None for no padding.
        autocast_dtype: ``torch.bfloat16`` under ``speed.precision: bf16``, else None.
        memory_format: the model's memory format (channels-last under ``speed.cuda_tuning`` on CUDA).
    """

    pad_multiple: int | None
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format


def step_settings(speed: SpeedConfig, device: torch.device) -> StepSettings:
    """Resolve the speed knobs for ``device``, and set the process-wide CUDA kernel flags (``speed.cuda_tuning``:
    TF32 matmuls and convolutions, ``cudnn.benchmark``; all off when false). Nothing changes on the CPU."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = speed.cuda_tuning
        torch.backends.cudnn.benchmark = speed.cuda_tuning
    return StepSettings(
        pad_multiple=speed.pad_multiple
        if speed.fixed_shapes == "on" or (speed.fixed_shapes == "auto" and cuda)
        else None,
        autocast_dtype=torch.bfloat16 if speed.precision == "bf16" else None,
        memory_format=torch.channels_last if cuda and speed.cuda_tuning else torch.preserve_format,
    )


def per_sample_bce(pos_weight: np.ndarray | None, device: torch.device) -> PerSampleLoss:
    """Multi-label BCE with logits, averaged over labels: one loss per sample (float32 positive weights)."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32).to(device)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=weight, reduction="none"
        ).mean(dim=1)

    return loss


# ----------------------------------------------------------------------------------------------------
# The three kinds


@dataclass(frozen=True)
class TrainingRecords:
    """The training split as the steps see it.

    Attributes:
        source: its batches on the trial's device (`trainables.data.loaders.train_batches`).
        n_images: its images.
        patients: for a private patient-level trial, its images grouped by patient (the cap applied), else None.
    """

    source: TrainBatches
    n_images: int
    patients: PatientIndex | None = None

    @property
    def n_records(self) -> int:
        """N, the records Poisson sampling draws: images, or patients."""
        return self.n_images if self.patients is None else self.patients.n_patients

    @property
    def images_per_epoch(self) -> int:
        """The images an epoch draws from: all of them, or the patients' capped ones."""
        return self.n_images if self.patients is None else sum(len(images) for images in self.patients.images)


@dataclass(frozen=True)
class BaselineStepper:
    """The non-private baseline: shuffled batches of ``batch_size`` images (``sampler``: seeded by ``cfg.seed``),
    one AdamW step on each batch's mean loss, the forward under autocast to ``autocast_dtype`` when given."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: PerSampleLoss
    source: TrainBatches
    images_per_epoch: int
    batch_size: int
    sampler: torch.Generator
    autocast_dtype: torch.dtype | None
    accountant: None = None
    expected_images_per_step: None = None

    def epoch_batches(self) -> Iterator[torch.Tensor]:
        return shuffled_batches(self.images_per_epoch, self.batch_size, self.sampler)

    def step(self, indices: np.ndarray, number: int) -> torch.Tensor:
        return sgd_step(self.model, self.optimizer, self.loss_fn, self.source.batch(indices), self.autocast_dtype)


@dataclass(frozen=True, kw_only=True)
class _DPStepper:
    """What both private kinds share: the verified setup, Poisson sampling of ``n_records`` records at the planned q
    from the mechanism's ``sampler``, and the refusal of steps beyond the planned ones."""

    setup: PrivateSetup
    loss_fn: PerSampleLoss
    source: TrainBatches
    privacy: PrivacyConfig
    sampler: torch.Generator | SecureRandom
    max_physical_batch_size: int
    n_records: int
    images_per_epoch: int

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return cast(torch.optim.Optimizer, self.setup.optimizer)  # Opacus ships no type hints; a DPOptimizer is one

    @property
    def accountant(self) -> IAccountant:
        return self.setup.accountant

    @property
    def expected_images_per_step(self) -> float:
        return self.privacy.sample_rate * self.images_per_epoch

    def epoch_batches(self) -> Iterator[torch.Tensor]:
        steps_per_epoch = self.privacy.steps // self.privacy.epochs
        return poisson_batches(self.n_records, self.privacy.sample_rate, steps_per_epoch, self.sampler)

    def check_budget(self, number: int) -> None:
        """Refuse step ``number`` beyond the planned steps (the accountant was planned for those only)."""
        if number > self.privacy.steps:
            raise BudgetError(f"step {number} would exceed the {self.privacy.steps} planned steps")


@dataclass(frozen=True, kw_only=True)
class ImageDPStepper(_DPStepper):
    """Image-level DP-SGD: the records are images; one `private_step` per Poisson batch, in physical chunks (padded
    to ``settings.pad_multiple`` when fixed shapes are on, under bf16 autocast when set)."""

    settings: StepSettings

    def step(self, indices: np.ndarray, number: int) -> None:
        self.check_budget(number)
        private_step(
            self.setup.wrapped,
            self.setup.optimizer,
            self.loss_fn,
            self.source.batch(indices),
            self.max_physical_batch_size,
            pad_multiple=self.settings.pad_multiple,
            autocast_dtype=self.settings.autocast_dtype,
        )


@dataclass(frozen=True, kw_only=True)
class PatientDPStepper(_DPStepper):
    """Patient-level DP-SGD (`trainables.privacy.patients`): the records are patients; a batch's indices are
    patients, who bring their (capped) images; one clipped gradient per patient, in chunks of whole patients (each
    padded to ``settings.pad_multiple`` when fixed shapes are on, under bf16 autocast when set)."""

    patients: PatientIndex
    settings: StepSettings

    def step(self, indices: np.ndarray, number: int) -> None:
        self.check_budget(number)
        images, groups = self.patients.gather(indices)
        batch = patient_batch(self.source, images)
        private_patient_step(
            self.setup.wrapped,
            self.setup.optimizer,
            self.loss_fn,
            batch,
            groups,
            self.max_physical_batch_size,
            pad_multiple=self.settings.pad_multiple,
            autocast_dtype=self.settings.autocast_dtype,
        )


# ----------------------------------------------------------------------------------------------------
# Chosen once


def make_stepper(
    cfg: TrialConfig,
    model: nn.Module,
    loss_fn: PerSampleLoss,
    records: TrainingRecords,
    randomness: MechanismRandomness,
    settings: StepSettings,
    label_count_release: LabelCountRelease | None,
) -> Stepper:
    """The trial's stepper around ``model``: AdamW at ``cfg.lr``, and for a private trial the verified DP setup of
    `make_private` (the self-check's records drawn from ``cfg.seed`` by `self_check_batch`).

    Args:
        randomness: the trial's sources: the baseline's shuffling, or Poisson sampling and noise.
        label_count_release: the label-count release to account first (None when there is none or on resume).
    """
    privacy = cfg.privacy
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if not privacy.is_private:
        assert isinstance(randomness.sampler, torch.Generator)  # a baseline's shuffling is seeded by cfg.seed
        return BaselineStepper(
            model,
            optimizer,
            loss_fn,
            records.source,
            records.images_per_epoch,
            privacy.expected_batch_size,
            randomness.sampler,
            settings.autocast_dtype,
        )
    assert randomness.noise is not None  # a private trial always has a noise source
    setup = make_private(
        model,
        optimizer,
        loss_fn,
        privacy=privacy,
        grad_sample_mode=cfg.speed.grad_sample_mode,
        check=self_check_batch(records, cfg.seed),
        noise=randomness.noise,
        label_count_release=label_count_release,
    )
    if records.patients is None:
        return ImageDPStepper(
            setup=setup,
            loss_fn=loss_fn,
            source=records.source,
            privacy=privacy,
            sampler=randomness.sampler,
            max_physical_batch_size=cfg.speed.max_physical_batch_size,
            n_records=records.n_records,
            images_per_epoch=records.images_per_epoch,
            settings=settings,
        )
    return PatientDPStepper(
        setup=setup,
        loss_fn=loss_fn,
        source=records.source,
        privacy=privacy,
        sampler=randomness.sampler,
        max_physical_batch_size=cfg.speed.max_physical_batch_size,
        n_records=records.n_records,
        images_per_epoch=records.images_per_epoch,
        patients=records.patients,
        settings=settings,
    )


def self_check_batch(records: TrainingRecords, seed: int) -> SelfCheckBatch:
    """The self-check's records, drawn from the public ``seed`` (``cfg.seed``; not part of the mechanism):
    `GRAD_CHECK_SAMPLES` images of a seeded permutation, and for a patient-level trial the `GRAD_CHECK_PATIENTS`
    patients with the most (capped) images (ties in a seeded order)."""
    rows = torch.randperm(records.n_images, generator=torch.Generator().manual_seed(seed))[:GRAD_CHECK_SAMPLES]
    images = records.source.batch(rows.numpy())
    patients = records.patients
    if patients is None:
        return SelfCheckBatch(images)
    order = torch.randperm(patients.n_patients, generator=torch.Generator().manual_seed(seed)).numpy()
    most = sorted(order, key=lambda patient: -len(patients.images[patient]))  # stable: seeded ties
    patient_images, groups = patients.gather(np.array(most[:GRAD_CHECK_PATIENTS]))
    return SelfCheckBatch(images, (*patient_batch(records.source, patient_images), groups))


# ----------------------------------------------------------------------------------------------------
# Pieces of a step


def patient_batch(source: TrainBatches, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The images in the given (patient-contiguous) order; the source reads them in ascending order."""
    x, y = source.batch(images)
    position = torch.from_numpy(np.argsort(np.argsort(images, kind="stable"), kind="stable")).to(x.device)
    return x[position], y[position]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of the non-private baseline: a random permutation of ``range(n)`` cut into batches."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: PerSampleLoss,
    batch: tuple[torch.Tensor, torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One non-private step on the batch's mean loss (forward under autocast to ``autocast_dtype`` if given);
    returns that loss as a detached 0-dim tensor on the device (read once per epoch, `trainables.train.mean_loss`)."""
    x, y = batch
    autocast = nullcontext() if autocast_dtype is None else torch.autocast(x.device.type, dtype=autocast_dtype)
    with autocast:
        loss = loss_fn(model(x), y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward has no annotations
    optimizer.step()
    return loss.detach()
