"""Tiny copies of the six datasets' official distributions, built in a temporary folder.

Each builder writes the real file names and column layouts (with their quirks: CheXpert blanks and -1,
MIMIC's gzipped tables and ``files/pXX/pSUBJECT/sSTUDY/`` tree, ChestX-ray14's split header and Kaggle
image folders, PadChest's stringified term lists and 16-bit PNGs, VinDr's three readers, DICOM files
and the "Other disease(s)" spelling, UKA's graded sided findings) and small structured images. The
expected harmonized values are written out by hand in the tests, not derived from these builders.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

SHAPE = (40, 32)
"""Source image shape (rows, columns); deliberately not square."""

SPLIT_KEY = hashlib.sha256(b"dpsweep tests split key 4").digest()
"""The split key of the tests' preparations, so their splits are reproducible (a real preparation draws one from
``os.urandom``). Keyed splits of 5-14 patients can leave a split empty: this is the first key of
``sha256(b"dpsweep tests split key {i}")`` (i = 4) under which every fixture below fills train, val and test with
the settings its tests use."""


def place_split_key(out: Path, dataset: str, key: bytes = SPLIT_KEY) -> Path:
    """Write ``key`` where `prepare_dataset` looks for the dataset's split key (``out/dataset/split.key``), unless a
    key is there already; returns that file."""
    path = Path(out) / dataset / "split.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key)
    return path


def make_pixels(seed: int, shape: tuple[int, int] = SHAPE, high: int = 255) -> np.ndarray:
    """A non-constant image with smooth structure plus noise, distinct for each seed (uint8 or uint16)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : 1 : shape[0] * 1j, 0 : 1 : shape[1] * 1j]
    field = 0.5 + 0.3 * np.sin(2 * np.pi * ((1 + seed % 3) * x + rng.uniform(0.5, 2) * y)) + 0.2 * rng.random(shape)
    field = (field - field.min()) / (field.max() - field.min())
    dtype = np.uint8 if high <= 255 else np.uint16
    return np.round(field * high).astype(dtype)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """Write PNG/JPEG (by suffix) with Pillow; uint16 pixels make a 16-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(pixels).save(path, quality=95)
    else:
        Image.fromarray(pixels).save(path)
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    sex: str | None = None,
    age: str | None = None,
) -> Path:
    """A minimal DICOM file (explicit VR little endian, 12-bit pixels); ``pixels=None``: no PixelData."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    if sex is not None:
        dataset.PatientSex = sex
    if age is not None:
        dataset.PatientAge = age
    if pixels is not None:
        dataset.set_pixel_data(pixels.astype(np.uint16), photometric_interpretation=photometric, bits_stored=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]], *, gz: bool = False) -> Path:
    """Write a CSV (quoting only where needed, as the official files); gzip it when ``gz``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if value is None else value for value in row] for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(buffer.getvalue().encode()))
    else:
        path.write_text(buffer.getvalue())
    return path


# --- CheXpert v1.0 -------------------------------------------------------------------------------------

CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip

# (split folder, patient, study, view file, sex, age, frontal/lateral, AP/PA, {finding: value})
CHEXPERT_ROWS = [
    ("train", 1, 1, "view1_frontal", "Female", "68", "Frontal", "AP",
     {"No Finding": "1.0", "Support Devices": "1.0"}),
    ("train", 1, 1, "view2_lateral", "Female", "68", "Lateral", "", {"No Finding": "1.0"}),
    ("train", 2, 1, "view1_frontal", "Male", "0", "Frontal", "PA",
     {"Cardiomegaly": "1.0", "Pleural Effusion": "-1.0"}),
    ("train", 2, 2, "view1_frontal", "Male", "0", "Frontal", "PA",
     {"Atelectasis": "1.0", "Pneumonia": "0.0"}),
    ("train", 3, 1, "view1_frontal", "Unknown", "45", "Frontal", "AP",
     {"Pleural Effusion": "1.0", "Edema": "-1.0"}),
    ("train", 4, 1, "view1_frontal", "Female", "90", "Frontal", "AP",
     {"Pneumonia": "1.0", "Atelectasis": "-1.0"}),
    ("train", 5, 1, "view1_frontal", "Male", "33", "Frontal", "PA",
     {"Cardiomegaly": "0.0", "Pleural Effusion": "0.0"}),
    ("train", 6, 1, "view1_frontal", "Female", "71", "Frontal", "AP",
     {"Cardiomegaly": "1.0", "Pneumonia": "-1.0"}),
    ("train", 6, 1, "view2_frontal", "Female", "71", "Frontal", "AP",
     {"Cardiomegaly": "1.0", "Pneumonia": "-1.0"}),
    ("train", 7, 1, "view1_frontal", "Male", "55", "Frontal", "AP",
     {"Atelectasis": "1.0", "Pleural Effusion": "1.0"}),
    ("train", 8, 1, "view1_frontal", "Female", "27", "Frontal", "PA", {"No Finding": "1.0"}),
    ("train", 8, 1, "view2_lateral", "Female", "27", "Lateral", "", {"No Finding": "1.0"}),
]  # fmt: skip
CHEXPERT_VALID_ROWS = [
    ("valid", 64541, 1, "view1_frontal", "Male", "73", "Frontal", "AP",
     {"Cardiomegaly": "1.0", "Atelectasis": "0.0"}),
    ("valid", 64542, 1, "view1_frontal", "Female", "70", "Frontal", "PA",
     {"No Finding": "1.0", "Pneumonia": "0.0"}),
]  # fmt: skip


def _chexpert_line(split: str, patient: int, study: int, view: str, sex, age, frontal, ap_pa, findings) -> list:
    path = f"CheXpert-v1.0/{split}/patient{patient:05d}/study{study}/{view}.jpg"
    return [path, sex, age, frontal, ap_pa, *(findings.get(c, "") for c in CHEXPERT_COLUMNS[5:])]


def build_chexpert(base: Path) -> Path:
    """``base/CheXpert-v1.0`` with train.csv, valid.csv and one JPEG per row; returns that root."""
    root = base / "CheXpert-v1.0"
    for file_name, rows, first_seed in (
        ("train.csv", CHEXPERT_ROWS, 100),
        ("valid.csv", CHEXPERT_VALID_ROWS, 200),
    ):
        lines = [_chexpert_line(*row) for row in rows]
        write_csv(root / file_name, CHEXPERT_COLUMNS, lines)
        for seed, line in enumerate(lines, start=first_seed):
            write_image(root / line[0].split("/", 1)[1], make_pixels(seed))
    return root


# --- MIMIC-CXR-JPG 2.0.0 + MIMIC-IV patients ----------------------------------------------------------

MIMIC_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]  # fmt: skip
MIMIC_METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip
# (dicom_id, subject, study, ViewPosition, StudyDate, split)
MIMIC_IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "21800506", "train"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "21800506", "train"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "21810101", "train"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "AP", "21321014", "validate"),
    ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "10000898", "50771383", "PA", "21540101", "test"),
    ("fcb7ad49-8bc7e4b4-5e1d1e4e-7ae0e3b8-2e5c5a7d", "10000898", "50771383", "PA", "21540101", "test"),
    ("3b8a6e2f-1c1f3a2b-77e0a9d1-5b0c4e3a-9f8d7c6b", "11000011", "51111111", "AP", "21500303", "train"),
    ("4c9b7f30-2d2f4b3c-88f1bae2-6c1d5f4b-a09e8d7c", "12000022", "52222222", "PA", "21600707", "train"),
    ("5dac8041-3e305c4d-99f2cbf3-7d2e605c-b1af9e8d", "13000033", "53333333", "PA", "21701231", "train"),
]
MIMIC_LABELS = {  # (subject, study) -> {finding: value}; study 51111111 has no labels row
    ("10000032", "50414267"): {"No Finding": "1.0"},
    ("10000032", "53189527"): {"Cardiomegaly": "1.0", "Pleural Effusion": "0.0", "Edema": "-1.0"},
    ("10000764", "57375967"): {"Consolidation": "1.0", "Pneumonia": "1.0", "Atelectasis": "0.0"},
    ("10000898", "50771383"): {"Pleural Effusion": "1.0", "Atelectasis": "1.0"},
    ("12000022", "52222222"): {"Pneumonia": "0.0", "Support Devices": "1.0"},
    ("13000033", "53333333"): {"Atelectasis": "-1.0", "Cardiomegaly": "1.0"},
}
MIMIC_PATIENTS = [  # subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod; 12000022 absent
    ["10000032", "F", "52", "2180", "2014 - 2016", "2180-09-09"],
    ["10000764", "M", "86", "2132", "2014 - 2016", ""],
    ["10000898", "F", "24", "2153", "2008 - 2010", ""],
    ["11000011", "M", "40", "2150", "2011 - 2013", ""],
    ["13000033", "M", "60", "2165", "2017 - 2019", ""],
]


def build_mimic(base: Path) -> tuple[Path, Path]:
    """MIMIC-CXR-JPG tables (gzipped, as distributed) and JPEG tree; returns (root, patients.csv.gz)."""
    root = base / "mimic-cxr-jpg" / "2.0.0"
    write_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        MIMIC_METADATA_COLUMNS,
        [
            [dicom, subject, study, "CHEST (PA AND LAT)", view, "40", "32", date, "123456.789", "", "", ""]
            for dicom, subject, study, view, date, _ in MIMIC_IMAGES
        ],
        gz=True,
    )
    write_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz",
        ["subject_id", "study_id", *MIMIC_FINDINGS],
        [
            [subject, study, *(found.get(f, "") for f in MIMIC_FINDINGS)]
            for (subject, study), found in MIMIC_LABELS.items()
        ],
        gz=True,
    )
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[dicom, study, subject, split] for dicom, subject, study, _, _, split in MIMIC_IMAGES],
        gz=True,
    )
    for seed, (dicom, subject, study, *_rest) in enumerate(MIMIC_IMAGES, start=300):
        write_image(root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg", make_pixels(seed))
    patients = write_csv(
        base / "mimiciv" / "hosp" / "patients.csv.gz",
        ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
        MIMIC_PATIENTS,
        gz=True,
    )
    return root, patients


# --- NIH ChestX-ray14 ----------------------------------------------------------------------------------

# The official header splits "OriginalImage[Width,Height]" into two columns, and rows end with a comma.
CXR14_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
# (image, findings, follow-up, patient, age, gender, view, list)
CXR14_ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, "58", "M", "PA", "train"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, "58", "M", "PA", "train"),
    ("00000002_000.png", "No Finding", 0, 2, "81", "M", "AP", "train"),
    ("00000003_000.png", "Effusion|Pleural_Thickening", 0, 3, "74", "F", "PA", "test"),
    ("00000003_001.png", "Atelectasis|Effusion|Pneumonia", 1, 3, "75", "F", "AP", "test"),
    ("00000004_000.png", "Mass|Nodule", 0, 4, "148", "F", "PA", "train"),
    ("00000005_000.png", "Pneumonia|Infiltration", 0, 5, "69", "F", "AP", "train"),
    ("00000006_000.png", "Atelectasis", 0, 6, "22", "M", "PA", "train"),
    ("00000007_000.png", "No Finding", 0, 7, "34", "F", "PA", "train"),
    ("00000008_000.png", "Hernia", 0, 8, "60", "M", "PA", "train"),
    ("00000009_000.png", "No Finding", 0, 9, "45", "F", "PA", "train"),
    ("00000010_000.png", "Edema|Effusion", 0, 10, "50", "M", "AP", "train"),
]


def build_chestxray14(base: Path) -> Path:
    """Data_Entry_2017_v2020.csv, the two split lists and PNGs in the Kaggle ``images_00N/images/`` layout."""
    root = base / "chestxray14"
    root.mkdir(parents=True)
    lines = [CXR14_HEADER]
    for image, findings, follow_up, patient, age, gender, view, _ in CXR14_ROWS:
        lines.append(f"{image},{findings},{follow_up},{patient},{age},{gender},{view},2500,2048,0.143,0.143,")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    for list_name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        (root / list_name).write_text("".join(f"{row[0]}\n" for row in CXR14_ROWS if row[7] == split))
    for seed, row in enumerate(CXR14_ROWS, start=500):
        folder = "images_001" if seed % 2 else "images_002"
        write_image(root / folder / "images" / row[0], make_pixels(seed))
    return root


# --- PadChest ------------------------------------------------------------------------------------------

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_COLUMNS = [
    "", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "ReportID", "Report", "MethodLabel", "Labels",
    "Localizations",
]  # fmt: skip
# (image, dir, study date, patient, birth, sex, projection, labels)
PADCHEST_ROWS = [
    ("p01_a.png", 0, "20120118", "pat01", "1939.0", "M", "PA", "['pleural effusion', 'cardiomegaly']"),
    ("p01_b.png", 0, "20120118", "pat01", "1939.0", "M", "L", "['pleural effusion', 'cardiomegaly']"),
    ("p02_a.png", 0, "20150601", "pat02", "1990.0", "F", "PA", "['normal']"),
    (
        "p03_a.png",
        1,
        "20100310",
        "pat03",
        "1950.0",
        "F",
        "AP_horizontal",
        "[' lobar atelectasis', 'pneumonia']",
    ),
    ("p04_a.png", 1, "20140220", "pat04", "", "", "AP", "['atypical pneumonia', 'chronic changes']"),
    ("p05_a.png", 1, "20160101", "pat05", "2016.0", "F", "PA", "['loculated pleural effusion']"),
    ("p06_a.png", 0, "20130505", "pat06", "1945.0", "M", "COSTAL", "['rib fracture']"),
    ("p06_b.png", 0, "20130505", "pat06", "1945.0", "M", "PA", "['']"),
    ("p07_a.png", 1, "20110909", "pat07", "1960.0", "O", "PA", "['normal']"),
    ("p08_a.png", 0, "20090101", "pat08", "1970.0", "M", "AP", "['cardiomegaly', 'round atelectasis']"),
    ("p09_a.png", 1, "20170707", "pat09", "1980.0", "F", "PA", "['normal']"),
    ("p10_a.png", 0, "20120202", "pat10", "1930.0", "M", "PA", "['COPD signs', 'pleural effusion']"),
    ("p11_a.png", 1, "20120303", "pat11", "1955.0", "F", "PA", "['normal']"),
    # shapes seen in the released file: the literal 'nan' sex (4 rows), terms below a label in PadChest's
    # hierarchy, near-miss terms, 'normal' next to a finding, a patient whose sex and birth year disagree
    ("p12_a.png", 1, "20130101", "pat12", "1950.0", "nan", "PA", "['atelectasis basal']"),
    ("p13_a.png", 0, "20140101", "pat13", "1960.0", "F", "PA", "['hydropneumothorax']"),
    ("p13_b.png", 0, "20150101", "pat13", "1961.0", "M", "AP", "['empyema', 'pericardial effusion']"),
    (
        "p14_a.png",
        1,
        "20160101",
        "pat14",
        "1940.0",
        "M",
        "PA",
        "['pericardial effusion', 'costophrenic angle blunting', 'consolidation', 'volume loss']",
    ),
    ("p15_a.png", 1, "20100101", "pat15", "1945.0", "F", "PA", "['normal', 'pleural effusion']"),
    ("p15_b.png", 1, "20100101", "pat15", "1945.0", "F", "PA", "['normal', 'scoliosis']"),
]
PADCHEST_REPORTS = {  # quoted reports that span lines, as in the released file's Report column
    "p01_a.png": " derrame pleural bilateral .\n cardiomegalia .",
    "p03_a.png": " atelectasia lobar .\n\n neumonia basal derecha .\n",
    "p10_a.png": " signos de epoc .\n derrame pleural .",
}


def build_padchest(base: Path) -> Path:
    """The PadChest labels CSV (with its unnamed index column and multi-line quoted reports) and 16-bit PNGs in
    ``<ImageDir>/``."""
    root = base / "padchest"
    rows = [
        [i, image, folder, date, f"study{i}", patient, birth, sex, "", projection, "Manual", 4000 + i,
         PADCHEST_REPORTS.get(image, " sin hallazgos ."), "Physician", labels, "[]"]
        for i, (image, folder, date, patient, birth, sex, projection, labels) in enumerate(PADCHEST_ROWS)
    ]  # fmt: skip
    write_csv(root / PADCHEST_CSV, PADCHEST_COLUMNS, rows)
    for seed, (image, folder, *_rest) in enumerate(PADCHEST_ROWS, start=700):
        write_image(root / str(folder) / image, make_pixels(seed, high=4095))
    return root


def physical_line(path: Path, needle: str) -> int:
    """1-based line of the only physical line of a text file that contains ``needle``."""
    found = [number for number, text in enumerate(path.read_text().split("\n"), start=1) if needle in text]
    assert len(found) == 1, (needle, found)
    return found[0]


# --- VinDr-CXR 1.0.0 -----------------------------------------------------------------------------------

VINDR_FINDINGS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]  # fmt: skip
# train: image -> [(reader, positive findings)]; an empty list means that reader marked "No finding"
VINDR_TRAIN = {
    "000434271f63a053c4128a0ba6352c7f": [("R8", []), ("R9", []), ("R10", [])],
    "00053190460d56c53cc3e57321387478": [("R8", ["Cardiomegaly"]), ("R9", []), ("R10", ["Cardiomegaly"])],
    "0005e8e3701dfb1dd93d53e2ff537b6e": [
        ("R8", ["Pleural effusion", "Atelectasis"]),
        ("R9", ["Pneumonia", "Other diseases"]),
        ("R10", []),
    ],
    "0006e0a85696f6bb578e84fafa9a5607": [("R11", []), ("R12", []), ("R13", [])],
    "0007d316f756b3fa0baea2ff514ce945": [("R11", ["Aortic enlargement"]), ("R12", []), ("R13", [])],
    "000ae00eb3942d27e0b97903dd563a6e": [
        ("R8", ["Pleural effusion"]),
        ("R9", ["Pleural effusion"]),
        ("R10", []),
    ],
}
VINDR_TEST = {  # consensus labels
    "002a34c58c5b758217ed1f584ccbcfe9": ["Cardiomegaly", "Pleural effusion"],
    "004f33259ee4aef671c2b95d54e4be68": [],
}
VINDR_DICOM_TAGS = {  # image -> (PatientSex, PatientAge, PhotometricInterpretation)
    "000434271f63a053c4128a0ba6352c7f": ("F", "045Y", "MONOCHROME2"),
    "00053190460d56c53cc3e57321387478": ("M", "", "MONOCHROME1"),
    "0005e8e3701dfb1dd93d53e2ff537b6e": ("O", "000Y", "MONOCHROME2"),
    "0006e0a85696f6bb578e84fafa9a5607": ("M", "030M", "MONOCHROME2"),
    "0007d316f756b3fa0baea2ff514ce945": ("", "061Y", "MONOCHROME1"),
    "000ae00eb3942d27e0b97903dd563a6e": ("F", "072Y", "MONOCHROME2"),
    "002a34c58c5b758217ed1f584ccbcfe9": ("F", "058Y", "MONOCHROME2"),
    "004f33259ee4aef671c2b95d54e4be68": ("M", "X", "MONOCHROME2"),
}


def _vindr_row(found: list[str], columns: list[str]) -> list[int]:
    flags = [int(column in found) for column in columns]
    if not found:
        flags[columns.index("No finding")] = 1
    return flags


def build_vindr(base: Path) -> Path:
    """VinDr-CXR annotations (train file spells "Other diseases", test file "Other disease") and DICOMs."""
    root = base / "vindr-cxr" / "1.0.0"
    write_csv(
        root / "annotations" / "image_labels_train.csv",
        ["image_id", "rad_id", *VINDR_FINDINGS],
        [
            [image, reader, *_vindr_row(found, VINDR_FINDINGS)]
            for image, reads in VINDR_TRAIN.items()
            for reader, found in reads
        ],
    )
    test_columns = [c if c != "Other diseases" else "Other disease" for c in VINDR_FINDINGS]
    write_csv(
        root / "annotations" / "image_labels_test.csv",
        ["image_id", *test_columns],
        [[image, *_vindr_row(found, test_columns)] for image, found in VINDR_TEST.items()],
    )
    images = [("train", image) for image in VINDR_TRAIN] + [("test", image) for image in VINDR_TEST]
    for seed, (split, image) in enumerate(images, start=900):
        sex, age, photometric = VINDR_DICOM_TAGS[image]
        write_dicom(
            root / split / f"{image}.dicom",
            make_pixels(seed, high=4095),
            photometric=photometric,
            sex=sex,
            age=age,
        )
    return root


# --- VinDr-CXR, Kaggle VinBigData copy -----------------------------------------------------------------

VINDR_KAGGLE_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
VINDR_KAGGLE_CLASS_IDS = {"Aortic enlargement": 0, "Atelectasis": 1, "Cardiomegaly": 3, "Other lesion": 9,
                          "Pleural effusion": 10, "Pleural thickening": 11, "No finding": 14}  # fmt: skip
# image -> [(reader, [boxed classes, one row per box])]; an empty list is that reader's single "No finding" row
VINDR_KAGGLE_TRAIN = {
    "50a418190bc3fb1ef1633bf9678929b3": [("R11", []), ("R7", []), ("R9", [])],
    "9a5094b2563a1ef3ff50dc5c7ff71345": [
        ("R8", ["Cardiomegaly"]),
        ("R9", ["Cardiomegaly", "Aortic enlargement"]),
        ("R10", []),
    ],
    "051132a778e61a86eb147c7c6f564dfe": [
        ("R8", ["Pleural effusion", "Pleural effusion"]),
        ("R9", ["Atelectasis"]),
        ("R10", ["Pleural thickening"]),
    ],
    "1c32170b4af4ce1a3030eb8167753b06": [("R11", ["Other lesion"]), ("R12", []), ("R13", [])],
    "0c7a38f293d5f5e4846aa4ca6db4daf1": [("R8", []), ("R9", []), ("R10", [])],
}
VINDR_KAGGLE_TAGS = {  # image -> (PatientSex, PatientAge); Kaggle's DICOMs keep these tags, often blank
    "50a418190bc3fb1ef1633bf9678929b3": ("F", "045Y"),
    "9a5094b2563a1ef3ff50dc5c7ff71345": ("M", ""),
    "051132a778e61a86eb147c7c6f564dfe": ("", "061Y"),
    "1c32170b4af4ce1a3030eb8167753b06": ("M", "072Y"),
    "0c7a38f293d5f5e4846aa4ca6db4daf1": ("F", "030Y"),
}
VINDR_KAGGLE_TEST = ("002a34c58c5b758217ed1f584ccbcfe9",)  # unlabeled in the Kaggle copy


def build_vindr_kaggle(base: Path) -> Path:
    """The Kaggle VinBigData layout: train.csv (one row per reader and box), train/ and test/ DICOMs."""
    root = base / "vinbigdata-chest-xray-abnormalities-detection"
    rows = []
    for image, reads in VINDR_KAGGLE_TRAIN.items():
        for reader, boxes in reads:
            if not boxes:
                rows.append([image, "No finding", 14, reader, "", "", "", ""])
            for k, name in enumerate(boxes):
                rows.append([image, name, VINDR_KAGGLE_CLASS_IDS[name], reader, 691.0 + k, 1375.0, 1653.0, 1831.0])
    write_csv(root / "train.csv", VINDR_KAGGLE_COLUMNS, rows)
    write_csv(root / "sample_submission.csv", ["image_id", "PredictionString"],
              [[image, "14 1 0 0 1 1"] for image in VINDR_KAGGLE_TEST])  # fmt: skip
    for seed, (image, (sex, age)) in enumerate(VINDR_KAGGLE_TAGS.items(), start=1000):
        write_dicom(root / "train" / f"{image}.dicom", make_pixels(seed, high=4095), sex=sex, age=age)
    for seed, image in enumerate(VINDR_KAGGLE_TEST, start=1050):
        write_dicom(root / "test" / f"{image}.dicom", make_pixels(seed, high=4095))
    return root


# --- UKA-CXR -------------------------------------------------------------------------------------------

UKA_COLUMNS = [
    "image_id", "split", "age", "patient_sex", "cardiomegaly", "congestion", "pleural_effusion_right",
    "pleural_effusion_left", "pneumonic_infiltrates_right", "pneumonic_infiltrates_left", "atelectasis_right",
    "atelectasis_left", "healthy", "subject_id", "subset",
]  # fmt: skip
UKA_ROWS = [
    # image, split, age, sex, cardio, congestion, pe r/l, pi r/l, at r/l, healthy, subject, subset
    ["1001", "train", "63", "M", "3", "0", "0", "0", "0", "0", "0", "0", "0", "501", "p1"],
    ["1002", "train", "63", "M", "2", "1", "4", "0", "0", "0", "0", "2", "0", "501", "p1"],
    ["1003", "train", "80", "F", "0", "0", "0", "2", "0", "3", "0", "0", "0", "502", "p1"],
    ["1004", "valid", "45", "f", "5", "0", "1", "1", "1", "1", "3", "4", "0", "503", "p2"],
    ["1005", "test", "51", "male", "0", "0", "0", "0", "0", "0", "0", "0", "1", "504", "p2"],
    ["1006", "test", "", "", "4", "2", "3", "3", "0", "0", "0", "0", "0", "505", "p2"],
    ["1007", "train", "38", "Female", "1", "0", "0", "0", "4", "4", "0", "0", "0", "506", "p1"],
]


def build_uka(base: Path) -> Path:
    """A UKA master list and JPEGs in the group's ``UKA_preprocessed/<subset>/<image_id>.jpg`` layout."""
    root = base / "uka"
    write_csv(root / "master_list.csv", UKA_COLUMNS, UKA_ROWS)
    for seed, row in enumerate(UKA_ROWS, start=1100):
        write_image(root / "UKA_preprocessed" / row[14] / f"{row[0]}.jpg", make_pixels(seed))
    return root
