"""Pareto fronts of a sweep's trials over (privacy, utility, fairness), or any objectives chosen by column.

Definitions, with every objective turned into "lower is better" (a maximized column is negated):

- Trial ``a`` *dominates* trial ``b`` when ``a`` is no worse than ``b`` in every objective and strictly
  better in at least one. Identical points do not dominate each other, so all copies of a non-dominated
  point are on the front.
- The *front* (rank 1) is the set of eligible trials no eligible trial dominates; rank ``r + 1`` is the
  front of what remains after removing ranks ``1..r`` (non-dominated sorting, Deb et al. 2002).
- A trial is *eligible* when its ``status`` is ``TERMINATED`` and none of its objective values is NaN.
  Ineligible trials (failed, running, or missing a metric) stay in the returned table with rank <NA>
  and are never on a front, and never dominate anything.
- Infinite values are ordinary values: the non-private baseline's epsilon ``inf`` is the worst possible
  privacy, so it reaches the front only by being better in another objective.

Pure pandas/numpy; the comparison is exact (no tolerance): two AUROCs that differ in the last bit are
different values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from analysis.tables import FINISHED, without_guarantee
from trainables import names

ELIGIBLE = "pareto_eligible"
"""Added column: True for a finished trial with every objective defined."""
RANK = "pareto_rank"
"""Added column: non-dominated sorting rank (1 = on the front), <NA> for ineligible trials."""
ON_FRONT = "on_front"
"""Added column: ``pareto_rank == 1``."""

_CHUNK_PAIRS = 1 << 22
"""Point pairs compared per block (bounds the temporary boolean arrays to a few tens of MiB)."""


@dataclass(frozen=True)
class Objective:
    """One axis of the front: a numeric column and whether lower or higher values are better.

    Attributes:
        column: a column of the trial table, usually a metric-name constant (`trainables.names`).
        direction: ``"min"`` (lower is better) or ``"max"`` (higher is better).
    """

    column: str
    direction: Literal["min", "max"]

    def __post_init__(self) -> None:
        if self.direction not in ("min", "max"):
            raise ValueError(f"Objective {self.column!r}: direction must be 'min' or 'max', got {self.direction!r}")


PRIVACY = Objective(names.EPSILON, "min")
"""Epsilon spent by the whole training run (``inf`` for the non-private baseline)."""
UTILITY = Objective(names.TEST_AUROC_MACRO, "max")
"""Macro test AUROC of the selected epoch's model."""
FAIRNESS = Objective(names.auroc_gap("test", "age"), "min")
"""Max minus min subgroup macro test AUROC over the age groups."""
STUDY_OBJECTIVES: tuple[Objective, ...] = (PRIVACY, UTILITY, FAIRNESS)


def pareto_ranks(values: np.ndarray) -> np.ndarray:
    """Non-dominated sorting ranks of points to minimize: int64 [n], 1 for the front.

    Args:
        values: float array [n, k], one row per point, every column to be minimized; no NaN (``inf``
            and ``-inf`` are allowed and compare as usual).

    Uses O(n^2) time and O(n^2) bits of memory (the domination matrix): fine up to ~10^4 points.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"pareto_ranks: values must be 2-D [points, objectives], got shape {values.shape}")
    if np.isnan(values).any():
        row = int(np.flatnonzero(np.isnan(values).any(axis=1))[0])
        raise ValueError(f"pareto_ranks: row {row} holds NaN; drop points with undefined objectives first")
    n = values.shape[0]
    dominates = _domination_matrix(values)  # [j, i]: j dominates i
    dominators = dominates.sum(axis=0)
    ranks = np.zeros(n, dtype=np.int64)
    current = np.flatnonzero(dominators == 0)
    rank = 0
    while current.size:
        rank += 1
        ranks[current] = rank
        dominators = dominators - dominates[current].sum(axis=0)
        dominators[ranks > 0] = -1  # ranked points never re-enter
        current = np.flatnonzero(dominators == 0)
    return ranks


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Boolean mask [n] of the points no other point dominates (all to be minimized; see `pareto_ranks`)."""
    mask: np.ndarray = pareto_ranks(values) == 1  # numpy types an array comparison as Any
    return mask


def _domination_matrix(values: np.ndarray) -> np.ndarray:
    n = values.shape[0]
    out = np.zeros((n, n), dtype=bool)
    rows = max(1, _CHUNK_PAIRS // max(n, 1))
    for start in range(0, n, rows):
        block = values[start : start + rows, None, :]  # candidate dominators j
        no_worse = (block <= values[None, :, :]).all(axis=2)
        better = (block < values[None, :, :]).any(axis=2)
        out[start : start + rows] = no_worse & better
    return out


def pareto_front(
    trials: pd.DataFrame,
    objectives: Sequence[Objective] = STUDY_OBJECTIVES,
    by: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """The trial table with Pareto columns added: `ELIGIBLE`, `RANK` and `ON_FRONT`.

    Args:
        trials: one row per trial, with a ``status`` column and every objective's column.
        objectives: the axes (at least one); default epsilon down, macro test AUROC up, age AUROC gap down.
        by: column(s) to compute one front per group (e.g. ``"init"``); None for one overall front.

    Returns:
        A copy of ``trials`` (same rows, same order, same index) with the three columns added.

    Raises:
        KeyError: an objective or ``by`` column is missing (the message lists similar columns).
        ValueError: no objectives, or an objective column is not numeric.
    """
    if not objectives:
        raise ValueError("pareto_front: give at least one Objective")
    for column in ("status", *(o.column for o in objectives), *_as_list(by)):
        if column not in trials.columns:
            similar = [c for c in trials.columns if column.split("/")[-1] in c][:8]
            raise KeyError(f"pareto_front: column {column!r} not in the trial table; similar columns: {similar}")
    signed = []
    for objective in objectives:
        column = trials[objective.column]
        if not (pd.api.types.is_numeric_dtype(column) or column.isna().all()):
            raise ValueError(f"pareto_front: objective column {objective.column!r} must be numeric, got {column.dtype}")
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        signed.append(values if objective.direction == "min" else -values)
    matrix = np.column_stack(signed) if len(trials) else np.zeros((0, len(objectives)))
    eligible = ((trials["status"] == FINISHED) & ~without_guarantee(trials)).to_numpy(dtype=bool, copy=True)
    eligible &= ~np.isnan(matrix).any(axis=1)

    ranks = np.zeros(len(trials), dtype=np.int64)
    positions = np.arange(len(trials))
    group_ids = (
        np.zeros(len(trials), dtype=np.int64)
        if by is None
        else trials.groupby(_as_list(by), dropna=False, sort=False).ngroup().to_numpy()
    )
    for group in np.unique(group_ids):
        members = positions[(group_ids == group) & eligible]
        if members.size:
            ranks[members] = pareto_ranks(matrix[members])

    out = trials.copy()
    out[ELIGIBLE] = eligible
    out[RANK] = pd.array(np.where(eligible, ranks, 0), dtype="Int64")
    out.loc[~eligible, RANK] = pd.NA
    out[ON_FRONT] = eligible & (ranks == 1)
    return out


def _as_list(by: str | Sequence[str] | None) -> list[str]:
    if by is None:
        return []
    return [by] if isinstance(by, str) else list(by)


FRONT_ID = "#"
"""Column of `front_table`: the front member's number (1, 2, ...), as the Pareto figure labels its points."""
FRONT_CONTEXT: tuple[str, ...] = ("init", "target_epsilon", "model", "dataset", "max_grad_norm", "lr", "seed")
"""Trial-table columns `front_table` shows beside the objectives (those present), so front members can be told apart."""


def front_table(
    front: pd.DataFrame, objectives: Sequence[Objective] = STUDY_OBJECTIVES, context: Sequence[str] = FRONT_CONTEXT
) -> pd.DataFrame:
    """The non-dominated trials only: one row per front member (rank 1 of `pareto_front`), numbered.

    Args:
        front: `pareto_front` output (needs its `ON_FRONT` column).
        objectives: the objective columns to show (those present in ``front``).
        context: trial-table columns to show between the trial key and the objectives (those present).

    Returns:
        Columns `FRONT_ID`, ``trial``, the ``context`` columns, the objective columns; sorted by the objectives in
        order (each from best to worst: the first objective ascending when minimized), then the trial key, and
        numbered 1..k in that order. Empty (same columns) when no trial is on the front.
    """
    if ON_FRONT not in front.columns:
        raise KeyError(f"front_table: {ON_FRONT!r} missing; pass the output of pareto_front")
    shown = [o for o in objectives if o.column in front.columns]
    columns = ["trial", *(c for c in context if c in front.columns), *(o.column for o in shown)]
    members = front.loc[front[ON_FRONT].to_numpy(dtype=bool), columns]
    members = members.sort_values(
        [*(o.column for o in shown), "trial"], ascending=[*(o.direction == "min" for o in shown), True], kind="stable"
    ).reset_index(drop=True)
    members.insert(0, FRONT_ID, np.arange(1, len(members) + 1, dtype=np.int64))
    return members
