"""Metric-key builders: shared keys come from `trainables.metrics`, unknown families are refused."""

from __future__ import annotations

import pytest

from trainables import metrics
from trainables.evaluate import names


def test_keys_shared_with_trainables_metrics():
    assert names.subgroup_auroc("test", "age", "70-100") == metrics.subgroup_auroc("test", "age", "70-100")
    assert names.fairness("test", "auroc_gap", "sex") == metrics.auroc_gap("test", "sex")
    assert names.auroc("test", "pneumonia") == metrics.test_auroc("pneumonia")
    assert names.auroc("val", "pneumonia") == "val/auroc/pneumonia"


def test_key_spellings():
    assert names.fairness("test", "eod", "age") == "test/fairness/eod/age"
    assert names.fairness("test", "eod", "age", "cardiomegaly") == "test/fairness/eod/age/cardiomegaly"
    assert names.auroc_macro_ci("test", "low") == "test/auroc_macro_ci_low"
    assert names.auroc_ci("test", "atelectasis", "high") == "test/auroc_ci_high/atelectasis"
    assert names.thresholded("test", "ppv", "no_finding") == "test/ppv/no_finding"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: names.fairness("test", "disparate_impact", "sex"), "unknown fairness metric"),
        (lambda: names.thresholded("test", "recall", "pneumonia"), "unknown thresholded metric"),
        (lambda: names.auroc_macro_ci("test", "upper"), "unknown CI bound"),
    ],
)
def test_unknown_families_are_refused_with_the_valid_ones(build, message):
    with pytest.raises(KeyError, match=message):
        build()
