"""Subgroup metrics recomputed from stored predictions: intersectional groups (sex x age bin) and any manifest column.

Every finished trial stores its selected model's sigmoid scores on the test split of its training dataset and of
every external set (``predictions.parquet``, `trainables.train.prediction_table`: ``dataset``, ``row``, one
``score/<label>`` column per label; ``row`` is the image's row in that dataset's cache manifest). Joining the
manifest by ``row`` gives each scored image's labels and metadata (``sex``, ``age``, ``view``, ``site``, ...), so
any grouping can be analysed without retraining.

Definitions (those of `trainables.evaluate.fairness`, so a single attribute reproduces the trial's own numbers):

- A group's AUROC for one label is sklearn's ``roc_auc_score`` on the group's images; it is undefined (NaN) when
  the group holds only one class of that label. The group's **macro AUROC** is the unweighted mean over the labels
  defined in the group; NaN when none is, or when the group has fewer than ``min_images`` images.
- ``age_bin`` is the half-open bin ``[e_i, e_{i+1})`` of the trial's ``age_edges`` (years); an image with a
  missing age or one outside the edges is in the group `UNBINNED`.
- **Gaps** (`group_gaps`) are max minus min macro AUROC over the groups that are *in the gap*: every group except
  those with ``sex`` = ``unknown``, ``age_bin`` = `UNBINNED` or a missing value in a grouping column (the trial's
  fairness metrics leave those images out too). A gap needs two groups with a defined macro AUROC.

Nothing is dropped silently: every combination of the groups' values is a row (with 0 images where none), with its
image count and a ``note`` saying why its AUROC is NaN or why it is outside the gap. Only test images are ever
joined: a prediction row pointing at a manifest row of another split is an error (training data is never analysed
here).
"""

from __future__ import annotations

import ast
import difflib
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from trainables import names
from trainables.data.labels import LABELS, SEXES
from trainables.errors import UserError
from trainables.evaluate.fairness import DEFAULT_AGE_EDGES, age_grouping
from trainables.evaluate.utility import auroc_per_label, macro_mean

AGE_BIN = "age_bin"
"""Added manifest column: the image's age bin (`age_bin_names` of the edges, or `UNBINNED`)."""
UNBINNED = "no bin"
"""``age_bin`` of an image whose age is missing or outside the edges."""
MISSING = "missing"
"""Group value shown for a missing (NaN/None) value of a grouping column."""
N_IMAGES = "n_images"
LABELS_DEFINED = "labels_defined"
AUROC_MACRO = "auroc_macro"
IN_GAP = "in_gap"
NOTE = "note"
KEYS: tuple[str, ...] = ("trial", "dataset")
"""Prediction columns that, where present, split the result before the groups (one block per trial and dataset)."""
NOT_GROUPINGS: tuple[str, ...] = ("image_id", "patient_id", "source_path", "row", "split", *LABELS)
"""Manifest columns refused as groupings: identifiers (a per-image or per-patient AUROC identifies), the split
(always test here) and the labels (a group by a label holds one class of it)."""
INTERSECTIONAL: tuple[str, ...] = ("sex", AGE_BIN)
"""The study's intersectional grouping."""


class GroupingError(UserError, ValueError):
    """Predictions and a manifest do not fit together, or a grouping column is unknown or not allowed."""


def auroc_column(label: str) -> str:
    """Column of `group_metrics` holding one label's AUROC in the group, e.g. ``auroc/cardiomegaly``."""
    return f"auroc/{label}"


def age_bin_names(edges: Sequence[float]) -> tuple[str, ...]:
    """Bin names of age edges (years), e.g. ``(0, 40, 100)`` -> ``("[0,40)", "[40,100)")``."""
    return age_grouping(np.zeros(0), edges).groups


def with_age_bins(manifest: pd.DataFrame, age_edges: Sequence[float] = DEFAULT_AGE_EDGES) -> pd.DataFrame:
    """A copy of ``manifest`` with `AGE_BIN`: an ordered categorical of the bins of ``age_edges``, then `UNBINNED`."""
    if "age" not in manifest.columns:
        raise GroupingError("manifest: no 'age' column; a cache manifest has one (trainables.data.cache)")
    grouping = age_grouping(manifest["age"].to_numpy(dtype=np.float64), age_edges)
    categories = [*grouping.groups, UNBINNED]
    codes = np.where(grouping.codes < 0, len(grouping.groups), grouping.codes)
    out = manifest.copy()
    out[AGE_BIN] = pd.Categorical.from_codes(codes, categories=categories, ordered=True)
    return out


def group_metrics(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame | Mapping[str, pd.DataFrame],
    by: Sequence[str] = INTERSECTIONAL,
    age_edges: Sequence[float] = DEFAULT_AGE_EDGES,
    min_images: int = 1,
    labels: Sequence[str] = LABELS,
) -> pd.DataFrame:
    """Per-group image counts and AUROCs of stored predictions, grouped by manifest columns (module docstring).

    Args:
        predictions: ``predictions.parquet`` rows: ``row``, ``score/<label>`` per label, and optionally ``trial``
            and ``dataset`` (`KEYS`: each trial and dataset is one block).
        manifest: the cache manifest of the scored images (row ``i`` = cache row ``i``), or dataset name ->
            manifest when the predictions span several datasets (then ``predictions`` needs ``dataset``).
        by: manifest columns to group by, ``age_bin`` included (derived from ``age`` and ``age_edges``);
            e.g. ``["sex", "age_bin"]`` (intersectional), ``["view"]``, ``["site", "sex"]``.
        age_edges: age bin edges in years (the trial's ``age_edges``).
        min_images: groups with fewer images get a NaN AUROC (with a note) even where one could be computed.
        labels: the label columns (manifest) and score columns (``score/<label>``).

    Returns:
        One row per block and combination of the ``by`` values (ordered: sex F, M, unknown; age bins in order, then
        `UNBINNED`; other values sorted, `MISSING` last), with the `KEYS` present, the ``by`` columns, `N_IMAGES`,
        one ``positives/<label>`` count per label, `LABELS_DEFINED` (labels with both classes), `AUROC_MACRO`, one
        ``auroc/<label>`` per label, `IN_GAP` and `NOTE` (empty when nothing is to say).

    Raises:
        GroupingError: a ``by`` column is unknown or refused (`NOT_GROUPINGS`), a prediction row is not a row of
            the manifest or not a test image, or a score column is missing.
    """
    by = list(by)
    if not by:
        raise GroupingError("group_metrics: by=[] groups nothing; give manifest columns, e.g. ['sex', 'age_bin']")
    if min_images < 1:
        raise GroupingError(f"group_metrics: min_images={min_images} must be at least 1")
    scores = [names.prediction_score(label) for label in labels]
    missing = [c for c in ("row", *scores) if c not in predictions.columns]
    if missing:
        raise GroupingError(
            f"predictions: missing column(s) {missing}; expected a predictions.parquet table "
            "(trainables.train.prediction_table)"
        )
    keys = [k for k in KEYS if k in predictions.columns]
    blocks = predictions.groupby(keys, sort=False) if keys else [((), predictions)]
    parts = []
    for key_values, block in blocks:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        context = dict(zip(keys, key_values, strict=True))
        joined = _join(block, _manifest_for(manifest, context.get("dataset")), by, age_edges, labels, context)
        part = _block_metrics(joined, by, labels, scores, min_images)
        for position, key in enumerate(keys):
            part.insert(position, key, context[key])
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def group_gaps(metrics: pd.DataFrame, by: Sequence[str] = INTERSECTIONAL) -> pd.DataFrame:
    """Max minus min group macro AUROC per block of `group_metrics` output, over the groups in the gap.

    Returns:
        One row per block (the `KEYS` present in ``metrics``): ``groups`` (rows of the block), ``groups_in_gap``,
        ``groups_defined`` (in the gap with a defined macro AUROC), ``auroc_gap`` (NaN with fewer than two defined),
        ``worst_group`` (the ``by`` values joined by `` x ``; the first in group order on ties),
        ``worst_group_auroc``, ``best_group_auroc`` and ``note``.
    """
    by = list(by)
    keys = [k for k in KEYS if k in metrics.columns]
    rows = []
    for key_values, block in metrics.groupby(keys, sort=False) if keys else [((), metrics)]:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        in_gap = block[block[IN_GAP].to_numpy(dtype=bool)]
        defined = in_gap[in_gap[AUROC_MACRO].notna()]
        values = defined[AUROC_MACRO].to_numpy(dtype=np.float64)
        worst = int(np.argmin(values)) if len(values) else None
        undefined = len(in_gap) - len(defined)
        note = [f"{undefined} group(s) without a defined macro AUROC left out"] if undefined else []
        if len(values) < 2:
            note.append("fewer than two groups with a defined macro AUROC: no gap")
        rows.append(
            {
                **dict(zip(keys, key_values, strict=True)),
                "groups": len(block),
                "groups_in_gap": len(in_gap),
                "groups_defined": len(defined),
                "auroc_gap": float(values.max() - values.min()) if len(values) >= 2 else np.nan,
                "worst_group": None if worst is None else " x ".join(str(defined[c].iloc[worst]) for c in by),
                "worst_group_auroc": np.nan if worst is None else float(values[worst]),
                "best_group_auroc": float(values.max()) if len(values) else np.nan,
                NOTE: "; ".join(note),
            }
        )
    return pd.DataFrame(rows)


def manifest_path(data_root: str | Path, dataset: str, image_size: int) -> Path:
    """Where a prepared dataset's manifest is: ``<data_root>/<dataset>/<image_size>/manifest.parquet``."""
    return names.dataset_dir(data_root, dataset, int(image_size)) / names.MANIFEST_FILE


def _manifest_for(manifest: pd.DataFrame | Mapping[str, pd.DataFrame], dataset: object) -> pd.DataFrame:
    if isinstance(manifest, pd.DataFrame):
        return manifest
    if dataset is None:
        raise GroupingError(
            "group_metrics: manifests given per dataset but the predictions have no 'dataset' column; pass one "
            "manifest DataFrame"
        )
    if dataset not in manifest:
        raise GroupingError(
            f"group_metrics: no manifest for dataset {dataset!r} (given: {sorted(manifest)}); pass its "
            "manifest.parquet (<data_root>/<dataset>/<image_size>/)"
        )
    return manifest[str(dataset)]


def _join(
    block: pd.DataFrame,
    manifest: pd.DataFrame,
    by: list[str],
    age_edges: Sequence[float],
    labels: Sequence[str],
    context: dict[str, object],
) -> pd.DataFrame:
    where = ", ".join(f"{k} {v!r}" for k, v in context.items()) or "predictions"
    if AGE_BIN in by:
        manifest = with_age_bins(manifest, age_edges)
    for column in by:
        if column in NOT_GROUPINGS:
            raise GroupingError(f"group_metrics: by={column!r} is not allowed as a grouping ({_refusal(column)})")
        if column not in manifest.columns:
            allowed = [c for c in [*manifest.columns, AGE_BIN] if c not in NOT_GROUPINGS]
            close = difflib.get_close_matches(column, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise GroupingError(f"group_metrics: by={column!r} is not a manifest column (columns: {allowed}){hint}")
    missing_labels = [label for label in labels if label not in manifest.columns]
    if missing_labels:
        raise GroupingError(f"manifest: missing label column(s) {missing_labels}")
    rows = block["row"].to_numpy(dtype=np.int64)
    outside = (rows < 0) | (rows >= len(manifest))
    if outside.any():
        raise GroupingError(
            f"{where}: prediction row {int(rows[outside][0])} is not a row of the manifest ({len(manifest)} rows); "
            "pass the manifest of the dataset and image size the trial evaluated"
        )
    if "split" in manifest.columns:
        split = manifest["split"].to_numpy(dtype=object)[rows]
        not_test = split != "test"
        if not_test.any():
            raise GroupingError(
                f"{where}: prediction row {int(rows[not_test][0])} is a {split[not_test][0]!r} image of the manifest, "
                "but predictions are of test images only; is this the manifest of the dataset the trial evaluated?"
            )
    meta = manifest.iloc[rows][[*dict.fromkeys([*by, *labels])]].reset_index(drop=True)
    scored = block.reset_index(drop=True)
    return pd.concat([meta, scored[[names.prediction_score(label) for label in labels]]], axis=1)


def _refusal(column: str) -> str:
    if column in LABELS:
        return "a label: each of its groups holds one class of it"
    if column == "split":
        return "predictions are of the test split only"
    return "an identifier: groups of one image or patient would identify them"


def _group_values(values: pd.Series, column: str) -> tuple[list[object], pd.Series]:
    """The column's group values in report order and the per-image values (missing -> `MISSING`)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        categories = list(values.cat.categories)
        observed = set(values.dropna().astype(object))
        ordered = [c for c in categories if c in observed or column == AGE_BIN and c != UNBINNED]
        shown = values.astype(object)
    else:
        shown = values.astype(object)
        observed = set(shown.dropna())
        if column == "sex":
            ordered = [*SEXES[:2], *sorted((v for v in observed if v not in SEXES[:2]), key=str)]
        else:
            ordered = sorted(observed, key=str)
    shown = shown.where(shown.notna(), MISSING)
    if (shown == MISSING).any() and MISSING not in ordered:
        ordered.append(MISSING)
    return ordered, shown


def _block_metrics(
    joined: pd.DataFrame, by: list[str], labels: Sequence[str], scores: list[str], min_images: int
) -> pd.DataFrame:
    orders, values = {}, {}
    for column in by:
        orders[column], values[column] = _group_values(joined[column], column)
    y_true = joined[list(labels)].to_numpy(dtype=np.float64)
    y_score = joined[scores].to_numpy(dtype=np.float64)
    rows = []
    for combination in itertools.product(*(orders[c] for c in by)):
        mask = np.ones(len(joined), dtype=bool)
        for column, value in zip(by, combination, strict=True):
            mask &= (values[column] == value).to_numpy()
        n = int(mask.sum())
        truth, score = y_true[mask], y_score[mask]
        per_label = auroc_per_label(truth, score) if n else np.full(len(labels), np.nan)
        defined = int(np.isfinite(per_label).sum())
        notes = []
        if n == 0:
            notes.append("no images")
        elif defined == 0:
            notes.append("no label has both classes")
        elif defined < len(labels):
            lacking = [label for label, value in zip(labels, per_label, strict=True) if np.isnan(value)]
            notes.append(f"one class only: {', '.join(lacking)} (not in the macro mean)")
        if 0 < n < min_images:
            notes.append(f"fewer than {min_images} images: no AUROC")
            per_label = np.full(len(labels), np.nan)
        excluded = [
            f"{column} {value}"
            for column, value in zip(by, combination, strict=True)
            if value == MISSING or (column == "sex" and value == "unknown") or (column == AGE_BIN and value == UNBINNED)
        ]
        if excluded:
            notes.append(f"not in the gap ({', '.join(excluded)})")  # as in the trial's own fairness metrics
        rows.append(
            {
                **dict(zip(by, combination, strict=True)),
                N_IMAGES: n,
                **{f"positives/{label}": int(truth[:, j].sum()) for j, label in enumerate(labels)},
                LABELS_DEFINED: defined,
                AUROC_MACRO: macro_mean(per_label),
                **{auroc_column(label): float(per_label[j]) for j, label in enumerate(labels)},
                IN_GAP: not excluded,
                NOTE: "; ".join(notes),
            }
        )
    out = pd.DataFrame(rows)
    for column in by:
        out[column] = pd.Categorical(out[column], categories=orders[column], ordered=True)
    return out


def trial_age_edges(trials: pd.DataFrame, trial: str) -> tuple[float, ...]:
    """The ``age_edges`` a trial's fairness metrics used (its trials.parquet column); `DEFAULT_AGE_EDGES` for tables
    written before trials carried it."""
    if "age_edges" not in trials.columns:
        return DEFAULT_AGE_EDGES
    value = trials.loc[trials["trial"] == trial, "age_edges"]
    if value.empty or value.iloc[0] is None or (np.ndim(value.iloc[0]) == 0 and pd.isna(value.iloc[0])):
        return DEFAULT_AGE_EDGES
    edges = value.iloc[0]
    if isinstance(edges, str):  # tables read back from MLflow keep a list param as its text, e.g. "[0, 40, 100]"
        try:
            edges = ast.literal_eval(edges)
        except (ValueError, SyntaxError):
            raise GroupingError(
                f"trial {trial!r}: age_edges {value.iloc[0]!r} is not a list of numbers; pass age_edges yourself"
            ) from None
    return tuple(float(edge) for edge in edges)


def load_manifests(
    trials: pd.DataFrame, datasets: Sequence[str], data_root: str | Path | None = None
) -> dict[str, pd.DataFrame]:
    """The cache manifests of ``datasets`` (dataset -> manifest), found from the trial table.

    Each manifest is ``<data_root>/<dataset>/<image_size>/manifest.parquet`` with the trials' ``image_size`` and,
    unless ``data_root`` is given, their ``data_root`` (both trial parameters).

    Raises:
        GroupingError: the trial table lacks ``image_size`` (or ``data_root`` when none is given), the trials used
            several values of one, or a manifest file does not exist (the message names the path and the fix).
    """
    needed = ["image_size"] if data_root is not None else ["image_size", "data_root"]
    lacking = [c for c in needed if c not in trials.columns]
    if lacking:
        raise GroupingError(
            f"trial table: no {lacking} column(s), so the datasets' manifests cannot be found; the trials predate "
            "them: re-run the sweep, or pass data_root and the manifest yourself"
        )
    settings = {}
    for column in needed:
        values = trials[column].dropna().unique()
        if len(values) != 1:
            raise GroupingError(
                f"trial table: the trials used {len(values)} values of {column!r} ({list(values)[:4]}); "
                "pass data_root and the manifests per dataset yourself"
            )
        settings[column] = values[0]
    root = Path(data_root) if data_root is not None else Path(str(settings["data_root"]))
    manifests = {}
    for dataset in datasets:
        path = manifest_path(root, dataset, int(settings["image_size"]))
        if not path.is_file():
            raise GroupingError(
                f"manifest of dataset {dataset!r} not found at {path}; prepare the dataset there "
                "(`dpsweep prepare`) or point at the data folder the sweep used (report: --data-root DIR)"
            )
        manifests[dataset] = pd.read_parquet(path)
    return manifests
