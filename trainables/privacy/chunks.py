"""Physical chunks of a logical batch, of a few fixed shapes (the last chunk padded).

A Poisson-sampled logical batch has a new size every step. `physical_chunks` cuts it into chunks of ``size`` rows;
with ``pad_multiple`` the last, shorter chunk is completed with zero images and zero labels up to the next multiple of
``pad_multiple`` rows (at most ``size``), so chunks take at most ``size / pad_multiple`` shapes (``pad_multiple ==
size``: exactly one) and fewer than ``pad_multiple`` rows per step are wasted. Padding every batch to ``size``
would cost ``E[ceil(n / size)] size / B`` times the work (1.45x for an expected batch B = size = 32).

Only the first `PhysicalChunk.n_real` rows of a chunk are records: the engines take the loss of those rows only (a
padded row's loss gradient is exactly zero, not a zero-weighted value), and cut the per-sample rows to the real ones
before any norm, clip factor or sum (`trainables.privacy.engine.private_step`,
`trainables.privacy.bk.clipped_sum_step`). Padding therefore changes no released number and no accounting: the
logical batch size is the number of real records, and the accountant sees the same (sigma, q) step.

Patient-level batches (`patient_physical_chunks`) are cut only between patients (`patient_chunks`: a patient split
over two chunks would be clipped twice), so any chunk may be short; each is padded the same way, its padding rows
belonging to no patient.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PhysicalChunk:
    """One physical chunk: rows ``[0, n_real)`` of ``x``/``y`` are records, the rest (if any) padding.

    Attributes:
        x: images [size or fewer, ...]; y: labels, as many rows.
        n_real: how many leading rows are real records (>= 1).
    """

    x: torch.Tensor
    y: torch.Tensor
    n_real: int


def padded_rows(n_real: int, size: int, pad_multiple: int | None) -> int:
    """Rows a chunk of ``n_real`` records (<= ``size``) runs with: ``n_real`` rounded up to a multiple of
    ``pad_multiple``, at most ``size``; ``n_real`` itself without padding (``pad_multiple`` None)."""
    if pad_multiple is None:
        return n_real
    return min(size, -(-n_real // pad_multiple) * pad_multiple)


def physical_chunks(
    x: torch.Tensor, y: torch.Tensor, size: int, pad_multiple: int | None = None
) -> Iterator[PhysicalChunk]:
    """Cut a logical batch into chunks of ``size`` rows; the last one shorter, or zero-padded to `padded_rows`.

    An empty batch yields no chunk (it still takes a noisy, accounted step in the engines).

    Raises:
        ValueError: ``size`` or ``pad_multiple`` < 1, or ``x`` and ``y`` of different lengths.
    """
    _check_batch(x, y, size, pad_multiple)
    for start in range(0, len(x), size):
        yield padded_chunk(x[start : start + size], y[start : start + size], size, pad_multiple)


def padded_chunk(x: torch.Tensor, y: torch.Tensor, size: int, pad_multiple: int | None) -> PhysicalChunk:
    """The records ``x``/``y`` (at most ``size``) as one chunk, zero rows appended up to `padded_rows`."""
    n_real = len(x)
    rows = padded_rows(n_real, size, pad_multiple)
    if rows > n_real:
        x = torch.cat([x, x.new_zeros((rows - n_real, *x.shape[1:]))])
        y = torch.cat([y, y.new_zeros((rows - n_real, *y.shape[1:]))])
    return PhysicalChunk(x, y, n_real)


def patient_chunks(groups: np.ndarray | torch.Tensor, max_physical_batch_size: int) -> list[slice]:
    """Cut a patient-contiguous batch into chunks of whole patients, each at most ``max_physical_batch_size`` images.

    Args:
        groups: per image, its patient; a patient's images are adjacent (`trainables.privacy.patients.PatientIndex.
            gather`).

    Raises:
        ValueError: one patient has more images than ``max_physical_batch_size``.
    """
    groups = np.asarray(groups)
    if groups.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.r_[starts[1:], len(groups)]
    if (ends - starts).max() > max_physical_batch_size:
        raise ValueError(
            f"a patient has {(ends - starts).max()} images in the batch, more than "
            f"speed.max_physical_batch_size={max_physical_batch_size}; its images cannot share a chunk"
        )
    chunks, chunk_start = [], 0
    for start, end in zip(starts, ends, strict=True):
        if end - chunk_start > max_physical_batch_size:
            chunks.append(slice(chunk_start, int(start)))
            chunk_start = int(start)
    chunks.append(slice(chunk_start, len(groups)))
    return chunks


def patient_physical_chunks(
    x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, size: int, pad_multiple: int | None = None
) -> Iterator[tuple[PhysicalChunk, np.ndarray]]:
    """Chunks of whole patients (`patient_chunks`), each zero-padded to `padded_rows` when ``pad_multiple`` is given,
    with the patients of its real rows (``groups`` of those rows).

    Raises:
        ValueError: as `physical_chunks`, ``groups`` not one per image, or a patient larger than ``size``.
    """
    _check_batch(x, y, size, pad_multiple)
    groups = np.asarray(groups)
    if len(groups) != len(x):
        raise ValueError(f"a batch has {len(x)} images but {len(groups)} patient entries")
    for part in patient_chunks(groups, size):
        yield padded_chunk(x[part], y[part], size, pad_multiple), groups[part]


def _check_batch(x: torch.Tensor, y: torch.Tensor, size: int, pad_multiple: int | None) -> None:
    if size < 1 or (pad_multiple is not None and pad_multiple < 1):
        raise ValueError(f"physical chunk size and pad multiple must be >= 1, got {size} and {pad_multiple}")
    if len(x) != len(y):
        raise ValueError(f"a batch has {len(x)} images but {len(y)} label rows")
