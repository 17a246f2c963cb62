"""The study's tables as DataFrames: AUROC by init and epsilon bin, cross-dataset AUROC, subgroup AUROC,
fairness gaps and paired bootstrap p-values between inits. Groups recomputed from the stored predictions
(intersectional sex x age bin, any manifest column) are `analysis.subgroups.group_metrics` and `group_gaps`,
re-exported here.

**Epsilon bins.** The study reports results in bins of *spent* epsilon: (0, 1], (1, 3], (3, 10] and the
non-private baseline (epsilon = inf). A bin holds the epsilons ``low < epsilon <= high``; the non-private
bin holds exactly ``inf``. An epsilon in no bin (e.g. 12) is left out of the binned views.

**Two kinds of rows.**

- *Per-epoch* (`best_epochs_by_bin`, `auroc_by_bin`): every epoch's checkpoint counts, binned by the
  epsilon spent when it was written (``privacy/epsilon`` in ``epochs.parquet``), as in the study. For one
  trial and one bin, the selected epoch is the one with the highest validation macro AUROC
  (``val/auroc_macro``) among the trial's epochs whose spent epsilon lies in the bin; ties go to the
  earliest epoch. Its test AUROC (``test/auroc_macro_at_epoch``) is reported and never used to choose.
  Selecting among epochs ``<= k`` uses nothing released after epoch ``k``, so the selected model's
  guarantee is the epsilon spent at the bin's last epoch of that trial, which lies in the bin (this
  treats the validation split as the study treats its selection split: outside the accounting).
- *Final-model* (`final_selection` and the views built on it): the metrics each trial reports at the
  end (``trials.parquet``), for the epoch its training selected on validation. The model's bin is that of
  the epsilon spent by the *whole* run (``privacy/epsilon``), because the choice of epoch looked at the
  validation scores of every epoch.

**Choosing among trials.** Where several trials (other learning rates, clip norms, seeds or target
epsilons) fall into one cell (model, dataset, init, bin), the reported one is the trial with the highest
validation macro AUROC at its selected epoch; ties go to the lower spent epsilon, then to the trial key
in sort order. Every view keeps ``trial`` so a number can be traced back, and ``candidate_trials``
counts the trials the cell chose from. Only finished trials (``status == "TERMINATED"``) take part.

**Over seeds** (`seed_selection`, `seed_summary`). The views above report one trial per cell, the best on
validation over every seed. The seed views instead keep each seed: per cell (model, dataset, init, privacy unit,
*target* epsilon: `SEED_CELL`) and seed, the trial with the best validation macro AUROC at its selected epoch (the
learning rate, clip norm and whatever else the grid tunes are chosen within the seed, as above; test never
chooses), then each test metric of those trials is summarised over the seeds: n (seeds with a defined value), the
mean, the sample standard deviation (ddof = 1) and the 95% Student-t interval mean +/- t(0.975, n - 1) sd / sqrt(n)
(`mean_over_seeds`); with one seed the sd and interval are NaN. Paired bootstrap comparisons stay per seed
(`paired_p_values` on `final_selection` with ``seed`` among its cell columns).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import stdtrit

from analysis.subgroups import group_gaps, group_metrics  # noqa: F401 (views from stored predictions, re-exported)
from analysis.tables import FINISHED, train_fractions, without_guarantee
from trainables import names
from trainables.evaluate.bootstrap import paired_p_value
from trainables.evaluate.fairness import ATTRIBUTES

BIN = "bin"
TRIAL = "trial"
CANDIDATE_TRIALS = "candidate_trials"
CANDIDATE_EPOCHS = "candidate_epochs"
DEFAULT_BY: tuple[str, ...] = ("model", "dataset", "init")
"""Cells of the study's tables: one per model, training dataset and init (and bin)."""
FAIRNESS_EXTRAS: tuple[str, ...] = ("auroc_gap_label_mean", "worst_group_auroc")
"""Fairness columns besides `trainables.names.FAIRNESS_METRICS`."""


@dataclass(frozen=True)
class EpsilonBin:
    """A range of spent epsilon: ``low < epsilon <= high``; ``low = high = inf`` is the non-private bin.

    Attributes:
        label: name used as column/row label, e.g. ``"(1, 3]"``.
        low: exclusive lower edge (>= 0).
        high: inclusive upper edge (> low, or inf for the non-private bin).
    """

    label: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (self.low >= 0 and (self.low < self.high or (math.isinf(self.low) and math.isinf(self.high)))):
            raise ValueError(
                f"EpsilonBin {self.label!r}: need 0 <= low < high (or low = high = inf for the "
                f"non-private bin), got low={self.low}, high={self.high}"
            )

    @property
    def is_non_private(self) -> bool:
        return math.isinf(self.low)

    def contains(self, epsilon: ArrayLike) -> np.ndarray:
        """Boolean mask of the epsilons in this bin (NaN is in no bin)."""
        epsilon = np.asarray(epsilon, dtype=np.float64)
        if self.is_non_private:
            return np.isposinf(epsilon)
        return (epsilon > self.low) & (epsilon <= self.high)


STUDY_BINS: tuple[EpsilonBin, ...] = (
    EpsilonBin("(0, 1]", 0.0, 1.0),
    EpsilonBin("(1, 3]", 1.0, 3.0),
    EpsilonBin("(3, 10]", 3.0, 10.0),
    EpsilonBin("inf", math.inf, math.inf),
)
"""The study's bins: 0 < eps <= 1, 1 < eps <= 3, 3 < eps <= 10, and the non-private baseline."""


def check_bins(bins: Sequence[EpsilonBin]) -> tuple[EpsilonBin, ...]:
    """Validate that bins have distinct labels and do not overlap; returns them as a tuple."""
    bins = tuple(bins)
    if not bins:
        raise ValueError("epsilon bins: give at least one EpsilonBin")
    labels = [b.label for b in bins]
    if len(set(labels)) != len(labels):
        raise ValueError(f"epsilon bins: labels must be distinct, got {labels}")
    ordered = sorted(bins, key=lambda b: (b.low, b.high))
    for before, after in itertools.pairwise(ordered):
        if after.low < before.high and not (before.is_non_private or after.is_non_private):
            raise ValueError(
                f"epsilon bins {before.label!r} and {after.label!r} overlap; each epsilon must fall in at most one bin"
            )
        if before.is_non_private and after.is_non_private:
            raise ValueError(f"epsilon bins {before.label!r} and {after.label!r} are both the non-private bin")
    return bins


def assign_bins(epsilon: ArrayLike, bins: Sequence[EpsilonBin] = STUDY_BINS) -> pd.Categorical:
    """The bin of each epsilon, as an ordered categorical (categories in the order of ``bins``; NaN: none)."""
    bins = check_bins(bins)
    epsilon = np.asarray(epsilon, dtype=np.float64)
    codes = np.full(epsilon.shape, -1, dtype=np.int64)
    for code, epsilon_bin in enumerate(bins):
        codes[epsilon_bin.contains(epsilon)] = code
    return pd.Categorical.from_codes(codes, categories=[b.label for b in bins], ordered=True)


def best_epochs_by_bin(
    epochs: pd.DataFrame,
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    values: Sequence[str] = (names.TEST_AUROC_MACRO_AT_EPOCH,),
) -> pd.DataFrame:
    """For each trial and bin, the epoch with the best validation AUROC among those spent within the bin.

    Epochs whose ``val/auroc_macro`` is NaN cannot be selected. Ties in validation AUROC go to the earliest
    epoch. See the module docstring for why this does not peek at test. Every trial in ``epochs`` takes part;
    `auroc_by_bin` passes only the epochs of finished trials. The ``values`` columns are only reported: a NaN
    there never changes which epoch is selected.

    Args:
        epochs: ``epochs.parquet`` rows (``trial``, ``epoch``, ``privacy/epsilon``, ``val/auroc_macro`` and
            the ``values`` columns).
        bins: the epsilon bins.
        values: per-epoch columns to report for the selected epoch (default: ``test/auroc_macro_at_epoch``).

    Returns:
        One row per (trial, bin) that has a selectable epoch: ``trial``, ``bin`` (categorical), ``epoch``,
        ``privacy/epsilon``, ``val/auroc_macro``, the ``values`` columns of that epoch, and
        ``candidate_epochs`` (selectable epochs in the bin).
    """
    columns = [
        TRIAL,
        names.EPOCH,
        names.EPSILON,
        names.VAL_AUROC_MACRO,
        *(v for v in values if v not in (names.EPSILON, names.VAL_AUROC_MACRO)),
    ]
    _require(epochs, columns, "epochs table", hint=_PER_EPOCH_HINTS)
    frame = epochs[columns].copy()
    frame[BIN] = assign_bins(frame[names.EPSILON], bins)
    frame = frame[frame[BIN].notna() & frame[names.VAL_AUROC_MACRO].notna()]
    frame = frame.sort_values(
        [TRIAL, BIN, names.VAL_AUROC_MACRO, names.EPOCH], ascending=[True, True, False, True], kind="stable"
    )
    keys = [TRIAL, BIN]
    best = frame.groupby(keys, observed=True, sort=False).head(1)
    counts = frame.groupby(keys, observed=True).size().rename(CANDIDATE_EPOCHS).reset_index()
    best = best.merge(counts, on=keys, how="left")
    return best[[TRIAL, BIN, *columns[1:], CANDIDATE_EPOCHS]].reset_index(drop=True)


def auroc_by_bin(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    by: Sequence[str] = DEFAULT_BY,
) -> pd.DataFrame:
    """On-domain test AUROC per cell (model, dataset, init, bin) from every epoch's spent epsilon.

    Per trial and bin the epoch is chosen as in `best_epochs_by_bin`; per cell, the trial as in the module
    docstring (best validation AUROC of its chosen epoch).

    Returns:
        One row per cell that has a selectable epoch: the ``by`` columns, ``bin``, ``trial``, ``epoch``,
        ``privacy/epsilon``, ``val/auroc_macro``, ``test/auroc_macro_at_epoch``, ``candidate_epochs`` (of
        the chosen trial) and ``candidate_trials``; sorted by ``by`` then bin.
    """
    return epochs_by_bin(trials, epochs, (names.TEST_AUROC_MACRO_AT_EPOCH,), bins, by)


def epochs_by_bin(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    values: Sequence[str],
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    by: Sequence[str] = DEFAULT_BY,
) -> pd.DataFrame:
    """Per cell (``by`` columns and bin), the chosen trial's chosen epoch, reporting the per-epoch ``values``.

    The one selection rule of the per-epoch views (`auroc_by_bin`, `fairness_gap_by_bin`): per finished
    trial and bin, the epoch of `best_epochs_by_bin`; per cell, the trial whose chosen epoch has the best
    validation AUROC (ties: lower epsilon, then trial key). ``values`` are reported, never used to choose,
    so every per-epoch view shows the same (trial, epoch) in a cell.

    Returns:
        One row per cell that has a selectable epoch: the ``by`` columns, ``bin``, ``trial``, ``epoch``,
        ``privacy/epsilon``, ``val/auroc_macro``, the ``values`` columns, ``candidate_epochs`` (of the chosen
        trial) and ``candidate_trials``; sorted by ``by`` then bin.
    """
    finished = _finished(trials, by)
    best = best_epochs_by_bin(epochs[epochs[TRIAL].isin(finished[TRIAL])], bins, values)
    frame = best.merge(finished[[TRIAL, *by]], on=TRIAL, how="inner")
    reported = [v for v in values if v not in (names.EPSILON, names.VAL_AUROC_MACRO)]
    return _choose(frame, [*by, BIN], score=names.VAL_AUROC_MACRO)[
        [
            *by,
            BIN,
            TRIAL,
            names.EPOCH,
            names.EPSILON,
            names.VAL_AUROC_MACRO,
            *reported,
            CANDIDATE_EPOCHS,
            CANDIDATE_TRIALS,
        ]
    ]


def per_epoch_fairness_attributes(epochs: pd.DataFrame) -> list[str]:
    """Attributes with a per-epoch test AUROC gap column in ``epochs``, in `ATTRIBUTES` order."""
    return [a for a in ATTRIBUTES if names.auroc_gap_at_epoch(a) in epochs.columns]


def fairness_gap_by_bin(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    attributes: Sequence[str] | None = None,
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    by: Sequence[str] = DEFAULT_BY,
) -> pd.DataFrame:
    """Test subgroup AUROC gap per cell (model, dataset, init, bin) from every epoch's spent epsilon.

    The gap is ``max - min`` subgroup macro AUROC over one attribute's groups (lower is fairer), of the
    model of one epoch. Cells, trials and epochs are chosen exactly as in `auroc_by_bin` (by validation
    AUROC, see `epochs_by_bin`): this view shows the fairness of the models whose test AUROC that view
    shows. A NaN gap (a subgroup without both classes) is reported as NaN; it never moves the choice.

    Args:
        trials: the trial table.
        epochs: the epoch table, with ``test/fairness/auroc_gap_at_epoch/<attribute>`` per attribute (and,
            when present, ``val/fairness/auroc_gap/<attribute>`` and ``test/auroc_macro_at_epoch``, which
            are reported too).
        attributes: the attributes to report (default: every attribute with a per-epoch test gap column).

    Returns:
        `epochs_by_bin` rows whose value columns are ``test/auroc_macro_at_epoch`` (when present), then per
        attribute the test gap and (when present) the validation gap.

    Raises:
        KeyError: no per-epoch test gap column (sweeps run before trials reported them), or one of
            ``attributes`` has none.
    """
    attributes = list(per_epoch_fairness_attributes(epochs) if attributes is None else attributes)
    if not attributes:
        raise KeyError(
            f"epochs table: no per-epoch fairness gap columns ({names.auroc_gap_at_epoch('<attribute>')}"
            f" for an attribute of {ATTRIBUTES}); {_PER_EPOCH_HINTS['fairness']}"
        )
    values = [names.TEST_AUROC_MACRO_AT_EPOCH] if names.TEST_AUROC_MACRO_AT_EPOCH in epochs.columns else []
    for attribute in attributes:
        values.append(names.auroc_gap_at_epoch(attribute))
        if names.auroc_gap("val", attribute) in epochs.columns:
            values.append(names.auroc_gap("val", attribute))
    missing = [v for v in values if v not in epochs.columns]
    if missing:
        raise KeyError(f"epochs table: missing column(s) {missing}; {_PER_EPOCH_HINTS['fairness']}")
    return epochs_by_bin(trials, epochs, values, bins, by)


def bin_table(frame: pd.DataFrame, value: str, index: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """Wide view of a binned long table: rows ``index``, one column per bin (every bin, NaN when empty)."""
    _require(frame, [*index, BIN, value], "binned table")
    wide = frame.pivot_table(
        index=list(index), columns=BIN, values=value, aggfunc="first", observed=False, dropna=False
    )
    categories = frame[BIN].cat.categories if isinstance(frame[BIN].dtype, pd.CategoricalDtype) else wide.columns
    wide = wide.reindex(columns=list(categories))
    wide.columns.name = BIN
    return wide


def final_selection(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    by: Sequence[str] = DEFAULT_BY,
) -> pd.DataFrame:
    """The finished trial reported per cell (model, dataset, init, bin) in the final-model views.

    A trial's bin is that of its final ``privacy/epsilon`` (spent by the whole run). Its selection score is
    ``val/auroc_macro`` of its selected epoch (``val/best_epoch``), read from the epochs table; a trial
    without one ranks after every trial that has one.

    Returns:
        One row per non-empty cell: the ``by`` columns, ``bin``, ``trial``, ``privacy/epsilon``,
        ``val/best_epoch``, ``val/auroc_macro`` and ``candidate_trials``; sorted by ``by`` then bin.
    """
    finished = _finished(trials, by, extra=(names.EPSILON,))
    frame = finished[[TRIAL, *by, names.EPSILON]].copy()
    frame[BIN] = assign_bins(frame[names.EPSILON], bins)
    frame = _with_selection_score(frame[frame[BIN].notna()], finished, epochs)
    return _choose(frame, [*by, BIN], score=names.VAL_AUROC_MACRO)[
        [*by, BIN, TRIAL, names.EPSILON, names.BEST_EPOCH, names.VAL_AUROC_MACRO, CANDIDATE_TRIALS]
    ]


def _with_selection_score(frame: pd.DataFrame, finished: pd.DataFrame, epochs: pd.DataFrame | None) -> pd.DataFrame:
    """``frame`` (rows of ``finished``, by ``trial``) with ``val/best_epoch`` and, as ``val/auroc_macro``, the
    validation macro AUROC of that epoch: read from the epochs table; without one (``epochs`` None), the trial's own
    report of the same number (``val/selected/auroc_macro``). NaN where neither is known."""
    frame = frame.copy()
    if epochs is None:
        for column in (names.BEST_EPOCH, names.VAL_SELECTED_AUROC_MACRO):
            values = finished.set_index(TRIAL)[column] if column in finished else pd.Series(dtype=float)
            frame[column] = frame[TRIAL].map(values).astype(float)
        return frame.rename(columns={names.VAL_SELECTED_AUROC_MACRO: names.VAL_AUROC_MACRO})
    if names.BEST_EPOCH in finished.columns and {TRIAL, names.EPOCH, names.VAL_AUROC_MACRO} <= set(epochs):
        best = finished[[TRIAL, names.BEST_EPOCH]].dropna()
        scores = best.merge(
            epochs[[TRIAL, names.EPOCH, names.VAL_AUROC_MACRO]],
            left_on=[TRIAL, names.BEST_EPOCH],
            right_on=[TRIAL, names.EPOCH],
            how="inner",
        )
        return frame.merge(scores[[TRIAL, names.BEST_EPOCH, names.VAL_AUROC_MACRO]], on=TRIAL, how="left")
    frame[names.BEST_EPOCH] = np.nan
    frame[names.VAL_AUROC_MACRO] = np.nan
    return frame


SEED = "seed"
SEED_CELL: tuple[str, ...] = ("model", "dataset", "init", "privacy_unit", "target_epsilon")
"""Cells of the seed views: the trials of one cell differ only in seed and in what the grid tunes (lr, clip)."""
SEED_CONFIDENCE = 0.95
"""Coverage of the seed views' Student-t interval."""
METRIC = "metric"
N_SEEDS, MEAN, SD, CI_LOW, CI_HIGH = "n", "mean", "sd", "ci_low", "ci_high"
"""Columns of `seed_summary`: seeds with a defined value, their mean, sample sd and 95% t-interval."""


@dataclass(frozen=True)
class SeedSpread:
    """A metric over seeds (`mean_over_seeds`).

    Attributes:
        n: seeds with a defined (non-NaN) value.
        mean: their mean (NaN when n = 0).
        sd: sample standard deviation, ddof = 1 (NaN when n < 2).
        ci_low: lower end of the Student-t interval (NaN when n < 2).
        ci_high: upper end.
    """

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


def mean_over_seeds(values: ArrayLike, confidence: float = SEED_CONFIDENCE) -> SeedSpread:
    """n, mean, sd and the two-sided Student-t interval ``mean +/- t((1 + confidence) / 2, n - 1) * sd / sqrt(n)`` of
    the defined values (NaN left out): the interval for the mean over seeds, treating the seeds as independent draws
    of the training randomness that the seed fixes (not the DP noise, which no seed fixes)."""
    if not 0 < confidence < 1:
        raise ValueError(f"mean_over_seeds: confidence must lie in (0, 1), got {confidence}")
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    n = len(array)
    if n == 0:
        return SeedSpread(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(array.mean())
    if n == 1:
        return SeedSpread(1, mean, math.nan, math.nan, math.nan)
    sd = float(array.std(ddof=1))
    half = float(stdtrit(n - 1, (1 + confidence) / 2)) * sd / math.sqrt(n)
    return SeedSpread(n, mean, sd, mean - half, mean + half)


def seed_cell_columns(trials: pd.DataFrame) -> list[str]:
    """The `SEED_CELL` columns the trial table has (tables of older sweeps may lack ``privacy_unit``)."""
    return [c for c in SEED_CELL if c in trials.columns]


def several_seeds(trials: pd.DataFrame, by: Sequence[str] | None = None) -> bool:
    """Whether some seed cell has finished trials of more than one seed (then the seed views say more than the
    per-cell views)."""
    by = seed_cell_columns(trials) if by is None else list(by)
    if SEED not in trials or not {TRIAL, "status", *by} <= set(trials.columns):
        return False
    finished = _finished(trials, by)
    return bool(len(finished)) and bool((finished.groupby(by, dropna=False)[SEED].nunique() > 1).any())


def seed_metrics(trials: pd.DataFrame) -> list[str]:
    """What the seed views summarise, those the trial table has: test macro AUROC, the test subgroup AUROC gap per
    attribute (`ATTRIBUTES` order), macro AUROC per external test set (`external_datasets` order)."""
    wanted = [
        names.TEST_AUROC_MACRO,
        *(names.auroc_gap("test", a) for a in ATTRIBUTES),
        *(names.external_auroc(d) for d in external_datasets(trials)),
    ]
    return [m for m in wanted if m in trials.columns]


def seed_selection(
    trials: pd.DataFrame, epochs: pd.DataFrame | None = None, by: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per cell (``by``) and seed, the finished trial whose selected epoch has the best validation macro AUROC
    (ties: lower spent epsilon, then trial key): the learning rate and clip norm chosen within each seed.

    Args:
        trials: the trial table (``seed`` and the ``by`` columns).
        epochs: the epoch table, for the validation AUROC of each trial's selected epoch (as `final_selection`);
            None: the trials' own ``val/selected/auroc_macro`` (the same number, e.g. in the console summary).
        by: the cell columns (default `seed_cell_columns`).

    Returns:
        One row per (cell, seed) with a finished trial: ``by``, ``seed``, ``trial``, ``privacy/epsilon``,
        ``val/best_epoch``, ``val/auroc_macro`` and ``candidate_trials`` (trials of that cell and seed); sorted by
        ``by`` then seed.
    """
    by = seed_cell_columns(trials) if by is None else list(by)
    finished = _finished(trials, by, extra=(SEED, names.EPSILON))
    frame = _with_selection_score(finished[[TRIAL, *by, SEED, names.EPSILON]], finished, epochs)
    return _choose(frame, [*by, SEED], score=names.VAL_AUROC_MACRO)[
        [*by, SEED, TRIAL, names.EPSILON, names.BEST_EPOCH, names.VAL_AUROC_MACRO, CANDIDATE_TRIALS]
    ]


def seed_summary(
    trials: pd.DataFrame,
    epochs: pd.DataFrame | None = None,
    metrics: Sequence[str] | None = None,
    by: Sequence[str] | None = None,
    confidence: float = SEED_CONFIDENCE,
) -> pd.DataFrame:
    """Each test metric of the `seed_selection` trials summarised over seeds, per cell (`mean_over_seeds`).

    Args:
        trials: the trial table.
        epochs: as in `seed_selection`.
        metrics: trial-table columns to summarise (default `seed_metrics`).
        by: the cell columns (default `seed_cell_columns`).
        confidence: the interval's coverage.

    Returns:
        One row per cell and metric (cells sorted as ``by``, metrics in the given order): ``by``, ``metric``, ``n``
        (seeds with a defined value), ``mean``, ``sd``, ``ci_low``, ``ci_high`` and ``seeds`` (the seeds that had
        a finished trial, e.g. ``"0, 1"``).
    """
    by = seed_cell_columns(trials) if by is None else list(by)
    metrics = seed_metrics(trials) if metrics is None else list(metrics)
    _require(trials, [TRIAL, *metrics], "trial table")
    chosen = seed_selection(trials, epochs, by)
    values = chosen[[*by, SEED, TRIAL]].merge(trials[[TRIAL, *metrics]], on=TRIAL, how="left")
    rows = []
    for cell, group in values.groupby(by, sort=False, dropna=False):
        key = dict(zip(by, cell if isinstance(cell, tuple) else (cell,), strict=True))
        seeds = ", ".join(str(s) for s in group[SEED])
        for metric in metrics:
            spread = mean_over_seeds(group[metric].to_numpy(dtype=np.float64), confidence)
            rows.append(
                {
                    **key,
                    METRIC: metric,
                    N_SEEDS: spread.n,
                    MEAN: spread.mean,
                    SD: spread.sd,
                    CI_LOW: spread.ci_low,
                    CI_HIGH: spread.ci_high,
                    "seeds": seeds,
                }
            )
    return pd.DataFrame(rows, columns=[*by, METRIC, N_SEEDS, MEAN, SD, CI_LOW, CI_HIGH, "seeds"])


PATIENT_EPSILON = "patient_epsilon"
"""Column of `units_at_patient_epsilon`: the guarantee for one patient (a patient-level trial's ``privacy/epsilon``;
an image-level trial's ``privacy/epsilon_patient``, for the training split's patient with the most images)."""
PATIENT_BINS: tuple[EpsilonBin, ...] = (
    EpsilonBin("(0, 3]", 0.0, 3.0),
    EpsilonBin("(3, 10]", 3.0, 10.0),
    EpsilonBin("(10, 30]", 10.0, 30.0),
    EpsilonBin("(30, 100]", 30.0, 100.0),
)
"""Bins of patient-level epsilon (image-level training at the study's epsilons lands far above them)."""
UNIT_METRICS: tuple[str, ...] = (names.TEST_AUROC_MACRO, names.auroc_gap("test", "age"), names.auroc_gap("test", "sex"))


def units_at_patient_epsilon(
    trials: pd.DataFrame, bins: Sequence[EpsilonBin] = PATIENT_BINS, by: Sequence[str] = DEFAULT_BY
) -> pd.DataFrame:
    """Image-level vs patient-level training at the same *patient-level* epsilon.

    Every finished private trial gets its patient epsilon (`PATIENT_EPSILON`) and is binned by it; per cell (``by``,
    bin, ``privacy_unit``) the trial with the best validation macro AUROC at its selected epoch is kept (ties: lower
    spent epsilon, then trial key). An image-level trial without ``privacy/epsilon_patient`` is left out.

    Returns:
        One row per non-empty cell: ``by``, ``bin``, ``privacy_unit``, ``trial``, `PATIENT_EPSILON`,
        ``privacy/epsilon``, the `UNIT_METRICS` and ``candidate_trials``.
    """
    finished = _finished(trials, by, extra=("privacy_unit", names.EPSILON))
    private = finished[np.isfinite(finished[names.EPSILON].astype(float))].copy()
    if names.VAL_SELECTED_AUROC_MACRO not in private:  # tables of trials that predate it: ties decide
        private[names.VAL_SELECTED_AUROC_MACRO] = np.nan
    image_level = private["privacy_unit"] == "image"
    patient = private[names.EPSILON_PATIENT] if names.EPSILON_PATIENT in private else pd.Series(np.nan, private.index)
    private[PATIENT_EPSILON] = np.where(image_level, patient, private[names.EPSILON]).astype(float)
    private[BIN] = assign_bins(private[PATIENT_EPSILON], bins)
    private = private[private[BIN].notna()]
    metrics = [m for m in UNIT_METRICS if m in private]
    chosen = _choose(private, [*by, BIN, "privacy_unit"], score=names.VAL_SELECTED_AUROC_MACRO)
    return chosen[[*by, BIN, "privacy_unit", TRIAL, PATIENT_EPSILON, names.EPSILON, *metrics, CANDIDATE_TRIALS]]


TRAIN_FRACTION = "train_fraction"
"""The share of the training patients a trial trained on (``data.train_fraction``; 1 where a table lacks it)."""
N_TRAIN = "n_train"
"""Training images of a trial (of its subset, with ``data.train_fraction`` below 1)."""
SCALE_METRICS: tuple[str, ...] = UNIT_METRICS
"""What `utility_by_train_size` reports per cell: test macro AUROC and the test AUROC gaps by age and sex."""


def with_train_fraction(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with a float `TRAIN_FRACTION` column: 1 where it is missing (sweeps before the axis, and trials on
    the whole split of sweeps without it) and a numeric `N_TRAIN` (MLflow gives params as text)."""
    trials = trials.copy()
    trials[TRAIN_FRACTION] = train_fractions(trials)
    if N_TRAIN in trials:
        trials[N_TRAIN] = pd.to_numeric(trials[N_TRAIN], errors="coerce")
    return trials


def several_train_fractions(trials: pd.DataFrame) -> bool:
    """Whether the trials trained on more than one training fraction (a data-scale sweep)."""
    return bool(with_train_fraction(trials)[TRAIN_FRACTION].nunique() > 1)


def utility_by_train_size(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    bins: Sequence[EpsilonBin] = STUDY_BINS,
    by: Sequence[str] = DEFAULT_BY,
) -> pd.DataFrame:
    """Utility and fairness against the number of training images: per cell (``by``, train fraction, bin of the
    final spent epsilon) the trial `final_selection` reports (best validation macro AUROC at its selected epoch; test
    never chooses), with its N_train and final test metrics.

    Returns:
        One row per non-empty cell: ``by``, `TRAIN_FRACTION`, ``bin``, ``trial``, ``privacy/epsilon``,
        ``val/best_epoch``, ``val/auroc_macro``, ``candidate_trials``, `N_TRAIN` and the `SCALE_METRICS` the table
        has; sorted by ``by``, fraction, bin.
    """
    trials = with_train_fraction(trials)
    _require(trials, [N_TRAIN], "trial table")
    selection = final_selection(trials, epochs, bins, by=(*by, TRAIN_FRACTION))
    metrics = [m for m in SCALE_METRICS if m in trials]
    return selection.merge(trials[[TRIAL, N_TRAIN, *metrics]], on=TRIAL, how="left")


def external_datasets(trials: pd.DataFrame) -> list[str]:
    """External test sets that have a macro AUROC column (``external/<name>/auroc_macro``), in column order."""
    found = []
    for column in trials.columns:
        if column.startswith("external/"):
            name = column.removeprefix("external/").rpartition("/")[0]
            if name and names.external_auroc(name) == column:
                found.append(name)
    return found


def external_auroc_matrix(trials: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """Macro test AUROC of each selected trial on its own test split and on every external test set.

    Args:
        trials: the trial table (needs ``dataset``, ``test/auroc_macro`` and ``external/<name>/auroc_macro``).
        selection: `final_selection` output (its cells must include ``dataset``).

    Returns:
        Index = the selection's cell columns + ``trial``; one column per test dataset (``columns.name`` is
        ``"test dataset"``): training datasets first, then the other external sets. The on-domain entry
        (test dataset = training dataset) is ``test/auroc_macro``; a dataset a trial was not tested on is NaN.
    """
    _require(trials, [TRIAL, "dataset", names.TEST_AUROC_MACRO], "trial table")
    cells = _cell_columns(selection)
    if "dataset" not in cells:
        raise ValueError("external_auroc_matrix: the selection must have a 'dataset' cell column (by=('dataset', ...))")
    rows = selection[[*cells, TRIAL]].merge(
        trials[[TRIAL, names.TEST_AUROC_MACRO, *(names.external_auroc(d) for d in external_datasets(trials))]],
        on=TRIAL,
        how="left",
    )
    test_sets = list(dict.fromkeys([*selection["dataset"].astype(str), *external_datasets(trials)]))
    values = np.full((len(rows), len(test_sets)), np.nan)
    on_domain = rows[names.TEST_AUROC_MACRO].to_numpy(dtype=float)
    for j, test_set in enumerate(test_sets):
        column = names.external_auroc(test_set)
        external = rows[column].to_numpy(dtype=float) if column in rows else np.full(len(rows), np.nan)
        values[:, j] = np.where(rows["dataset"].astype(str) == test_set, on_domain, external)
    matrix = pd.DataFrame(values, index=pd.MultiIndex.from_frame(rows[[*cells, TRIAL]]), columns=test_sets)
    matrix.columns.name = "test dataset"
    return matrix


def subgroup_auroc_table(trials: pd.DataFrame, selection: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Macro AUROC inside each demographic subgroup for each selected trial.

    Returns:
        Index = the selection's cell columns + ``trial``; columns a MultiIndex (attribute, group) over the
        ``<split>/subgroup_auroc/<attribute>/<group>`` columns of the trial table (attributes in
        `trainables.evaluate.fairness.ATTRIBUTES` order, groups in the order the trial table lists them).
    """
    columns = {}
    for attribute in ATTRIBUTES:
        prefix = names.subgroup_auroc(split, attribute, "")
        for column in trials.columns:
            group = column.removeprefix(prefix)
            if column.startswith(prefix) and group and names.subgroup_auroc(split, attribute, group) == column:
                columns[(attribute, group)] = column
    return _selected_columns(trials, selection, columns, ("attribute", "group"))


def fairness_table(trials: pd.DataFrame, selection: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Label-averaged fairness gaps per attribute for each selected trial.

    Columns are a MultiIndex (attribute, metric): every family of `trainables.names.FAIRNESS_METRICS`
    (``auroc_gap`` is the gap of the groups' *macro* AUROC; the others are per-label gaps averaged over
    labels; definitions in `trainables.evaluate.fairness`), then ``auroc_gap_label_mean`` and
    ``worst_group_auroc``. Columns absent from the trial table are left out.
    """
    columns = {}
    for attribute in ATTRIBUTES:
        for family in names.FAIRNESS_METRICS:
            columns[(attribute, family)] = names.fairness(split, family, attribute)
        columns[(attribute, "auroc_gap_label_mean")] = names.auroc_gap_label_mean(split, attribute)
        columns[(attribute, "worst_group_auroc")] = names.worst_group_auroc(split, attribute)
    present = {key: column for key, column in columns.items() if column in trials.columns}
    return _selected_columns(trials, selection, present, ("attribute", "metric"))


def paired_p_values(
    trials: pd.DataFrame,
    selection: pd.DataFrame,
    bootstrap: pd.DataFrame,
    compare: str = "init",
) -> pd.DataFrame:
    """Paired bootstrap p-values between the selected trials of two values of ``compare`` (e.g. two inits).

    Within each cell of the selection that differs only in ``compare`` (e.g. one training dataset and one
    bin), every pair of ``compare`` values (in order of first appearance) is compared on every test set
    both trials were bootstrapped on. ``p_1_better`` is `trainables.evaluate.bootstrap.paired_p_value`
    for "trial 1 has a higher macro AUROC than trial 2": the share of paired replicates with
    ``AUROC_1 <= AUROC_2``; ``p_2_better`` is the reverse. One-sided, no correction for the number of
    comparisons. Replicates pair by index because every trial of a sweep resamples a dataset's test set
    with that dataset's fixed seed.

    Args:
        trials: the trial table (point estimates, and ``<split>/n_images`` to check the pairing).
        selection: `final_selection` output.
        bootstrap: per-trial replicates (``trial``, ``dataset``, ``replicate``, ``auroc_macro``), e.g.
            `analysis.tables.EvaluationTables.bootstrap`.
        compare: the cell column whose values are compared.

    Returns:
        One row per (cell, test dataset, pair): the other cell columns, ``bin``, ``test dataset``,
        ``<compare>_1``, ``<compare>_2``, ``trial_1``, ``trial_2``, ``auroc_1``, ``auroc_2`` (point
        estimates), ``p_1_better``, ``p_2_better`` and ``n_replicates`` (defined, paired replicates).

    Raises:
        ValueError: a selected trial has no replicates, or two trials' replicates do not pair up
            (different replicate indices or test-set sizes).
    """
    _require(bootstrap, [TRIAL, "dataset", "replicate", "auroc_macro"], "bootstrap table")
    _require(trials, [TRIAL, "dataset"], "trial table")
    cells = _cell_columns(selection)
    if compare not in cells:
        raise ValueError(f"paired_p_values: compare={compare!r} is not a cell column of the selection ({cells})")
    fixed = [c for c in cells if c != compare]
    by_trial = trials.set_index(TRIAL)
    replicates = {key: frame.sort_values("replicate") for key, frame in bootstrap.groupby([TRIAL, "dataset"])}
    rows = []
    for fixed_values, cell in selection.groupby(fixed, observed=True, sort=False):
        fixed_values = fixed_values if isinstance(fixed_values, tuple) else (fixed_values,)
        for first, second in itertools.combinations(cell.itertuples(index=False), 2):
            trial_1, trial_2 = getattr(first, TRIAL), getattr(second, TRIAL)
            for trial in (trial_1, trial_2):
                if not any(key[0] == trial for key in replicates):
                    raise ValueError(
                        f"paired_p_values: no bootstrap replicates for selected trial {trial!r}; "
                        "collect them with analysis.tables.collect_trial_tables"
                    )
            own = by_trial.at[trial_1, "dataset"]
            datasets = sorted(
                (d for (t, d) in replicates if t == trial_1 and (trial_2, d) in replicates), key=lambda d: (d != own, d)
            )
            for dataset in datasets:
                reps_1, reps_2 = replicates[(trial_1, dataset)], replicates[(trial_2, dataset)]
                _check_paired(by_trial, trial_1, trial_2, dataset, reps_1, reps_2)
                split = "test" if dataset == own else f"external/{dataset}"
                auroc_column = names.auroc_macro(split)
                a, b = reps_1["auroc_macro"].to_numpy(), reps_2["auroc_macro"].to_numpy()
                rows.append(
                    {
                        **dict(zip(fixed, fixed_values, strict=True)),
                        "test dataset": dataset,
                        f"{compare}_1": getattr(first, compare),
                        f"{compare}_2": getattr(second, compare),
                        "trial_1": trial_1,
                        "trial_2": trial_2,
                        "auroc_1": by_trial[auroc_column].get(trial_1, np.nan) if auroc_column in by_trial else np.nan,
                        "auroc_2": by_trial[auroc_column].get(trial_2, np.nan) if auroc_column in by_trial else np.nan,
                        "p_1_better": paired_p_value(a, b),
                        "p_2_better": paired_p_value(b, a),
                        "n_replicates": int((~np.isnan(a.astype(np.float64))).sum()),
                    }
                )
    columns = [
        *fixed,
        "test dataset",
        f"{compare}_1",
        f"{compare}_2",
        "trial_1",
        "trial_2",
        "auroc_1",
        "auroc_2",
        "p_1_better",
        "p_2_better",
        "n_replicates",
    ]
    return pd.DataFrame(rows, columns=columns)


def _check_paired(
    by_trial: pd.DataFrame, trial_1: str, trial_2: str, dataset: str, reps_1: pd.DataFrame, reps_2: pd.DataFrame
) -> None:
    if not np.array_equal(reps_1["replicate"].to_numpy(), reps_2["replicate"].to_numpy()):
        raise ValueError(
            f"paired_p_values: trials {trial_1!r} and {trial_2!r} have different bootstrap replicates on "
            f"{dataset!r} ({len(reps_1)} vs {len(reps_2)}); compare trials run with the same n_boot"
        )
    split = "test" if dataset == by_trial.at[trial_1, "dataset"] else f"external/{dataset}"
    column = names.n_images(split)
    if column in by_trial.columns:
        n_1, n_2 = by_trial.at[trial_1, column], by_trial.at[trial_2, column]
        if not (pd.isna(n_1) or pd.isna(n_2)) and n_1 != n_2:
            raise ValueError(
                f"paired_p_values: {dataset!r} had {n_1:g} test images for {trial_1!r} but {n_2:g} for "
                f"{trial_2!r}; replicates of different test sets do not pair"
            )


def _selected_columns(
    trials: pd.DataFrame, selection: pd.DataFrame, columns: dict[tuple[str, str], str], level_names: tuple[str, str]
) -> pd.DataFrame:
    cells = _cell_columns(selection)
    values = selection[[*cells, TRIAL]].merge(trials[[TRIAL, *columns.values()]], on=TRIAL, how="left")
    out = pd.DataFrame(
        values[list(columns.values())].to_numpy(dtype=float),
        index=pd.MultiIndex.from_frame(values[[*cells, TRIAL]]),
        columns=pd.MultiIndex.from_tuples(list(columns), names=list(level_names)),
    )
    return out


def _cell_columns(selection: pd.DataFrame) -> list[str]:
    """The selection's cell columns: everything before ``trial`` (the ``by`` columns, then ``bin``)."""
    _require(selection, [TRIAL, BIN], "selection")
    columns = list(selection.columns)
    return columns[: columns.index(TRIAL)]


def _choose(frame: pd.DataFrame, cell: list[str], score: str) -> pd.DataFrame:
    """Per cell, the row with the highest ``score`` (NaN last); ties: lower epsilon, then trial key."""
    ordered = frame.sort_values(
        [*cell, score, names.EPSILON, TRIAL],
        ascending=[True] * len(cell) + [False, True, True],
        na_position="last",
        kind="stable",
    )
    counts = frame.groupby(cell, observed=True, dropna=False).size().rename(CANDIDATE_TRIALS).reset_index()
    chosen = ordered.groupby(cell, observed=True, sort=False, dropna=False).head(1)
    chosen = chosen.merge(counts, on=cell, how="left")
    return chosen.sort_values(cell, kind="stable").reset_index(drop=True)


def _finished(trials: pd.DataFrame, by: Sequence[str], extra: Sequence[str] = ()) -> pd.DataFrame:
    """Finished trials that may be binned: a private trial without a DP guarantee (its noise seed published,
    `analysis.tables.without_guarantee`) is never binned as private."""
    _require(trials, [TRIAL, "status", *by, *extra], "trial table")
    return trials[(trials["status"] == FINISHED) & ~without_guarantee(trials)]


_PER_EPOCH_HINTS = {
    names.TEST_AUROC_MACRO_AT_EPOCH: "run the sweep with `evaluation.test_every_epoch: true`",
    "fairness": "per-epoch fairness gaps are reported by trials run with `evaluation.test_every_epoch: true` "
    "on a dpsweep version that reports them; rebuild the tables with `dpsweep table`",
}


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str, hint: dict[str, str] | None = None) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        fix = "; ".join((hint or {}).get(c, "") for c in missing if (hint or {}).get(c))
        raise KeyError(f"{what}: missing column(s) {missing}" + (f"; {fix}" if fix else ""))
