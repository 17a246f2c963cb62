"""The hand-made trial table of `tests.analysis.test_seeds` (its docstring computes the results by hand), shared with
the console's seed table test."""

from __future__ import annotations

import math

import pandas as pd

from trainables import names

TEST, GAP, VAL = names.TEST_AUROC_MACRO, names.auroc_gap("test", "age"), names.VAL_SELECTED_AUROC_MACRO
T1, T2 = 12.706204736, 4.302652730
NAN, INF = math.nan, math.inf
ROWS = [  # trial, init, target, seed, lr, val, test, age gap, status
    ("r1-s0-lr1", "random", 1.0, 0, 1e-3, 0.70, 0.80, 0.30, "TERMINATED"),
    ("r1-s0-lr2", "random", 1.0, 0, 1e-2, 0.72, 0.64, 0.10, "TERMINATED"),
    ("r1-s1-lr1", "random", 1.0, 1, 1e-3, 0.75, 0.70, NAN, "TERMINATED"),
    ("r1-s1-lr2", "random", 1.0, 1, 1e-2, 0.71, 0.90, 0.50, "TERMINATED"),
    ("r1-s1-lr3", "random", 1.0, 1, 1e-1, 0.99, 0.99, 0.00, "ERROR"),
    ("rinf-s0", "random", INF, 0, 1e-3, 0.80, 0.80, 0.20, "TERMINATED"),
    ("rinf-s1", "random", INF, 1, 1e-3, 0.81, 0.82, 0.21, "TERMINATED"),
    ("rinf-s2", "random", INF, 2, 1e-3, 0.82, 0.87, 0.22, "TERMINATED"),
    ("d1-s0", "domain", 1.0, 0, 1e-3, 0.77, 0.75, 0.05, "TERMINATED"),
]


def hand_trials() -> pd.DataFrame:
    frame = pd.DataFrame(ROWS, columns=["trial", "init", "target_epsilon", "seed", "lr", VAL, TEST, GAP, "status"])
    frame["model"], frame["dataset"], frame["privacy_unit"] = "m", "d", "image"
    frame[names.EPSILON] = frame["target_epsilon"] * 0.99
    frame[names.BEST_EPOCH] = 2
    return frame


def hand_epochs(trials: pd.DataFrame) -> pd.DataFrame:
    """Two epochs per trial; the selected one (2) carries the trial's validation AUROC, epoch 1 a higher one that must
    not count (it is not the epoch the trial selected)."""
    first = trials[["trial"]].assign(epoch=1, **{names.VAL_AUROC_MACRO: 0.999})
    second = trials[["trial"]].assign(epoch=2, **{names.VAL_AUROC_MACRO: trials[VAL]})
    return pd.concat([first, second], ignore_index=True)
