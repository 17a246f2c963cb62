"""`evaluate_split`: keys tied to `trainables.names`, values tied to the parts, no identifiers out."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from trainables import names
from trainables.data.labels import LABELS
from trainables.evaluate.bootstrap import paired_p_value
from trainables.evaluate.fairness import age_grouping, attribute_fairness, sex_grouping
from trainables.evaluate.report import evaluate_split, fit_thresholds
from trainables.evaluate.utility import auroc_per_label, thresholded_metrics, youden_thresholds

# MLflow's rule for metric names (mlflow.utils.validation._VALID_PARAM_AND_METRIC_NAMES, POSIX);
# copied because importing mlflow takes seconds.
MLFLOW_METRIC_NAME = re.compile(r"^[/\w.\- :]*$")


def _split(n: int, seed: int, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.25).astype(np.int8)
    true_age = rng.uniform(18, 105, n)
    score = signal * y * (1.3 - true_age[:, None] / 100) + rng.normal(size=y.shape)
    age = np.where(rng.random(n) < 0.05, np.nan, true_age)  # some ages missing from the records
    sex = rng.choice(np.array(["F", "M", "unknown"]), n, p=[0.45, 0.45, 0.1])
    return y, score, sex, age


@pytest.fixture(scope="module")
def evaluation():
    y_val, score_val, _, _ = _split(500, seed=0)
    y, score, sex, age = _split(800, seed=1)
    thresholds = fit_thresholds(y_val, score_val)
    return evaluate_split(y, score, sex=sex, age=age, thresholds=thresholds, n_boot=100, boot_seed=3)


def test_keys_use_the_shared_metric_names(evaluation):
    keys = evaluation.metrics
    assert names.TEST_AUROC_MACRO in keys
    for label in LABELS:
        assert names.test_auroc(label) in keys
        assert names.auroc("test", label) == names.test_auroc(label)
    assert names.auroc_macro("test") == names.TEST_AUROC_MACRO
    assert names.auroc_macro("val") == names.VAL_AUROC_MACRO
    assert names.auroc_macro("external/synthetic-b") == names.external_auroc("synthetic-b")
    for attribute, groups in (("sex", ("F", "M")), ("age", ("0-40", "40-70", "70-100"))):
        assert names.auroc_gap("test", attribute) in keys
        for group in groups:
            assert names.subgroup_auroc("test", attribute, group) in keys
    assert "test/auroc_macro_ci_low" in keys and "test/auroc_macro_ci_high" in keys
    assert "test/fairness/eod/age" in keys and "test/fairness/eod/age/cardiomegaly" in keys
    assert "test/sensitivity/pneumonia" in keys


def test_every_key_is_a_valid_mlflow_metric_and_every_value_a_float(evaluation):
    assert len(evaluation.metrics) > 100
    for key, value in evaluation.metrics.items():
        assert MLFLOW_METRIC_NAME.match(key), key
        assert key.startswith("test/")
        assert type(value) is float, (key, type(value))


def test_values_match_the_underlying_functions():
    y_val, score_val, _, _ = _split(500, seed=0)
    y, score, sex, age = _split(800, seed=1)
    thresholds = fit_thresholds(y_val, score_val)
    np.testing.assert_array_equal(thresholds, youden_thresholds(y_val, score_val))
    result = evaluate_split(y, score, sex=sex, age=age, thresholds=thresholds, n_boot=50, prefix="external/b")
    m = result.metrics
    per_label = auroc_per_label(y, score)
    assert m["external/b/auroc_macro"] == pytest.approx(per_label.mean())
    rates = thresholded_metrics(y, score, thresholds)
    for j, label in enumerate(LABELS):
        assert m[f"external/b/auroc/{label}"] == per_label[j]
        assert m[f"external/b/threshold/{label}"] == thresholds[j]
        assert m[f"external/b/sensitivity/{label}"] == rates.sensitivity[j]
        assert m[f"external/b/f1/{label}"] == rates.f1[j]
    age_result = attribute_fairness(y, score, thresholds, age_grouping(age), LABELS)
    assert m["external/b/fairness/auroc_gap/age"] == age_result.macro_auroc_gap
    assert m["external/b/fairness/auroc_gap_label_mean/age"] == age_result.label_mean["auroc_gap"]
    assert m["external/b/fairness/eod/age"] == age_result.label_mean["eod"]
    assert m["external/b/fairness/eod/age/atelectasis"] == age_result.per_label.at["atelectasis", "eod"]
    assert m["external/b/subgroup_auroc/age/70-100"] == age_result.group_macro_auroc["[70,100)"]
    assert m["external/b/fairness/worst_group_auroc/age"] == age_result.worst_group_auroc
    assert result.worst_groups["age"] == age_result.worst_group
    sex_result = attribute_fairness(y, score, thresholds, sex_grouping(sex), LABELS)
    assert m["external/b/fairness/excluded_images/sex"] == (sex == "unknown").sum()
    assert m["external/b/fairness/excluded_images/age"] == np.isnan(age).sum() + (age >= 100).sum()
    assert m["external/b/fairness/skipped_groups/sex"] == sex_result.n_skipped
    low, high = m["external/b/auroc_macro_ci_low"], m["external/b/auroc_macro_ci_high"]
    assert low < m["external/b/auroc_macro"] < high
    assert not result.thresholds_fitted_here


def test_thresholds_default_to_youden_on_the_split_itself():
    y, score, sex, age = _split(300, seed=2)
    result = evaluate_split(y, score, sex=sex, age=age, n_boot=0, prefix="val")
    assert result.thresholds_fitted_here
    np.testing.assert_array_equal(result.thresholds, youden_thresholds(y, score))


def test_n_boot_zero_skips_the_bootstrap():
    y, score, sex, age = _split(300, seed=2)
    result = evaluate_split(y, score, sex=sex, age=age, n_boot=0)
    assert not any("_ci_" in key or "/bootstrap/" in key for key in result.metrics)
    assert result.bootstrap.empty and list(result.bootstrap.columns) == ["auroc_macro", *LABELS]


def test_tables_carry_no_identifiers_and_are_compact(evaluation):
    groups = evaluation.groups
    assert list(groups.columns) == [
        "attribute", "group", "group_key", "label", "n", "n_pos", "n_neg", "measurable", "auroc",
        "tp", "fp", "tn", "fn", "tpr", "fpr", "ppv", "selection_rate", "accuracy",
    ]  # fmt: skip
    assert len(groups) == (2 + 3) * len(LABELS)
    assert set(groups["attribute"]) == {"sex", "age"}
    boot = evaluation.bootstrap
    assert list(boot.columns) == ["auroc_macro", *LABELS] and len(boot) == 100
    assert (boot.dtypes == np.float32).all()
    assert boot.attrs == {"n_images": 800, "n_boot": 100, "boot_seed": 3}


def test_two_trials_with_the_same_seed_are_paired():
    y, strong, sex, age = _split(800, seed=1, signal=1.5)
    weak = strong + np.random.default_rng(9).normal(scale=3.0, size=strong.shape)
    kwargs = {"sex": sex, "age": age, "n_boot": 200, "boot_seed": 5}
    first, second = evaluate_split(y, strong, **kwargs), evaluate_split(y, weak, **kwargs)
    assert paired_p_value(first.bootstrap["auroc_macro"], second.bootstrap["auroc_macro"]) == 0.0
    assert paired_p_value(second.bootstrap["auroc_macro"], first.bootstrap["auroc_macro"]) == 1.0


def test_works_for_other_label_sets():
    y, score, sex, age = _split(300, seed=4)
    result = evaluate_split(y[:, :2], score[:, :2], sex=sex, age=age, n_boot=20, labels=("a", "b"))
    assert "test/auroc/a" in result.metrics and "test/fairness/spd/sex/b" in result.metrics


def test_evaluation_is_frozen(evaluation):
    with pytest.raises(dataclasses.FrozenInstanceError):
        evaluation.metrics = {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": ("a", "b")}, "2 label names"),
        ({"sex": ["F"] * 10}, "10 attribute values for 300 images"),
        ({"thresholds": [0.5]}, r"one value per label, shape \(5,\)"),
        ({"n_boot": -1}, "n_boot must be an integer >= 0"),
        ({"age_edges": (40, 0)}, "age_edges must be"),
    ],
)
def test_user_errors_are_named(change, message):
    y, score, sex, age = _split(300, seed=2)
    kwargs = {"sex": sex, "age": age, "n_boot": 0} | change
    with pytest.raises(ValueError, match=message):
        evaluate_split(y, score, **kwargs)


def test_groups_table_round_trips_through_parquet(tmp_path, evaluation):
    evaluation.groups.to_parquet(tmp_path / "groups.parquet")
    evaluation.bootstrap.to_parquet(tmp_path / "bootstrap.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "groups.parquet"), evaluation.groups)
    assert pd.read_parquet(tmp_path / "bootstrap.parquet").dtypes.eq(np.float32).all()


def test_package_imports_no_torch_ray_or_mlflow():
    code = "import sys, trainables.evaluate; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
