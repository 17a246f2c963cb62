"""``dpsweep prepare``: a real dataset's official files -> the preprocessing cache of `trainables.data.cache`.

Pipeline (`prepare_dataset`):

1. The dataset's adapter (`trainables.data.adapters`) reads the official label/metadata files into one
   record per candidate image: harmonized labels with the uncertain code -1, official split (if any),
   sex F/M/unknown, age in years (NaN = missing), view, path. View filtering happens there.
2. Splits (`trainables.data.splits.assign_splits`) are drawn *before* the uncertain policy, so the test
   patients do not depend on it: official splits are kept; otherwise a patient is in test with probability
   ``test_fraction`` and a training patient in validation with probability ``val_fraction`` (unless the
   dataset has an official validation split), each decided by a keyed hash of the patient's own id, so adding
   or removing a patient moves nobody else. The key is the dataset's ``split.key`` beside the prepared sizes
   (`trainables.data.splits.resolve_split_key`: reused, given with ``split_key``, or drawn once from
   ``os.urandom``); the card records its id, never the key. Splits are patient-disjoint; counts are binomial.
3. The uncertain policy (`apply_uncertain_policy`): ``drop`` removes every image with -1 in any of the
   five labels; ``zeros`` / ``ones`` recode -1 as 0 / 1. Blank ("not mentioned") is already 0.
4. Pixels (`trainables.data.preprocess`), in parallel over images, streamed one row at a time into a
   preallocated ``.npy`` file under ``<out>/<name>/<size>/.partial/`` (positioned writes, no memory map,
   so memory does not grow with the number of images), with a done-mask saved every `FLUSH_EVERY` images /
   `FLUSH_SECONDS` and on any interruption. Running the same command again resumes: done images are not
   read again. Unreadable images are skipped and listed in the card with the reason.
5. `write_cache` writes ``manifest.parquet`` and ``card.json`` and moves the image file into place as
   ``images.npy`` (no copy; when images were skipped the kept rows are first compacted chunk by chunk);
   ``.partial`` is removed. `format_card` renders the card as text (``dpsweep prepare`` prints it once).

The card also reports images per patient, patients whose metadata disagrees across their images (sex, and
what the adapter marks as per-patient, e.g. PadChest's birth year), labels the distribution cannot provide,
and how fast this run preprocessed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from trainables.data import preprocess
from trainables.data.adapters import ADAPTERS, PREPARABLE, DatasetError, get_adapter
from trainables.data.adapters.base import UNCERTAIN
from trainables.data.cache import MANIFEST_COLUMNS, dataset_card, images_per_patient_summary, write_cache
from trainables.data.labels import LABELS, SEXES, SPLITS
from trainables.data.preprocess import PreprocessSettings, UnreadableImage
from trainables.data.splits import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    SplitKeyError,
    assign_splits,
    key_id,
    read_split_key,
    resolve_split_key,
    split_key_path,
)

UNCERTAIN_POLICIES: tuple[str, ...] = ("drop", "zeros", "ones")
"""How the uncertain label code (-1) is resolved: drop the image, or read it as 0 or as 1."""

PARTIAL_DIR = ".partial"
FLUSH_EVERY = 500
"""Images processed between saves of the done-mask (and at most `FLUSH_SECONDS` apart)."""
FLUSH_SECONDS = 30.0
PENDING, DONE, SKIPPED = 0, 1, 2
"""Done-mask states of one image."""
ATTRIBUTE_PREFIX = "__patient_attribute__"
"""Prefix of the per-patient attribute columns carried through the pipeline (never in the manifest)."""
EXAMPLES = 5
"""Patients listed by name per kind of inconsistent metadata in the card (the rest are counted)."""

__all__ = [
    "ADAPTERS",
    "PREPARABLE",
    "UNCERTAIN_POLICIES",
    "DatasetError",
    "PrepareInterrupted",
    "SplitKeyError",
    "apply_uncertain_policy",
    "assign_splits",
    "format_card",
    "images_per_patient",
    "inconsistent_patients",
    "prepare_dataset",
]


class PrepareInterrupted(RuntimeError):
    """Preprocessing stopped early (``stop_after``); the work so far is kept and the next run resumes it."""


def prepare_dataset(
    name: str,
    root: Path,
    *,
    size: int = 224,
    out: Path = Path("data"),
    workers: int = 2,
    uncertain: str = "drop",
    letterbox: bool = False,
    equalize: bool = True,
    split_key: Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    stop_after: int | None = None,
    **adapter_options: object,
) -> Path:
    """Prepare one real dataset into ``<out>/<name>/<size>/`` (images.npy, manifest.parquet, card.json).

    Args:
        name: a registry name, one of `PREPARABLE`.
        root: the dataset's folder as distributed (see ``docs/datasets.md``).
        size: output image side in pixels.
        out: data root; the cache goes to ``out/name/size``.
        workers: processes decoding images in parallel (1 = in this process). Never changes the result.
        uncertain: uncertain-label policy, one of `UNCERTAIN_POLICIES`.
        letterbox: keep the aspect ratio and pad with black instead of stretching.
        equalize: histogram equalization (the study: on).
        split_key: a split key file to reuse (e.g. the ``split.key`` of an earlier preparation of this dataset,
            for a new release or another data root); copied to ``out/name/split.key``. None: the key already
            there, else a new one drawn from ``os.urandom``. Never logged or written to the card.
        val_fraction: probability that a training patient is in validation (when no official validation split).
        test_fraction: probability that a patient is in test (only when no official split exists).
        stop_after: preprocess at most this many images in this call, then keep the work and raise
            `PrepareInterrupted` (for resumable chunked runs and tests).
        **adapter_options: dataset-specific options, e.g. ``patients_csv`` for ``mimic-cxr`` (see
            ``ADAPTERS[name].options``). Options set to None count as not given.

    Returns:
        The cache folder ``out/name/size``.

    Raises:
        DatasetError: unknown dataset or option, bad setting, missing root or file, malformed files, or
            a split left empty.
        SplitKeyError: the split key file is unreadable or malformed, or not the key of the dataset's other
            prepared sizes.
        PrepareInterrupted: ``stop_after`` images were processed and more remain.
    """
    adapter = get_adapter(name)
    settings = _check_settings(size, letterbox, equalize)
    _check_options(workers, uncertain, val_fraction, test_fraction, stop_after)
    if split_key is not None:
        read_split_key(split_key)  # a bad key file fails before the dataset is read
    root = Path(root)
    table = adapter.read(root, **adapter_options)
    records = table.records
    if records.empty:
        raise DatasetError(
            f"{name}: no images left after filtering ({dict(table.excluded)}); check the files in {root}"
        )

    attributes = {f"{ATTRIBUTE_PREFIX}{key}": np.asarray(v, dtype=str) for key, v in table.patient_attributes.items()}
    records = records.assign(**attributes)
    key, how = resolve_split_key(Path(out) / name, split_key)
    if how == "drawn":
        _say(
            f"drew a new split key for {name}: {split_key_path(out, name)} (private, like the cache; keep it "
            "and pass it with --split-key to prepare a new release of the dataset elsewhere)"
        )
    split, split_method = assign_splits(
        records["patient_id"].to_numpy(dtype=str),
        records["official_split"].to_numpy(dtype=str),
        key=key,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    uncertain_counts = {label: int((records[label] == UNCERTAIN).sum()) for label in LABELS}
    labels, keep = apply_uncertain_policy(records[list(LABELS)].to_numpy(dtype=np.int8), uncertain)
    manifest = records.assign(split=split, **{label: labels[:, i] for i, label in enumerate(LABELS)})
    manifest = manifest[keep].reset_index(drop=True)
    excluded = {**table.excluded}
    if uncertain == "drop":
        excluded["uncertain label (policy drop)"] = int((~keep).sum())
    _check_splits_not_empty(manifest, name, f"after the uncertain policy {uncertain!r}; excluded {excluded}")

    out_dir = Path(out) / name / str(size)
    fingerprint = {
        "dataset": name,
        "root": str(root.resolve()),
        "size": settings.size,
        "letterbox": settings.letterbox,
        "equalize": settings.equalize,
        "preprocess_version": preprocess.PREPROCESS_VERSION,
        "n_images": len(manifest),
        "sources_sha256": hashlib.sha256("\n".join(manifest["source_path"]).encode()).hexdigest(),
    }
    partial = _Partial.open(out_dir / PARTIAL_DIR, fingerprint, settings.size)
    try:
        timing = _preprocess_all(partial, root, manifest["source_path"].tolist(), settings, workers, stop_after, name)
    finally:
        partial.close()

    done = partial.status == DONE
    skipped = [*table.skipped] + [
        {"source_path": manifest["source_path"].iloc[i], "reason": partial.reasons[i]}
        for i in np.flatnonzero(partial.status == SKIPPED).tolist()
    ]
    manifest = manifest[done].reset_index(drop=True)
    _check_splits_not_empty(manifest, name, f"after skipping {len(skipped)} unreadable image(s)")
    images_file = partial.images_file(np.flatnonzero(done))
    attribute_values = {
        "sex": manifest["sex"].to_numpy(dtype=str),
        **{key.removeprefix(ATTRIBUTE_PREFIX): manifest[key].to_numpy(dtype=str) for key in attributes},
    }
    card: dict[str, Any] = {
        "dataset": name,
        "title": adapter.title,
        "root": str(root),
        "settings": {
            "size": settings.size,
            "letterbox": settings.letterbox,
            "equalize": settings.equalize,
            "uncertain": uncertain,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "adapter_options": {k: str(v) for k, v in adapter_options.items() if v is not None},
        },
        "split_method": split_method,
        "split_key_id": key_id(key),
        "notes": list(table.notes),
        "uncertain_labels_before_policy": uncertain_counts,
        "excluded": excluded,
        "metadata_issues": dict(table.issues),
        "demographics": demographic_coverage(manifest),
        "images_per_patient": images_per_patient(
            manifest["patient_id"].to_numpy(dtype=str), image_is_patient=table.image_is_patient
        ),
        "inconsistent_patients": inconsistent_patients(manifest["patient_id"].to_numpy(dtype=str), attribute_values),
        "labels_missing": dict(adapter.missing_labels),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "prepare_timing": timing,
    }
    if adapter.missing_labels:  # the prevalence of a label the dataset does not have is unknown, not 0
        card["splits"] = dataset_card(manifest, settings.size)["splits"]
        for entry in card["splits"].values():
            entry["prevalence"].update({label: None for label in adapter.missing_labels})
    write_cache(out_dir, images_file, manifest[list(MANIFEST_COLUMNS)], card)
    partial.remove()
    return out_dir


def apply_uncertain_policy(labels: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Resolve the uncertain code -1 in a label matrix.

    Args:
        labels: int8 [n, len(LABELS)] with values in {1, 0, -1}.
        policy: ``drop`` (remove every image with -1 in any label), ``zeros`` (-1 -> 0) or ``ones`` (-1 -> 1).

    Returns:
        (labels with only 0/1, bool mask [n] of the images kept).
    """
    if policy not in UNCERTAIN_POLICIES:
        raise DatasetError(f"uncertain policy {policy!r} is not one of {UNCERTAIN_POLICIES}")
    labels = np.asarray(labels, dtype=np.int8).copy()
    uncertain = labels == UNCERTAIN
    keep = ~uncertain.any(axis=1) if policy == "drop" else np.ones(len(labels), dtype=bool)
    labels[uncertain] = 1 if policy == "ones" else 0
    return labels, keep


def demographic_coverage(manifest: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per split: sex counts, number of images with a known age, and age median/min/max in years."""
    coverage: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        age = part["age"].to_numpy(dtype=np.float64)
        known = age[~np.isnan(age)]
        coverage[split] = {
            "sex": {sex: int((part["sex"] == sex).sum()) for sex in SEXES},
            "age_known": int(len(known)),
            "age_years": (
                {"min": float(known.min()), "median": float(np.median(known)), "max": float(known.max())}
                if len(known)
                else None
            ),
        }
    return coverage


def images_per_patient(patient_id: np.ndarray, *, image_is_patient: bool = False) -> dict[str, Any]:
    """Images per patient: min, median, p99 and max over patients.

    p99 is the nearest-rank percentile: the smallest count that at least 99 % of patients do not exceed
    (``numpy.percentile(method="inverted_cdf")``). ``image_is_patient`` adds the statement that the dataset
    has no patient ids, so every count is 1 by construction.
    """
    entry: dict[str, Any] = images_per_patient_summary(patient_id) or {}
    if image_is_patient:
        entry["note"] = "each image is its own patient: the dataset publishes no patient id (patient_id = image_id)"
    return entry


def inconsistent_patients(patient_id: np.ndarray, attributes: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Patients whose images disagree on a value that belongs to the patient (sex, birth year, ...).

    A patient disagrees when their images carry two or more different *recorded* values; unknown or blank
    values (``"unknown"``, ``""``) are not counted as a value. Images keep their own values: this is a report.

    Args:
        patient_id: str [n], one per image.
        attributes: attribute name -> str [n] values per image.

    Returns:
        name -> ``{"patients": count, "examples": ["<patient>: <value> x<images>, ...", ...]}`` for the
        first `EXAMPLES` such patients in sorted id order; attributes without any are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, values in attributes.items():
        frame = pd.DataFrame({"patient": np.asarray(patient_id, dtype=str), "value": np.asarray(values, dtype=str)})
        frame = frame[~frame["value"].isin(["", "unknown"])]
        distinct = frame.groupby("patient", sort=True)["value"].nunique()
        patients = distinct.index[distinct.to_numpy() > 1]
        if not len(patients):
            continue
        examples = []
        for patient in patients[:EXAMPLES]:
            counts = frame.loc[frame["patient"] == patient, "value"].value_counts().sort_index()
            examples.append(f"{patient}: " + ", ".join(f"{value} x{count}" for value, count in counts.items()))
        out[name] = {"patients": int(len(patients)), "examples": examples}
    return out


def format_card(card: dict[str, Any], max_skipped: int = 20) -> str:
    """The dataset card as text: counts and prevalence per split, demographics, exclusions, skipped images.

    Args:
        card: the content of ``card.json`` (keys missing from cards of other origins are left out).
        max_skipped: skipped images listed one per line; the rest are counted.
    """
    lines = [
        f"{card.get('dataset', '?')} ({card.get('title', '')}) at {card.get('size')} px: "
        f"{card.get('n_images')} images, {card.get('n_patients')} patients",
        *_card_splits(card),
        *_card_demographics(card),
        *_card_provenance(card),
        *_card_skipped(card, max_skipped),
    ]
    timing = card.get("prepare_timing")
    if timing and timing.get("images"):
        lines.append(
            f"  preprocessed {timing['images']} image(s) in {timing['seconds']:.1f} s with {timing['workers']} "
            f"worker(s): {timing['images_per_second']:.1f} images/s, "
            f"{timing['images_per_second_per_worker']:.1f} per worker"
        )
    return "\n".join(lines)


def _card_splits(card: dict[str, Any]) -> list[str]:
    """The per-split table (images, patients, prevalence) and images per patient per split."""
    lines = [f"  {'split':<6}{'images':>9}{'patients':>10}" + "".join(f"{label:>18}" for label in LABELS)]
    for split, entry in card.get("splits", {}).items():
        prevalence = entry.get("prevalence", {})
        cells = "".join(
            f"{'-' if prevalence.get(label) is None else f'{100 * prevalence[label]:.1f}%':>18}" for label in LABELS
        )
        lines.append(f"  {split:<6}{entry['images']:>9}{entry['patients']:>10}{cells}")
    per_patient = {
        split: entry["images_per_patient"]
        for split, entry in card.get("splits", {}).items()
        if entry.get("images_per_patient")
    }
    if per_patient:
        lines.append(
            "  images per patient (min/median/p99/max): "
            + ", ".join(f"{split} {c['min']}/{c['median']:g}/{c['p99']}/{c['max']}" for split, c in per_patient.items())
        )
    return lines


def _card_demographics(card: dict[str, Any]) -> list[str]:
    """Patient ids, sex, ages per split, views and images per patient."""
    lines = []
    if "patient_ids" in card:
        lines.append(f"  patient ids: {card['patient_ids']}")
    if "sex" in card:
        lines.append("  sex: " + ", ".join(f"{k} {v}" for k, v in card["sex"].items()))
    if "age_missing" in card:
        lines.append(f"  age missing: {card['age_missing']} of {card.get('n_images')} images")
    for split, entry in card.get("demographics", {}).items():
        ages = entry.get("age_years")
        span = f"median {ages['median']:.1f} (range {ages['min']:.1f}-{ages['max']:.1f}) years" if ages else "no ages"
        lines.append(f"  {split}: age known for {entry['age_known']} images, {span}")
    if "views" in card:
        lines.append("  views: " + ", ".join(f"{k} {v}" for k, v in card["views"].items()))
    per_patient = card.get("images_per_patient")
    if per_patient:
        lines.append(
            f"  images per patient: min {per_patient['min']}, median {per_patient['median']:g}, "
            f"p99 {per_patient['p99']}, max {per_patient['max']}"
            + (f" ({per_patient['note']})" if per_patient.get("note") else "")
        )
    return lines


def _card_provenance(card: dict[str, Any]) -> list[str]:
    """Inconsistent patients, missing labels, the split rule, exclusions and metadata issues."""
    lines = [
        f"  patients whose images disagree on {attribute}: {entry['patients']} (e.g. "
        + "; ".join(entry["examples"][:3])
        + ")"
        for attribute, entry in card.get("inconsistent_patients", {}).items()
    ]
    for label, reason in card.get("labels_missing", {}).items():
        lines.append(f"  label missing: {label} (manifest column is 0 = unknown; {reason})")
    if "split_method" in card:
        key = f" (split key id {card['split_key_id']})" if card.get("split_key_id") else ""
        lines.append(f"  split: {card['split_method']}{key}")
    for field_name, title in (("excluded", "excluded"), ("metadata_issues", "metadata issues")):
        entries = {k: v for k, v in card.get(field_name, {}).items() if v}
        if entries:
            lines.append(f"  {title}: " + "; ".join(f"{k}: {v}" for k, v in entries.items()))
    return lines


def _card_skipped(card: dict[str, Any], max_skipped: int) -> list[str]:
    skipped = card.get("skipped", [])
    if not skipped:
        return ["  skipped: none"]
    lines = [f"  skipped {len(skipped)} image(s):"]
    lines.extend(f"    {entry['source_path']}: {entry['reason']}" for entry in skipped[:max_skipped])
    if len(skipped) > max_skipped:
        lines.append(f"    ... and {len(skipped) - max_skipped} more (see card.json)")
    return lines


def _check_splits_not_empty(manifest: pd.DataFrame, name: str, context: str) -> None:
    counts = manifest["split"].value_counts()
    empty = [split for split in SPLITS if counts.get(split, 0) == 0]
    if empty:
        raise DatasetError(
            f"{name}: split(s) {empty} would be empty ({len(manifest)} usable images {context}); check the "
            "dataset files, or for a very small dataset raise val_fraction/test_fraction (each patient is drawn on "
            "its own, so a few patients can leave a split empty)"
        )


def _check_settings(size: int, letterbox: bool, equalize: bool) -> PreprocessSettings:
    try:
        return PreprocessSettings(size=size, letterbox=bool(letterbox), equalize=bool(equalize))
    except ValueError as error:
        raise DatasetError(f"size: {error}") from error


def _check_options(
    workers: int, uncertain: str, val_fraction: float, test_fraction: float, stop_after: int | None
) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise DatasetError(f"workers must be an integer >= 1, got {workers!r}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DatasetError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise DatasetError(f"{field} must be in (0, 1), got {value!r}")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 0):
        raise DatasetError(f"stop_after must be None or an integer >= 0, got {stop_after!r}")


class _Partial:
    """The resumable work area: a preallocated ``.npy`` image file plus a done-mask with skip reasons.

    Files in ``.partial/``: ``plan.json`` (fingerprint of dataset, root, settings and image list),
    ``images.npy`` (uint8 [n, size, size]) and ``progress.npz`` (``status`` uint8 [n] in
    PENDING/DONE/SKIPPED, skip reasons). Rows are written with positioned writes (``os.pwrite``) at their
    offset in the file, not through a memory map, so the process holds one image at a time however large
    the dataset. `flush` syncs the image file to disk first and then replaces ``progress.npz`` atomically,
    so an image marked done on disk always has its pixels on disk.
    """

    def __init__(self, path: Path, n: int, size: int, offset: int, status: np.ndarray, reasons: dict[int, str]):
        self.path, self.n, self.size, self.offset = path, n, size, offset
        self.status, self.reasons = status, reasons
        self.row_bytes = size * size
        self._fd: int | None = os.open(path / "images.npy", os.O_RDWR)

    @classmethod
    def open(cls, path: Path, fingerprint: dict[str, Any], size: int) -> _Partial:
        n = fingerprint["n_images"]
        plan = path / "plan.json"
        if plan.is_file():
            if json.loads(plan.read_text()) == fingerprint and (path / "images.npy").is_file():
                shape, offset = _npy_layout(path / "images.npy")
                status, reasons = np.zeros(n, dtype=np.uint8), {}
                if (path / "progress.npz").is_file():
                    with np.load(path / "progress.npz") as progress:
                        status = progress["status"].copy()
                        reasons = dict(
                            zip(progress["skip_index"].tolist(), progress["skip_reason"].tolist(), strict=True)
                        )
                if shape == (n, size, size) and status.shape == (n,):
                    _say(f"resuming {path}: {int((status != PENDING).sum())} of {n} images already done")
                    return cls(path, n, size, offset, status, reasons)
            _say(f"discarding {path}: it holds partial work for other settings or another image list")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        offset = _create_npy(path / "images.npy", (n, size, size))
        plan.write_text(json.dumps(fingerprint, indent=2))
        return cls(path, n, size, offset, np.zeros(n, dtype=np.uint8), {})

    def write(self, index: int, pixels: np.ndarray) -> None:
        """Store one preprocessed image (uint8 [size, size]) as row ``index``."""
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        if data.shape != (self.size, self.size):
            raise ValueError(f"row {index}: expected a {self.size}x{self.size} image, got {data.shape}")
        os.pwrite(self._open_fd(), data.tobytes(), self.offset + index * self.row_bytes)

    def flush(self) -> None:
        os.fsync(self._open_fd())
        skip_index = np.array(sorted(self.reasons), dtype=np.int64)
        skip_reason = np.array([self.reasons[i] for i in skip_index.tolist()], dtype=str)
        tmp = self.path / "progress.tmp.npz"
        np.savez(tmp, status=self.status, skip_index=skip_index, skip_reason=skip_reason)
        os.replace(tmp, self.path / "progress.npz")

    def images_file(self, rows: np.ndarray, chunk: int = 1024) -> Path:
        """A ``.npy`` file holding exactly ``rows`` (in order): the work file itself when every row is kept,
        else a compacted copy written chunk by chunk (skipped images removed)."""
        self.close()
        source = self.path / "images.npy"
        if len(rows) == self.n and np.array_equal(rows, np.arange(self.n)):
            return source
        target = self.path / "compact.npy"
        offset = _create_npy(target, (len(rows), self.size, self.size))
        with source.open("rb") as reader, target.open("r+b") as writer:
            writer.seek(offset)
            for start in range(0, len(rows), chunk):
                for row in rows[start : start + chunk].tolist():
                    writer.write(os.pread(reader.fileno(), self.row_bytes, self.offset + row * self.row_bytes))
        return target

    def _open_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(
                f"{self.path / 'images.npy'} was closed (images_file, close or remove ran); no more writes"
            )
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path)


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """Create a uint8 ``.npy`` file of ``shape`` (a sparse file: no pixels are written); its data offset."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = int(array.offset)
    del array
    return offset


def _npy_layout(path: Path) -> tuple[tuple[int, ...], int]:
    """Shape and data offset of an existing uint8 ``.npy`` file (only the header is read)."""
    array = np.load(path, mmap_mode="r")
    shape, offset = tuple(array.shape), int(array.offset)
    del array
    return shape, offset


def _preprocess_all(
    partial: _Partial,
    root: Path,
    source_paths: list[str],
    settings: PreprocessSettings,
    workers: int,
    stop_after: int | None,
    name: str,
) -> dict[str, int | float]:
    """Fill every PENDING row of ``partial``, saving progress as it goes (see `_Partial`).

    Returns:
        The timing of this call for the card: ``workers``, ``images`` preprocessed now (resumed ones are
        not counted), wall ``seconds`` from the first job to the last result, ``images_per_second`` and
        ``images_per_second_per_worker`` (wall-clock throughput divided by the worker count).
    """
    pending = np.flatnonzero(partial.status == PENDING)
    todo = pending if stop_after is None else pending[:stop_after]
    jobs = [(int(i), str(root / source_paths[i])) for i in todo]
    bar = tqdm(
        total=len(partial.status),
        initial=len(partial.status) - len(pending),
        desc=f"prepare {name}",
        unit="img",
        disable=None,
    )
    since_flush, last_flush = 0, time.monotonic()
    started = time.perf_counter()
    results = _run_jobs(jobs, settings, workers)
    try:
        for index, outcome in results:
            if isinstance(outcome, str):
                partial.reasons[index] = outcome
                partial.status[index] = SKIPPED
            else:
                partial.write(index, outcome)
                partial.status[index] = DONE
            since_flush += 1
            bar.update(1)
            if since_flush >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_SECONDS:
                partial.flush()
                since_flush, last_flush = 0, time.monotonic()
    except BaseException:
        results.close()  # stops the worker pool now, not at garbage collection
        partial.flush()
        bar.close()
        remaining = int((partial.status == PENDING).sum())
        _say(f"interrupted with {remaining} images left; run the same command again to resume")
        raise
    seconds = time.perf_counter() - started
    partial.flush()
    bar.close()
    if len(todo) < len(pending):
        raise PrepareInterrupted(
            f"{name}: stopped after {len(todo)} images as requested (stop_after); {len(pending) - len(todo)} "
            "left; run again to resume"
        )
    used_workers = 1 if workers == 1 or len(jobs) <= 1 else min(workers, len(jobs))
    rate = len(jobs) / seconds if jobs and seconds > 0 else 0.0
    return {
        "workers": used_workers,
        "images": len(jobs),
        "seconds": round(seconds, 3),
        "images_per_second": round(rate, 2),
        "images_per_second_per_worker": round(rate / used_workers, 2),
    }


def _run_jobs(
    jobs: list[tuple[int, str]], settings: PreprocessSettings, workers: int
) -> Generator[tuple[int, np.ndarray | str], None, None]:
    """Results in completion order: in this process for ``workers == 1``, else in a spawn process pool."""
    work = functools.partial(_preprocess_one, settings=settings)
    if workers == 1 or len(jobs) <= 1:
        yield from map(work, jobs)
        return
    processes = min(workers, len(jobs))
    chunksize = max(1, min(32, len(jobs) // (processes * 8)))
    # spawn: workers must not inherit the parent's threads (tqdm, pyarrow, Ray) or its locks
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(work, jobs, chunksize=chunksize)


def _preprocess_one(job: tuple[int, str], settings: PreprocessSettings) -> tuple[int, np.ndarray | str]:
    """``(index, pixels)``, or ``(index, why it was skipped)`` for an unreadable image."""
    index, path = job
    try:
        return index, preprocess.load_and_preprocess(Path(path), settings)
    except UnreadableImage as error:
        return index, str(error)


def _say(message: str) -> None:
    print(message, file=sys.stderr)
