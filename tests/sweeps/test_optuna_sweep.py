"""An Optuna-mode sweep on a real local Ray: every launched trial within its target, ASHA on, studies persisted."""

import math

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sweeps.launch import run_sweep
from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import OPTUNA_DB_FILE, ROLE_TAG, SWEEP_TAG
from trainables.privacy.accounting import epsilon_spent

pytestmark = pytest.mark.slow

TINY_OPTUNA = tiny_yaml(
    name="tiny-optuna",
    search="optuna",
    data={"external": ["synthetic-b"], "synthetic_images": 400, "input_mean": 0.5, "input_std": 0.25},
    privacy={
        "target_epsilon": [2, math.inf],
        "delta": 1.0e-5,
        "max_grad_norm": None,
        "expected_batch_size": None,
        "epochs": None,
    },
    training=None,
    optuna={
        "trials_per_target": 3,
        "max_concurrent": 2,
        "objectives": ["auroc", "auroc_gap_sex"],
        "noise_multiplier": [0.3, 3.0],
        "expected_batch_size": [16, 128],
        "epochs": [1, 2],
        "lr": [5.0e-4, 3.0e-3],
        "max_grad_norm": [0.5, 2.0],
    },
    early_stopping={"grace_period": 1, "reduction_factor": 2},
)


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory):
    with local_sweep(tmp_path_factory, TINY_OPTUNA, "tiny-optuna.yaml") as sweep:
        yield sweep


def test_every_launched_trial_meets_its_target(optuna_sweep):
    spec, _, trials = optuna_sweep
    assert len(trials) == 2 * 3
    assert trials["status"].isin(["TERMINATED", "STOPPED"]).all(), trials[["trial", "status", "error"]]
    private = trials[trials["target_epsilon"].map(math.isfinite).astype(bool)]
    assert len(private) == 3
    for row in private.itertuples():
        planned = epsilon_spent(row.noise_multiplier, row.sample_rate, row.steps, row.delta, "rdp")
        assert planned <= row.target_epsilon  # the proposal was feasible before it ran
        assert 0.3 <= row.noise_multiplier <= 3.0 and 0.5 <= row.max_grad_norm <= 2.0
    finished = private[private["status"] == "TERMINATED"]
    assert (finished[M.EPSILON] <= finished["target_epsilon"]).all()
    done = trials[trials["status"] == "TERMINATED"]
    assert done[M.TEST_AUROC_MACRO].notna().all()  # a final evaluation, not an early-stopped epoch report
    stopped = trials[trials["status"] == "STOPPED"]
    assert stopped[M.TEST_AUROC_MACRO].isna().all()
    # astype(bool): ASHA may stop no trial, and an empty mask of dtype object would select columns, not rows
    stopped_private = stopped[stopped["target_epsilon"].map(math.isfinite).astype(bool)]
    assert (stopped_private[M.EPSILON] <= stopped_private["target_epsilon"]).all()  # its last epoch's, spent
    assert {t.split("-t")[0] for t in trials["trial"]} == {"random-eps2", "random-epsinf"}


def test_studies_are_persisted_with_validation_objectives(optuna_sweep):
    spec, paths, trials = optuna_sweep
    storage = f"sqlite:///{paths.sweep_dir(spec) / OPTUNA_DB_FILE}"
    study = optuna.load_study(study_name="tiny-optuna/random-eps2", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    launched = [t for t in study.trials if "planned_epsilon" in t.user_attrs and not t.constraints]
    assert len(launched) == 3 and all(t.user_attrs["planned_epsilon"] <= 2 for t in launched)
    rejected = [t for t in study.trials if t.constraints]
    assert all(t.user_attrs["planned_epsilon"] > 2 for t in rejected)  # infeasible proposals: never trained
    auroc, gap = M.VAL_SELECTED_AUROC_MACRO, M.val_selected_auroc_gap("sex")
    done = trials[(trials["status"] == "TERMINATED") & trials["trial"].str.startswith("random-eps2")]
    by_number = {t.number: t for t in study.trials}
    for row in done.itertuples():
        told = by_number[int(row.optuna_trial)]
        expected = trials.loc[row.Index, [auroc, gap]].astype(float).tolist()
        if all(map(math.isfinite, expected)):
            assert told.state.name == "COMPLETE" and told.values == pytest.approx(expected)
        else:  # an undefined objective (too few validation images in a group): FAIL, ignored by the sampler
            assert told.state.name == "FAIL"
    assert any(t.state.name == "COMPLETE" and t.values is not None for t in launched)


def test_mlflow_has_one_child_per_trial_and_running_again_does_nothing(optuna_sweep, capsys):
    spec, paths, trials = optuna_sweep
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("tiny-optuna")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = 'tiny-optuna'")
    assert sum(r.data.tags[ROLE_TAG] == "trial" for r in runs) == len(trials)
    run_sweep(spec, paths)
    assert "is complete" in capsys.readouterr().out


def test_the_search_reports_bounds_that_hold_under_adaptive_selection(optuna_sweep):
    """Optuna picked each trial from earlier results: the parent run's tuning epsilon is the worst-case RDP
    composition over everything the cell could have trained, not the composition of the trials that ran."""
    from sweeps.summary import summary_text
    from sweeps.tuning_cost import tuning_cost
    from trainables.privacy.tuning import AdmissibleSet, adaptive_tuning_bound

    spec, paths, trials = optuna_sweep
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("tiny-optuna")
    parent = [
        r
        for r in client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = 'tiny-optuna'")
        if r.data.tags[ROLE_TAG] == "sweep"
    ][0]
    n_train = int(trials["n_train"].iloc[0])
    cell = AdmissibleSet(n_train, 2.0, 1e-5, noise_multiplier=(0.3, 3.0), expected_batch_size=(16, 128), epochs=(1, 2))
    bound = adaptive_tuning_bound([(cell, 3)])
    assert parent.data.metrics[M.TUNING_EPSILON] == pytest.approx(bound.epsilon)
    assert bound.epsilon >= tuning_cost(trials).epsilon  # the realized composition under-reports
    assert parent.data.metrics[M.TUNING_EPSILON_BASIC] == pytest.approx(3 * 2.0)  # 3 private trials, each <= 2
    text = " ".join(summary_text(trials, paths.sweep_dir(spec), paths.tracking_uri, spec).split())  # unwrapped
    assert "only bounds that hold under adaptive selection apply" in text and "is not such a bound" in text
