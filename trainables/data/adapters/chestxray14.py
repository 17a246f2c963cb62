"""NIH ChestX-ray14: ``Data_Entry_2017(_v2020).csv``, the official train/test lists and PNGs.

Root: the folder holding ``Data_Entry_2017_v2020.csv`` (preferred) or ``Data_Entry_2017.csv``,
``train_val_list.txt``, ``test_list.txt`` and the images, either in ``images/`` (NIH box archives) or in
``images_001/images/`` ... ``images_012/images/`` (Kaggle layout).

- Labels: ``Finding Labels`` is a ``|``-separated list of the 14 findings or ``No Finding``. atelectasis
  = ``Atelectasis``, cardiomegaly = ``Cardiomegaly``, pleural_effusion = ``Effusion``, pneumonia =
  ``Pneumonia``; no_finding = ``No Finding`` listed. A finding not listed is negative; there is no
  uncertain code. Unknown finding names are an error.
- Demographics: ``Patient Gender`` M/F; ``Patient Age`` in years (``058Y`` also accepted); ages outside
  [0, 120] (known typos in the 2017 file) are set to missing and counted.
- Views: all (``View Position`` PA or AP).
- Split: official, ``test_list.txt`` -> test, ``train_val_list.txt`` -> train (validation carved from it).
- Ids: patient ``Patient ID``; image ``Image Index`` (e.g. ``00000001_000.png``).
"""

from __future__ import annotations

import os
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
    read_table,
)

NAME = "chestxray14"
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
LABEL_SOURCES = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Effusion",
    "pneumonia": "Pneumonia",
    "no_finding": NO_FINDING,
}
REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
GENDER_CODES = {"M": "M", "F": "F"}
LISTS = {"train_val_list.txt": "train", "test_list.txt": "test"}


def load(root: Path) -> SourceTable:
    """Read the data-entry table and the two official split lists under ``root``."""
    entry_path = find_file(root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], NAME)
    table = read_table(entry_path, REQUIRED)
    image_ids = table["Image Index"].str.strip()
    check_unique(image_ids, entry_path, "Image Index")
    labels = _parse_findings(table, entry_path)

    split_of: dict[str, str] = {}
    list_of: dict[str, str] = {}
    for list_name, split in LISTS.items():
        list_path = find_file(root, [list_name], NAME)
        for name in list_path.read_text().split():
            if name in split_of:
                raise DatasetError(
                    f"{list_path}: duplicate image id {name!r}, already listed in {list_of[name]}; an image "
                    "belongs to one official split"
                )
            split_of[name], list_of[name] = split, list_name
    unlisted = ~image_ids.isin(split_of.keys()).to_numpy()
    if unlisted.any():
        i = int(np.flatnonzero(unlisted)[0])
        raise DatasetError(
            f"{entry_path}: line {line(entry_path, table.index[i])}: image {image_ids.iloc[i]!r} is in neither "
            f"train_val_list.txt nor test_list.txt ({int(unlisted.sum())} such images); use the lists of "
            "the same release"
        )
    splits = image_ids.map(split_of)
    patients = table["Patient ID"].str.strip()
    check_patient_splits(patients, splits, f"{root / 'train_val_list.txt'} and {root / 'test_list.txt'}")

    raw_age = table["Patient Age"].astype(str).str.strip().str.removesuffix("Y")
    age = pd.to_numeric(raw_age.where(raw_age != ""), errors="coerce").to_numpy(dtype=np.float64)
    bad_age = np.isnan(age) & (raw_age != "").to_numpy()
    if bad_age.any():
        i = int(np.flatnonzero(bad_age)[0])
        raise DatasetError(
            f"{entry_path}: line {line(entry_path, table.index[i])}, column 'Patient Age': "
            f"{table['Patient Age'].iloc[i]!r} is not an age in years"
        )
    age, implausible = clean_ages(age)
    records = make_records(
        image_id=image_ids,
        patient_id=patients,
        labels=labels,
        sex=map_values(table, "Patient Gender", GENDER_CODES, entry_path, "sex"),
        age=age,
        view=table["View Position"].str.strip().tolist(),
        site=NAME,
        source_path=_locate_images(root, image_ids.tolist()),
        official_split=splits.tolist(),
    )
    notes = (
        f"labels from {entry_path.name} 'Finding Labels': Atelectasis, Cardiomegaly, "
        "Effusion -> pleural_effusion, Pneumonia; a finding not listed is negative (no uncertain code)",
        "no_finding = 'No Finding' listed",
        "sex from 'Patient Gender'; age from 'Patient Age' in years",
        "all views; official split: test_list.txt -> test, train_val_list.txt -> train (+ carved validation)",
    )
    issues = Counter({"age outside [0, 120] set to missing": implausible})
    return SourceTable(records=records, notes=notes, issues=+issues)


def _parse_findings(table: pd.DataFrame, path: Path) -> dict[str, np.ndarray]:
    known = set(FINDINGS) | {NO_FINDING}
    lists = table["Finding Labels"].astype(str).str.strip().str.split("|")
    for index, findings in zip(table.index, lists, strict=True):
        names = [name.strip() for name in findings]
        unknown = [name for name in names if name not in known]
        if unknown or (NO_FINDING in names and len(names) > 1):
            raise DatasetError(
                f"{path}: line {line(path, index)}, column 'Finding Labels': {'|'.join(findings)!r} is outside the "
                f"coding; expected '|'-separated names from {sorted(FINDINGS)} or 'No Finding' alone"
            )
    sets = [{name.strip() for name in findings} for findings in lists]
    return {
        label: np.array([source in names for names in sets], dtype=np.int8) for label, source in LABEL_SOURCES.items()
    }


def _locate_images(root: Path, names: list[str]) -> list[str]:
    """Paths relative to ``root``: ``images/<name>`` or ``images_NNN/images/<name>`` where the file is.

    Images found in neither place keep ``images/<name>``; ``prepare`` then skips them as "file not found".
    """
    where: dict[str, str] = {}
    folders = [root / "images", *sorted(root.glob("images_*/images"))]
    for folder in folders:
        if folder.is_dir():
            relative = folder.relative_to(root).as_posix()
            with os.scandir(folder) as entries:
                for entry in entries:
                    where.setdefault(entry.name, f"{relative}/{entry.name}")
    return [where.get(name, f"images/{name}") for name in names]


ADAPTER = Adapter(name=NAME, title="NIH ChestX-ray14", load=load, options={})
