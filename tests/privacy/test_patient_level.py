"""Patient-level figures of whole trials: the image-level trial's patient epsilon, and patient-level DP-SGD."""

from __future__ import annotations

from tests.test_train import run_tiny_trial, tiny_site, tiny_trial_config  # noqa: F401 (fixture)
from trainables import names as M
from trainables.data.cache import open_cache
from trainables.privacy.units import images_per_patient, patient_epsilon


def test_image_level_trial_reports_the_epsilon_of_its_largest_patient(tiny_site):  # noqa: F811
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1)
    final = run_tiny_trial(cfg).result.metrics
    ids = open_cache(tiny_site / cfg.dataset / str(cfg.image_size)).split("train").patient_id
    counts = images_per_patient(ids)
    assert counts.maximum > 1  # the synthetic twin has several images for some patients
    assert final[M.PATIENT_IMAGES] == counts.maximum and final[M.PATIENT_IMAGES_P99] == counts.p99
    p = cfg.privacy
    assert final[M.EPSILON_PATIENT] == patient_epsilon(p.noise_multiplier, p.sample_rate, p.steps, p.delta,
                                                       counts.maximum)
    assert final[M.EPSILON_PATIENT] > final[M.EPSILON_CROSS_CHECK_PLD]
    assert final[M.EPSILON_PATIENT] >= final[M.EPSILON_PATIENT_P99]


def test_non_private_trial_reports_no_patient_epsilon(tiny_site):  # noqa: F811
    final = run_tiny_trial(tiny_trial_config(tiny_site, float("inf"), epochs=1)).result.metrics
    assert M.EPSILON_PATIENT not in final
