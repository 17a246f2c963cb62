"""Paired bootstrap of AUROC: shared resamples, vectorized AUROC, percentile CIs and paired p-values.

"Paired" means every model evaluated on a dataset's test split is resampled with the same indices:
`bootstrap_indices` depends only on (n, n_boot, seed), so two trials that pass the same seed get the
same replicates, and their per-replicate AUROCs can be compared afterwards with `paired_p_value`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from trainables.evaluate.utility import check_label_arrays, has_both_classes

_CHUNK_ELEMENTS = 1 << 21
"""Resampled images per chunk of replicates (bounds memory to a few 16 MiB int64 arrays)."""


def dataset_bootstrap_seed(dataset: str) -> int:
    """A fixed bootstrap seed per dataset name (CRC-32), so every trial of a sweep resamples a test split alike."""
    return zlib.crc32(dataset.encode())


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Row indices of ``n_boot`` bootstrap resamples of a split with ``n`` images, int32 [n_boot, n].

    Each replicate draws ``n`` indices uniformly with replacement. The result depends only on
    ``(n, n_boot, seed)``: it is ``numpy.random.default_rng(seed).integers(0, n, (n_boot, n))``, filled
    replicate by replicate, so the first ``b`` replicates are the same for any ``n_boot >= b``. The
    stream is numpy's PCG64 ``Generator``; numpy does not promise that ``integers`` draws the same
    numbers across its releases, so pair trials run with the same numpy version (trials record it).

    Args:
        n: images in the evaluated split (>= 1).
        n_boot: number of replicates (>= 1).
        seed: non-negative integer; use one seed per dataset's test split for the whole sweep.
    """
    for name, value, minimum in (("n", n, 1), ("n_boot", n_boot, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"bootstrap_indices: {name} must be an integer >= {minimum}, got {value!r}")
    if n >= np.iinfo(np.int32).max:
        raise ValueError(f"bootstrap_indices: n = {n} images does not fit int32 indices")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=np.int32)


def bootstrap_auroc(y_true: ArrayLike, y_score: ArrayLike, indices: ArrayLike) -> np.ndarray:
    """AUROC of every label on every resample, float64 [n_boot, k], without a Python loop over replicates.

    Replicate ``b`` equals ``sklearn.metrics.roc_auc_score(y_true[indices[b], j], y_score[indices[b], j])``
    (up to float rounding, ties counted one half) and is NaN where that resample of label ``j`` holds one
    class. Method: with ``c_i`` the number of times image ``i`` is drawn, the Mann-Whitney statistic of a
    resample is ``2U = sum_{positive i} c_i * (N_<(s_i) + N_<=(s_i))``, where ``N_<(s)`` (``N_<=(s)``) is
    the drawn count of negatives scoring below (at most) ``s``. The negatives are sorted once per label;
    per replicate only the draw counts change, so ``N_<`` and ``N_<=`` are a cumulative sum of counts read
    at positions found once with ``searchsorted``. Integer arithmetic keeps ``2U`` exact; AUROC is
    ``2U / (2 n_pos n_neg)`` with the resample's drawn positive and negative counts.

    Args:
        y_true: 0/1 labels [n, k].
        y_score: scores [n, k].
        indices: resamples [n_boot, m] of row indices in ``[0, n)`` (usually `bootstrap_indices`).
    """
    y_true, y_score = check_label_arrays(y_true, y_score, where="bootstrap")
    n, k = y_true.shape
    indices = np.asarray(indices)
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"bootstrap: indices must be an integer array [n_boot, m], got {indices.dtype} {indices.shape}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"bootstrap: indices must lie in [0, {n}) for {n} images, got range "
            f"[{indices.min()}, {indices.max()}]; were they drawn for another split?"
        )
    ranks_per_label = [_LabelRanks.build(y_true[:, j], y_score[:, j]) for j in range(k)]
    n_boot = indices.shape[0]
    out = np.full((n_boot, k), np.nan)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(n, indices.shape[1]))
    for start in range(0, n_boot, rows_per_chunk):
        chunk = indices[start : start + rows_per_chunk].astype(np.int64)
        offsets = np.arange(chunk.shape[0], dtype=np.int64)[:, None] * n
        # int32 halves the memory traffic of the per-label gathers; a count is at most m < 2**31.
        counts = np.bincount((chunk + offsets).ravel(), minlength=chunk.shape[0] * n).reshape(-1, n)
        counts = counts.astype(np.int32)
        for j, ranks in enumerate(ranks_per_label):
            if ranks is not None:
                out[start : start + chunk.shape[0], j] = ranks.auroc(counts)
    return out


@dataclass(frozen=True)
class _LabelRanks:
    """One label's fixed ordering: negatives sorted by score and each positive's place among them."""

    positives: np.ndarray  # row indices of positives
    negatives_sorted: np.ndarray  # row indices of negatives, ascending score
    below: np.ndarray  # per positive: negatives with a strictly lower score (searchsorted left)
    at_most: np.ndarray  # per positive: negatives with a lower or equal score (searchsorted right)

    @classmethod
    def build(cls, y: np.ndarray, score: np.ndarray) -> _LabelRanks | None:
        positives = np.flatnonzero(y == 1)
        negatives = np.flatnonzero(y == 0)
        if positives.size == 0 or negatives.size == 0:
            return None
        negatives_sorted = negatives[np.argsort(score[negatives], kind="stable")]
        negative_scores = score[negatives_sorted]
        return cls(
            positives=positives,
            negatives_sorted=negatives_sorted,
            below=np.searchsorted(negative_scores, score[positives], side="left"),
            at_most=np.searchsorted(negative_scores, score[positives], side="right"),
        )

    def auroc(self, counts: np.ndarray) -> np.ndarray:
        """AUROC per replicate from int32 draw counts [b, n]; NaN where a replicate lacks a class."""
        cumulative = np.zeros((counts.shape[0], self.negatives_sorted.size + 1), dtype=np.int32)
        np.cumsum(np.take(counts, self.negatives_sorted, axis=1), axis=1, out=cumulative[:, 1:])
        positive_counts = np.take(counts, self.positives, axis=1)
        if np.array_equal(self.below, self.at_most):  # no positive ties a negative: one gather is enough
            ranks = 2 * np.take(cumulative, self.below, axis=1)
        else:
            ranks = np.take(cumulative, self.below, axis=1) + np.take(cumulative, self.at_most, axis=1)
        # Each term is at most m * 2m, which overflows int32 from m ~ 33,000: accumulate in int64.
        twice_u = np.einsum("ij,ij->i", positive_counts, ranks, dtype=np.int64)
        pairs = positive_counts.sum(axis=1, dtype=np.int64) * cumulative[:, -1]
        auroc = np.full(counts.shape[0], np.nan)
        np.divide(twice_u, 2.0 * pairs, out=auroc, where=pairs > 0)
        return auroc


def macro_replicates(per_label: np.ndarray, measurable: ArrayLike) -> np.ndarray:
    """Macro AUROC per replicate [n_boot] from per-label replicates [n_boot, k].

    The mean is over the labels measurable on the full split (``measurable``, [k] bool), the same
    labels as the point estimate, so every replicate averages the same labels. A replicate in which one
    of those labels drew a single class is NaN (undefined) rather than a mean over fewer labels. With no
    measurable label every replicate is NaN.
    """
    measurable = np.asarray(measurable, dtype=bool)
    if not measurable.any():
        return np.full(per_label.shape[0], np.nan)
    macro: np.ndarray = per_label[:, measurable].mean(axis=1)
    return macro


def percentile_ci(replicates: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.

    Quantiles use numpy's default linear interpolation (Hyndman-Fan type 7) over the defined (non-NaN)
    replicates; NaN replicates are left out, and with none defined the interval is (NaN, NaN).
    """
    if not 0 < level < 1:
        raise ValueError(f"CI level must be in (0, 1), got {level}")
    values = np.asarray(replicates, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def paired_p_value(auroc_reps_1: ArrayLike, auroc_reps_2: ArrayLike) -> float:
    """One-sided paired bootstrap p-value for "model 1 has a higher AUROC than model 2".

    ``p = #{b : AUROC_1[b] <= AUROC_2[b]} / #{b : both defined}`` over replicates drawn with the same
    indices (same split, ``n_boot`` and seed) for both models. Undefined (NaN) replicates depend only on
    the labels and the indices, so they coincide for paired inputs and are left out; NaN in one input
    but not the other means the replicates are not paired, which raises. Identical models give p = 1.
    Replicates stored as float32 compare ties more often than float64 ones, which can only raise p.

    Args:
        auroc_reps_1: per-replicate AUROC of model 1 [n_boot] (macro or one label).
        auroc_reps_2: the same quantity for model 2, same replicates, same order.

    Returns:
        The p-value in [0, 1]; NaN when no replicate is defined.
    """
    reps_1 = np.asarray(auroc_reps_1, dtype=np.float64)
    reps_2 = np.asarray(auroc_reps_2, dtype=np.float64)
    if reps_1.ndim != 1 or reps_1.shape != reps_2.shape:
        raise ValueError(
            f"paired_p_value: expects two 1-D replicate arrays of equal length, got shapes {reps_1.shape} "
            f"and {reps_2.shape}; both trials must use the same n_boot"
        )
    undefined_1, undefined_2 = np.isnan(reps_1), np.isnan(reps_2)
    if not np.array_equal(undefined_1, undefined_2):
        first = int(np.flatnonzero(undefined_1 != undefined_2)[0])
        raise ValueError(
            f"paired_p_value: replicate {first} is NaN in one input only, so the replicates are not paired; "
            "compare trials evaluated on the same split with the same boot_seed and n_boot"
        )
    defined = ~undefined_1
    if not defined.any():
        return float("nan")
    return float(np.mean(reps_1[defined] <= reps_2[defined]))


@dataclass(frozen=True)
class BootstrapAUROC:
    """Per-replicate AUROCs of one model on one split, with the pairing key (n_images, n_boot, seed).

    Attributes:
        labels: label names, one per column of ``per_label``.
        per_label: AUROC per replicate and label, float64 [n_boot, k] (NaN: single-class resample).
        macro: macro AUROC per replicate [n_boot], see `macro_replicates`.
        n_images: images in the split (the resample size).
        seed: the `bootstrap_indices` seed.
        level: CI level of `macro_ci` and `per_label_ci`.
    """

    labels: tuple[str, ...]
    per_label: np.ndarray
    macro: np.ndarray
    n_images: int
    seed: int
    level: float = 0.95

    @property
    def n_boot(self) -> int:
        return int(self.per_label.shape[0])

    @property
    def n_undefined(self) -> int:
        """Replicates whose macro AUROC is undefined (left out of the macro CI)."""
        return int(np.isnan(self.macro).sum())

    def macro_ci(self) -> tuple[float, float]:
        """Percentile CI of the macro AUROC."""
        return percentile_ci(self.macro, self.level)

    def per_label_ci(self) -> np.ndarray:
        """Percentile CI per label, [k, 2] (low, high); each label's NaN replicates left out."""
        return np.array([percentile_ci(self.per_label[:, j], self.level) for j in range(len(self.labels))])

    def to_frame(self) -> pd.DataFrame:
        """Compact per-replicate table: float32 ``auroc_macro`` and one column per label, index ``replicate``.

        ``attrs`` carries the pairing key (``n_images``, ``n_boot``, ``boot_seed``). 1000 replicates x 6
        columns take 24 kB.
        """
        frame = pd.DataFrame(
            {"auroc_macro": self.macro.astype(np.float32)}
            | {label: self.per_label[:, j].astype(np.float32) for j, label in enumerate(self.labels)}
        )
        frame.index.name = "replicate"
        frame.attrs = {"n_images": self.n_images, "n_boot": self.n_boot, "boot_seed": self.seed}
        return frame


def paired_bootstrap_auroc(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    labels: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapAUROC:
    """Per-label and macro AUROC of one model on the `bootstrap_indices` (n, n_boot, seed) resamples."""
    y_true, y_score = check_label_arrays(y_true, y_score, where="bootstrap")
    if len(labels) != y_true.shape[1]:
        raise ValueError(f"bootstrap: {len(labels)} label names for {y_true.shape[1]} label columns")
    indices = bootstrap_indices(y_true.shape[0], n_boot, seed)
    per_label = bootstrap_auroc(y_true, y_score, indices)
    return BootstrapAUROC(
        labels=tuple(labels),
        per_label=per_label,
        macro=macro_replicates(per_label, has_both_classes(y_true)),
        n_images=y_true.shape[0],
        seed=seed,
        level=level,
    )
