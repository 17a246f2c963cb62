"""What the end of a sweep shows and writes: the console's results table and the one writer of the tables.

The tuning cost is tested in tests/sweeps/test_tuning_cost.py."""

from __future__ import annotations

import math

from trainables import names as N


def summary_trials(*, status: str = N.TERMINATED, reproducible: bool = False):
    import pandas as pd

    rows = []
    for eps in (1.0, 8.0, math.inf):
        key = f"imagenet-eps{eps:g}-clip1-lr0.0005-seed0"
        rows.append(
            {
                "trial": key,
                "status": status if eps == 8.0 else N.TERMINATED,
                "target_epsilon": eps,
                "reproducible_noise": reproducible and eps == 1.0,
                N.EPSILON: 0.987 * eps,
                N.EPSILON_REPLACE_ONE: {1.0: 1.378, 8.0: 7.351}.get(eps, math.nan),
                N.EPSILON_PATIENT: 2.5 * eps,
                N.PATIENT_IMAGES: 4,
                "noise_multiplier": 1.2 if math.isfinite(eps) else 0.0,
                N.TEST_AUROC_MACRO: 0.7,
                N.VAL_SELECTED_AUROC_MACRO: 0.71,
                N.auroc_gap("test", "age"): 0.03,
                N.auroc_gap("test", "sex"): 0.02,
                **{N.external_auroc(site): 0.6 for site in ("synthetic-b", "synthetic-c", "vindr-cxr", "padchest")},
            }
        )
    return pd.DataFrame(rows)


def test_the_console_table_is_narrow_and_says_non_private_instead_of_an_infinite_epsilon():
    from sweeps.summary import SUMMARY_WIDTH, results_table

    text = results_table(summary_trials())
    lines = text.splitlines()
    assert max(map(len, lines)) <= SUMMARY_WIDTH, text
    assert "status" not in lines[0]  # every trial finished: no column saying so
    row = next(line for line in lines if line.lstrip().startswith("imagenet-epsinf"))
    assert "non-DP" in row and "inf" not in row.split("imagenet-epsinf")[1]
    assert "7.896 7.351" in next(line for line in lines if line.lstrip().startswith("imagenet-eps8"))  # spent, repl
    assert lines[0].split()[2:4] == ["spent", "repl"]
    assert "external test sets" in text and "padchest" in text


def test_the_console_table_shows_status_when_a_trial_did_not_finish_and_marks_seeded_noise():
    from sweeps.summary import results_table

    text = results_table(summary_trials(status=N.ERROR, reproducible=True))
    assert "status" in text.splitlines()[0] and N.ERROR in text
    row = next(line for line in text.splitlines() if line.lstrip().startswith("imagenet-eps1-"))
    assert "1*" in row
    assert "no guarantee" in text.splitlines()[-1]


def test_the_summary_states_the_adjacency_and_the_replace_one_reading_per_target():
    """One statement of the adjacency (add/remove, N public) and the replace-one epsilon of each target: the largest
    of its trials with a guarantee (a reproducible_noise trial has none; the non-private baseline no target)."""
    from pathlib import Path

    import pandas as pd

    from sweeps.summary import SUMMARY_WIDTH, summary_text

    trials, sweep_dir = summary_trials(), Path("runs/smoke")
    again = trials.iloc[[0]].assign(trial="imagenet-eps1-clip1-lr0.0005-seed1", **{N.EPSILON_REPLACE_ONE: 1.401})
    seeded = trials.iloc[[1]].assign(trial="seeded", reproducible_noise=True, **{N.EPSILON_REPLACE_ONE: 9.0})
    text = summary_text(pd.concat([trials, again, seeded], ignore_index=True), sweep_dir, "sqlite:///x.db")
    flat = " ".join(text.split())
    assert "Adjacency: add/remove one record (an image; a patient with privacy_unit patient), the number of " in flat
    assert "records N treated as public." in flat
    assert "the same runs spend epsilon 1.401 at target 1, 7.351 at target 8." in flat
    assert max(len(line) for line in text.splitlines()) <= SUMMARY_WIDTH
    older = summary_text(trials.drop(columns=N.EPSILON_REPLACE_ONE), sweep_dir, "sqlite:///x.db")  # an older sweep
    assert "N treated as public." in " ".join(older.split()) and "replace-one" not in older


def test_the_one_writer_writes_evaluation_tables_only_where_some_trial_has_them(tmp_path):
    """`SweepResults.write` (the end of a sweep and `dpsweep table`, either source): the trial and epoch tables
    always; groups, bootstrap and predictions from the finished trials' final checkpoints, none when no trial
    finished (an empty groups table without its columns would make the sweep folder unreadable)."""
    import pandas as pd

    from analysis.tables import collect_trial_tables, load_tables
    from sweeps.results import SweepResults
    from tests.analysis.fixtures import SWEEP, TRIALS, FakeTrial, make_sweep, write_ray_trial

    sweep_dir = make_sweep(tmp_path / "runs")
    trials, epochs = pd.read_parquet(sweep_dir / N.TRIALS_FILE), pd.read_parquet(sweep_dir / N.EPOCHS_FILE)
    finished = collect_trial_tables(tmp_path / "runs" / "ray" / SWEEP)
    written = SweepResults(trials, epochs, finished, "here").write(tmp_path / "all")
    assert [p.name for p in written] == [
        N.TRIALS_FILE,
        N.EPOCHS_FILE,
        N.GROUPS_FILE,
        N.BOOTSTRAP_FILE,
        N.PREDICTIONS_FILE,
    ]
    assert sorted(pd.read_parquet(tmp_path / "all" / N.BOOTSTRAP_FILE)["trial"].unique()) == sorted(
        t.key for t in TRIALS if t.status == N.TERMINATED
    )

    failed = FakeTrial("x", "random", 1.0, (0.5,), (0.5,), (0.5,), status=N.ERROR)
    write_ray_trial(tmp_path / "failed" / "trial_x", failed)
    nothing_finished = collect_trial_tables(tmp_path / "failed")
    assert nothing_finished.groups.empty
    for evaluation in (nothing_finished, None):
        written = SweepResults(trials, epochs, evaluation, "here").write(tmp_path / "none")
        assert [p.name for p in written] == [N.TRIALS_FILE, N.EPOCHS_FILE]
        assert sorted(p.name for p in (tmp_path / "none").iterdir()) == sorted([N.TRIALS_FILE, N.EPOCHS_FILE])
    assert "no per-trial evaluation tables" in load_tables(tmp_path / "none").evaluation_note


def test_the_command_line_offers_the_table_sources_there_are():
    from sweeps.cli import TABLE_SOURCES
    from sweeps.results import TABLE_SOURCES as SOURCES

    assert TABLE_SOURCES == SOURCES
