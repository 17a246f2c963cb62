"""Finding a trial's secret randomness in files, byte for byte: in text (logs, tables, JSON) and in binary files
(pickles, torch checkpoints: torch saves uncompressed zip records)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

_MT_HEADER_BYTES = 24  # torch's CPU generator state: initial seed, left, seeded, next; then the 624 state words


def seed_spellings(seed: int) -> set[bytes]:
    """How a file could hold a secret seed: the decimal and hex text of the seed and of its 64-bit words (shorter
    pieces would match digits of unrelated numbers by chance), and the little-endian bytes pickle stores an integer
    as (``LONG1``: low byte first, as few bytes as the value needs, then perhaps a sign byte)."""
    words = {seed} | {(seed >> shift) & 0xFFFF_FFFF_FFFF_FFFF for shift in (0, 64)}
    forms = {form.encode() for word in words if word > 2**40 for form in (str(word), f"{word:x}")}
    return forms | {seed.to_bytes((seed.bit_length() + 7) // 8, "little")}


def generator_spellings(state: torch.Tensor) -> set[bytes]:
    """A few 32-byte windows of a CPU generator's state (`torch.Generator.get_state`) in its state words, as a
    checkpoint stores the tensor."""
    raw = bytes(state.numpy())
    return {raw[start : start + 32] for start in range(_MT_HEADER_BYTES, len(raw) - 32, 1024)}


def found_in(paths: Iterable[Path], spellings: set[bytes]) -> dict[str, list[bytes]]:
    """File -> the spellings it contains, for the files that contain any."""
    found = {}
    for path in paths:
        data = path.read_bytes()
        hits = sorted(s for s in spellings if s in data)
        if hits:
            found[str(path)] = hits
    return found
