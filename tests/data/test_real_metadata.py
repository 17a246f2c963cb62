"""`prepare` on the real released metadata files, full size, with tiny placeholder images.

The torchxrayvision wheel (a dev dependency; nothing is downloaded here) ships four datasets' released
metadata in its package data folder: ChestX-ray14's ``Data_Entry_2017_v2020.csv``, CheXpert-v1.0-small's
``train.csv``, PadChest's labels CSV and the Kaggle VinBigData ``train.csv``. Each test lays one file out in
its dataset's official folder layout, with every image a symlink to one tiny placeholder made here, runs
the real `prepare_dataset`, and checks:

- it succeeds, and rows in = manifest + excluded + skipped (with reasons), exactly;
- splits are patient-disjoint, with a validation split;
- every image's labels, sex and age equal what this file derives from the CSV on its own (plain ``csv``
  parsing and the protocol's rules written out again here, not the adapters' code), and label counts,
  sex/age coverage and images per patient equal both that derivation and golden numbers pinned below;
- on CheXpert's first 3,000 patients: adding one patient and preparing again with ``--split-key`` moves nobody.

The preparations use the tests' fixed split key (``fixtures.SPLIT_KEY``), except the last, which draws one.

What the wheel does not ship is made here and said so: ChestX-ray14's official ``train_val_list.txt`` /
``test_list.txt`` (a patient rule stands in for them) and CheXpert's ``valid.csv`` (header only).
"""

from __future__ import annotations

import ast
import csv
import gzip
import importlib.util
import json
import math
import os
import shutil
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.data import fixtures
from trainables.data.cache import CARD_FILE, open_cache
from trainables.data.labels import LABELS
from trainables.data.prepare import prepare_dataset

pytestmark = pytest.mark.slow

SIZE = 8


def released_file(name: str) -> Path:
    """A file of torchxrayvision's package data folder, found without importing torchxrayvision."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("torchxrayvision is not installed: it is a dev dependency (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    assert path.is_file(), f"{path} missing from the installed torchxrayvision wheel"
    return path


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [row for row in rows[1:] if row]


def placeholder_png(path: Path) -> Path:
    """A tiny non-constant 8-bit image (a constant one would be rejected as blank)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(path)
    return path


def link_all(target: Path, root: Path, relative_paths) -> None:
    made: set[Path] = set()
    for relative in relative_paths:
        link = root / relative
        if link.parent not in made:
            link.parent.mkdir(parents=True, exist_ok=True)
            made.add(link.parent)
        os.symlink(target, link)


@pytest.fixture
def workdir(tmp_path):
    """Where the layouts go: a fresh folder in /dev/shm (tmpfs) when there is one, removed afterwards.

    Only a speed knob: making and removing ~200,000 links and folders on a disk filesystem took minutes here
    (rmtree of CheXpert's tree: 450 s on a busy machine), on tmpfs seconds. Without /dev/shm, ``tmp_path``.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="dpsweep-real-metadata-", dir=shm))
    else:
        folder = tmp_path / "layout"
        folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(name: str, root: Path, out: Path, **kwargs):
    fixtures.place_split_key(out, name)
    folder = prepare_dataset(name, root, size=SIZE, out=out, workers=1, **kwargs)
    return open_cache(folder), json.loads((folder / CARD_FILE).read_text())


def summary(expected: pd.DataFrame) -> dict:
    """Label counts, sex counts, age coverage and images per patient of a derived image table."""
    per_patient = sorted(Counter(expected["patient_id"]).values())
    ages = [age for age in expected["age"] if not math.isnan(age)]
    return {
        "images": len(expected),
        "patients": len(per_patient),
        **{label: int(expected[label].sum()) for label in LABELS},
        "sex": dict(sorted(Counter(expected["sex"]).items())),
        "age_known": len(ages),
        "age_median": statistics.median(ages) if ages else None,
        "images_per_patient": {
            "min": per_patient[0],
            "median": float(statistics.median(per_patient)),
            "p99": per_patient[math.ceil(0.99 * len(per_patient)) - 1],  # nearest rank
            "max": per_patient[-1],
        },
    }


def check_against_derivation(cache, card: dict, expected: pd.DataFrame, golden: dict) -> None:
    """The manifest equals the derived table image by image; the card's figures equal its summary."""
    derived = summary(expected)
    assert derived == golden  # the derivation itself still gives the pinned numbers
    manifest = cache.manifest.set_index("image_id").sort_index()
    expected = expected.set_index("image_id").sort_index()
    assert list(manifest.index) == list(expected.index)
    for column in (*LABELS, "patient_id", "sex"):
        mismatch = manifest[column].astype(str).to_numpy() != expected[column].astype(str).to_numpy()
        assert not mismatch.any(), (column, manifest.index[mismatch][:5].tolist())
    np.testing.assert_array_equal(manifest["age"].to_numpy(dtype=float), expected["age"].to_numpy(dtype=float))

    assert card["n_images"] == derived["images"] and card["n_patients"] == derived["patients"]
    assert card["sex"] == {k: v for k, v in derived["sex"].items() if v}
    assert card["age_missing"] == derived["images"] - derived["age_known"]
    assert sum(entry["age_known"] for entry in card["demographics"].values()) == derived["age_known"]
    per_patient = {k: card["images_per_patient"][k] for k in ("min", "median", "p99", "max")}
    assert per_patient == derived["images_per_patient"]
    for label in LABELS:  # prevalence per split, weighted back to counts
        if card["splits"]["train"]["prevalence"][label] is None:
            continue
        positives = sum(entry["prevalence"][label] * entry["images"] for entry in card["splits"].values())
        assert positives == pytest.approx(derived[label], abs=0.0001 * derived["images"] + 0.5)
    check_splits(cache)


def check_splits(cache) -> None:
    manifest = cache.manifest
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()  # patient-disjoint
    patients = manifest.drop_duplicates("patient_id")["split"].value_counts()
    assert set(patients.index) == {"train", "val", "test"}
    train_side = patients["train"] + patients["val"]
    assert abs(patients["val"] / train_side - 0.1) < 0.01  # validation: 10 % of training patients


def age_or_nan(years: float) -> float:
    return years if 0 <= years <= 120 else math.nan


# --- NIH ChestX-ray14 ----------------------------------------------------------------------------------

CXR14_GOLDEN = {
    "images": 112120, "patients": 30805,
    "atelectasis": 11559, "cardiomegaly": 2776, "pleural_effusion": 13317, "pneumonia": 1431,
    "no_finding": 60361,
    "sex": {"F": 48780, "M": 63340}, "age_known": 112120, "age_median": 49.0,
    "images_per_patient": {"min": 1, "median": 1.0, "p99": 35, "max": 184},
}  # fmt: skip


def test_chestxray14_released_metadata(workdir):
    header, rows = read_rows(released_file("Data_Entry_2017_v2020.csv.gz"))
    assert header[:7] == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                          "Patient Gender", "View Position"]  # fmt: skip
    root = workdir / "chestxray14"
    root.mkdir()
    with gzip.open(released_file("Data_Entry_2017_v2020.csv.gz"), "rb") as source:
        (root / "Data_Entry_2017_v2020.csv").write_bytes(source.read())
    # The official split lists are not in the wheel: patients with id divisible by 5 stand in for test.
    in_test = [int(row[3]) % 5 == 0 for row in rows]
    (root / "train_val_list.txt").write_text("".join(f"{r[0]}\n" for r, t in zip(rows, in_test, strict=True) if not t))
    (root / "test_list.txt").write_text("".join(f"{r[0]}\n" for r, t in zip(rows, in_test, strict=True) if t))
    link_all(placeholder_png(workdir / "placeholder.png"), root, (f"images/{row[0]}" for row in rows))

    cache, card = prepare("chestxray14", root, workdir / "data")

    sources = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion",
               "pneumonia": "Pneumonia", "no_finding": "No Finding"}  # fmt: skip
    findings = [set(row[1].split("|")) for row in rows]
    expected = pd.DataFrame(
        {
            "image_id": [row[0] for row in rows],
            "patient_id": [row[3] for row in rows],
            **{label: [int(name in f) for f in findings] for label, name in sources.items()},
            "sex": [row[5] for row in rows],
            "age": [age_or_nan(float(row[4])) for row in rows],
        }
    )
    assert len(rows) == len(cache.manifest) and card["excluded"] == {"uncertain label (policy drop)": 0}
    assert card["skipped"] == []
    check_against_derivation(cache, card, expected, CXR14_GOLDEN)
    test_images = set(cache.manifest.loc[cache.manifest["split"] == "test", "image_id"])
    assert test_images == {
        row[0] for row, t in zip(rows, in_test, strict=True) if t
    }  # the official test list, as given


# --- CheXpert-v1.0-small -------------------------------------------------------------------------------

CHEXPERT_GOLDEN = {
    "images": 138867, "patients": 54019,
    "atelectasis": 26033, "cardiomegaly": 17515, "pleural_effusion": 57936, "pneumonia": 3775,
    "no_finding": 16970,
    "sex": {"F": 56936, "M": 81930, "unknown": 1}, "age_known": 138865, "age_median": 61.0,
    "images_per_patient": {"min": 1, "median": 1.0, "p99": 17, "max": 80},
}  # fmt: skip
CHEXPERT_FIVE = ("Atelectasis", "Cardiomegaly", "Pleural Effusion", "Pneumonia", "No Finding")


def test_chexpert_released_metadata(workdir):
    header, rows = read_rows(released_file("chexpert_train.csv.gz"))
    column = {name: header.index(name) for name in ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FIVE)}
    root = workdir / "CheXpert-v1.0-small"
    root.mkdir()
    with gzip.open(released_file("chexpert_train.csv.gz"), "rb") as source:
        (root / "train.csv").write_bytes(source.read())
    (root / "valid.csv").write_text(",".join(header) + "\n")  # not in the wheel: the header only
    jpeg = workdir / "placeholder.jpg"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(jpeg, quality=95)
    link_all(jpeg, root, (row[column["Path"]].split("/", 1)[1] for row in rows))

    cache, card = prepare("chexpert", root, workdir / "data")

    counts, kept = Counter(), []
    for row in rows:
        if row[column["Frontal/Lateral"]] == "Lateral":
            counts["lateral"] += 1
        elif row[column["AP/PA"]] in ("LL", "RL"):
            counts["frontal with LL/RL"] += 1
        elif any(row[column[name]] == "-1.0" for name in CHEXPERT_FIVE):
            counts["uncertain"] += 1
        else:
            kept.append(row)
    assert counts == {"lateral": 32387, "frontal with LL/RL": 17, "uncertain": 52143}
    sex = {"Female": "F", "Male": "M", "Unknown": "unknown", "": "unknown"}
    expected = pd.DataFrame(
        {
            "image_id": [row[0].split("/", 2)[2].removesuffix(".jpg") for row in kept],
            "patient_id": [row[0].split("/")[2] for row in kept],
            **{
                label: [int(row[column[name]] == "1.0") for row in kept]
                for label, name in zip(LABELS, CHEXPERT_FIVE, strict=True)
            },
            "sex": [sex[row[column["Sex"]]] for row in kept],
            "age": [
                math.nan if float(row[column["Age"]]) == 0 else age_or_nan(float(row[column["Age"]])) for row in kept
            ],
        }
    )
    assert card["excluded"] == {
        "lateral view": counts["lateral"],
        "frontal with AP/PA LL or RL (lateral decubitus or mislabelled lateral)": counts["frontal with LL/RL"],
        "uncertain label (policy drop)": counts["uncertain"],
    }
    assert card["skipped"] == []
    assert len(rows) == len(cache.manifest) + sum(card["excluded"].values()) + len(card["skipped"])
    check_against_derivation(cache, card, expected, CHEXPERT_GOLDEN)
    assert set(cache.manifest["view"]) == {"AP", "PA"}


# --- PadChest ------------------------------------------------------------------------------------------

PADCHEST_TERMS = {  # the label's PadChest term and its subtree in PadChest's hierarchy, written out again
    "atelectasis": {"atelectasis", "total atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "laminar atelectasis", "round atelectasis", "atelectasis basal"},
    "cardiomegaly": {"cardiomegaly"},
    "pleural_effusion": {"pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
                         "hydropneumothorax", "empyema", "hemothorax"},
    "pneumonia": {"pneumonia", "atypical pneumonia"},
}  # fmt: skip
PADCHEST_NOT = {"pericardial effusion", "hypoexpansion basal"}
"""Released terms whose names come close to a label's but that are outside its subtree."""
PADCHEST_GOLDEN = {
    "images": 110043, "patients": 67011,
    "atelectasis": 6168, "cardiomegaly": 9848, "pleural_effusion": 7042, "pneumonia": 5223,
    "no_finding": 36052,
    "sex": {"F": 54580, "M": 55445, "unknown": 18}, "age_known": 110040, "age_median": 63.0,
    "images_per_patient": {"min": 1, "median": 1.0, "p99": 8, "max": 116},
}  # fmt: skip


def test_padchest_released_metadata(workdir):
    path = released_file("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
    header, rows = read_rows(path)
    column = {name: header.index(name) for name in
              ("ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth", "PatientSex_DICOM",
               "Projection", "Labels")}  # fmt: skip
    root = workdir / "padchest"
    root.mkdir()
    shutil.copyfile(path, root / path.name)  # prepared from the .csv.gz as released
    link_all(placeholder_png(workdir / "placeholder.png"), root,
             (f"{row[column['ImageDir']]}/{row[column['ImageID']]}" for row in rows))  # fmt: skip

    cache, card = prepare("padchest", root, workdir / "data")

    projections, no_labels, kept, terms_seen = Counter(), [], [], set()
    for row in rows:
        if row[column["Projection"]] not in ("PA", "AP", "AP_horizontal"):
            projections[f"projection {row[column['Projection']]}"] += 1
            continue
        text = row[column["Labels"]].strip()
        terms = set() if text in ("", "nan", "None") else {t.strip().lower() for t in ast.literal_eval(text)} - {""}
        if not terms:
            no_labels.append(f"{row[column['ImageDir']]}/{row[column['ImageID']]}")
            continue
        terms_seen |= terms
        kept.append((row, terms))
    # every released term that names a label, or comes close, is classified one way or the other
    close = {t for t in terms_seen if any(w in t for w in ("atelecta", "effusion", "pneumon", "cardiomeg", "thorax"))}
    assert close - PADCHEST_NOT - set().union(*PADCHEST_TERMS.values()) == {"pneumothorax"}
    assert projections == {"projection L": 49579, "projection COSTAL": 630, "projection EXCLUDE": 11,
                           "projection UNK": 8}  # fmt: skip
    labels = {label: [int(bool(terms & wanted)) for _, terms in kept] for label, wanted in PADCHEST_TERMS.items()}
    finding = [any(values) for values in zip(*labels.values(), strict=True)]
    normal = [int("normal" in terms) for _, terms in kept]
    labels["no_finding"] = [int(n and not f) for n, f in zip(normal, finding, strict=True)]
    sex = {"M": "M", "F": "F", "O": "unknown", "": "unknown", "nan": "unknown"}

    def age(row) -> float:
        if not row[column["PatientBirth"]]:
            return math.nan
        return age_or_nan(int(row[column["StudyDate_DICOM"]][:4]) - float(row[column["PatientBirth"]]))

    expected = pd.DataFrame(
        {
            "image_id": [row[column["ImageID"]] for row, _ in kept],
            "patient_id": [row[column["PatientID"]] for row, _ in kept],
            **labels,
            "sex": [sex[row[column["PatientSex_DICOM"]]] for row, _ in kept],
            "age": [age(row) for row, _ in kept],
        }
    )
    assert card["excluded"] == {**projections, "uncertain label (policy drop)": 0}
    assert sorted(entry["source_path"] for entry in card["skipped"]) == sorted(no_labels)
    assert {entry["reason"] for entry in card["skipped"]} == {"no labels in the CSV"}
    assert len(rows) == len(cache.manifest) + sum(card["excluded"].values()) + len(card["skipped"])
    check_against_derivation(cache, card, expected, PADCHEST_GOLDEN)
    nan_sex = sum(row[column["PatientSex_DICOM"]] == "nan" for row, _ in kept)
    normal_with_finding = sum(n and f for n, f in zip(normal, finding, strict=True))
    assert sum(row[column["PatientSex_DICOM"]] == "nan" for row in rows) == 4  # one of them is a lateral view
    assert (nan_sex, normal_with_finding) == (3, 51)
    assert card["metadata_issues"] == {
        "'normal' listed with a finding (no_finding set to 0)": normal_with_finding,
        "PatientSex_DICOM 'nan' in the released file (sex unknown)": nan_sex,
    }
    conflicts = {}
    for name, index, unknown in (("sex", "PatientSex_DICOM", {"", "O", "nan"}),
                                 ("birth year (PatientBirth)", "PatientBirth", {""})):  # fmt: skip
        values: dict[str, set] = {}
        for row, _ in kept:
            if row[column[index]] not in unknown:
                values.setdefault(row[column["PatientID"]], set()).add(
                    float(row[column[index]]) if unknown == {""} else row[column[index]]
                )
        conflicts[name] = sum(len(v) > 1 for v in values.values())
    assert conflicts == {"sex": 11, "birth year (PatientBirth)": 351}
    assert {k: v["patients"] for k, v in card["inconsistent_patients"].items()} == conflicts


# --- VinDr-CXR, Kaggle VinBigData copy -----------------------------------------------------------------

VINDR_TEMPLATES = (("F", "045Y"), ("M", ""), ("", "061Y"))
"""DICOM tags (PatientSex, PatientAge) of the three placeholder DICOMs, given to images in turn."""
VINDR_GOLDEN = {
    "images": 15000, "patients": 15000,
    "atelectasis": 186, "cardiomegaly": 2300, "pleural_effusion": 1032, "pneumonia": 0, "no_finding": 10606,
    "sex": {"F": 5000, "M": 5000, "unknown": 5000}, "age_known": 10000, "age_median": 53.0,
    "images_per_patient": {"min": 1, "median": 1.0, "p99": 1, "max": 1},
}  # fmt: skip


def test_vindr_kaggle_released_metadata(workdir):
    path = released_file("vinbigdata-train.csv.gz")
    header, rows = read_rows(path)
    assert header == ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    root = workdir / "vinbigdata-chest-xray-abnormalities-detection"
    root.mkdir()
    with gzip.open(path, "rb") as source:
        (root / "train.csv").write_bytes(source.read())
    images = list(dict.fromkeys(row[0] for row in rows))  # first-appearance order
    templates = [
        fixtures.write_dicom(workdir / f"template{k}.dicom", fixtures.make_pixels(k, shape=(8, 8), high=4095),
                             sex=sex, age=age)
        for k, (sex, age) in enumerate(VINDR_TEMPLATES)
    ]  # fmt: skip
    (root / "train").mkdir()
    for k, image in enumerate(images):
        os.symlink(templates[k % 3], root / "train" / f"{image}.dicom")

    with pytest.raises(Exception, match="Kaggle VinBigData competition copy"):
        prepare_dataset("vindr-cxr", root, size=SIZE, out=workdir / "data", workers=1)
    cache, card = prepare("vindr-cxr-kaggle", root, workdir / "data")

    reads: dict[str, dict[str, set[str]]] = {}
    for image, name, _, reader, *_ in rows:
        reads.setdefault(image, {}).setdefault(reader, set()).add(name)
    assert Counter(len(readers) for readers in reads.values()) == {3: 15000}

    def anyone(image: str, name: str) -> int:
        return int(any(name in names for names in reads[image].values()))

    sex = {"F": "F", "M": "M", "": "unknown"}
    expected = pd.DataFrame(
        {
            "image_id": images,
            "patient_id": images,
            "atelectasis": [anyone(i, "Atelectasis") for i in images],
            "cardiomegaly": [anyone(i, "Cardiomegaly") for i in images],
            "pleural_effusion": [anyone(i, "Pleural effusion") for i in images],
            "pneumonia": [0] * len(images),
            "no_finding": [int(all(names == {"No finding"} for names in reads[i].values())) for i in images],
            "sex": [sex[VINDR_TEMPLATES[k % 3][0]] for k in range(len(images))],
            "age": [float(VINDR_TEMPLATES[k % 3][1][:3]) if VINDR_TEMPLATES[k % 3][1] else math.nan
                    for k in range(len(images))],
        }
    )  # fmt: skip
    assert card["excluded"] == {"uncertain label (policy drop)": 0} and card["skipped"] == []
    assert len(images) == len(cache.manifest)
    check_against_derivation(cache, card, expected, VINDR_GOLDEN)
    assert list(card["labels_missing"]) == ["pneumonia"]
    assert card["images_per_patient"]["note"].startswith("each image is its own patient")
    assert card["metadata_issues"] == {
        "PatientSex missing or not F/M (sex unknown)": 5000,
        "PatientAge missing or malformed (age missing)": 5000,
    }
    assert {row[1] for row in rows} == {
        "No finding", "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
        "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening",
        "Pneumothorax", "Pulmonary fibrosis",
    }  # the 14 local findings and "No finding": no pneumonia anywhere  # fmt: skip


def test_chexpert_adding_a_patient_with_the_split_key_moves_nobody(workdir):
    """The released train.csv's first 3,000 patients, prepared with a freshly drawn key; then the next patient with
    a kept image is added and the dataset prepared again elsewhere with ``--split-key``: no other patient moves."""
    from sweeps.cli import main

    header, rows = read_rows(released_file("chexpert_train.csv.gz"))
    column = {name: header.index(name) for name in ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_FIVE)}
    patients = list(dict.fromkeys(row[column["Path"]].split("/")[2] for row in rows))
    first = set(patients[:3000])

    def kept(row) -> bool:
        return (
            row[column["Frontal/Lateral"]] == "Frontal"
            and row[column["AP/PA"]] not in ("LL", "RL")
            and all(row[column[name]] != "-1.0" for name in CHEXPERT_FIVE)
        )

    added = next(p for p in patients[3000:] if any(kept(r) for r in rows if r[column["Path"]].split("/")[2] == p))
    jpeg = workdir / "placeholder.jpg"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(jpeg, quality=95)

    def release(name: str, members: set[str]) -> Path:
        root = workdir / name / "CheXpert-v1.0-small"
        chosen = [row for row in rows if row[column["Path"]].split("/")[2] in members]
        fixtures.write_csv(root / "train.csv", header, chosen)
        (root / "valid.csv").write_text(",".join(header) + "\n")
        link_all(jpeg, root, (row[column["Path"]].split("/", 1)[1] for row in chosen))
        return root

    def prepare_release(root: Path, out: Path, *extra: str) -> pd.Series:
        args = ["prepare", "chexpert", "--root", str(root), "--size", str(SIZE), "--out", str(out), "--workers", "1"]
        assert main([*args, *extra]) == 0
        manifest = open_cache(out / "chexpert" / str(SIZE)).manifest
        return manifest.drop_duplicates("patient_id").set_index("patient_id")["split"]

    before = prepare_release(release("release1", first), workdir / "data1")  # key drawn from os.urandom
    key = workdir / "data1" / "chexpert" / "split.key"
    after = prepare_release(release("release2", first | {added}), workdir / "data2", "--split-key", str(key))
    assert set(after.index) - set(before.index) == {added} and len(before) > 2000
    common = before.index
    assert (before[common] != after[common]).sum() == 0  # nobody moved
    shares = before.value_counts(normalize=True)
    assert abs(shares["test"] - 0.2) < 4 * math.sqrt(0.16 / len(before))  # binomial around the fraction
