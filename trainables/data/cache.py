"""The on-disk preprocessing cache shared by the synthetic twin and every real dataset.

Layout of one prepared dataset at one image size (``<data_root>/<dataset>/<size>/``)::

    images.npy         uint8 array [N, size, size], single channel, opened with mmap
    manifest.parquet   one row per image; row ``i`` describes ``images[i]``
    card.json          the dataset card: counts, prevalence, demographic coverage, skipped images

A real dataset's split key, ``<data_root>/<dataset>/split.key``, sits beside its sizes
(`trainables.data.splits`): private material, like the cache.

Manifest columns (see ``MANIFEST_COLUMNS``): ``image_id`` (unique str), ``patient_id`` (str),
``split`` (train/val/test, patient-disjoint), one int8 0/1 column per label in ``LABELS``, ``sex``
(F/M/unknown), ``age`` (float years, NaN when missing - never 0), ``view`` (str), ``site`` (str),
``source_path`` (str, relative to the dataset root; never logged to tracking).

Loaders read pixels from the memory-mapped array only; no image file is decoded at training time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainables.data.labels import LABELS, SEXES, SPLITS
from trainables.data.splits import check_split_current
from trainables.names import CARD_FILE as CARD_FILE  # `as`: re-exported to the data modules
from trainables.names import IMAGES_FILE as IMAGES_FILE
from trainables.names import MANIFEST_FILE as MANIFEST_FILE

MANIFEST_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "patient_id": "string",
    "split": "string",
    **{label: "int8" for label in LABELS},
    "sex": "string",
    "age": "float64",
    "view": "string",
    "site": "string",
    "source_path": "string",
}


class CacheError(ValueError):
    """A prepared dataset folder is missing, incomplete or inconsistent."""


def validate_manifest(manifest: pd.DataFrame, n_images: int | None = None, where: str = "manifest") -> None:
    """Check a manifest against the cache contract; raise `CacheError` naming the first problem.

    Checks: required columns, unique image ids, split and sex codings, 0/1 labels, ages missing or in
    [0, 120], patient-disjoint splits, and (when given) one row per image in the array.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise CacheError(f"{where}: missing columns {missing}; a cache manifest needs {list(MANIFEST_COLUMNS)}")
    if n_images is not None and len(manifest) != n_images:
        raise CacheError(f"{where}: {len(manifest)} manifest rows but {n_images} images; re-run prepare")
    dup = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(dup):
        raise CacheError(f"{where}: duplicate image_id {dup.iloc[0]!r} (and {len(dup) - 1} more)")
    bad_split = manifest.loc[~manifest["split"].isin(SPLITS), "split"]
    if len(bad_split):
        raise CacheError(f"{where}: split {bad_split.iloc[0]!r} at row {bad_split.index[0]}; expected one of {SPLITS}")
    bad_sex = manifest.loc[~manifest["sex"].isin(SEXES), "sex"]
    if len(bad_sex):
        raise CacheError(f"{where}: sex {bad_sex.iloc[0]!r} at row {bad_sex.index[0]}; expected one of {SEXES}")
    for label in LABELS:
        bad = manifest.loc[~manifest[label].isin([0, 1]), label]
        if len(bad):
            raise CacheError(f"{where}: label {label}={bad.iloc[0]!r} at row {bad.index[0]}; labels must be 0 or 1")
    age = manifest["age"].astype("float64")
    bad_age = age[(age < 0) | (age > 120)]
    if len(bad_age):
        raise CacheError(f"{where}: age {bad_age.iloc[0]} at row {bad_age.index[0]}; expected years in [0, 120] or NaN")
    splits_per_patient = manifest.groupby("patient_id", observed=True)["split"].nunique()
    leaked = splits_per_patient[splits_per_patient > 1]
    if len(leaked):
        patient = leaked.index[0]
        splits = sorted(manifest.loc[manifest["patient_id"] == patient, "split"].unique())
        raise CacheError(f"{where}: patient {patient!r} is in splits {splits}; splits must be patient-disjoint")


def write_cache(
    out_dir: Path, images: np.ndarray | Path, manifest: pd.DataFrame, card: dict[str, Any] | None = None
) -> Path:
    """Validate and write one prepared dataset; files are written atomically (tmp + rename).

    Args:
        out_dir: ``<data_root>/<dataset>/<size>``; created if needed.
        images: uint8 array [N, H, W], or the path of a ``.npy`` file holding one on the same filesystem,
            which is moved into place (no copy, so a large cache never passes through memory).
        manifest: one row per image in the same order, with ``MANIFEST_COLUMNS``.
        card: extra dataset-card fields (e.g. skipped images); counts are added here.
    """
    source: Path | None
    if isinstance(images, Path):
        source, array = images, np.load(images, mmap_mode="r")  # header only: shape and dtype
    else:
        source, array = None, images
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CacheError(f"images must be uint8 [N, H, W], got {array.dtype} {array.shape}")
    manifest = manifest.reset_index(drop=True)
    validate_manifest(manifest, n_images=len(array), where=str(out_dir))
    manifest = manifest[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(array.shape[1])
    if source is not None:
        del array
        source.replace(out_dir / IMAGES_FILE)
    else:
        tmp = out_dir / (IMAGES_FILE + ".tmp.npy")
        np.save(tmp, np.ascontiguousarray(array))
        tmp.replace(out_dir / IMAGES_FILE)
    tmp_manifest = out_dir / (MANIFEST_FILE + ".tmp")
    manifest.to_parquet(tmp_manifest, index=False)
    tmp_manifest.replace(out_dir / MANIFEST_FILE)
    full_card = {**dataset_card(manifest, size), **(card or {})}
    (out_dir / CARD_FILE).write_text(json.dumps(full_card, indent=2, default=str))
    return out_dir


def images_per_patient_summary(patient_id: pd.Series | np.ndarray) -> dict[str, int | float] | None:
    """Images per patient: ``patients``, ``min``, ``median``, ``p99`` and ``max`` over patients; None when empty.

    p99 is the nearest-rank percentile, an observed count: the smallest count that at least 99 % of patients do not
    exceed (``numpy.percentile(method="inverted_cdf")``, as `trainables.privacy.units.images_per_patient`). These
    figures are treated as public dataset metadata for patient-level accounting (`trainables.privacy.units`)."""
    ids = np.asarray(patient_id, dtype=str)
    if not len(ids):
        return None
    counts = np.unique(ids, return_counts=True)[1]
    return {
        "patients": int(len(counts)),
        "min": int(counts.min()),
        "median": float(np.median(counts)),
        "p99": int(np.percentile(counts, 99, method="inverted_cdf")),
        "max": int(counts.max()),
    }


def dataset_card(manifest: pd.DataFrame, size: int) -> dict[str, Any]:
    """Counts per split, label prevalence per split, and demographic coverage."""
    card: dict[str, Any] = {
        "n_images": int(len(manifest)),
        "n_patients": int(manifest["patient_id"].nunique()),
        "size": size,
    }
    card["splits"] = {}
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        card["splits"][split] = {
            "images": int(len(part)),
            "patients": int(part["patient_id"].nunique()),
            "prevalence": {label: round(float(part[label].mean()), 4) if len(part) else None for label in LABELS},
            "images_per_patient": images_per_patient_summary(part["patient_id"]),
        }
    if len(manifest) and (manifest["patient_id"].astype(str) == manifest["image_id"].astype(str)).all():
        card["patient_ids"] = "none published: each image is its own patient (patient_id = image_id)"
    card["sex"] = {str(k): int(v) for k, v in manifest["sex"].value_counts().items()}
    card["age_missing"] = int(manifest["age"].isna().sum())
    card["views"] = {str(k): int(v) for k, v in manifest["view"].value_counts().items()}
    return card


@dataclass(frozen=True)
class SplitData:
    """One split of a prepared dataset, as arrays (images stay memory-mapped)."""

    images: np.ndarray  # uint8 [n, H, W] (a memmap slice via `rows`)
    rows: np.ndarray  # int64 row indices into the cache's image array
    labels: np.ndarray  # float32 [n, len(LABELS)]
    sex: np.ndarray  # str [n]
    age: np.ndarray  # float64 [n], NaN when missing
    patient_id: np.ndarray  # str [n]

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, keep: np.ndarray) -> SplitData:
        """The rows where ``keep`` (bool [n]) is true, in their order."""
        return SplitData(
            images=self.images,
            rows=self.rows[keep],
            labels=self.labels[keep],
            sex=self.sex[keep],
            age=self.age[keep],
            patient_id=self.patient_id[keep],
        )


@dataclass(frozen=True)
class Cache:
    """An opened prepared dataset."""

    path: Path
    images: np.ndarray
    manifest: pd.DataFrame

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def split(self, name: str) -> SplitData:
        if name not in SPLITS:
            raise CacheError(f"unknown split {name!r}; expected one of {SPLITS}")
        part = self.manifest[self.manifest["split"] == name]
        rows = part.index.to_numpy(dtype=np.int64)
        return SplitData(
            images=self.images,
            rows=rows,
            labels=part[list(LABELS)].to_numpy(dtype=np.float32),
            sex=part["sex"].astype(str).to_numpy(),
            age=part["age"].to_numpy(dtype=np.float64),
            patient_id=part["patient_id"].astype(str).to_numpy(),
        )


def open_cache(path: Path) -> Cache:
    """Open a prepared dataset folder (``<data_root>/<dataset>/<size>``) without reading pixels.

    Raises:
        CacheError: a file is missing or the manifest breaks the contract.
        trainables.data.splits.StaleSplitError: a real dataset prepared with the former seeded split (the message
            holds the command that re-splits it).
    """
    images_path, manifest_path = path / IMAGES_FILE, path / MANIFEST_FILE
    for required in (images_path, manifest_path):
        if not required.exists():
            raise CacheError(f"{required} is missing: the dataset at {path} is not prepared (run `dpsweep prepare`)")
    check_split_current(path)
    images = np.load(images_path, mmap_mode="r")
    manifest = pd.read_parquet(manifest_path)
    validate_manifest(manifest, n_images=len(images), where=str(manifest_path))
    return Cache(path=path, images=images, manifest=manifest)
