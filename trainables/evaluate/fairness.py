"""Subgroup performance and group-fairness gaps per demographic attribute.

An *attribute* (sex, age) splits the evaluated images into named groups; attributes are looked up by
name in `ATTRIBUTES`. Within one attribute and one label, a group is *measurable* when it holds at least
one positive and one negative image for that label; unmeasurable groups (including empty ones) are
skipped for that label and counted. All gaps below are taken over the measurable groups G of one label,
at that label's threshold t (``prediction = score >= t``, thresholds fitted on validation in dpsweep):

- ``auroc_gap``: max_g AUROC_g - min_g AUROC_g (for sex: |AUROC_F - AUROC_M|).
- ``tpr_gap``: max_g TPR_g - min_g TPR_g, TPR = TP / (TP + FN).
- ``fpr_gap``: max_g FPR_g - min_g FPR_g, FPR = FP / (FP + TN).
- ``eod``: equalized odds difference, max(tpr_gap, fpr_gap); fairlearn's ``equalized_odds_difference``
  (``method="between_groups"``, ``agg="worst_case"``) on the measurable groups.
- ``aod``: average odds difference, (tpr_gap + fpr_gap) / 2; fairlearn's ``equalized_odds_difference``
  with ``agg="mean"``. (Unlike AIF360's signed two-group version, this is a non-negative gap.)
- ``ppv_gap``: predictive parity difference, max_g PPV_g - min_g PPV_g, PPV = TP / (TP + FP), over the
  measurable groups with at least one positive prediction (PPV undefined otherwise).
- ``spd``: statistical parity difference, max_g - min_g of the positive-prediction rate (TP + FP) / n_g
  (fairlearn's ``demographic_parity_difference`` on the measurable groups).
- ``accuracy_gap``: max_g - min_g of accuracy (TP + TN) / n_g. The reference group's older code called
  this "statistical parity"; it is reported apart from ``spd`` under its own name.

A gap needs at least two groups where the quantity is defined and is NaN otherwise. Label-averaged
values are the unweighted mean over the labels where the gap is defined. A group's *macro AUROC* is the
unweighted mean of its per-label AUROCs over the labels measurable in that group; the attribute's
macro AUROC gap and worst group (lowest macro AUROC, first in group order on ties) use it.

Everything is computed with numpy from the same `trainables.evaluate.utility` functions as the overall
metrics (sklearn's ``roc_auc_score`` per group); tests check the gaps against fairlearn's. fairlearn's
``MetricFrame`` gives the same numbers but costs about 0.2 s per metric, label and attribute on 30,000
images (fairlearn 0.15): several seconds per evaluation instead of well under one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from trainables.data.labels import LABELS, SEXES
from trainables.evaluate.utility import (
    auroc_per_label,
    check_label_arrays,
    check_thresholds,
    confusion_counts,
    macro_mean,
)
from trainables.names import FAIRNESS_METRICS

DEFAULT_AGE_EDGES: tuple[float, ...] = (0, 40, 70, 100)
"""The study's age bins [0,40), [40,70), [70,100) in years."""

SEX_GROUPS: tuple[str, ...] = ("F", "M")
"""Sex groups compared; ``unknown`` (see `trainables.data.labels.SEXES`) is excluded."""

GROUP_RATES: tuple[str, ...] = ("auroc", "tpr", "fpr", "ppv", "selection_rate", "accuracy")
"""Per-group, per-label quantities in the group table (besides counts)."""


@dataclass(frozen=True)
class Grouping:
    """Assignment of the evaluated images to the groups of one attribute.

    Attributes:
        attribute: attribute name (a key of `ATTRIBUTES`), e.g. ``"age"``.
        groups: group names in reporting order, e.g. ``("[0,40)", "[40,70)", "[70,100)")``.
        keys: the same groups spelled for metric keys, which MLflow restricts to alphanumerics and
            ``_-. :/`` (brackets and commas are rejected), e.g. ``("0-40", "40-70", "70-100")``.
        codes: int [n]: index into ``groups``, or -1 for an image in no group.
    """

    attribute: str
    groups: tuple[str, ...]
    keys: tuple[str, ...]
    codes: np.ndarray

    @property
    def n_excluded(self) -> int:
        """Images in no group (unknown sex; missing or out-of-range age)."""
        return int((self.codes < 0).sum())


def sex_grouping(sex: ArrayLike) -> Grouping:
    """Group images by sex into ``F`` and ``M``; ``unknown`` images are excluded.

    Args:
        sex: one code per image from `trainables.data.labels.SEXES` (``F``, ``M``, ``unknown``).

    Raises:
        ValueError: on any other value, naming it and its position.
    """
    sex = np.asarray(sex, dtype=object)
    bad = np.array([not (isinstance(value, str) and value in SEXES) for value in sex], dtype=bool)  # pd.NA-safe
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"sex: value {sex[position]!r} at position {position} ({bad.sum()} such values); expected one of "
            f"{SEXES}: normalize the dataset's sex column (missing -> 'unknown') when preparing it"
        )
    codes = np.full(sex.shape, -1, dtype=np.int64)
    for code, group in enumerate(SEX_GROUPS):
        codes[sex == group] = code
    return Grouping("sex", SEX_GROUPS, SEX_GROUPS, codes)


def age_group_names(edges: Sequence[float]) -> tuple[str, ...]:
    """Half-open bin names of age edges (years): ``(0, 40, 100)`` -> ``("[0,40)", "[40,100)")``."""
    checked = _check_age_edges(edges)
    return tuple(f"[{low:g},{high:g})" for low, high in zip(checked[:-1], checked[1:], strict=True))


def age_grouping(age: ArrayLike, edges: Sequence[float] = DEFAULT_AGE_EDGES) -> Grouping:
    """Group images into half-open age bins ``[edges[i], edges[i+1])``, in years.

    Images with a missing age (NaN) or an age outside ``[edges[0], edges[-1])`` (e.g. 100 or older with
    the default edges) are in no group; they are counted in `Grouping.n_excluded`. Use ``inf`` as the last
    edge to keep every age.

    Args:
        age: age in years per image, NaN when missing.
        edges: strictly increasing bin edges, at least two.
    """
    names = age_group_names(edges)
    edges_array = np.asarray(edges, dtype=np.float64)
    keys = tuple(f"{low:g}-{high:g}" for low, high in zip(edges_array[:-1], edges_array[1:], strict=True))
    age = np.asarray(age, dtype=np.float64)
    codes = np.searchsorted(edges_array, age, side="right") - 1
    outside = np.isnan(age) | (age < edges_array[0]) | (age >= edges_array[-1])
    return Grouping("age", names, keys, np.where(outside, -1, codes).astype(np.int64))


ATTRIBUTES: dict[str, Callable[..., Grouping]] = {"sex": sex_grouping, "age": age_grouping}
"""Attribute registry: name -> function building the `Grouping` from per-image values (+ options)."""


def make_grouping(attribute: str, values: ArrayLike, **options: object) -> Grouping:
    """The `Grouping` of a registered attribute, e.g. ``make_grouping("age", ages, edges=(0, 50, 100))``."""
    if attribute not in ATTRIBUTES:
        raise KeyError(f"unknown fairness attribute {attribute!r}; expected one of {sorted(ATTRIBUTES)}")
    return ATTRIBUTES[attribute](values, **options)


def group_table(
    y_true: ArrayLike,
    y_score: ArrayLike,
    thresholds: ArrayLike,
    grouping: Grouping,
    labels: Sequence[str],
) -> pd.DataFrame:
    """Tidy per-(group, label) table of counts and rates for one attribute.

    One row per group in ``grouping.groups`` and label, empty groups included. Columns: ``attribute``,
    ``group``, ``group_key`` (its spelling in metric keys), ``label``, ``n``, ``n_pos``, ``n_neg``,
    ``measurable`` (n_pos > 0 and n_neg > 0), ``auroc`` (sklearn; NaN when not measurable), ``tp``,
    ``fp``, ``tn``, ``fn`` at the label's threshold, and ``tpr``, ``fpr``, ``ppv``, ``selection_rate``,
    ``accuracy`` (NaN where the denominator is empty or the threshold is NaN; see
    `trainables.evaluate.utility.ConfusionCounts`).
    """
    y_true, y_score = check_label_arrays(y_true, y_score, where=f"fairness/{grouping.attribute}")
    n_images, n_labels = y_true.shape
    thresholds = check_thresholds(thresholds, n_labels)
    if len(labels) != n_labels:
        raise ValueError(f"fairness: {len(labels)} label names for {n_labels} label columns")
    if grouping.codes.shape != (n_images,):
        raise ValueError(
            f"fairness/{grouping.attribute}: {grouping.codes.shape[0]} attribute values for {n_images} "
            "images; pass one value per evaluated image, in the same order"
        )
    blocks = []
    for code, (group, key) in enumerate(zip(grouping.groups, grouping.keys, strict=True)):
        members = grouping.codes == code
        block = pd.DataFrame({"attribute": grouping.attribute, "group": group, "group_key": key, "label": list(labels)})
        block["n"] = int(members.sum())
        block["n_pos"] = y_true[members].sum(axis=0).astype(np.int64)
        block["n_neg"] = block["n"] - block["n_pos"]
        block["measurable"] = (block["n_pos"] > 0) & (block["n_neg"] > 0)
        if members.any():
            counts = confusion_counts(y_true[members], y_score[members], thresholds)
            block["auroc"] = auroc_per_label(y_true[members], y_score[members])
            rates: dict[str, np.ndarray | float] = {
                "tpr": counts.sensitivity(),
                "fpr": counts.fpr(),
                "ppv": counts.ppv(),
                "selection_rate": counts.selection_rate(),
                "accuracy": counts.accuracy(),
            }
            count_columns: dict[str, np.ndarray | float] = {
                "tp": counts.tp,
                "fp": counts.fp,
                "tn": counts.tn,
                "fn": counts.fn,
            }
        else:
            block["auroc"] = np.nan
            rates = dict.fromkeys(("tpr", "fpr", "ppv", "selection_rate", "accuracy"), np.nan)
            count_columns = dict.fromkeys(("tp", "fp", "tn", "fn"), 0.0)
        for column, values in (count_columns | rates).items():
            block[column] = values
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


@dataclass(frozen=True)
class AttributeFairness:
    """Subgroup results and fairness gaps of one attribute (definitions in the module docstring).

    Attributes:
        attribute: the attribute name.
        table: the `group_table` of this attribute.
        per_label: index label; columns ``FAIRNESS_METRICS`` (gaps), ``n_measurable_groups``,
            ``n_skipped_groups`` and ``worst_group`` (lowest AUROC among measurable groups, or None).
        label_mean: family in ``FAIRNESS_METRICS`` -> unweighted mean over labels where defined (NaN if none).
        group_macro_auroc: index group -> the group's macro AUROC (NaN when no label is measurable).
        macro_auroc_gap: max minus min of ``group_macro_auroc`` over groups where it is defined.
        worst_group: group with the lowest macro AUROC (None when none is defined).
        worst_group_auroc: that group's macro AUROC.
        n_skipped: (group, label) pairs skipped as unmeasurable.
        n_excluded: images in no group of the attribute.
    """

    attribute: str
    table: pd.DataFrame
    per_label: pd.DataFrame
    label_mean: dict[str, float]
    group_macro_auroc: pd.Series
    macro_auroc_gap: float
    worst_group: str | None
    worst_group_auroc: float
    n_skipped: int
    n_excluded: int


_GAP_SOURCES: dict[str, str] = {
    "auroc_gap": "auroc",
    "tpr_gap": "tpr",
    "fpr_gap": "fpr",
    "ppv_gap": "ppv",
    "spd": "selection_rate",
    "accuracy_gap": "accuracy",
}
"""Gap family -> the group-table column it is the max-minus-min of."""


def attribute_fairness(
    y_true: ArrayLike,
    y_score: ArrayLike,
    thresholds: ArrayLike,
    grouping: Grouping,
    labels: Sequence[str],
) -> AttributeFairness:
    """Subgroup AUROCs, fairness gaps (per label and label-averaged) and the worst group of one attribute."""
    table = group_table(y_true, y_score, thresholds, grouping, labels)
    rows = []
    for label in labels:
        measured = table[(table["label"] == label) & table["measurable"]]
        gaps = {family: _gap(measured[column]) for family, column in _GAP_SOURCES.items()}
        row: dict[str, object] = dict(gaps)
        row["eod"] = float(np.maximum(gaps["tpr_gap"], gaps["fpr_gap"]))  # NaN if either is
        row["aod"] = (gaps["tpr_gap"] + gaps["fpr_gap"]) / 2
        row["n_measurable_groups"] = len(measured)
        row["n_skipped_groups"] = len(grouping.groups) - len(measured)
        row["worst_group"] = _lowest(measured.set_index("group")["auroc"])
        rows.append(row)
    per_label = pd.DataFrame(rows, index=pd.Index(list(labels), name="label"))
    per_label = per_label[[*FAIRNESS_METRICS, "n_measurable_groups", "n_skipped_groups", "worst_group"]]

    group_macro = pd.Series(
        [macro_mean(table.loc[table["group"] == group, "auroc"]) for group in grouping.groups],
        index=pd.Index(grouping.groups, name="group"),
        name="macro_auroc",
    )
    worst_group = _lowest(group_macro)
    return AttributeFairness(
        attribute=grouping.attribute,
        table=table,
        per_label=per_label,
        label_mean={family: macro_mean(per_label[family].to_numpy(dtype=np.float64)) for family in FAIRNESS_METRICS},
        group_macro_auroc=group_macro,
        macro_auroc_gap=_gap(group_macro),
        worst_group=worst_group,
        worst_group_auroc=float(group_macro[worst_group]) if worst_group is not None else float("nan"),
        n_skipped=int(per_label["n_skipped_groups"].sum()),
        n_excluded=grouping.n_excluded,
    )


def subgroup_auroc_gaps(
    y_true: ArrayLike, y_score: ArrayLike, sex: ArrayLike, age: ArrayLike, age_edges: Sequence[float]
) -> dict[str, float]:
    """Per attribute (``sex``, ``age``): max minus min of the groups' macro AUROCs, for the study's `LABELS`.

    The definition of the final ``<split>/fairness/auroc_gap/<attribute>`` (`AttributeFairness.macro_auroc_gap`,
    on the groupings `trainables.evaluate.report.evaluate_split` uses); NaN unless two groups have a defined
    macro AUROC. No thresholds and no bootstrap, so it is cheap enough for every epoch.
    """
    no_thresholds = np.full(len(LABELS), np.nan)  # AUROC needs none; the thresholded columns come out NaN
    groupings = (make_grouping("sex", sex), make_grouping("age", age, edges=age_edges))
    return {
        grouping.attribute: attribute_fairness(y_true, y_score, no_thresholds, grouping, LABELS).macro_auroc_gap
        for grouping in groupings
    }


def _gap(values: pd.Series) -> float:
    """Max minus min over the defined values; NaN with fewer than two."""
    defined = values.dropna().to_numpy(dtype=np.float64)
    return float(defined.max() - defined.min()) if defined.size >= 2 else float("nan")


def _lowest(values: pd.Series) -> str | None:
    """Index of the smallest defined value, the first on ties; None when nothing is defined."""
    defined = values.dropna()
    return str(defined.index[int(np.argmin(defined.to_numpy()))]) if len(defined) else None


def _check_age_edges(edges: Sequence[float]) -> np.ndarray:
    array = np.asarray(edges, dtype=np.float64)
    if array.ndim != 1 or array.size < 2 or np.isnan(array).any() or not (np.diff(array) > 0).all():
        raise ValueError(
            f"age_edges must be at least two strictly increasing numbers (years), got {tuple(edges)}; "
            "e.g. (0, 40, 70, 100)"
        )
    return array
