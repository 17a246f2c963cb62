"""Pareto fronts on hand-made tables: ties, NaN, failed trials, infinite epsilon, groups."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import (
    ELIGIBLE,
    FRONT_ID,
    ON_FRONT,
    RANK,
    STUDY_OBJECTIVES,
    Objective,
    front_table,
    non_dominated,
    pareto_front,
    pareto_ranks,
)
from trainables import names

EPS, AUROC, GAP = names.EPSILON, names.TEST_AUROC_MACRO, names.auroc_gap("test", "age")
INF, NAN = math.inf, math.nan

# name, status, epsilon (down), AUROC (up), age gap (down), expected rank (None: ineligible)
ROWS = [
    ("A", "TERMINATED", 1.0, 0.80, 0.10, 1),
    ("B", "TERMINATED", 1.0, 0.80, 0.10, 1),  # identical to A: both on the front
    ("C", "TERMINATED", 1.0, 0.75, 0.10, 2),  # dominated by A and B only
    ("D", "TERMINATED", 3.0, 0.85, 0.05, 1),
    ("E", "TERMINATED", INF, 0.90, 0.20, 1),  # non-private, best AUROC: on the front
    ("F", "ERROR", 0.5, 0.99, 0.00, None),  # would dominate everything, but failed
    ("G", "TERMINATED", 2.0, NAN, 0.10, None),  # AUROC missing
    ("H", "TERMINATED", INF, 0.85, 0.05, 2),  # D is as good in AUROC and gap, better in epsilon
    ("I", "TERMINATED", INF, 0.70, 0.30, 3),  # dominated by H, which is rank 2
    ("J", "RUNNING", 1.0, 0.80, 0.10, None),
]


def hand_table() -> pd.DataFrame:
    frame = pd.DataFrame(ROWS, columns=["trial", "status", EPS, AUROC, GAP, "expected"])
    frame.index = [f"row{i}" for i in range(len(frame))]  # a non-default index must survive
    return frame


def test_front_with_ties_nan_failed_and_infinite_epsilon():
    table = hand_table()
    out = pareto_front(table.drop(columns="expected"))
    assert list(out.index) == list(table.index) and len(out) == len(table)  # nothing dropped, order kept
    expected = table["expected"]
    assert out[ELIGIBLE].tolist() == expected.notna().tolist()
    assert out[RANK].tolist() == [pd.NA if pd.isna(r) else int(r) for r in expected]
    assert out.loc[out[ON_FRONT], "trial"].tolist() == ["A", "B", "D", "E"]
    assert str(out[RANK].dtype) == "Int64"
    pd.testing.assert_frame_equal(out[table.columns.drop("expected")], table.drop(columns="expected"))


def test_objectives_by_column_and_direction():
    table = hand_table()
    # Only AUROC up: E (0.90) alone; F would win but failed.
    out = pareto_front(table, [Objective(AUROC, "max")])
    assert out.loc[out[ON_FRONT], "trial"].tolist() == ["E"]
    # Only AUROC *down*: I (0.70) alone.
    out = pareto_front(table, [Objective(AUROC, "min")])
    assert out.loc[out[ON_FRONT], "trial"].tolist() == ["I"]
    # Epsilon down only: A, B, C, J tie at 1.0 but J is running.
    out = pareto_front(table, [Objective(EPS, "min")])
    assert out.loc[out[ON_FRONT], "trial"].tolist() == ["A", "B", "C"]
    # NaN in an objective not used does not make a trial ineligible.
    out = pareto_front(table, [Objective(EPS, "min"), Objective(GAP, "min")])
    assert bool(out.set_index("trial").at["G", ELIGIBLE])


def test_fronts_per_group():
    table = hand_table()
    table["init"] = ["x", "x", "x", "y", "y", "y", "y", "y", "x", "x"]
    out = pareto_front(table, by="init").set_index("trial")
    # Group x: A, B (tie), C, I (J running). I (inf, .70, .30) is dominated by A, B and C: rank 3.
    assert out.loc[["A", "B", "C", "I"], RANK].tolist() == [1, 1, 2, 3]
    # Group y: D, E, H (F failed, G NaN). H is dominated by D.
    assert out.loc[["D", "E", "H"], RANK].tolist() == [1, 1, 2]
    grouped = pareto_front(table, by=["init"])
    assert grouped[RANK].tolist() == pareto_front(table, by="init")[RANK].tolist()


def naive_ranks(values: np.ndarray) -> np.ndarray:
    """Reference: peel fronts with the plain definition of dominance."""
    n = len(values)
    ranks = np.zeros(n, dtype=int)
    remaining = set(range(n))
    rank = 0
    while remaining:
        rank += 1
        front = [
            i
            for i in remaining
            if not any(np.all(values[j] <= values[i]) and np.any(values[j] < values[i]) for j in remaining)
        ]
        for i in front:
            ranks[i] = rank
        remaining -= set(front)
    return ranks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_a_naive_reference_with_ties_and_infinities(seed):
    rng = np.random.default_rng(seed)
    values = np.round(rng.uniform(0, 1, size=(70, 3)), 1)  # coarse grid: many ties and duplicates
    values[rng.integers(0, 70, 6), 0] = np.inf
    values[rng.integers(0, 70, 3), 1] = -np.inf
    np.testing.assert_array_equal(pareto_ranks(values), naive_ranks(values))
    np.testing.assert_array_equal(non_dominated(values), naive_ranks(values) == 1)


def test_ranks_small_cases():
    assert pareto_ranks(np.zeros((0, 2))).tolist() == []
    assert pareto_ranks(np.array([[1.0, 2.0]])).tolist() == [1]
    assert pareto_ranks(np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])).tolist() == [1, 1, 2]
    # A chain: each point dominates the next.
    chain = np.array([[i, i] for i in range(5)], dtype=float)[::-1]
    assert pareto_ranks(chain).tolist() == [5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        pareto_ranks(np.array([[1.0, 2.0], [np.nan, 1.0]]))


def test_chunked_domination_matches_unchunked(monkeypatch):
    import analysis.pareto as pareto_module

    values = np.round(np.random.default_rng(5).uniform(size=(50, 2)), 1)
    expected = pareto_ranks(values)
    monkeypatch.setattr(pareto_module, "_CHUNK_PAIRS", 7)  # blocks of one row
    np.testing.assert_array_equal(pareto_ranks(values), expected)


def test_errors_name_the_problem():
    table = hand_table()
    with pytest.raises(KeyError, match="test/auroc_macr' not in the trial table"):
        pareto_front(table, [Objective("test/auroc_macr", "max")])
    with pytest.raises(KeyError, match="'site'"):
        pareto_front(table, by="site")
    with pytest.raises(ValueError, match="must be numeric"):
        pareto_front(table, [Objective("trial", "min")])
    with pytest.raises(ValueError, match="direction must be 'min' or 'max', got 'up'"):
        Objective(AUROC, "up")
    with pytest.raises(ValueError, match="at least one"):
        pareto_front(table, [])


def test_empty_and_all_failed_tables():
    empty = hand_table().iloc[:0]
    out = pareto_front(empty)
    assert out.empty and {ELIGIBLE, RANK, ON_FRONT} <= set(out.columns)
    failed = hand_table().assign(status="ERROR")
    out = pareto_front(failed)
    assert not out[ON_FRONT].any() and out[RANK].isna().all()


def test_study_objectives_use_metric_constants():
    assert [(o.column, o.direction) for o in STUDY_OBJECTIVES] == [
        (names.EPSILON, "min"),
        (names.TEST_AUROC_MACRO, "max"),
        (names.auroc_gap("test", "age"), "min"),
    ]


def test_front_is_invariant_to_row_order():
    table = hand_table().drop(columns="expected")
    reference = pareto_front(table).set_index("trial")[RANK]
    for order in itertools.islice(itertools.permutations(range(len(table))), 0, 200, 37):
        shuffled = pareto_front(table.iloc[list(order)]).set_index("trial")[RANK]
        pd.testing.assert_series_equal(shuffled.loc[reference.index], reference)


def test_front_table_lists_the_front_only_numbered_best_first():
    table = hand_table().assign(init=list("rrrdrrrddr"))
    members = front_table(pareto_front(table.drop(columns="expected")))
    # Front: A, B (eps 1), D (eps 3), E (inf); sorted by epsilon up, then AUROC down, then gap up, then key.
    assert members["trial"].tolist() == ["A", "B", "D", "E"]
    assert members[FRONT_ID].tolist() == [1, 2, 3, 4]
    assert list(members.columns) == [FRONT_ID, "trial", "init", EPS, AUROC, GAP]
    assert members["init"].tolist() == ["r", "r", "d", "r"]
    nobody = pareto_front(table.drop(columns="expected").assign(status="ERROR"))
    assert front_table(nobody).empty and list(front_table(nobody).columns) == list(members.columns)
    with pytest.raises(KeyError, match="pass the output of pareto_front"):
        front_table(table)
