"""Dataset names a sweep may use, and making sure a named dataset is prepared before trials start."""

from __future__ import annotations

from pathlib import Path

from trainables.data.adapters import ADAPTERS, PREPARABLE
from trainables.data.cache import MANIFEST_FILE
from trainables.data.labels import LABELS
from trainables.data.splits import check_split_current
from trainables.data.synthetic import SYNTHETIC_DATASETS, prepare_synthetic
from trainables.names import dataset_dir


def dataset_names() -> tuple[str, ...]:
    """Datasets a sweep may name: the synthetic twins and every preparable dataset that has all five labels."""
    return (*SYNTHETIC_DATASETS, *(name for name in PREPARABLE if not missing_labels(name)))


def missing_labels(name: str) -> tuple[str, ...]:
    """Study labels (in `LABELS` order) that dataset ``name`` cannot provide; () when it has all five.

    Such a dataset can be prepared and inspected (its card lists the missing labels and why), but its
    manifest column for a missing label is all 0 and means "unknown", so training or evaluating that label
    on it would be wrong. Known at the name, before anything is prepared.
    """
    adapter = ADAPTERS.get(name)
    if adapter is None:
        return ()
    return tuple(label for label in LABELS if label in adapter.missing_labels)


def check_dataset_name(name: str) -> None:
    """Raise ValueError unless a sweep may use dataset ``name`` (the message lists the valid names)."""
    missing = missing_labels(name)
    if missing:
        reasons = "; ".join(f"{label}: {ADAPTERS[name].missing_labels[label]}" for label in missing)
        raise ValueError(
            f"dataset {name!r} cannot provide label(s) {list(missing)} ({reasons}); a sweep trains and evaluates "
            f"all of {list(LABELS)}, so it cannot use this dataset; choose one of {dataset_names()}"
        )
    if name not in dataset_names():
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")


def ensure_prepared(name: str, data_root: Path, image_size: int, synthetic_images: int | None = None) -> Path:
    """The prepared cache folder of a dataset: synthetic twins are generated here; real datasets must
    have been prepared with `dpsweep prepare` (an error says the exact command otherwise), with the keyed split
    (`trainables.data.splits.StaleSplitError`, a ValueError, holds the command that re-splits an older one)."""
    check_dataset_name(name)
    if name in SYNTHETIC_DATASETS:
        return prepare_synthetic(name, data_root, size=image_size, n_images=synthetic_images)
    return prepared_folder(name, data_root, image_size)


def prepared_folder(name: str, data_root: Path, image_size: int) -> Path:
    """The cache folder of a real dataset prepared by `dpsweep prepare`, found without writing anything (an error
    says the exact command otherwise; `ensure_prepared`'s checks of a real dataset)."""
    folder = dataset_dir(data_root, name, image_size)
    if not (folder / MANIFEST_FILE).exists():
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared at {folder}; run `dpsweep prepare {name} --root /path/to/{name} "
            f"--size {image_size} --out {data_root}` first (see docs/datasets.md)"
        )
    check_split_current(folder)
    return folder
