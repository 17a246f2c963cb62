"""A sweep file run again under its sweep's name (`sweeps.launch.check_sweep_state`, `sweeps.state`): values added to
the grid axes extend the sweep with exactly the new trials; any other change is refused naming each changed field
with its old and new value, by the dry run as by the real run.

The fast tests write the state a finished sweep leaves (``sweep.json``, ``trials.parquet``) and ask the check; the slow
one runs a one-trial sweep on a real local Ray, adds a seed and checks that only the new trial ran, into the same
sweep (tables, MLflow parent, tuning cost, ledger), leaving the old trial as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from sweeps.launch import STATE_FORMAT, check_sweep_state, grid_keys
from sweeps.plan import SweepPaths, spec_fingerprint, spec_settings
from sweeps.spec import SpecError, SweepSpec, parse_spec
from sweeps.state import Part, SweepState
from tests.sweeps.tiny import tiny_spec
from trainables import names as N

NAME = "grow"
BASE = {"name": NAME, "privacy": {"target_epsilon": [2], "delta": 6e-6}}
"""The tiny sweep with one trial (epsilon 2, seed 0)."""
KEY = "random-eps2-clip1-lr0.002-seed{}"
TIMM_INIT = "test_convnext.r160_in1k"  # a timm tag of the tiny model: an init named by its weights


def spec_of(**overrides: Any) -> SweepSpec:
    raw = tiny_spec(**BASE)
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return parse_spec(raw, source=f"{NAME}.yaml")


def finished(spec: SweepSpec, tmp_path: Path) -> SweepPaths:
    """The runs folder of ``spec`` after it ran to its end (its state and a trial table)."""
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    sweep_dir = paths.sweep_dir(spec)
    keys = tuple(grid_keys(spec))
    state = SweepState(
        STATE_FORMAT, spec_fingerprint(spec), "complete", "i", spec_settings(spec), (Part(keys, "complete"),)
    )
    state.write(sweep_dir / N.SWEEP_STATE_FILE)
    pd.DataFrame({"trial": list(keys), "status": "TERMINATED"}).to_parquet(sweep_dir / N.TRIALS_FILE)
    return paths


def refusal(spec: SweepSpec, paths: SweepPaths) -> str:
    with pytest.raises(SpecError) as refused:
        check_sweep_state(spec, paths)
    message = str(refused.value)
    assert "already exists" in message and "--fresh" in message and "change `name`" in message
    return message


def test_an_added_seed_extends_the_sweep_with_exactly_its_trials(tmp_path):
    paths = finished(spec_of(), tmp_path)
    check = check_sweep_state(spec_of(training={"seed": [0, 1, 2]}), paths)
    assert check.extends and not check.complete
    assert check.new_trials == (KEY.format(1), KEY.format(2))
    assert [str(c) for c in check.changes] == ["training.seed: [0] -> [0, 1, 2]"]
    assert check.parts == (Part((KEY.format(0),), "complete"),)
    assert check_sweep_state(spec_of(), paths).complete  # the file it ran with: nothing to run


@pytest.mark.parametrize(
    ("edit", "added"),
    [
        ({"privacy": {"target_epsilon": [2, 8]}}, ["random-eps8-clip1-lr0.002-seed0"]),
        ({"training": {"lr": [0.002, 0.01]}}, ["random-eps2-clip1-lr0.01-seed0"]),
        ({"privacy": {"max_grad_norm": [1.0, 4.0]}}, ["random-eps2-clip4-lr0.002-seed0"]),
        (
            {"inits": ["random", TIMM_INIT], "init_weights": {TIMM_INIT: "w.safetensors"}},
            [f"{TIMM_INIT}-eps2-clip1-lr0.002-seed0"],
        ),
        (
            {"inits": ["random", "domain"], "pretrain": {"dataset": "synthetic-source", "epochs": 1}},
            ["domain-eps2-clip1-lr0.002-seed0"],
        ),
        (  # a sweep without the axis gains subsets of its training split: its trial keeps its key
            {"data": {"train_fraction": [0.25, 0.5, 1.0]}},
            ["random-eps2-clip1-lr0.002-seed0-frac0.25", "random-eps2-clip1-lr0.002-seed0-frac0.5"],
        ),
    ],
)
def test_added_targets_lrs_clips_and_inits_extend_the_sweep(tmp_path, edit, added):
    check = check_sweep_state(spec_of(**edit), finished(spec_of(), tmp_path))
    assert list(check.new_trials) == added


def test_a_changed_setting_is_refused_naming_each_field_with_old_and_new_value(tmp_path):
    paths = finished(spec_of(), tmp_path)
    message = refusal(spec_of(privacy={"delta": 1e-5}), paths)
    assert "\n  privacy.delta: 6e-06 -> 1e-05\n" in message
    message = refusal(spec_of(privacy={"epochs": 3}, training={"seed": [0, 1], "weight_decay": 0.1}), paths)
    lines = [line.strip() for line in message.splitlines()[1:-1]]
    # every change, the seed added too (alone it would extend the sweep)
    assert lines == ["training.seed: [0] -> [0, 1]", "privacy.epochs: 2 -> 3", "training.weight_decay: 0.01 -> 0.1"]


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        ({"privacy": {"target_epsilon": [8]}}, "privacy.target_epsilon: [2.0] -> [8.0] (removes 2.0)"),
        ({"training": {"seed": [1]}}, "training.seed: [0] -> [1] (removes 0)"),
        ({"model": ["test_convnext", "resnet10t"]}, "model: [test_convnext] -> [test_convnext, resnet10t]"),
        (
            {"privacy": {"privacy_unit": ["image", "patient"], "max_images_per_patient": 4}},
            "privacy.privacy_unit: [image] -> [image, patient]",
        ),
        ({"init_weights": {"random": "w.safetensors"}}, "init_weights.random: (not set) -> w.safetensors"),
        ({"data": {"train_fraction": [0.5]}}, "data.train_fraction: (not set) -> [0.5] (removes 1.0)"),
    ],
)
def test_removed_values_and_axes_that_rename_trials_are_refused(tmp_path, edit, line):
    message = refusal(spec_of(**edit), finished(spec_of(), tmp_path))
    assert f"\n  {line}" in message, message


def test_a_state_that_records_no_settings_resumes_but_is_not_extended(tmp_path):
    """Written by dpsweep before settings were recorded (format 3): the same file resumes, another is refused."""
    spec = spec_of()
    paths = finished(spec, tmp_path)
    state_file = paths.sweep_dir(spec) / N.SWEEP_STATE_FILE
    state = {"format": 3, "fingerprint": spec_fingerprint(spec), "status": "incomplete", "instance": "i"}
    state_file.write_text(json.dumps(state))
    check = check_sweep_state(spec, paths)
    assert check.parts == (Part((KEY.format(0),), "incomplete"),) and not check.new_trials
    assert "does not record which" in refusal(spec_of(training={"seed": [0, 1]}), paths)


def test_the_dry_run_lists_an_extensions_new_trials_and_refuses_what_the_real_run_refuses(tmp_path, capsys):
    spec = spec_of()
    paths = finished(spec, tmp_path)
    sweep_file = tmp_path / f"{NAME}.yaml"
    args = ["sweep", str(sweep_file), "--runs", str(paths.runs_root), "--data", str(paths.data_root)]
    sweep_file.write_text(yaml.safe_dump(tiny_spec(**BASE, training={"lr": [0.002], "seed": [0, 1]})))
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        f"sweep {NAME!r} in {paths.runs_root} would be extended (training.seed: [0] -> [0, 1]): 1 new trials "
        f"(1 kept as they ran): {KEY.format(1)}"
    ) in out
    sweep_file.write_text(yaml.safe_dump(tiny_spec(name=NAME, privacy={"target_epsilon": [2], "delta": 1e-5})))
    assert main([*args, "--dry-run"]) == 2
    dry_err = capsys.readouterr().err
    assert "privacy.delta: 6e-06 -> 1e-05" in dry_err
    assert main(args) == 2
    assert capsys.readouterr().err == dry_err
    assert sorted(p.name for p in paths.sweep_dir(spec).iterdir()) == [N.SWEEP_STATE_FILE, N.TRIALS_FILE]


# ----------------------------------------------------------------------------------------------------
# A real extension


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> dict[str, Any]:
    """The one-trial sweep run, then run again with a second seed; what was on disk and in MLflow after each run."""
    import ray

    from analysis.tables import ray_trial_folders
    from sweeps.launch import run_sweep

    root = tmp_path_factory.mktemp("extend")
    base, grown = spec_of(), spec_of(training={"seed": [0, 1]})
    paths = SweepPaths.for_spec(base, runs=str(root / "runs"), data=str(root / "data"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        before = run_sweep(base, paths)
        seen = {"folders": [f.key for f in ray_trial_folders(paths.ray_experiment(base))], "mlflow": mlflow_runs(paths)}
        seen["epochs"] = pd.read_parquet(paths.sweep_dir(base) / N.EPOCHS_FILE)
        said: list[str] = []
        after = run_sweep(grown, paths, log=said.append)
        again: list[str] = []
        run_sweep(grown, paths, log=again.append)
    finally:
        ray.shutdown()
    return {
        "spec": grown,
        "paths": paths,
        "before": before,
        "after": after,
        "seen": seen,
        "said": said,
        "again": again,
        "folders": [f.key for f in ray_trial_folders(paths.ray_experiment(base))],
        "mlflow": mlflow_runs(paths),
    }


def mlflow_runs(paths: SweepPaths) -> dict[str, Any]:
    """The sweep's MLflow runs: the parent's, and each child's by trial key (info, params, tags, metrics)."""
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{N.SWEEP_TAG}` = '{NAME}'")
    children = {
        r.data.tags[N.TRIAL_KEY_TAG]: (
            r.info.run_id,
            r.info.status,
            r.info.end_time,
            r.data.params,
            r.data.tags,
            r.data.metrics,
        )
        for r in runs
        if r.data.tags[N.ROLE_TAG] == "trial"
    }
    (parent,) = [r for r in runs if r.data.tags[N.ROLE_TAG] == "sweep"]
    return {"children": children, "parent": parent}


@pytest.mark.slow
def test_an_added_seed_runs_exactly_the_new_trial_and_leaves_the_old_one_as_it_was(extended):
    old, new = KEY.format(0), KEY.format(1)
    assert extended["seen"]["folders"] == [old] and extended["folders"] == [old, new]
    assert list(extended["before"]["trial"]) == [old] and list(extended["after"]["trial"]) == [old, new]
    assert (extended["after"]["status"] == N.TERMINATED).all()
    assert any(
        f"extending sweep {NAME!r} (training.seed: [0] -> [0, 1]): 1 new trials" in line for line in extended["said"]
    )
    assert not any("resuming" in line for line in extended["said"]), "the finished part was not restored"
    # The old trial's row, epochs and MLflow run are those of the first run.
    pd.testing.assert_frame_equal(extended["after"].iloc[:1], extended["before"])
    epochs = pd.read_parquet(extended["paths"].sweep_dir(extended["spec"]) / N.EPOCHS_FILE)
    pd.testing.assert_frame_equal(epochs[epochs["trial"] == old].reset_index(drop=True), extended["seen"]["epochs"])
    before, after = extended["seen"]["mlflow"], extended["mlflow"]
    assert sorted(after["children"]) == [old, new] and after["children"][old] == before["children"][old]
    assert after["parent"].info.run_id == before["parent"].info.run_id
    assert any("is complete; nothing to run" in line for line in extended["again"])


@pytest.mark.slow
def test_an_extended_sweep_is_one_sweep_its_state_tables_tuning_cost_and_ledger_cover_every_trial(extended):
    from sweeps.results import rebuild_tables
    from sweeps.tuning_cost import tuning_cost
    from trainables.data.ledger import read_ledger

    spec, paths, trials = extended["spec"], extended["paths"], extended["after"]
    state = json.loads((paths.sweep_dir(spec) / N.SWEEP_STATE_FILE).read_text())
    assert state["status"] == "complete" and state["fingerprint"] == spec_fingerprint(spec)
    assert state["parts"] == [
        {"status": "complete", "trials": [KEY.format(0)]},
        {"status": "complete", "trials": [KEY.format(1)]},
    ]
    assert not (paths.sweep_dir(spec) / N.SWEEP_LOCK_FILE).exists()
    # `dpsweep table` reads both Ray experiments into the same table
    pd.testing.assert_frame_equal(rebuild_tables(spec, paths, "ray").trials, trials)
    # the parent's tuning epsilon composes both trials (its latest value: the extension's step)
    cost = tuning_cost(trials)
    assert cost.n_trials == 2
    parent = extended["mlflow"]["parent"]
    assert parent.data.metrics[N.TUNING_EPSILON] == pytest.approx(cost.epsilon)
    assert parent.data.metrics[N.TUNING_EPSILON] > extended["seen"]["mlflow"]["parent"].data.metrics[N.TUNING_EPSILON]
    assert parent.data.tags[f"{N.TAG_PREFIX}extension.1"].startswith("(training.seed: [0] -> [0, 1]): 1 new trials")
    assert parent.info.status == "FINISHED" and parent.data.params["n_trials"] == "1"  # MLflow params cannot change
    # one instance; each trial recorded once, the new one as a new run of it
    entries = [e for e in read_ledger(paths.data_root, "synthetic-a") if e.sweep == NAME]
    planned = [e.run for e in entries if e.status == "planned"]
    assert planned == [f"{NAME}/{state['instance']}/{KEY.format(0)}", f"{NAME}/{state['instance']}/{KEY.format(1)}"]
