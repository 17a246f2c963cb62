"""`search: private_selection` (Papernot & Steinke 2022): a cell's tuning-inclusive epsilon is dp-accounting's
``RepeatAndSelectDpEvent`` and at most its target; on a real local Ray, only each cell's best candidate reaches MLflow
and the tables, and the secret number of candidates K appears in no output."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from sweeps.plan import SweepPaths, plan_sweep
from sweeps.spec import SpecError, parse_spec
from tests.sweeps.tiny import tiny_spec
from trainables import names as N

SELECTION = tiny_spec(
    name="tiny-selection",
    search="private_selection",
    privacy={"target_epsilon": [2, 4], "max_grad_norm": None, "expected_batch_size": None, "epochs": None},
    training=None,
    selection={
        "distribution": "geometric",
        "mean_trials": 2,
        "lr": [0.001, 0.004],
        "max_grad_norm": [0.5, 2.0],
        "expected_batch_size": [64],
        "epochs": [1],
    },
)
"""Two cells (targets 2 and 4) of test_convnext on 600 synthetic 32 px images; candidates of one shape (B 64, 1
epoch), lr and clip drawn."""
K = {"random-eps2": 3, "random-eps4": 2}
"""The K each cell draws in the end-to-end test (the draw is replaced, to know what must not show)."""


def reference_epsilon(sigma: float, q: float, steps: int, mean: float, shape: float, delta: float) -> float:
    """dp-accounting's own RDP of selecting the best of K runs of one DP-SGD candidate."""
    step = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    candidate = dp_event.SelfComposedDpEvent(step, steps)
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.RepeatAndSelectDpEvent(candidate, mean, shape))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("distribution", "shape", "dp_shape"),
    [
        ("logarithmic", None, 0.0),
        ("geometric", None, 1.0),
        ("negative_binomial", 2.0, 2.0),
        ("poisson", None, math.inf),
    ],
)
def test_each_cell_selects_to_repeat_and_select_at_most_its_target(tmp_path, distribution, shape, dp_shape):
    raw = copy.deepcopy(SELECTION)
    raw["selection"] |= {"distribution": distribution, "shape": shape}
    spec = parse_spec(raw)
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    plan = plan_sweep(spec, paths, run_pretrain_stage=False, dry_run=True)
    assert plan.trials == [] and plan.n_trials == 2  # candidates are drawn at launch; at most one released per cell
    for cell in plan.selections.values():
        ((_, planned),) = cell.plan.candidates.items()
        expected = reference_epsilon(
            planned.noise_multiplier, planned.sample_rate, planned.steps, 2.0, dp_shape, spec.privacy.delta
        )
        assert cell.plan.epsilon == pytest.approx(expected, rel=0.005)
        assert cell.plan.epsilon <= cell.cell.target_epsilon
        assert cell.plan.single_run_epsilon < cell.cell.target_epsilon  # the selection's price


def test_the_dry_run_prints_each_cell_without_a_drawn_count(tmp_path):
    from sweeps.describe import dry_run_report

    spec = parse_spec(SELECTION)
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    text = dry_run_report(plan_sweep(spec, paths, run_pretrain_stage=False, dry_run=True))
    assert "2 cells, one released trial each at most (private_selection)" in text
    assert "random-eps2: target 2, single-run epsilon" in text and "(geometric, E[K]=2)" in text
    assert not list(tmp_path.iterdir())  # a dry run draws nothing and writes nothing


def test_planning_the_shipped_selection_prints_no_accounting_noise(tmp_path, recwarn, caplog):
    # The CLI's dry run of sweeps/selection-smoke.yaml printed 4 of Opacus' "Optimal order is the largest alpha"
    # warnings (the floor probe and the candidates' calibrations, search steps that are never reported) and ~20 of
    # dp-accounting's "_compute_log_a_frac failed to converge" lines (an order dropped from the minimum, the epsilon
    # still an upper bound); neither is anything a user can act on.
    from sweeps.spec import load_spec
    from tests.sweeps.sweep_files import SELECTION as SELECTION_FILE

    spec = load_spec(SELECTION_FILE)
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    with caplog.at_level("WARNING"):
        plan = plan_sweep(spec, paths, run_pretrain_stage=False, dry_run=True)
    assert len(plan.selections) == 2
    assert [str(w.message) for w in recwarn if "Optimal order" in str(w.message)] == []
    assert [r.getMessage() for r in caplog.records if "failed to converge" in r.getMessage()] == []


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"early_stopping": {"grace_period": 1}}, "`early_stopping:` (ASHA) cannot be used with"),
        ({"optuna": {"trials_per_target": 2}}, "`optuna:` cannot be used with `search: private_selection`"),
        ({"privacy": {"target_epsilon": [2, math.inf]}}, "privacy.target_epsilon[1] = inf"),
        ({"training": {"lr": [0.001]}}, "`training.lr` is a grid setting"),
        ({"selection": {"distribution": "negative_binomial"}}, "selection.shape = None"),
        ({"selection": {"distribution": "geometric", "shape": 3.0}}, "selection.shape = 3.0"),
        ({"selection": {"mean_trials": 0.5}}, "selection.mean_trials = 0.5"),
        ({"selection": {"max_grad_norm": [2.0, 1.0]}}, "selection.max_grad_norm = [2.0, 1.0]"),
        ({"selection": {"epochs": [1, 1]}}, "selection.epochs = [1, 1]"),
        ({"search": "grid", "privacy": {"max_grad_norm": [1.0]}}, "a `selection:` section is given but search"),
    ],
)
def test_a_selection_that_would_break_its_bound_is_refused(edits, message):
    raw = copy.deepcopy(SELECTION)
    for section, value in edits.items():
        raw[section] = {**raw[section], **value} if isinstance(raw.get(section), dict) else value
    with pytest.raises(SpecError) as error:
        parse_spec(raw)
    assert message in str(error.value)


def test_candidates_are_drawn_secretly_once_and_read_back_to_resume(tmp_path, monkeypatch):
    import stat

    import sweeps.selection
    from sweeps.selection import DRAWS_FILE, SelectionRun

    spec = parse_spec(copy.deepcopy(SELECTION))
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    plan = plan_sweep(spec, paths, run_pretrain_stage=False, dry_run=True)
    counts = iter([3, 0])  # the second cell draws K = 0 (possible under Poisson): it has no candidate
    monkeypatch.setattr(sweeps.selection, "draw_trial_count", lambda count, rng: next(counts))
    first = SelectionRun.prepare(plan)
    assert [c.cell for c in first.candidates] == ["random-eps2"] * 3
    assert len({c.id for c in first.candidates}) == 3
    for point, candidate in zip(first.points, first.candidates, strict=True):
        assert point.key == f"random-eps2-sel{candidate.id}"  # a random id, no running index
        assert point.config.lr == candidate.lr and 0.001 <= candidate.lr <= 0.004
        assert point.config.privacy.max_grad_norm == candidate.max_grad_norm and 0.5 <= candidate.max_grad_norm <= 2
        planned = plan.selections["random-eps2"].plan.candidates[(64, 1)]
        assert point.config.privacy.noise_multiplier == planned.noise_multiplier
        assert point.config.privacy.target_epsilon == 2  # the cell's target; its own epsilon is the single-run one
    draws = paths.ray_experiment(spec) / DRAWS_FILE
    assert stat.S_IMODE(draws.stat().st_mode) == 0o600  # private material, like the trials' checkpoints
    monkeypatch.setattr(sweeps.selection, "draw_trial_count", lambda count, rng: pytest.fail("drawn again"))
    again = SelectionRun.prepare(plan)  # a resumed sweep: the same candidates, no new draw
    assert again.candidates == first.candidates and [p.key for p in again.points] == [p.key for p in first.points]
    summary = again.public_summary({"random-eps2": again.points[0].key, "random-eps4": None})
    assert [cell["winner"] for cell in summary["cells"]] == [again.points[0].key, None]
    assert all(c.id not in json.dumps(summary) for c in again.candidates[1:])


@pytest.fixture(scope="module")
def selection_sweep(tmp_path_factory):
    """The sweep run with each cell's K known (`K`), its console output captured."""
    import ray

    import sweeps.selection
    from sweeps.launch import run_sweep
    from sweeps.summary import summary_text

    root = tmp_path_factory.mktemp("selection")
    spec = parse_spec(yaml.safe_load(yaml.safe_dump(SELECTION)), source="tiny-selection.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data"))
    counts = iter(K.values())
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
        patch.setattr(sweeps.selection, "draw_trial_count", lambda count, rng: next(counts))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            trials = run_sweep(spec, paths)
        finally:
            ray.shutdown()
        print(summary_text(trials, paths.sweep_dir(spec), paths.tracking_uri, spec))
    yield spec, paths, trials, console.getvalue()


def candidates(paths: SweepPaths, spec) -> list[dict]:
    from sweeps.selection import DRAWS_FILE

    return json.loads((paths.ray_experiment(spec) / DRAWS_FILE).read_text())["candidates"]


@pytest.mark.slow
def test_every_candidate_ran_and_only_each_cells_best_is_released(selection_sweep):
    from sweeps.results import experiment_records

    spec, paths, trials, _ = selection_sweep
    drawn = candidates(paths, spec)
    assert {cell: sum(c["cell"] == cell for c in drawn) for cell in K} == K
    records = experiment_records(paths.ray_experiment(spec))
    assert len(records) == sum(K.values()) and all(r.status == N.TERMINATED for r in records)
    best = {}
    for record in records:
        cell = record.key.rsplit("-sel", 1)[0]
        score = record.final[N.VAL_SELECTED_AUROC_MACRO]
        if cell not in best or score > best[cell][1]:
            best[cell] = (record.key, score)
    assert sorted(trials["trial"]) == sorted(key for key, _ in best.values())  # one row per cell: its best
    assert (trials["status"] == N.TERMINATED).all()
    assert (trials[N.EPSILON] <= trials["target_epsilon"]).all()
    selection = json.loads((paths.sweep_dir(spec) / N.SELECTION_FILE).read_text())
    assert {c["cell"]: c["winner"] for c in selection["cells"]} == {cell: key for cell, (key, _) in best.items()}


@pytest.mark.slow
def test_only_one_child_run_per_cell_reaches_mlflow(selection_sweep):
    from mlflow.tracking import MlflowClient

    spec, paths, trials, _ = selection_sweep
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get(N.ROLE_TAG) == "trial"]
    assert sorted(r.data.tags[N.TRIAL_KEY_TAG] for r in children) == sorted(trials["trial"])
    assert len(children) == len(K)
    for run in children:  # the winner's whole history, as a grid trial logs it
        assert run.info.status == "FINISHED"
        assert N.TEST_AUROC_MACRO in run.data.metrics and N.EPSILON in run.data.metrics
        assert run.data.tags[N.RAY_TRIAL_ID_TAG] == "withheld (private selection)"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, N.EVALUATION_ARTIFACT_DIR)}
        assert f"{N.EVALUATION_ARTIFACT_DIR}/{N.METRICS_FILE}" in artifacts
    (parent,) = [r for r in runs if r.data.tags.get(N.ROLE_TAG) == "sweep"]
    selection = json.loads((paths.sweep_dir(spec) / N.SELECTION_FILE).read_text())
    for cell in selection["cells"]:
        assert parent.data.metrics[f"{N.SELECTION_EPSILON}/{cell['cell']}"] == pytest.approx(cell["epsilon"])
        assert cell["epsilon"] <= cell["target_epsilon"]
    assert parent.data.params["selection_distribution"] == "geometric"
    assert parent.data.params["n_trials"] == str(len(K))  # cells, not candidates


@pytest.mark.slow
def test_the_number_of_candidates_appears_in_no_output(selection_sweep):
    from mlflow.tracking import MlflowClient

    spec, paths, trials, console = selection_sweep
    losers = [c for c in candidates(paths, spec) if not any(c["id"] in key for key in trials["trial"])]
    assert len(losers) == sum(K.values()) - len(K)
    secret = [c["id"] for c in losers]
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    logged = []
    for run in client.search_runs([experiment.experiment_id]):
        logged += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags, **run.data.metrics}.items()]
    published = [
        path.read_bytes().decode("latin-1") for path in Path(paths.sweep_dir(spec)).iterdir() if path.is_file()
    ]
    for text in [console, *logged, *published]:
        assert not any(candidate_id in text for candidate_id in secret)
    # the console counts cells, never trials: no "k/N done" progress over candidates, no candidate key
    assert "[2/2 cells done" in console and "trials" not in console.split("sweep 'tiny-selection'")[1].split("\n")[0]
    for count in ("3 trials", "5 trials", "/5 ", "/3 ", "K=3", "K=2"):
        assert count not in console
    assert "tuning-inclusive epsilon" in console and "single-run epsilon" in console
    # the ledger: one run per cell, at its selection, never the candidates
    from trainables.data.ledger import read_ledger

    rows = read_ledger(paths.data_root, "synthetic-a")
    assert sorted({row.trial for row in rows}) == sorted(K)
    assert all(row.selection_mean == 2.0 for row in rows)
    ledger_summary = (paths.sweep_dir(spec) / N.LEDGER_SUMMARY_FILE).read_text()
    assert json.loads(ledger_summary)["synthetic-a"]["runs"] == len(K)


@pytest.mark.slow
def test_table_and_release_hold_the_winners_alone_at_the_selections_epsilon(selection_sweep, tmp_path):
    from sweeps.release import write_release
    from sweeps.results import rebuild_tables
    from sweeps.selection import released_selection_epsilons

    spec, paths, trials, _ = selection_sweep
    rebuilt = rebuild_tables(spec, paths, "ray")  # `dpsweep table` reads the Ray folder, which holds every candidate
    assert sorted(rebuilt.trials["trial"]) == sorted(trials["trial"])
    assert set(rebuilt.evaluation.groups["trial"]) == set(trials["trial"])
    release = write_release(spec, paths, tmp_path / "release", models=True)
    assert sorted(release.trials) == sorted(trials["trial"])
    composed = released_selection_epsilons(paths.sweep_dir(spec), set(trials["trial"]), spec.privacy.delta)
    assert release.epsilon == composed and composed["synthetic-a"] > 4  # targets 2 and 4 composed: more than 4
    secret = [c["id"] for c in candidates(paths, spec) if not any(c["id"] in key for key in trials["trial"])]
    for path in (tmp_path / "release").rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("latin-1")
            assert not any(candidate_id in text for candidate_id in secret), path
    assert "Tuning epsilon (private selection)" in (tmp_path / "release" / "PRIVACY.md").read_text()
    assert (tmp_path / "release" / "report" / "tables" / "private_selection.csv").is_file()


@pytest.mark.slow
def test_analysis_reading_the_ray_folder_sees_the_winners_alone(selection_sweep, tmp_path):
    import shutil

    from analysis.tables import load_tables

    spec, paths, trials, _ = selection_sweep
    sweep_dir = tmp_path / "runs" / spec.name  # the tables without their evaluation files: read from Ray's folder
    shutil.copytree(paths.sweep_dir(spec), sweep_dir, ignore=shutil.ignore_patterns("groups*", "bootstrap*"))
    (tmp_path / "runs" / "ray").mkdir()
    (tmp_path / "runs" / "ray" / spec.name).symlink_to(paths.ray_experiment(spec))
    tables = load_tables(sweep_dir)
    assert "final checkpoints" in tables.evaluation_note
    assert set(tables.evaluation.groups["trial"]) == set(trials["trial"])
