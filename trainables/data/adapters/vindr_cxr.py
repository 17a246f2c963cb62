"""VinDr-CXR 1.0.0 (PhysioNet): image-level labels of three readers (train) or a consensus (test), DICOM.

Root: the ``vinbigdata-chest-xray-...`` / ``1.0.0`` folder holding ``annotations/image_labels_train.csv``,
``annotations/image_labels_test.csv``, ``train/<image_id>.dicom`` and ``test/<image_id>.dicom``.

- Labels: the binary (0/1) columns ``Atelectasis``, ``Cardiomegaly``, ``Pleural effusion``,
  ``Pneumonia``, ``No finding``. Training images have one row per reader (``rad_id``, normally three);
  a finding is positive if any reader marked it, and no_finding = 1 iff every reader marked
  ``No finding`` (so an image with a positive finding is never also "no finding"). Test images have one
  consensus row. Every finding column must be 0/1. The two files spell one column differently
  (``Other diseases`` vs ``Other disease``); it is normalized to ``Other disease`` before they are
  compared and checked.
- Demographics: DICOM tags PatientSex (0010,0040) F/M (anything else: unknown) and PatientAge
  (0010,1010) like ``045Y`` (also ``D``/``W``/``M`` units); missing, malformed or zero ages are missing.
  Headers are read without pixel data.
- Views: all.
- Split: official, ``image_labels_train.csv`` -> train (validation carved from it), ``_test.csv`` -> test.
- Ids: VinDr-CXR publishes no patient identifier, so each image is its own patient (``patient_id`` =
  ``image_id``); patient-level splits are therefore image-level.

The Kaggle copy (VinBigData Chest X-ray Abnormalities Detection: ``train.csv`` with one box per reader and
finding, ``train/`` and ``test/`` DICOMs) has no image-level labels, only the 14 local findings, so it
carries no pneumonia label and its test images no labels at all. ``vindr-cxr`` recognises that layout and
says so; it is prepared as ``vindr-cxr-kaggle`` (`KAGGLE_ADAPTER`):

- Labels: per image, a finding is positive if any reader drew a box of class ``Atelectasis``,
  ``Cardiomegaly`` or ``Pleural effusion``; no_finding = every reader's only row is ``No finding``.
  pneumonia is *missing* (``Adapter.missing_labels``): its manifest column is 0 and means unknown; the card
  says so and `trainables.data.registry` keeps sweeps from using the dataset. ``class_name`` must be one of
  the 15 Kaggle classes and agree with ``class_id``; a reader may not mark ``No finding`` next to a box.
- Demographics, views, ids: as above (DICOM headers; each image is its own patient).
- Split: none official (Kaggle's test images are unlabeled and not used): keyed image-wise split of the
  15,000 training images (each image is its own patient).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from trainables.data.adapters.base import (
    Adapter,
    DatasetError,
    SourceTable,
    check_unique,
    clean_ages,
    line,
    make_records,
    map_values,
    parse_findings,
    read_table,
)

NAME = "vindr-cxr"
LABEL_COLUMNS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural effusion",
    "pneumonia": "Pneumonia",
    "no_finding": "No finding",
}
OTHER_DISEASE_SPELLINGS = {"Other diseases": "Other disease"}
"""The one column whose name differs between the train and test files, normalized to one spelling."""

AGE_PATTERN = re.compile(r"^(\d{1,3})([DWMY])$")
YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
SEX_CODES = {"F": "F", "M": "M"}


KAGGLE_NAME = "vindr-cxr-kaggle"
KAGGLE_CLASSES = {
    "Aortic enlargement": "0", "Atelectasis": "1", "Calcification": "2", "Cardiomegaly": "3",
    "Consolidation": "4", "ILD": "5", "Infiltration": "6", "Lung Opacity": "7", "Nodule/Mass": "8",
    "Other lesion": "9", "Pleural effusion": "10", "Pleural thickening": "11", "Pneumothorax": "12",
    "Pulmonary fibrosis": "13", "No finding": "14",
}  # fmt: skip
"""Kaggle VinBigData ``class_name`` -> ``class_id``: the 14 local findings and "No finding"."""
KAGGLE_LABEL_CLASSES = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural effusion",
}
"""Study label -> the Kaggle box class that makes it positive."""
KAGGLE_MISSING_LABELS = {
    "pneumonia": "the Kaggle VinBigData copy has local (box) findings only; pneumonia is a global label of "
    "PhysioNet VinDr-CXR 1.0.0 (annotations/image_labels_*.csv)"
}
KAGGLE_REQUIRED = ("image_id", "class_name", "class_id", "rad_id")


def load(root: Path) -> SourceTable:
    """Read both label files under ``root/annotations`` and the DICOM headers for sex and age."""
    train_path = root / "annotations" / "image_labels_train.csv"
    test_path = root / "annotations" / "image_labels_test.csv"
    if not train_path.is_file() and _is_kaggle_layout(root):
        raise DatasetError(
            f"{NAME}: {root} is the Kaggle VinBigData competition copy (train.csv: one box per reader and local "
            f"finding; no image-level labels, so no pneumonia label, and unlabeled test images), not PhysioNet "
            f"VinDr-CXR 1.0.0 (annotations/image_labels_train.csv and image_labels_test.csv). Either prepare it "
            f"as `dpsweep prepare {KAGGLE_NAME} --root {root}` (four of the five labels; the card lists the "
            "missing one and sweeps refuse it) or download VinDr-CXR 1.0.0 from PhysioNet for all five labels"
        )
    train = read_table(train_path, ("image_id", "rad_id", *LABEL_COLUMNS.values()))
    test = read_table(test_path, ("image_id", *LABEL_COLUMNS.values()))
    train = train.rename(columns=OTHER_DISEASE_SPELLINGS)
    test = test.rename(columns=OTHER_DISEASE_SPELLINGS)
    train_findings = [c for c in train.columns if c not in ("image_id", "rad_id")]
    test_findings = [c for c in test.columns if c not in ("image_id", "rad_id")]
    if set(train_findings) != set(test_findings):
        raise DatasetError(
            f"{NAME}: finding columns differ between {train_path.name} and {test_path.name}: only in train "
            f"{sorted(set(train_findings) - set(test_findings))}, only in test "
            f"{sorted(set(test_findings) - set(train_findings))}"
        )
    for path, table in ((train_path, train), (test_path, test)):
        parse_findings(table, {c: c for c in train_findings}, path, uncertain=False, blank=False)

    train = train.assign(image_id=train["image_id"].str.strip(), rad_id=train["rad_id"].str.strip())
    test = test.assign(image_id=test["image_id"].str.strip())
    check_unique(train["image_id"] + " read by " + train["rad_id"], train_path, "image/reader pair")
    check_unique(test["image_id"], test_path, "image_id")
    both = sorted(set(train["image_id"]) & set(test["image_id"]))
    if both:
        raise DatasetError(
            f"{test_path}: duplicate image id {both[0]!r}, already in {train_path.name} "
            f"({len(both)} such images); an image (= patient in VinDr) belongs to one official split"
        )

    train_codes = pd.DataFrame(parse_findings(train, LABEL_COLUMNS, train_path, uncertain=False, blank=False))
    train_codes["image_id"] = train["image_id"].to_numpy()
    merged = train_codes.groupby("image_id", sort=False).agg(
        {**{label: "max" for label in LABEL_COLUMNS if label != "no_finding"}, "no_finding": "min"}
    )
    readers = Counter(train.groupby("image_id", sort=False).size().tolist())
    test_codes = pd.DataFrame(parse_findings(test, LABEL_COLUMNS, test_path, uncertain=False, blank=False))
    test_codes.index = test["image_id"].to_numpy()

    image_ids = [*merged.index, *test_codes.index]
    splits = ["train"] * len(merged) + ["test"] * len(test_codes)
    source_paths = [f"{split}/{image_id}.dicom" for image_id, split in zip(image_ids, splits, strict=True)]
    labels = pd.concat([merged, test_codes])
    sexes, ages, unreadable, issues = _read_demographics(root, source_paths)
    keep = ~np.isin(np.arange(len(image_ids)), list(unreadable))
    skipped = [{"source_path": source_paths[i], "reason": reason} for i, reason in unreadable.items()]
    zero = int((ages == 0).sum())
    ages, implausible = clean_ages(ages, zero_is_missing=True)
    records = make_records(
        image_id=np.asarray(image_ids)[keep],
        patient_id=np.asarray(image_ids)[keep],
        labels={label: labels[label].to_numpy()[keep] for label in LABEL_COLUMNS},
        sex=np.asarray(sexes, dtype=object)[keep],
        age=ages[keep],
        view="frontal",
        site=NAME,
        source_path=np.asarray(source_paths)[keep],
        official_split=np.asarray(splits)[keep],
    )
    notes = (
        "labels: Atelectasis, Cardiomegaly, Pleural effusion, Pneumonia (positive if any reader marked it); "
        "no_finding = every reader marked 'No finding'; test labels are the published consensus",
        f"readers per training image: { {k: v for k, v in sorted(readers.items())} }",
        "sex from DICOM PatientSex; age from DICOM PatientAge (e.g. 045Y), zero or malformed = missing",
        "all views; official split (train file -> train + carved validation, test file -> test); "
        "no patient ids published: patient_id = image_id",
    )
    issues["PatientAge zero or outside [0, 120] (age missing)"] += zero + implausible
    return SourceTable(records=records, skipped=skipped, notes=notes, issues=+issues, image_is_patient=True)


def parse_dicom_age(value: str) -> float:
    """DICOM Age String (``nnnD|W|M|Y``, e.g. ``045Y``) in years; NaN when blank or malformed."""
    match = AGE_PATTERN.match(str(value).strip().upper())
    if match is None:
        return float("nan")
    return int(match.group(1)) * YEARS_PER_UNIT[match.group(2)]


def _read_demographics(
    root: Path, source_paths: list[str]
) -> tuple[list[str], np.ndarray, dict[int, str], Counter[str]]:
    """Sex and age from each DICOM header; unreadable files by index with the reason."""
    import pydicom

    sexes, ages = [], np.full(len(source_paths), np.nan)
    unreadable: dict[int, str] = {}
    issues: Counter[str] = Counter()
    progress = tqdm(source_paths, desc=f"{NAME}: DICOM headers", unit="file", leave=False, disable=None)
    for i, source_path in enumerate(progress):
        path = root / source_path
        if not path.is_file():
            unreadable[i] = "file not found"
            sexes.append("unknown")
            continue
        try:
            with warnings.catch_warnings():  # malformed tag values are counted below instead
                warnings.simplefilter("ignore", UserWarning)
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge"])
                raw_sex = str(header.get("PatientSex", "") or "")
                raw_age = str(header.get("PatientAge", "") or "")
        except Exception as error:  # pydicom raises InvalidDicomError, EOFError, ... on damaged files
            unreadable[i] = f"unreadable DICOM ({type(error).__name__}: {error})"
            sexes.append("unknown")
            continue
        sex = SEX_CODES.get(raw_sex.strip().upper(), "unknown")
        if sex == "unknown":
            issues["PatientSex missing or not F/M (sex unknown)"] += 1
        sexes.append(sex)
        ages[i] = parse_dicom_age(raw_age)
        if np.isnan(ages[i]):
            issues["PatientAge missing or malformed (age missing)"] += 1
    return sexes, ages, unreadable, issues


def _is_kaggle_layout(root: Path) -> bool:
    """``root/train.csv`` exists and its header has the Kaggle columns."""
    path = root / "train.csv"
    if not path.is_file():
        return False
    with path.open(newline="") as handle:
        header = handle.readline().strip().split(",")
    return set(KAGGLE_REQUIRED) <= set(header)


def load_kaggle(root: Path) -> SourceTable:
    """Read the Kaggle VinBigData ``train.csv`` (boxes per reader) and the DICOM headers of ``train/``."""
    path = root / "train.csv"
    if not path.is_file():
        hint = ""
        if (root / "annotations" / "image_labels_train.csv").is_file():
            hint = f"; {root} looks like PhysioNet VinDr-CXR 1.0.0: prepare it as `{NAME}`"
        raise DatasetError(
            f"{KAGGLE_NAME}: {path} not found; pass the Kaggle vinbigdata-chest-xray-abnormalities-detection "
            f"folder holding train.csv and train/{hint}"
        )
    table = read_table(path, KAGGLE_REQUIRED)
    table = table.assign(
        image_id=table["image_id"].str.strip(),
        rad_id=table["rad_id"].str.strip(),
        class_name=table["class_name"].str.strip(),
    )
    class_ids = map_values(table, "class_name", KAGGLE_CLASSES, path, "class_name")
    disagree = class_ids != table["class_id"].str.strip().to_numpy(dtype=str)
    if disagree.any():
        i = int(np.flatnonzero(disagree)[0])
        raise DatasetError(
            f"{path}: line {line(path, table.index[i])}, column 'class_id': {table['class_id'].iloc[i]!r} does "
            f"not match class_name {table['class_name'].iloc[i]!r} (expected {class_ids[i]})"
        )
    no_finding = (table["class_name"] == "No finding").to_numpy()
    reads = pd.DataFrame(
        {
            "image_id": table["image_id"].to_numpy(),
            "rad_id": table["rad_id"].to_numpy(),
            "no_finding": no_finding,
            "boxes": ~no_finding,
            **{label: (table["class_name"] == c).to_numpy() for label, c in KAGGLE_LABEL_CLASSES.items()},
        },
        index=table.index,
    )
    per_reader = reads.groupby(["image_id", "rad_id"], sort=False).agg(
        {"no_finding": "any", "boxes": "any", **{label: "any" for label in KAGGLE_LABEL_CLASSES}}
    )
    both = per_reader["no_finding"] & per_reader["boxes"]
    if both.any():
        image_id, rad_id = both.index[int(np.flatnonzero(both.to_numpy())[0])]
        rows = reads.index[(reads["image_id"] == image_id) & (reads["rad_id"] == rad_id)]
        raise DatasetError(
            f"{path}: reader {rad_id!r} marks image {image_id!r} 'No finding' and also draws boxes (lines "
            f"{[line(path, i) for i in rows]}); a reader's 'No finding' must be the only row"
        )
    per_image = per_reader.groupby(level="image_id", sort=False).agg(
        {"no_finding": "all", **{label: "any" for label in KAGGLE_LABEL_CLASSES}}
    )
    readers = Counter(per_reader.groupby(level="image_id", sort=False).size().tolist())
    image_ids = per_image.index.to_numpy(dtype=str)
    source_paths = [f"train/{image_id}.dicom" for image_id in image_ids]
    sexes, ages, unreadable, issues = _read_demographics(root, source_paths)
    keep = ~np.isin(np.arange(len(image_ids)), list(unreadable))
    skipped = [{"source_path": source_paths[i], "reason": reason} for i, reason in unreadable.items()]
    zero = int((ages == 0).sum())
    ages, implausible = clean_ages(ages, zero_is_missing=True)
    labels = {label: per_image[label].to_numpy(dtype=np.int8)[keep] for label in KAGGLE_LABEL_CLASSES}
    labels["pneumonia"] = np.zeros(int(keep.sum()), dtype=np.int8)  # missing (Adapter.missing_labels)
    labels["no_finding"] = per_image["no_finding"].to_numpy(dtype=np.int8)[keep]
    records = make_records(
        image_id=image_ids[keep],
        patient_id=image_ids[keep],
        labels=labels,
        sex=np.asarray(sexes, dtype=object)[keep],
        age=ages[keep],
        view="frontal",
        site=KAGGLE_NAME,
        source_path=np.asarray(source_paths)[keep],
    )
    notes = (
        "labels from train.csv boxes: Atelectasis, Cardiomegaly, Pleural effusion (positive if any reader drew "
        "a box of that class); no_finding = every reader's only row is 'No finding'",
        "pneumonia is missing: the Kaggle copy has no image-level labels (its manifest column is 0 = unknown)",
        f"readers per image: { {k: v for k, v in sorted(readers.items())} }",
        "sex from DICOM PatientSex; age from DICOM PatientAge (e.g. 045Y), zero or malformed = missing",
        "all views; no official labeled test split (Kaggle's test/ images are unlabeled and not used): keyed "
        "image-wise split; no patient ids published: patient_id = image_id",
    )
    issues["PatientAge zero or outside [0, 120] (age missing)"] += zero + implausible
    return SourceTable(records=records, skipped=skipped, notes=notes, issues=+issues, image_is_patient=True)


ADAPTER = Adapter(name=NAME, title="VinDr-CXR 1.0.0", load=load, options={})
KAGGLE_ADAPTER = Adapter(
    name=KAGGLE_NAME,
    title="VinDr-CXR, Kaggle VinBigData copy (local labels only)",
    load=load_kaggle,
    options={},
    missing_labels=KAGGLE_MISSING_LABELS,
)
