"""`privacy.privacy_unit` as a grid axis: parsing, refusals, planning on N_patients, trial keys."""

from __future__ import annotations

import pytest
import yaml

from sweeps.plan import DatasetPlan, SweepPaths, cell_privacy, make_trial, plan_sweep, trial_key, trial_name
from sweeps.spec import SpecError, load_spec, parse_spec
from tests.sweeps.points import tiny_optuna_spec
from tests.sweeps.sweep_files import SWEEPS, UNITS, units_dict
from trainables.data.cache import open_cache
from trainables.data.synthetic import prepare_synthetic
from trainables.models import ResolvedInit
from trainables.privacy.accounting import epsilon_spent, sample_rate_and_steps
from trainables.privacy.planning import plan_privacy


def test_units_sweep_runs_both_units_side_by_side_with_suffixed_keys():
    spec = load_spec(UNITS)
    assert spec.axes.privacy_unit == ("image", "patient")
    points = spec.grid()
    assert len(points) == 6 and {p.privacy_unit for p in points} == {"image", "patient"}
    keys = [trial_key(spec, p) for p in points]
    assert len(set(keys)) == 6 and all(k.endswith(("-image", "-patient")) for k in keys)


def test_single_unit_sweeps_keep_their_trial_keys():
    spec = load_spec(SWEEPS / "smoke.yaml")
    assert spec.axes.privacy_unit == ("image",)
    assert trial_key(spec, spec.grid()[0]) == "random-eps1-clip1-lr0.0005-seed0"
    raw = units_dict()
    raw["privacy"]["privacy_unit"] = "patient"
    patient_only = parse_spec(raw)
    assert trial_key(patient_only, patient_only.grid()[0]) == "random-eps1-clip1-lr0.0005-seed0"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"train": "vindr-cxr"}}, "'vindr-cxr': VinDr-CXR publishes no patient ids"),
        ({"privacy": {"max_images_per_patient": None}}, "max_images_per_patient = None: a patient-level trial needs"),
        ({"privacy": {"max_images_per_patient": 100}}, "must fit in one physical batch"),
        ({"privacy": {"privacy_unit": ["image", "pixel"]}}, "choose one of ('image', 'patient')"),
        ({"privacy": {"privacy_unit": ["image", "image"]}}, "lists ['image'] twice"),
        ({"privacy": {"privacy_unit": "image"}}, "max_images_per_patient = 3 is set but privacy.privacy_unit"),
    ],
)
def test_bad_unit_settings_are_refused_naming_the_field(change, expected):
    raw = units_dict()
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(SpecError) as error:
        parse_spec(raw, source="units.yaml")
    assert expected in str(error.value)


def test_the_patient_unit_takes_pos_weight_train_bf16_an_audit_and_optuna():
    raw = units_dict()
    raw["training"]["pos_weight"] = "train"
    raw["speed"] |= {"grad_sample_mode": "bk", "precision": "bf16"}
    raw["audit"] = {"m": 100, "kind": ["white_box", "black_box"]}
    spec = parse_spec(raw, source="units.yaml")
    assert spec.audit is not None and spec.speed.precision == "bf16" and spec.training.pos_weight == "train"
    patient = next(p for p in spec.grid() if p.privacy_unit == "patient")
    assert spec.trial_config(patient, data_root="/d").pos_weight == "train"

    patient_only = {"privacy_unit": "patient", "max_images_per_patient": 3}
    optuna = tiny_optuna_spec(privacy=patient_only, training={"pos_weight": "train"}, speed={"precision": "bf16"})
    assert optuna.search == "optuna" and optuna.axes.privacy_unit == ("patient",)
    with pytest.raises(SpecError, match=r"search: optuna runs one study per cell for one privacy unit; give one"):
        tiny_optuna_spec(privacy={**patient_only, "privacy_unit": ["image", "patient"]})


def test_a_prepared_dataset_without_patient_ids_is_refused_by_the_plan():
    plan = DatasetPlan("vindr-like", 100, 0.32, 12, n_patients=None)
    assert plan.n_records("image") == 100
    with pytest.raises(SpecError, match="vindr-like: its patient ids are its image ids"):
        plan.n_records("patient")


def test_patient_trials_are_planned_on_n_patients(tmp_path):
    raw = units_dict()
    raw["privacy"]["target_epsilon"] = [2]
    spec = parse_spec(raw)
    prepare_synthetic("synthetic-a", tmp_path, size=64)
    plan = plan_sweep(spec, SweepPaths(tmp_path / "runs", tmp_path, "sqlite:///x.db"), dry_run=True)
    ids = open_cache(tmp_path / "synthetic-a" / "64").split("train").patient_id
    dataset = plan.datasets["synthetic-a"]
    assert dataset.n_patients == len(set(ids)) < dataset.n_train == len(ids)
    by_unit = {t.config.privacy.privacy_unit: t for t in plan.trials}
    patient = by_unit["patient"].config.privacy
    assert (patient.sample_rate, patient.steps) == sample_rate_and_steps(dataset.n_patients, 32, 3)
    assert patient.max_images_per_patient == 3 and by_unit["image"].config.privacy.max_images_per_patient is None
    assert 2 - 0.01 <= epsilon_spent(patient.noise_multiplier, patient.sample_rate, patient.steps, 6e-6) <= 2
    assert by_unit["patient"].params["n_patients"] == dataset.n_patients
    assert f"N={dataset.n_patients} treated as public" in by_unit["patient"].params["privacy/guarantee"]


def test_delta_is_checked_against_one_over_n_patients(tmp_path):
    spec = parse_spec(units_dict())
    by_unit = {p.privacy_unit: spec.trial_config(p, data_root=str(tmp_path)).privacy for p in spec.grid()}
    assert by_unit["patient"].max_images_per_patient == 3 and by_unit["image"].max_images_per_patient is None
    raw = units_dict()
    raw["privacy"] |= {"privacy_unit": "patient", "delta": 1 / 1000}  # above 1/N_patients = 1/1047
    prepare_synthetic("synthetic-a", tmp_path, size=64)
    with pytest.raises(SpecError, match=r"N = training patients\): delta=0.001 >= 1/N=0.00095511 for N=1047"):
        plan_sweep(parse_spec(raw), SweepPaths(tmp_path / "runs", tmp_path, "sqlite:///x.db"), dry_run=True)


def test_make_trial_sets_the_unit_of_the_point(tmp_path):
    spec = parse_spec(units_dict())
    point = next(p for p in spec.grid() if p.privacy_unit == "patient")
    trial = make_trial(
        spec,
        SweepPaths(tmp_path, tmp_path, "sqlite:///x.db"),
        DatasetPlan("synthetic-a", 1000, 0.032, 96, n_patients=600),
        ResolvedInit("random", "random", "test_convnext", None),
        point,
        trial_name(spec, point),
        privacy=plan_privacy(cell_privacy(spec, point.target_epsilon, "patient"), 600, noise_multiplier=1.1),
        provenance_tags={},
    )
    assert trial.config.privacy.privacy_unit == "patient"
    assert (trial.config.privacy.sample_rate, trial.config.privacy.steps) == sample_rate_and_steps(600, 32, 3)
    assert trial.tags["dpsweep.adjacency"].startswith("add/remove one patient")


def test_tuning_cost_of_a_mixed_sweep_is_per_unit_and_the_patient_level_one_composes_both():
    import pandas as pd

    from sweeps.tuning_cost import patient_level_sweep_epsilon, tuning_costs
    from trainables import names as N
    from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

    trials = pd.DataFrame(
        [
            {
                "trial": "i",
                "dataset": "d",
                "privacy_unit": "image",
                "noise_multiplier": 1.37109375,
                "sample_rate": 1 / 56,
                "delta": 6e-6,
                "target_epsilon": 1.0,
                "status": N.TERMINATED,
                "steps": 168,
                N.RELEASED_STEPS: 168,
                N.PATIENT_IMAGES: 3,
            },
            {
                "trial": "p",
                "dataset": "d",
                "privacy_unit": "patient",
                "noise_multiplier": 1.6328125,
                "sample_rate": 1 / 33,
                "delta": 6e-6,
                "target_epsilon": 1.0,
                "status": N.STOPPED,  # at its planned steps, not the 33 it ran before ASHA stopped it
                "steps": 99,
                N.RELEASED_STEPS: 33,
                N.PATIENT_IMAGES: float("nan"),
            },
        ]
    )
    assert set(tuning_costs(trials)) == {"d (image-level trials only)", "d (patient-level trials only)"}
    expected = composed_patient_epsilon(
        [PatientMechanism(1.37109375, 1 / 56, 168, 3), PatientMechanism(1.6328125, 1 / 33, 99, 1)], 6e-6
    )
    assert patient_level_sweep_epsilon(trials) == {"d": expected}
    assert patient_level_sweep_epsilon(trials[trials["privacy_unit"] == "image"]) == {}  # image-only: none


@pytest.mark.slow
def test_the_units_sweep_runs_both_units_in_bk_end_to_end(tmp_path_factory):
    """units-smoke.yaml as shipped (bk for both units), shrunk to one epsilon, one epoch and 32 px on a local Ray."""
    from tests.sweeps.local_sweep import local_sweep
    from trainables import names as M

    raw = units_dict()
    assert raw["speed"]["grad_sample_mode"] == "bk"
    raw["privacy"] |= {"target_epsilon": [8], "epochs": 1}
    raw["data"] |= {"image_size": 32, "synthetic_images": 600}
    raw["evaluation"] |= {"n_boot": 10}
    with local_sweep(tmp_path_factory, yaml.safe_dump(raw), "units-smoke.yaml") as (_, _, trials):
        assert (trials["status"] == "TERMINATED").all(), trials[["trial", "status", "error"]]
        assert sorted(trials["privacy_unit"]) == ["image", "patient"]
        assert (trials["grad_sample_mode"] == "bk").all()
        assert (trials[M.EPSILON] <= 8).all() and (trials[M.EPSILON] >= 8 - 0.01).all()
        patient = trials[trials["privacy_unit"] == "patient"].iloc[0]
        assert patient["n_patients"] < trials[trials["privacy_unit"] == "image"].iloc[0]["n_train"]


def test_an_optuna_batch_range_above_the_patients_is_refused_by_the_plan(tmp_path):
    spec = tiny_optuna_spec(
        privacy={"privacy_unit": "patient", "max_images_per_patient": 3},
        optuna={"expected_batch_size": [16, 5000]},
    )
    refused = r"the largest of optuna\.expected_batch_size = 5000 is larger than synthetic-a's \d+ training patients"
    with pytest.raises(SpecError, match=refused):
        plan_sweep(spec, SweepPaths(tmp_path / "runs", tmp_path, "sqlite:///x.db"), dry_run=True)
