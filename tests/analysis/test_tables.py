"""Reading a sweep back: trial/epoch tables and the per-trial evaluation tables from Ray checkpoints."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.tables import (
    BOOTSTRAP_FILE,
    GROUPS_FILE,
    PREDICTIONS_FILE,
    TRIALS_FILE,
    TableError,
    collect_trial_tables,
    default_ray_experiment_dir,
    load_tables,
    main,
    write_evaluation_tables,
)
from tests.analysis.fixtures import N_BOOT, SWEEP, TRIALS, FakeTrial, make_sweep, write_ray_trial

FINISHED_KEYS = sorted(t.key for t in TRIALS if t.status == "TERMINATED")


def test_load_tables_collects_from_the_default_ray_folder(tmp_path):
    sweep_dir = make_sweep(tmp_path)
    tables = load_tables(sweep_dir)
    assert tables.name == SWEEP
    assert len(tables.trials) == len(TRIALS) and tables.trials["trial"].is_unique
    assert len(tables.epochs) == sum(len(t.epsilon) for t in TRIALS)
    assert tables.evaluation is not None
    assert str(tmp_path / "ray" / SWEEP) in tables.evaluation_note
    bootstrap = tables.evaluation.bootstrap
    assert list(bootstrap.columns[:1]) == ["trial"]
    assert sorted(bootstrap["trial"].unique()) == FINISHED_KEYS  # the failed trial has no final checkpoint
    assert (bootstrap.groupby(["trial", "dataset"]).size() == N_BOOT).all()
    assert sorted(tables.evaluation.groups["trial"].unique()) == FINISHED_KEYS


def test_default_ray_folder_follows_the_launcher_layout(tmp_path):
    assert default_ray_experiment_dir(tmp_path / "runs" / "smoke") == tmp_path / "runs" / "ray" / "smoke"


def test_collect_reads_the_highest_final_checkpoint(tmp_path):
    folder = tmp_path / "ray" / "trial_a"
    write_ray_trial(folder, TRIALS[0])
    (folder / "checkpoint_000002").rename(folder / "checkpoint_000003")
    stale = folder / "checkpoint_000002"  # an older final checkpoint with other numbers must be ignored
    stale.mkdir()
    (stale / "final.json").write_text("{}")
    pd.DataFrame({"replicate": [0], "auroc_macro": [0.0], "dataset": ["x"]}).to_parquet(stale / BOOTSTRAP_FILE)
    pd.DataFrame({"dataset": ["x"]}).to_parquet(stale / GROUPS_FILE)
    tables = collect_trial_tables(tmp_path / "ray")
    assert set(tables.bootstrap["dataset"]) == {"synthetic-a", "ext-b"}
    assert len(tables.bootstrap) == 2 * N_BOOT


def test_collect_errors(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        collect_trial_tables(tmp_path / "missing")
    write_ray_trial(tmp_path / "ray" / "one", TRIALS[0])
    write_ray_trial(tmp_path / "ray" / "two", TRIALS[0])
    with pytest.raises(TableError, match="'random-eps1' appears twice .* one and two"):
        collect_trial_tables(tmp_path / "ray")
    (tmp_path / "ray" / "two" / "checkpoint_000002" / GROUPS_FILE).unlink()
    (tmp_path / "ray" / "one").rename(tmp_path / "one")
    with pytest.raises(TableError, match="holds final.json but not groups.parquet"):
        collect_trial_tables(tmp_path / "ray")
    (tmp_path / "ray" / "bad").mkdir()
    (tmp_path / "ray" / "bad" / "params.json").write_text('{"lr": 1}')
    with pytest.raises(TableError, match="no trial key at point.key"):
        collect_trial_tables(tmp_path / "ray")


def test_collect_with_no_finished_trial(tmp_path):
    write_ray_trial(tmp_path / "ray" / "failed", FakeTrial("x", "random", 1.0, (0.5,), (0.5,), (0.5,), status="ERROR"))
    tables = collect_trial_tables(tmp_path / "ray")
    assert tables.bootstrap.empty and list(tables.bootstrap.columns) == ["trial"]


def test_written_evaluation_tables_take_precedence(tmp_path):
    sweep_dir = make_sweep(tmp_path)
    written = write_evaluation_tables(sweep_dir)
    assert written == [sweep_dir / GROUPS_FILE, sweep_dir / BOOTSTRAP_FILE, sweep_dir / PREDICTIONS_FILE]
    assert f"read from {sweep_dir}" in load_tables(sweep_dir).evaluation_note
    explicit = load_tables(sweep_dir, tmp_path / "ray" / SWEEP)  # an explicit Ray folder wins
    assert "collected from the final checkpoints" in explicit.evaluation_note
    collected = explicit.evaluation.bootstrap
    predictions = explicit.evaluation.predictions
    assert sorted(predictions["trial"].unique()) == FINISHED_KEYS
    assert len(predictions) == len(FINISHED_KEYS) * (100 + 80)  # every test image of both test sets
    import shutil

    shutil.rmtree(tmp_path / "ray")
    tables = load_tables(sweep_dir)
    assert f"read from {sweep_dir}" in tables.evaluation_note
    pd.testing.assert_frame_equal(tables.evaluation.bootstrap, collected)
    pd.testing.assert_frame_equal(tables.evaluation.predictions, predictions)  # the sweep folder keeps them too


def test_missing_evaluation_tables_are_reported_not_invented(tmp_path):
    sweep_dir = make_sweep(tmp_path, with_ray=False)
    tables = load_tables(sweep_dir)
    assert tables.evaluation is None
    assert "no per-trial evaluation tables" in tables.evaluation_note
    with pytest.raises(TableError, match="Ray experiment folder .*elsewhere does not exist"):
        load_tables(sweep_dir, tmp_path / "elsewhere")


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(TableError, match=f"{TRIALS_FILE} does not exist; run the sweep first"):
        load_tables(tmp_path / "nothing")
    sweep_dir = make_sweep(tmp_path, with_ray=False)
    trials = pd.read_parquet(sweep_dir / TRIALS_FILE)
    pd.concat([trials, trials.iloc[:1]]).to_parquet(sweep_dir / TRIALS_FILE)
    with pytest.raises(TableError, match="trial keys repeat .*random-eps1"):
        load_tables(sweep_dir)
    trials.drop(columns="status").to_parquet(sweep_dir / TRIALS_FILE)
    with pytest.raises(TableError, match=r"missing column\(s\) \['status'\]"):
        load_tables(sweep_dir)


def test_cli_copies_the_tables(tmp_path, capsys):
    sweep_dir = make_sweep(tmp_path)
    main([str(sweep_dir)])
    assert (sweep_dir / BOOTSTRAP_FILE).exists() and (sweep_dir / GROUPS_FILE).exists()
    assert str(sweep_dir / BOOTSTRAP_FILE) in capsys.readouterr().out


def test_a_ray_trial_folder_reads_its_final_checkpoint_and_nothing_before_it_finished(tmp_path):
    from analysis.tables import RayTrialFolder, ray_trial_folders

    done = tmp_path / "ray" / "trial_a"
    write_ray_trial(done, TRIALS[0])
    pd.DataFrame({"epoch": [1, 2]}).to_parquet(done / "checkpoint_000002" / "epochs.parquet")
    failed = FakeTrial("x", "random", 1.0, (0.5,), (0.5,), (0.5,), status="ERROR")
    write_ray_trial(tmp_path / "ray" / "trial_b", failed)
    (tmp_path / "ray" / "not_a_trial").mkdir()  # no params.json: not a trial folder
    trials = ray_trial_folders(tmp_path / "ray")
    assert [(t.path.name, t.key) for t in trials] == [("trial_a", TRIALS[0].key), ("trial_b", "x")]
    finished, unfinished = trials
    assert finished.final_checkpoint() == done / "checkpoint_000002"  # not the plain checkpoint_000001
    assert finished.final_report() == {"done": True}
    assert list(finished.final_table("epochs.parquet")["epoch"]) == [1, 2]
    assert finished.final_table("missing.parquet") is None
    assert unfinished.final_checkpoint() is None and unfinished.final_report() is None
    assert unfinished.final_table(GROUPS_FILE) is None
    assert RayTrialFolder(done) == finished


def test_an_extensions_trials_are_read_with_the_sweeps_own(tmp_path):
    """An extension (new grid values added to a sweep that ran) is a Ray experiment inside the sweep's folder
    (`ray_part_dir`): the trial folders, and the evaluation tables collected from them, are those of every part."""
    from analysis.tables import ray_experiment_parts, ray_part_dir, ray_trial_folders

    ray_dir = tmp_path / "ray" / SWEEP
    first, extension = TRIALS[0], TRIALS[2]
    write_ray_trial(ray_dir / "trial_a", first)
    write_ray_trial(ray_part_dir(ray_dir, 1) / "trial_a", extension)
    assert ray_experiment_parts(ray_dir) == [ray_dir, ray_dir / "extension-1"]
    assert [t.key for t in ray_trial_folders(ray_dir)] == [first.key, extension.key]
    assert sorted(collect_trial_tables(ray_dir).bootstrap["trial"].unique()) == sorted([first.key, extension.key])
    write_ray_trial(ray_part_dir(ray_dir, 2) / "trial_b", first)  # a trial in two parts: a stale folder
    with pytest.raises(TableError, match="appears twice"):
        ray_trial_folders(ray_dir)
