"""Subgroup metrics from stored predictions: per-group AUROC equal to sklearn's on the same rows (rows chosen here
from the raw manifest, independently of the module), counts derived by hand, fairlearn's MetricFrame agreeing,
the trial's own gap definition reproduced, small groups and missing classes reported, never dropped."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis import subgroups
from analysis.subgroups import AUROC_MACRO, IN_GAP, N_IMAGES, NOTE, UNBINNED, GroupingError, group_gaps, group_metrics
from tests.analysis.fixtures import DATASET, EXTERNAL, fake_manifest, fake_predictions, make_sweep
from trainables import names
from trainables.data.labels import LABELS
from trainables.evaluate.fairness import subgroup_auroc_gaps

EDGES = (0, 40, 70, 100)
AGE_BINS = ("[0,40)", "[40,70)", "[70,100)")


def manifest_and_predictions(n_test: int = 600, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest with 50 train rows, then ``n_test`` test rows; scores = 0.4 * label + noise on the test rows."""
    rng = np.random.default_rng(seed)
    n = 50 + n_test
    manifest = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(n)],
            "patient_id": [f"p{k}" for k in range(n)],
            "split": ["train"] * 50 + ["test"] * n_test,
            "sex": rng.choice(["F", "M", "unknown"], size=n, p=[0.48, 0.48, 0.04]),
            "age": rng.uniform(18, 104, size=n).round(1),
            "view": rng.choice(["AP", "PA", "LL"], size=n),
            "site": "s1",
            "source_path": "x.png",
        }
    )
    manifest.loc[rng.choice(n, 12, replace=False), "age"] = np.nan
    for label in LABELS:
        manifest[label] = (rng.random(n) < 0.35).astype("int8")
    rows = np.arange(50, n)
    predictions = pd.DataFrame({"dataset": "d", "row": rows})
    for label in LABELS:
        predictions[names.prediction_score(label)] = (
            0.4 * manifest[label].to_numpy()[rows] + rng.random(len(rows))
        ).astype(np.float32)
    return manifest, predictions.sample(frac=1.0, random_state=1).reset_index(drop=True)  # row order must not matter


def reference_mask(manifest: pd.DataFrame, rows: np.ndarray, sex: str, age_bin: str) -> np.ndarray:
    """The prediction rows of one sex x age-bin group, from the manifest's raw values."""
    low, high = {"[0,40)": (0, 40), "[40,70)": (40, 70), "[70,100)": (70, 100)}[age_bin]
    age = manifest["age"].to_numpy()[rows]
    return (manifest["sex"].to_numpy()[rows] == sex) & (age >= low) & (age < high)


def test_group_auroc_equals_sklearn_on_the_same_rows_and_counts_by_hand():
    manifest, predictions = manifest_and_predictions()
    out = group_metrics(predictions, manifest, by=["sex", "age_bin"], age_edges=EDGES)
    rows = predictions["row"].to_numpy()
    assert len(out) == 3 * 4  # F, M, unknown x three bins and "no bin": every combination, none dropped
    assert out[N_IMAGES].sum() == len(predictions)
    for sex in ("F", "M"):
        for age_bin in AGE_BINS:
            mask = reference_mask(manifest, rows, sex, age_bin)
            row = out[(out["sex"] == sex) & (out["age_bin"] == age_bin)].iloc[0]
            assert row[N_IMAGES] == mask.sum() > 30
            per_label = []
            for label in LABELS:
                truth = manifest[label].to_numpy()[rows][mask]
                score = predictions[names.prediction_score(label)].to_numpy()[mask]
                assert row[f"positives/{label}"] == truth.sum()
                expected = roc_auc_score(truth, score)
                assert row[f"auroc/{label}"] == pytest.approx(expected, abs=1e-12)
                per_label.append(expected)
            assert row[AUROC_MACRO] == pytest.approx(np.mean(per_label), abs=1e-12)
            assert row[IN_GAP] and row[NOTE] == ""
    age = manifest["age"].to_numpy()[rows]
    unbinned = np.isnan(age) | (age >= 100)
    assert out.loc[out["age_bin"] == UNBINNED, N_IMAGES].sum() == unbinned.sum() > 0
    assert out.loc[out["sex"] == "unknown", N_IMAGES].sum() == (manifest["sex"].to_numpy()[rows] == "unknown").sum()
    assert not out.loc[(out["sex"] == "unknown") | (out["age_bin"] == UNBINNED), IN_GAP].any()
    assert out.loc[~out[IN_GAP], NOTE].str.contains("not in the gap").all()


def test_fairlearn_metricframe_gives_the_same_per_label_group_aurocs():
    fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
    manifest, predictions = manifest_and_predictions(seed=3)
    rows = predictions["row"].to_numpy()
    known = np.isin(manifest["sex"].to_numpy()[rows], ["F", "M"]) & (manifest["age"].to_numpy()[rows] < 100)
    predictions = predictions[known].reset_index(drop=True)
    rows = rows[known]
    out = group_metrics(predictions, manifest, by=["sex", "age_bin"], age_edges=EDGES)
    age_bin = pd.cut(manifest["age"].to_numpy()[rows], [0, 40, 70, 100], right=False, labels=list(AGE_BINS))
    for label in LABELS:
        frame = fairlearn_metrics.MetricFrame(
            metrics=roc_auc_score,
            y_true=manifest[label].to_numpy()[rows],
            y_pred=predictions[names.prediction_score(label)].to_numpy(),
            sensitive_features=pd.DataFrame({"sex": manifest["sex"].to_numpy()[rows], "age_bin": age_bin}),
        )
        for (sex, group), value in frame.by_group.items():
            ours = out.loc[(out["sex"] == sex) & (out["age_bin"] == group), f"auroc/{label}"].iloc[0]
            assert ours == pytest.approx(value, abs=1e-12), (label, sex, group)


def test_one_attribute_reproduces_the_trials_own_gap_definition():
    manifest, predictions = manifest_and_predictions(seed=5)
    rows = predictions["row"].to_numpy()
    y_true = manifest[list(LABELS)].to_numpy()[rows]
    y_score = predictions[[names.prediction_score(label) for label in LABELS]].to_numpy()
    logged = subgroup_auroc_gaps(
        y_true, y_score, manifest["sex"].to_numpy()[rows], manifest["age"].to_numpy()[rows], EDGES
    )
    for attribute, by in (("sex", "sex"), ("age", "age_bin")):
        gaps = group_gaps(group_metrics(predictions, manifest, by=[by], age_edges=EDGES), [by])
        assert gaps["auroc_gap"].iloc[0] == pytest.approx(logged[attribute], abs=1e-12), attribute


def test_small_groups_and_missing_classes_are_reported_not_dropped():
    manifest, predictions = manifest_and_predictions(n_test=60, seed=2)
    rows = predictions["row"].to_numpy()
    # One image of M aged 20 with no positive label at all; nobody else M under 40.
    young_m = (manifest["sex"].to_numpy()[rows] == "M") & (manifest["age"].to_numpy()[rows] < 40)
    manifest.loc[rows[young_m], "age"] = 50.0
    manifest.loc[rows[0], ["sex", "age"]] = ["M", 20.0]
    manifest.loc[rows[0], list(LABELS)] = 0
    out = group_metrics(predictions, manifest, by=["sex", "age_bin"], age_edges=EDGES, min_images=5)
    single = out[(out["sex"] == "M") & (out["age_bin"] == "[0,40)")].iloc[0]
    assert single[N_IMAGES] == 1 and math.isnan(single[AUROC_MACRO]) and single[subgroups.LABELS_DEFINED] == 0
    assert "no label has both classes" in single[NOTE] and "fewer than 5 images" in single[NOTE]
    manifest.loc[rows[0], "sex"] = "F"  # now no image at all in M x [0,40): still a row, with 0 images
    empty = group_metrics(predictions, manifest, by=["sex", "age_bin"], age_edges=EDGES)
    row = empty[(empty["sex"] == "M") & (empty["age_bin"] == "[0,40)")].iloc[0]
    assert row[N_IMAGES] == 0 and math.isnan(row[AUROC_MACRO]) and row[NOTE] == "no images"
    gaps = group_gaps(empty)
    assert gaps["groups_in_gap"].iloc[0] == 6 and gaps["groups_defined"].iloc[0] == 5
    assert "1 group(s) without a defined macro AUROC" in gaps[NOTE].iloc[0]


def test_any_manifest_column_groups_and_missing_values_show():
    manifest, predictions = manifest_and_predictions(seed=4)
    manifest.loc[predictions["row"].iloc[:7], "view"] = None
    out = group_metrics(predictions, manifest, by=["view"])
    views = manifest["view"].to_numpy(dtype=object)[predictions["row"].to_numpy()]
    assert list(out["view"]) == ["AP", "LL", "PA", subgroups.MISSING]
    expected = [int((views == v).sum()) for v in ("AP", "LL", "PA")] + [7]
    assert out[N_IMAGES].tolist() == expected
    assert out[IN_GAP].tolist() == [True, True, True, False]


def test_trials_and_datasets_are_blocks_with_a_manifest_each(tmp_path):
    trials = ("t1", "t2")
    predictions = pd.concat([fake_predictions(t).assign(trial=t) for t in trials], ignore_index=True)
    manifests = {DATASET: fake_manifest(DATASET), EXTERNAL: fake_manifest(EXTERNAL)}
    out = group_metrics(predictions, manifests, by=["sex"])
    assert list(out.columns[:3]) == ["trial", "dataset", "sex"]
    assert out.groupby(["trial", "dataset"]).size().tolist() == [3, 3, 3, 3]  # F, M, unknown per block
    totals = out.groupby(["trial", "dataset"])[N_IMAGES].sum()
    assert totals.loc[("t1", DATASET)] == 100 and totals.loc[("t2", EXTERNAL)] == 80
    assert len(group_gaps(out, ["sex"])) == 4


def test_report_helpers_find_the_manifests_and_age_edges(tmp_path):
    sweep_dir = make_sweep(tmp_path / "runs")
    trials = pd.read_parquet(sweep_dir / names.TRIALS_FILE)
    manifests = subgroups.load_manifests(trials, [DATASET, EXTERNAL])
    assert len(manifests[DATASET]) == 160 and len(manifests[EXTERNAL]) == 140
    assert subgroups.trial_age_edges(trials, "random-eps1") == (0.0, 40.0, 70.0, 100.0)
    as_text = trials.assign(age_edges="[0, 50, 120]")  # tables read back from MLflow params
    assert subgroups.trial_age_edges(as_text, "random-eps1") == (0.0, 50.0, 120.0)
    assert subgroups.trial_age_edges(trials.drop(columns="age_edges"), "random-eps1") == (0, 40, 70, 100)
    with pytest.raises(GroupingError, match="not found at .*--data-root"):
        subgroups.load_manifests(trials, [DATASET], data_root=tmp_path / "elsewhere")


def test_bad_inputs_are_named():
    manifest, predictions = manifest_and_predictions(n_test=40)
    with pytest.raises(GroupingError, match="'veiw' is not a manifest column.*did you mean 'view'"):
        group_metrics(predictions, manifest, by=["veiw"])
    with pytest.raises(GroupingError, match="'patient_id' is not allowed.*identifier"):
        group_metrics(predictions, manifest, by=["patient_id"])
    with pytest.raises(GroupingError, match="row 3 is a 'train' image"):
        group_metrics(pd.concat([predictions, predictions.iloc[:1].assign(row=3)]), manifest, by=["sex"])
    with pytest.raises(GroupingError, match="row 9999 is not a row of the manifest"):
        group_metrics(predictions.assign(row=9999), manifest, by=["sex"])
    with pytest.raises(GroupingError, match="missing column"):
        group_metrics(predictions.drop(columns=names.prediction_score(LABELS[0])), manifest)
