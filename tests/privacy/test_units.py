"""What image-level DP-SGD means for a patient with k images (`trainables.privacy.units`).

Golden values are issue 14's table: the smoke sweep (synthetic-a at 64 px: N=1777 training images, B=32, so
q=1/56 and 168 steps over 3 epochs, delta 6e-6) and the paper-like setting (N=30000, B=64, 20 epochs, delta 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainables.privacy.accounting import (
    calibrate_noise_multiplier,
    cross_check_epsilon,
    epsilon_spent,
    sample_rate_and_steps,
)
from trainables.privacy.units import images_per_patient, patient_epsilon, patient_epsilon_rdp

SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA = 1 / 56, 168, 6e-6
SIGMA_EPS_1 = 1.37109375  # calibrated (RDP) for epsilon 1 at the smoke scale: reports 0.995
SIGMA_EPS_8 = 0.59619140625  # for epsilon 8: reports 7.997


def test_smoke_scale_and_sigmas_are_what_the_table_used() -> None:
    assert sample_rate_and_steps(1777, 32, 3) == (SMOKE_Q, SMOKE_STEPS)
    for target, sigma, reported in ((1.0, SIGMA_EPS_1, 0.995), (8.0, SIGMA_EPS_8, 7.997)):
        assert calibrate_noise_multiplier(target, SMOKE_DELTA, SMOKE_Q, SMOKE_STEPS) == sigma
        assert epsilon_spent(sigma, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA) == pytest.approx(reported, abs=5e-4)


@pytest.mark.parametrize(("sigma", "golden"), [(SIGMA_EPS_1, 2.857), (SIGMA_EPS_8, 19.933)])
def test_golden_patient_epsilon_smoke_k3(sigma: float, golden: float) -> None:
    assert patient_epsilon(sigma, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 3) == pytest.approx(golden, abs=2e-3)


def test_golden_patient_epsilon_paper_like_k10() -> None:
    q, steps = sample_rate_and_steps(30000, 64, 20)
    assert (q, steps) == (1 / 469, 9380)
    sigma = calibrate_noise_multiplier(0.99, 1e-5, q, steps)
    assert sigma == pytest.approx(1.125, abs=1e-6)
    assert patient_epsilon(sigma, q, steps, 1e-5, 10) == pytest.approx(12.04, abs=0.01)


def test_k1_is_the_image_level_pld_of_dp_accounting() -> None:
    pld = cross_check_epsilon(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA)["pld"]  # discretisation 1e-4
    assert patient_epsilon(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 1) == pytest.approx(pld, rel=5e-4)


def test_independent_rdp_quadrature_matches_opacus_at_k1_and_bounds_the_pld_above() -> None:
    # k = 1: the quadrature is the sampled Gaussian's RDP, which Opacus computes in closed form.
    assert patient_epsilon_rdp(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 1) == pytest.approx(
        epsilon_spent(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA), rel=1e-6
    )
    for sigma in (SIGMA_EPS_1, SIGMA_EPS_8):
        tight = patient_epsilon(sigma, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 3)
        rdp = patient_epsilon_rdp(sigma, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 3)
        # RDP is a looser upper bound of the same mechanism: above the PLD, by the usual 10-25% at these scales.
        assert tight < rdp < 1.25 * tight


def test_dp_accounting_mixture_event_at_its_default_discretisation_agrees() -> None:
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant
    from scipy.stats import binom

    k = 3
    event = dp_event.SelfComposedDpEvent(
        dp_event.MixtureOfGaussiansDpEvent(SIGMA_EPS_1, list(range(k + 1)), list(binom.pmf(range(k + 1), k, SMOKE_Q))),
        SMOKE_STEPS,
    )
    accountant = PLDAccountant()
    accountant.compose(event)
    reference = accountant.get_epsilon(SMOKE_DELTA)
    assert patient_epsilon(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, k) == pytest.approx(reference, rel=5e-4)


def test_patient_epsilon_grows_with_k_and_beats_naive_group_privacy_never() -> None:
    sigma = SIGMA_EPS_1
    values = [patient_epsilon(sigma, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, k) for k in (1, 2, 3)]
    assert values[0] < values[1] < values[2]
    # Treating the k images as k independent releases (k-fold composition, fresh noise each) understates it.
    from dp_accounting.pld import privacy_loss_distribution as pld

    independent = (
        pld.from_gaussian_mechanism(sigma, sampling_prob=SMOKE_Q, value_discretization_interval=1e-3)
        .self_compose(3 * SMOKE_STEPS)
        .get_epsilon_for_delta(SMOKE_DELTA)
    )
    assert independent < values[2]


def test_label_count_release_is_composed_in_patient_units() -> None:
    without = patient_epsilon(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 3)
    with_release = patient_epsilon(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 3, label_count_noise_multiplier=20.0)
    assert with_release > without
    # The release alone: a Gaussian of multiplier sigma_c / k.
    from dp_accounting.pld import privacy_loss_distribution as pld

    alone = pld.from_gaussian_mechanism(20.0 / 3).get_epsilon_for_delta(SMOKE_DELTA)
    assert patient_epsilon(1.0, SMOKE_Q, 0, SMOKE_DELTA, 3, label_count_noise_multiplier=20.0) == pytest.approx(
        alone, rel=1e-3
    )


def test_edges_and_errors() -> None:
    assert patient_epsilon(1.0, 0.1, 0, 1e-5, 4) == 0.0
    assert patient_epsilon(0.0, 0.1, 3, 1e-5, 4) == math.inf
    with pytest.raises(ValueError, match="k=0"):
        patient_epsilon(1.0, 0.1, 3, 1e-5, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        patient_epsilon(1.0, 0.0, 3, 1e-5, 2)


def test_images_per_patient_counts() -> None:
    ids = np.array(["a"] * 3 + ["b"] + ["c"] * 2 + [f"p{i}" for i in range(197)])
    stats = images_per_patient(ids)
    assert (stats.n_patients, stats.minimum, stats.maximum) == (200, 1, 3)
    assert stats.median == 1.0
    # nearest rank: sorted 198 ones, a 2, a 3; the ceil(0.99 * 200) = 198th smallest count is 1
    assert stats.p99 == 1
    with pytest.raises(ValueError, match="at least one image"):
        images_per_patient(np.array([], dtype=str))


def test_composition_across_units_at_the_patient_level() -> None:
    from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

    image_trial = PatientMechanism(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, 3)
    patient_trial = PatientMechanism(1.6328125, 1 / 33, 99, 1)
    alone = composed_patient_epsilon([image_trial], SMOKE_DELTA)
    assert alone == patient_epsilon(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, 3)
    both = composed_patient_epsilon([image_trial, patient_trial], SMOKE_DELTA)
    patient_alone = composed_patient_epsilon([patient_trial], SMOKE_DELTA)
    assert max(alone, patient_alone) < both < alone + patient_alone  # composition: more than each, below basic
    assert composed_patient_epsilon([], SMOKE_DELTA) == 0.0


def test_equal_mechanisms_compose_as_one_built_once() -> None:
    """A grid's trials share a few (sigma, q, k): the composition builds each once and self-composes it. The result
    is the trial-by-trial composition, built here with dp-accounting directly (one PLD per trial, composed in turn)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    from trainables.privacy.units import (
        DEFAULT_VALUE_DISCRETIZATION,
        PatientMechanism,
        composed_patient_epsilon,
    )

    a = PatientMechanism(SIGMA_EPS_1, SMOKE_Q, SMOKE_STEPS, 3, 20.0)
    b = PatientMechanism(1.6328125, 1 / 33, 40, 2)
    trials = [a, b, a, a, b]
    expected = None
    for m in trials:
        parts = []
        if m.label_count_noise_multiplier is not None:
            parts.append(
                pld.from_gaussian_mechanism(
                    m.label_count_noise_multiplier / m.k,
                    pessimistic_estimate=True,
                    value_discretization_interval=DEFAULT_VALUE_DISCRETIZATION,
                )
            )
        pmf = [math.comb(m.k, j) * m.sample_rate**j * (1 - m.sample_rate) ** (m.k - j) for j in range(m.k + 1)]
        parts.append(
            pld.from_mixture_gaussian_mechanism(
                m.noise_multiplier,
                [float(j) for j in range(m.k + 1)],
                pmf,
                pessimistic_estimate=True,
                value_discretization_interval=DEFAULT_VALUE_DISCRETIZATION,
            ).self_compose(m.steps)
        )
        for part in parts:
            expected = part if expected is None else expected.compose(part)
    assert expected is not None
    golden = expected.get_epsilon_for_delta(SMOKE_DELTA)
    assert composed_patient_epsilon(trials, SMOKE_DELTA) == pytest.approx(golden, rel=1e-4)
