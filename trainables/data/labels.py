"""The study's harmonized label set and demographic codings, shared by every dataset."""

from __future__ import annotations

import numpy as np

LABELS: tuple[str, ...] = ("atelectasis", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding")
"""The five study labels, in the fixed column order of every label matrix."""

SEXES: tuple[str, ...] = ("F", "M", "unknown")
"""Normalized sex codes in cache manifests."""

SPLITS: tuple[str, ...] = ("train", "val", "test")


def label_pos_weight(mode: str, train_labels: np.ndarray) -> np.ndarray | None:
    """Per-label positive weights for BCE, float64 [k], or None for none.

    ``uniform``: none. ``train``: negatives/positives on the training split, as the study did; this reads
    label counts of the private training set outside the DP mechanism, so such runs are tagged
    ``pos_weight=train`` and the guarantee covers the model updates only.
    """
    if mode == "uniform":
        return None
    if mode == "train":
        positives = train_labels.sum(axis=0)
        return (len(train_labels) - positives) / np.maximum(positives, 1)
    raise ValueError(f"pos_weight={mode!r}; choose 'uniform' or 'train'")
