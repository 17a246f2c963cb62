"""One tiny end-to-end sweep on a real local Ray: plan, pretrain, trials, MLflow, tables, no duplicates."""

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sweeps.launch import run_sweep
from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import PARENT_TAG, ROLE_TAG, SWEEP_TAG

pytestmark = pytest.mark.slow

TINY = tiny_yaml(
    data={"external": ["synthetic-b"]},
    inits=["random", "domain"],
    pretrain={"dataset": "synthetic-source", "epochs": 1, "lr": 0.002, "batch_size": 128},
    evaluation={"n_boot": 20},
)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    with local_sweep(tmp_path_factory, TINY, "tiny.yaml") as sweep:
        yield sweep


def test_every_grid_point_finishes_within_its_budget(tiny_sweep):
    spec, _, trials = tiny_sweep
    assert len(trials) == len(spec.grid()) == 4
    assert (trials["status"] == "TERMINATED").all(), trials[["trial", "status", "error"]]
    private = trials[trials["target_epsilon"].map(math.isfinite)]
    assert len(private) == 2
    assert (private[M.EPSILON] <= private["target_epsilon"]).all()
    assert (private[M.EPSILON] >= private["target_epsilon"] - spec.privacy.calibration_tolerance).all()
    # the independent accountant agrees (RDP vs RDP) and PLD is no looser
    assert (abs(private[M.EPSILON_CROSS_CHECK_RDP] - private[M.EPSILON]) < 0.05 * private[M.EPSILON]).all()
    assert (private[M.EPSILON_CROSS_CHECK_PLD] <= private[M.EPSILON] + 1e-6).all()
    # every image-level private trial also states its guarantee for its largest training patient (k images)
    assert (private[M.PATIENT_IMAGES] >= 1).all()
    assert (private[M.EPSILON_PATIENT] >= private[M.EPSILON_CROSS_CHECK_PLD]).all()
    baseline = trials[~trials["target_epsilon"].map(math.isfinite)]
    assert baseline[M.EPSILON].map(math.isinf).all()
    for column in (
        M.TEST_AUROC_MACRO,
        M.auroc_gap("test", "age"),
        M.auroc_gap("test", "sex"),
        M.external_auroc("synthetic-b"),
        "noise_multiplier",
        "git_commit",
        "torch_version",
    ):
        assert trials[column].notna().all(), column


def test_epoch_table_has_an_increasing_epsilon_trajectory(tiny_sweep):
    _, paths, trials = tiny_sweep
    epochs = pd.read_parquet(paths.runs_root / "tiny" / "epochs.parquet")
    assert len(epochs) == len(trials) * 2
    for _, trajectory in epochs[epochs["target_epsilon"].map(math.isfinite)].groupby("trial"):
        eps = trajectory.sort_values("epoch")[M.EPSILON].to_numpy()
        assert (eps[1:] > eps[:-1]).all() and eps[-1] <= trajectory["target_epsilon"].iloc[0]


def test_mlflow_has_one_parent_and_one_finished_child_per_trial(tiny_sweep):
    _, paths, trials = tiny_sweep
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = 'tiny'")
    parents = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    children = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    assert len(parents) == 1 and len(children) == len(trials)
    assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    child = children[0]
    for param in (
        "init",
        "target_epsilon",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "delta",
        "accountant",
        "max_grad_norm",
        "lr",
        "seed",
        "model",
        "privacy_unit",
    ):
        assert param in child.data.params
    assert M.TEST_AUROC_MACRO in child.data.metrics
    assert len(client.get_metric_history(child.info.run_id, M.VAL_AUROC_MACRO)) == 2
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")}
    assert {"evaluation/groups.parquet", "evaluation/bootstrap.parquet", "evaluation/epochs.parquet"} <= artifacts
    assert set(trials["mlflow_run_id"]) == {r.info.run_id for r in children}


def test_running_again_duplicates_nothing(tiny_sweep, capsys):
    spec, paths, trials = tiny_sweep
    again = run_sweep(spec, paths)
    assert "is complete" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, trials)
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    assert len(client.search_runs([experiment.experiment_id])) == len(trials) + 1


def test_summary_states_the_privacy_cost_of_the_whole_search(tiny_sweep):
    from sweeps.results import tuning_cost

    _, paths, trials = tiny_sweep
    cost = tuning_cost(trials)
    private = trials[trials["target_epsilon"].map(math.isfinite)]
    assert cost.epsilon > private[M.EPSILON].max()  # two private trials composed cost more than either
    assert cost.n_non_private_excluded == 2 and "Private trials only" in cost.sentence
    client = MlflowClient(paths.tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")[
        0
    ]
    assert parent.data.metrics[M.TUNING_EPSILON] == pytest.approx(cost.epsilon)


def test_table_rebuild_from_ray_results_matches_the_sweep(tiny_sweep):
    from sweeps.results import rebuild_tables

    spec, paths, trials = tiny_sweep
    rebuilt, epochs, origin = rebuild_tables(spec, paths)
    assert origin.startswith("Ray results at")
    assert set(rebuilt["trial"]) == set(trials["trial"])
    merged = rebuilt.merge(trials, on="trial", suffixes=("", "_sweep"))
    assert (merged["status"] == "TERMINATED").all()
    assert (merged[M.TEST_AUROC_MACRO] == merged[M.TEST_AUROC_MACRO + "_sweep"]).all()
    assert (merged["mlflow_run_id"] == merged["mlflow_run_id_sweep"]).all()
    assert len(epochs) == len(trials) * 2
    assert not any(c.startswith("config/") for c in epochs.columns)
