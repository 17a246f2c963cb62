"""Dataset names a sweep may use, and making sure a named dataset is prepared before trials start."""

from __future__ import annotations

from pathlib import Path

from trainables.data.adapters import PREPARABLE
from trainables.data.cache import MANIFEST_FILE
from trainables.data.synthetic import SYNTHETIC_DATASETS, prepare_synthetic
from trainables.names import dataset_dir


def dataset_names() -> tuple[str, ...]:
    return (*SYNTHETIC_DATASETS, *PREPARABLE)


def check_dataset_name(name: str) -> None:
    if name not in dataset_names():
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")


def ensure_prepared(name: str, data_root: Path, image_size: int, synthetic_images: int | None = None) -> Path:
    """The prepared cache folder of a dataset: synthetic twins are generated here; real datasets must
    have been prepared with `dpsweep prepare` (an error says the exact command otherwise)."""
    check_dataset_name(name)
    if name in SYNTHETIC_DATASETS:
        return prepare_synthetic(name, data_root, size=image_size, n_images=synthetic_images)
    folder = dataset_dir(data_root, name, image_size)
    if not (folder / MANIFEST_FILE).exists():
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared at {folder}; run `dpsweep prepare {name} --root /path/to/{name} "
            f"--size {image_size} --out {data_root}` first (see docs/datasets.md)"
        )
    return folder
