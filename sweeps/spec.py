"""Reading a sweep file: YAML -> a validated `SweepSpec` (`load_spec`, `parse_spec`).

A sweep file is YAML (reference: ``docs/sweep-spec.md``). Its types are `sweeps.schema`'s: each section that sets
trial fields is the trial's own config class (`trainables.config`), so a setting has one name and one default from
the YAML to the optimizer; ``privacy.target_epsilon``, ``privacy.max_grad_norm``, ``privacy.privacy_unit``,
``training.lr`` and ``training.seed`` are lists, the grid axes (`GridAxes`) of the trial field they name; each
``optuna:`` range is named after the field it searches. Closed sets are the `Literal` types of
`trainables.config`, checked in one place (`_coerce`).

Any problem raises `SpecError` naming the field path, the value and the fix, before Ray or any trial starts: a
section's config checks run as it is built, the sweep's rules and every trial's checks in `sweeps.validate`.
Checks that need the data (delta < 1/N) or the weights (missing checkpoint files) run in `sweeps.plan`, still
before any trial.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from sweeps.schema import (
    AuditSpec,
    DataSpec,
    EarlyStoppingSpec,
    GridAxes,
    GridPoint,
    Objective,
    OptunaSpec,
    ResourcesSpec,
    SpecError,
    SweepSpec,
    TrackingSpec,
)
from sweeps.validate import spec_error, validate
from trainables.config import (
    ConfigError,
    EvaluationSettings,
    PretrainConfig,
    PrivacyConfig,
    PrivacySettings,
    PrivacyUnit,
    SpeedConfig,
    TrainingSettings,
)

__all__ = ["AuditSpec", "GridPoint", "Objective", "SpecError", "SweepSpec", "load_spec", "parse_spec"]
"""The parser, and the types most readers import with it (defined in `sweeps.schema`)."""

RENAMED = {
    "privacy.epsilons": "privacy.target_epsilon",
    "privacy.clip_norms": "privacy.max_grad_norm",
    "training.learning_rates": "training.lr",
    "training.seeds": "training.seed",
    "optuna.learning_rate": "optuna.lr",
    "optuna.clip_norm": "optuna.max_grad_norm",
}
"""Spellings of earlier versions: refused with the new name (every field is named after the setting it sets)."""

SECTIONS: dict[str, type] = {
    "data": DataSpec,
    "pretrain": PretrainConfig,
    "privacy": PrivacySettings,
    "training": TrainingSettings,
    "evaluation": EvaluationSettings,
    "resources": ResourcesSpec,
    "speed": SpeedConfig,
    "tracking": TrackingSpec,
    "optuna": OptunaSpec,
    "early_stopping": EarlyStoppingSpec,
    "audit": AuditSpec,
}
OPTIONAL_SECTIONS = ("pretrain", "optuna", "early_stopping", "audit")
AXES: dict[str, tuple[str, Any]] = {
    "privacy.target_epsilon": ("target_epsilon", tuple[float, ...]),
    "privacy.max_grad_norm": ("max_grad_norm", tuple[float, ...]),
    "training.lr": ("lr", tuple[float, ...]),
    "training.seed": ("seed", tuple[int, ...]),
    "privacy.privacy_unit": ("privacy_unit", tuple[PrivacyUnit, ...]),
}
"""Grid axes given inside their sections: field path -> (`GridAxes` field, type)."""
NOT_SETTABLE = {
    **{
        f"privacy.{name}": "it is derived by the planner from the data and the target epsilon"
        for name in PrivacyConfig.DERIVED
    },
    "pretrain.input_mean": "the pretrain stage uses data.input_mean",
    "pretrain.input_std": "it is data.input_std",
}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; raise `SpecError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep file {path} does not exist; pass a path such as sweeps/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections (name, data, model, ...), got {type(raw).__name__}")
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict[str, Any], source: str = "<dict>") -> SweepSpec:
    """Build a validated `SweepSpec` from a plain dict (the parsed YAML)."""
    raw = dict(raw)
    if "model" in raw:
        if "models" in raw:
            raise SpecError(f"{source}: give either `model` or `models`, not both")
        raw["models"] = raw.pop("model")
    top = {f.name: f for f in fields(SweepSpec) if f.name not in ("source", "axes")}
    _reject_unknown(raw, top, "", source)
    values, axes = _sections_and_axes(raw, source)
    for required in ("name", "data", "models", "inits", "privacy"):
        if required not in values:
            shown = "model" if required == "models" else required
            raise SpecError(f"{source}: required field `{shown}` is missing")
    if values.get("search") == "optuna":
        _optuna_defaults(raw, values, axes, source)
    if "target_epsilon" not in axes:
        raise SpecError(
            f"{source}: required field `privacy.target_epsilon` is missing; list targets such as [1, 3, 8, .inf]"
        )
    clips = axes.get("max_grad_norm", (PrivacyConfig.max_grad_norm,))  # the field's default, alone
    axes["max_grad_norm"] = clips if isinstance(clips, dict) else dict.fromkeys(values["models"], clips)
    if values.get("pretrain") is not None and "data" in values:
        data = values["data"]
        values["pretrain"] = replace(values["pretrain"], input_mean=data.input_mean, input_std=data.input_std)
    spec = SweepSpec(**values, axes=GridAxes(**axes))
    validate(spec)
    return spec


def _sections_and_axes(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sweep's top-level values and sections (`SECTIONS`, built), and the grid axes given inside them (`AXES`)."""
    top_types = typing.get_type_hints(SweepSpec)
    values: dict[str, Any] = {"source": source}
    axes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            values[key] = _coerce(value, top_types[key], key, source)
        elif value is None and key in OPTIONAL_SECTIONS:
            values[key] = None
        elif not isinstance(value, dict):
            raise SpecError(f"{source}: `{key}` must be a mapping of settings, got {value!r}")
        else:
            section = dict(value)
            axes |= _axes_of_section(key, section, source)  # pops them from the section
            values[key] = _build(SECTIONS[key], section, key, source)
    return values, axes


def _axes_of_section(key: str, section: dict[str, Any], source: str) -> dict[str, Any]:
    """The grid axes given in section ``key``, removed from ``section``."""
    axes: dict[str, Any] = {}
    for path, (axis, kind) in AXES.items():
        name = path.split(".")[1]
        if path.startswith(f"{key}.") and name in section:
            given = section.pop(name)
            if axis == "max_grad_norm" and isinstance(given, dict):
                axes[axis] = _clip_norms_by_model(given, source)
            else:
                axes[axis] = _coerce(given, kind, path, source)
    return axes


def _optuna_defaults(raw: dict[str, Any], values: dict[str, Any], axes: dict[str, Any], source: str) -> None:
    """`search: optuna`: grid settings of the searched fields are refused; the section defaults; clips are searched."""
    for name in OptunaSpec.RANGES:
        for grid_section in ("privacy", "training"):
            if name in (raw.get(grid_section) or {}):
                raise SpecError(
                    f"{source}: `{grid_section}.{name}` is a grid setting; with `search: optuna` give the "
                    f"range `optuna.{name}` instead (e.g. [low, high], or [value] to fix it)"
                )
    values.setdefault("optuna", OptunaSpec())
    axes.setdefault("max_grad_norm", {})  # searched: `optuna.max_grad_norm`


def _clip_norms_by_model(given: dict[Any, Any], source: str) -> dict[str, tuple[float, ...]]:
    """``privacy.max_grad_norm: {convnext_small: 4, convnext_tiny: 3.5}``: one clip list per model."""
    if not given:
        raise SpecError(f"{source}: `privacy.max_grad_norm` is an empty mapping; give {{model: C}} or a list")
    return {
        str(model): _coerce(value, tuple[float, ...], f"privacy.max_grad_norm.{model}", source)
        for model, value in given.items()
    }


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        path = f"{prefix}.{key}"
        if path in NOT_SETTABLE:
            raise SpecError(f"{source}: `{path}` cannot be set in a sweep file: {NOT_SETTABLE[path]}; remove it")
    _reject_unknown(raw, known, prefix + ".", source)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}", source) for k, v in raw.items()}
    missing = [n for n, f in known.items() if n not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SpecError(f"{source}: required field `{prefix}.{missing[0]}` is missing")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise spec_error(error, source) from None


def _reject_unknown(raw: dict[str, Any], known: dict[str, Any], prefix: str, source: str) -> None:
    for key in raw:
        path = f"{prefix}{key}"
        if path in RENAMED:
            raise SpecError(
                f"{source}: `{path}` was renamed `{RENAMED[path]}` (each field is named after the trial "
                f"setting it sets); rename it in the sweep file"
            )
        if path in AXES:
            continue
        if key not in known:
            candidates = [*known, *(axis.split(".")[1] for axis in AXES if axis.startswith(prefix) and prefix)]
            close = difflib.get_close_matches(str(key), candidates, n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; known fields: {sorted(candidates)}"
            raise SpecError(f"{source}: unknown field `{path}`{hint}")


def _coerce(value: Any, kind: Any, where: str, source: str) -> Any:
    """Convert a YAML value to the field's type (`typing.get_type_hints`), or raise `SpecError` naming it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        raise SpecError(f"{source}: `{where}` must not be empty")
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise SpecError(f"{source}: {where} = {value!r}; choose one of {args}")
        return value
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(items))
    scalar = _SCALARS.get(dict if origin is dict else kind)
    if scalar is None:
        raise AssertionError(f"unhandled type {kind} for {where}")
    try:
        return scalar(value)
    except (TypeError, ValueError):
        raise SpecError(f"{source}: `{where}` = {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def _refuse(value: Any) -> Any:
    raise TypeError(value)


_SCALARS: dict[Any, Any] = {
    dict: lambda v: {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else _refuse(v),
    float: lambda v: _refuse(v) if isinstance(v, bool) else float(v),
    int: lambda v: _refuse(v) if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) else int(v),
    bool: lambda v: v if isinstance(v, bool) else _refuse(v),
    str: lambda v: _refuse(v) if isinstance(v, dict | list) else str(v),
}
"""Scalar conversions of `_coerce`; each raises TypeError or ValueError for a value that is not of its kind."""
