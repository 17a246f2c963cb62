"""Assertions the tests share (not a test module; ``conftest.py`` has pytest rewrite its asserts)."""

from __future__ import annotations

import math
from typing import Any

import torch


def assert_identical(actual: Any, expected: Any, where: str) -> None:
    """Bit-for-bit equality of nested dicts/lists/tuples of tensors and numbers (NaN equals NaN)."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys differ: {set(actual) ^ set(expected)}"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{where}: dtype/shape differ"
        assert torch.equal(actual, expected), f"{where}: values differ"
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), f"{where}: {actual!r} != nan"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
