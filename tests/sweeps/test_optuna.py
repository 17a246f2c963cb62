"""Optuna search mode: the accountant rejects every proposal over its target before it is trained; the
studies persist and resume; objectives read validation numbers only."""

import math

import pytest

from sweeps.search import CONSTRAINT, Cell, FeasibleOptunaSearch, PrivateOptunaSearch, Ranges
from trainables import names as M
from trainables.config import PrivacyConfig
from trainables.privacy.accounting import epsilon_spent, sample_rate_and_steps
from trainables.trial import DONE

N_TRAIN = 2000
DELTA = 1e-5
# Wide enough that many proposals spend more than epsilon 1 (small sigma, many epochs, big batches).
RANGES = Ranges(
    noise_multiplier=(0.3, 3.0), expected_batch_size=(16, 256), epochs=(1, 8), lr=(1e-4, 1e-2), max_grad_norm=(0.5, 2.0)
)


def cell(eps: float, key: str | None = None) -> Cell:
    privacy = PrivacyConfig(target_epsilon=eps, delta=DELTA)
    return Cell(key or f"random-eps{eps:g}", "test_convnext", "synthetic-a", "random", eps, N_TRAIN, privacy)


def independent_epsilon(proposal: dict) -> float:
    q, steps = sample_rate_and_steps(N_TRAIN, int(proposal["expected_batch_size"]), int(proposal["epochs"]))
    return epsilon_spent(proposal["noise_multiplier"], q, steps, DELTA, "rdp")


def point_of(c: Cell, proposal: dict) -> dict:  # module level: Ray pickles the searcher
    return {"point": {"cell": c.key, **proposal}}


def make_searcher(cells, storage_url=None, trials=6, objectives=("auroc",)):
    return PrivateOptunaSearch(
        cells,
        point_of,
        ranges=RANGES,
        objectives=objectives,
        trials_per_cell=trials,
        sampler="tpe",
        seed=0,
        max_proposals=500,
        study_prefix="t",
        storage_url=storage_url,
    )


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
    searcher = make_searcher([cell(1.0)], trials=12)
    inner = searcher.searchers["random-eps1"]
    for i in range(12):
        point = searcher.suggest(f"t{i}")["point"]
        eps = independent_epsilon(point)
        assert eps <= 1.0, point  # checked with the accountant directly, not with the searcher's own number
        assert point["planned_epsilon"] == pytest.approx(eps)
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
    searcher = make_searcher([cell(2.0, "a"), cell(math.inf, "b")], trials=2)
    points = [searcher.suggest(f"t{i}")["point"] for i in range(4)]
    assert [p["cell"] for p in points] == ["a", "b", "a", "b"]
    assert "noise_multiplier" not in points[1] and math.isinf(points[1]["planned_epsilon"])


def test_objective_is_the_selected_epochs_validation_auroc_never_test():
    searcher = make_searcher([cell(8.0)], trials=1)
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {M.EPOCH: 1, M.VAL_AUROC_MACRO: 0.61, "training_iteration": 1})
    finish(searcher, "t0", auroc=0.7)
    trial = searcher.searchers["random-eps8"]._ot_study.trials[-1]
    assert trial.value == 0.7 and trial.intermediate_values == {1: 0.61}


def test_early_stopped_trial_is_told_its_last_validation_value():
    searcher = make_searcher([cell(8.0)], trials=1)
    searcher.suggest("t0")
    # Ray sets its `done` on the last report of a trial ASHA stops; that is not a final report (no best epoch).
    searcher.on_trial_complete("t0", {M.EPOCH: 1, M.VAL_AUROC_MACRO: 0.55, DONE: True})
    assert searcher.searchers["random-eps8"]._ot_study.trials[-1].value == 0.55


def test_two_objectives_make_a_multi_objective_study():
    searcher = make_searcher([cell(8.0)], trials=1, objectives=("auroc", "auroc_gap_age"))
    searcher.suggest("t0")
    finish(searcher, "t0", auroc=0.7, gap=0.2)
    study = searcher.searchers["random-eps8"]._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.trials[-1].values == [0.7, 0.2]


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = make_searcher([cell(3.0)], storage_url=url, trials=4)
    for i in range(2):
        first.suggest(f"t{i}")
        finish(first, f"t{i}", auroc=0.6)
    first.suggest("t2")  # running when the driver dies
    first.save(str(tmp_path / "searcher.pkl"))
    numbers_before = {t.number for t in first.searchers["random-eps3"]._ot_study.trials}

    resumed = make_searcher([cell(3.0)], storage_url=url, trials=4)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    finish(resumed, "t2", auroc=0.65)  # the running trial completes after the restart
    assert resumed.suggest("t3") is not None
    assert resumed.suggest("t4") == PrivateOptunaSearch.FINISHED  # 4 launched in all, none twice
    study = resumed.searchers["random-eps3"]._ot_study
    assert numbers_before <= {t.number for t in study.trials}
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3


def test_an_impossible_search_space_stops_with_the_fix():
    tight = Ranges(
        noise_multiplier=(0.1, 0.2), expected_batch_size=(256, 512), epochs=(50, 60), lr=(1e-3,), max_grad_norm=(1.0,)
    )
    searcher = FeasibleOptunaSearch(cell(0.5), tight, max_proposals=5, metric="objective/auroc", mode="max")
    with pytest.raises(
        RuntimeError,
        match=r"5 proposals in a row .* spend more than epsilon 0\.5; widen "
        r"optuna\.noise_multiplier upwards",
    ):
        searcher.suggest("t0")
