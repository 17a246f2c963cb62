"""The private setup of a DP-SGD run, in one recipe: wrap, self-check, accountant, DP optimizer.

Every run that trains privately (a trial, the white-box audit, the step benchmark) builds its mechanism with
`make_private`, in this order:

1. wrap the model for per-sample clipping (`trainables.privacy.engine.wrap_model`, ``speed.grad_sample_mode``);
2. verify its per-sample gradients against ``torch.func`` on a few records before any step (the image rows; for a
   patient-level run also the grouped path, per-patient sums over a few whole patients, in every mode): a wrong
   engine refuses to train instead of clipping wrong gradients;
3. a fresh accountant (``privacy.accountant``), with the label-count release of ``pos_weight: train`` accounted first
   when the run made one now (a resumed trial's checkpointed ledger already holds it);
4. the DP optimizer around the caller's optimizer: clip to C, noise sigma C from the given source, divide by the
   expected batch size, one accountant step at (sigma, q) per logical batch.

Which records the self-check runs on is the caller's (a trial draws them from its public ``cfg.seed``); the check
itself spends no budget and changes no weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer
from torch import nn

from trainables.config import PrivacyConfig
from trainables.privacy.accounting import create_accountant
from trainables.privacy.bk import PerSampleLoss
from trainables.privacy.engine import (
    GradientCheck,
    WrappedModel,
    check_per_sample_gradients,
    make_dp_optimizer,
    wrap_model,
)
from trainables.privacy.label_counts import LabelCountRelease, account_release
from trainables.privacy.patients import check_patient_gradients
from trainables.privacy.secure import SecureRandom

__all__ = ["PrivateSetup", "SelfCheckBatch", "make_private"]


@dataclass(frozen=True)
class SelfCheckBatch:
    """The records the per-sample-gradient self-check runs on, on the model's device, in float32.

    Attributes:
        images: (x, y) of a few image rows: each row's gradient is checked.
        patients: for a patient-level run, (x, y, groups) of a few whole patients, patient-contiguous, ``groups`` as
            `trainables.privacy.patients.PatientIndex.gather` gives it: each patient's summed gradient is checked.
            None for an image-level run.
    """

    images: tuple[torch.Tensor, torch.Tensor]
    patients: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None


@dataclass(frozen=True)
class PrivateSetup:
    """A verified private training setup (`make_private`).

    Attributes:
        wrapped: the model wrapped for per-sample clipping (``wrapped._module`` is the model itself).
        optimizer: the DP optimizer around the caller's optimizer; its step clips, noises and accounts.
        accountant: the ledger the optimizer steps (the label-count release first when there was one).
        check: the per-image self-check's result.
        patient_check: the grouped (per-patient) self-check's result; None for an image-level run.
    """

    wrapped: WrappedModel
    optimizer: DPOptimizer
    accountant: IAccountant
    check: GradientCheck
    patient_check: GradientCheck | None


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: PerSampleLoss,
    *,
    privacy: PrivacyConfig,
    grad_sample_mode: str,
    check: SelfCheckBatch,
    noise: torch.Generator | SecureRandom,
    label_count_release: LabelCountRelease | None,
) -> PrivateSetup:
    """Wrap ``model``, verify its per-sample gradients, open the ledger and wrap ``optimizer`` (module docstring).

    Args:
        model: the model to train (in train mode, on its device); the wrapper shares its parameters.
        optimizer: the optimizer of its parameters (AdamW in a trial), wrapped by the DP optimizer.
        loss_fn: per-sample loss, one value per record.
        privacy: a planned private config: sigma, C, B, q, the accountant and the privacy unit.
        grad_sample_mode: ``speed.grad_sample_mode`` (`trainables.privacy.engine.GRAD_SAMPLE_MODES`).
        check: the self-check's records; ``check.patients`` is required for, and only for, the patient unit.
        noise: the noise source (`trainables.privacy.randomness`): a generator on the gradients' device, or a
            `SecureRandom`.
        label_count_release: the release to account before any step; None when there is none, or when a resumed
            ledger (restored from a checkpoint) already holds it.

    Raises:
        ValueError: a non-private config, or a self-check batch that does not match the privacy unit.
        PerSampleGradientError: the engine's per-sample (or per-patient) gradients are wrong.
    """
    if not privacy.is_private:
        raise ValueError("make_private needs a private config (finite target epsilon); a baseline has no mechanism")
    patient_level = privacy.privacy_unit == "patient"
    if patient_level != (check.patients is not None):
        raise ValueError(
            f"privacy.privacy_unit={privacy.privacy_unit!r} needs a self-check batch "
            + ("with whole patients (SelfCheckBatch.patients)" if patient_level else "of image rows only")
        )
    wrapped = wrap_model(model, grad_sample_mode)
    image_check = check_per_sample_gradients(wrapped, loss_fn, *check.images)
    patient_check = None
    if check.patients is not None:
        patient_check = check_patient_gradients(wrapped, loss_fn, *check.patients)
    accountant = create_accountant(privacy.accountant)
    if label_count_release is not None:
        account_release(accountant, label_count_release)
    dp_optimizer = make_dp_optimizer(
        optimizer,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=privacy.expected_batch_size,
        noise_generator=noise,
        accountant=accountant,
        sample_rate=privacy.sample_rate,
    )
    return PrivateSetup(wrapped, dp_optimizer, accountant, image_check, patient_check)
