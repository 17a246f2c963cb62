"""DP label counts for ``pos_weight: train``: the release is accounted inside the target (golden values,
dp-accounting), exact counts of a private set are refused, the noise has the stated scale and is secret,
and the sensitivity problem of exact counts (clipped sum moving by more than C) is gone given the release.

Golden values computed once with opacus 1.6.0 / dp-accounting 0.6.0 (smoke scale: N = 1777 training images
of synthetic-a, B = 32, 3 epochs, so q = 1/56 and 168 steps; delta 6e-6; sigma_c = 20).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.func import grad, vmap

from trainables.privacy.accounting import (
    accountant_history,
    calibrate_noise_multiplier,
    check_ledger,
    cross_check_epsilon,
    epsilon_spent,
    sample_rate_and_steps,
)
from trainables.privacy.label_counts import (
    DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER,
    LabelCountRelease,
    account_release,
    count_sensitivity,
    patient_labels,
    release_label_counts,
    train_pos_weight,
)
from trainables.privacy.patients import group_patients
from trainables.privacy.secure import SecureRandom

DELTA = 6e-6
N_TRAIN = 1777  # synthetic-a's training split (trainables.data.synthetic.sample_cohort)
Q, STEPS = sample_rate_and_steps(N_TRAIN, 32, 3)
SIGMA_C = 20.0

# target -> (calibrated DP-SGD sigma with the release, composed epsilon, DP-SGD alone at that sigma)
GOLDEN_RDP = {
    1.0: (1.3828125, 0.9957063081612609, 0.9782063081612611),
    3.0: (0.8564453125, 2.9920758475865785, 2.9855758475865786),
    8.0: (0.596435546875, 7.9903449351299125, 7.986844935129912),
}
SIGMA_WITHOUT_RELEASE = {1.0: 1.37109375, 3.0: 0.85546875, 8.0: 0.59619140625}


def test_smoke_scale():
    assert (Q, STEPS) == (1 / 56, 168)


# --- accounting: the release inside the budget ------------------------------------------------


@pytest.mark.parametrize("target", sorted(GOLDEN_RDP))
def test_calibration_with_the_release_ends_at_the_target_golden(target):
    sigma, composed, alone = GOLDEN_RDP[target]
    calibrated = calibrate_noise_multiplier(target, DELTA, Q, STEPS, label_count_noise_multiplier=SIGMA_C)
    assert calibrated == pytest.approx(sigma, rel=1e-12)
    total = epsilon_spent(calibrated, Q, STEPS, DELTA, label_count_noise_multiplier=SIGMA_C)
    assert total == pytest.approx(composed, rel=1e-9)
    assert target - 0.01 <= total <= target
    assert epsilon_spent(calibrated, Q, STEPS, DELTA) == pytest.approx(alone, rel=1e-9)
    # Independent: dp-accounting composing the same two events (RDP within 0.11%; PLD below RDP).
    cross = cross_check_epsilon(calibrated, Q, STEPS, DELTA, label_count_noise_multiplier=SIGMA_C)
    direct = RdpAccountant()
    direct.compose(
        dp_event.ComposedDpEvent(
            [
                dp_event.GaussianDpEvent(SIGMA_C),
                dp_event.SelfComposedDpEvent(
                    dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(calibrated)), STEPS
                ),
            ]
        )
    )
    assert cross["rdp"] == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12)
    assert cross["rdp"] == pytest.approx(total, rel=1.1e-3)
    assert cross["pld"] <= cross["rdp"]


@pytest.mark.parametrize("target", sorted(GOLDEN_RDP))
def test_ignoring_the_release_would_overspend(target):
    # The sigma calibrated for DP-SGD alone leaves no room for the release: composed, it exceeds the target.
    sigma = calibrate_noise_multiplier(target, DELTA, Q, STEPS)
    assert sigma == pytest.approx(SIGMA_WITHOUT_RELEASE[target], rel=1e-12)
    assert epsilon_spent(sigma, Q, STEPS, DELTA, label_count_noise_multiplier=SIGMA_C) > target
    assert GOLDEN_RDP[target][0] > sigma


def test_prv_calibration_with_the_release_golden():
    sigma = calibrate_noise_multiplier(3.0, DELTA, Q, STEPS, "prv", label_count_noise_multiplier=SIGMA_C)
    assert sigma == pytest.approx(0.794921875, rel=1e-12)
    total = epsilon_spent(sigma, Q, STEPS, DELTA, "prv", label_count_noise_multiplier=SIGMA_C)
    assert total == pytest.approx(2.995036740522983, rel=1e-6)
    assert 2.99 <= total <= 3.0
    assert epsilon_spent(sigma, Q, STEPS, DELTA, "prv") < total


def test_the_release_alone_is_a_gaussian_mechanism():
    alone = epsilon_spent(1.0, Q, 0, DELTA, label_count_noise_multiplier=SIGMA_C)
    assert alone == pytest.approx(0.1898563741752473, rel=1e-9)
    direct = RdpAccountant()
    direct.compose(dp_event.GaussianDpEvent(SIGMA_C))
    assert alone == pytest.approx(direct.get_epsilon(DELTA), rel=1e-9)
    assert epsilon_spent(1.0, Q, 0, DELTA, "prv", label_count_noise_multiplier=SIGMA_C) == pytest.approx(
        0.1769257918941161, rel=1e-6
    )
    assert cross_check_epsilon(1.0, Q, 0, DELTA, label_count_noise_multiplier=SIGMA_C)["pld"] <= alone
    assert epsilon_spent(1.0, Q, 0, DELTA) == 0.0  # nothing released


def test_calibration_refuses_a_release_that_spends_the_target():
    with pytest.raises(ValueError, match=r"label-count release .* alone spends epsilon 0\.81.*label_count_noise_mult"):
        calibrate_noise_multiplier(0.5, DELTA, Q, STEPS, label_count_noise_multiplier=5.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, True])
def test_bad_label_count_noise_multiplier(bad):
    with pytest.raises(ValueError, match="label_count_noise_multiplier"):
        epsilon_spent(1.0, Q, STEPS, DELTA, label_count_noise_multiplier=bad)


@pytest.mark.parametrize("accountant_class", [RDPAccountant, PRVAccountant])
def test_ledger_matches_what_opacus_records(accountant_class):
    # The trial appends the release once, then the optimizer hook calls step() per DP-SGD step.
    accountant = accountant_class()
    accountant.history.append((SIGMA_C, 1.0, 1))
    for _ in range(5):
        accountant.step(noise_multiplier=0.9, sample_rate=Q)
    expected = accountant_history(0.9, Q, 5, label_count_noise_multiplier=SIGMA_C)
    assert accountant.history == expected == [(SIGMA_C, 1.0, 1), (0.9, Q, 5)]
    assert accountant.get_epsilon(DELTA) == epsilon_spent(
        0.9, Q, 5, DELTA, accountant_class.mechanism(), label_count_noise_multiplier=SIGMA_C
    )
    assert accountant_history(0.9, Q, 0, SIGMA_C) == [(SIGMA_C, 1.0, 1)]
    assert accountant_history(0.9, Q, 5) == [(0.9, Q, 5)]


def test_ledger_corner_case_equal_mechanisms_merge_as_in_opacus():
    accountant = RDPAccountant()
    accountant.history.append((2.0, 1.0, 1))
    for _ in range(3):
        accountant.step(noise_multiplier=2.0, sample_rate=1.0)
    assert accountant.history == accountant_history(2.0, 1.0, 3, 2.0) == [(2.0, 1.0, 4)]


def test_trial_flow_release_accounted_then_steps_then_resume_check():
    # What the trial does: release once, record it, train; every epoch's epsilon includes the release; the
    # resume check accepts exactly [release, steps] and refuses a lost or doubled release.
    weight = train_pos_weight(labels_with(), target_epsilon=3.0, noise_multiplier=SIGMA_C)
    accountant = RDPAccountant()
    account_release(accountant, weight.release)
    assert accountant.get_epsilon(DELTA) == epsilon_spent(1.0, Q, 0, DELTA, label_count_noise_multiplier=SIGMA_C)
    for _ in range(56):
        accountant.step(noise_multiplier=0.9, sample_rate=Q)
    assert accountant.get_epsilon(DELTA) == epsilon_spent(0.9, Q, 56, DELTA, label_count_noise_multiplier=SIGMA_C)
    state = accountant.state_dict()
    restored = RDPAccountant()
    restored.load_state_dict(state)
    check_ledger(restored.history, 0.9, Q, 56, SIGMA_C)
    with pytest.raises(ValueError, match="inconsistent ledger"):
        check_ledger(restored.history, 0.9, Q, 56)  # the release is not in the trial's config: foreign ledger
    with pytest.raises(ValueError, match="inconsistent ledger"):
        check_ledger([(0.9, Q, 56)], 0.9, Q, 56, SIGMA_C)  # release lost
    with pytest.raises(ValueError, match="inconsistent ledger"):
        check_ledger([(SIGMA_C, 1.0, 1), (SIGMA_C, 1.0, 1), (0.9, Q, 56)], 0.9, Q, 56, SIGMA_C)  # drawn twice
    with pytest.raises(ValueError, match="inconsistent ledger"):
        check_ledger(restored.history, 0.9, Q, 55, SIGMA_C)
    check_ledger([[0.9, Q, 56]], 0.9, Q, 56)  # lists (a JSON round trip) are fine
    with pytest.raises(ValueError, match="recorded once, before the first DP-SGD step"):
        account_release(restored, weight.release)


def test_resumed_trial_reuses_the_saved_release():
    labels = labels_with()
    first = train_pos_weight(labels, target_epsilon=3.0, noise_multiplier=SIGMA_C)
    saved = LabelCountRelease.from_dict(first.release.to_dict())
    again = train_pos_weight(labels, target_epsilon=3.0, noise_multiplier=SIGMA_C, restored=saved)
    assert again.release == first.release
    np.testing.assert_array_equal(again.values, first.values)
    with pytest.raises(ValueError, match="does not match this trial"):
        train_pos_weight(labels, target_epsilon=3.0, noise_multiplier=10.0, restored=saved)
    with pytest.raises(ValueError, match="does not match this trial"):
        train_pos_weight(labels[:40], target_epsilon=3.0, noise_multiplier=SIGMA_C, restored=saved)


# --- refusing exact counts ----------------------------------------------------------------------


def labels_with(n: int = 64, n_labels: int = 5, seed: int = 0) -> np.ndarray:
    labels = (np.random.default_rng(seed).random((n, n_labels)) < 0.3).astype(np.uint8)
    labels[:, 0] = 0
    labels[[3, 17], 0] = 1
    return labels


@pytest.mark.parametrize("noise", [None, 0, 0.0])
def test_exact_counts_of_a_private_training_set_are_refused(noise):
    with pytest.raises(ValueError) as error:
        train_pos_weight(labels_with(), target_epsilon=3.0, noise_multiplier=noise)
    message = str(error.value)
    assert "training.pos_weight = 'train'" in message
    assert f"privacy.label_count_noise_multiplier = {noise!r}" in message
    assert "exact label counts of the private training set" in message
    assert "Fix: set privacy.label_count_noise_multiplier > 0" in message and "pos_weight: uniform" in message


def test_non_private_baseline_counts_exactly():
    labels = labels_with()
    weight = train_pos_weight(labels, target_epsilon=math.inf, noise_multiplier=None)
    assert weight.release is None
    positives = labels.sum(axis=0)
    np.testing.assert_array_equal(weight.values, (64 - positives) / positives)
    assert weight.values[0] == 31.0


def test_private_trial_gets_the_release_weights():
    weight = train_pos_weight(labels_with(), target_epsilon=3.0, noise_multiplier=SIGMA_C)
    assert weight.release is not None and weight.release.noise_multiplier == SIGMA_C
    np.testing.assert_array_equal(weight.values, weight.release.pos_weight())


# --- the release itself -------------------------------------------------------------------------


def test_sensitivity_is_sqrt_of_the_label_count():
    assert count_sensitivity(5) == math.sqrt(5)
    rows = np.eye(5, dtype=np.uint8)[[0]] + 0
    worst = np.ones(5)  # a row with every label positive: the largest change of the count vector
    assert np.linalg.norm(worst) == count_sensitivity(5) and np.linalg.norm(rows) <= count_sensitivity(5)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_stated_scale_and_is_unbiased(secure):
    labels = labels_with(n=200, n_labels=4)
    rng = SecureRandom() if secure else None
    draws = np.array([release_label_counts(labels, 2.0, rng).noisy_positives for _ in range(3000)])
    exact = labels.sum(axis=0)
    std = 2.0 * math.sqrt(4)  # sigma_c x sqrt(L)
    # 3000 draws: the mean is within 4 standard errors, the std within 6%.
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - exact), 4 * std / math.sqrt(3000))
    np.testing.assert_allclose(draws.std(axis=0), std, rtol=0.06)


def test_releases_are_not_reproducible_from_any_seed():
    np.random.seed(0)
    torch.manual_seed(0)
    first = release_label_counts(labels_with(), SIGMA_C).noisy_positives
    np.random.seed(0)
    torch.manual_seed(0)
    assert release_label_counts(labels_with(), SIGMA_C).noisy_positives != first


def test_pos_weight_is_clamped_post_processing():
    release = LabelCountRelease((-30.0, 0.5, 10.0, 99.5, 150.0), 100, SIGMA_C, math.sqrt(5))
    np.testing.assert_allclose(release.pos_weight(), [99.0, 99.0, 9.0, 1 / 99, 1 / 99])
    assert LabelCountRelease.from_dict(release.to_dict()) == release


def test_release_validation():
    with pytest.raises(ValueError, match="sqrt"):
        LabelCountRelease((1.0, 2.0), 100, SIGMA_C, 1.0)
    with pytest.raises(ValueError, match="0 and 1"):
        release_label_counts(np.full((10, 2), 2), SIGMA_C)
    with pytest.raises(ValueError, match="noise_multiplier"):
        release_label_counts(labels_with(), 0.0)


def test_default_is_the_documented_one():
    assert DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER == SIGMA_C


# --- patient-level counts: sensitivity K sqrt(L) -----------------------------------------------------


def counts_over_capped_images(labels: np.ndarray, patient_ids: np.ndarray, cap: int) -> np.ndarray:
    """What a patient-level trial counts: the positives of the images its patients train on (first ``cap`` each)."""
    return patient_labels(labels, group_patients(patient_ids, cap).images).sum(axis=0, dtype=np.int64)


def largest_change_removing_a_patient(labels: np.ndarray, patient_ids: np.ndarray, cap: int) -> float:
    """max over the table's patients of ||c(D) - c(D without that patient)||_2, recounted from scratch each time."""
    full = counts_over_capped_images(labels, patient_ids, cap)
    largest = 0.0
    for patient in np.unique(patient_ids):
        kept = patient_ids != patient
        rest = counts_over_capped_images(labels[kept], patient_ids[kept], cap) if kept.any() else 0 * full
        largest = max(largest, float(np.linalg.norm(full - rest)))
    return largest


@pytest.mark.parametrize(("n_labels", "cap"), [(1, 1), (1, 3), (2, 2), (3, 1), (3, 3), (5, 2)])
def test_patient_count_sensitivity_is_the_cap_times_sqrt_l_by_brute_force(n_labels, cap):
    """Every possible patient of up to cap + 1 images (one more than the cap: the extra image is never counted), each
    image any of the 2^L label rows, added to a fixed background table: removing it moves the count vector by at most
    K sqrt(L), and a patient of K all-positive images moves it by exactly that."""
    bound = count_sensitivity(n_labels, cap)
    assert bound == cap * math.sqrt(n_labels)
    rows = [np.array(r, dtype=np.uint8) for r in itertools.product((0, 1), repeat=n_labels)]
    rng = np.random.default_rng(0)
    background = (rng.random((7, n_labels)) < 0.5).astype(np.uint8)
    background_ids = np.array(["a", "a", "b", "c", "c", "c", "d"])
    largest = 0.0
    for n_images in range(1, cap + 2):
        for patient in itertools.product(rows, repeat=n_images):
            if len(rows) ** n_images > 4096 and rng.random() > 0.05:
                continue  # (5 labels, 3 images: a 5% sample of the 32768 patients; every patient for the rest)
            labels = np.concatenate([background, np.stack(patient)])
            ids = np.concatenate([background_ids, np.full(n_images, "p")])
            full = counts_over_capped_images(labels, ids, cap)
            change = float(np.linalg.norm(full - counts_over_capped_images(background, background_ids, cap)))
            assert change <= bound * (1 + 1e-12), (patient, change, bound)
            largest = max(largest, change)
    assert largest == pytest.approx(bound, rel=1e-12)  # reached: K images positive for every label


def test_removing_any_patient_of_random_tables_moves_the_counts_by_at_most_the_bound():
    rng = np.random.default_rng(1)
    for trial in range(40):
        n, n_labels, cap = int(rng.integers(4, 30)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
        labels = (rng.random((n, n_labels)) < rng.random()).astype(np.uint8)
        ids = rng.integers(0, max(2, n // 3), n).astype(str)  # some patients above the cap
        change = largest_change_removing_a_patient(labels, ids, cap)
        assert change <= count_sensitivity(n_labels, cap) * (1 + 1e-12), trial
    # The bound is reached in such a table: a patient with the cap's worth of all-positive images (and one more).
    labels = np.concatenate([np.ones((4, 3), np.uint8), (rng.random((10, 3)) < 0.5).astype(np.uint8)])
    ids = np.array(["p"] * 4 + [str(i % 4) for i in range(10)])
    assert largest_change_removing_a_patient(labels, ids, 3) == pytest.approx(3 * math.sqrt(3), rel=1e-12)
    # Counting every image of the patient (no cap) would move it by more: the cap is what the bound rests on.
    uncapped = np.linalg.norm(labels[ids == "p"].sum(axis=0))
    assert uncapped > count_sensitivity(3, 3)


def test_patient_release_has_the_patient_sensitivity_and_noise_scale():
    labels = labels_with(n=200, n_labels=4)
    draws = np.array([release_label_counts(labels, 2.0, max_images_per_patient=3).noisy_positives for _ in range(3000)])
    std = 2.0 * 3 * math.sqrt(4)  # sigma_c x K sqrt(L)
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - labels.sum(axis=0)), 4 * std / math.sqrt(3000))
    np.testing.assert_allclose(draws.std(axis=0), std, rtol=0.06)
    release = release_label_counts(labels, 2.0, max_images_per_patient=3)
    assert (release.sensitivity, release.max_images_per_patient) == (3 * math.sqrt(4), 3)
    assert LabelCountRelease.from_dict(release.to_dict()) == release
    with pytest.raises(ValueError, match=r"max_images_per_patient x sqrt\(n_labels\)"):
        LabelCountRelease((1.0, 2.0), 100, SIGMA_C, math.sqrt(2), 3)  # the image sensitivity for a patient release
    with pytest.raises(ValueError, match="whole number >= 1"):
        count_sensitivity(5, 0)


def test_an_image_level_checkpoint_without_the_cap_still_reads():
    saved = {"noisy_positives": [3.0, 4.0], "n_train": 50, "noise_multiplier": SIGMA_C, "sensitivity": math.sqrt(2)}
    release = LabelCountRelease.from_dict(saved)
    assert release.max_images_per_patient is None and release.sensitivity == count_sensitivity(2)


def test_a_resumed_patient_level_trial_needs_the_same_cap():
    labels = labels_with()
    first = train_pos_weight(labels, target_epsilon=3.0, noise_multiplier=SIGMA_C, max_images_per_patient=2)
    assert first.release is not None and first.release.max_images_per_patient == 2
    saved = LabelCountRelease.from_dict(first.release.to_dict())
    again = train_pos_weight(
        labels, target_epsilon=3.0, noise_multiplier=SIGMA_C, restored=saved, max_images_per_patient=2
    )
    assert again.release == first.release
    with pytest.raises(ValueError, match=r"images per patient 2\) does not match this trial"):
        train_pos_weight(labels, target_epsilon=3.0, noise_multiplier=SIGMA_C, restored=saved)


# --- the sensitivity problem of exact counts, and why the release fixes it -----------------------


def clipped_sum(x: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor, clip: float) -> torch.Tensor:
    """Sum of per-sample gradients (linear multi-label model, BCE with pos_weight), each clipped to ``clip``."""
    weight = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64)
    bias = torch.zeros(y.shape[1], dtype=torch.float64)
    bias[0] = 3.0  # label 0 already predicted: its positive term no longer dominates the gradient

    def loss(w: torch.Tensor, b: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(xi @ w.T + b, yi, pos_weight=pos_weight)

    grad_w, grad_b = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(weight, bias, x, y)
    per_sample = torch.cat([grad_w.reshape(len(x), -1), grad_b], dim=1)
    scale = torch.clamp(clip / per_sample.norm(dim=1, keepdim=True), max=1.0)
    return (per_sample * scale).sum(dim=0)


def test_exact_counts_break_the_clipped_sum_sensitivity_and_the_release_restores_it():
    torch.manual_seed(0)
    labels = torch.from_numpy(labels_with()).double()  # 64 images, 2 positives of label 0
    x = torch.randn(64, 8, dtype=torch.float64)
    clip = 1.0

    def exact(y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(
            train_pos_weight(y.numpy().astype(np.uint8), target_epsilon=math.inf, noise_multiplier=None).values
        )

    def without(i: int, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:i], t[i + 1 :]])

    # Exact counts: removing one record changes everyone's weights; the sum moves by more than C.
    full = clipped_sum(x, labels, exact(labels), clip)
    exact_moves = [
        (full - clipped_sum(without(i, x), without(i, labels), exact(without(i, labels)), clip)).norm()
        for i in range(64)
    ]
    assert max(exact_moves) > 1.05 * clip

    # DP counts: the weights are a post-processing of the accounted release, the same for both neighbours
    # (adaptive composition conditions DP-SGD on the released value), so clipping bounds the change by C.
    release = train_pos_weight(labels.numpy().astype(np.uint8), target_epsilon=3.0, noise_multiplier=SIGMA_C)
    weights = torch.from_numpy(release.values)
    full = clipped_sum(x, labels, weights, clip)
    dp_moves = [(full - clipped_sum(without(i, x), without(i, labels), weights, clip)).norm() for i in range(64)]
    assert max(dp_moves) <= clip * (1 + 1e-12)
