"""`search: proxy`: phase 1 simulates each grid point's private run on public data with TAN scaling (sigma_sim =
sigma_ref x B_sim / B_ref, the same steps), phase 2 trains each cell's best candidate once on the private data, and
only phase 2 reaches the privacy ledger."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import yaml

from sweeps.plan import SweepPaths, plan_sweep
from sweeps.proxy import PHASE_PARAM, PHASE_TAG, PROXY_FILE, rank_candidates, tan_privacy
from sweeps.spec import parse_spec
from tests.sweeps.tiny import tiny_spec
from trainables import names as N
from trainables.config import ConfigError, PrivacyConfig
from trainables.data.synthetic import sample_cohort
from trainables.privacy.accounting import epsilon_spent

PROXY = tiny_spec(
    name="tiny-proxy",
    search="proxy",
    proxy={"dataset": "synthetic-source", "batch_size": 16},
    privacy={"target_epsilon": [2], "epochs": 1},
    training={"lr": [0.002, 0.0002]},
)
"""One cell (random, epsilon 2) of test_convnext on 600 synthetic 32 px images, two lrs tuned on synthetic-source."""


def proxy_plan(tmp_path, **overrides):
    spec = parse_spec(yaml.safe_load(yaml.safe_dump({**PROXY, **overrides})), source="tiny-proxy.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    return spec, plan_sweep(spec, paths, dry_run=True, log=lambda _: None)


def test_tan_scales_sigma_by_the_batch_ratio_at_the_same_steps():
    reference = PrivacyConfig(
        target_epsilon=2, expected_batch_size=64, epochs=3, noise_multiplier=1.25, sample_rate=1 / 7, steps=21
    )
    simulated = tan_privacy(reference, 16, 500)
    assert simulated.noise_multiplier == 1.25 * 16 / 64
    assert simulated.sample_rate == 16 / 500
    assert (simulated.steps, simulated.epochs, simulated.expected_batch_size) == (21, 3, 16)
    # the noise on the averaged gradient (sigma x C / B, the engine's division by the expected batch) is unchanged
    assert simulated.noise_multiplier / simulated.expected_batch_size == reference.noise_multiplier / 64
    with pytest.raises(ValueError, match="B_sim = 600"):
        tan_privacy(reference, 600, 500)


def test_phase_one_plans_each_grid_point_on_the_public_set_and_nothing_in_the_grid_trials(tmp_path):
    spec, plan = proxy_plan(tmp_path)
    assert plan.trials == []  # nothing the ledger would record before phase 2
    n_public = int((sample_cohort("synthetic-source", 600)[0]["split"] == "train").sum())
    reference = plan.privacy_plans[("synthetic-a", 2.0, "image")]
    assert reference.expected_batch_size == 64 and reference.noise_multiplier > 0
    candidates = plan.proxy.candidates
    assert [c.point.lr for c in candidates] == [0.002, 0.0002]
    for candidate in candidates:
        trial = candidate.trial
        p = trial.config.privacy
        assert trial.config.proxy and trial.config.dataset == "synthetic-source"
        assert trial.config.external_datasets == ()
        assert p.noise_multiplier == reference.noise_multiplier * 16 / 64
        assert p.steps == reference.steps and p.epochs == reference.epochs
        assert p.sample_rate == 16 / n_public
        assert trial.key == f"random-eps2-clip1-lr{candidate.point.lr:g}-seed0-proxy"
        assert trial.params[PHASE_PARAM] == "proxy" and trial.tags[PHASE_TAG] == "proxy"
        assert trial.budget == "proxy eps=2"  # never binned as a private result
        assert trial.config.to_flat()["proxy"] is True
    assert plan.n_trials == 3  # two proxy trials, then one private trial for the one cell


def test_a_grid_trial_keeps_its_flat_config_without_the_proxy_key(tmp_path):
    spec = parse_spec(yaml.safe_load(yaml.safe_dump(tiny_spec())), source="tiny.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    plan = plan_sweep(spec, paths, dry_run=True, log=lambda _: None)
    assert all("proxy" not in t.config.to_flat() and PHASE_PARAM not in t.params for t in plan.trials)


def test_a_proxy_config_must_run_whole_epochs_of_a_private_plan(tmp_path):
    _, plan = proxy_plan(tmp_path)
    config = plan.proxy.candidates[0].trial.config
    with pytest.raises(ConfigError, match="privacy.steps = 7 of a proxy trial"):
        dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, epochs=2, steps=7))
    dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, epochs=2, steps=8))


def test_candidates_rank_by_proxy_validation_auroc_ties_in_grid_order_unfinished_left_out(tmp_path):
    _, plan = proxy_plan(tmp_path, training={"lr": [0.004, 0.002, 0.001]})
    keys = [c.key for c in plan.proxy.candidates]
    (ranked,) = rank_candidates(plan.proxy, {keys[0]: 0.6, keys[1]: 0.7, keys[2]: math.nan})
    assert [(c.key, s) for c, s in ranked.ranking] == [(keys[1], 0.7), (keys[0], 0.6)]
    (tied,) = rank_candidates(plan.proxy, dict.fromkeys(keys, 0.5))
    assert tied.chosen[0].key == keys[0]
    (none,) = rank_candidates(plan.proxy, {})
    assert none.chosen is None


@pytest.fixture(scope="module")
def proxy_sweep(tmp_path_factory):
    from tests.sweeps.local_sweep import local_sweep

    with local_sweep(tmp_path_factory, yaml.safe_dump(PROXY), "tiny-proxy.yaml") as found:
        yield found


@pytest.mark.slow
def test_proxy_k1_spends_exactly_the_cells_target_on_the_private_data(proxy_sweep):
    from sweeps.results import experiment_records
    from trainables.data.ledger import read_ledger
    from trainables.privacy.ledger import compose_ledger

    spec, paths, trials = proxy_sweep
    records = {r.key: r for r in experiment_records(paths.ray_experiment(spec))}
    proxies = {k: r for k, r in records.items() if r.params.get(PHASE_PARAM) == "proxy"}
    assert len(proxies) == 2 and all(r.status == N.TERMINATED for r in proxies.values())
    # phase 1 ran on synthetic-source at the scaled sigma and the reference's steps, with no epsilon
    for record in proxies.values():
        assert record.params["dataset"] == "synthetic-source" and record.tags[PHASE_TAG] == "proxy"
        assert record.params["noise_multiplier"] == pytest.approx(
            record.params["reference_noise_multiplier"] * 16 / 64, rel=1e-12
        )
        assert record.final[N.STEPS] == record.params["steps"]
        assert N.EPSILON not in record.final
    best = max(proxies, key=lambda k: proxies[k].final[N.VAL_SELECTED_AUROC_MACRO])
    # phase 2: one private trial, the best candidate's lr, on the private set
    private = trials[trials[PHASE_PARAM] == "private"]
    assert len(private) == 1
    row = private.iloc[0]
    assert row["trial"] == best.removesuffix("-proxy") and row["dataset"] == "synthetic-a"
    assert row["lr"] == proxies[best].params["lr"] and row["proxy_candidate"] == best
    assert row["status"] == N.TERMINATED and row[N.EPSILON] <= 2
    # the ledger holds the private trial alone, at the target's accounted epsilon
    ledger = read_ledger(paths.data_root, "synthetic-a")
    assert {entry.trial for entry in ledger} == {row["trial"]}
    spent = epsilon_spent(row["noise_multiplier"], row["sample_rate"], int(row["steps"]), row["delta"])
    assert 2 - 0.01 <= spent <= 2
    total = compose_ledger(ledger)
    assert total.epsilon_rdp == pytest.approx(spent, rel=0.02) and total.epsilon_rdp <= 2 + 1e-9
    summary = json.loads((paths.sweep_dir(spec) / N.LEDGER_SUMMARY_FILE).read_text())
    assert summary["synthetic-a"]["epsilon_rdp"] == pytest.approx(total.epsilon_rdp, rel=1e-12)
    # the public ranking, and the tables label each phase
    chosen = json.loads((paths.sweep_dir(spec) / PROXY_FILE).read_text())["candidates"]
    assert [c["candidate"] for c in chosen if c["chosen"]] == [best]
    table = pd.read_parquet(paths.sweep_dir(spec) / N.TRIALS_FILE)
    assert sorted(table[PHASE_PARAM]) == ["private", "proxy", "proxy"]


@pytest.mark.slow
def test_a_proxy_sweeps_release_holds_phase_two_alone_at_its_target(proxy_sweep, tmp_path):
    from sweeps.release import write_release

    spec, paths, trials = proxy_sweep
    release = write_release(spec, paths, tmp_path / "release")
    assert release.trials == list(trials.loc[trials[PHASE_PARAM] == "private", "trial"])
    assert set(release.epsilon) == {"synthetic-a"} and release.epsilon["synthetic-a"] <= 2 + 1e-9
    published = pd.read_parquet(tmp_path / "release" / "tables" / N.TRIALS_FILE)
    assert set(published["trial"]) == set(release.trials)


@pytest.mark.slow
def test_phase_one_is_tagged_proxy_in_mlflow_and_kept_out_of_the_reports_epsilon_tables(proxy_sweep):
    import mlflow.tracking

    from analysis.report import write_report
    from sweeps.summary import summary_text

    spec, paths, trials = proxy_sweep
    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{N.ROLE_TAG}` = 'trial'")
    phases = {run.data.tags[N.TRIAL_KEY_TAG]: run.data.tags.get(PHASE_TAG) for run in runs}
    assert sorted(phases.values()) == ["private", "proxy", "proxy"]
    for run in runs:
        proxy = run.data.tags.get(PHASE_TAG) == "proxy"
        assert run.data.params[N.BUDGET_PARAM] == ("proxy eps=2" if proxy else "eps=2")
        assert (N.EPSILON in run.data.metrics) is not proxy
    index = write_report(paths.sweep_dir(spec))
    page = index.read_text()
    assert "Proxy phase (public data, not accounted)" in page
    proxy_table = pd.read_csv(index.parent / "tables" / "proxy_phase.csv")
    assert sorted(proxy_table["chosen"]) == [False, True] and sorted(proxy_table["rank"]) == [1, 2]
    others = [p for p in (index.parent / "tables").glob("*.csv") if p.name != "proxy_phase.csv"]
    assert others and not any("-proxy" in p.read_text() for p in others)
    text = summary_text(trials, paths.sweep_dir(spec), paths.tracking_uri, spec)
    assert "-proxy" in text and "synthetic-source" not in text  # no tuning cost on the public set


@pytest.mark.slow
def test_a_resumed_proxy_sweep_keeps_phase_one_and_records_phase_two_once(proxy_sweep):
    """Runs last (it reruns the module's sweep): phase 2 lost, as if interrupted before it ran; the rerun restores
    phase 1 as it was and trains the same candidate, recorded once in the ledger."""
    import shutil

    from sweeps.launch import run_sweep
    from trainables.data.ledger import read_ledger

    spec, paths, before = proxy_sweep
    experiment = paths.ray_experiment(spec)
    phase1 = {path: path.read_bytes() for path in experiment.glob("*/result.json")}
    assert len(phase1) == 2
    shutil.rmtree(experiment / "extension-1")
    state_file = paths.sweep_dir(spec) / N.SWEEP_STATE_FILE
    state = json.loads(state_file.read_text())
    state["status"] = "incomplete"
    for part in state["parts"]:
        part["status"] = "incomplete"
    state_file.write_text(json.dumps(state))
    after = run_sweep(spec, paths, log=lambda _: None)
    assert {path: path.read_bytes() for path in experiment.glob("*/result.json")} == phase1  # not retrained
    assert sorted(after["trial"]) == sorted(before["trial"])
    assert (after["status"] == N.TERMINATED).all()
    assert len({entry.run for entry in read_ledger(paths.data_root, "synthetic-a")}) == 1


def test_a_proxy_sweep_with_other_grid_values_is_refused_not_extended(tmp_path):
    from sweeps.launch import STATE_FORMAT, check_sweep_state
    from sweeps.plan import spec_fingerprint, spec_settings
    from sweeps.spec import SpecError
    from sweeps.state import Part, SweepState

    ran, _ = proxy_plan(tmp_path)
    paths = SweepPaths.for_spec(ran, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    state = SweepState(STATE_FORMAT, spec_fingerprint(ran), "complete", "abc", spec_settings(ran), (Part(()),))
    state.write(paths.sweep_dir(ran) / N.SWEEP_STATE_FILE)
    assert check_sweep_state(ran, paths).complete
    more, _ = proxy_plan(tmp_path, training={"lr": [0.002, 0.0002, 0.001]})
    with pytest.raises(SpecError, match="a proxy sweep cannot be extended"):
        check_sweep_state(more, paths)
