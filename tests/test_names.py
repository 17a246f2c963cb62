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


def test_budget_param_and_private_tag_spell_the_contract():
    assert (names.BUDGET_PARAM, names.PRIVATE_TAG) == ("budget", "dpsweep.private")
    assert [names.budget_value(e) for e in (1, 8.0, 0.5, 2.25, float("inf"))] == [
        "eps=1",
        "eps=8",
        "eps=0.5",
        "eps=2.25",
        "non-private",
    ]


def test_headlines_are_few_and_leave_the_detail_out():
    externals = [f"synthetic-{c}" for c in "bcdef"]  # the paper sweep's five external sets
    every = {*names.EPOCH_HEADLINES, *names.FINAL_HEADLINES, *(names.external_auroc(d) for d in externals)}
    assert all(names.is_headline(key) for key in every)
    assert len(every) == 40 <= names.MAX_HEADLINES
    for detail in (
        names.test_auroc("pneumonia"),
        names.auroc_ci("test", "pneumonia", "low"),
        names.subgroup_auroc("test", "age", "70-100"),
        names.fairness("test", "eod", "age"),
        names.fairness("test", "auroc_gap", "age", "pneumonia"),
        names.thresholded("test", "f1", "pneumonia"),
        names.n_images("test"),
        names.auroc_gap("external/synthetic-b", "age"),
        names.auroc("external/synthetic-b", "pneumonia"),
        names.bootstrap_replicates("test"),
        "external/synthetic-b/auroc_macro_ci_low",
    ):
        assert not names.is_headline(detail), detail
