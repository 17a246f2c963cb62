"""The prepare pipeline: preprocessing numbers, splits, uncertain policy, resumability and the card."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.data import fixtures
from trainables.data import preprocess
from trainables.data.adapters import ADAPTERS, PREPARABLE
from trainables.data.cache import CARD_FILE, IMAGES_FILE, MANIFEST_FILE, open_cache
from trainables.data.prepare import (
    PARTIAL_DIR,
    DatasetError,
    PrepareInterrupted,
    apply_uncertain_policy,
    format_card,
    prepare_dataset,
)
from trainables.data.preprocess import (
    PreprocessSettings,
    UnreadableImage,
    equalize_histogram,
    load_and_preprocess,
    min_max_scale,
    preprocess_pixels,
    read_image,
    resize,
    to_uint8,
)

SIZE = 16


# --- preprocessing -------------------------------------------------------------------------------------


def test_equalize_histogram_hand_computed():
    # histogram 0:2, 1:3, 2:1, 3:2 -> cdf 2, 5, 6, 8; (cdf - 2) * 255 / 6 = 0, 127.5, 170, 255 (127.5 -> 128)
    image = np.array([[0, 0, 1, 1], [1, 2, 3, 3]], dtype=np.uint8)
    expected = np.array([[0, 0, 128, 128], [128, 170, 255, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(equalize_histogram(image), expected)


def test_equalize_histogram_invariants():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(equalize_histogram(ramp), ramp)  # a flat histogram is a fixed point
    constant = np.full((4, 4), 77, dtype=np.uint8)
    np.testing.assert_array_equal(equalize_histogram(constant), constant)
    rng = np.random.default_rng(0)
    content = rng.integers(0, 120, size=(8, 8)).astype(np.uint8)
    content[0, 0] = 0
    out = equalize_histogram(content)
    assert out.min() == 0 and out.max() == 255
    order = np.argsort(content.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # monotone in the input
    padded = np.zeros((8, 20), dtype=np.uint8)
    padded[:, 6:14] = content
    # extra pixels at the minimum (letterbox padding) leave the mapping of the others unchanged
    np.testing.assert_array_equal(equalize_histogram(padded)[:, 6:14], out)


def test_min_max_scale_and_quantization():
    np.testing.assert_allclose(min_max_scale(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0, 0.2])), [0, 128, 255, 51])
    with pytest.raises(UnreadableImage, match="blank image"):
        min_max_scale(np.full((3, 3), 7.0))


def test_resize_stretches_and_letterbox_pads():
    tall = np.zeros((40, 20))
    tall[20:] = 100.0  # bottom half bright
    stretched = resize(tall, SIZE)
    assert stretched.shape == (SIZE, SIZE)
    assert stretched[0].max() == 0 and stretched[-1].min() == 100  # not transposed
    boxed = preprocess_pixels(tall, PreprocessSettings(size=SIZE, letterbox=True, equalize=False))
    assert boxed.shape == (SIZE, SIZE)
    assert (boxed[:, :4] == 0).all() and (boxed[:, 12:] == 0).all()  # 20/40 * 16 = 8 columns, centred
    assert boxed[-1, 4:12].min() == 255 and boxed[0, 4:12].max() == 0


def test_read_16bit_png_rgb_jpeg_and_corrupt_files(tmp_path):
    sixteen = fixtures.make_pixels(1, high=4095)
    np.testing.assert_array_equal(read_image(fixtures.write_image(tmp_path / "a.png", sixteen)), sixteen)
    rgb = np.stack([fixtures.make_pixels(2)] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb[..., 0])  # equal channels: luma = value
    fixtures.write_image(tmp_path / "b.jpg", fixtures.make_pixels(3))
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(UnreadableImage, match="unreadable image"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UnreadableImage, match="unreadable image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(UnreadableImage, match="file not found"):
        read_image(tmp_path / "missing.png")


def test_dicom_monochrome1_is_inverted_and_missing_pixels_rejected(tmp_path):
    pixels = fixtures.make_pixels(4, high=4095)
    mono2 = read_image(fixtures.write_dicom(tmp_path / "m2.dcm", pixels))
    mono1 = read_image(fixtures.write_dicom(tmp_path / "m1.dicom", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono2, pixels)
    np.testing.assert_array_equal(mono1, pixels.max() - pixels.astype(np.float64))
    settings = PreprocessSettings(size=SIZE, equalize=False)
    total = preprocess_pixels(mono1, settings).astype(int) + preprocess_pixels(mono2, settings).astype(int)
    assert np.abs(total - 255).max() <= 1 and (total == 255).mean() > 0.9  # +-1 only at rounding ties
    fixtures.write_dicom(tmp_path / "empty.dcm", None)
    with pytest.raises(UnreadableImage, match="DICOM without pixel data"):
        read_image(tmp_path / "empty.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(UnreadableImage, match="unreadable DICOM"):
        read_image(tmp_path / "junk.dcm")


def test_settings_validation():
    with pytest.raises(ValueError, match="size must be"):
        PreprocessSettings(size=4)


# --- uncertain policy (splits: tests/data/test_splits.py) ----------------------------------------------


def test_uncertain_policies():
    labels = np.array([[1, 0, -1, 0, 0], [0, 1, 0, 0, 0], [-1, -1, 1, 0, 0]], dtype=np.int8)
    dropped, keep = apply_uncertain_policy(labels, "drop")
    np.testing.assert_array_equal(keep, [False, True, False])
    np.testing.assert_array_equal(dropped[keep], [[0, 1, 0, 0, 0]])
    zeros, keep = apply_uncertain_policy(labels, "zeros")
    assert keep.all()
    np.testing.assert_array_equal(zeros, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
    ones, _ = apply_uncertain_policy(labels, "ones")
    np.testing.assert_array_equal(ones, [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    with pytest.raises(DatasetError, match="'maybe' is not one of"):
        apply_uncertain_policy(labels, "maybe")


def test_images_per_patient_and_inconsistent_patients_hand_computed():
    from trainables.data.prepare import images_per_patient, inconsistent_patients

    # 100 patients: 97 with 1 image, 2 with 3, 1 with 9 -> nearest-rank p99 = the 99th smallest count = 3
    patients = np.array([f"p{i:03d}" for i in range(97)] + ["q1"] * 3 + ["q2"] * 3 + ["r"] * 9)
    assert images_per_patient(patients) == {"patients": 100, "min": 1, "median": 1.0, "p99": 3, "max": 9}
    assert images_per_patient(np.array(["a", "b", "b", "c", "c", "c"])) == {
        "patients": 3, "min": 1, "median": 2.0, "p99": 3, "max": 3
    }  # fmt: skip
    patient = np.array(["a", "a", "a", "b", "b", "c", "c", "d"])
    sex = np.array(["F", "F", "M", "M", "unknown", "F", "M", "F"])
    birth = np.array(["1940", "1940", "1940", "1950", "1951", "", "1960", "1970"])
    assert inconsistent_patients(patient, {"sex": sex, "birth": birth, "none": np.full(8, "x")}) == {
        "sex": {"patients": 2, "examples": ["a: F x2, M x1", "c: F x1, M x1"]},  # b: unknown is not a value
        "birth": {"patients": 1, "examples": ["b: 1950 x1, 1951 x1"]},  # c: a blank is not a value
    }


# --- the whole pipeline --------------------------------------------------------------------------------


@pytest.fixture
def chexpert_root(tmp_path):
    return fixtures.build_chexpert(tmp_path / "src")


def _prepare(root, out, **kwargs):
    fixtures.place_split_key(out, "chexpert")
    return prepare_dataset("chexpert", root, size=SIZE, out=out, workers=kwargs.pop("workers", 1), **kwargs)


def _card_without_timing(folder):
    card = json.loads((folder / CARD_FILE).read_text())
    assert set(card.pop("prepare_timing")) == {
        "workers", "images", "seconds", "images_per_second", "images_per_second_per_worker"
    }  # fmt: skip
    return card


def _assert_same_cache(a, b):
    assert (a / IMAGES_FILE).read_bytes() == (b / IMAGES_FILE).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(a / MANIFEST_FILE), pd.read_parquet(b / MANIFEST_FILE))
    assert _card_without_timing(a) == _card_without_timing(b)  # the timing of the run is the only difference


def test_resume_after_stop_after_matches_uninterrupted_run(chexpert_root, tmp_path, monkeypatch):
    reference = _prepare(chexpert_root, tmp_path / "ref")
    out = tmp_path / "data"
    with pytest.raises(PrepareInterrupted, match="stopped after 3 images"):
        _prepare(chexpert_root, out, stop_after=3)
    partial = out / "chexpert" / str(SIZE) / PARTIAL_DIR
    with np.load(partial / "progress.npz") as progress:
        assert (progress["status"] == 1).sum() == 3
    assert not (out / "chexpert" / str(SIZE) / IMAGES_FILE).exists()

    calls = []
    real = preprocess.load_and_preprocess
    monkeypatch.setattr(preprocess, "load_and_preprocess", lambda path, s: calls.append(path) or real(path, s))
    result = _prepare(chexpert_root, out)
    assert len(calls) == 8 - 3  # only the images not done before
    assert not partial.exists()
    _assert_same_cache(result, reference)


def test_resume_after_keyboard_interrupt(chexpert_root, tmp_path, monkeypatch):
    reference = _prepare(chexpert_root, tmp_path / "ref")
    real = preprocess.load_and_preprocess
    calls = []

    def interrupted(path, settings):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, settings)

    monkeypatch.setattr(preprocess, "load_and_preprocess", interrupted)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        _prepare(chexpert_root, out)
    with np.load(out / "chexpert" / str(SIZE) / PARTIAL_DIR / "progress.npz") as progress:
        assert (progress["status"] == 1).sum() == 4  # flushed on the way out
    monkeypatch.setattr(preprocess, "load_and_preprocess", real)
    _assert_same_cache(_prepare(chexpert_root, out), reference)


def test_partial_work_for_other_settings_is_discarded(chexpert_root, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(PrepareInterrupted):
        _prepare(chexpert_root, out, stop_after=2)
    result = _prepare(chexpert_root, out, equalize=False)
    _assert_same_cache(result, _prepare(chexpert_root, tmp_path / "ref", equalize=False))


def test_worker_processes_do_not_change_the_result(chexpert_root, tmp_path):
    parallel = _prepare(chexpert_root, tmp_path / "parallel", workers=2)
    _assert_same_cache(parallel, _prepare(chexpert_root, tmp_path / "serial", workers=1))


def test_cache_rows_are_the_preprocessed_source_images(chexpert_root, tmp_path):
    settings = PreprocessSettings(size=SIZE, letterbox=True, equalize=True)
    cache = open_cache(_prepare(chexpert_root, tmp_path / "data", letterbox=True))
    assert cache.images.shape == (8, SIZE, SIZE) and cache.images.dtype == np.uint8
    for row, source in enumerate(cache.manifest["source_path"]):
        np.testing.assert_array_equal(cache.images[row], load_and_preprocess(chexpert_root / source, settings))


def test_split_does_not_depend_on_uncertain_policy(chexpert_root, tmp_path):
    dropped = open_cache(_prepare(chexpert_root, tmp_path / "drop")).manifest.set_index("image_id")
    kept = open_cache(_prepare(chexpert_root, tmp_path / "zeros", uncertain="zeros")).manifest.set_index("image_id")
    assert len(kept) == 12 and len(dropped) == 8
    pd.testing.assert_series_equal(kept.loc[dropped.index, "split"], dropped["split"])


def test_card_lists_skipped_images(chexpert_root, tmp_path):
    broken = chexpert_root / "train/patient00003/study1/view1_frontal.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    (chexpert_root / "train/patient00008/study1/view1_frontal.jpg").unlink()
    out = _prepare(chexpert_root, tmp_path / "data")
    card = json.loads((out / CARD_FILE).read_text())
    reasons = {entry["source_path"]: entry["reason"] for entry in card["skipped"]}
    assert card["n_skipped"] == 2 and card["n_images"] == 6
    assert reasons["train/patient00008/study1/view1_frontal.jpg"] == "file not found"
    assert reasons["train/patient00003/study1/view1_frontal.jpg"].startswith("unreadable image")
    assert card["excluded"] == {"lateral view": 2, "uncertain label (policy drop)": 4}
    assert card["uncertain_labels_before_policy"] == {
        "atelectasis": 1, "cardiomegaly": 0, "pleural_effusion": 1, "pneumonia": 2, "no_finding": 0
    }  # fmt: skip
    assert card["settings"]["uncertain"] == "drop" and card["splits"]["test"]["patients"] == 1  # SPLIT_KEY
    assert sum(entry["sex"]["F"] for entry in card["demographics"].values()) == card["sex"]["F"]
    manifest = open_cache(out).manifest
    assert set(reasons).isdisjoint(manifest["source_path"])
    text = format_card(card)
    assert "skipped 2 image(s):" in text and "train/patient00008/study1/view1_frontal.jpg: file not found" in text
    assert "excluded: lateral view: 2; uncertain label (policy drop): 4" in text


def test_prepare_command_prints_the_card_once(chexpert_root, tmp_path, capsys):
    from sweeps.cli import main

    out = tmp_path / "data"
    key = fixtures.place_split_key(tmp_path / "keys", "chexpert")
    args = ["prepare", "chexpert", "--root", str(chexpert_root), "--size", str(SIZE), "--out", str(out)]
    assert main([*args, "--workers", "1", "--uncertain", "zeros", "--split-key", str(key)]) == 0
    text = capsys.readouterr().out
    card = json.loads((out / "chexpert" / str(SIZE) / CARD_FILE).read_text())
    assert text == format_card(card) + "\n" + f"prepared: {out / 'chexpert' / str(SIZE)}\n"
    assert text.count("chexpert (CheXpert v1.0) at 16 px") == 1
    # 12 frontal images of 10 patients; patients 2 and 6 have two each: nearest-rank p99 = 10th of 10 = 2
    assert "images per patient: min 1, median 1, p99 2, max 2" in text
    assert "preprocessed 12 image(s) in" in text and "with 1 worker(s)" in text


def test_format_card_truncates_long_skip_lists():
    card = {
        "dataset": "x",
        "skipped": [{"source_path": f"{i}.png", "reason": "file not found"} for i in range(30)],
    }
    text = format_card(card, max_skipped=5)
    assert "4.png: file not found" in text and "5.png" not in text and "... and 25 more" in text


# --- registry and settings errors ----------------------------------------------------------------------


def test_registry_names_and_unknown_names(tmp_path):
    assert PREPARABLE == (
        "chexpert", "mimic-cxr", "chestxray14", "padchest", "vindr-cxr", "uka-cxr", "vindr-cxr-kaggle"
    )  # fmt: skip
    assert set(ADAPTERS) == set(PREPARABLE)
    with pytest.raises(DatasetError, match=r"unknown dataset 'chexpret'; preparable datasets: \['chexpert'"):
        prepare_dataset("chexpret", tmp_path)


def test_unknown_adapter_option_and_missing_root(chexpert_root, tmp_path):
    with pytest.raises(DatasetError, match=r"chexpert: unknown adapter option\(s\) \['patients_csv'\]"):
        _prepare(chexpert_root, tmp_path / "data", patients_csv="x.csv")
    _prepare(chexpert_root, tmp_path / "data", patients_csv=None)  # None = not given
    with pytest.raises(DatasetError, match="dataset root .*nowhere does not exist"):
        _prepare(tmp_path / "nowhere", tmp_path / "data")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"uncertain": "maybe"}, "uncertain must be one of"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
        ({"test_fraction": 1.5}, r"test_fraction must be in \(0, 1\), got 1.5"),
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"size": 3}, "size must be an integer number of pixels >= 8"),
    ],
)
def test_bad_settings_fail_before_reading(tmp_path, setting, message):
    with pytest.raises(DatasetError, match=message):
        prepare_dataset("chexpert", tmp_path / "nowhere", out=tmp_path, **setting)


def test_too_small_dataset_reports_empty_split(chexpert_root, tmp_path):
    with pytest.raises(DatasetError, match=r"split\(s\) \['val'\] would be empty"):
        _prepare(chexpert_root, tmp_path / "data", val_fraction=0.01)
