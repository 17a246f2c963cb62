"""Optuna search mode: the accountant rejects every proposal over its target before it is trained; the
studies persist and resume; objectives read validation numbers only."""

import dataclasses
import math

import pytest

from sweeps.schema import OptunaSpec
from sweeps.search import CONSTRAINT, FeasibleOptunaSearch, PrivateOptunaSearch, StudyCell, study_cells
from tests.sweeps.points import datasets, optuna_factory, tiny_optuna_spec
from trainables import names as M
from trainables.point import POINT, TrialPoint
from trainables.privacy.accounting import epsilon_spent, sample_rate_and_steps
from trainables.trial import DONE

N_TRAIN = 2000
DELTA = 1e-5
# Wide enough that many proposals spend more than epsilon 1 (small sigma, many epochs, big batches).
SETTINGS = OptunaSpec(
    trials_per_target=6,
    noise_multiplier=(0.3, 3.0),
    expected_batch_size=(16, 256),
    epochs=(1, 8),
    lr=(1e-4, 1e-2),
    max_grad_norm=(0.5, 2.0),
    seed=0,
    max_proposals=500,
)


def sweep(*targets: float, trials: int = 6, objectives: tuple[str, ...] = ("auroc",)):
    """The tiny Optuna sweep over ``targets`` with `SETTINGS` (``trials`` per cell, ``objectives``)."""
    optuna = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(SETTINGS).items()},
        "trials_per_target": trials,
        "objectives": list(objectives),
    }
    return tiny_optuna_spec(privacy={"target_epsilon": list(targets), "delta": DELTA}, optuna=optuna)


def cells(spec) -> list[StudyCell]:
    return study_cells(spec, datasets(spec, N_TRAIN))


def independent_epsilon(point: TrialPoint) -> float:
    p = point.config.privacy
    q, steps = sample_rate_and_steps(N_TRAIN, p.expected_batch_size, p.epochs)
    return epsilon_spent(p.noise_multiplier, q, steps, DELTA, "rdp")


def make_searcher(spec, storage_url=None):
    """The sweep's searcher over its cells, making trials with the sweep's real factory."""
    assert spec.optuna is not None
    return PrivateOptunaSearch(
        cells(spec), optuna_factory(spec, N_TRAIN), settings=spec.optuna, study_prefix="t", storage_url=storage_url
    )


def suggest(searcher, trial_id: str) -> TrialPoint:
    return TrialPoint.from_ray(searcher.suggest(trial_id)[POINT])


def finish(searcher, trial_id: str, auroc: float, gap: float = 0.1) -> None:
    searcher.on_trial_complete(
        trial_id,
        {
            DONE: True,
            M.BEST_EPOCH: 1,
            M.VAL_SELECTED_AUROC_MACRO: auroc,
            M.val_selected_auroc_gap("age"): gap,
            M.TEST_AUROC_MACRO: 0.99,
        },
    )


def test_every_launched_proposal_meets_its_target_and_infeasible_ones_are_told_to_optuna():
    searcher = make_searcher(sweep(1.0, trials=12))
    inner = searcher.searchers["random-eps1"]
    for i in range(12):
        point = suggest(searcher, f"t{i}")
        eps = independent_epsilon(point)
        assert eps <= 1.0, point  # checked with the accountant directly, not with the searcher's own number
        assert point.params["planned_epsilon"] == pytest.approx(eps)
        p = point.config.privacy
        assert (p.sample_rate, p.steps) == sample_rate_and_steps(N_TRAIN, p.expected_batch_size, p.epochs)
        assert point.key == f"random-eps1-t{point.params['optuna_trial']:03d}"
        finish(searcher, f"t{i}", auroc=0.5 + 0.01 * i)
    assert searcher.suggest("t-extra") == PrivateOptunaSearch.FINISHED
    assert searcher.infeasible > 0  # the range really does contain infeasible points
    study = inner._ot_study
    rejected = [t for t in study.trials if t.constraints.get(CONSTRAINT, 0) > 0]
    assert len(rejected) == searcher.infeasible
    assert all(t.user_attrs["planned_epsilon"] > 1.0 and t.state.name == "PRUNED" for t in rejected)
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(completed) == 12 and all(t.user_attrs["planned_epsilon"] <= 1.0 for t in completed)


def test_cells_are_served_round_robin_and_the_baseline_searches_no_noise():
    searcher = make_searcher(sweep(2.0, math.inf, trials=2))
    points = [suggest(searcher, f"t{i}") for i in range(4)]
    assert [p.key.rsplit("-t", 1)[0] for p in points] == ["random-eps2", "random-epsinf"] * 2
    baseline = points[1].config.privacy
    assert (baseline.noise_multiplier, baseline.max_grad_norm) == (0.0, 0.0)
    assert math.isinf(points[1].params["planned_epsilon"])


def test_objective_is_the_selected_epochs_validation_auroc_never_test():
    searcher = make_searcher(sweep(8.0, trials=1))
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {M.EPOCH: 1, M.VAL_AUROC_MACRO: 0.61, "training_iteration": 1})
    finish(searcher, "t0", auroc=0.7)
    trial = searcher.searchers["random-eps8"]._ot_study.trials[-1]
    assert trial.value == 0.7 and trial.intermediate_values == {1: 0.61}


def test_early_stopped_trial_is_told_its_last_validation_value():
    searcher = make_searcher(sweep(8.0, trials=1))
    searcher.suggest("t0")
    # Ray sets its `done` on the last report of a trial ASHA stops; that is not a final report (no best epoch).
    searcher.on_trial_complete("t0", {M.EPOCH: 1, M.VAL_AUROC_MACRO: 0.55, DONE: True})
    assert searcher.searchers["random-eps8"]._ot_study.trials[-1].value == 0.55


def test_two_objectives_make_a_multi_objective_study():
    searcher = make_searcher(sweep(8.0, trials=1, objectives=("auroc", "auroc_gap_age")))
    searcher.suggest("t0")
    finish(searcher, "t0", auroc=0.7, gap=0.2)
    study = searcher.searchers["random-eps8"]._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.trials[-1].values == [0.7, 0.2]


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = make_searcher(sweep(3.0, trials=4), storage_url=url)
    for i in range(2):
        first.suggest(f"t{i}")
        finish(first, f"t{i}", auroc=0.6)
    first.suggest("t2")  # running when the driver dies
    first.save(str(tmp_path / "searcher.pkl"))
    numbers_before = {t.number for t in first.searchers["random-eps3"]._ot_study.trials}

    resumed = make_searcher(sweep(3.0, trials=4), storage_url=url)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    finish(resumed, "t2", auroc=0.65)  # the running trial completes after the restart
    assert resumed.suggest("t3") is not None
    assert resumed.suggest("t4") == PrivateOptunaSearch.FINISHED  # 4 launched in all, none twice
    study = resumed.searchers["random-eps3"]._ot_study
    assert numbers_before <= {t.number for t in study.trials}
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3


def test_an_impossible_search_space_stops_with_the_fix():
    tight = dataclasses.replace(
        SETTINGS,
        noise_multiplier=(0.1, 0.2),
        expected_batch_size=(256, 512),
        epochs=(50, 60),
        lr=(1e-3,),
        max_grad_norm=(1.0,),
        max_proposals=5,
    )
    (cell,) = cells(sweep(0.5))
    searcher = FeasibleOptunaSearch(cell, tight, metric="objective/auroc", mode="max")
    with pytest.raises(
        RuntimeError,
        match=r"5 proposals in a row for random-eps0\.5 spend more than epsilon 0\.5; widen "
        r"optuna\.noise_multiplier upwards",
    ):
        searcher.propose("t0")


def test_a_patient_level_search_plans_every_proposal_over_the_patients():
    """The admissible set, the feasibility check and the trial all use N_patients (q and steps per patient)."""
    optuna = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(SETTINGS).items()}
    spec = tiny_optuna_spec(
        privacy={"target_epsilon": [1.0], "delta": DELTA, "privacy_unit": "patient", "max_images_per_patient": 3},
        training={"pos_weight": "train"},
        optuna={**optuna, "trials_per_target": 4},
    )
    (cell,) = cells(spec)
    n_patients = N_TRAIN // 2  # tests.sweeps.points.datasets
    assert (cell.privacy_unit, cell.n_records) == ("patient", n_patients)
    assert cell.privacy.max_images_per_patient == 3 and cell.privacy.label_count_noise_multiplier == 20.0
    searcher = make_searcher(spec)
    for i in range(4):
        point = suggest(searcher, f"t{i}")
        p = point.config.privacy
        assert (p.privacy_unit, p.max_images_per_patient, point.params["n_patients"]) == ("patient", 3, n_patients)
        q, steps = sample_rate_and_steps(n_patients, p.expected_batch_size, p.epochs)
        assert (p.sample_rate, p.steps) == (q, steps)
        eps = epsilon_spent(p.noise_multiplier, q, steps, DELTA, "rdp", label_count_noise_multiplier=20.0)
        assert eps <= 1.0 and point.params["planned_epsilon"] == pytest.approx(eps)
        finish(searcher, f"t{i}", auroc=0.6)
    assert searcher.infeasible > 0
