"""Each dataset adapter on a tiny copy of its official files: labels, demographics and splits image by image,
and every kind of bad input (missing/renamed column, value outside the coding, duplicate id, patient in two
official splits, unreadable or pixel-less images)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.data import fixtures
from trainables.data.cache import CARD_FILE, open_cache
from trainables.data.labels import LABELS
from trainables.data.prepare import DatasetError, format_card, prepare_dataset
from trainables.data.preprocess import PreprocessSettings, load_and_preprocess, preprocess_pixels
from trainables.data.splits import split_uniforms

SIZE = 16
NAN = float("nan")
UKA_PATTERN = "UKA_preprocessed/{subset}/{image_id}.jpg"


def prepare(name: str, root: Path, out: Path, **kwargs):
    fixtures.place_split_key(out, name)
    return open_cache(prepare_dataset(name, root, size=SIZE, out=out, workers=1, **kwargs))


def card_of(cache) -> dict:
    return json.loads((cache.path / CARD_FILE).read_text())


def check_images(cache, expected: dict[str, tuple]) -> None:
    """Compare the manifest with ``expected``: image_id -> (five labels in `LABELS` order, sex, age, view)."""
    manifest = cache.manifest.set_index("image_id")
    assert sorted(manifest.index) == sorted(expected)
    for image_id, (*labels, sex, age, view) in expected.items():
        row = manifest.loc[image_id]
        assert [int(row[label]) for label in LABELS] == labels, image_id
        assert row["sex"] == sex, image_id
        assert (np.isnan(age) and np.isnan(row["age"])) or row["age"] == pytest.approx(age), image_id
        assert row["view"] == view, image_id


def check_pixels(cache, root: Path) -> None:
    settings = PreprocessSettings(size=SIZE)
    for row, source in enumerate(cache.manifest["source_path"]):
        np.testing.assert_array_equal(cache.images[row], load_and_preprocess(root / source, settings))


def splits_of(cache) -> dict[str, str]:
    return dict(zip(cache.manifest["image_id"], cache.manifest["split"], strict=True))


def check_keyed_split(
    cache, test_patients: int, val_patients: int, *, official_test: bool = False, val_fraction: float = 0.1
) -> None:
    """Patient-disjoint, with these counts (binomial draws, pinned for the tests' fixed key), and each patient's split
    decided by its own id's uniforms under that key (test: below 0.2 unless the test split is official; val: a
    non-test patient below ``val_fraction``)."""
    per_patient = cache.manifest.groupby("patient_id")["split"].agg(set)
    assert all(len(s) == 1 for s in per_patient)  # patient-disjoint
    split = per_patient.map(lambda s: next(iter(s)))
    counts = split.value_counts()
    assert counts.get("test", 0) == test_patients and counts.get("val", 0) == val_patients
    u_test, u_val = split_uniforms(split.index.to_numpy(dtype=str), fixtures.SPLIT_KEY)
    if not official_test:
        np.testing.assert_array_equal(split.to_numpy() == "test", u_test < 0.2)
    train_side = split.to_numpy() != "test"
    np.testing.assert_array_equal(split.to_numpy()[train_side] == "val", u_val[train_side] < val_fraction)


def edit(path: Path, old: str, new: str, line: int | None = None) -> None:
    """Replace ``old`` by ``new`` once (on 1-based ``line`` if given) in a text or .gz file."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    lines = text.split("\n")
    index = line - 1 if line else next(i for i, content in enumerate(lines) if old in content)
    assert old in lines[index], (old, lines[index])
    lines[index] = lines[index].replace(old, new, 1)
    text = "\n".join(lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def append_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def test_line_is_the_physical_line_of_the_record(tmp_path):
    from trainables.data.adapters.base import line, read_table

    text = 'id,report,sex\na,"one\ntwo",F\n\nb,plain,M\nc,"x\n\ny\n",nan\nd,"say ""hi""\nthere",F\n'
    for path in (tmp_path / "t.csv", tmp_path / "t.csv.gz"):
        path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
        table = read_table(path, ["id", "report", "sex"])
        assert list(table["id"]) == ["a", "b", "c", "d"]  # pandas skips the blank line 4
        assert [line(path, i) for i in table.index] == [2, 5, 6, 10]  # c spans lines 6-9
        assert line(path, table[table["sex"] == "nan"].index[0]) == 6  # the index survives filtering
    (tmp_path / "t.csv").write_text("id,report,sex\n\nz,new,F\n")  # an edited file is scanned again
    assert line(tmp_path / "t.csv", 0) == 3


# --- CheXpert ------------------------------------------------------------------------------------------

CHEXPERT_EXPECTED = {  # uncertain policy "drop": patient00002/study1, patient00004, patient00006 are dropped
    "patient00001/study1/view1_frontal": (0, 0, 0, 0, 1, "F", 68, "AP"),
    "patient00002/study2/view1_frontal": (1, 0, 0, 0, 0, "M", NAN, "PA"),  # Age 0 = missing
    "patient00003/study1/view1_frontal": (0, 0, 1, 0, 0, "unknown", 45, "AP"),  # Edema -1 does not matter
    "patient00005/study1/view1_frontal": (0, 0, 0, 0, 0, "M", 33, "PA"),
    "patient00007/study1/view1_frontal": (1, 0, 1, 0, 0, "M", 55, "AP"),
    "patient00008/study1/view1_frontal": (0, 0, 0, 0, 1, "F", 27, "PA"),
    "patient64541/study1/view1_frontal": (0, 1, 0, 0, 0, "M", 73, "AP"),  # valid.csv pooled
    "patient64542/study1/view1_frontal": (0, 0, 0, 0, 1, "F", 70, "PA"),
}


@pytest.fixture
def chexpert(tmp_path):
    return fixtures.build_chexpert(tmp_path / "src")


def test_chexpert_images(chexpert, tmp_path):
    cache = prepare("chexpert", chexpert, tmp_path / "data")
    check_images(cache, CHEXPERT_EXPECTED)
    check_pixels(cache, chexpert)
    check_keyed_split(cache, test_patients=1, val_patients=1)  # 10 patients, under fixtures.SPLIT_KEY
    assert cache.manifest["site"].eq("chexpert").all()
    assert cache.manifest.set_index("image_id").loc["patient00001/study1/view1_frontal", "source_path"] == (
        "train/patient00001/study1/view1_frontal.jpg"
    )
    card = card_of(cache)
    assert card["excluded"] == {"lateral view": 2, "uncertain label (policy drop)": 4}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("zeros", {"patient00002/study1": (0, 1, 0, 0, 0), "patient00004/study1": (0, 0, 0, 1, 0),
                   "patient00006/study1": (0, 1, 0, 0, 0)}),
        ("ones", {"patient00002/study1": (0, 1, 1, 0, 0), "patient00004/study1": (1, 0, 0, 1, 0),
                  "patient00006/study1": (0, 1, 0, 1, 0)}),
    ],
)  # fmt: skip
def test_chexpert_uncertain_policies(chexpert, tmp_path, policy, expected):
    manifest = prepare("chexpert", chexpert, tmp_path / "data", uncertain=policy).manifest.set_index("image_id")
    assert len(manifest) == 12
    for study, labels in expected.items():
        assert tuple(manifest.loc[f"{study}/view1_frontal", list(LABELS)]) == labels
    assert tuple(manifest.loc["patient00006/study1/view2_frontal", list(LABELS)]) == expected["patient00006/study1"]


def test_chexpert_renamed_column(chexpert, tmp_path):
    edit(chexpert / "train.csv", "Pleural Effusion", "Pleural_Effusion", line=1)
    with pytest.raises(DatasetError) as error:
        prepare("chexpert", chexpert, tmp_path / "data")
    message = str(error.value)
    assert str(chexpert / "train.csv") in message and "missing column(s) ['Pleural Effusion']" in message
    assert "columns found: ['Path', 'Sex'" in message and "'Pleural_Effusion'" in message


def test_chexpert_label_outside_coding(chexpert, tmp_path):
    edit(chexpert / "valid.csv", ",1.0,", ",2,", line=2)  # patient64541: Cardiomegaly 1.0 -> 2
    with pytest.raises(DatasetError, match=r"valid.csv: line 2, column 'Cardiomegaly': value '2' is outside"):
        prepare("chexpert", chexpert, tmp_path / "data")


def test_chexpert_duplicate_path(chexpert, tmp_path):
    first_row = (chexpert / "train.csv").read_text().split("\n")[1]
    append_line(chexpert / "train.csv", first_row)
    path = "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"
    with pytest.raises(DatasetError, match=rf"train.csv: duplicate Path '{path}' \(lines \[2, 14\]\)"):
        prepare("chexpert", chexpert, tmp_path / "data")


def test_chexpert_bad_sex_and_age(chexpert, tmp_path):
    edit(chexpert / "train.csv", "Male", "Mle", line=4)
    with pytest.raises(DatasetError, match=r"line 4, column 'Sex': sex 'Mle' is not a known code; expected one of"):
        prepare("chexpert", chexpert, tmp_path / "data")
    edit(chexpert / "train.csv", "Mle", "Male", line=4)
    edit(chexpert / "train.csv", ",45,", ",forty-five,")
    with pytest.raises(DatasetError, match=r"line 6, column 'Age': age 'forty-five' is not a number"):
        prepare("chexpert", chexpert, tmp_path / "data")


def test_chexpert_frontal_rows_with_lateral_ap_pa_are_excluded(chexpert, tmp_path):
    # the released train.csv has 17 such rows, e.g. patient07958/study5/view2_frontal.jpg: Frontal, LL
    rows = [
        ("train", 9, 1, "view1_frontal", "Male", "60", "Frontal", "PA", {"Cardiomegaly": "1.0"}),
        ("train", 9, 1, "view2_frontal", "Male", "60", "Frontal", "LL", {"Pleural Effusion": "1.0"}),
        ("train", 10, 1, "view1_frontal", "Female", "44", "Frontal", "RL", {"No Finding": "1.0"}),
    ]
    for seed, row in enumerate(rows, start=150):
        cells = fixtures._chexpert_line(*row)
        append_line(chexpert / "train.csv", ",".join(cells))
        fixtures.write_image(chexpert / cells[0].split("/", 1)[1], fixtures.make_pixels(seed))
    cache = prepare("chexpert", chexpert, tmp_path / "data")
    manifest = cache.manifest.set_index("image_id")
    assert "patient00009/study1/view1_frontal" in manifest.index
    assert not {"patient00009/study1/view2_frontal", "patient00010/study1/view1_frontal"} & set(manifest.index)
    assert set(manifest["view"]) == {"AP", "PA"}
    assert card_of(cache)["excluded"] == {
        "lateral view": 2,
        "frontal with AP/PA LL or RL (lateral decubitus or mislabelled lateral)": 2,
        "uncertain label (policy drop)": 4,
    }


def test_chexpert_root_must_hold_train_csv(chexpert, tmp_path):
    with pytest.raises(DatasetError, match="pass the CheXpert-v1.0 folder"):
        prepare("chexpert", chexpert.parent, tmp_path / "data")


# --- MIMIC-CXR-JPG -------------------------------------------------------------------------------------

MIMIC_EXPECTED = {  # (labels..., sex, age, view), split
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014": (
        (0, 0, 0, 0, 1, "F", 52, "PA"),
        "train",
    ),  # 52 + 2180-2180
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab": (
        (0, 1, 0, 0, 0, "F", 53, "AP"),
        "train",
    ),  # study in 2181
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714": ((0, 0, 0, 1, 0, "M", 86, "AP"), "val"),  # "validate"
    "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4": (
        (1, 0, 1, 0, 0, "F", 25, "PA"),
        "test",
    ),  # 24 + 2154-2153
    "fcb7ad49-8bc7e4b4-5e1d1e4e-7ae0e3b8-2e5c5a7d": ((1, 0, 1, 0, 0, "F", 25, "PA"), "test"),
    "4c9b7f30-2d2f4b3c-88f1bae2-6c1d5f4b-a09e8d7c": (
        (0, 0, 0, 0, 0, "unknown", NAN, "PA"),
        "train",
    ),  # no patient
}


@pytest.fixture
def mimic(tmp_path):
    return fixtures.build_mimic(tmp_path / "src")


def test_mimic_images(mimic, tmp_path):
    root, patients = mimic
    cache = prepare("mimic-cxr", root, tmp_path / "data", patients_csv=patients)
    check_images(cache, {k: v[0] for k, v in MIMIC_EXPECTED.items()})
    assert splits_of(cache) == {k: v[1] for k, v in MIMIC_EXPECTED.items()}
    check_pixels(cache, root)
    row = cache.manifest.set_index("image_id").loc["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert row["source_path"] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert row["patient_id"] == "10000032"
    card = card_of(cache)
    assert card["excluded"] == {
        "view not PA/AP": 1, "study has no CheXpert labels": 1, "uncertain label (policy drop)": 1
    }  # fmt: skip
    assert card["metadata_issues"] == {"images whose subject is not in patients_csv (sex unknown, age missing)": 1}
    assert card["split_method"] == "official split; official validation split"


def test_mimic_without_patients_csv_and_uncertain_zeros(mimic, tmp_path):
    root, _ = mimic
    cache = prepare("mimic-cxr", root, tmp_path / "data", uncertain="zeros")
    assert cache.manifest["sex"].eq("unknown").all() and cache.manifest["age"].isna().all()
    row = cache.manifest.set_index("image_id").loc["5dac8041-3e305c4d-99f2cbf3-7d2e605c-b1af9e8d"]
    assert [int(row[label]) for label in LABELS] == [0, 1, 0, 0, 0]  # Atelectasis -1 -> 0
    assert "no patients_csv given" in " ".join(card_of(cache)["notes"])


def test_mimic_patient_in_two_official_splits(mimic, tmp_path):
    root, patients = mimic
    edit(root / "mimic-cxr-2.0.0-split.csv.gz", "53189527,10000032,train", "53189527,10000032,test")
    with pytest.raises(
        DatasetError, match=r"split.csv.gz: patient '10000032' is in official splits \['test', 'train'\]"
    ):
        prepare("mimic-cxr", root, tmp_path / "data", patients_csv=patients)


def test_mimic_patients_csv_missing_column(mimic, tmp_path):
    root, patients = mimic
    edit(patients, "anchor_year,", "anchor_yr,", line=1)
    with pytest.raises(DatasetError, match=r"patients.csv.gz: missing column\(s\) \['anchor_year'\]; columns found"):
        prepare("mimic-cxr", root, tmp_path / "data", patients_csv=patients)


def test_mimic_split_file_errors(mimic, tmp_path):
    root, patients = mimic
    edit(root / "mimic-cxr-2.0.0-split.csv.gz", ",validate", ",validation")
    with pytest.raises(DatasetError, match=r"line 5, column 'split': split 'validation' is not a known code"):
        prepare("mimic-cxr", root, tmp_path / "data", patients_csv=patients)
    edit(root / "mimic-cxr-2.0.0-split.csv.gz", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4,", "0-0-0-0-0,")
    edit(root / "mimic-cxr-2.0.0-split.csv.gz", ",validation", ",validate")
    with pytest.raises(DatasetError, match=r"no split for dicom_id '096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4'"):
        prepare("mimic-cxr", root, tmp_path / "data", patients_csv=patients)


def test_mimic_missing_table(mimic, tmp_path):
    root, patients = mimic
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DatasetError, match=r"none of \['mimic-cxr-2.0.0-split.csv', 'mimic-cxr-2.0.0-split.csv.gz'\]"):
        prepare("mimic-cxr", root, tmp_path / "data", patients_csv=patients)


# --- ChestX-ray14 --------------------------------------------------------------------------------------

CXR14_EXPECTED = {
    "00000001_000.png": (0, 1, 0, 0, 0, "M", 58, "PA"),
    "00000001_001.png": (0, 1, 0, 0, 0, "M", 58, "PA"),
    "00000002_000.png": (0, 0, 0, 0, 1, "M", 81, "AP"),
    "00000003_000.png": (0, 0, 1, 0, 0, "F", 74, "PA"),  # Effusion -> pleural_effusion
    "00000003_001.png": (1, 0, 1, 1, 0, "F", 75, "AP"),
    "00000004_000.png": (0, 0, 0, 0, 0, "F", NAN, "PA"),  # age 148 -> missing
    "00000005_000.png": (0, 0, 0, 1, 0, "F", 69, "AP"),
    "00000006_000.png": (1, 0, 0, 0, 0, "M", 22, "PA"),
    "00000007_000.png": (0, 0, 0, 0, 1, "F", 34, "PA"),
    "00000008_000.png": (0, 0, 0, 0, 0, "M", 60, "PA"),  # Hernia only: no target finding, not "No Finding"
    "00000009_000.png": (0, 0, 0, 0, 1, "F", 45, "PA"),
    "00000010_000.png": (0, 0, 1, 0, 0, "M", 50, "AP"),
}


@pytest.fixture
def cxr14(tmp_path):
    return fixtures.build_chestxray14(tmp_path / "src")


def test_chestxray14_images(cxr14, tmp_path):
    cache = prepare("chestxray14", cxr14, tmp_path / "data")
    check_images(cache, CXR14_EXPECTED)
    check_pixels(cache, cxr14)
    splits = splits_of(cache)
    assert {k for k, v in splits.items() if v == "test"} == {"00000003_000.png", "00000003_001.png"}
    check_keyed_split(cache, 1, 1, official_test=True)  # official test; validation of the 9 train patients
    assert card_of(cache)["metadata_issues"] == {"age outside [0, 120] set to missing": 1}
    assert set(cache.manifest["source_path"].str.split("/").str[0]) == {"images_001", "images_002"}


def test_chestxray14_nih_images_folder(cxr14, tmp_path):
    (cxr14 / "images").mkdir()
    for folder in ("images_001", "images_002"):
        for file in (cxr14 / folder / "images").iterdir():
            file.rename(cxr14 / "images" / file.name)
        shutil.rmtree(cxr14 / folder)
    cache = prepare("chestxray14", cxr14, tmp_path / "data")
    assert cache.manifest["source_path"].str.startswith("images/").all() and len(cache.manifest) == 12


def test_chestxray14_patient_in_both_lists(cxr14, tmp_path):
    train_list = cxr14 / "train_val_list.txt"
    train_list.write_text(train_list.read_text().replace("00000001_001.png\n", ""))
    append_line(cxr14 / "test_list.txt", "00000001_001.png")
    with pytest.raises(DatasetError, match=r"test_list.txt: patient '1' is in official splits \['test', 'train'\]"):
        prepare("chestxray14", cxr14, tmp_path / "data")


def test_chestxray14_image_in_both_lists_and_duplicate_entry(cxr14, tmp_path):
    append_line(cxr14 / "test_list.txt", "00000001_001.png")
    with pytest.raises(DatasetError, match=r"duplicate image id '00000001_001.png', already listed in train_val"):
        prepare("chestxray14", cxr14, tmp_path / "data")
    edit(cxr14 / "test_list.txt", "00000001_001.png", "")
    entries = cxr14 / "Data_Entry_2017_v2020.csv"
    append_line(entries, entries.read_text().split("\n")[3])
    with pytest.raises(DatasetError, match=r"duplicate Image Index '00000002_000.png' \(lines \[4, 14\]\)"):
        prepare("chestxray14", cxr14, tmp_path / "data")


def test_chestxray14_unknown_finding(cxr14, tmp_path):
    edit(cxr14 / "Data_Entry_2017_v2020.csv", "Cardiomegaly|Emphysema", "Cardiomegally|Emphysema")
    with pytest.raises(DatasetError, match=r"line 3, column 'Finding Labels': 'Cardiomegally\|Emphysema' is outside"):
        prepare("chestxray14", cxr14, tmp_path / "data")


def test_chestxray14_missing_image_is_skipped(cxr14, tmp_path):
    next(cxr14.glob("images_*/images/00000005_000.png")).unlink()
    cache = prepare("chestxray14", cxr14, tmp_path / "data")
    assert card_of(cache)["skipped"] == [{"source_path": "images/00000005_000.png", "reason": "file not found"}]
    assert "00000005_000.png" not in set(cache.manifest["image_id"])


# --- PadChest ------------------------------------------------------------------------------------------

PADCHEST_EXPECTED = {
    "p01_a.png": (0, 1, 1, 0, 0, "M", 73, "PA"),  # 2012 - 1939
    "p02_a.png": (0, 0, 0, 0, 1, "F", 25, "PA"),
    "p03_a.png": (1, 0, 0, 1, 0, "F", 60, "AP_horizontal"),  # ' lobar atelectasis' (leading blank)
    "p04_a.png": (0, 0, 0, 1, 0, "unknown", NAN, "AP"),  # atypical pneumonia; no birth year, no sex
    "p05_a.png": (0, 0, 1, 0, 0, "F", 0, "PA"),  # loculated pleural effusion; born in the study year
    "p07_a.png": (0, 0, 0, 0, 1, "unknown", 51, "PA"),  # sex O
    "p08_a.png": (1, 1, 0, 0, 0, "M", 39, "AP"),  # round atelectasis
    "p09_a.png": (0, 0, 0, 0, 1, "F", 37, "PA"),
    "p10_a.png": (0, 0, 1, 0, 0, "M", 82, "PA"),
    "p11_a.png": (0, 0, 0, 0, 1, "F", 57, "PA"),
    "p12_a.png": (1, 0, 0, 0, 0, "unknown", 63, "PA"),  # atelectasis basal; the released 'nan' sex
    "p13_a.png": (0, 0, 1, 0, 0, "F", 54, "PA"),  # hydropneumothorax: fluid in the pleural space
    "p13_b.png": (0, 0, 1, 0, 0, "M", 54, "AP"),  # empyema; pericardial effusion alone would not count
    "p14_a.png": (0, 0, 0, 0, 0, "M", 76, "PA"),  # near misses only: none of them is a study label
    "p15_a.png": (0, 0, 1, 0, 0, "F", 65, "PA"),  # 'normal' + pleural effusion: the finding wins
    "p15_b.png": (0, 0, 0, 0, 1, "F", 65, "PA"),  # 'normal' + scoliosis (not a study label): still normal
}


@pytest.fixture
def padchest(tmp_path):
    return fixtures.build_padchest(tmp_path / "src")


def test_padchest_images(padchest, tmp_path):
    cache = prepare("padchest", padchest, tmp_path / "data")
    check_images(cache, PADCHEST_EXPECTED)
    check_pixels(cache, padchest)
    check_keyed_split(cache, test_patients=2, val_patients=1)  # 14 patients kept, under fixtures.SPLIT_KEY
    card = card_of(cache)
    assert card["excluded"] == {"projection L": 1, "projection COSTAL": 1, "uncertain label (policy drop)": 0}
    assert card["skipped"] == [{"source_path": "0/p06_b.png", "reason": "no labels in the CSV"}]
    assert cache.manifest.set_index("image_id").loc["p03_a.png", "source_path"] == "1/p03_a.png"
    assert card["metadata_issues"] == {
        "'normal' listed with a finding (no_finding set to 0)": 1,
        "PatientSex_DICOM 'nan' in the released file (sex unknown)": 1,
    }
    assert card["inconsistent_patients"] == {
        "sex": {"patients": 1, "examples": ["pat13: F x1, M x1"]},
        "birth year (PatientBirth)": {"patients": 1, "examples": ["pat13: 1960 x1, 1961 x1"]},
    }
    assert card["images_per_patient"] == {"patients": 14, "min": 1, "median": 1.0, "p99": 2, "max": 2}


def test_padchest_term_hierarchy():
    from trainables.data.adapters.padchest import LABEL_TERMS, NOT_LABEL_TERMS

    # each label's terms are the PadChest term and its subtree; every near miss stays out of every label
    assert LABEL_TERMS["atelectasis"] == {
        "atelectasis", "total atelectasis", "lobar atelectasis", "segmental atelectasis", "laminar atelectasis",
        "round atelectasis", "atelectasis basal",
    }  # fmt: skip
    assert LABEL_TERMS["pleural_effusion"] == {
        "pleural effusion", "loculated pleural effusion", "loculated fissural effusion", "hydropneumothorax",
        "empyema", "hemothorax",
    }  # fmt: skip
    assert LABEL_TERMS["pneumonia"] == {"pneumonia", "atypical pneumonia"}
    assert LABEL_TERMS["cardiomegaly"] == {"cardiomegaly"} and LABEL_TERMS["no_finding"] == {"normal"}
    near_misses = set().union(*NOT_LABEL_TERMS.values())
    assert "pericardial effusion" in near_misses and near_misses.isdisjoint(set().union(*LABEL_TERMS.values()))


def test_padchest_malformed_label_list(padchest, tmp_path):
    csv_path = padchest / fixtures.PADCHEST_CSV
    number = fixtures.physical_line(csv_path, "p02_a.png")
    assert number == 5  # after the two physical lines of p01_a's report and p01_b's line
    edit(csv_path, "['normal']", "normal", line=number)
    with pytest.raises(
        DatasetError, match=rf"line {number}, column 'Labels': 'normal' is outside the coding; expected a list"
    ):
        prepare("padchest", padchest, tmp_path / "data")


def test_padchest_errors_name_the_physical_line_after_multiline_reports(padchest, tmp_path):
    csv_path = padchest / fixtures.PADCHEST_CSV
    number = fixtures.physical_line(csv_path, "p11_a.png")
    assert number == 19  # the 13th record: line 14 counting records, plus 1 + 3 + 1 lines inside quoted reports
    edit(csv_path, ",F,,PA,", ",X,,PA,", line=number)
    with pytest.raises(DatasetError, match=rf"line {number}, column 'PatientSex_DICOM': sex 'X' is not a known"):
        prepare("padchest", padchest, tmp_path / "data")


def test_padchest_unknown_sex_and_renamed_column(padchest, tmp_path):
    csv_path = padchest / fixtures.PADCHEST_CSV
    edit(csv_path, ",M,", ",X,", line=2)
    with pytest.raises(
        DatasetError,
        match=r"line 2, column 'PatientSex_DICOM': sex 'X' is not a known code; expected one of "
        r"\['', 'F', 'M', 'O'\]",
    ):
        prepare("padchest", padchest, tmp_path / "data")
    edit(csv_path, "Projection", "projection", line=1)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['Projection'\]"):
        prepare("padchest", padchest, tmp_path / "data")


# --- VinDr-CXR -----------------------------------------------------------------------------------------

VINDR_EXPECTED = {  # readers merged: finding = any reader; no_finding = all readers said "No finding"
    "000434271f63a053c4128a0ba6352c7f": ((0, 0, 0, 0, 1, "F", 45, "frontal"), "train"),
    "00053190460d56c53cc3e57321387478": ((0, 1, 0, 0, 0, "M", NAN, "frontal"), "train"),  # age tag blank
    "0005e8e3701dfb1dd93d53e2ff537b6e": ((1, 0, 1, 1, 0, "unknown", NAN, "frontal"), "train"),  # sex O, 000Y
    "0006e0a85696f6bb578e84fafa9a5607": ((0, 0, 0, 0, 1, "M", 2.5, "frontal"), "train"),  # 030M
    "0007d316f756b3fa0baea2ff514ce945": (
        (0, 0, 0, 0, 0, "unknown", 61, "frontal"),
        "train",
    ),  # one reader: aorta
    "000ae00eb3942d27e0b97903dd563a6e": ((0, 0, 1, 0, 0, "F", 72, "frontal"), "train"),
    "002a34c58c5b758217ed1f584ccbcfe9": ((0, 1, 1, 0, 0, "F", 58, "frontal"), "test"),
    "004f33259ee4aef671c2b95d54e4be68": ((0, 0, 0, 0, 1, "M", NAN, "frontal"), "test"),  # age tag "X"
}


@pytest.fixture
def vindr(tmp_path):
    with pytest.warns(UserWarning, match="Invalid value for VR AS: 'X'"):  # the malformed age on purpose
        return fixtures.build_vindr(tmp_path / "src")


def test_vindr_images(vindr, tmp_path):
    cache = prepare("vindr-cxr", vindr, tmp_path / "data")
    check_images(cache, {k: v[0] for k, v in VINDR_EXPECTED.items()})
    check_pixels(cache, vindr)  # includes two MONOCHROME1 files
    splits = splits_of(cache)
    assert {k for k, v in splits.items() if v == "test"} == {k for k, v in VINDR_EXPECTED.items() if v[1] == "test"}
    assert sum(v == "val" for v in splits.values()) == 1  # carved from the 6 train patients (fixtures.SPLIT_KEY)
    assert (cache.manifest["patient_id"] == cache.manifest["image_id"]).all()
    assert card_of(cache)["metadata_issues"] == {
        "PatientSex missing or not F/M (sex unknown)": 2,
        "PatientAge missing or malformed (age missing)": 2,
        "PatientAge zero or outside [0, 120] (age missing)": 1,
    }


def test_vindr_monochrome1_is_inverted(vindr, tmp_path):
    cache = prepare("vindr-cxr", vindr, tmp_path / "data", equalize=False)
    row = int(np.flatnonzero(cache.manifest["image_id"] == "00053190460d56c53cc3e57321387478")[0])
    pixels = fixtures.make_pixels(901, high=4095).astype(np.float64)  # the fixture's seed for this image
    settings = PreprocessSettings(size=SIZE, equalize=False)
    np.testing.assert_array_equal(cache.images[row], preprocess_pixels(pixels.max() - pixels, settings))


def test_vindr_dicom_without_pixel_data_and_missing_file(vindr, tmp_path):
    fixtures.write_dicom(vindr / "train" / "000ae00eb3942d27e0b97903dd563a6e.dicom", None, sex="F", age="072Y")
    (vindr / "test" / "004f33259ee4aef671c2b95d54e4be68.dicom").unlink()
    cache = prepare("vindr-cxr", vindr, tmp_path / "data")
    card = card_of(cache)
    assert card["skipped"] == [
        {"source_path": "test/004f33259ee4aef671c2b95d54e4be68.dicom", "reason": "file not found"},
        {"source_path": "train/000ae00eb3942d27e0b97903dd563a6e.dicom", "reason": "DICOM without pixel data"},
    ]
    assert card["n_skipped"] == 2 and len(cache.manifest) == 6


def test_vindr_other_disease_quirk_is_checked(vindr, tmp_path):
    test_csv = vindr / "annotations" / "image_labels_test.csv"
    header = test_csv.read_text().split("\n")[0].split(",")
    assert "Other disease" in header and "Other diseases" not in header  # the quirk is in the fixture
    column = header.index("Other disease")
    lines = test_csv.read_text().split("\n")
    cells = lines[2].split(",")
    cells[column] = "2"
    lines[2] = ",".join(cells)
    test_csv.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"image_labels_test.csv: line 3, column 'Other disease': value '2'"):
        prepare("vindr-cxr", vindr, tmp_path / "data")


def test_vindr_column_sets_must_match(vindr, tmp_path):
    edit(vindr / "annotations" / "image_labels_test.csv", ",Tuberculosis,", ",TB,", line=1)
    with pytest.raises(DatasetError, match=r"only in train \['Tuberculosis'\], only in test \['TB'\]"):
        prepare("vindr-cxr", vindr, tmp_path / "data")


def test_vindr_image_in_both_files(vindr, tmp_path):
    test_csv = vindr / "annotations" / "image_labels_test.csv"
    edit(test_csv, "004f33259ee4aef671c2b95d54e4be68", "000434271f63a053c4128a0ba6352c7f")
    with pytest.raises(DatasetError, match=r"duplicate image id '000434271f63a053c4128a0ba6352c7f', already in"):
        prepare("vindr-cxr", vindr, tmp_path / "data")


def test_vindr_card_says_each_image_is_its_own_patient(vindr, tmp_path):
    per_patient = card_of(prepare("vindr-cxr", vindr, tmp_path / "data"))["images_per_patient"]
    assert per_patient == {
        "patients": 8, "min": 1, "median": 1.0, "p99": 1, "max": 1,
        "note": "each image is its own patient: the dataset publishes no patient id (patient_id = image_id)",
    }  # fmt: skip


# --- VinDr-CXR, Kaggle VinBigData copy -----------------------------------------------------------------

VINDR_KAGGLE_EXPECTED = {  # pneumonia is missing (0 = unknown); finding = any reader's box
    "50a418190bc3fb1ef1633bf9678929b3": (0, 0, 0, 0, 1, "F", 45, "frontal"),
    "9a5094b2563a1ef3ff50dc5c7ff71345": (0, 1, 0, 0, 0, "M", NAN, "frontal"),
    "051132a778e61a86eb147c7c6f564dfe": (1, 0, 1, 0, 0, "unknown", 61, "frontal"),  # thickening is not effusion
    "1c32170b4af4ce1a3030eb8167753b06": (0, 0, 0, 0, 0, "M", 72, "frontal"),  # one reader: other lesion
    "0c7a38f293d5f5e4846aa4ca6db4daf1": (0, 0, 0, 0, 1, "F", 30, "frontal"),
}


@pytest.fixture
def vindr_kaggle(tmp_path):
    return fixtures.build_vindr_kaggle(tmp_path / "src")


def test_vindr_cxr_recognises_the_kaggle_copy(vindr_kaggle, tmp_path):
    with pytest.raises(DatasetError) as error:
        prepare("vindr-cxr", vindr_kaggle, tmp_path / "data")
    message = str(error.value)
    assert "is the Kaggle VinBigData competition copy" in message and "no pneumonia label" in message
    assert f"dpsweep prepare vindr-cxr-kaggle --root {vindr_kaggle}" in message
    assert "download VinDr-CXR 1.0.0 from PhysioNet" in message


def test_vindr_kaggle_images_and_missing_label(vindr_kaggle, tmp_path):
    cache = prepare("vindr-cxr-kaggle", vindr_kaggle, tmp_path / "data", val_fraction=0.3)
    check_images(cache, VINDR_KAGGLE_EXPECTED)
    check_pixels(cache, vindr_kaggle)
    check_keyed_split(cache, 2, 2, val_fraction=0.3)  # 5 images, under fixtures.SPLIT_KEY
    assert (cache.manifest["patient_id"] == cache.manifest["image_id"]).all()
    assert not cache.manifest["source_path"].str.startswith("test/").any()  # Kaggle's test set is unlabeled
    card = card_of(cache)
    assert list(card["labels_missing"]) == ["pneumonia"]
    assert all(entry["prevalence"]["pneumonia"] is None for entry in card["splits"].values())
    assert card["splits"]["train"]["prevalence"]["cardiomegaly"] is not None
    assert card["images_per_patient"]["note"].startswith("each image is its own patient")
    assert "readers per image: {3: 5}" in card["notes"]
    text = format_card(card)
    assert "label missing: pneumonia (manifest column is 0 = unknown; the Kaggle VinBigData copy" in text


def test_sweeps_refuse_a_dataset_with_missing_labels():
    from trainables.data.registry import check_dataset_name, dataset_names, missing_labels

    assert missing_labels("vindr-cxr-kaggle") == ("pneumonia",)
    assert all(missing_labels(name) == () for name in dataset_names())
    assert "vindr-cxr-kaggle" not in dataset_names() and "vindr-cxr" in dataset_names()
    with pytest.raises(ValueError, match=r"dataset 'vindr-cxr-kaggle' cannot provide label\(s\) \['pneumonia'\]"):
        check_dataset_name("vindr-cxr-kaggle")
    check_dataset_name("vindr-cxr")


def test_vindr_kaggle_bad_rows(vindr_kaggle, tmp_path):
    train_csv = vindr_kaggle / "train.csv"
    edit(train_csv, "Atelectasis,1,", "Atelectasis,3,")
    number = fixtures.physical_line(train_csv, "Atelectasis,3,")
    with pytest.raises(DatasetError, match=rf"line {number}, column 'class_id': '3' does not match class_name"):
        prepare("vindr-cxr-kaggle", vindr_kaggle, tmp_path / "data")
    edit(train_csv, "Atelectasis,3,", "Atelectasis,1,")
    append_line(train_csv, "50a418190bc3fb1ef1633bf9678929b3,Cardiomegaly,3,R7,1.0,2.0,3.0,4.0")
    with pytest.raises(DatasetError, match=r"reader 'R7' marks image '50a418190bc3fb1ef1633bf9678929b3' 'No "
                       r"finding' and also draws boxes \(lines \[3, 19\]\)"):  # fmt: skip
        prepare("vindr-cxr-kaggle", vindr_kaggle, tmp_path / "data")


def test_vindr_kaggle_on_the_physionet_layout_says_which_to_use(vindr, tmp_path):
    with pytest.raises(DatasetError, match="looks like PhysioNet VinDr-CXR 1.0.0: prepare it as `vindr-cxr`"):
        prepare("vindr-cxr-kaggle", vindr, tmp_path / "data")


# --- UKA-CXR -------------------------------------------------------------------------------------------

UKA_EXPECTED = {
    "1001": ((0, 1, 0, 0, 0, "M", 63, "AP (bedside)"), "train"),  # cardiomegaly grade 3
    "1002": ((0, 0, 1, 0, 0, "M", 63, "AP (bedside)"), "train"),  # cardio 2; effusion right 4; atelectasis 2
    "1003": ((0, 0, 0, 1, 0, "F", 80, "AP (bedside)"), "train"),  # effusion left 2; infiltrates left 3
    "1004": ((1, 0, 0, 0, 0, "F", 45, "AP (bedside)"), "val"),  # cardio 5 (negative); atelectasis 3 / 4
    "1005": ((0, 0, 0, 0, 1, "M", 51, "AP (bedside)"), "test"),  # healthy
    "1006": ((0, 1, 1, 0, 0, "unknown", NAN, "AP (bedside)"), "test"),
    "1007": ((0, 0, 0, 1, 0, "F", 38, "AP (bedside)"), "train"),
}


@pytest.fixture
def uka(tmp_path):
    return fixtures.build_uka(tmp_path / "src")


def test_uka_images(uka, tmp_path):
    cache = prepare("uka-cxr", uka, tmp_path / "data", image_pattern=UKA_PATTERN)
    check_images(cache, {k: v[0] for k, v in UKA_EXPECTED.items()})
    assert splits_of(cache) == {k: v[1] for k, v in UKA_EXPECTED.items()}  # official, incl. "valid"
    check_pixels(cache, uka)
    assert cache.manifest.set_index("image_id").loc["1004", "source_path"] == "UKA_preprocessed/p2/1004.jpg"


def test_uka_grade_outside_coding(uka, tmp_path):
    edit(uka / "master_list.csv", "1003,train,80,F,0,", "1003,train,80,F,7,")
    with pytest.raises(DatasetError, match=r"line 4, column 'cardiomegaly': value '7' is outside the label coding"):
        prepare("uka-cxr", uka, tmp_path / "data", image_pattern=UKA_PATTERN)


def test_uka_patient_in_two_splits(uka, tmp_path):
    edit(uka / "master_list.csv", "1005,test", "1005,train")
    edit(uka / "master_list.csv", ",1,504,", ",1,501,")
    edit(uka / "master_list.csv", "1005,train", "1005,test")
    with pytest.raises(DatasetError, match=r"master_list.csv: patient '501' is in official splits \['test', 'train'\]"):
        prepare("uka-cxr", uka, tmp_path / "data", image_pattern=UKA_PATTERN)


def test_uka_options(uka, tmp_path):
    with pytest.raises(DatasetError, match=r"image_pattern '\{ward\}/\{image_id\}.jpg' names column 'ward'"):
        prepare("uka-cxr", uka, tmp_path / "data", image_pattern="{ward}/{image_id}.jpg")
    with pytest.raises(DatasetError, match=r"unknown adapter option\(s\) \['patients_csv'\]; valid options"):
        prepare("uka-cxr", uka, tmp_path / "data", patients_csv="p.csv")
    (uka / "master_list.csv").rename(uka / "uka_master.csv")
    cache = prepare("uka-cxr", uka, tmp_path / "data", master_list="uka_master.csv", image_pattern=UKA_PATTERN)
    assert len(cache.manifest) == 7
