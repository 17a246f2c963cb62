"""MIMIC-CXR-JPG 2.0 (PhysioNet): study labels, image metadata and the official split; PA/AP views.

Root: the ``mimic-cxr-jpg/2.0.0`` folder holding ``mimic-cxr-2.0.0-chexpert.csv``, ``-metadata.csv``
and ``-split.csv`` (plain or ``.gz``, as distributed) and ``files/p10/p10000032/s50414267/<dicom_id>.jpg``.

- Labels per study (``subject_id``, ``study_id``) from the CheXpert-labeler file: ``Atelectasis``,
  ``Cardiomegaly``, ``Pleural Effusion``, ``Pneumonia``, ``No Finding``, each 1.0 / 0.0 / -1.0
  (uncertain) / blank (not mentioned = negative); every image of a study gets the study's labels.
  no_finding is the ``No Finding`` column. Images of studies without a labels row are excluded.
- Demographics: MIMIC-CXR has none; with the adapter option ``patients_csv`` (MIMIC-IV ``hosp/patients.csv``
  or ``.csv.gz``) sex is ``gender`` and age = ``anchor_age`` + (study year - ``anchor_year``), where the
  study year is the (shifted, consistently per patient) year of ``StudyDate``. Without it, or for a
  subject not in that file, sex is ``unknown`` and age missing (counted in the card).
- Views: ``ViewPosition`` PA or AP kept.
- Split: the official ``split`` column (train / validate / test -> train / val / test).
- Ids: patient ``subject_id``; image ``dicom_id``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.data.adapters.base import (
    Adapter,
    DatasetError,
    SourceTable,
    check_patient_splits,
    check_unique,
    clean_ages,
    find_file,
    line,
    make_records,
    map_values,
    parse_findings,
    parse_numbers,
    read_table,
)

NAME = "mimic-cxr"
PREFIX = "mimic-cxr-2.0.0"
LABEL_COLUMNS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "no_finding": "No Finding",
}
VIEWS_KEPT = ("PA", "AP")
SPLIT_CODES = {"train": "train", "validate": "val", "test": "test"}
GENDER_CODES = {"F": "F", "M": "M"}


def load(root: Path, patients_csv: Path | str | None = None) -> SourceTable:
    """Read the three MIMIC-CXR-JPG tables under ``root`` and, if given, MIMIC-IV ``patients.csv``."""
    labels_path = find_file(root, [f"{PREFIX}-chexpert.csv", f"{PREFIX}-chexpert.csv.gz"], NAME)
    metadata_path = find_file(root, [f"{PREFIX}-metadata.csv", f"{PREFIX}-metadata.csv.gz"], NAME)
    split_path = find_file(root, [f"{PREFIX}-split.csv", f"{PREFIX}-split.csv.gz"], NAME)

    metadata = read_table(metadata_path, ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"))
    check_unique(metadata["dicom_id"], metadata_path, "dicom_id")
    excluded: Counter[str] = Counter()
    view = metadata["ViewPosition"].astype(str).str.strip()
    kept = view.isin(VIEWS_KEPT).to_numpy()
    excluded["view not PA/AP"] = int((~kept).sum())
    metadata = metadata[kept].assign(ViewPosition=view[kept])

    labels = read_table(labels_path, ("subject_id", "study_id", *LABEL_COLUMNS.values()))
    study_key = labels["subject_id"].str.strip() + "/" + labels["study_id"].str.strip()
    check_unique(study_key, labels_path, "study (subject_id/study_id)")
    codes = parse_findings(labels, LABEL_COLUMNS, labels_path, uncertain=True)
    study_row = pd.Series(np.arange(len(labels)), index=study_key.to_numpy())
    image_key = (metadata["subject_id"].str.strip() + "/" + metadata["study_id"].str.strip()).to_numpy()
    has_labels = np.isin(image_key, study_row.index)
    excluded["study has no CheXpert labels"] = int((~has_labels).sum())
    metadata, image_key = metadata[has_labels], image_key[has_labels]
    label_rows = study_row.loc[image_key].to_numpy()

    split_table = read_table(split_path, ("dicom_id", "subject_id", "split"))
    check_unique(split_table["dicom_id"], split_path, "dicom_id")
    split_codes = pd.Series(
        map_values(split_table, "split", SPLIT_CODES, split_path, "split"),
        index=split_table["dicom_id"].str.strip(),
    )
    dicom_ids = metadata["dicom_id"].str.strip()
    missing = ~dicom_ids.isin(split_codes.index).to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DatasetError(
            f"{split_path}: no split for dicom_id {dicom_ids.iloc[i]!r} (from {metadata_path.name} line "
            f"{line(metadata_path, metadata.index[i])}) and {int(missing.sum()) - 1} more; use the split file of the "
            "same release"
        )
    check_patient_splits(split_table["subject_id"].str.strip(), split_codes.reset_index(drop=True), str(split_path))
    splits = split_codes.loc[dicom_ids.to_numpy()].to_numpy()

    study_dates = parse_numbers(metadata, "StudyDate", metadata_path, "StudyDate")
    bad_date = np.isnan(study_dates) | (study_dates < 1e7) | (study_dates >= 1e8)
    if bad_date.any():
        i = int(np.flatnonzero(bad_date)[0])
        raise DatasetError(
            f"{metadata_path}: line {line(metadata_path, metadata.index[i])}, column 'StudyDate': "
            f"{metadata['StudyDate'].iloc[i]!r} is not a YYYYMMDD date"
        )
    study_year = np.floor(study_dates / 10000)
    subjects = metadata["subject_id"].str.strip().to_numpy()
    issues: Counter[str] = Counter()
    notes = [
        "labels per study from mimic-cxr-2.0.0-chexpert.csv: 1.0 positive, 0.0 negative, -1.0 uncertain "
        "(uncertain policy), blank = not mentioned = negative; no_finding = the 'No Finding' column",
        "views PA and AP; official split (validate -> val)",
    ]
    if patients_csv is None:
        sex = np.full(len(metadata), "unknown", dtype=object)
        age = np.full(len(metadata), np.nan)
        notes.append("no patients_csv given: sex unknown and age missing for every image")
    else:
        sex, age, unmatched = _demographics(Path(patients_csv), subjects, study_year)
        issues["images whose subject is not in patients_csv (sex unknown, age missing)"] += unmatched
        notes.append("sex = MIMIC-IV gender; age = anchor_age + (study year - anchor_year)")
    age, implausible = clean_ages(age)
    issues["age outside [0, 120] set to missing"] += implausible

    records = make_records(
        image_id=dicom_ids,
        patient_id=subjects,
        labels={label: values[label_rows] for label, values in codes.items()},
        sex=sex,
        age=age,
        view=metadata["ViewPosition"].tolist(),
        site=NAME,
        source_path=[
            f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            for subject, study, dicom in zip(subjects, metadata["study_id"].str.strip(), dicom_ids, strict=True)
        ],
        official_split=splits,
    )
    return SourceTable(records=records, excluded=+excluded, notes=tuple(notes), issues=+issues)


def _demographics(path: Path, subjects: np.ndarray, study_year: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sex and age per image from MIMIC-IV ``patients.csv``; also the count of images without a match."""
    patients = read_table(path, ("subject_id", "gender", "anchor_age", "anchor_year"))
    patients = patients.assign(subject_id=patients["subject_id"].str.strip())
    check_unique(patients["subject_id"], path, "subject_id")
    gender = pd.Series(map_values(patients, "gender", GENDER_CODES, path, "gender"), index=patients["subject_id"])
    anchor_age = pd.Series(parse_numbers(patients, "anchor_age", path, "anchor_age"), index=patients["subject_id"])
    anchor_year = pd.Series(parse_numbers(patients, "anchor_year", path, "anchor_year"), index=patients["subject_id"])
    matched = np.isin(subjects, gender.index)
    sex = np.full(len(subjects), "unknown", dtype=object)
    age = np.full(len(subjects), np.nan)
    sex[matched] = gender.loc[subjects[matched]].to_numpy()
    age[matched] = anchor_age.loc[subjects[matched]].to_numpy() + (
        study_year[matched] - anchor_year.loc[subjects[matched]].to_numpy()
    )
    return sex, age, int((~matched).sum())


ADAPTER = Adapter(
    name=NAME,
    title="MIMIC-CXR-JPG 2.0.0",
    load=load,
    options={
        "patients_csv": "MIMIC-IV hosp/patients.csv(.gz) with subject_id, gender, anchor_age, anchor_year; "
        "without it sex is unknown and age missing",
    },
)
