"""The study's harmonized label set (defined by the schema, `trainables.names.LABELS`) and demographic codings,
shared by every dataset."""

from __future__ import annotations

from trainables.names import LABELS

__all__ = ["LABELS", "SEXES", "SPLITS"]

SEXES: tuple[str, ...] = ("F", "M", "unknown")
"""Normalized sex codes in cache manifests."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
