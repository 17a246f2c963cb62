"""Privacy cost of hyperparameter tuning: agreement with dp-accounting called directly, composition
identities, the mixture (order-wise maximum) rule, monotonicity, non-private trials, input errors.

Golden values were computed once with dp-accounting 0.6.0 and are pinned to 1e-6 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp_internals

from trainables.privacy.accounting import epsilon_spent
from trainables.privacy.tuning import (
    DEFAULT_TNB_SHAPE,
    TUNING_METHODS,
    TrialMechanism,
    TuningCost,
    tuning_epsilon,
)

DELTA = 6e-6
# Smoke sweep scale: q = 1/56, 168 steps; sigmas calibrated for target epsilon 1, 3, 8 (RDP).
Q, STEPS = 1 / 56, 168
SIGMAS = (1.371, 0.855, 0.596)
SMOKE_PRIVATE = [TrialMechanism(sigma, Q, STEPS) for sigma in SIGMAS] * 2  # two inits per target
SMOKE_TRIALS = SMOKE_PRIVATE + [TrialMechanism(0.0, Q, STEPS)] * 2  # + the two non-private baselines
RANDOM_METHODS = ("poisson", "truncated_negative_binomial")
SHAPE_OF = {"poisson": math.inf, "truncated_negative_binomial": DEFAULT_TNB_SHAPE}


def direct_epsilon(event: dp_event.DpEvent, delta: float = DELTA) -> float:
    """dp-accounting's RDP epsilon of an event, called directly."""
    accountant = RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def dpsgd_event(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def rdp_curve(sigma: float, q: float, steps: int) -> np.ndarray:
    accountant = RdpAccountant()
    accountant.compose(dpsgd_event(sigma, q, steps))
    return accountant.rdp


# Two trials whose RDP curves cross: heavy noise on full batches (RDP linear in the order) against
# light noise with small q (cheap at low orders, expensive at high orders).
CROSSING = [TrialMechanism(3.0, 1.0, 20), TrialMechanism(0.7, 0.02, 200)]


# --- "fixed": composition ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 8])
def test_fixed_k_identical_trials_equal_one_trial_with_k_times_the_steps(k):
    cost = tuning_epsilon([TrialMechanism(0.855, Q, STEPS)] * k, DELTA)
    assert cost.epsilon == pytest.approx(direct_epsilon(dpsgd_event(0.855, Q, k * STEPS)), rel=1e-12)
    # Opacus's RDP (what trials log) for k * steps: same mechanism, differs only in the orders/series.
    assert cost.epsilon == pytest.approx(epsilon_spent(0.855, Q, k * STEPS, DELTA), rel=5e-3)
    assert cost.expected_trials == k and cost.n_trials == k and cost.shape is None


def test_fixed_one_trial_is_the_per_trial_epsilon():
    cost = tuning_epsilon([TrialMechanism(0.596, Q, STEPS)], DELTA)
    assert cost.epsilon == cost.per_trial_epsilon
    assert cost.per_trial_epsilon == pytest.approx(epsilon_spent(0.596, Q, STEPS, DELTA), rel=2e-3)


def test_fixed_mixed_trials_equal_dp_accounting_composed_event():
    cost = tuning_epsilon(SMOKE_PRIVATE + CROSSING, DELTA, "fixed")
    events = [dpsgd_event(t.noise_multiplier, t.sample_rate, t.steps) for t in SMOKE_PRIVATE + CROSSING]
    assert cost.epsilon == pytest.approx(direct_epsilon(dp_event.ComposedDpEvent(events)), rel=1e-12)


# --- random counts: Papernot & Steinke through RepeatAndSelectDpEvent -------------------------


@pytest.mark.parametrize("method", RANDOM_METHODS)
@pytest.mark.parametrize("mean", [1.0, 3.0, 8.0])
def test_random_count_one_mechanism_equals_repeat_and_select_event(method, mean):
    trials = [TrialMechanism(0.855, Q, STEPS)] * 4
    cost = tuning_epsilon(trials, DELTA, method, expected_trials=mean)
    event = dp_event.RepeatAndSelectDpEvent(dpsgd_event(0.855, Q, STEPS), mean, SHAPE_OF[method])
    assert cost.epsilon == pytest.approx(direct_epsilon(event), rel=1e-12)
    assert cost.expected_trials == mean and cost.shape == SHAPE_OF[method]


@pytest.mark.parametrize("shape", [0.0, 0.5, 2.0])
def test_truncated_negative_binomial_shape_is_passed_through(shape):
    cost = tuning_epsilon(SMOKE_PRIVATE[:3], DELTA, "truncated_negative_binomial", shape=shape)
    event = dp_event.RepeatAndSelectDpEvent(dpsgd_event(0.596, Q, STEPS), 3.0, shape)
    assert cost.epsilon == pytest.approx(direct_epsilon(event), rel=1e-12)
    assert cost.shape == shape


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_count_same_q_and_steps_is_accounted_as_the_smallest_sigma(method):
    # With equal q and steps the smallest sigma has the largest RDP at every order, so Q is that trial.
    cost = tuning_epsilon(SMOKE_PRIVATE, DELTA, method)
    event = dp_event.RepeatAndSelectDpEvent(dpsgd_event(min(SIGMAS), Q, STEPS), 6.0, SHAPE_OF[method])
    assert cost.epsilon == pytest.approx(direct_epsilon(event), rel=1e-12)
    assert cost.expected_trials == len(SMOKE_PRIVATE)


def test_internal_routine_matches_public_event_path():
    # The non-dominated case calls dp-accounting's private routine; pin it to the public event path.
    curve = rdp_curve(0.855, Q, STEPS)
    orders = np.asarray(rdp_internals.DEFAULT_RDP_ORDERS)
    for shape in (0.0, 1.0, math.inf):
        rdp = rdp_internals._compute_rdp_repeat_and_select(orders, curve, 5.0, shape)
        via_event = dp_event.RepeatAndSelectDpEvent(dpsgd_event(0.855, Q, STEPS), 5.0, shape)
        assert rdp_internals.compute_epsilon(orders, rdp, DELTA)[0] == pytest.approx(direct_epsilon(via_event))


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_crossing_curves_use_the_order_wise_maximum(method):
    curves = [rdp_curve(t.noise_multiplier, t.sample_rate, t.steps) for t in CROSSING]
    assert not np.all(curves[0] >= curves[1]) and not np.all(curves[1] >= curves[0]), "curves must cross"
    cost = tuning_epsilon(CROSSING, DELTA, method, expected_trials=4.0)

    orders = np.asarray(rdp_internals.DEFAULT_RDP_ORDERS)
    rdp = rdp_internals._compute_rdp_repeat_and_select(orders, np.maximum(*curves), 4.0, SHAPE_OF[method])
    assert cost.epsilon == pytest.approx(rdp_internals.compute_epsilon(orders, rdp, DELTA)[0], rel=1e-12)
    # At least the cost of repeating either trial alone (the maximum dominates each curve).
    for trial in CROSSING:
        alone = tuning_epsilon([trial], DELTA, method, expected_trials=4.0).epsilon
        assert cost.epsilon >= alone
    assert cost.epsilon > max(tuning_epsilon([trial], DELTA, method, expected_trials=4.0).epsilon for trial in CROSSING)


# --- invariants -------------------------------------------------------------------------------


def test_fixed_is_strictly_increasing_in_the_number_of_trials():
    epsilons = [tuning_epsilon([TrialMechanism(0.855, Q, STEPS)] * k, DELTA).epsilon for k in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_count_is_increasing_in_the_mean_and_sublinear(method):
    trials = [TrialMechanism(0.855, Q, STEPS)]
    means = (1.0, 2.0, 4.0, 8.0, 64.0)
    epsilons = [tuning_epsilon(trials, DELTA, method, expected_trials=m).epsilon for m in means]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
    # Every bound is above one trial; for many trials it is below composing them all.
    assert epsilons[0] >= tuning_epsilon(trials, DELTA).epsilon
    assert epsilons[-1] < tuning_epsilon(trials * 64, DELTA, "fixed").epsilon


def test_smoke_scale_golden_values():
    expected = {
        ("fixed", None): 10.411875080520144,
        ("poisson", None): 11.168024856692236,
        ("truncated_negative_binomial", None): 11.62298876375533,
        ("truncated_negative_binomial", 0.0): 10.884794494442845,
    }
    for (method, shape), epsilon in expected.items():
        cost = tuning_epsilon(SMOKE_TRIALS, DELTA, method, shape=shape, private_trials_only=True)
        assert cost.epsilon == pytest.approx(epsilon, rel=1e-6), (method, shape)
        assert cost.per_trial_epsilon == pytest.approx(8.010833799872975, rel=1e-6)
        assert cost.n_trials == 6 and cost.n_non_private_excluded == 2 and cost.delta == DELTA


# --- non-private trials -----------------------------------------------------------------------


@pytest.mark.parametrize("method", TUNING_METHODS)
def test_non_private_trial_makes_the_tuning_cost_infinite(method):
    cost = tuning_epsilon(SMOKE_TRIALS, DELTA, method)
    assert cost.epsilon == math.inf and cost.per_trial_epsilon == math.inf
    assert not cost.private_only and cost.n_non_private_excluded == 0 and cost.n_trials == 8
    assert "not DP (epsilon = inf)" in cost.sentence and "2 of the 8 trials are non-private" in cost.sentence


def test_private_trials_only_excludes_and_labels():
    cost = tuning_epsilon(SMOKE_TRIALS, DELTA, private_trials_only=True)
    assert cost.epsilon == tuning_epsilon(SMOKE_PRIVATE, DELTA).epsilon
    assert cost.private_only and cost.n_non_private_excluded == 2
    assert cost.sentence.startswith("Private trials only (2 non-private trials excluded;")
    assert "epsilon=10.4, delta=6e-06" in cost.sentence and "at most epsilon=8.01" in cost.sentence
    assert cost.expected_trials == 6.0


def test_private_trials_only_without_non_private_trials_is_still_labelled():
    cost = tuning_epsilon(SMOKE_PRIVATE, DELTA, "poisson", private_trials_only=True)
    assert cost.sentence.startswith("Private trials only. Tuning cost (a Poisson-distributed number")
    assert "Thm. 6" in cost.sentence and cost.n_non_private_excluded == 0


def test_result_is_frozen():
    cost = tuning_epsilon(SMOKE_PRIVATE[:1], DELTA)
    assert isinstance(cost, TuningCost)
    with pytest.raises(AttributeError):
        cost.epsilon = 0.0  # type: ignore[misc]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "geometric"}, r"method='geometric' is not a known .* choose one of \['fixed', 'truncated"),
        ({"delta": 0.0}, r"delta=0\.0 must be in \(0, 1\)"),
        ({"delta": 1.5}, r"delta=1\.5 must be in \(0, 1\)"),
        ({"trials": []}, r"trials is empty"),
        ({"trials": TrialMechanism(1.0, Q, STEPS)}, r"must be a sequence of TrialMechanism"),
        ({"trials": [(1.0, Q, STEPS)]}, r"trials\[0\]=\(1\.0, .*\) is not a TrialMechanism"),
        ({"expected_trials": 4}, r"expected_trials=4 does not apply to method='fixed'"),
        ({"shape": 1.0}, r"shape=1\.0 applies only to method='truncated_negative_binomial'"),
        ({"method": "poisson", "shape": 1.0}, r"shape=1\.0 applies only to"),
        ({"method": "poisson", "expected_trials": 0.5}, r"expected_trials=0\.5 must be a finite number >= 1"),
        ({"method": "poisson", "expected_trials": math.inf}, r"expected_trials=inf must be a finite number"),
        ({"method": "truncated_negative_binomial", "shape": -1.0}, r"shape=-1\.0 must be a finite number >= 0"),
        ({"method": "truncated_negative_binomial", "shape": math.inf}, r"use method='poisson'"),
        ({"trials": [TrialMechanism(0.0, Q, STEPS)], "private_trials_only": True}, r"all 1 trials are non-private"),
        ({"private_trials_only": "yes"}, r"private_trials_only='yes' must be True or False"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    arguments = {"trials": SMOKE_PRIVATE[:1], "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=message):
        tuning_epsilon(**arguments)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((-0.1, Q, STEPS), r"noise_multiplier=-0\.1 must be a finite number >= 0"),
        ((math.inf, Q, STEPS), r"noise_multiplier=inf"),
        ((1.0, 0.0, STEPS), r"sample_rate=0\.0 must be in \(0, 1\]"),
        ((1.0, 1.5, STEPS), r"sample_rate=1\.5"),
        ((1.0, Q, 0), r"steps=0 must be a whole number >= 1"),
        ((1.0, Q, 2.5), r"steps=2\.5 must be a whole number"),
    ],
)
def test_bad_trial_mechanism_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        TrialMechanism(*fields)


def test_trial_mechanism_normalises_numpy_scalars():
    trial = TrialMechanism(np.float32(0.5), np.float64(Q), np.int64(STEPS))
    assert type(trial.noise_multiplier) is float and type(trial.steps) is int
    assert trial.is_private and not TrialMechanism(0, Q, STEPS).is_private
