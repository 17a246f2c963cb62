"""Private selection (`trainables.privacy.selection`): the trial-count draws have their stated means, and a calibrated
cell's tuning-inclusive epsilon is dp-accounting's ``RepeatAndSelectDpEvent`` and at most its target."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from trainables.config import PrivacyConfig
from trainables.privacy.selection import (
    TrialCount,
    plan_mechanisms,
    plan_selection,
    selection_epsilon,
    selection_rdp_epsilon,
)
from trainables.privacy.tuning import TrialMechanism

N, DELTA = 1777, 6e-6
PRIVACY = PrivacyConfig(target_epsilon=3.0, delta=DELTA, expected_batch_size=32, epochs=3)


@pytest.mark.parametrize(
    ("count", "at_least_one"),
    [
        (TrialCount("logarithmic", 10.0), True),
        (TrialCount("geometric", 10.0), True),
        (TrialCount("negative_binomial", 10.0, shape=2.0), True),
        (TrialCount("poisson", 10.0), False),
    ],
)
def test_trial_counts_have_their_mean(count, at_least_one):
    rng = np.random.default_rng(0)  # a test's fixed seed; a sweep draws K from a secret generator
    draws = np.array([count.draw(rng) for _ in range(40_000)])
    assert draws.mean() == pytest.approx(10.0, rel=0.04)
    assert (draws.min() >= 1) == at_least_one


def reference(candidate: TrialMechanism, count: TrialCount) -> float:
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.RepeatAndSelectDpEvent(candidate.dp_event(), count.mean, count.dp_shape))
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize(
    "count", [TrialCount("logarithmic", 10.0), TrialCount("geometric", 10.0), TrialCount("poisson", 10.0)]
)
def test_one_shape_selects_to_dp_accountings_repeat_and_select_at_most_the_target(count):
    plan = plan_selection(PRIVACY, N, [(32, 3)], count)
    (planned,) = plan.candidates.values()
    candidate = TrialMechanism(planned.noise_multiplier, planned.sample_rate, planned.steps)
    assert plan.epsilon == pytest.approx(reference(candidate, count), rel=0.005)
    assert PRIVACY.target_epsilon - 0.05 <= plan.epsilon <= PRIVACY.target_epsilon
    assert plan.single_run_epsilon < PRIVACY.target_epsilon  # the selection costs budget
    single = TrialMechanism(planned.noise_multiplier, planned.sample_rate, planned.steps)
    assert selection_epsilon([single], DELTA, count) == plan.epsilon


def test_several_shapes_are_calibrated_together_below_the_target():
    shapes = [(16, 2), (32, 3), (64, 4)]
    plan = plan_selection(PRIVACY, N, shapes, TrialCount("logarithmic", 10.0))
    assert set(plan.candidates) == set(shapes)
    assert plan.epsilon <= PRIVACY.target_epsilon
    for (batch, epochs), planned in plan.candidates.items():
        assert (planned.expected_batch_size, planned.epochs) == (batch, epochs)
        assert planned.target_epsilon == plan.single_run_epsilon  # each alone at the single-run epsilon
    # the cells' composition (a sweep's tuning epsilon, a release's) of this one cell is its own epsilon
    assert selection_rdp_epsilon([(plan_mechanisms(plan), plan.count)], DELTA) == pytest.approx(plan.epsilon, rel=1e-9)
    assert selection_rdp_epsilon([(plan_mechanisms(plan), plan.count)] * 2, DELTA) > plan.epsilon


def test_label_count_releases_are_part_of_each_run():
    with_release = PrivacyConfig(
        target_epsilon=3.0, delta=DELTA, expected_batch_size=32, epochs=3, label_count_noise_multiplier=20.0
    )
    plan = plan_selection(with_release, N, [(32, 3)], TrialCount("geometric", 10.0))
    plain = plan_selection(PRIVACY, N, [(32, 3)], TrialCount("geometric", 10.0))
    assert plan.epsilon <= 3.0 and plan.single_run_epsilon <= plain.single_run_epsilon


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("uniform", 10.0), "distribution"),
        (("logarithmic", 0.5), "mean"),
        (("negative_binomial", 10.0), "shape"),
        (("geometric", 10.0, 2.0), "does not apply"),
    ],
)
def test_bad_counts_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        TrialCount(*arguments)


def test_an_unreachable_target_is_refused():
    small = PrivacyConfig(target_epsilon=0.3, delta=DELTA, expected_batch_size=32, epochs=3)
    with pytest.raises(ValueError, match="cannot hold for a private selection with E"):
        plan_selection(small, N, [(32, 3)], TrialCount("poisson", 1000.0))
    below_floor = PrivacyConfig(target_epsilon=0.05, delta=DELTA, expected_batch_size=32, epochs=3)
    with pytest.raises(ValueError, match="below what the rdp accountant can report"):
        plan_selection(below_floor, N, [(32, 3)], TrialCount("logarithmic", 10.0))
    assert math.isinf(TrialCount("poisson", 10.0).dp_shape)
