"""The small valid sweep the bad-input tests edit, and the assertion that a mistake is refused as it should be
(`tests/sweeps/test_bad_inputs.py`: the sweep file; `test_bad_environment.py`: where it runs)."""

from __future__ import annotations

import copy
import os
from typing import Any

BASE: dict[str, Any] = {
    "name": "bad-inputs",
    "data": {"train": "synthetic-a", "external": ["synthetic-b"], "image_size": 32, "synthetic_images": 60},
    "model": "test_convnext",
    "inits": ["random"],
    "privacy": {"target_epsilon": [1, 8], "expected_batch_size": 8, "epochs": 2},
}
"""A valid sweep: 60 synthetic images, so that the cases that get as far as planning plan in a moment."""


def edited(edits: dict[str, Any]) -> dict[str, Any]:
    """`BASE` with ``{"section.field": value}`` set (sections created as needed)."""
    raw = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def assert_refused(status: int, err: str, field: str, value: str | None) -> None:
    """Exit status 2 and one message on stderr, no traceback, naming ``field`` and ``value`` (None: no value)."""
    assert status == 2, err
    assert err.startswith("dpsweep: error: ") and err.count("dpsweep: error:") == 1, err
    assert "Traceback" not in err
    assert field in err, f"{field!r} not named in: {err}"
    if value is not None:
        assert value in err, f"value {value!r} not named in: {err}"


def paper_dry_run_status() -> int:
    """The exit status of ``dpsweep sweep sweeps/paper.yaml --dry-run`` without data or weights: 3 (planned, blocked by
    notes: data to prepare, weights to provide) on a machine that can run its trials (a GPU and 8 CPUs each), else 2
    (this machine cannot run them: `sweeps.preflight`'s refusal, after the plan)."""
    import torch

    return 3 if torch.cuda.device_count() >= 1 and (os.cpu_count() or 1) >= 8 else 2
