"""`dpsweep release`: which trials it keeps, how it states epsilons, and what it refuses before writing anything.

The end-to-end release of a real sweep (no file holds a non-private trial's numbers, PRIVACY.md names every epsilon,
the weights) is in `tests.sweeps.test_sweep_e2e`, on the sweep that module already runs.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sweeps.cli import main
from sweeps.release import _ledger_section, epsilon_text, has_guarantee
from tests.sweeps.tiny import tiny_yaml
from trainables import names as N
from trainables.config import PrivacyConfig


def rows(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_only_private_trials_with_secret_noise_have_a_guarantee():
    trials = rows(
        trial=["private", "baseline", "replayable", "stated-none", "secure"],
        target_epsilon=[2.0, math.inf, 2.0, 2.0, 8.0],
        noise_multiplier=[1.1, 0.0, 1.1, 1.1, 0.6],
        reproducible_noise=[False, False, True, False, False],
    )
    trials[N.GUARANTEE] = ["(2, 6e-06)-DP target ...", "none (non-private ...)", "none (noise seed ...)", "none", "(8"]
    assert has_guarantee(trials).tolist() == [True, False, False, False, True]
    # Fails closed: a table that cannot say the noise was secret gives no guarantee.
    unknown = trials.drop(columns=["reproducible_noise", N.GUARANTEE])
    assert not has_guarantee(unknown).any()
    missing = trials.assign(reproducible_noise=[None, False, True, False, float("nan")])
    assert has_guarantee(missing).tolist() == [False, False, False, False, False]


def test_epsilons_are_stated_rounded_up():
    assert epsilon_text(1.9950272492524694) == "1.996"
    assert epsilon_text(2.0) == "2"
    assert epsilon_text(0.123449) == "0.1235"
    assert epsilon_text(12.04) == "12.04"
    assert epsilon_text(1234.5) == "1235"
    assert epsilon_text(math.inf) == "inf"
    for value in (0.0123456, 0.99999, 1.0000001, 3.3333, 19.93, 250.01):
        assert float(epsilon_text(value)) >= value


def test_the_ledger_section_composes_every_recorded_run(tmp_path):
    from sweeps.ledger import PlannedRun, ledger_lines, record_runs
    from trainables.data.ledger import read_ledger
    from trainables.privacy.ledger import compose_ledger
    from trainables.privacy.planning import plan_privacy

    released = rows(dataset=["site-a", "site-b"], delta=[1e-5, 1e-5])
    text = _ledger_section(_paths(tmp_path), released, released)
    assert "`site-a`: no runs recorded" in text and "`site-b`: no runs recorded" in text

    privacy = plan_privacy(PrivacyConfig(target_epsilon=2.0, delta=1e-5, expected_batch_size=32, epochs=2), 600)
    runs = [PlannedRun(f"run-{i}", "other", f"trial-{i}", privacy, 3) for i in range(2)]
    (tmp_path / "data" / "site-a").mkdir(parents=True)
    assert record_runs(tmp_path / "data", "site-a", runs) == 2
    text = _ledger_section(_paths(tmp_path), released, released)
    total = compose_ledger(read_ledger(tmp_path / "data", "site-a"), 1e-5)
    assert total.epsilon_rdp > 2.0  # two runs at epsilon 2 compose to more
    assert "`site-a`: " + "; ".join(ledger_lines(total)) in text and "`site-b`: no runs recorded" in text


def _paths(root):
    from sweeps.plan import SweepPaths

    return SweepPaths(root / "runs", root / "data", f"sqlite:///{root / 'runs' / 'mlflow.db'}")


# ---------------------------------------------------------------------------------------------------------
# Refusals: one message naming the option, the value and the fix; nothing written.


@pytest.fixture
def sweep(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_yaml())
    return spec, tmp_path / "runs"


def write_tables(runs, trials: pd.DataFrame) -> None:
    folder = runs / "tiny"
    folder.mkdir(parents=True)
    trials.to_parquet(folder / N.TRIALS_FILE, index=False)
    pd.DataFrame({"trial": trials["trial"], "epoch": 1}).to_parquet(folder / N.EPOCHS_FILE, index=False)


def release(spec, runs, out, *flags) -> int:
    return main(
        ["release", str(spec), "--runs", str(runs), "--data", str(runs.parent / "data"), "--out", str(out), *flags]
    )


def test_refuses_an_out_folder_that_holds_anything(sweep, tmp_path, capsys):
    spec, runs = sweep
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert release(spec, runs, out) == 2
    error = capsys.readouterr().err
    assert f"--out {out}: exists and is not empty" in error and "name another one" in error
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_refuses_a_sweep_without_tables_and_names_the_command_that_builds_them(sweep, tmp_path, capsys):
    spec, runs = sweep
    assert release(spec, runs, tmp_path / "bundle") == 2
    error = capsys.readouterr().err
    assert "no trial table at" in error and f"`dpsweep table {spec}`" in error
    assert not (tmp_path / "bundle").exists()


def test_refuses_a_release_with_no_trial_left(sweep, tmp_path, capsys):
    spec, runs = sweep
    write_tables(
        runs,
        rows(
            trial=["baseline", "replayable"],
            status=["TERMINATED", "TERMINATED"],
            target_epsilon=[math.inf, 2.0],
            noise_multiplier=[0.0, 1.1],
            reproducible_noise=[False, True],
        ),
    )
    assert release(spec, runs, tmp_path / "bundle") == 2
    error = capsys.readouterr().err
    assert "none of its 2 trials has a DP guarantee" in error and "--include-non-private" in error
    assert not (tmp_path / "bundle").exists()


def test_refuses_models_without_the_trials_checkpoints(sweep, tmp_path, capsys):
    spec, runs = sweep
    write_tables(
        runs,
        rows(
            trial=["private"],
            status=["TERMINATED"],
            target_epsilon=[2.0],
            noise_multiplier=[1.1],
            reproducible_noise=[False],
        ),
    )
    assert release(spec, runs, tmp_path / "bundle", "--models") == 2
    error = capsys.readouterr().err
    assert "--models: no Ray experiment folder at" in error and "leave out --models" in error
    assert not (tmp_path / "bundle").exists()
