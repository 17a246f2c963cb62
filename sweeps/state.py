"""What ``runs/<sweep>/sweep.json`` records of a sweep, and what a new run of it may change.

``sweep.json`` (`SweepState`) holds the state format, the fingerprint and the settings themselves
(`sweeps.plan.spec_settings`: everything that defines the trials), the status (running, incomplete, complete), the
instance (the sweep's runs in the privacy ledger) and the sweep's **parts**: the trial keys of its first grid and of
each extension, each its own Ray experiment (`analysis.tables.ray_part_dir`) with its own status.

A sweep file run again under the same name either has the same settings (the sweep resumes, or is complete), or
**extends** it: values added to the grid axes that define new trials and leave the old ones as they were
(`EXTENDABLE`, with the ``init_weights`` entries and the ``pretrain`` section of an init the old trials did not use),
which then run as a new part of the same sweep. Any other change (`setting_changes`, `refusal`) is refused, naming
each changed field with its old and new value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXTENDABLE = (
    "privacy.target_epsilon",
    "privacy.max_grad_norm",
    "training.lr",
    "training.seed",
    "inits",
    "data.train_fraction",
)
"""Sweep-file fields whose added values extend a sweep: each adds trials and leaves every old trial's config and key
as they were (a trial on the whole training split has no fraction in its key). Not ``model``, ``data.train`` or
``privacy.privacy_unit``: a second value of one of those renames every trial (its key gains the model, the dataset or
the unit)."""
DEFAULT_TRAIN_FRACTION = [1.0]
"""``data.train_fraction`` of settings that do not record it (`sweeps.plan.spec_settings` leaves the default out)."""
DOMAIN_INIT = "domain"  # the init the `pretrain:` section makes
SETTINGS_FIELDS = {
    "axes.target_epsilon": "privacy.target_epsilon",
    "axes.max_grad_norm": "privacy.max_grad_norm",
    "axes.lr": "training.lr",
    "axes.seed": "training.seed",
    "axes.privacy_unit": "privacy.privacy_unit",
    "axes.train_fraction": "data.train_fraction",
    "models": "model",
}
"""Path in `sweeps.plan.spec_settings` -> the sweep-file field it comes from (where they differ)."""


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


ABSENT: Any = _Absent()
"""A setting one side of a comparison does not have (a section added, a field a newer dpsweep knows)."""


@dataclass(frozen=True)
class Part:
    """One part of a sweep: its first grid, or one extension; a Ray experiment of its own.

    Attributes:
        trials: the keys of its trials.
        status: ``running``, ``incomplete`` (interrupted: a new run resumes it) or ``complete`` (every trial ended).
    """

    trials: tuple[str, ...]
    status: str = "running"


@dataclass(frozen=True)
class SweepState:
    """``sweep.json``.

    Attributes:
        format: the state format (`sweeps.launch.STATE_FORMAT`).
        fingerprint: `sweeps.plan.spec_fingerprint` of the settings it last ran with.
        status: the whole sweep's: ``running``, ``incomplete`` or ``complete``.
        instance: this run of the sweep, whose trials are its runs in the privacy ledger (kept on resume and
            extension, new after ``--fresh``); None in a state written before instances.
        settings: `sweeps.plan.spec_settings` of the settings it last ran with; None in a state written before
            settings were recorded (then no extension, and a change cannot be named).
        parts: its first grid and its extensions, in order; () in a state written before parts (one part: the grid).
    """

    format: int
    fingerprint: str
    status: str
    instance: str | None = None
    settings: dict[str, Any] | None = None
    parts: tuple[Part, ...] = field(default=())

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> SweepState:
        """From the parsed file (``format`` 1 where absent).

        Raises:
            KeyError, TypeError, ValueError: not such a state.
        """
        return cls(
            format=int(state.get("format", 1)),
            fingerprint=str(state["fingerprint"]),
            status=str(state.get("status", "running")),
            instance=state.get("instance"),
            settings=state.get("settings"),
            parts=tuple(Part(tuple(p["trials"]), p["status"]) for p in state.get("parts", ())),
        )

    def write(self, path: Path) -> None:
        """Write the file, whole (written aside, then renamed over the old one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": self.format,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "instance": self.instance,
            "settings": self.settings,
            "parts": [{"status": p.status, "trials": list(p.trials)} for p in self.parts],
        }
        draft = path.with_name(f".{path.name}.draft")
        draft.write_text(json.dumps(state, indent=2))
        draft.replace(path)


@dataclass(frozen=True)
class SettingChange:
    """One sweep-file field whose value differs between the sweep as it ran and the sweep file now."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {show(self.old)} -> {show(self.new)}"

    @property
    def added(self) -> list[Any]:
        """The values of a list the new one adds."""
        return [v for v in _items(self.new) if v not in _items(self.old)]

    @property
    def removed(self) -> list[Any]:
        return [v for v in _items(self.old) if v not in _items(self.new)]


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[SettingChange]:
    """Every field whose value differs between two `sweeps.plan.spec_settings`, named as in the sweep file
    (``privacy.delta``, ``training.seed``, ``privacy.max_grad_norm.convnext_small``), in the settings' order."""
    changes: list[SettingChange] = []
    _diff(old, new, "", changes)
    return changes


def refusal(change: SettingChange, old_settings: dict[str, Any]) -> str | None:
    """Why ``change`` cannot extend the sweep (it would change or rename trials that ran), or None: it only adds
    trials. ``old_settings``: the settings the sweep ran with."""
    if old_settings.get("search") != "grid":
        return "an Optuna search is not extended"
    old_inits = old_settings.get("inits") or []
    name = change.field
    if name == "data.train_fraction":
        old = DEFAULT_TRAIN_FRACTION if change.old is ABSENT else change.old
        new = DEFAULT_TRAIN_FRACTION if change.new is ABSENT else change.new
        change = SettingChange(name, old, new)
    if name in EXTENDABLE or name.startswith("privacy.max_grad_norm."):
        if change.old is ABSENT or change.new is ABSENT:
            return "the models changed"
        removed = change.removed
        return f"removes {show(removed[0] if len(removed) == 1 else removed)}" if removed else None
    if name.startswith("init_weights."):
        init = name.removeprefix("init_weights.")
        return None if change.old is ABSENT and init not in old_inits else "trials ran with this init's weights"
    if name == "pretrain" or name.startswith("pretrain."):
        return "trials ran with the domain init it makes" if DOMAIN_INIT in old_inits else None
    return OTHER_SETTING


OTHER_SETTING = ""
"""`refusal` of a change to a setting that is no grid axis (the message names the change alone)."""


def show(value: Any) -> str:
    """A setting's value as a sweep file writes it (lists in brackets, ``inf``, ``null``, text unquoted)."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def _diff(old: Any, new: Any, path: str, changes: list[SettingChange]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            _diff(old.get(key, ABSENT), new.get(key, ABSENT), f"{path}.{key}" if path else str(key), changes)
    elif old != new:
        changes.append(SettingChange(_field_name(path), old, new))


def _field_name(path: str) -> str:
    for prefix, name in SETTINGS_FIELDS.items():
        if path == prefix or path.startswith(prefix + "."):
            return name + path.removeprefix(prefix)
    return path


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
