"""Torch views of the cache: datasets and loaders read uint8 rows from the memmap, never image files.

Training batches come from a `TrainBatches` source: the split's uint8 pixels held on the trial's device
(`DeviceImages`, ``speed.data_on_device``; normalised there) or gathered and normalised on the host (`HostImages`,
pinned and copied asynchronously when the device is a GPU). Both normalise with `normalise`, the same float32
operations, so the numbers are the same whichever source a trial uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from trainables.config import TrialConfig
from trainables.data.cache import SplitData, open_cache
from trainables.data.splits import subset_key, train_subset
from trainables.names import dataset_dir

DATA_ON_DEVICE_BUDGET = 0.1
"""``speed.data_on_device: auto`` holds a training split on a GPU when its uint8 pixels take at most this fraction
of the device's total memory (0.1 of an H200 is ~14 GB: NIH ChestX-ray14's training split at 224 px is ~4 GB). Set
``off`` when several trials share a GPU and memory is tight, ``on`` to force it."""


def normalise(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels -> float32 ``(pixels / 255 - mean) / std``, on the pixels' device (every step float32, so the
    CPU result is the same wherever the pixels were gathered)."""
    x = pixels.to(torch.float32) / 255.0
    if mean != 0.0 or std != 1.0:
        x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x


class CacheSplitDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split as (image, labels): image float32 [1, H, W], labels float32 [n_labels].

    Pixels are scaled to [0, 1], then ``(x - mean) / std`` with fixed, public constants (default 0 and 1:
    the study's plain [0, 1] inputs). No augmentation, as in the study under DP.
    """

    def __init__(self, split: SplitData, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"input std must be > 0, got {std}")
        self.split = split
        self.mean, self.std = mean, std

    def _pixels(self, rows: np.ndarray | np.integer[Any]) -> torch.Tensor:
        return normalise(torch.from_numpy(np.asarray(self.split.images[rows], dtype=np.uint8)), self.mean, self.std)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pixels(self.split.rows[i])[None], torch.tensor(self.split.labels[i])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather several rows at once (sorted reads from the memmap are the fast path)."""
        return self._pixels(self.split.rows[indices])[:, None], torch.tensor(self.split.labels[indices])


class TrainBatches(Protocol):
    """Where a trial's training batches come from: ``batch(indices)`` -> (images float32 [n, 1, H, W], labels
    float32 [n, n_labels]) on the trial's device, rows in ascending index order."""

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class HostImages:
    """Batches gathered from the memmap and normalised on the host (`CacheSplitDataset.batch`, sorted reads);
    pinned and copied without blocking when the device is a GPU, so the copy overlaps the previous step (the step
    loop never waits for the device)."""

    def __init__(self, dataset: CacheSplitDataset, device: torch.device) -> None:
        self.dataset, self.device = dataset, device

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.batch(np.sort(indices))
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class DeviceImages:
    """The whole split's uint8 pixels and float32 labels held on the device; batches gathered and normalised there
    (one small index copy per batch, no pixel traffic)."""

    def __init__(self, dataset: CacheSplitDataset, device: torch.device) -> None:
        split = dataset.split
        self.dataset, self.device = dataset, device
        self.pixels = torch.from_numpy(np.asarray(split.images[split.rows], dtype=np.uint8)).to(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(split.labels)).to(device)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.from_numpy(np.sort(indices).astype(np.int64))
        if self.device.type == "cuda":
            order = order.pin_memory()  # a pageable copy would wait for the device
        order = order.to(self.device, non_blocking=True)
        return normalise(self.pixels[order], self.dataset.mean, self.dataset.std)[:, None], self.labels[order]


def split_pixel_bytes(dataset: CacheSplitDataset) -> int:
    """Bytes of the split's uint8 pixels (what `DeviceImages` holds on the device)."""
    images = dataset.split.images
    return int(len(dataset) * int(np.prod(images.shape[1:])) * images.itemsize)


def train_batches(dataset: CacheSplitDataset, device: torch.device, data_on_device: str) -> TrainBatches:
    """The training batch source for ``speed.data_on_device`` (``auto``: on a GPU when the split's pixels take at
    most `DATA_ON_DEVICE_BUDGET` of its memory; never on the CPU, where the memmap is already in host memory)."""
    if data_on_device == "on":
        return DeviceImages(dataset, device)
    if data_on_device == "auto" and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if split_pixel_bytes(dataset) <= DATA_ON_DEVICE_BUDGET * total:
            return DeviceImages(dataset, device)
    return HostImages(dataset, device)


def evaluation_batches(dataset: CacheSplitDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (x, y) batches over a whole split, for evaluation."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield dataset.batch(np.arange(start, min(start + batch_size, n)))


@dataclass
class TrialData:
    """The splits one trial uses, as memory-mapped datasets (their ``split`` holds the demographics)."""

    train: CacheSplitDataset
    val: CacheSplitDataset
    test: CacheSplitDataset
    external: dict[str, CacheSplitDataset] = field(default_factory=dict)


def load_trial_data(cfg: TrialConfig) -> TrialData:
    """Open the trial's dataset (train, val, test) and the test split of each external dataset; the training split
    is the nested subset of ``cfg.train_fraction`` of its patients (`trainables.data.splits.train_subset`)."""

    def dataset(name: str, split: str) -> CacheSplitDataset:
        cache = open_cache(dataset_dir(cfg.data_root, name, cfg.image_size))
        return CacheSplitDataset(cache.split(split), mean=cfg.input_mean, std=cfg.input_std)

    train = dataset(cfg.dataset, "train")
    if cfg.train_fraction < 1:
        keep = train_subset(train.split.patient_id, subset_key(cfg.data_root, cfg.dataset), cfg.train_fraction)
        train = CacheSplitDataset(train.split.take(keep), mean=cfg.input_mean, std=cfg.input_std)
    return TrialData(
        train=train,
        val=dataset(cfg.dataset, "val"),
        test=dataset(cfg.dataset, "test"),
        external={name: dataset(name, "test") for name in cfg.external_datasets},
    )
