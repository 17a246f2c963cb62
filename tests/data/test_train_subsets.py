"""Nested training subsets (``data.train_fraction``): whole patients below f under a keyed hash with a label of its
own (independent of the split decisions), nested, about f x P of them, and nobody moves when a patient is added."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math

import numpy as np
import pytest

from trainables.data.splits import (
    SPLIT_KEY_FILE,
    SUBSET_KEY_LABEL,
    SubsetError,
    keyed_split,
    public_subset_key,
    subset_key,
    subset_uniforms,
    train_subset,
)
from trainables.errors import UserError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def images_of(n_patients: int, seed: int = 0) -> np.ndarray:
    """Patient ids per image: 1-4 images per patient, images of different patients interleaved."""
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"p{i:04d}" for i in range(n_patients)], rng.integers(1, 5, n_patients))
    return ids[rng.permutation(len(ids))]


def reference_uniform(key: bytes, patient_id: str) -> float:
    """The rule written out again: 53 bits of HMAC-SHA256 under HMAC-SHA256(key, label)."""
    order_key = hmac.new(key, SUBSET_KEY_LABEL, hashlib.sha256).digest()
    return int(hmac.new(order_key, patient_id.encode(), hashlib.sha256).hexdigest()[:16], 16) // 2**11 / 2**53


def test_the_uniform_is_hmac_of_the_id_under_the_derived_key():
    ids = np.array(["b", "a", "c", "a", "d"])
    assert subset_uniforms(ids, KEY).tolist() == [reference_uniform(KEY, p) for p in ids]
    assert (train_subset(ids, KEY, 0.5) == (subset_uniforms(ids, KEY) < 0.5)).all()


@pytest.mark.parametrize("n_patients", [1, 7, 2000])
def test_subsets_are_whole_patients_nested_and_about_f_p(n_patients):
    ids = images_of(n_patients)
    previous = np.zeros(len(ids), dtype=bool)
    for fraction in FRACTIONS:
        mask = train_subset(ids, KEY, fraction)
        kept = set(ids[mask].tolist())
        assert not kept & set(ids[~mask].tolist())  # no patient split across the subset's edge
        assert (mask >= previous).all()  # nested: the smaller subset lies inside
        sd = math.sqrt(n_patients * fraction * (1 - fraction))
        assert abs(len(kept) - fraction * n_patients) <= 4 * sd  # binomial(P, f) patients
        previous = mask
    assert previous.all()  # fraction 1 keeps every image


def test_the_key_decides_and_the_call_does_not():
    ids = images_of(300)
    half = train_subset(ids, KEY, 0.5)
    assert (train_subset(ids[::-1], KEY, 0.5) == half[::-1]).all()  # the images' order plays no part
    assert (train_subset(ids, KEY, 0.5) == half).all()  # no seed, no state: the same subset every time
    assert not (train_subset(ids, OTHER_KEY, 0.5) == half).all()


def test_the_order_is_independent_of_the_split_decisions():
    """Under one key, membership of the half subset is uncorrelated with the split hash's test decision."""
    patients = np.array([f"q{i:05d}" for i in range(4000)])
    in_half = train_subset(patients, KEY, 0.5)
    in_test = keyed_split(patients, KEY, test_fraction=0.5, val_fraction=0.0) == "test"
    agreement = (in_half == in_test).mean()
    assert abs(agreement - 0.5) < 4 * 0.5 / math.sqrt(len(patients))  # 4 standard errors


def test_adding_a_patient_moves_nobody_else_in_or_out_of_any_subset():
    ids = images_of(200)
    for extra in (f"new{i}" for i in range(30)):
        grown = np.append(ids, [extra, extra])
        for fraction in FRACTIONS:
            before = set(ids[train_subset(ids, KEY, fraction)].tolist())
            after = set(grown[train_subset(grown, KEY, fraction)].tolist())
            assert after - {extra} == before


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, math.nan, math.inf, True, "0.5", None])
def test_bad_fractions_are_refused(fraction):
    with pytest.raises(SubsetError, match="train_fraction") as error:
        train_subset(np.array(["a"]), KEY, fraction)
    assert isinstance(error.value, UserError)


def test_the_key_is_the_split_key_file_else_public_and_a_lost_key_is_refused(tmp_path):
    assert subset_key(tmp_path, "synthetic-a") == public_subset_key("synthetic-a") != public_subset_key("b")
    (tmp_path / "real" / "64").mkdir(parents=True)
    (tmp_path / "real" / "64" / "card.json").write_text(json.dumps({"split_key_id": "0123456789abcdef"}))
    with pytest.raises(SubsetError, match=f"restore the dataset's {SPLIT_KEY_FILE}"):
        subset_key(tmp_path, "real")
    (tmp_path / "real" / SPLIT_KEY_FILE).write_bytes(KEY)
    assert subset_key(tmp_path, "real") == KEY


def test_a_trial_loads_the_nested_subset_of_its_training_split_and_whole_val_and_test(tmp_path):
    from tests.factories import TINY_DATASET, TINY_SIZE, prepare_tiny_site
    from trainables.config import PrivacyConfig, TrialConfig
    from trainables.data.cache import open_cache
    from trainables.data.loaders import load_trial_data

    prepare_tiny_site(tmp_path)
    full = open_cache(tmp_path / TINY_DATASET / str(TINY_SIZE)).split("train")
    n_patients = len(set(full.patient_id.tolist()))

    base = TrialConfig(
        sweep="s",
        dataset=TINY_DATASET,
        data_root=str(tmp_path),
        model="test_convnext",
        init="random",
        image_size=TINY_SIZE,
        privacy=PrivacyConfig(target_epsilon=math.inf),
    )

    data = {f: load_trial_data(dataclasses.replace(base, train_fraction=f)) for f in (0.25, 0.5, 1.0)}
    patients = {f: set(d.train.split.patient_id.tolist()) for f, d in data.items()}
    assert 0 < len(patients[0.25]) < len(patients[0.5]) < len(patients[1.0]) == n_patients
    assert patients[0.25] <= patients[0.5] <= patients[1.0]
    keep = train_subset(full.patient_id, public_subset_key(TINY_DATASET), 0.5)
    assert (data[0.5].train.split.rows == full.rows[keep]).all()  # the twin's public key, rows in split order
    assert (data[0.5].train.split.labels == full.labels[keep]).all()
    for split in ("val", "test"):
        assert (getattr(data[0.25], split).split.rows == getattr(data[1.0], split).split.rows).all()


@pytest.mark.parametrize("fraction", [0.0, 1.01, math.nan, -1.0])
def test_a_trial_config_refuses_a_fraction_outside_0_1(fraction):
    from trainables.config import ConfigError, PrivacyConfig, TrialConfig

    with pytest.raises(ConfigError, match=r"train_fraction = .* must be a number in \(0, 1\]"):
        TrialConfig(
            sweep="s",
            dataset="d",
            data_root="/d",
            model="m",
            init="random",
            privacy=PrivacyConfig(target_epsilon=math.inf),
            train_fraction=fraction,
        )


def test_the_flat_config_carries_the_fraction_only_below_1():
    from trainables.config import PrivacyConfig, TrialConfig

    base = dict(sweep="s", dataset="d", data_root="/d", model="m", init="random")
    whole = TrialConfig(**base, privacy=PrivacyConfig(target_epsilon=math.inf))
    quarter = TrialConfig(**base, privacy=PrivacyConfig(target_epsilon=math.inf), train_fraction=0.25)
    assert "train_fraction" not in whole.to_flat()
    assert quarter.to_flat()["train_fraction"] == 0.25
    assert TrialConfig.from_flat(quarter.to_flat()) == quarter and TrialConfig.from_flat(whole.to_flat()) == whole


def test_both_batch_sources_gather_the_subsets_rows(tmp_path):
    import torch

    from tests.factories import TINY_DATASET, TINY_SIZE, prepare_tiny_site
    from trainables.config import PrivacyConfig, TrialConfig
    from trainables.data.loaders import DeviceImages, HostImages, load_trial_data

    prepare_tiny_site(tmp_path)
    config = TrialConfig(
        sweep="s",
        dataset=TINY_DATASET,
        data_root=str(tmp_path),
        model="test_convnext",
        init="random",
        image_size=TINY_SIZE,
        privacy=PrivacyConfig(target_epsilon=math.inf),
        train_fraction=0.5,
    )
    train = load_trial_data(config).train
    indices = np.array([len(train) - 1, 0, 3])
    host, device = (kind(train, torch.device("cpu")).batch(indices) for kind in (HostImages, DeviceImages))
    assert all(torch.equal(a, b) for a, b in zip(host, device, strict=True))
    assert torch.equal(host[1], torch.from_numpy(train.split.labels[np.sort(indices)]))
