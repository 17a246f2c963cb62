"""CheXpert v1.0 (Stanford): ``train.csv`` + ``valid.csv`` and JPEGs, frontal views only.

Root: the ``CheXpert-v1.0`` folder (or ``CheXpert-v1.0-small``) holding ``train.csv``, ``valid.csv``,
``train/`` and ``valid/``. The ``Path`` column starts with that folder's name
(``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg``); it is resolved relative to the root.

- Labels: ``Atelectasis``, ``Cardiomegaly``, ``Pleural Effusion``, ``Pneumonia``, ``No Finding``, each
  1.0 / 0.0 / -1.0 (uncertain) / blank (not mentioned = negative). no_finding is the ``No Finding`` column.
- Demographics: ``Sex`` Female/Male/Unknown; ``Age`` in years, 0 = missing.
- Views: ``Frontal/Lateral`` = Frontal kept; ``view`` is the ``AP/PA`` value (AP or PA). 17 rows of the
  released train.csv are marked Frontal but have ``AP/PA`` LL or RL (left/right lateral: a lateral
  decubitus film or a mislabelled lateral; the file names say ``frontal``). The study uses standard frontal
  films, so these are excluded and counted in the card.
- Split: none official (the small official validation set is pooled with train); the study used a
  custom 20 % patient-wise test split, so ``prepare`` draws a keyed patient-disjoint split
  (`trainables.data.splits`).
- Ids: patient ``patient00001`` from the path; image id ``patient00001/study1/view1_frontal``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

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
    parse_findings,
    parse_numbers,
    read_table,
)

NAME = "chexpert"
LABEL_COLUMNS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "no_finding": "No Finding",
}
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS.values())
SEX_CODES = {"Female": "F", "Male": "M", "Unknown": "unknown", "": "unknown"}
VIEW_CODES = {"Frontal": "Frontal", "Lateral": "Lateral"}
LATERAL_AP_PA = ("LL", "RL")
"""``AP/PA`` values of a lateral direction; on a row marked Frontal they contradict it (excluded)."""
EXCLUDED_FRONTAL_LATERAL = "frontal with AP/PA LL or RL (lateral decubitus or mislabelled lateral)"


def load(root: Path) -> SourceTable:
    """Read ``train.csv`` and ``valid.csv`` under ``root`` (the ``CheXpert-v1.0`` folder)."""
    if not (root / "train.csv").is_file():
        raise DatasetError(
            f"{NAME}: {root / 'train.csv'} not found; pass the CheXpert-v1.0 folder that holds train.csv, "
            "valid.csv, train/ and valid/"
        )
    frames: list[pd.DataFrame] = []
    excluded: Counter[str] = Counter()
    issues: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for file_name in ("train.csv", "valid.csv"):
        path = root / file_name
        if not path.is_file():
            raise DatasetError(f"{NAME}: {path} not found; CheXpert v1.0 ships train.csv and valid.csv")
        table = read_table(path, REQUIRED)
        check_unique(table["Path"], path, "Path")
        views = map_values(table, "Frontal/Lateral", VIEW_CODES, path, "view")
        lateral = views == "Lateral"
        contradictory = ~lateral & table["AP/PA"].astype(str).str.strip().isin(LATERAL_AP_PA).to_numpy()
        excluded["lateral view"] += int(lateral.sum())
        excluded[EXCLUDED_FRONTAL_LATERAL] += int(contradictory.sum())
        table = table[~lateral & ~contradictory]
        source_paths, patients, image_ids = _parse_paths(table, path)
        for image_id in image_ids:
            if image_id in seen:
                raise DatasetError(f"{path}: duplicate image id {image_id!r}, already listed in {seen[image_id]}")
            seen[image_id] = file_name
        ages, implausible = clean_ages(parse_numbers(table, "Age", path, "age"), zero_is_missing=True)
        issues["age outside [0, 120] set to missing"] += implausible
        ap_pa = table["AP/PA"].astype(str).str.strip()
        frames.append(
            make_records(
                image_id=image_ids,
                patient_id=patients,
                labels=parse_findings(table, LABEL_COLUMNS, path, uncertain=True),
                sex=map_values(table, "Sex", SEX_CODES, path, "sex"),
                age=ages,
                view=ap_pa.where(ap_pa != "", "frontal").tolist(),
                site=NAME,
                source_path=source_paths,
            )
        )
    records = pd.concat(frames, ignore_index=True)
    notes = (
        "labels: Atelectasis, Cardiomegaly, Pleural Effusion, Pneumonia, No Finding; 1.0 positive, "
        "0.0 negative, -1.0 uncertain (uncertain policy), blank = not mentioned = negative",
        "no_finding = the 'No Finding' column",
        "sex from 'Sex' (Female/Male/Unknown); age from 'Age' in years, 0 = missing",
        "frontal images only (rows marked Frontal with AP/PA LL or RL excluded); valid.csv pooled with "
        "train.csv; no official test split "
        "(keyed patient-wise split)",
    )
    return SourceTable(records=records, excluded=+excluded, notes=notes, issues=+issues)


def _parse_paths(table: pd.DataFrame, path: Path) -> tuple[list[str], list[str], list[str]]:
    """Source path relative to the root, patient id and image id from each ``Path`` value."""
    source_paths, patients, image_ids = [], [], []
    for index, value in zip(table.index, table["Path"].astype(str), strict=True):
        parts = PurePosixPath(value.strip()).parts
        patient = next((p for p in parts if p.startswith("patient")), None)
        if len(parts) < 4 or patient is None or not parts[0].startswith("CheXpert"):
            raise DatasetError(
                f"{path}: line {line(path, index)}, column 'Path': {value!r} is not a CheXpert image path like "
                "'CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg'"
            )
        relative = PurePosixPath(*parts[1:])
        source_paths.append(str(relative))
        patients.append(patient)
        image_ids.append(str(PurePosixPath(*parts[parts.index(patient) :]).with_suffix("")))
    return source_paths, patients, image_ids


ADAPTER = Adapter(name=NAME, title="CheXpert v1.0", load=load, options={})
