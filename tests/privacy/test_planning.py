"""`plan_privacy`, the one recipe for (q, steps, sigma): golden smoke-scale values, the label-count release, the
non-private baseline, a given sigma, and the trial-side re-check `check_plan`."""

from __future__ import annotations

import dataclasses
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from trainables.config import PrivacyConfig
from trainables.privacy.planning import PlanError, check_parameters, check_plan, plan_privacy, planned_epsilon

SMOKE_N, SMOKE_DELTA = 1777, 6e-6  # the smoke sweep's training images; B = 32, 3 epochs
SMOKE = PrivacyConfig(target_epsilon=1.0, delta=SMOKE_DELTA, expected_batch_size=32, epochs=3)


def dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float, count_sigma: float | None = None) -> float:
    accountant = RdpAccountant()
    if count_sigma is not None:
        accountant.compose(dp_event.GaussianDpEvent(count_sigma))
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("target", "sigma"), [(1.0, 1.37109375), (8.0, 0.59619140625)])
def test_smoke_plan_is_the_golden_one(target: float, sigma: float) -> None:
    planned = plan_privacy(dataclasses.replace(SMOKE, target_epsilon=target), SMOKE_N)
    # q = 1/ceil(1777/32) = 1/56, steps = 3 x 56; sigma as in tests/privacy/test_units.py
    assert (planned.sample_rate, planned.steps, planned.noise_multiplier) == (1 / 56, 168, sigma)
    assert target - SMOKE.calibration_tolerance <= planned_epsilon(planned) <= target
    assert planned_epsilon(planned) == pytest.approx(dp_accounting_epsilon(sigma, 1 / 56, 168, SMOKE_DELTA), rel=1e-2)
    check_plan(planned, SMOKE_N)  # the trial's own re-check accepts it


def test_the_label_count_release_is_inside_the_target() -> None:
    plain = plan_privacy(SMOKE, SMOKE_N)
    with_release = plan_privacy(dataclasses.replace(SMOKE, label_count_noise_multiplier=20.0), SMOKE_N)
    assert with_release.label_count_noise_multiplier == 20.0
    assert with_release.noise_multiplier > plain.noise_multiplier
    total = planned_epsilon(with_release)
    assert total <= 1.0
    assert total > planned_epsilon(dataclasses.replace(with_release, label_count_noise_multiplier=None))
    reference = dp_accounting_epsilon(with_release.noise_multiplier, 1 / 56, 168, SMOKE_DELTA, count_sigma=20.0)
    assert total == pytest.approx(reference, rel=1e-2)


def test_a_non_private_baseline_has_no_noise_and_no_sample_rate() -> None:
    planned = plan_privacy(dataclasses.replace(SMOKE, target_epsilon=math.inf), SMOKE_N)
    assert (planned.noise_multiplier, planned.sample_rate, planned.steps) == (0.0, 0.0, 168)
    assert planned_epsilon(planned) == math.inf
    check_plan(planned, 5)  # nothing to check: no guarantee claimed


def test_a_given_sigma_is_kept_and_its_epsilon_is_reported_not_hidden() -> None:
    planned = plan_privacy(SMOKE, SMOKE_N, noise_multiplier=0.5)
    assert (planned.noise_multiplier, planned.sample_rate, planned.steps) == (0.5, 1 / 56, 168)
    assert planned_epsilon(planned) > SMOKE.target_epsilon
    with pytest.raises(PlanError, match=r"sigma=0.5 spends epsilon .* > target 1.0 over 168 steps"):
        check_plan(planned, SMOKE_N)


def test_a_plan_for_other_records_is_refused() -> None:
    planned = plan_privacy(SMOKE, SMOKE_N)
    with pytest.raises(
        PlanError,
        match=r"q=0.017857142857142856, steps=168 but the data gives q=0.01754.*, steps=171 \(N=1807 images\)",
    ):
        check_plan(planned, SMOKE_N + 30)  # ceil(1807/32) = 57 batches


@pytest.mark.parametrize(
    ("changes", "n_records", "message"),
    [
        ({"delta": 1e-3}, SMOKE_N, r"delta=0.001 >= 1/N=0.000562746 for N=1777"),
        (
            {"expected_batch_size": 2000},
            SMOKE_N,
            r"expected_batch_size=2000 must be a whole number in \[1, n_train=1777\]",
        ),
        ({}, 0, r"n_train=0 must be a whole number >= 1"),
    ],
)
def test_parameters_out_of_range_are_refused_before_calibrating(changes, n_records, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_parameters(dataclasses.replace(SMOKE, **changes), n_records)
    with pytest.raises(ValueError, match=message):
        plan_privacy(dataclasses.replace(SMOKE, **changes), n_records)
