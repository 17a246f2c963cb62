"""Patient-level figures of whole trials: the image-level trial's patient epsilon, and patient-level DP-SGD."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from tests.factories import TINY_DATASET, TINY_SIZE, run_tiny_trial, tiny_trial_config
from tests.privacy.models import LOSS, inputs, small_convnext
from trainables import names as M
from trainables.data.cache import open_cache
from trainables.privacy.accounting import (
    accountant_history,
    cross_check_epsilon,
    epsilon_spent,
    sample_rate_and_steps,
)
from trainables.privacy.engine import (
    PerSampleGradientError,
    make_dp_optimizer,
    poisson_batches,
    reference_per_sample_gradients,
    wrap_model,
)
from trainables.privacy.label_counts import LabelCountRelease
from trainables.privacy.patients import (
    check_patient_gradients,
    group_patients,
    patient_chunks,
    private_patient_step,
    sum_grad_samples_by_patient,
)
from trainables.privacy.units import images_per_patient, patient_epsilon
from trainables.train import BudgetError


def test_image_level_trial_reports_the_epsilon_of_its_largest_patient(tiny_site):
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1)
    final = run_tiny_trial(cfg).result.metrics
    ids = open_cache(tiny_site / cfg.dataset / str(cfg.image_size)).split("train").patient_id
    counts = images_per_patient(ids)
    assert counts.maximum > 1  # the synthetic twin has several images for some patients
    assert final[M.PATIENT_IMAGES] == counts.maximum and final[M.PATIENT_IMAGES_P99] == counts.p99
    p = cfg.privacy
    assert final[M.EPSILON_PATIENT] == patient_epsilon(
        p.noise_multiplier, p.sample_rate, p.steps, p.delta, counts.maximum
    )
    assert final[M.EPSILON_PATIENT] > final[M.EPSILON_CROSS_CHECK_PLD]
    assert final[M.EPSILON_PATIENT] >= final[M.EPSILON_PATIENT_P99]


def test_non_private_trial_reports_no_patient_epsilon(tiny_site):
    final = run_tiny_trial(tiny_trial_config(tiny_site, float("inf"), epochs=1)).result.metrics
    assert M.EPSILON_PATIENT not in final


# ----------------------------------------------------------------------------------------------------
# The patient-level mechanism (trainables.privacy.patients)

CLIP = 0.01  # every image's and patient's gradient of the small ConvNeXt is far above it: all are clipped


def _setup(mode: str, sigma: float = 0.0, expected_batch: int = 1):
    model = small_convnext(0)
    wrapped = wrap_model(model, mode)
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        expected_batch_size=expected_batch,
        noise_generator=torch.Generator().manual_seed(7),
        accountant=RDPAccountant(),
        sample_rate=0.1,
    )
    return model, wrapped, optimizer


def _clipped_sum(mode: str, x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, physical: int) -> torch.Tensor:
    model, wrapped, optimizer = _setup(mode)
    private_patient_step(wrapped, optimizer, LOSS, (x, y), groups, physical)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # sigma 0, B 1: the clipped sum itself


# Three patients with 3, 1 and 2 images, patient-contiguous.
GROUPS = np.array([0, 0, 0, 1, 2, 2])


def test_group_patients_keeps_each_patients_first_images_up_to_the_cap():
    ids = np.array(["b", "a", "b", "c", "b", "a", "b"])
    index = group_patients(ids, max_images_per_patient=2)
    assert [list(i) for i in index.images] == [[0, 2], [1, 5], [3]]  # b first seen, then a, then c
    assert index.n_patients == 3 and index.n_images_left_out == 2
    images, groups = index.gather(np.array([2, 0]))
    assert list(images) == [3, 0, 2] and list(groups) == [0, 1, 1]
    # Removing another patient never changes which images a patient contributes.
    assert [list(i) for i in group_patients(ids[ids != "a"], 2).images][0] == [0, 1]  # b's first two, re-indexed
    with pytest.raises(ValueError, match="max_images_per_patient"):
        group_patients(ids, 0)


def test_chunks_hold_whole_patients():
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3])
    chunks = patient_chunks(groups, 4)
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 6), (6, 9)]
    for chunk in chunks:  # no patient on both sides of a boundary
        assert not set(groups[chunk]) & set(np.concatenate([groups[: chunk.start], groups[chunk.stop :]]))
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        patient_chunks(groups, 2)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_patient_gradient_is_the_sum_of_its_images_torch_func_gradients(mode):
    x, y = inputs(len(GROUPS))
    wrapped = wrap_model(small_convnext(0), mode)
    check = check_patient_gradients(wrapped, LOSS, x, y, GROUPS)
    assert check.max_relative_error < 1e-4 and check.n_samples == 3
    # Directly: the grouped rows against torch.func sums.
    reference = reference_per_sample_gradients(small_convnext(0), LOSS, x, y)
    wrapped.zero_grad(set_to_none=True)
    LOSS(wrapped(x), y).sum().backward()  # wrap_model's loss_reduction="sum"
    sum_grad_samples_by_patient(wrapped, torch.as_tensor(GROUPS))
    for name, p in wrapped._module.named_parameters():
        expected = torch.stack([reference[name][GROUPS == g].sum(0) for g in range(3)])
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-7)


def test_the_grouped_check_catches_a_wrong_grouping():
    x, y = inputs(len(GROUPS))
    wrapped = wrap_model(small_convnext(0), "hooks")
    with pytest.raises(PerSampleGradientError, match="per-patient"):
        # The engine groups as GROUPS says; a check told another grouping must see the mismatch.
        check_patient_gradients_with(wrapped, x, y, engine_groups=GROUPS, claimed=np.array([0, 0, 1, 1, 2, 2]))


def check_patient_gradients_with(wrapped, x, y, engine_groups, claimed):
    import trainables.privacy.patients as patients

    original = patients.sum_grad_samples_by_patient

    def wrong(module, groups):  # sums by engine_groups whatever it is told
        original(module, torch.as_tensor(engine_groups))

    patients.sum_grad_samples_by_patient = wrong
    try:
        return patients.check_patient_gradients(wrapped, LOSS, x, y, claimed)
    finally:
        patients.sum_grad_samples_by_patient = original


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bk"])
@pytest.mark.parametrize("physical", [6, 3])  # one chunk, and virtual batches (chunks of whole patients)
def test_removing_one_patient_changes_the_clipped_sum_by_at_most_C(mode, physical):
    x, y = inputs(len(GROUPS))
    full = _clipped_sum(mode, x, y, GROUPS, physical)
    for removed in range(3):
        keep = GROUPS != removed
        renumbered = np.unique(GROUPS[keep], return_inverse=True)[1]
        without = _clipped_sum(mode, x[keep], y[keep], renumbered, physical)
        change = (full - without).norm().item()
        assert change <= CLIP * (1 + 1e-5)
        assert change == pytest.approx(CLIP, rel=1e-3)  # every patient's gradient is clipped: exactly C


def test_image_level_clipping_of_the_same_batch_would_move_by_more_than_C():
    # The test above can fail: clipping images one by one, a patient with 3 identical images (aligned gradients,
    # the worst case) moves the sum by 3 C; clipped as one patient, by C.
    x, y = inputs(len(GROUPS))
    x[1:3], y[1:3] = x[0], y[0]
    per_image = np.arange(len(GROUPS))
    keep = GROUPS != 0
    change = (
        (_clipped_sum("hooks", x, y, per_image, 6) - _clipped_sum("hooks", x[keep], y[keep], np.arange(keep.sum()), 6))
        .norm()
        .item()
    )
    assert change == pytest.approx(3 * CLIP, rel=1e-3)
    keep_groups = np.unique(GROUPS[keep], return_inverse=True)[1]
    grouped = (
        (_clipped_sum("hooks", x, y, GROUPS, 6) - _clipped_sum("hooks", x[keep], y[keep], keep_groups, 6)).norm().item()
    )
    assert grouped == pytest.approx(CLIP, rel=1e-3)


def test_patients_per_batch_follow_binomial():
    from scipy.stats import binom, chisquare

    n_patients, q, steps = 200, 0.05, 4000
    counts = np.array([len(b) for b in poisson_batches(n_patients, q, steps, torch.Generator().manual_seed(3))])
    values = np.arange(0, 26)
    expected = binom.pmf(values, n_patients, q) * steps
    observed = np.array([(counts == v).sum() for v in values])
    expected[-1] += (1 - binom.cdf(values[-1], n_patients, q)) * steps
    observed[-1] += (counts > values[-1]).sum()
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    assert counts.mean() == pytest.approx(n_patients * q, rel=0.03)


@pytest.mark.parametrize(("mode", "secure"), [("hooks", False), ("functorch", True)])
def test_patient_level_trial_accounts_patients_and_matches_dp_accounting(tiny_site, mode, secure):
    ids = open_cache(tiny_site / TINY_DATASET / str(TINY_SIZE)).split("train").patient_id
    n_patients = group_patients(ids, 3).n_patients
    assert n_patients < len(ids)
    q, steps = sample_rate_and_steps(n_patients, 8, 2)  # the plan's q and steps, derived here independently
    cfg = tiny_trial_config(
        tiny_site,
        4.0,
        epochs=2,
        privacy_unit="patient",
        max_images_per_patient=3,
        expected_batch_size=8,
        secure_mode=secure,
        max_physical_batch_size=5,
        pad_multiple=5,  # the padding granule must fit the physical batch (patient-level steps never pad)
        grad_sample_mode=mode,
    )
    assert (cfg.privacy.sample_rate, cfg.privacy.steps) == (q, steps)
    sigma = cfg.privacy.noise_multiplier
    final = run_tiny_trial(cfg).result.metrics
    assert final[M.STEPS] == steps
    reference = cross_check_epsilon(sigma, q, steps, 1e-5)
    assert final[M.EPSILON] == pytest.approx(reference["rdp"], rel=5e-3)
    assert final[M.EPSILON] <= 4.0
    assert M.EPSILON_PATIENT not in final  # its epsilon is already the patient's
    with pytest.raises(BudgetError, match="images"):  # calibrated on patients, run on images: refused
        run_tiny_trial(
            dataclasses.replace(
                cfg, privacy=dataclasses.replace(cfg.privacy, privacy_unit="image", max_images_per_patient=None)
            )
        )


def test_patient_level_trial_releases_the_counts_of_its_patients_capped_images(tiny_site):
    """``pos_weight: train`` at the patient level: the counts are over the images the patients train on (the cap
    applied), noised for the patient sensitivity K sqrt(L), and accounted first in the patient-level accountant; the
    trial's epsilon is the composition, within its target."""
    ids = open_cache(tiny_site / TINY_DATASET / str(TINY_SIZE)).split("train").patient_id
    patients = group_patients(ids, 2)
    assert patients.n_images_left_out > 0  # the twin has patients of 3 images: the cap leaves some out
    cfg = tiny_trial_config(
        tiny_site,
        4.0,
        epochs=1,
        test_every_epoch=False,
        privacy_unit="patient",
        max_images_per_patient=2,
        expected_batch_size=8,
        pos_weight="train",
        label_count_noise_multiplier=20.0,
    )
    p = cfg.privacy
    assert (p.sample_rate, p.steps) == sample_rate_and_steps(patients.n_patients, 8, 1)
    run = run_tiny_trial(cfg)
    state = run.states[-1]
    release = LabelCountRelease.from_dict(state["label_counts"])
    capped = sum(len(images) for images in patients.images)
    assert (release.n_train, release.max_images_per_patient) == (capped, 2) and capped < len(ids)
    assert release.sensitivity == 2 * np.sqrt(5) and release.noise_multiplier == 20.0
    assert state["accountant"]["history"] == accountant_history(p.noise_multiplier, p.sample_rate, p.steps, 20.0)
    final = run.result.metrics
    with_release = epsilon_spent(p.noise_multiplier, p.sample_rate, p.steps, p.delta, label_count_noise_multiplier=20.0)
    assert final[M.EPSILON] == pytest.approx(with_release, rel=1e-9) and with_release <= 4.0
    assert epsilon_spent(p.noise_multiplier, p.sample_rate, p.steps, p.delta) < with_release


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_patient_level_trial_resumes_exactly(tiny_site, mode):
    cfg = tiny_trial_config(
        tiny_site,
        4.0,
        epochs=2,
        test_every_epoch=False,
        privacy_unit="patient",
        max_images_per_patient=2,
        expected_batch_size=8,
        grad_sample_mode=mode,
    )
    run = run_tiny_trial(cfg)
    resumed = run_tiny_trial(cfg, run.states[0])
    for name, weight in run.result.model.state_dict().items():
        torch.testing.assert_close(resumed.result.model.state_dict()[name], weight, rtol=0, atol=0)
    assert resumed.result.metrics[M.EPSILON] == run.result.metrics[M.EPSILON]
