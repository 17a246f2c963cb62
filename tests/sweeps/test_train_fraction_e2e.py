"""A tiny data-scale sweep end to end on a real local Ray: ``data.train_fraction: [0.25, 0.5, 1.0]`` on the synthetic
twin trains three trials on nested patient subsets of the planned sizes (each trial re-derives q and steps from the
subset it loaded and refuses to train on another N), and the report plots test AUROC against N_train."""

import numpy as np
import pandas as pd
import pytest

from analysis.report import SCALE_FIGURE, write_report
from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.data.cache import open_cache
from trainables.data.splits import public_subset_key, train_subset

pytestmark = pytest.mark.slow

FRACTIONS = [0.25, 0.5, 1.0]
SCALE = tiny_yaml(
    name="scale",
    data={"train_fraction": FRACTIONS},
    privacy={"target_epsilon": [4], "epochs": 1},
    evaluation={"n_boot": 0},
)


@pytest.fixture(scope="module")
def scale_sweep(tmp_path_factory):
    with local_sweep(tmp_path_factory, SCALE, "scale.yaml") as sweep:
        yield sweep


def test_three_fractions_train_on_nested_subsets_of_the_planned_sizes(scale_sweep):
    spec, paths, trials = scale_sweep
    assert len(trials) == 3 and (trials["status"] == "TERMINATED").all(), trials[["trial", "status", "error"]]
    trials = trials.assign(train_fraction=trials["train_fraction"].astype(float)).sort_values("train_fraction")
    assert trials["train_fraction"].tolist() == FRACTIONS
    assert trials["trial"].tolist() == [
        "random-eps4-clip1-lr0.002-seed0-frac0.25",
        "random-eps4-clip1-lr0.002-seed0-frac0.5",
        "random-eps4-clip1-lr0.002-seed0",
    ]
    train = open_cache(paths.data_root / "synthetic-a" / str(spec.data.image_size)).split("train")
    subsets = [train_subset(train.patient_id, public_subset_key("synthetic-a"), f) for f in FRACTIONS]
    assert (subsets[0] <= subsets[1]).all() and (subsets[1] <= subsets[2]).all() and subsets[2].all()
    sizes = [int(s.sum()) for s in subsets]
    assert sizes[0] < sizes[1] < sizes[2]
    assert trials["n_train"].astype(int).tolist() == sizes
    patients = [len(set(train.patient_id[s].tolist())) for s in subsets]
    assert trials["n_patients"].astype(int).tolist() == patients
    assert patients[0] < patients[1] < patients[2]
    batches = np.ceil(np.array(sizes) / spec.privacy.expected_batch_size)
    assert np.allclose(trials["sample_rate"].astype(float), 1 / batches)
    assert trials["steps"].astype(int).tolist() == batches.astype(int).tolist()  # one epoch
    assert (trials[M.EPSILON] <= 4).all() and (trials[M.EPSILON] >= 4 - spec.privacy.calibration_tolerance).all()
    assert trials[M.TEST_AUROC_MACRO].notna().all()


def test_the_report_plots_auroc_against_n_train(scale_sweep):
    spec, paths, trials = scale_sweep
    sweep_dir = paths.sweep_dir(spec)
    page = write_report(sweep_dir).read_text(encoding="utf-8")
    assert "Data scale: test AUROC and fairness against the number of training images" in page
    assert (sweep_dir / "report" / "figures" / f"{SCALE_FIGURE}.png").is_file()
    table = pd.read_csv(sweep_dir / "report" / "tables" / "utility_by_train_size.csv")
    assert sorted(table["n_train"].tolist()) == sorted(trials["n_train"].astype(int).tolist())
    assert table["bin"].unique().tolist() == ["(3, 10]"]


def test_the_mlflow_chart_view_plots_test_auroc_against_n_train(scale_sweep):
    from mlflow.tracking import MlflowClient

    from sweeps import mlflow_ui as ui

    _, paths, trials = scale_sweep
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("scale")
    _, state, _ = ui.read_envelope(experiment.tags[ui.SHARE_TAG_PREFIX + ui.CHARTS_VIEW])
    assert any(c["xaxis"] == {"key": "n_train", "type": "PARAM"} for c in state["compareRunCharts"] if "xaxis" in c)
    children = client.search_runs([experiment.experiment_id], ui.TRIALS_FILTER)
    logged = sorted((float(r.data.params["train_fraction"]), int(r.data.params["n_train"])) for r in children)
    assert logged == sorted(zip(trials["train_fraction"].astype(float), trials["n_train"].astype(int), strict=True))
