"""The privacy plan of a trial: sample rate, steps and noise multiplier for N records, in one place.

Every site that needs "q, steps and sigma for N records at (target epsilon, delta, accountant, tolerance,
label-count release)" calls `plan_privacy`: the sweep planner, the dry run, the audit (which re-plans for a training
split enlarged by canaries), Optuna's feasibility check, the benchmarks and the tests. A trial re-checks its plan
against its own data with `check_plan` before training. Nothing outside `trainables.privacy` calls the calibration
or the sample-rate/steps helpers of `trainables.privacy.accounting` directly.

The plan (Opacus' convention for Poisson sampling, `accounting.sample_rate_and_steps`):

    q = 1 / ceil(N / B),   steps = epochs * ceil(N / B),   sigma = the smallest noise multiplier whose epsilon
    after ``steps`` steps, composed with the label-count release when the trial makes one, is at most the target
    and at least ``target - calibration_tolerance`` (`accounting.calibrate_noise_multiplier`).

N is the number of records of the privacy unit: training images, or training patients for ``privacy_unit:
patient``. It is treated as public (add/remove adjacency of one record with N known). A non-private baseline
(``target_epsilon = inf``) gets sigma 0 and q 0 and keeps its planned step count (epochs of shuffled batches).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from trainables.config import PrivacyConfig, PrivacySettings
from trainables.privacy.accounting import (
    calibrate_noise_multiplier,
    epsilon_spent,
    sample_rate_and_steps,
    validate_privacy_parameters,
)

__all__ = ["PlanError", "check_parameters", "check_plan", "plan_privacy", "planned_epsilon", "schedule"]


class PlanError(ValueError):
    """A trial's (sigma, q, steps) do not belong to its data or would spend more than its target epsilon."""


def schedule(privacy: PrivacySettings, n_records: int) -> tuple[float, int]:
    """(q, steps) of DP-SGD's Poisson sampling for N records at the settings' expected batch size and epochs
    (`accounting.sample_rate_and_steps`: Opacus' convention), whether or not the trial is private.

    Raises:
        ValueError: N < 1, B outside [1, N] or epochs < 1.
    """
    return sample_rate_and_steps(n_records, privacy.expected_batch_size, privacy.epochs)


def check_parameters(privacy: PrivacyConfig, n_records: int) -> None:
    """Check that the config can be planned for N records without calibrating: B <= N, delta < 1/N, ...

    Raises:
        ValueError: the first setting out of range, with its value and fix.
    """
    sample_rate, steps = schedule(privacy, n_records)
    validate_privacy_parameters(privacy.target_epsilon, privacy.delta, n_records, sample_rate, steps)


def plan_privacy(
    privacy: PrivacyConfig,
    n_records: int,
    *,
    noise_multiplier: float | None = None,
    cache_path: Path | None = None,
) -> PrivacyConfig:
    """``privacy`` with its derived fields (``sample_rate``, ``steps``, ``noise_multiplier``) planned for N records.

    Args:
        privacy: the trial's privacy settings; its target epsilon, delta, expected batch size, epochs, accountant,
            calibration tolerance and label-count release (``label_count_noise_multiplier``, already decided by
            the caller from ``pos_weight``) define the plan. Its derived fields are ignored.
        n_records: N, the training records of the privacy unit (images, or patients).
        noise_multiplier: a given sigma instead of a calibrated one (an Optuna proposal); its epsilon is then
            whatever `planned_epsilon` says and may exceed the target: the caller checks it.
        cache_path: the calibration cache (`accounting.calibrate_noise_multiplier`), or None.

    Returns:
        A new `PrivacyConfig`: q and steps from N, and sigma calibrated so the planned steps end at (not over) the
        target epsilon (0 and q = 0 for a non-private baseline).

    Raises:
        ValueError: N, B, epochs or delta out of range (delta must be below 1/N), or no sigma meets the target.
    """
    check_parameters(privacy, n_records)
    sample_rate, steps = schedule(privacy, n_records)
    if not privacy.is_private:
        return dataclasses.replace(privacy, noise_multiplier=0.0, sample_rate=0.0, steps=steps)
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise_multiplier(
            privacy.target_epsilon,
            privacy.delta,
            sample_rate,
            steps,
            accountant=privacy.accountant,
            tolerance=privacy.calibration_tolerance,
            cache_path=cache_path,
            label_count_noise_multiplier=privacy.label_count_noise_multiplier,
        )
    return dataclasses.replace(privacy, noise_multiplier=float(noise_multiplier), sample_rate=sample_rate, steps=steps)


def planned_epsilon(privacy: PrivacyConfig, steps: int | None = None) -> float:
    """Epsilon of a planned private trial after ``steps`` steps (default: all its planned steps), composed with its
    label-count release, on its own accountant; ``inf`` for a non-private one."""
    if not privacy.is_private:
        return math.inf
    return epsilon_spent(
        privacy.noise_multiplier,
        privacy.sample_rate,
        privacy.steps if steps is None else steps,
        privacy.delta,
        privacy.accountant,
        label_count_noise_multiplier=privacy.label_count_noise_multiplier,
    )


def check_plan(privacy: PrivacyConfig, n_records: int) -> None:
    """Refuse a private plan that does not belong to ``n_records`` or ends above its target epsilon.

    A trial calls this on its own data before training: a plan made for another N (a re-prepared dataset, another
    unit) would account with the wrong q or step count, and a sigma that spends more than the target would
    silently break the budget.

    Raises:
        PlanError: q or steps differ from those of ``n_records``, or the planned epsilon exceeds the target.
    """
    if not privacy.is_private:
        return
    expected_q, expected_steps = schedule(privacy, n_records)
    if privacy.sample_rate != expected_q or privacy.steps != expected_steps:
        raise PlanError(
            f"trial config was calibrated for q={privacy.sample_rate}, steps={privacy.steps} but the data gives "
            f"q={expected_q}, steps={expected_steps} (N={n_records} {privacy.privacy_unit}s); re-run the sweep so "
            "sigma is recalibrated"
        )
    planned = planned_epsilon(privacy)
    if planned > privacy.target_epsilon:
        raise PlanError(
            f"sigma={privacy.noise_multiplier} spends epsilon {planned:.4f} > target "
            f"{privacy.target_epsilon} over {privacy.steps} steps"
        )
