"""The sweep files shipped in ``sweeps/``, as paths and as fresh dicts to edit (for the spec and config tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
SMOKE = SWEEPS / "smoke.yaml"
OPTUNA = SWEEPS / "optuna-smoke.yaml"
UNITS = SWEEPS / "units-smoke.yaml"
SELECTION = SWEEPS / "selection-smoke.yaml"


def smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def units_dict() -> dict:
    return yaml.safe_load(UNITS.read_text())


def edit(path: str, value: Any) -> dict:
    """`smoke_dict` with the field at the dotted ``path`` (e.g. ``"privacy.delta"``) set to ``value``."""
    raw = smoke_dict()
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw
