"""Keyed splits: a patient's split depends on its own id and the dataset's key only.

Adding a patient moves nobody else (on the synthetic twin, on a fixture prepared twice and, in the slow tier, on
CheXpert's released metadata); the rule equals HMAC-SHA256 written out here; the fractions hold within binomial
tolerance; the key file is drawn once, reused, refused when wrong, and never written to the card or the console;
caches prepared with the former seeded split are refused with the command that re-splits them.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import json
import os
import shlex
import stat

import numpy as np
import pandas as pd
import pytest

from tests.data import fixtures
from trainables.data import splits as splits_module
from trainables.data import synthetic
from trainables.data.cache import CARD_FILE, MANIFEST_FILE, open_cache
from trainables.data.labels import SPLITS
from trainables.data.prepare import prepare_dataset
from trainables.data.registry import ensure_prepared
from trainables.data.splits import (
    FULLY_OFFICIAL,
    SPLIT_KEY_FILE,
    SplitKeyError,
    StaleSplitError,
    assign_splits,
    check_split_current,
    key_id,
    keyed_split,
    split_uniforms,
)
from trainables.data.synthetic import (
    GENERATOR_VERSION,
    SPLIT_FRACTIONS,
    generate_synthetic,
    prepare_synthetic,
    sample_cohort,
    synthetic_split_key,
)
from trainables.errors import UserError

SIZE = 16
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def reference_uniforms(key: bytes, patient_id: str) -> tuple[float, float]:
    """The rule of `trainables.data.splits` written out again: 53-bit uniforms from the first two 8-byte words."""
    hexdigest = hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return int(hexdigest[:16], 16) // 2**11 / 2**53, int(hexdigest[16:32], 16) // 2**11 / 2**53


def moved(before: pd.Series, after: pd.Series) -> list[str]:
    """Patients in both (patient id -> split) series whose split differs."""
    common = before.index.intersection(after.index)
    return sorted(common[before[common].to_numpy() != after[common].to_numpy()])


def patient_splits(folder) -> pd.Series:
    manifest = pd.read_parquet(folder / MANIFEST_FILE)
    per_patient = manifest.groupby("patient_id")["split"].agg(lambda s: set(s))
    assert (per_patient.map(len) == 1).all()
    return per_patient.map(lambda s: next(iter(s)))


# --- the rule ------------------------------------------------------------------------------------------


def test_rule_is_hmac_sha256_of_the_id_alone():
    ids = np.array(["p1", "p2", "patient00001", "Ü-17", "p1"])
    u_test, u_val = split_uniforms(ids, KEY)
    for patient, got_test, got_val in zip(ids, u_test, u_val, strict=True):
        assert (got_test, got_val) == reference_uniforms(KEY, patient)
    assert u_test[0] == u_test[-1] and u_val[0] == u_val[-1]  # every image of a patient: one split
    split = keyed_split(ids, KEY, test_fraction=0.2, val_fraction=0.1)
    expected = ["test" if t < 0.2 else "val" if v < 0.1 else "train" for t, v in zip(u_test, u_val, strict=True)]
    assert split.tolist() == expected
    # a patient's split does not depend on which other ids are passed with it
    alone = [keyed_split(np.array([patient]), KEY, test_fraction=0.2, val_fraction=0.1)[0] for patient in ids]
    assert alone == expected
    assert not np.array_equal(split_uniforms(ids, OTHER_KEY)[0], u_test)  # another key, other splits


def test_fractions_hold_within_binomial_tolerance_and_decisions_are_independent():
    ids = np.array([f"patient{i:06d}" for i in range(60_000)])
    for key in (KEY, OTHER_KEY):
        u_test, u_val = split_uniforms(ids, key)
        split = keyed_split(ids, key, test_fraction=0.2, val_fraction=0.1)
        n, test = len(ids), int((split == "test").sum())
        assert abs(test - 0.2 * n) < 4 * np.sqrt(n * 0.2 * 0.8)
        non_test = n - test
        val = int((split == "val").sum())
        assert abs(val - 0.1 * non_test) < 4 * np.sqrt(non_test * 0.1 * 0.9)
        # u_val is independent of the test decision: its rate below 0.1 is the same among test patients
        in_test = u_test < 0.2
        assert abs((u_val[in_test] < 0.1).mean() - 0.1) < 4 * np.sqrt(0.09 / in_test.sum())
        assert abs(np.corrcoef(u_test, u_val)[0, 1]) < 4 / np.sqrt(n)
        assert 0.0 <= u_test.min() and u_test.max() < 1.0


def test_official_splits_are_kept_and_validation_is_keyed():
    patients = np.array([f"p{i}" for i in range(200)] + ["t1", "t2"])
    official = np.array(["train"] * 200 + ["test"] * 2)
    split, method = assign_splits(patients, official, key=KEY, val_fraction=0.25, test_fraction=0.2)
    assert list(split[-2:]) == ["test", "test"] and (split[:200] != "test").all()
    _, u_val = split_uniforms(patients[:200], KEY)
    np.testing.assert_array_equal(split[:200] == "val", u_val < 0.25)
    assert method.startswith("official split; validation = training patients whose independent part")
    with_val = np.array(["train"] * 180 + ["val"] * 20 + ["test"] * 2)
    split, method = assign_splits(patients, with_val, key=KEY, val_fraction=0.25, test_fraction=0.2)
    np.testing.assert_array_equal(split, with_val)
    assert method == FULLY_OFFICIAL
    with pytest.raises(ValueError, match="official_split is given for 2 of 202"):
        assign_splits(patients, np.array([""] * 200 + ["test"] * 2), key=KEY, val_fraction=0.1, test_fraction=0.2)
    split, method = assign_splits(patients, np.full(len(patients), ""), key=KEY, val_fraction=0.1, test_fraction=0.2)
    np.testing.assert_array_equal(split, keyed_split(patients, KEY, test_fraction=0.2, val_fraction=0.1))
    assert "keyed patient-wise split" in method and "binomial" in method


# --- adding a patient moves nobody else ------------------------------------------------------------------


def test_synthetic_twin_adding_a_patient_moves_nobody():
    manifest, _ = sample_cohort("synthetic-a", seed=0)
    per_patient = manifest.drop_duplicates("patient_id").set_index("patient_id")["split"]
    ids = per_patient.index.to_numpy(dtype=str)
    key = synthetic_split_key("synthetic-a", 0)
    # the twin uses the keyed rule (attempt 0 at its default size), with val drawn among non-test patients
    twin = keyed_split(ids, key, test_fraction=0.2, val_fraction=0.1 / 0.8)
    np.testing.assert_array_equal(per_patient.to_numpy(), twin)
    with_one_more = keyed_split(np.append(ids, "synthetic-a-p99999"), key, test_fraction=0.2, val_fraction=0.125)
    assert moved(per_patient, pd.Series(with_one_more, index=np.append(ids, "synthetic-a-p99999"))) == []
    # The generator cannot add one patient without redrawing the cohort, but patients (ids) common to two cohort
    # sizes keep their split: 2,400 images share most patient ids with the default 2,500.
    smaller, _ = sample_cohort("synthetic-a", n_images=2400, seed=0)
    smaller_split = smaller.drop_duplicates("patient_id").set_index("patient_id")["split"]
    assert len(smaller_split.index.intersection(per_patient.index)) > 1000
    assert moved(per_patient, smaller_split) == []


def test_synthetic_twin_is_deterministic_and_fills_every_split():
    manifest, _ = sample_cohort("synthetic-a", seed=0)
    counts = manifest["split"].value_counts().to_dict()
    assert counts == {"train": 1777, "test": 461, "val": 262}  # the smoke sweep's N = 1777 training images
    assert manifest.loc[manifest["split"] == "train", "patient_id"].nunique() == 1047
    assert GENERATOR_VERSION == "2"
    for n_images in (10, 11, 12, 20, 30, 60):  # 4-30 patients: a later key fills a split the first leaves empty
        for seed in range(3):
            split = sample_cohort("synthetic-c", n_images=n_images, seed=seed)[0]["split"]
            assert set(split) == set(SPLITS), (n_images, seed)
    assert SPLIT_FRACTIONS == {"train": 0.7, "val": 0.1, "test": 0.2}


def test_an_old_synthetic_copy_is_regenerated(tmp_path):
    folder = prepare_synthetic("synthetic-b", tmp_path, size=32, n_images=40)
    card_path = folder / CARD_FILE
    manifest = pd.read_parquet(folder / MANIFEST_FILE)
    manifest["split"] = np.roll(manifest["split"].to_numpy(), 1)  # other splits, as a version-1 twin had
    manifest.to_parquet(folder / MANIFEST_FILE, index=False)
    card = json.loads(card_path.read_text())
    card["generator_version"] = "1"
    card["manifest_sha256"] = synthetic._manifest_digest(manifest)  # a consistent copy: only the version differs
    card_path.write_text(json.dumps(card))
    assert ensure_prepared("synthetic-b", tmp_path, 32, 40) == folder
    regenerated = pd.read_parquet(folder / MANIFEST_FILE)
    pd.testing.assert_series_equal(
        regenerated["split"], generate_synthetic("synthetic-b", size=32, n_images=40)[1]["split"]
    )
    assert json.loads(card_path.read_text())["generator_version"] == GENERATOR_VERSION


def add_chexpert_patient(root, patient: int) -> str:
    """Append one frontal image of a new patient to the fixture's train.csv (and write the image)."""
    line = fixtures._chexpert_line("train", patient, 1, "view1_frontal", "Male", "60", "Frontal", "PA",
                                   {"No Finding": "1.0"})  # fmt: skip
    with (root / "train.csv").open("a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow(line)
    fixtures.write_image(root / line[0].split("/", 1)[1], fixtures.make_pixels(patient))
    return f"patient{patient:05d}"


def run_prepare(root, out, *extra: str) -> int:
    from sweeps.cli import main

    args = ["prepare", "chexpert", "--root", str(root), "--size", str(SIZE), "--out", str(out), "--workers", "1"]
    return main([*args, *extra])


def test_fixture_adding_a_patient_and_preparing_again_with_the_key_moves_nobody(tmp_path):
    root = fixtures.build_chexpert(tmp_path / "src")
    key_file = fixtures.place_split_key(tmp_path / "keys", "chexpert")
    assert run_prepare(root, tmp_path / "release1", "--split-key", str(key_file)) == 0
    before = patient_splits(tmp_path / "release1" / "chexpert" / str(SIZE))
    new_patient = add_chexpert_patient(root, 9)
    kept_key = tmp_path / "release1" / "chexpert" / SPLIT_KEY_FILE  # the key beside the first preparation
    assert run_prepare(root, tmp_path / "release2", "--split-key", str(kept_key)) == 0
    after = patient_splits(tmp_path / "release2" / "chexpert" / str(SIZE))
    assert set(after.index) - set(before.index) == {new_patient}
    assert len(before) == 8 and moved(before, after) == []
    # the same key reused from beside the cache (no flag), in place of the first release
    assert run_prepare(root, tmp_path / "release1") == 0
    assert moved(before, patient_splits(tmp_path / "release1" / "chexpert" / str(SIZE))) == []


# --- the key file --------------------------------------------------------------------------------------


@pytest.fixture
def drawn_key(monkeypatch):
    """Make the key drawn by `prepare` the tests' fixed key (a random one could leave a tiny fixture's split empty)."""
    draws = []

    def urandom(n: int) -> bytes:
        draws.append(n)
        return fixtures.SPLIT_KEY[:n]

    monkeypatch.setattr(splits_module.os, "urandom", urandom)
    return draws


def test_key_is_drawn_once_kept_private_and_shared_by_every_size(tmp_path, capsys, drawn_key):
    root = fixtures.build_chexpert(tmp_path / "src")
    out = tmp_path / "data"
    assert run_prepare(root, out) == 0
    assert drawn_key == [32]
    key_file = out / "chexpert" / SPLIT_KEY_FILE
    assert key_file.read_bytes() == fixtures.SPLIT_KEY
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    card = json.loads((out / "chexpert" / str(SIZE) / CARD_FILE).read_text())
    assert card["split_key_id"] == hashlib.sha256(fixtures.SPLIT_KEY).hexdigest()[:16] == key_id(fixtures.SPLIT_KEY)
    assert "seed" not in card["settings"]

    # another size reuses the key: no new draw, same splits
    from sweeps.cli import main

    args = ["prepare", "chexpert", "--root", str(root), "--size", "8", "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    assert drawn_key == [32]
    assert moved(patient_splits(out / "chexpert" / str(SIZE)), patient_splits(out / "chexpert" / "8")) == []
    console = capsys.readouterr()
    assert f"split key id {key_id(fixtures.SPLIT_KEY)}" in console.out
    assert console.err.count(f"drew a new split key for chexpert: {key_file} (private") == 1  # where, never what

    key = fixtures.SPLIT_KEY
    secrets = [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key), str(list(key))]
    written = [
        console.out,
        console.err,
        *((folder / CARD_FILE).read_text() for folder in (out / "chexpert" / str(SIZE), out / "chexpert" / "8")),
        pd.read_parquet(out / "chexpert" / str(SIZE) / MANIFEST_FILE).to_csv(),
    ]
    for text in written:
        assert not any(secret in text for secret in secrets)


def test_bad_key_files_are_refused_before_reading_the_dataset(tmp_path, capsys):
    short = tmp_path / "short.key"
    short.write_bytes(bytes(31))
    missing = tmp_path / "missing.key"
    nowhere = tmp_path / "nowhere"  # no dataset: the key is checked first
    assert run_prepare(nowhere, tmp_path / "data", "--split-key", str(short)) == 2
    err = capsys.readouterr().err
    assert f"split key file {short} holds 31 bytes, not 32" in err and "Traceback" not in err
    assert run_prepare(nowhere, tmp_path / "data", "--split-key", str(missing)) == 2
    err = capsys.readouterr().err
    assert f"split key file {missing} cannot be read" in err and "leave --split-key out" in err
    with pytest.raises(SplitKeyError, match="holds 31 bytes") as error:
        prepare_dataset("chexpert", nowhere, out=tmp_path / "data", split_key=short)
    assert isinstance(error.value, UserError) and not (tmp_path / "data").exists()

    root = fixtures.build_chexpert(tmp_path / "src")
    out = tmp_path / "data"
    fixtures.place_split_key(out, "chexpert")
    (out / "chexpert" / SPLIT_KEY_FILE).write_bytes(b"not a key")  # a damaged key beside the cache
    assert run_prepare(root, out) == 2
    assert f"split key file {out / 'chexpert' / SPLIT_KEY_FILE} holds 9 bytes" in capsys.readouterr().err


def test_another_key_than_the_datasets_is_refused(tmp_path, capsys):
    root = fixtures.build_chexpert(tmp_path / "src")
    out = tmp_path / "data"
    fixtures.place_split_key(out, "chexpert")
    assert run_prepare(root, out) == 0
    other = tmp_path / "other.key"
    other.write_bytes(OTHER_KEY)
    assert run_prepare(root, out, "--split-key", str(other)) == 2
    err = capsys.readouterr().err
    assert f"already holds another key (id {key_id(fixtures.SPLIT_KEY)}, given {key_id(OTHER_KEY)})" in err
    assert (out / "chexpert" / SPLIT_KEY_FILE).read_bytes() == fixtures.SPLIT_KEY  # not overwritten

    # the key file lost: a new one would give this size's patients other splits than the prepared size
    (out / "chexpert" / SPLIT_KEY_FILE).unlink()
    assert run_prepare(root, out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'chexpert' / SPLIT_KEY_FILE} is missing, but 16 px (key id {key_id(fixtures.SPLIT_KEY)})" in err
    assert "Restore that key with --split-key FILE" in err
    assert not (out / "chexpert" / SPLIT_KEY_FILE).exists()
    restored = fixtures.place_split_key(tmp_path / "backup", "chexpert")
    assert run_prepare(root, out, "--split-key", str(restored)) == 0  # restoring it works
    assert (out / "chexpert" / SPLIT_KEY_FILE).read_bytes() == fixtures.SPLIT_KEY


# --- caches prepared with the former seeded split ------------------------------------------------------------


def make_old_format(folder) -> None:
    """Rewrite a card as the seeded split wrote it: no key id, a seed among the settings."""
    card = json.loads((folder / CARD_FILE).read_text())
    del card["split_key_id"]
    card["split_method"] = (
        "seeded patient-wise split: test = 0.2 of patients (seed 0); validation = 0.1 of training patients (seed 0)"
    )
    card["settings"]["seed"] = 0
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_old_seeded_split_is_refused_with_the_command_that_re_splits_it(tmp_path, drawn_key):
    root = fixtures.build_chexpert(tmp_path / "src")
    out = tmp_path / "data"
    assert run_prepare(root, out, "--uncertain", "zeros", "--letterbox") == 0
    folder = out / "chexpert" / str(SIZE)
    make_old_format(folder)
    (out / "chexpert" / SPLIT_KEY_FILE).unlink()  # caches from before had no key file
    command = f"dpsweep prepare chexpert --root {root} --size {SIZE} --out {out} --uncertain zeros --letterbox"
    for opener in (lambda: open_cache(folder), lambda: ensure_prepared("chexpert", out, SIZE)):
        with pytest.raises(StaleSplitError) as error:
            opener()
        message = str(error.value)
        assert message.endswith(f"Re-split it (this reads the images again): {command}")
        assert "seeded permutation" in message and isinstance(error.value, UserError | ValueError)

    from sweeps.cli import main

    assert main([*shlex.split(command)[1:], "--workers", "1"]) == 0  # the command as printed
    open_cache(folder)
    assert json.loads((folder / CARD_FILE).read_text())["split_key_id"] == key_id(fixtures.SPLIT_KEY)


def test_what_is_not_refused(tmp_path):
    official = tmp_path / "mimic-cxr" / "16"
    official.mkdir(parents=True)
    (official / CARD_FILE).write_text(json.dumps({"dataset": "mimic-cxr", "split_method": FULLY_OFFICIAL}))
    check_split_current(official)  # every split official: the same under both rules
    twin = prepare_synthetic("synthetic-a", tmp_path, size=32, n_images=20)
    check_split_current(twin)  # a twin card has no split method: it is regenerated by version instead
    check_split_current(tmp_path / "nothing-here")
    (official / CARD_FILE).write_text(
        json.dumps({"dataset": "vindr-cxr", "split_method": "official split; validation = 0.1 of training patients"})
    )
    with pytest.raises(StaleSplitError, match="dpsweep prepare vindr-cxr --root /path/to/dataset --size 16"):
        check_split_current(official)
