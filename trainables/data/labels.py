"""The study's harmonized label set and demographic codings, shared by every dataset."""

from __future__ import annotations

LABELS: tuple[str, ...] = ("atelectasis", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding")
"""The five study labels, in the fixed column order of every label matrix."""

SEXES: tuple[str, ...] = ("F", "M", "unknown")
"""Normalized sex codes in cache manifests."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
