"""Guards in the trial loop that protect the privacy ledger, and what a tiny trial reports every epoch."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from tests.asserts import assert_identical
from tests.factories import TINY_DATASET, TINY_SIZE, pinned_config, run_tiny_trial, tiny_trial_config
from trainables import names as M
from trainables.config import TrialConfig
from trainables.data.cache import open_cache
from trainables.data.labels import LABELS
from trainables.data.loaders import load_trial_data
from trainables.evaluate.fairness import subgroup_auroc_gaps
from trainables.evaluate.report import evaluate_split
from trainables.models import create_model, predict, resolve_init
from trainables.privacy.accounting import calibrate_noise_multiplier, replace_one_epsilon
from trainables.privacy.patients import group_patients
from trainables.privacy.randomness import mechanism_randomness
from trainables.steps import (
    BaselineStepper,
    ImageDPStepper,
    PatientDPStepper,
    make_stepper,
    per_sample_bce,
    self_check_batch,
    step_settings,
)
from trainables.throughput import throughput_metrics
from trainables.train import BudgetError, TrainState, check_ledger, training_records


def accountant(*steps):
    acc = RDPAccountant()
    for sigma, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


def test_consistent_ledger_passes():
    check_ledger(accountant((1.2, 0.1, 10)), pinned_config(), 10)


@pytest.mark.parametrize("ledger", [(), ((1.2, 0.1, 9),), ((1.0, 0.1, 10),), ((1.2, 0.05, 10),)])
def test_lost_short_or_foreign_ledger_is_refused(ledger):
    with pytest.raises(BudgetError, match="inconsistent ledger"):
        check_ledger(accountant(*ledger), pinned_config(), 10)


def test_epsilon_of_a_lost_ledger_would_be_under_reported():
    # why the guard exists: an accountant missing steps reports less epsilon than was spent
    full, short = accountant((1.2, 0.1, 30)), accountant((1.2, 0.1, 20))
    assert short.get_epsilon(1e-5) < full.get_epsilon(1e-5)
    assert not math.isclose(short.get_epsilon(1e-5), full.get_epsilon(1e-5))


# ----------------------------------------------------------------------------------------------------
# A tiny trial end to end

ATTRIBUTES = ("sex", "age")


def test_every_epoch_reports_subgroup_auroc_gaps_defined_as_the_final_headline(tiny_site):
    cfg = tiny_trial_config(tiny_site, math.inf, model_selection="last")
    run = run_tiny_trial(cfg)
    gap_keys = {M.auroc_gap("val", a) for a in ATTRIBUTES} | {M.auroc_gap_at_epoch(a) for a in ATTRIBUTES}
    assert gap_keys == {
        "val/fairness/auroc_gap/sex",
        "val/fairness/auroc_gap/age",
        "test/fairness/auroc_gap_at_epoch/sex",
        "test/fairness/auroc_gap_at_epoch/age",
    }
    for epoch in run.epochs:
        assert gap_keys <= epoch.keys()
    last = run.epochs[-1]
    # model_selection=last: the final evaluation scores the last epoch's weights, so its headline test gaps
    # (evaluate_split, with bootstrap and thresholds) must equal what that epoch reported.
    for attribute in ATTRIBUTES:
        assert last[M.auroc_gap_at_epoch(attribute)] == run.result.metrics[M.auroc_gap("test", attribute)]
    # and the validation gaps equal evaluate_split's on the validation predictions of the same weights
    data = load_trial_data(cfg)
    scores, labels = predict(run.result.model, data.val, 256)
    val = evaluate_split(
        labels, scores, sex=data.val.split.sex, age=data.val.split.age, age_edges=cfg.age_edges, n_boot=0, prefix="val"
    ).metrics
    for attribute in ATTRIBUTES:
        assert last[M.auroc_gap("val", attribute)] == val[M.auroc_gap("val", attribute)]
    assert all(math.isfinite(last[key]) for key in gap_keys), "fixture too small: the comparison proves nothing"


def test_final_report_carries_the_selected_epochs_validation_numbers(tiny_site):
    """Optuna's objectives: validation numbers of the epoch the trial selected, never test."""
    run = run_tiny_trial(tiny_trial_config(tiny_site, math.inf, epochs=3))
    final = run.result.metrics
    selected = run.epochs[final[M.BEST_EPOCH] - 1]
    assert (
        final[M.VAL_SELECTED_AUROC_MACRO]
        == selected[M.VAL_AUROC_MACRO]
        == max(e[M.VAL_AUROC_MACRO] for e in run.epochs)
    )
    for attribute in ATTRIBUTES:
        assert final[M.val_selected_auroc_gap(attribute)] == selected[M.auroc_gap("val", attribute)]


def test_test_split_gaps_follow_test_every_epoch(tiny_site):
    run = run_tiny_trial(tiny_trial_config(tiny_site, math.inf, epochs=1, test_every_epoch=False))
    assert M.auroc_gap("val", "age") in run.epochs[0]
    assert not any(key.startswith("test/") for key in run.epochs[0])


def test_throughput_metrics_are_counts_over_wall_time():
    private = throughput_metrics(seconds=4.0, steps=8, expected_images_per_step=15.5, images_per_epoch=144)
    assert private == {
        M.SYSTEM_TRAIN_S: 4.0,
        M.SYSTEM_STEP_S: 0.5,
        M.SYSTEM_STEPS_PER_S: 2.0,
        M.SYSTEM_IMAGES_PER_S: 31.0,
    }
    baseline = throughput_metrics(seconds=4.0, steps=9, expected_images_per_step=None, images_per_epoch=144)
    assert baseline[M.SYSTEM_IMAGES_PER_S] == 36.0 and baseline[M.SYSTEM_STEP_S] == 4.0 / 9
    assert math.isnan(throughput_metrics(0.0, 0, 15.5, 144)[M.SYSTEM_STEP_S])


@pytest.mark.parametrize("target_epsilon", [4.0, math.inf])
def test_system_metrics_use_expected_counts_and_a_private_trial_reports_no_epoch_time(
    tiny_site, monkeypatch, target_epsilon
):
    """A non-private trial reports its system metrics every epoch; a private trial reports none of them per epoch
    (an epoch's wall time tracks its secret Poisson batch sizes), only the run's total training seconds in its final
    report, which every trial carries. images/s (what `epoch_timing` sees in process, private trials included) is
    q N images per step over wall time: the batches are halved here, so a figure built from realized sizes would be
    about half of q N per step. Nothing of it is in the history."""
    import trainables.steps as steps_module

    realized: list[int] = []
    poisson = steps_module.poisson_batches

    def halved(*args, **kwargs):
        for indices in poisson(*args, **kwargs):
            realized.append(len(indices) // 2)
            yield indices[: len(indices) // 2]

    monkeypatch.setattr(steps_module, "poisson_batches", halved)
    cfg = tiny_trial_config(tiny_site, target_epsilon, epochs=2)
    timings: list[dict[str, float]] = []
    run = run_tiny_trial(cfg, epoch_timing=timings.append)
    n_train = len(load_trial_data(cfg).train)
    steps_per_epoch = cfg.privacy.steps // cfg.privacy.epochs
    private = cfg.privacy.is_private
    assert run.system == ([{}] * cfg.privacy.epochs if private else timings)
    assert len(timings) == cfg.privacy.epochs
    for epoch, system in zip(run.epochs, timings, strict=True):
        assert set(system) == set(M.SYSTEM_METRICS)
        assert all(math.isfinite(v) and v > 0 for v in system.values()), system
        seconds = system[M.SYSTEM_TRAIN_S]
        assert system[M.SYSTEM_STEP_S] == seconds / steps_per_epoch
        assert system[M.SYSTEM_STEPS_PER_S] == steps_per_epoch / seconds
        expected_images = cfg.privacy.sample_rate * n_train * steps_per_epoch if private else n_train
        assert system[M.SYSTEM_IMAGES_PER_S] * seconds == pytest.approx(expected_images, rel=1e-12)
        assert not any(key.startswith(M.SYSTEM_PREFIX) for key in epoch)
    final_system = {k: v for k, v in run.result.metrics.items() if k.startswith(M.SYSTEM_PREFIX)}
    assert final_system == {M.SYSTEM_TOTAL_TRAIN_S: sum(t[M.SYSTEM_TRAIN_S] for t in timings)}
    if private:  # the halved batches were used: realized counts are far from q N per step
        assert len(realized) == cfg.privacy.steps
        assert sum(realized) < 0.75 * cfg.privacy.sample_rate * n_train * cfg.privacy.steps
    for state in run.states:  # the checkpoint's history holds results only
        assert not any(key.startswith(M.SYSTEM_PREFIX) for report in state["history"] for key in report)
    assert not any(c.startswith(M.SYSTEM_PREFIX) for c in run.result.tables["epochs"].columns)


def test_subgroup_gap_is_nan_without_two_evaluable_groups():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, len(LABELS))) < 0.5).astype(np.float32)
    scores = rng.random((40, len(LABELS)))
    split = SimpleNamespace(
        sex=np.array(["F"] * 20 + ["unknown"] * 20, dtype=object),  # one sex group
        age=np.r_[np.full(20, 50.0), np.full(20, np.nan)],
    )  # one age bin
    gaps = subgroup_auroc_gaps(labels, scores, split.sex, split.age, (0, 40, 70, 100))
    assert all(math.isnan(gap) for gap in gaps.values())
    split.sex[20:] = "M"
    split.age[20:] = 80.0
    gaps = subgroup_auroc_gaps(labels, scores, split.sex, split.age, (0, 40, 70, 100))
    assert gaps.keys() == set(ATTRIBUTES) and all(math.isfinite(gap) for gap in gaps.values())
    assert gaps["sex"] == gaps["age"]  # the same two halves of the images, grouped under both attributes


# ----------------------------------------------------------------------------------------------------
# TrainState: the checkpoint


def _train_state(cfg: TrialConfig, seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Linear(3, len(LABELS))
    return TrainState(
        cfg,
        model,
        torch.optim.AdamW(model.parameters()),
        RDPAccountant(),
        torch.Generator().manual_seed(seed),
        torch.Generator().manual_seed(seed + 1),
    )


def test_train_state_round_trips_through_its_state_dict():
    cfg = pinned_config()
    state = _train_state(cfg, 0)
    state.model(torch.ones(2, 3)).sum().backward()
    state.optimizer.step()  # optimizer moments to carry
    for _ in range(4):
        state.accountant.step(noise_multiplier=1.2, sample_rate=0.1)
    torch.rand(5, generator=state.sampler_rng), torch.rand(7, generator=state.noise_rng)  # streams moved on
    state.epoch, state.steps = 2, 4
    for epoch, auroc in ((1, 0.7), (2, 0.6)):  # best_val keeps epoch 1
        state.epoch = epoch
        state.record({M.EPOCH: epoch, M.VAL_AUROC_MACRO: auroc, M.EPSILON: 0.5 * epoch})
    saved = copy.deepcopy(state.state_dict())

    restored = _train_state(cfg, 1)  # other weights, moments, ledger and streams, all overwritten
    restored.load_state_dict(copy.deepcopy(saved))
    assert_identical(restored.state_dict(), saved, "state")
    assert (restored.epoch, restored.steps, restored.best_epoch, restored.best_score) == (2, 4, 1, 0.7)
    assert restored.selected == {M.EPOCH: 1, M.VAL_AUROC_MACRO: 0.7, M.EPSILON: 0.5, M.VAL_SELECTED_AUROC_MACRO: 0.7}
    for a, b in ((state.sampler_rng, restored.sampler_rng), (state.noise_rng, restored.noise_rng)):
        assert torch.equal(torch.rand(9, generator=a), torch.rand(9, generator=b))  # the same streams continue


def test_checkpoint_written_before_train_state_is_refused_clearly():
    state = _train_state(pinned_config(), 0)
    old = {k: v for k, v in state.state_dict().items() if k != "format"}  # format 1 carried no version
    with pytest.raises(ValueError, match="checkpoint format 1 cannot be resumed"):
        _train_state(pinned_config(), 0).load_state_dict(old)


# ----------------------------------------------------------------------------------------------------
# pos_weight: train in a private trial: DP label counts, accounted inside the target


def test_private_pos_weight_train_spends_its_label_count_release_inside_the_target(tiny_site):
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    base = tiny_trial_config(tiny_site, 3.0, epochs=2)
    cfg = tiny_trial_config(tiny_site, 3.0, epochs=2, pos_weight="train", label_count_noise_multiplier=20.0)
    privacy, sigma = cfg.privacy, cfg.privacy.noise_multiplier
    assert sigma == calibrate_noise_multiplier(
        3.0, privacy.delta, privacy.sample_rate, privacy.steps, label_count_noise_multiplier=20.0
    )
    assert sigma > base.privacy.noise_multiplier  # the release costs budget, so DP-SGD gets a little more noise
    run = run_tiny_trial(cfg)
    final = run.result.metrics
    assert final[M.EPSILON] <= 3.0
    # The epsilon reported is the composition of both mechanisms, checked independently with dp-accounting.
    reference = RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(20.0))
    reference.compose(
        dp_event.PoissonSampledDpEvent(privacy.sample_rate, dp_event.GaussianDpEvent(sigma)), privacy.steps
    )
    assert final[M.EPSILON] == pytest.approx(reference.get_epsilon(privacy.delta), rel=0.01)
    assert final[M.EPSILON_CROSS_CHECK_RDP] == pytest.approx(reference.get_epsilon(privacy.delta), rel=1e-6)
    # The replace-one reading of the same event (N fixed), the release included: above the add/remove PLD.
    assert final[M.EPSILON_REPLACE_ONE] == replace_one_epsilon(
        sigma, privacy.sample_rate, privacy.steps, privacy.delta, label_count_noise_multiplier=20.0
    )
    assert final[M.EPSILON_REPLACE_ONE] > final[M.EPSILON_CROSS_CHECK_PLD]
    # The release sits first in the ledger and in the checkpoint; resuming reuses it (no second draw).
    state = run.states[0]
    assert state["accountant"]["history"][0] == (20.0, 1.0, 1) and state["label_counts"] is not None
    resumed = run_tiny_trial(cfg, state)
    assert resumed.result.metrics[M.EPSILON] == final[M.EPSILON]


def test_private_pos_weight_train_refuses_exact_counts(tiny_site):
    cfg = dataclasses.replace(tiny_trial_config(tiny_site, 3.0, epochs=1), pos_weight="train")
    with pytest.raises(ValueError, match=r"training\.pos_weight = 'train' with privacy\.label_count_noise_multiplier"):
        run_tiny_trial(cfg)


# ----------------------------------------------------------------------------------------------------
# Predictions you can re-analyse: the logged metrics recomputed from the stored per-image scores


def test_logged_metrics_are_recomputed_from_the_stored_predictions(tiny_site):
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import roc_auc_score

    cfg = tiny_trial_config(tiny_site, math.inf, epochs=1)
    result = run_tiny_trial(cfg).result
    predictions = result.tables["predictions"]
    assert set(predictions.columns) == {"dataset", "row", *(M.prediction_score(label) for label in LABELS)}
    test = predictions[predictions["dataset"] == cfg.dataset].set_index("row")
    manifest = open_cache(tiny_site / TINY_DATASET / str(TINY_SIZE)).manifest.iloc[test.index]
    labels = manifest[list(LABELS)].to_numpy()
    scores = test[[M.prediction_score(label) for label in LABELS]].to_numpy()

    def macro_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
        per_label = [
            roc_auc_score(y_true[:, j], y_score[:, j])
            for j in range(y_true.shape[1])
            if 0 < y_true[:, j].sum() < len(y_true)
        ]
        return float(np.mean(per_label))

    assert macro_auroc(labels, scores) == pytest.approx(result.metrics[M.TEST_AUROC_MACRO], abs=1e-6)
    # The sex AUROC gap by fairlearn's MetricFrame over the stored scores and the manifest's sex column.
    known = manifest["sex"].isin(["F", "M"]).to_numpy()
    frame = MetricFrame(
        metrics=lambda y, s: macro_auroc(np.asarray(y), np.asarray(s)),
        y_true=labels[known],
        y_pred=scores[known],
        sensitive_features=manifest["sex"].to_numpy()[known],
    )
    assert frame.difference() == pytest.approx(result.metrics[M.auroc_gap("test", "sex")], abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# Steppers: one kind of step per trial, chosen once


def _stepper(cfg: TrialConfig):
    device = torch.device("cpu")
    data = load_trial_data(cfg)
    records = training_records(cfg, data.train, device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, resolve_init("random", cfg.model))
    randomness = mechanism_randomness(cfg.privacy, cfg.seed, device)
    stepper = make_stepper(
        cfg, model, per_sample_bce(None, device), records, randomness, step_settings(cfg.speed, device), None
    )
    return stepper, records


def test_the_step_kind_is_chosen_once_from_the_config(tiny_site):
    ids = open_cache(tiny_site / TINY_DATASET / str(TINY_SIZE)).split("train").patient_id
    image = tiny_trial_config(tiny_site, 4.0, epochs=1)
    patient = tiny_trial_config(
        tiny_site, 4.0, epochs=1, grad_sample_mode="hooks", privacy_unit="patient", max_images_per_patient=2
    )
    baseline, records = _stepper(tiny_trial_config(tiny_site, math.inf, epochs=1))
    assert isinstance(baseline, BaselineStepper) and baseline.accountant is None
    assert baseline.images_per_epoch == records.n_images and baseline.expected_images_per_step is None
    dp, records = _stepper(image)
    assert isinstance(dp, ImageDPStepper) and dp.accountant is dp.setup.accountant and dp.setup.patient_check is None
    assert dp.expected_images_per_step == image.privacy.sample_rate * records.n_images
    patients, records = _stepper(patient)
    assert isinstance(patients, PatientDPStepper) and patients.setup.patient_check is not None
    assert records.n_records == group_patients(ids, 2).n_patients < records.n_images
    capped = sum(min(2, n) for n in np.unique(ids, return_counts=True)[1])
    assert patients.images_per_epoch == capped and patients.expected_images_per_step == pytest.approx(
        patient.privacy.sample_rate * capped
    )


def test_a_private_stepper_refuses_a_step_beyond_the_plan(tiny_site):
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1)
    stepper, _ = _stepper(cfg)
    weights = copy.deepcopy(stepper.setup.wrapped._module.state_dict())
    with pytest.raises(BudgetError, match=f"step {cfg.privacy.steps + 1} would exceed the {cfg.privacy.steps} planned"):
        stepper.step(np.arange(4), cfg.privacy.steps + 1)
    assert stepper.accountant.history == []  # refused before any noisy step or accounting
    assert_identical(stepper.setup.wrapped._module.state_dict(), weights, "weights")
    stepper.step(np.arange(4), cfg.privacy.steps)  # the last planned step is taken
    assert stepper.accountant.history == [(cfg.privacy.noise_multiplier, cfg.privacy.sample_rate, 1)]


def test_the_self_check_rows_come_from_the_public_seed(tiny_site):
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1)
    records = training_records(cfg, load_trial_data(cfg).train, torch.device("cpu"))
    rows = torch.randperm(records.n_images, generator=torch.Generator().manual_seed(7))[:4].numpy()
    x, y = self_check_batch(records, seed=7).images
    expected_x, expected_y = records.source.batch(rows)
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    assert not torch.equal(self_check_batch(records, seed=8).images[0], x)
