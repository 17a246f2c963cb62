"""PadChest (BIMCV): the 160K labels CSV and 16-bit PNGs in numbered folders; PA / AP / AP_horizontal.

Root: the folder holding ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or ``.csv.gz``) and
the image folders ``0/`` ... ``54/`` named by the ``ImageDir`` column.

- Labels: ``Labels`` is a stringified Python list of report terms (e.g. ``"['pleural effusion',
  'cardiomegaly']"``); terms are stripped and lower-cased. A harmonized label is positive iff the list
  contains one of its terms (`LABEL_TERMS`): the PadChest term and every term below it in PadChest's
  hierarchy of radiographic findings (e.g. ``lobar atelectasis``, ``atelectasis basal``,
  ``hydropneumothorax``). Terms outside those subtrees stay negative even when their name is close
  (`NOT_LABEL_TERMS`: ``pericardial effusion`` is not a pleural effusion, ``consolidation`` is not
  pneumonia). no_finding = ``normal`` listed *and* none of the four findings positive: PadChest lists
  ``normal`` next to a finding on a few images (one sentence of the report each), and in every other
  dataset of the study no_finding excludes the four findings; such images keep the finding, get
  no_finding = 0 and are counted in the card. There is no uncertain code. A row whose ``Labels`` is
  blank or an empty list is skipped and listed in the card; a value that is not a list literal is an error.
- Demographics: ``PatientSex_DICOM`` M/F (blank or O = unknown; the literal ``nan`` that the released
  file carries on 4 rows is read as unknown and counted); age = year of ``StudyDate_DICOM`` minus
  ``PatientBirth`` (a year), in whole years. ``PatientBirth`` is checked for patients whose images
  disagree (the card lists them); each image keeps its own value.
- Views: ``Projection`` PA, AP, AP_horizontal kept (the group's choice); others excluded and counted.
- Split: none official; the study used a custom 20 % test split, so ``prepare`` draws a keyed
  patient-disjoint split (`trainables.data.splits`).
- Ids: patient ``PatientID``; image ``ImageID``; file ``<ImageDir>/<ImageID>``.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.data.adapters.base import (
    Adapter,
    DatasetError,
    SourceTable,
    check_unique,
    clean_ages,
    line,
    make_records,
    map_values,
    parse_numbers,
    read_table,
)

NAME = "padchest"
CSV_STEM = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19"
LABEL_TERMS: dict[str, frozenset[str]] = {
    "atelectasis": frozenset(
        {
            "atelectasis",
            "total atelectasis",
            "lobar atelectasis",
            "segmental atelectasis",
            "laminar atelectasis",
            "round atelectasis",
            "atelectasis basal",
        }
    ),
    "cardiomegaly": frozenset({"cardiomegaly"}),
    "pleural_effusion": frozenset(
        {
            "pleural effusion",
            "loculated pleural effusion",
            "loculated fissural effusion",  # fluid in a fissure: pleural space (also under fissure thickening)
            "hydropneumothorax",  # fluid and air in the pleural space (also under pneumothorax)
            "empyema",  # an infected pleural effusion
            "hemothorax",  # blood in the pleural space; in the hierarchy, not in the 160K labels
        }
    ),
    "pneumonia": frozenset({"pneumonia", "atypical pneumonia"}),
    "no_finding": frozenset({"normal"}),
}
"""Harmonized label -> PadChest terms that make it positive: the term and its subtree in PadChest's hierarchy
(Bustos et al., "PadChest", Medical Image Analysis 2020, hierarchical taxonomy of radiographic findings)."""

NOT_LABEL_TERMS: dict[str, frozenset[str]] = {
    "atelectasis": frozenset({"volume loss", "hypoexpansion", "hypoexpansion basal"}),
    "cardiomegaly": frozenset({"heart insufficiency", "pericardial effusion"}),
    "pleural_effusion": frozenset(
        {"pericardial effusion", "costophrenic angle blunting", "pleural thickening", "pleural plaques"}
    ),
    "pneumonia": frozenset(
        {"consolidation", "infiltrates", "alveolar pattern", "air bronchogram", "abscess", "tuberculosis"}
    ),
}
"""Terms near a label that are deliberately *not* positive for it: separate nodes of the hierarchy (a sign or a
pattern, not the diagnosis; another serous cavity). Kept here so the choice is explicit and tested."""

REQUIRED = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Labels",
)
PROJECTIONS_KEPT = ("PA", "AP", "AP_horizontal")
SEX_CODES = {"M": "M", "F": "F", "O": "unknown", "": "unknown"}
RELEASED_SEX_QUIRKS = ("nan",)
"""Values that are not DICOM sex codes but occur in the released file (4 rows): read as unknown, counted."""


def load(root: Path) -> SourceTable:
    """Read the PadChest labels CSV under ``root``."""
    candidates = [root / f"{CSV_STEM}.csv", root / f"{CSV_STEM}.csv.gz"]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise DatasetError(f"{NAME}: neither {candidates[0].name} nor {candidates[1].name} found under {root}")
    table = read_table(path, REQUIRED)
    image_ids = table["ImageID"].str.strip()
    check_unique(image_ids, path, "ImageID")
    source_paths = (table["ImageDir"].str.strip() + "/" + image_ids).to_numpy(dtype=object)

    projection = table["Projection"].astype(str).str.strip()
    kept = projection.isin(PROJECTIONS_KEPT).to_numpy()
    excluded: Counter[str] = Counter(f"projection {value or '(blank)'}" for value in projection[~kept])
    table, image_ids, source_paths = table[kept], image_ids[kept], source_paths[kept]

    terms = _parse_terms(table, path)
    has_labels = np.array([len(row) > 0 for row in terms])
    skipped = [{"source_path": str(p), "reason": "no labels in the CSV"} for p in source_paths[~has_labels]]
    table, image_ids, source_paths = table[has_labels], image_ids[has_labels], source_paths[has_labels]
    terms = [row for row, keep in zip(terms, has_labels, strict=True) if keep]

    study_date = parse_numbers(table, "StudyDate_DICOM", path, "study date")
    bad_date = ~np.isnan(study_date) & ((study_date < 1e7) | (study_date >= 1e8))
    if bad_date.any():
        i = int(np.flatnonzero(bad_date)[0])
        raise DatasetError(
            f"{path}: line {line(path, table.index[i])}, column 'StudyDate_DICOM': "
            f"{table['StudyDate_DICOM'].iloc[i]!r} is not a YYYYMMDD date"
        )
    birth_year = parse_numbers(table, "PatientBirth", path, "birth year")
    age, implausible = clean_ages(np.floor(study_date / 10000) - birth_year)
    labels = {
        label: np.array([not row.isdisjoint(wanted) for row in terms], dtype=np.int8)
        for label, wanted in LABEL_TERMS.items()
    }
    finding = np.any([labels[label] == 1 for label in LABEL_TERMS if label != "no_finding"], axis=0)
    normal_with_finding = (labels["no_finding"] == 1) & finding
    labels["no_finding"][normal_with_finding] = 0
    raw_sex = table["PatientSex_DICOM"].astype(str).str.strip()
    quirks = raw_sex.isin(RELEASED_SEX_QUIRKS).to_numpy()
    table = table.assign(PatientSex_DICOM=raw_sex.where(~quirks, ""))
    records = make_records(
        image_id=image_ids,
        patient_id=table["PatientID"].str.strip(),
        labels=labels,
        sex=map_values(table, "PatientSex_DICOM", SEX_CODES, path, "sex"),
        age=age,
        view=table["Projection"].str.strip().tolist(),
        site=NAME,
        source_path=source_paths,
    )
    notes = (
        "labels from the 'Labels' term list (each term and its subtree in PadChest's hierarchy): "
        + "; ".join(f"{k} <- {sorted(v)}" for k, v in LABEL_TERMS.items()),
        "deliberately not positive: " + "; ".join(f"{k}: {sorted(v)}" for k, v in NOT_LABEL_TERMS.items()),
        "a term not listed is negative (no uncertain code); no_finding = 'normal' listed and none of the four "
        "findings ('normal' next to a finding: the finding is kept, no_finding = 0, counted)",
        "sex from 'PatientSex_DICOM' (O, blank and the released 'nan' = unknown); age = study year - 'PatientBirth'",
        "projections PA, AP, AP_horizontal; no official split (keyed patient-wise split)",
    )
    issues = Counter(
        {
            "age outside [0, 120] set to missing": implausible,
            "'normal' listed with a finding (no_finding set to 0)": int(normal_with_finding.sum()),
            "PatientSex_DICOM 'nan' in the released file (sex unknown)": int(quirks.sum()),
        }
    )
    birth = np.array(["" if np.isnan(year) else f"{year:g}" for year in birth_year], dtype=str)
    return SourceTable(
        records=records,
        excluded=+excluded,
        skipped=skipped,
        notes=notes,
        issues=+issues,
        patient_attributes={"birth year (PatientBirth)": birth},
    )


def _parse_terms(table: pd.DataFrame, path: Path) -> list[frozenset[str]]:
    """The set of stripped, lower-cased terms of each row's ``Labels`` list (empty set: no labels)."""
    out: list[frozenset[str]] = []
    for index, value in zip(table.index, table["Labels"].astype(str), strict=True):
        text = value.strip()
        if text in ("", "nan", "None"):
            out.append(frozenset())
            continue
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if not isinstance(parsed, list | tuple) or not all(isinstance(term, str) for term in parsed):
            raise DatasetError(
                f"{path}: line {line(path, index)}, column 'Labels': {value!r} is outside the coding; expected "
                "a list of terms like \"['pleural effusion', 'cardiomegaly']\""
            )
        out.append(frozenset(term.strip().lower() for term in parsed if term.strip()))
    return out


ADAPTER = Adapter(name=NAME, title="PadChest (160K, 01.02.19)", load=load, options={})
