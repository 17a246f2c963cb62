"""A patient-level Optuna sweep on a real local Ray (its own module: a module's sweep fixture holds Ray until the
module ends): proposals planned over N_patients with the patient-level label-count release, and the tuning bound."""

import pytest
from mlflow.tracking import MlflowClient

from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import ROLE_TAG, SWEEP_TAG
from trainables.privacy.accounting import epsilon_spent, sample_rate_and_steps

pytestmark = pytest.mark.slow


TINY_PATIENT_OPTUNA = tiny_yaml(
    name="tiny-patient-optuna",
    search="optuna",
    data={"synthetic_images": 400},
    privacy={
        "target_epsilon": [4],
        "delta": 1.0e-5,
        "max_grad_norm": None,
        "expected_batch_size": None,
        "epochs": None,
        "privacy_unit": "patient",
        "max_images_per_patient": 3,
    },
    training={"lr": None, "pos_weight": "train"},
    speed={"grad_sample_mode": "bk", "precision": "bf16"},
    optuna={
        "trials_per_target": 2,
        "max_concurrent": 2,
        "noise_multiplier": [0.5, 3.0],
        "expected_batch_size": [8, 32],
        "epochs": [1, 1],
        "lr": [5.0e-4, 3.0e-3],
        "max_grad_norm": [0.5, 2.0],
    },
)


def test_a_patient_level_search_with_label_counts_runs_end_to_end(tmp_path_factory):
    """search: optuna over patients, pos_weight: train, bk in bf16: each proposal planned and checked on N_patients
    with the patient-level label-count release, and the adaptive tuning bound over the patients' admissible set."""
    from trainables.privacy.tuning import AdmissibleSet, adaptive_tuning_bound

    with local_sweep(tmp_path_factory, TINY_PATIENT_OPTUNA, "tiny-patient-optuna.yaml") as (spec, paths, trials):
        assert len(trials) == 2 and (trials["status"] == "TERMINATED").all(), trials[["trial", "status", "error"]]
        assert (trials["privacy_unit"] == "patient").all() and (trials["pos_weight"] == "train").all()
        n_patients = int(trials["n_patients"].iloc[0])
        assert n_patients < int(trials["n_train"].iloc[0])
        for row in trials.itertuples():
            assert (row.sample_rate, row.steps) == sample_rate_and_steps(n_patients, row.expected_batch_size, 1)
            planned = epsilon_spent(
                row.noise_multiplier, row.sample_rate, row.steps, row.delta, label_count_noise_multiplier=20.0
            )
            assert planned <= 4 and row.label_count_noise_multiplier == 20.0
        assert (trials[M.EPSILON] <= 4).all()
        client = MlflowClient(paths.tracking_uri)
        experiment = client.get_experiment_by_name("tiny-patient-optuna")
        (parent,) = [
            r
            for r in client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = 'tiny-patient-optuna'")
            if r.data.tags[ROLE_TAG] == "sweep"
        ]
        cell = AdmissibleSet(n_patients, 4.0, 1e-5, (0.5, 3.0), (8, 32), (1, 1), label_count_noise_multiplier=20.0)
        assert parent.data.metrics[M.TUNING_EPSILON] == pytest.approx(adaptive_tuning_bound([(cell, 2)]).epsilon)
