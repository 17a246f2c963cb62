"""Torch views of the cache: datasets and loaders read uint8 rows from the memmap, never image files."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainables.data.cache import SplitData


class CacheSplitDataset(Dataset):
    """One split as (image, labels): image float32 [1, H, W] in [0, 1], labels float32 [n_labels].

    No mean/std normalization and no augmentation, as in the study under DP.
    """

    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.asarray(self.split.images[self.split.rows[i]], dtype=np.float32) / 255.0
        return torch.from_numpy(pixels)[None], torch.tensor(self.split.labels[i])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather several rows at once (sorted reads from the memmap are the fast path)."""
        rows = self.split.rows[indices]
        pixels = np.asarray(self.split.images[rows], dtype=np.float32) / 255.0
        return torch.from_numpy(pixels)[:, None], torch.tensor(self.split.labels[indices])


def evaluation_batches(dataset: CacheSplitDataset, batch_size: int):
    """Sequential (x, y) batches over a whole split, for evaluation."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield dataset.batch(np.arange(start, min(start + batch_size, n)))


def shuffled_loader(dataset: CacheSplitDataset, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Non-private loader: a seeded shuffle, fixed batch size (the non-private baseline and pretraining)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
