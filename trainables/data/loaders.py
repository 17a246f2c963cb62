"""Torch views of the cache: datasets and loaders read uint8 rows from the memmap, never image files."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from trainables.config import TrialConfig
from trainables.data.cache import SplitData, open_cache
from trainables.names import dataset_dir


class CacheSplitDataset(Dataset):
    """One split as (image, labels): image float32 [1, H, W], labels float32 [n_labels].

    Pixels are scaled to [0, 1], then ``(x - mean) / std`` with fixed, public constants (default 0 and 1:
    the study's plain [0, 1] inputs). No augmentation, as in the study under DP.
    """

    def __init__(self, split: SplitData, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"input std must be > 0, got {std}")
        self.split = split
        self.mean, self.std = mean, std

    def _pixels(self, rows) -> torch.Tensor:
        pixels = np.asarray(self.split.images[rows], dtype=np.float32) / 255.0
        if self.mean != 0.0 or self.std != 1.0:
            pixels = (pixels - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(pixels)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pixels(self.split.rows[i])[None], torch.tensor(self.split.labels[i])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather several rows at once (sorted reads from the memmap are the fast path)."""
        return self._pixels(self.split.rows[indices])[:, None], torch.tensor(self.split.labels[indices])


def evaluation_batches(dataset: CacheSplitDataset, batch_size: int):
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
    """Open the trial's dataset (train, val, test) and the test split of each external dataset."""

    def dataset(name: str, split: str) -> CacheSplitDataset:
        cache = open_cache(dataset_dir(cfg.data_root, name, cfg.image_size))
        return CacheSplitDataset(cache.split(split), mean=cfg.input_mean, std=cfg.input_std)

    return TrialData(
        *(dataset(cfg.dataset, s) for s in ("train", "val", "test")),
        external={name: dataset(name, "test") for name in cfg.external_datasets},
    )
