"""The schema module: key spellings, shared keys agree, unknown families are refused."""

from __future__ import annotations

import pytest

from trainables import names


def test_shared_keys_agree():
    assert names.fairness("test", "auroc_gap", "sex") == names.auroc_gap("test", "sex") == "test/fairness/auroc_gap/sex"
    assert names.auroc("test", "pneumonia") == names.test_auroc("pneumonia") == "test/auroc/pneumonia"
    assert names.auroc("val", "pneumonia") == "val/auroc/pneumonia"
    assert names.external_auroc("synthetic-b") == names.auroc_macro("external/synthetic-b")
    assert names.subgroup_auroc("test", "age", "70-100") == "test/subgroup_auroc/age/70-100"


def test_key_spellings():
    assert names.fairness("test", "eod", "age") == "test/fairness/eod/age"
    assert names.fairness("test", "eod", "age", "cardiomegaly") == "test/fairness/eod/age/cardiomegaly"
    assert names.auroc_macro_ci("test", "low") == "test/auroc_macro_ci_low"
    assert names.auroc_ci("test", "atelectasis", "high") == "test/auroc_ci_high/atelectasis"
    assert names.thresholded("test", "ppv", "no_finding") == "test/ppv/no_finding"


def test_dataset_dir_is_root_name_size(tmp_path):
    assert names.dataset_dir(tmp_path, "synthetic-a", 64) == tmp_path / "synthetic-a" / "64"
    assert names.dataset_dir(str(tmp_path), "chexpert", 224) == tmp_path / "chexpert" / "224"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: names.fairness("test", "disparate_impact", "sex"), "unknown fairness metric"),
        (lambda: names.thresholded("test", "recall", "pneumonia"), "unknown thresholded metric"),
        (lambda: names.auroc_macro_ci("test", "upper"), "unknown CI bound"),
        (lambda: names.test_auroc("fracture"), "unknown label"),
    ],
)
def test_unknown_names_are_refused_with_the_valid_ones(build, message):
    with pytest.raises(KeyError, match=message):
        build()
