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
    make_records,
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


def load(root: Path) -> SourceTable:
    """Read both label files under ``root/annotations`` and the DICOM headers for sex and age."""
    train_path = root / "annotations" / "image_labels_train.csv"
    test_path = root / "annotations" / "image_labels_test.csv"
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
    return SourceTable(records=records, skipped=skipped, notes=notes, issues=+issues)


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
                header = pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge"]
                )
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


ADAPTER = Adapter(name=NAME, title="VinDr-CXR 1.0.0", load=load, options={})
