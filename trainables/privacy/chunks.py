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
    if size < 1 or (pad_multiple is not None and pad_multiple < 1):
        raise ValueError(f"physical chunk size and pad multiple must be >= 1, got {size} and {pad_multiple}")
    if len(x) != len(y):
        raise ValueError(f"a batch has {len(x)} images but {len(y)} label rows")
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size]
        n_real = len(xb)
        rows = padded_rows(n_real, size, pad_multiple)
        if rows > n_real:
            xb = torch.cat([xb, xb.new_zeros((rows - n_real, *xb.shape[1:]))])
            yb = torch.cat([yb, yb.new_zeros((rows - n_real, *yb.shape[1:]))])
        yield PhysicalChunk(xb, yb, n_real)
