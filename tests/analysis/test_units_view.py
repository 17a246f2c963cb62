"""The view "image-level vs patient-level training at the same patient-level epsilon", on a hand-made table."""

from __future__ import annotations

import math

import pandas as pd

from analysis import views
from trainables import names

AGE_GAP, SEX_GAP = names.auroc_gap("test", "age"), names.auroc_gap("test", "sex")


def trial(key: str, unit: str, epsilon: float, patient: float, val: float, test: float, status: str = "TERMINATED"):
    return {
        "trial": key,
        "status": status,
        "model": "m",
        "dataset": "d",
        "init": "random",
        "privacy_unit": unit,
        "target_epsilon": epsilon,
        "reproducible_noise": False,
        names.EPSILON: epsilon,
        names.EPSILON_PATIENT: patient,
        names.VAL_SELECTED_AUROC_MACRO: val,
        names.TEST_AUROC_MACRO: test,
        AGE_GAP: 0.1,
        SEX_GAP: 0.05,
    }


def test_trials_are_binned_by_their_patient_level_epsilon_and_compared_per_unit():
    trials = pd.DataFrame(
        [
            trial("i1", "image", 1.0, 2.86, 0.70, 0.68),  # image eps 1 -> patient 2.86: bin (0, 3]
            trial("i8", "image", 8.0, 19.9, 0.80, 0.78),  # -> (10, 30]
            trial("p3", "patient", 3.0, math.nan, 0.72, 0.71),  # patient-level: its own epsilon, (0, 3]
            trial("p2", "patient", 2.0, math.nan, 0.71, 0.70),  # same cell, lower validation AUROC: not chosen
            trial("p8", "patient", 8.0, math.nan, 0.79, 0.77),  # (3, 10]
            trial("px", "patient", 8.0, math.nan, 0.99, 0.99, status="ERROR"),  # unfinished: never shown
            trial("inf", "image", math.inf, math.nan, 0.9, 0.9),  # non-private: no patient guarantee to compare
        ]
    )
    view = views.units_at_patient_epsilon(trials)
    rows = {(r["bin"], r["privacy_unit"]): r for _, r in view.iterrows()}
    assert set(rows) == {("(0, 3]", "image"), ("(0, 3]", "patient"), ("(3, 10]", "patient"), ("(10, 30]", "image")}
    assert rows[("(0, 3]", "patient")]["trial"] == "p3" and rows[("(0, 3]", "patient")]["candidate_trials"] == 2
    assert rows[("(0, 3]", "image")][views.PATIENT_EPSILON] == 2.86
    assert rows[("(0, 3]", "image")][names.EPSILON] == 1.0
    assert rows[("(3, 10]", "patient")][names.TEST_AUROC_MACRO] == 0.77
    assert {names.TEST_AUROC_MACRO, AGE_GAP, SEX_GAP} <= set(view.columns)


def test_report_of_a_mixed_unit_sweep_shows_the_comparison_and_keeps_the_study_views_image_level(tmp_path):
    from analysis.report import write_report
    from tests.analysis.fixtures import make_sweep
    from trainables.names import TRIALS_FILE

    sweep_dir = make_sweep(tmp_path)
    trials = pd.read_parquet(sweep_dir / TRIALS_FILE)
    patient = trials.index % 2 == 1
    trials.loc[patient, "privacy_unit"] = "patient"
    trials[names.EPSILON_PATIENT] = trials[names.EPSILON].where(~patient) * 2.5
    trials[names.PATIENT_IMAGES] = 3.0
    trials.to_parquet(sweep_dir / TRIALS_FILE)
    page = write_report(sweep_dir).read_text()
    assert "Image-level vs patient-level training at the same patient-level epsilon" in page
    assert f"views of the {int((~patient).sum())} image-level trials only" in page
    assert "privacy/epsilon_patient" in page
