"""UKA-CXR (University Hospital Aachen, private): the institution's master list of graded bedside films.

Root: the folder holding the master list (option ``master_list``, default ``master_list.csv``) and the
images, located by the option ``image_pattern`` (default ``images/{image_id}.jpg``): a Python format
string over the master list's columns, e.g. ``UKA_preprocessed/{subset}/{image_id}.jpg`` for the
group's layout. PNG, JPEG and DICOM files are all accepted.

- Labels: findings are graded per side on a five-step scale coded 0-4 (cardiomegaly once); grade 3 or 4
  is positive, 0-2 negative. Grade 5 (seen only as "greater than 4" in the group's code) is read as
  negative, as there; anything else is an error. atelectasis = ``atelectasis_right``/``_left``,
  pleural_effusion = ``pleural_effusion_right``/``_left``, pneumonia = ``pneumonic_infiltrates_right``/
  ``_left``, each positive if either side is; cardiomegaly = ``cardiomegaly``; no_finding = ``healthy``
  (0/1). No uncertain code.
- Demographics: ``patient_sex`` F/M (also female/male, any case; blank = unknown); ``age`` in years.
- Views: all bedside AP (``view`` = ``AP (bedside)``).
- Split: the fixed ``split`` column (train / val|valid|validation / test); without an official
  validation split it is carved from train.
- Ids: patient ``subject_id``; image ``image_id``.
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
    make_records,
    map_values,
    parse_findings,
    parse_numbers,
    read_table,
)

NAME = "uka-cxr"
SIDED = {
    "atelectasis": ("atelectasis_right", "atelectasis_left"),
    "pleural_effusion": ("pleural_effusion_right", "pleural_effusion_left"),
    "pneumonia": ("pneumonic_infiltrates_right", "pneumonic_infiltrates_left"),
}
GRADED = ("cardiomegaly", *(column for pair in SIDED.values() for column in pair))
POSITIVE_GRADES = (3.0, 4.0)
NEGATIVE_GRADES = (0.0, 1.0, 2.0, 5.0)
REQUIRED = ("image_id", "split", "age", "patient_sex", "subject_id", *GRADED, "healthy")
SPLIT_CODES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SEX_CODES = {"f": "F", "female": "F", "m": "M", "male": "M", "": "unknown"}


def load(
    root: Path, master_list: Path | str = "master_list.csv", image_pattern: str = "images/{image_id}.jpg"
) -> SourceTable:
    """Read the master list (relative to ``root`` unless absolute) and locate images by ``image_pattern``."""
    path = root / master_list
    table = read_table(path, REQUIRED)
    image_ids = table["image_id"].str.strip()
    check_unique(image_ids, path, "image_id")
    splits = map_values(table, "split", SPLIT_CODES, path, "split")
    patients = table["subject_id"].str.strip()
    check_patient_splits(patients, pd.Series(splits), str(path))

    grades = parse_findings(
        table,
        {c: c for c in GRADED},
        path,
        uncertain=False,
        positive=POSITIVE_GRADES,
        negative=NEGATIVE_GRADES,
        blank=False,
    )
    healthy = parse_findings(table, {"no_finding": "healthy"}, path, uncertain=False, blank=False)
    labels = {label: np.maximum(grades[right], grades[left]) for label, (right, left) in SIDED.items()}
    labels["cardiomegaly"] = grades["cardiomegaly"]
    labels["no_finding"] = healthy["no_finding"]

    lowered = table.assign(patient_sex=table["patient_sex"].str.strip().str.lower())
    age, implausible = clean_ages(parse_numbers(table, "age", path, "age"))
    records = make_records(
        image_id=image_ids,
        patient_id=patients,
        labels=labels,
        sex=map_values(lowered, "patient_sex", SEX_CODES, path, "sex"),
        age=age,
        view="AP (bedside)",
        site=NAME,
        source_path=_image_paths(table, image_pattern, path),
        official_split=splits,
    )
    notes = (
        "labels: grade 3-4 positive, 0-2 and 5 negative; right/left merged (either side positive); "
        "pneumonia <- pneumonic_infiltrates; no_finding = 'healthy'",
        "sex from 'patient_sex'; age from 'age' in years",
        "bedside AP films; fixed split from the 'split' column",
    )
    issues = Counter({"age outside [0, 120] set to missing": implausible})
    return SourceTable(records=records, notes=notes, issues=+issues)


def _image_paths(table: pd.DataFrame, pattern: str, path: Path) -> list[str]:
    columns = {column: table[column].astype(str).str.strip().tolist() for column in table.columns}
    out = []
    for i in range(len(table)):
        try:
            out.append(pattern.format_map({column: values[i] for column, values in columns.items()}))
        except KeyError as error:
            raise DatasetError(
                f"{NAME}: image_pattern {pattern!r} names column {error.args[0]!r}, which {path} does not "
                f"have; columns: {list(table.columns)}"
            ) from error
        except (ValueError, IndexError) as error:
            raise DatasetError(f"{NAME}: image_pattern {pattern!r} is not a valid format string ({error})") from error
    return out


ADAPTER = Adapter(
    name=NAME,
    title="UKA-CXR (private)",
    load=load,
    options={
        "master_list": "master list CSV, relative to the root unless absolute (default master_list.csv)",
        "image_pattern": "image path relative to the root as a format string over master-list columns "
        "(default images/{image_id}.jpg)",
    },
)
