"""`tiny_spec`: the one small sweep the end-to-end tests run, with per-test overrides."""

from __future__ import annotations

import copy
import math
from typing import Any

import yaml

TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"train": "synthetic-a", "image_size": 32, "synthetic_images": 600},
    "model": "test_convnext",
    "inits": ["random"],
    "privacy": {"target_epsilon": [2, math.inf], "max_grad_norm": [1.0], "expected_batch_size": 64, "epochs": 2},
    "training": {"lr": [0.002]},
    "evaluation": {"n_boot": 10},
    "resources": {"cpu": 1},
}
"""Two trials (epsilon 2 and the non-private baseline) of timm's test_convnext on 32 px synthetic images."""


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """`TINY` with ``overrides`` merged in: a mapping merges into its section, anything else replaces the value,
    and None removes the key. ``tiny_spec(name="faults", privacy={"epochs": 3})``."""
    spec = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            section = spec[key]
            for inner, inner_value in value.items():
                if inner_value is None:
                    section.pop(inner, None)
                else:
                    section[inner] = inner_value
        else:
            spec[key] = value
    return spec


def tiny_yaml(**overrides: Any) -> str:
    """`tiny_spec` as sweep-file text."""
    return yaml.safe_dump(tiny_spec(**overrides), sort_keys=False)
