"""Physical chunks of a logical batch, optionally of one fixed shape (the last chunk padded).

A Poisson-sampled logical batch has a new size every step. `physical_chunks` cuts it into chunks of at most
``size`` rows; with ``pad`` every chunk has exactly ``size`` rows, the last one completed with zero images and zero
labels. Only the first `PhysicalChunk.n_real` rows of a chunk are records: the engines take the loss of those rows
only (a padded row's loss gradient is exactly zero, not a zero-weighted value), and cut the per-sample rows to the
real ones before any norm, clip factor or sum (`trainables.privacy.engine.private_step`,
`trainables.privacy.bk.clipped_sum_step`). Padding therefore changes no released number and no accounting: the
logical batch size is the number of real records, and the accountant sees the same (sigma, q) step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


def physical_chunks(x: torch.Tensor, y: torch.Tensor, size: int, pad: bool) -> Iterator[PhysicalChunk]:
    """Cut a logical batch into chunks of ``size`` rows (the last one shorter, or zero-padded to ``size``).

    An empty batch yields no chunk (it still takes a noisy, accounted step in the engines).

    Raises:
        ValueError: ``size`` < 1 or ``x`` and ``y`` of different lengths.
    """
    if size < 1:
        raise ValueError(f"physical chunk size must be >= 1, got {size}")
    if len(x) != len(y):
        raise ValueError(f"a batch has {len(x)} images but {len(y)} label rows")
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size]
        n_real = len(xb)
        if pad and n_real < size:
            xb = torch.cat([xb, xb.new_zeros((size - n_real, *xb.shape[1:]))])
            yb = torch.cat([yb, yb.new_zeros((size - n_real, *yb.shape[1:]))])
        yield PhysicalChunk(xb, yb, n_real)
