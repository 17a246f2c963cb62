"""Results over seeds (`analysis.views.seed_selection`, `seed_summary`), checked against hand computations.

The hand-made trial table (model ``m``, dataset ``d``, image-level), two learning rates per seed where the grid tunes:

| trial          | init   | target | seed | lr   | val (selected epoch) | test AUROC | age gap | status     |
|----------------|--------|--------|------|------|----------------------|------------|---------|------------|
| r1-s0-lr1      | random | 1      | 0    | 1e-3 | .70                  | .80        | .30     | TERMINATED |
| r1-s0-lr2      | random | 1      | 0    | 1e-2 | .72                  | .64        | .10     | TERMINATED |
| r1-s1-lr1      | random | 1      | 1    | 1e-3 | .75                  | .70        | NaN     | TERMINATED |
| r1-s1-lr2      | random | 1      | 1    | 1e-2 | .71                  | .90        | .50     | TERMINATED |
| r1-s1-lr3      | random | 1      | 1    | 1e-1 | .99                  | .99        | .00     | ERROR      |
| rinf-s0        | random | inf    | 0    | 1e-3 | .80                  | .80        | .20     | TERMINATED |
| rinf-s1        | random | inf    | 1    | 1e-3 | .81                  | .82        | .21     | TERMINATED |
| rinf-s2        | random | inf    | 2    | 1e-3 | .82                  | .87        | .22     | TERMINATED |
| d1-s0          | domain | 1      | 0    | 1e-3 | .77                  | .75        | .05     | TERMINATED |

Within each seed validation chooses (never test): random at 1 takes r1-s0-lr2 (.64) and r1-s1-lr1 (.70); the failed
trial takes no part. By hand, with t(0.975, 1) = 12.706204736 and t(0.975, 2) = 4.302652730 (Student-t tables):

- random, 1, test AUROC: mean (.64 + .70) / 2 = .67; sd = |.70 - .64| / sqrt(2) = .0424264; half-width
  t * sd / sqrt(2) = 12.706204736 * .03 = .381186; interval [.288814, 1.051186]; n = 2.
- random, 1, age gap: .10 and NaN: n = 1, mean .10, sd and interval NaN.
- random, inf, test AUROC: mean .83; deviations -.03, -.01, .04: sd = sqrt(.0026 / 2) = .0360555; half-width
  4.302652730 * .0360555 / sqrt(3) = .0895668.
- domain, 1: one seed, n = 1, mean .75, sd and interval NaN.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import views
from tests.analysis.seed_tables import GAP, INF, T1, T2, TEST, hand_epochs, hand_trials
from trainables.names import EPOCHS_FILE, TRIALS_FILE


def row(frame: pd.DataFrame, init: str, target: float, metric: str | None = None) -> pd.Series:
    rows = frame[(frame["init"] == init) & (frame["target_epsilon"] == target)]
    if metric is not None:
        rows = rows[rows[views.METRIC] == metric]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_mean_over_seeds_by_hand():
    spread = views.mean_over_seeds([0.64, 0.70])
    assert (spread.n, spread.mean, spread.sd) == (2, pytest.approx(0.67), pytest.approx(0.06 / math.sqrt(2)))
    assert (spread.ci_low, spread.ci_high) == (pytest.approx(0.67 - T1 * 0.03), pytest.approx(0.67 + T1 * 0.03))
    three = views.mean_over_seeds([0.80, 0.82, np.nan, 0.87])  # NaN left out: n = 3
    half = T2 * math.sqrt(0.0013) / math.sqrt(3)
    assert (three.n, three.mean, three.sd) == (3, pytest.approx(0.83), pytest.approx(math.sqrt(0.0013)))
    assert (three.ci_low, three.ci_high) == (pytest.approx(0.83 - half), pytest.approx(0.83 + half))
    assert half == pytest.approx(0.0895668, abs=1e-7)
    one = views.mean_over_seeds([0.75])
    assert one.n == 1 and one.mean == 0.75 and all(math.isnan(v) for v in (one.sd, one.ci_low, one.ci_high))
    assert views.mean_over_seeds([np.nan]).n == 0
    with pytest.raises(ValueError, match="confidence must lie in"):
        views.mean_over_seeds([1.0, 2.0], confidence=95)


@pytest.mark.parametrize("with_epochs", [False, True], ids=["trials' own val", "epochs table"])
def test_validation_chooses_within_each_seed(with_epochs):
    trials = hand_trials()
    chosen = views.seed_selection(trials, hand_epochs(trials) if with_epochs else None)
    assert list(chosen.columns[:6]) == ["model", "dataset", "init", "privacy_unit", "target_epsilon", "seed"]
    picked = {(r.init, r.target_epsilon, r.seed): r.trial for r in chosen.itertuples()}
    assert picked == {
        ("domain", 1.0, 0): "d1-s0",
        ("random", 1.0, 0): "r1-s0-lr2",  # val .72 over .70; its test (.64) is the lower one
        ("random", 1.0, 1): "r1-s1-lr1",  # val .75; the failed trial's .99 takes no part
        ("random", INF, 0): "rinf-s0",
        ("random", INF, 1): "rinf-s1",
        ("random", INF, 2): "rinf-s2",
    }
    assert chosen.set_index("trial").loc["r1-s1-lr1", views.CANDIDATE_TRIALS] == 2


def test_seed_summary_equals_the_hand_computation():
    summary = views.seed_summary(hand_trials())
    assert list(summary.columns) == [
        *views.SEED_CELL,
        "metric",
        "n",
        "mean",
        "sd",
        "ci_low",
        "ci_high",
        "seeds",
    ]
    assert summary[views.METRIC].unique().tolist() == [TEST, GAP]
    auroc = row(summary, "random", 1.0, TEST)
    assert (auroc["n"], auroc["seeds"]) == (2, "0, 1")
    assert auroc["mean"] == pytest.approx(0.67) and auroc["sd"] == pytest.approx(0.0424264, abs=1e-7)
    assert (auroc["ci_low"], auroc["ci_high"]) == (pytest.approx(0.288814, abs=1e-6), pytest.approx(1.051186, abs=1e-6))
    gap = row(summary, "random", 1.0, GAP)  # seed 1's chosen trial has no age gap
    assert (gap["n"], gap["mean"]) == (1, pytest.approx(0.10)) and math.isnan(gap["sd"]) and math.isnan(gap["ci_low"])
    baseline = row(summary, "random", INF, TEST)
    assert (baseline["n"], baseline["seeds"]) == (3, "0, 1, 2")
    assert baseline["mean"] == pytest.approx(0.83) and baseline["sd"] == pytest.approx(0.0360555, abs=1e-7)
    assert baseline["ci_high"] - baseline["mean"] == pytest.approx(0.0895668, abs=1e-7)
    single = row(summary, "domain", 1.0, TEST)
    assert (single["n"], single["mean"]) == (1, 0.75) and math.isnan(single["sd"]) and math.isnan(single["ci_high"])
    # cells in order: domain before random, target 1 before the non-private baseline
    assert summary[["init", "target_epsilon"]].drop_duplicates().values.tolist() == [
        ["domain", 1.0],
        ["random", 1.0],
        ["random", INF],
    ]


def test_several_seeds_and_the_trials_without_a_guarantee():
    trials = hand_trials()
    assert views.several_seeds(trials)
    assert not views.several_seeds(trials[trials["seed"] == 0])
    assert not views.several_seeds(trials.drop(columns="seed"))
    # A trial whose noise seed is published has no guarantee: it is never one of a cell's seeds.
    trials["reproducible_noise"] = trials["trial"] == "r1-s1-lr1"
    picked = views.seed_selection(trials).set_index(["init", "target_epsilon", "seed"])["trial"]
    assert picked[("random", 1.0, 1)] == "r1-s1-lr2"


def test_a_table_without_privacy_unit_keeps_the_other_cell_columns():
    summary = views.seed_summary(hand_trials().drop(columns="privacy_unit"), metrics=[TEST])
    assert "privacy_unit" not in summary and row(summary, "random", 1.0)["n"] == 2


# ---------------------------------------------------------------------------------------------------------
# The report of a two-seed sweep: the fixture sweep of `tests.analysis.fixtures` (seed 0) and a copy of each of its
# trials with seed 1 (key suffix ``-s1``), whose test AUROCs are 0.02 higher and whose validation AUROCs are the same.
# By hand, random init at target epsilon 1: each seed takes its `random-eps1` trial (validation .65 at epoch 2 over
# `random-eps1-lr`'s .63), test AUROC .62 and .64: mean .63, sd .02 / sqrt(2) = .0141421, half-width
# t(0.975, 1) * .01 = .1270620; age gap .10 + .01 * (len(key) % 7): .14 and .10, mean .12, sd .0282843.


def two_seed_sweep(tmp_path: Path) -> Path:
    from tests.analysis.fixtures import SWEEP, TRIALS, make_sweep

    sweep_dir = make_sweep(tmp_path / "runs")
    copies = tuple(dataclasses.replace(t, key=f"{t.key}-s1", test=tuple(x + 0.02 for x in t.test)) for t in TRIALS)
    other = make_sweep(tmp_path / "second", copies)
    for name in (TRIALS_FILE, EPOCHS_FILE):
        first, second = pd.read_parquet(sweep_dir / name), pd.read_parquet(other / name)
        second["seed"] = 1
        pd.concat([first, second], ignore_index=True).to_parquet(sweep_dir / name, index=False)
    for folder in (tmp_path / "second" / "ray" / SWEEP).iterdir():  # the copies' final checkpoints (bootstrap)
        shutil.move(folder, tmp_path / "runs" / "ray" / SWEEP / folder.name)
    return sweep_dir


def test_a_two_seed_sweeps_report_shows_mean_sd_interval_and_n_per_cell(tmp_path):
    from analysis.report import write_report

    index = write_report(two_seed_sweep(tmp_path))
    page = index.read_text(encoding="utf-8")
    section = page.split("<h2>Over seeds: mean, sd and 95% interval per cell</h2>")[1].split("<h2>")[0]
    seeds = pd.read_csv(index.parent / "tables" / "seeds.csv")
    cell = seeds[(seeds["init"] == "random") & (seeds["target_epsilon"] == 1.0)].set_index("metric")
    auroc, gap = cell.loc[TEST], cell.loc[GAP]
    assert (auroc["n"], auroc["seeds"]) == (2, "0, 1")
    assert auroc["mean"] == pytest.approx(0.63) and auroc["sd"] == pytest.approx(0.0141421, abs=1e-7)
    assert auroc["ci_low"] == pytest.approx(0.63 - 0.1270620, abs=1e-6)
    assert auroc["ci_high"] == pytest.approx(0.63 + 0.1270620, abs=1e-6)
    assert (gap["n"], gap["mean"]) == (2, pytest.approx(0.12)) and gap["sd"] == pytest.approx(0.0282843, abs=1e-7)
    # the page: the AUROC table's row for that cell reads n, mean, sd and the interval
    auroc_table = section.split("seeds_test_auroc_macro")[0]
    row = "<td>test_convnext</td>\\s*<td>synthetic-a</td>\\s*<td>random</td>\\s*<td>image</td>\\s*<td>1.000</td>"
    assert re.search(
        row + "\\s*<td>2</td>\\s*<td>0.630</td>\\s*<td>0.014</td>\\s*<td>0.503</td>\\s*<td>0.757</td>", auroc_table
    ), auroc_table
    assert 'href="tables/seeds.csv"' in section and 'href="tables/seed_selection.csv"' in section
    chosen = pd.read_csv(index.parent / "tables" / "seed_selection.csv")
    assert set(chosen.loc[(chosen["init"] == "random") & (chosen["target_epsilon"] == 1.0), "trial"]) == {
        "random-eps1",
        "random-eps1-s1",
    }
    # the paired bootstrap compares the inits seed by seed
    pairs = pd.read_csv(index.parent / "tables" / "paired_bootstrap.csv")
    assert set(pairs["seed"]) == {0, 1}
    for pair in pairs.itertuples():
        assert pair.trial_1.endswith("-s1") == pair.trial_2.endswith("-s1") == (pair.seed == 1)


def test_a_one_seed_sweeps_report_says_there_is_nothing_to_aggregate(tmp_path):
    from analysis.report import write_report
    from tests.analysis.fixtures import make_sweep

    page = write_report(make_sweep(tmp_path / "runs")).read_text(encoding="utf-8")
    section = page.split("<h2>Over seeds: mean, sd and 95% interval per cell</h2>")[1].split("<h2>")[0]
    assert "finished trials of one seed only" in section and "<table" not in section
    pairs = pd.read_csv(tmp_path / "runs" / "fixture" / "report" / "tables" / "paired_bootstrap.csv")
    assert "seed" not in pairs.columns  # one seed: the comparison as before
