"""`make_private`, the one private setup: it verifies per-sample (and per-patient) gradients before anything trains,
opens the ledger with the label-count release first, and hands back the DP optimizer at the config's (sigma, C, B, q).
"""

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from tests.privacy.models import LOSS, inputs, small_convnext
from trainables.config import PrivacyConfig
from trainables.privacy import setup as private_setup
from trainables.privacy.bk import BookKeepingModule
from trainables.privacy.engine import PerSampleGradientError, private_step
from trainables.privacy.label_counts import LabelCountRelease, count_sensitivity
from trainables.privacy.setup import SelfCheckBatch, make_private

PRIVACY = PrivacyConfig(
    target_epsilon=4.0, max_grad_norm=0.5, expected_batch_size=3, noise_multiplier=1.3, sample_rate=0.25, steps=8
)
RELEASE = LabelCountRelease((3.0, 1.5, 2.0, 4.0, 0.5), 100, 20.0, count_sensitivity(5))


def build(mode="hooks", privacy=PRIVACY, check=None, release=None):
    model = small_convnext()
    return model, make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        LOSS,
        privacy=privacy,
        grad_sample_mode=mode,
        check=check or SelfCheckBatch(inputs(4)),
        noise=torch.Generator().manual_seed(0),
        label_count_release=release,
    )


@pytest.mark.parametrize("mode", ["bk", "hooks", "functorch"])
def test_setup_is_verified_and_wraps_the_optimizer_at_the_configs_mechanism(mode):
    model, setup = build(mode)
    assert setup.check.max_relative_error < 1e-3 and setup.check.n_samples == 4 and setup.patient_check is None
    assert setup.wrapped._module is model and isinstance(setup.wrapped, BookKeepingModule) == (mode == "bk")
    optimizer = setup.optimizer
    assert (optimizer.noise_multiplier, optimizer.max_grad_norm, optimizer.expected_batch_size) == (1.3, 0.5, 3)
    assert {id(p) for p in optimizer.params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert setup.accountant.history == []  # the self-check spent nothing
    x, y = inputs(3)
    private_step(setup.wrapped, optimizer, LOSS, (x, y), max_physical_batch_size=8)
    assert setup.accountant.history == [(1.3, 0.25, 1)]  # each step is accounted at the config's (sigma, q)


def test_the_label_count_release_opens_the_ledger():
    _, setup = build(release=RELEASE)
    private_step(setup.wrapped, setup.optimizer, LOSS, inputs(3), max_physical_batch_size=8)
    assert setup.accountant.history == [(20.0, 1.0, 1), (1.3, 0.25, 1)]


def test_wrong_per_sample_gradients_refuse_to_set_up(monkeypatch):
    # Stock Opacus hooks are wrong on ConvNeXt's downsample convs: the recipe's self-check must stop it.
    monkeypatch.setattr(
        private_setup, "wrap_model", lambda model, mode: GradSampleModule(model, batch_first=True, loss_reduction="sum")
    )
    made = []
    monkeypatch.setattr(private_setup, "make_dp_optimizer", lambda *a, **k: made.append(1))
    with pytest.raises(PerSampleGradientError, match="downsample"):
        build()
    assert not made  # no optimizer was ever built around the wrong engine


PATIENT = PrivacyConfig(
    target_epsilon=4.0,
    privacy_unit="patient",
    max_images_per_patient=3,
    expected_batch_size=2,
    noise_multiplier=1.3,
    sample_rate=0.25,
    steps=8,
)
GROUPS = np.array([0, 0, 0, 1, 1])


def patient_check():
    x, y = inputs(5)
    return SelfCheckBatch((x[:4], y[:4]), (x, y, GROUPS))


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_patient_level_setup_also_checks_the_grouped_path(mode):
    _, setup = build(mode, privacy=PATIENT, check=patient_check())
    assert setup.patient_check is not None and setup.patient_check.n_samples == 2  # two patients, summed
    assert setup.patient_check.max_relative_error < 1e-3
    assert isinstance(setup.wrapped, BookKeepingModule) == (mode == "bk")


def test_a_wrong_grouped_bk_rule_refuses_to_set_up(monkeypatch):
    # Per-patient ghost norms taken as sums of image norms (the cross-image terms left out): the image rows are right,
    # so only the grouped self-check can stop it, before any optimizer exists.
    import trainables.privacy.bk as bk

    monkeypatch.setattr(
        bk, "patient_ghost_norm_sq", lambda image_norms_sq, a, g, patients: patients.sum_rows(image_norms_sq)
    )
    made = []
    monkeypatch.setattr(private_setup, "make_dp_optimizer", lambda *a, **k: made.append(1))
    with pytest.raises(PerSampleGradientError, match="per-patient norm"):
        build("bk", privacy=PATIENT, check=patient_check())
    assert not made


def test_the_grouped_check_runs_on_the_given_patients(monkeypatch):
    seen = []
    original = private_setup.check_patient_gradients

    def spy(wrapped, loss_fn, x, y, groups):
        seen.append((len(x), groups.tolist()))
        return original(wrapped, loss_fn, x, y, groups)

    monkeypatch.setattr(private_setup, "check_patient_gradients", spy)
    build(privacy=PATIENT, check=patient_check())
    assert seen == [(5, GROUPS.tolist())]


@pytest.mark.parametrize(
    ("privacy", "check", "mode", "message"),
    [
        (PATIENT, SelfCheckBatch(inputs(4)), "hooks", "whole patients"),  # a patient-level run cannot skip it
        (PRIVACY, patient_check(), "hooks", "image rows only"),
        (PrivacyConfig(target_epsilon=math.inf), SelfCheckBatch(inputs(4)), "hooks", "private config"),
    ],
)
def test_setups_that_cannot_hold_are_refused(privacy, check, mode, message):
    with pytest.raises(ValueError, match=message):
        build(mode, privacy=privacy, check=check)
