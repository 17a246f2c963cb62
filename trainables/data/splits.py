"""Patient-wise splits that do not depend on other patients: each patient's split from a keyed hash of its id.

Why not a seeded permutation: permuting all patients (dpsweep's former split) ties every patient's split to the
whole patient list. Adding one patient to a 5,000-patient table moved 1,347-1,984 others to another split, so the
published test rows and exact subgroup counts of two releases reveal who is in the dataset, whatever the
training epsilon. Here a patient's split is a function of its own id and a secret key only, so adding or removing
a patient moves nobody else (`tests/data/test_splits.py` adds one and counts zero moves).

The rule (`keyed_split`, `assign_splits`). For a patient id ``p`` (UTF-8) and the dataset's key ``k``, take
``d = HMAC-SHA256(k, p)``; ``u_test`` is the top 53 bits of ``d[0:8]`` (big endian) divided by 2^53 and ``u_val``
the same of ``d[8:16]``: two independent uniforms on [0, 1). The patient is in test when ``u_test <
test_fraction``; else in validation when ``u_val < val_fraction``; else in train. With an official test split
(kept as released) only the validation rule applies, to the official training patients; an official validation
split is kept too. Every image of a patient gets the patient's split, so splits are patient-disjoint.

Counts are binomial, not exact: P patients give Binomial(P, test_fraction) test patients (the card says so). A
split left empty is an error (`prepare`'s message names the fix).

The key. 32 bytes from ``os.urandom``, drawn once per dataset the first time it is prepared, and kept in
``<data_root>/<dataset>/split.key`` (`SPLIT_KEY_FILE`, mode 0600, written atomically and never overwritten)
beside the prepared caches, which every image size of the dataset shares, so every size has the same patients
in each split. Re-preparing (a new release with more patients, another size, another data root) reuses it:
the file beside the cache is read, or ``dpsweep prepare ... --split-key FILE`` copies a given one into place. The
key is private material, like the cache: with it and a patient id anyone can tell the patient's split. It is
never logged, printed or written to the card; the card records `key_id` (the first 16 hex digits of its
SHA-256), which tells whether two preparations used the same key and reveals nothing about it.

Caches prepared before (a card with a ``split_method`` but no ``split_key_id``) are refused where a sweep or trial
opens them (`check_split_current`), with the ``dpsweep prepare`` command that re-splits them; a fully official
split (official train, validation and test) is the same under both rules and stays usable.

Nested training subsets (``data.train_fraction``, `train_subset`). A trial on a fraction f of the training split
trains on the training patients (all of their images) whose subset uniform is below f: ``u_subset`` is the top 53
bits of ``HMAC-SHA256(k', patient id)[0:8]`` divided by 2^53, where ``k' = HMAC-SHA256(k, SUBSET_KEY_LABEL)`` is
derived from the split key under its own label, so it is independent of the split's uniforms (which hash the ids
under ``k`` itself). Validation and test are never subsampled. What holds, as for the split: a subset is whole
patients; the subsets of one key are nested (0.25 inside 0.5 inside 1); the seed, the trial and the other datasets
play no part; and a patient's membership depends on its own id and the key only, so adding or removing a patient
moves nobody else in or out of any subset. A trial's add/remove neighbours on the training split are therefore
add/remove neighbours (or equal) on its subset, and its guarantee carries over unchanged. (Taking the first
ceil(f x P) patients of a keyed order instead would give exact sizes, but adding one patient could push the
boundary patient out: neighbouring datasets would give subsets that differ in two patients.) Sizes are binomial,
about f x P patients; the subset's own N is what the planner uses and releases. A dataset without a key file (the
synthetic twin, whose split key is public anyway, or a cache written by other code) uses `public_subset_key` of its
name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from trainables.data.labels import SPLITS
from trainables.errors import UserError
from trainables.names import CARD_FILE

SPLIT_KEY_FILE = "split.key"
"""File name of a dataset's split key, in ``<data_root>/<dataset>/``, beside the prepared sizes."""
SPLIT_KEY_BYTES = 32
KEY_ID_HEX_DIGITS = 16
DEFAULT_VAL_FRACTION = 0.1
"""Share of training patients drawn for validation (where no official validation split exists)."""
DEFAULT_TEST_FRACTION = 0.2
"""Share of patients drawn for test (where no official split exists; the study's 20 %)."""
FULLY_OFFICIAL = "official split; official validation split"
"""The split method of a dataset whose three splits are all official (no key decides anything)."""
SUBSET_KEY_LABEL = b"dpsweep nested training subsets"
"""The label the subsets' key is derived under (`subset_uniforms`): a domain of its own beside the split's."""

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "FULLY_OFFICIAL",
    "SPLIT_KEY_BYTES",
    "SPLIT_KEY_FILE",
    "SplitKeyError",
    "StaleSplitError",
    "SubsetError",
    "assign_splits",
    "check_split_current",
    "key_id",
    "keyed_split",
    "public_subset_key",
    "read_split_key",
    "resolve_split_key",
    "resplit_command",
    "split_key_path",
    "split_uniforms",
    "subset_key",
    "subset_uniforms",
    "train_subset",
]


class SplitKeyError(UserError, ValueError):
    """A split key file is unreadable, of the wrong length, or disagrees with the dataset's prepared sizes."""


class StaleSplitError(UserError, ValueError):
    """A prepared dataset was split by the former seeded permutation; it must be re-split before use."""


# ---------------------------------------------------------------------------------------------------------
# The rule


def split_uniforms(patient_ids: np.ndarray, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The two independent uniforms on [0, 1) of each patient id under ``key`` (module docstring).

    Args:
        patient_ids: str [n] (repeats allowed: equal ids give equal values).
        key: the dataset's split key.

    Returns:
        (u_test, u_val), float64 [n] each.
    """
    ids = np.asarray(patient_ids, dtype=str)
    unique, inverse = np.unique(ids, return_inverse=True)
    u_test, u_val = np.empty(len(unique)), np.empty(len(unique))
    for i, patient in enumerate(unique.tolist()):
        digest = hmac.digest(key, patient.encode("utf-8"), "sha256")
        u_test[i] = (int.from_bytes(digest[0:8], "big") >> 11) / 2.0**53
        u_val[i] = (int.from_bytes(digest[8:16], "big") >> 11) / 2.0**53
    return u_test[inverse], u_val[inverse]


def keyed_split(patient_ids: np.ndarray, key: bytes, *, test_fraction: float, val_fraction: float) -> np.ndarray:
    """Each patient's split from its own id and ``key`` only: ``test`` when ``u_test < test_fraction``, else ``val``
    when ``u_val < val_fraction``, else ``train``.

    Args:
        patient_ids: str [n], one per image or per patient.
        key: the dataset's split key (any bytes; `SPLIT_KEY_BYTES` of them from ``os.urandom`` for real data).
        test_fraction: probability that a patient is in test.
        val_fraction: probability that a non-test patient is in validation (of *training* patients).

    Returns:
        str [n], ``train``/``val``/``test``. A split may be empty (counts are binomial): callers check.
    """
    u_test, u_val = split_uniforms(patient_ids, key)
    return np.where(u_test < test_fraction, "test", np.where(u_val < val_fraction, "val", "train"))


def assign_splits(
    patient_id: np.ndarray,
    official_split: np.ndarray,
    *,
    key: bytes,
    val_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray, str]:
    """Patient-disjoint train/val/test per image, official splits kept, the rest by `keyed_split`'s rule.

    Args:
        patient_id: str [n].
        official_split: str [n], each ``"train"``, ``"val"``, ``"test"``, or ``""`` for none (all or none).
        key: the dataset's split key.
        val_fraction: probability that a training patient is in validation (without an official validation split).
        test_fraction: probability that a patient is in test (only without an official split).

    Returns:
        (split per image, a one-line description of the method for the dataset card).
    """
    patient_id = np.asarray(patient_id, dtype=str)
    official = np.asarray(official_split, dtype=str)
    has_official = official != ""
    if has_official.any() and not has_official.all():
        raise ValueError(f"official_split is given for {int(has_official.sum())} of {len(official)} images only")
    u_test, u_val = split_uniforms(patient_id, key)
    if has_official.any():
        unknown = sorted(set(official) - set(SPLITS))
        if unknown:
            raise ValueError(f"official splits {unknown} are not in {SPLITS}")
        split = official.astype(object)
        method = "official split"
    else:
        split = np.where(u_test < test_fraction, "test", "train").astype(object)
        method = (
            f"keyed patient-wise split: a patient is in test when HMAC-SHA256(split key, patient id) maps below "
            f"{test_fraction:g} (each patient on its own: the count is binomial, about {test_fraction:g} of patients)"
        )
    if not (split == "val").any():
        split[(split == "train") & (u_val < val_fraction)] = "val"
        method += (
            f"; validation = training patients whose independent part of the hash maps below {val_fraction:g} "
            f"(binomial, about {val_fraction:g} of them)"
        )
    else:
        method += "; official validation split"
    return split.astype(str), method


# ---------------------------------------------------------------------------------------------------------
# Nested training subsets


class SubsetError(UserError, ValueError):
    """A training subset cannot be drawn: a bad fraction, or a real dataset whose split key file is missing."""


def subset_uniforms(patient_ids: np.ndarray, key: bytes) -> np.ndarray:
    """Each patient id's subset uniform on [0, 1) under ``key`` (module docstring): the top 53 bits of
    ``HMAC-SHA256(HMAC-SHA256(key, SUBSET_KEY_LABEL), id)[0:8]`` (big endian) divided by 2^53.

    Args:
        patient_ids: str [n] (repeats allowed: equal ids give equal values).
        key: the dataset's split key (`subset_key`).

    Returns:
        float64 [n].
    """
    order_key = hmac.digest(key, SUBSET_KEY_LABEL, "sha256")
    unique, inverse = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    values = np.empty(len(unique))
    for i, patient in enumerate(unique.tolist()):
        digest = hmac.digest(order_key, patient.encode("utf-8"), "sha256")
        values[i] = (int.from_bytes(digest[0:8], "big") >> 11) / 2.0**53
    return values[inverse]


def train_subset(patient_ids: np.ndarray, key: bytes, fraction: float) -> np.ndarray:
    """Which training images belong to the nested subset of ``fraction``: every image of the patients whose
    `subset_uniforms` value is below ``fraction`` (about ``fraction`` of the patients; binomial).

    Args:
        patient_ids: str [n], the training split's patient id per image.
        key: the dataset's split key (`subset_key`).
        fraction: in (0, 1]; 1 keeps every image.

    Returns:
        bool [n].

    Raises:
        SubsetError: ``fraction`` is not in (0, 1].
    """
    ids = np.asarray(patient_ids, dtype=str)
    if isinstance(fraction, bool) or not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise SubsetError(f"train_fraction = {fraction!r} must be a number in (0, 1], e.g. 0.25 (1: every patient)")
    if fraction == 1:
        return np.ones(len(ids), dtype=bool)
    return subset_uniforms(ids, key) < fraction


def public_subset_key(dataset: str) -> bytes:
    """The subsets' key of a dataset without a split key file: SHA-256 of a fixed text and its name (public)."""
    return hashlib.sha256(f"dpsweep public subset key\0{dataset}".encode()).digest()


def subset_key(data_root: str | Path, dataset: str) -> bytes:
    """The key that draws ``dataset``'s training subsets (`train_subset`): its split key file
    (`split_key_path`), or `public_subset_key` where it has none and no prepared size records a key (the synthetic
    twin; caches written by other code).

    Raises:
        SubsetError: a prepared size's card records a split key (``split_key_id``) but the key file is missing (the
            subsets would silently change); restore the key.
    """
    path = split_key_path(data_root, dataset)
    if path.exists():
        return read_split_key(path)
    for card_path in sorted((Path(data_root) / dataset).glob(f"*/{CARD_FILE}")):
        try:
            recorded = json.loads(card_path.read_text()).get("split_key_id")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded is not None:
            raise SubsetError(
                f"data.train_fraction on {dataset}: {path} is missing, but {card_path.parent} was split with a key "
                f"(id {recorded}), which also draws the nested training subsets; restore the dataset's "
                f"{SPLIT_KEY_FILE} there, or use data.train_fraction: 1"
            )
    return public_subset_key(dataset)


# ---------------------------------------------------------------------------------------------------------
# The key file


def split_key_path(data_root: str | Path, dataset: str) -> Path:
    """``<data_root>/<dataset>/split.key``: the one key of a dataset, shared by all its prepared sizes."""
    return Path(data_root) / dataset / SPLIT_KEY_FILE


def key_id(key: bytes) -> str:
    """The first `KEY_ID_HEX_DIGITS` hex digits of SHA-256(key): names a key in the card without revealing it."""
    return hashlib.sha256(key).hexdigest()[:KEY_ID_HEX_DIGITS]


def read_split_key(path: str | Path) -> bytes:
    """The key in ``path``; `SplitKeyError` naming the file and the fix when it is unreadable or not 32 bytes."""
    path = Path(path)
    try:
        key = path.read_bytes()
    except OSError as error:
        raise SplitKeyError(
            f"split key file {path} cannot be read ({error.strerror or error}); pass the dataset's split.key "
            f"(from an earlier preparation, <data_root>/<dataset>/{SPLIT_KEY_FILE}) or leave --split-key out to "
            "use the key beside the prepared dataset"
        ) from None
    if len(key) != SPLIT_KEY_BYTES:
        raise SplitKeyError(
            f"split key file {path} holds {len(key)} bytes, not {SPLIT_KEY_BYTES}: it is not a split key written by "
            f"`dpsweep prepare`; pass the dataset's own {SPLIT_KEY_FILE} (copied byte for byte)"
        )
    return key


def resolve_split_key(dataset_folder: Path, given: str | Path | None = None) -> tuple[bytes, str]:
    """The dataset's split key, from ``given``, else its key file, else drawn now; it is in the key file after this.

    Args:
        dataset_folder: ``<data_root>/<dataset>`` (holds the prepared sizes and `SPLIT_KEY_FILE`).
        given: a key file to reuse (``--split-key``); copied into place when the dataset has none yet.

    Returns:
        (key, how it was obtained, for a message: ``"given"``, ``"reused"`` or ``"drawn"``).

    Raises:
        SplitKeyError: ``given`` is unreadable or malformed; the dataset already has another key; the key file is
            malformed; or sizes of the dataset were prepared with another key than the one to be used (the key file
            was lost or replaced), which would give the sizes different splits.
    """
    target = dataset_folder / SPLIT_KEY_FILE
    if given is not None:
        key, how = read_split_key(given), "given"
        if target.exists() and read_split_key(target) != key:
            raise SplitKeyError(
                f"--split-key {given}: {target} already holds another key (id {key_id(read_split_key(target))}, "
                f"given {key_id(key)}); the sizes prepared there were split with it. Leave --split-key out to "
                f"reuse it, or delete {dataset_folder} (every prepared size and the key) to start over with the "
                "given key"
            )
    elif target.exists():
        key, how = read_split_key(target), "reused"
    else:
        key, how = os.urandom(SPLIT_KEY_BYTES), "drawn"
    _check_prepared_sizes(dataset_folder, key, how)
    if not target.exists():
        _write_key(target, key)
        key = read_split_key(target)  # a concurrent preparation may have written its key first: use that one
    return key, how


def _check_prepared_sizes(dataset_folder: Path, key: bytes, how: str) -> None:
    """Refuse a key other than the one the dataset's prepared sizes were split with."""
    others = {}
    for card_path in sorted(dataset_folder.glob(f"*/{CARD_FILE}")):
        try:
            recorded = json.loads(card_path.read_text()).get("split_key_id")
        except (OSError, ValueError):
            continue
        if recorded is not None and recorded != key_id(key):
            others[card_path.parent.name] = recorded
    if not others:
        return
    sizes = ", ".join(f"{size} px (key id {recorded})" for size, recorded in others.items())
    if how == "drawn":
        problem = f"{dataset_folder / SPLIT_KEY_FILE} is missing, but {sizes} was split with a key"
    else:
        problem = f"the {how} split key (id {key_id(key)}) is not the one {sizes} was split with"
    raise SplitKeyError(
        f"{problem}; every size of a dataset must share one key. Restore that key with --split-key FILE, or "
        f"delete the prepared sizes under {dataset_folder} to re-split everything with a new one"
    )


def _write_key(target: Path, key: bytes) -> None:
    """Write ``key`` to ``target`` with mode 0600, atomically, never replacing an existing file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, target)  # fails if a key appeared meanwhile: the first one written wins
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Caches from before


def check_split_current(folder: Path) -> None:
    """Refuse a prepared real dataset split by the former seeded permutation (see the module docstring).

    Synthetic twins, caches without a card and caches written by other code (no ``split_method``) pass; so do
    cards with a ``split_key_id`` and fully official splits.

    Raises:
        StaleSplitError: with the exact ``dpsweep prepare`` command that re-splits the dataset.
    """
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(card, dict) or card.get("synthetic") or "split_method" not in card:
        return
    if "split_key_id" in card or card["split_method"] == FULLY_OFFICIAL:
        return
    raise StaleSplitError(
        f"{folder} was split by the former seeded permutation of all patients ({card['split_method']}), where "
        "adding or removing one patient moves many others, so its published splits reveal who is in the dataset. "
        f"Re-split it (this reads the images again): {resplit_command(card, folder)}"
    )


def resplit_command(card: dict[str, Any], folder: Path) -> str:
    """The ``dpsweep prepare`` command that prepares ``folder`` again with the settings its card records."""
    settings = card.get("settings", {})
    words = [
        "dpsweep",
        "prepare",
        str(card.get("dataset", folder.parent.name)),
        "--root",
        str(card.get("root", "/path/to/dataset")),
        "--size",
        str(settings.get("size", folder.name)),
        "--out",
        str(folder.parent.parent),
    ]
    if settings.get("uncertain", "drop") != "drop":
        words += ["--uncertain", str(settings["uncertain"])]
    if settings.get("letterbox"):
        words.append("--letterbox")
    if settings.get("equalize") is False:
        words.append("--no-equalize")
    for option, value in settings.get("adapter_options", {}).items():
        words += [f"--{option.replace('_', '-')}", str(value)]
    command = shlex.join(words)
    fractions = {
        "val_fraction": settings.get("val_fraction", DEFAULT_VAL_FRACTION),
        "test_fraction": settings.get("test_fraction", DEFAULT_TEST_FRACTION),
    }
    if fractions != {"val_fraction": DEFAULT_VAL_FRACTION, "test_fraction": DEFAULT_TEST_FRACTION}:
        command += f" (its fractions {fractions} are not the defaults: pass them to prepare_dataset from Python)"
    return command
