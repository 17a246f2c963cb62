"""`search: proxy` with ``proxy.top_k`` above 1: phase 2 is a private selection (Papernot & Steinke) among each cell's
top k proxy candidates: a secret K, candidates drawn from the top k, only the best released, and the cell's
tuning-inclusive epsilon (at most its target) is what the ledger records."""

from __future__ import annotations

import json

import pytest
import yaml

from sweeps.plan import SweepPaths, plan_sweep
from sweeps.proxy import PHASE_PARAM, draw_from_top_k, rank_candidates
from sweeps.spec import parse_spec
from tests.sweeps.tiny import tiny_spec
from trainables import names as N

PROXY_K2 = tiny_spec(
    name="tiny-proxy-k2",
    search="proxy",
    proxy={"dataset": "synthetic-source", "batch_size": 16, "top_k": 2},
    selection={"distribution": "geometric", "mean_trials": 2},
    privacy={"target_epsilon": [2], "epochs": 1},
    training={"lr": [0.004, 0.002, 0.0002]},
)
"""One cell (random, epsilon 2), three lrs tuned on synthetic-source; a selection among the top 2."""
K = 3


def test_top_k_calibrates_each_cell_to_its_target_and_draws_only_from_the_top_k(tmp_path):
    import numpy as np

    import sweeps.selection

    spec = parse_spec(yaml.safe_load(yaml.safe_dump(PROXY_K2)), source="tiny-proxy-k2.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    plan = plan_sweep(spec, paths, dry_run=True, log=lambda _: None)
    (cell,) = plan.proxy.selections.values()
    assert cell.plan.epsilon <= 2 and cell.plan.single_run_epsilon < cell.plan.epsilon
    single = cell.plan.candidates[(64, 1)]
    for candidate in plan.proxy.candidates:  # phase 1 simulates the selection's candidate plan
        assert candidate.reference.noise_multiplier == single.noise_multiplier
        assert candidate.trial.config.privacy.noise_multiplier == single.noise_multiplier * 16 / 64
    keys = [c.key for c in plan.proxy.candidates]
    ranked = rank_candidates(plan.proxy, {keys[0]: 0.5, keys[1]: 0.9, keys[2]: 0.7})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweeps.selection, "draw_trial_count", lambda count, rng: 50)
        drawn = draw_from_top_k(plan.proxy, ranked, np.random.default_rng(0))
    assert len(drawn) == 50 and {c.lr for c in drawn} == {0.002, 0.0002}  # the top 2, never the third


@pytest.fixture(scope="module")
def proxy_k2_sweep(tmp_path_factory):
    import sweeps.selection
    from tests.sweeps.local_sweep import local_sweep

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweeps.selection, "draw_trial_count", lambda count, rng: K)
        with local_sweep(tmp_path_factory, yaml.safe_dump(PROXY_K2), "tiny-proxy-k2.yaml") as found:
            yield found


@pytest.mark.slow
def test_top_k_releases_each_cells_best_candidate_at_its_tuning_inclusive_epsilon(proxy_k2_sweep):
    from sweeps.results import experiment_records
    from trainables.data.ledger import read_ledger
    from trainables.privacy.ledger import compose_ledger

    spec, paths, trials = proxy_k2_sweep
    records = experiment_records(paths.ray_experiment(spec))
    proxies = {r.key: r for r in records if r.params.get(PHASE_PARAM) == "proxy"}
    candidates = {r.key: r for r in records if r.params.get(PHASE_PARAM) == "private"}
    assert len(proxies) == 3 and len(candidates) == K
    top2 = sorted(proxies.values(), key=lambda r: -r.final[N.VAL_SELECTED_AUROC_MACRO])[:2]
    assert {r.params["lr"] for r in candidates.values()} <= {r.params["lr"] for r in top2}
    best = max(candidates, key=lambda k: candidates[k].final[N.VAL_SELECTED_AUROC_MACRO])
    private = trials[trials[PHASE_PARAM] == "private"]
    assert list(private["trial"]) == [best]  # only the winner is tabled; the other candidates stay in the Ray folder
    assert len(trials) == 3 + 1
    selection = json.loads((paths.sweep_dir(spec) / N.SELECTION_FILE).read_text())
    (cell,) = selection["cells"]
    assert cell["winner"] == best and cell["epsilon"] <= 2
    ledger = read_ledger(paths.data_root, "synthetic-a")
    assert {entry.trial for entry in ledger} == {"random-eps2"}  # the cell's selection, never its K candidates
    total = compose_ledger(ledger)
    assert total.epsilon_rdp == pytest.approx(cell["epsilon"], rel=0.02) and total.epsilon_rdp <= 2 + 1e-9
