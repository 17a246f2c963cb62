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
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from trainables.privacy.accounting import calibrate_noise_multiplier, epsilon_spent, sample_rate_and_steps
from trainables.privacy.tuning import (
    ADAPTIVE_METHODS,
    DEFAULT_SIGMA_RTOL,
    DEFAULT_TNB_SHAPE,
    TUNING_METHODS,
    AdmissibleSet,
    DominatingRun,
    TrialMechanism,
    TuningCost,
    adaptive_tuning_bound,
    advanced_composition_bound,
    basic_composition_bound,
    dominating_runs,
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


# --- label-count releases (pos_weight: train) -------------------------------------------------

SIGMA_C = 20.0
# sigma calibrated (rdp, Opacus) so that the release and the smoke-scale steps together end at target 2.
SIGMA_WITH_RELEASE = 1.005859375


def with_release_event(sigma: float, q: float, steps: int, sigma_c: float = SIGMA_C) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(sigma_c), dpsgd_event(sigma, q, steps)])


def test_a_trial_with_a_label_count_release_composes_it_before_its_steps():
    """The bug of a one-trial pos_weight: train sweep: a tuning epsilon (1.982, the steps alone) below the trial's own
    (1.991, release included). Composed as the trial accounts it, the tuning epsilon is at least the trial's."""
    trial = TrialMechanism(SIGMA_WITH_RELEASE, Q, STEPS, label_count_noise_multiplier=SIGMA_C)
    cost = tuning_epsilon([trial], DELTA)
    expected = direct_epsilon(with_release_event(SIGMA_WITH_RELEASE, Q, STEPS))
    assert cost.epsilon == pytest.approx(expected, rel=1e-12)
    assert cost.epsilon == pytest.approx(1.9910896774332232, rel=1e-6)
    own = epsilon_spent(SIGMA_WITH_RELEASE, Q, STEPS, DELTA, "rdp", label_count_noise_multiplier=SIGMA_C)
    assert own <= 2.0 and cost.epsilon >= own and cost.per_trial_epsilon >= own
    assert tuning_epsilon([TrialMechanism(SIGMA_WITH_RELEASE, Q, STEPS)], DELTA).epsilon < own  # the release left out


def test_every_trial_s_label_count_release_is_composed():
    trials = [TrialMechanism(s, Q, STEPS, label_count_noise_multiplier=SIGMA_C) for s in SIGMAS]
    cost = tuning_epsilon([*trials, TrialMechanism(0.855, Q, STEPS)], DELTA)
    events = [with_release_event(s, Q, STEPS) for s in SIGMAS] + [dpsgd_event(0.855, Q, STEPS)]
    assert cost.epsilon == pytest.approx(direct_epsilon(dp_event.ComposedDpEvent(events)), rel=1e-12)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_count_repeats_the_whole_trial_release_included(method):
    """Papernot-Steinke's Q runs one trial whole: its release and its steps, so Q's RDP curve includes the release."""
    trial = TrialMechanism(SIGMA_WITH_RELEASE, Q, STEPS, label_count_noise_multiplier=SIGMA_C)
    cost = tuning_epsilon([trial] * 3, DELTA, method)
    event = dp_event.RepeatAndSelectDpEvent(with_release_event(SIGMA_WITH_RELEASE, Q, STEPS), 3.0, SHAPE_OF[method])
    assert cost.epsilon == pytest.approx(direct_epsilon(event), rel=1e-12)
    # Mixed with a trial without a release (curves cross or not): the order-wise maximum of the whole curves.
    other = TrialMechanism(0.8, Q, STEPS)
    mixed = tuning_epsilon([trial, other], DELTA, method, expected_trials=3.0)
    accountant = RdpAccountant()
    accountant.compose(with_release_event(SIGMA_WITH_RELEASE, Q, STEPS))
    curve = np.maximum(accountant.rdp, rdp_curve(0.8, Q, STEPS))
    orders = np.asarray(rdp_internals.DEFAULT_RDP_ORDERS)
    rdp = rdp_internals._compute_rdp_repeat_and_select(orders, curve, 3.0, SHAPE_OF[method])
    assert mixed.epsilon == pytest.approx(rdp_internals.compute_epsilon(orders, rdp, DELTA)[0], rel=1e-12)


# --- reproducible_noise trials: private candidates without a guarantee ------------------------


@pytest.mark.parametrize("method", TUNING_METHODS)
@pytest.mark.parametrize("private_trials_only", [False, True])
def test_reproducible_noise_trials_make_the_tuning_cost_infinite(method, private_trials_only):
    replayed = [TrialMechanism(s, Q, STEPS, reproducible_noise=True) for s in SIGMAS]
    cost = tuning_epsilon(replayed, DELTA, method, private_trials_only=private_trials_only)
    assert cost.epsilon == math.inf and cost.per_trial_epsilon == math.inf and cost.n_reproducible == 3
    assert "not DP (epsilon = inf)" in cost.sentence
    assert "3 of the 3 trials use reproducible_noise (their noise replays from the seed logged with them)" in (
        cost.sentence
    )
    # One among secret-noise trials is enough; non-private baselines left out do not hide it.
    mixed = tuning_epsilon([*SMOKE_TRIALS, replayed[0]], DELTA, method, private_trials_only=True)
    assert mixed.epsilon == math.inf and mixed.n_reproducible == 1 and mixed.n_non_private_excluded == 2
    assert mixed.sentence.startswith("Private trials only (2 non-private trials excluded;")
    assert "1 of the 7 trials use reproducible_noise" in mixed.sentence


def test_non_private_and_reproducible_trials_are_both_named():
    cost = tuning_epsilon([*SMOKE_TRIALS, TrialMechanism(1.0, Q, STEPS, reproducible_noise=True)], DELTA)
    assert cost.epsilon == math.inf
    assert "2 of the 9 trials are non-private and 1 of the 9 trials use reproducible_noise" in cost.sentence


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
        ((1.0, Q, STEPS, 0.0), r"label_count_noise_multiplier=0\.0 must be None \(no label-count release\) or"),
        ((1.0, Q, STEPS, math.inf), r"label_count_noise_multiplier=inf must be None"),
        ((1.0, Q, STEPS, True), r"label_count_noise_multiplier=True must be None"),
        ((0.0, Q, STEPS, 20.0), r"with noise_multiplier=0: a non-private trial makes no label-count release"),
        ((1.0, Q, STEPS, None, "yes"), r"reproducible_noise='yes' must be True or False"),
    ],
)
def test_bad_trial_mechanism_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        TrialMechanism(*fields)


def test_trial_mechanism_normalises_numpy_scalars():
    trial = TrialMechanism(np.float32(0.5), np.float64(Q), np.int64(STEPS))
    assert type(trial.noise_multiplier) is float and type(trial.steps) is int
    assert trial.is_private and not TrialMechanism(0, Q, STEPS).is_private
    released = TrialMechanism(0.5, Q, STEPS, np.float32(20.0), np.bool_(True))
    assert type(released.label_count_noise_multiplier) is float and released.reproducible_noise is True
    assert released.is_private and not released.has_guarantee and trial.has_guarantee
    assert not TrialMechanism(0, Q, STEPS).has_guarantee


# --- adaptive search (Optuna): a bound fixed in advance -------------------------------------------
# N = 1777 is synthetic-a's training split (trainables.data.synthetic.sample_cohort), as in optuna-smoke.


N_SMOKE = 1777
SMALL = AdmissibleSet(N_SMOKE, 2.0, DELTA, (0.4, 4.0), (28, 36), (1, 3))  # 9 batch sizes x 3 epochs


def opacus_curve(sigma: float, q: float, steps: int) -> np.ndarray:
    """Opacus's RDP of one DP-SGD run at its default orders, computed here independently of tuning.py."""
    return opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDPAccountant.DEFAULT_ALPHAS)


def opacus_epsilon(curve: np.ndarray) -> float:
    return float(opacus_rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=DELTA)[0])


def admissible_proposals(admissible: AdmissibleSet) -> list[tuple[float, float, int]]:
    """Every (B, epochs) of the ranges with two feasible sigmas (calibrated, and 1.5x), found independently:
    calibrate_noise_multiplier per pair and epsilon_spent <= target, as sweeps.search checks."""
    proposals = []
    for batch_size in range(admissible.expected_batch_size[0], admissible.expected_batch_size[1] + 1):
        for epochs in range(admissible.epochs[0], admissible.epochs[1] + 1):
            q, steps = sample_rate_and_steps(admissible.n_records, batch_size, epochs)
            sigma = max(
                calibrate_noise_multiplier(admissible.target_epsilon, DELTA, q, steps), admissible.noise_multiplier[0]
            )
            for candidate in (sigma, 1.5 * sigma):
                if candidate <= admissible.noise_multiplier[1]:
                    assert epsilon_spent(candidate, q, steps, DELTA) <= admissible.target_epsilon
                    proposals.append((candidate, q, steps))
    return proposals


def greedy_adversary(curves: list[np.ndarray], k: int) -> float:
    """At each of k steps, the admissible proposal that maximizes the composed epsilon so far."""
    total = np.zeros_like(curves[0])
    for _ in range(k):
        total = max((total + curve for curve in curves), key=opacus_epsilon)
    return opacus_epsilon(total)


def test_adaptive_adversary_never_exceeds_the_worst_case_bound():
    k = 4
    curves = [opacus_curve(*proposal) for proposal in admissible_proposals(SMALL)]
    adversary = greedy_adversary(curves, k)
    bound = adaptive_tuning_bound([(SMALL, k)])
    assert adversary <= bound.epsilon
    # Not vacuous: within 5% (the envelope mixes pairs across orders; the calibrated sigmas sit up to 0.01
    # in epsilon below the target).
    assert adversary >= 0.95 * bound.epsilon
    assert bound.epsilon == pytest.approx(3.323554155885714, rel=1e-6)
    assert bound.method == "worst_case_rdp" and bound.k == k and bound.delta == DELTA
    assert "Mironov 2017" in bound.description and "Feldman & Zrnic 2021" in bound.description


def test_adversary_reacting_to_results_stays_below_the_bound():
    # An adaptive rule that picks the next proposal from a (simulated) result of the previous trial.
    proposals = admissible_proposals(SMALL)
    curves = [opacus_curve(*proposal) for proposal in proposals]
    bound = adaptive_tuning_bound([(SMALL, 5)]).epsilon
    rng = np.random.default_rng(0)
    for _ in range(20):
        total, index = np.zeros_like(curves[0]), int(rng.integers(len(curves)))
        for _ in range(5):
            total = total + curves[index]
            result = rng.random()  # stands in for the trial's validation AUROC
            index = int(result * len(curves)) if result > 0.5 else int(np.argmax([c[20] for c in curves]))
        assert opacus_epsilon(total) <= bound


def test_realized_composition_is_not_an_upper_bound_under_adaptivity():
    # Today's Optuna tuning epsilon composes the curves of the trials that happened to run. An adaptive
    # search that happened to pick benign (noisier) proposals logs less than an adversarial one can spend
    # with proposals from the same admissible set, so the realized number is not a bound on the search.
    k = 4
    proposals = admissible_proposals(SMALL)
    benign = [TrialMechanism(*proposals[1])] * k  # 1.5x the calibrated sigma, feasible
    realized = tuning_epsilon(benign, DELTA, "fixed").epsilon
    adversary = greedy_adversary([opacus_curve(*p) for p in proposals], k)
    bound = adaptive_tuning_bound([(SMALL, k)]).epsilon
    assert realized < adversary <= bound
    assert adversary > 1.5 * realized


def test_dominating_runs_are_certified_brackets():
    runs = dominating_runs(SMALL)
    assert len(runs) == 27  # 9 batch sizes, each its own q here, x 3 epochs: nothing clamps at sigma 0.4
    for run in runs:
        infeasible = epsilon_spent(run.noise_multiplier, run.sample_rate, run.steps, DELTA)
        feasible = epsilon_spent(run.feasible_noise_multiplier, run.sample_rate, run.steps, DELTA)
        assert infeasible > 2.0 >= feasible
        assert run.feasible_noise_multiplier / run.noise_multiplier <= 1 + DEFAULT_SIGMA_RTOL


def test_single_pair_bound_equals_dp_accounting_composition_golden():
    one = AdmissibleSet(N_SMOKE, 3.0, DELTA, (0.4, 4.0), (32, 32), (3, 3))
    (run,) = dominating_runs(one)
    assert (run.sample_rate, run.steps) == (Q, STEPS)
    assert run.noise_multiplier == pytest.approx(0.8544884534086362, rel=1e-9)
    bound = adaptive_tuning_bound([(one, 4)])
    assert bound.epsilon == pytest.approx(4.740541456531309, rel=1e-9)
    # Independent: dp-accounting, 4 trials = one run of 4 x 168 steps at the dominating sigma.
    assert bound.epsilon == pytest.approx(direct_epsilon(dpsgd_event(run.noise_multiplier, Q, 4 * STEPS)), rel=2e-3)


def test_clamped_range_prunes_to_the_longest_run_at_the_lowest_sigma():
    # sigma = 1.0 is feasible for 3 epochs at target 3, so every run of 1-3 epochs is feasible at the range's
    # low end; the 3-epoch run dominates the others (more steps at the same sigma).
    clamped = AdmissibleSet(N_SMOKE, 3.0, DELTA, (1.0, 4.0), (32, 32), (1, 3))
    assert dominating_runs(clamped) == (DominatingRun(Q, STEPS, 3, (32, 32), 1.0, 1.0),)
    bound = adaptive_tuning_bound([(clamped, 4)])
    assert bound.epsilon == pytest.approx(opacus_epsilon(4 * opacus_curve(1.0, Q, STEPS)), rel=1e-12)
    assert bound.epsilon == pytest.approx(direct_epsilon(dpsgd_event(1.0, Q, 4 * STEPS)), rel=1e-9)


def test_label_count_release_is_part_of_every_trial():
    with_release = AdmissibleSet(N_SMOKE, 2.0, DELTA, (0.4, 4.0), (28, 36), (1, 3), label_count_noise_multiplier=20.0)
    assert adaptive_tuning_bound([(with_release, 4)]).epsilon == pytest.approx(3.340857386275806, rel=1e-6)
    assert adaptive_tuning_bound([(with_release, 4)]).epsilon > adaptive_tuning_bound([(SMALL, 4)]).epsilon
    for plain, released in zip(dominating_runs(SMALL), dominating_runs(with_release), strict=True):
        assert released.noise_multiplier > plain.noise_multiplier


def test_basic_and_advanced_composition():
    basic = basic_composition_bound([2.0, 2.0, 2.0, 8.0, 8.0, 8.0], DELTA)
    assert (basic.epsilon, basic.delta, basic.k) == (30.0, 6 * DELTA, 6)
    assert "Dwork & Roth 2014, Thm. 3.16" in basic.description
    advanced = advanced_composition_bound([0.1] * 100, DELTA)
    expected = math.sqrt(200 * math.log(1 / DELTA)) * 0.1 + 100 * 0.1 * math.expm1(0.1)
    assert advanced.epsilon == pytest.approx(expected, rel=1e-12) and advanced.delta == pytest.approx(101 * DELTA)
    assert advanced.epsilon < basic_composition_bound([0.1] * 100, DELTA).epsilon
    assert "Dwork, Rothblum & Vadhan 2010" in advanced.description
    assert set(ADAPTIVE_METHODS) == {"worst_case_rdp", "basic_composition", "advanced_composition"}


def test_adaptive_bound_errors():
    with pytest.raises(ValueError, match="non-private cell has no bound"):
        AdmissibleSet(N_SMOKE, math.inf, DELTA, (0.4, 4.0), (32, 32), (3, 3))
    with pytest.raises(ValueError, match=r"epochs=\(3, 1\) must be a \(low, high\) pair of whole numbers"):
        AdmissibleSet(N_SMOKE, 3.0, DELTA, (0.4, 4.0), (32, 32), (3, 1))
    with pytest.raises(ValueError, match="is feasible at target_epsilon=0.5: the cell trains nothing"):
        dominating_runs(AdmissibleSet(N_SMOKE, 0.5, DELTA, (0.4, 0.5), (32, 32), (3, 3)))
    with pytest.raises(ValueError, match="cells is empty"):
        adaptive_tuning_bound([])
    with pytest.raises(ValueError, match="deltas differ"):
        adaptive_tuning_bound([(SMALL, 1), (AdmissibleSet(N_SMOKE, 2.0, 1e-6, (0.4, 4.0), (28, 36), (1, 3)), 1)])
    with pytest.raises(ValueError, match="targets="):
        basic_composition_bound([], DELTA)


@pytest.mark.slow
@pytest.mark.heavy
def test_optuna_smoke_scale_gap():
    # sweeps/optuna-smoke.yaml: targets 2 and 8, 3 trials each, sigma 0.4-4, B 16-128, epochs 1-3, N = 1777.
    cells = [(AdmissibleSet(N_SMOKE, target, DELTA, (0.4, 4.0), (16, 128), (1, 3)), 3) for target in (2.0, 8.0)]
    bound = adaptive_tuning_bound(cells)
    assert bound.epsilon == pytest.approx(12.559437615128985, rel=1e-6)
    assert bound.epsilon >= 11.8  # the lower estimate of a valid bound
    # A benign realized search (3 noisier, shorter proposals per cell) logs far less with today's composition.
    benign = []
    for admissible, k in cells:
        q, steps = sample_rate_and_steps(N_SMOKE, 64, 2)
        sigma = 1.2 * calibrate_noise_multiplier(admissible.target_epsilon, DELTA, q, steps)
        benign += [TrialMechanism(sigma, q, steps)] * k
    realized = tuning_epsilon(benign, DELTA, "fixed").epsilon
    # The adversary: 3 picks per cell among the certified-feasible ends of the dominating runs.
    adversary_total = 0
    for admissible, k in cells:
        runs = dominating_runs(admissible)
        curves = [opacus_curve(r.feasible_noise_multiplier, r.sample_rate, r.steps) for r in runs]
        best = max(curves, key=lambda c: opacus_epsilon(k * c))
        adversary_total = adversary_total + k * best
    adversary = opacus_epsilon(adversary_total)
    assert realized < adversary <= bound.epsilon


def test_prv_feasibility_admits_less_noise_and_the_bound_follows():
    # Under PRV the feasibility check accepts smaller sigmas than under RDP, so the worst case is worse.
    rdp_set = AdmissibleSet(N_SMOKE, 3.0, DELTA, (0.4, 4.0), (32, 32), (1, 1))
    prv_set = AdmissibleSet(N_SMOKE, 3.0, DELTA, (0.4, 4.0), (32, 32), (1, 1), accountant="prv")
    (rdp_run,), (prv_run,) = dominating_runs(rdp_set), dominating_runs(prv_set)
    assert prv_run.noise_multiplier < rdp_run.noise_multiplier
    q, steps = prv_run.sample_rate, prv_run.steps
    assert epsilon_spent(prv_run.noise_multiplier, q, steps, DELTA, "prv") > 3.0
    assert epsilon_spent(prv_run.feasible_noise_multiplier, q, steps, DELTA, "prv") <= 3.0
    assert adaptive_tuning_bound([(prv_set, 2)]).epsilon > adaptive_tuning_bound([(rdp_set, 2)]).epsilon
