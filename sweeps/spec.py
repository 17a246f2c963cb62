"""Reading a sweep file: YAML -> a validated `SweepSpec` (`load_spec`, `parse_spec`).

A sweep file is YAML (reference: ``docs/sweep-spec.md``), read strictly (`read_sweep_yaml`, `SweepLoader`): UTF-8,
no key given twice, only ``true``/``false`` as booleans. Its types are `sweeps.schema`'s: each section that sets
trial fields is the trial's own config class (`trainables.config`), so a setting has one name and one default from
the YAML to the optimizer; ``privacy.target_epsilon``, ``privacy.max_grad_norm``, ``privacy.privacy_unit``,
``training.lr``, ``training.seed`` and ``data.train_fraction`` are lists, the grid axes (`GridAxes`) of the trial
field they name; each ``optuna:`` range is named after the field it searches. Closed sets are the `Literal` types of
`trainables.config`, checked in one place (`_coerce`).

Any problem raises `SpecError` naming the field path, the value and the fix, before Ray or any trial starts: a
section's config checks run as it is built, the sweep's rules and every trial's checks in `sweeps.validate`.
Checks that need the data (delta < 1/N) or the weights (missing checkpoint files) run in `sweeps.plan`, still
before any trial.
"""

from __future__ import annotations

import difflib
import re
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
    ProxySpec,
    ResourcesSpec,
    SelectionSpec,
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
    "selection": SelectionSpec,
    "proxy": ProxySpec,
    "early_stopping": EarlyStoppingSpec,
    "audit": AuditSpec,
}
OPTIONAL_SECTIONS = ("pretrain", "optuna", "selection", "proxy", "early_stopping", "audit")
AXES: dict[str, tuple[str, Any]] = {
    "privacy.target_epsilon": ("target_epsilon", tuple[float, ...]),
    "privacy.max_grad_norm": ("max_grad_norm", tuple[float, ...]),
    "training.lr": ("lr", tuple[float, ...]),
    "training.seed": ("seed", tuple[int, ...]),
    "privacy.privacy_unit": ("privacy_unit", tuple[PrivacyUnit, ...]),
    "data.train_fraction": ("train_fraction", tuple[float, ...]),
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
    return parse_spec(read_sweep_yaml(path), source=str(path))


def read_sweep_yaml(path: Path) -> dict[str, Any]:
    """The sweep file's mapping of sections, read strictly: UTF-8, YAML without duplicate keys (at any depth),
    recursive aliases or YAML 1.1's ``yes``/``no``/``on``/``off`` booleans (`SweepLoader`).

    Raises:
        SpecError: the path is missing, a directory or unreadable, the text is not UTF-8 or not such YAML, or
            holds no mapping of sections.
    """
    raw = _parse_yaml(_read_text(path), path)
    if raw is None:
        raise SpecError(
            f"{path} is empty (no settings, only blank lines or comments); write a sweep into it, e.g. start from "
            "a copy of sweeps/smoke.yaml (reference: docs/sweep-spec.md)"
        )
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections (name, data, model, ...), got {type(raw).__name__}")
    return raw


def _read_text(path: Path) -> str:
    """The file's text, or a `SpecError` that says why there is none (never a traceback)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        example = f", e.g. {path / inside[0]}" if inside else ""
        raise SpecError(f"{path} is a directory, not a sweep file; pass the YAML file of the sweep{example}")
    if not path.exists():
        raise SpecError(f"sweep file {path} does not exist; pass a path such as sweeps/smoke.yaml")
    if not path.is_file():  # a FIFO or a device: reading one may never end
        raise SpecError(f"{path} is not a regular file; pass a YAML file such as sweeps/smoke.yaml")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise SpecError(
            f"{path}: permission denied reading the sweep file; make it readable (chmod u+r {path})"
        ) from None
    except OSError as error:
        raise SpecError(f"{path}: the sweep file cannot be read ({error.strerror or error}); fix the file") from None
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is allowed
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise SpecError(
            f"{path}: byte 0x{data[error.start]:02x} at line {line}, column {column} (byte offset {error.start}) is "
            f"not UTF-8{utf16}; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove the character"
        ) from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=SweepLoader)  # a SafeLoader
    except SweepYamlError as error:
        raise SpecError(f"{path}: {error}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: malformed YAML{where}: {error.problem}; fix the syntax") from None
    except yaml.reader.ReaderError as error:
        character = chr(error.character) if isinstance(error.character, int) else error.character
        line = text.count("\n", 0, error.position) + 1
        raise SpecError(
            f"{path}: character {character!r} at line {line} is not allowed in YAML (a control character); remove it"
        ) from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: malformed YAML: {error}; fix the syntax") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML is nested too deeply to be a sweep file; fix the brackets") from None


class SweepYamlError(yaml.YAMLError):  # type: ignore[misc]  # PyYAML ships no type hints
    """YAML that parses but would not mean what it says (a duplicate key, a recursive alias)."""


class SweepLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """PyYAML's `SafeLoader`, refusing what would silently change a sweep:

    - a key given twice in one mapping, at any depth (YAML loaders keep the last one without a word: ``epochs: 3``
      then ``epochs: 50`` trains 50 epochs; a second ``privacy:`` section replaces the first);
    - an alias inside the value it refers to (an infinite value);
    - YAML 1.1's ``yes``/``no``/``on``/``off`` as booleans (``fixed_shapes: on`` must stay the string ``on``):
      only ``true`` and ``false`` are booleans, as in YAML 1.2.

    Merge keys (``<<: *defaults``) keep their meaning: keys written beside them override the merged ones.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicates(node, "", set(), set())
        return super().construct_document(node)


SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _refuse_duplicates(node: yaml.Node, path: str, active: set[int], done: set[int]) -> None:
    """Raise `SweepYamlError` for a key given twice in a mapping under ``node`` (``path``: its sweep-file path)."""
    if id(node) in active:
        raise SweepYamlError(
            f"`{path}` is an alias of a value that contains it (line {node.start_mark.line + 1}), which makes an "
            "infinite value; remove the alias"
        )
    if id(node) in done or not isinstance(node, yaml.CollectionNode):
        return
    active.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{path}[{i}]", active, done)
    else:
        first: dict[tuple[str, str], tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            name = f"{path}.{key.value}" if path and isinstance(key, yaml.ScalarNode) else str(key.value)
            if key.tag == "tag:yaml.org,2002:merge":
                _refuse_duplicates(value, path, active, done)
                continue
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in first:
                    raise SweepYamlError(_duplicate_message(name, *first[(key.tag, key.value)], key, value))
                first[(key.tag, key.value)] = (key, value)
            _refuse_duplicates(value, name, active, done)
    active.discard(id(node))
    done.add(id(node))


def _duplicate_message(name: str, key: yaml.Node, value: yaml.Node, again: yaml.Node, new: yaml.Node) -> str:
    lines = (key.start_mark.line + 1, again.start_mark.line + 1)
    if isinstance(value, yaml.MappingNode) and isinstance(new, yaml.MappingNode):
        return (
            f"`{name}` appears twice (lines {lines[0]} and {lines[1]}): YAML would keep only the second section and "
            f"silently drop every setting of the first; merge them into one `{name}:` section"
        )
    first, last = (v.value if isinstance(v, yaml.ScalarNode) else NODE_KINDS[v.id] for v in (value, new))
    return (
        f"`{name}` is given twice (line {lines[0]}: {first}, line {lines[1]}: {last}): YAML would silently keep "
        f"only the last ({last}); remove one of them"
    )


NODE_KINDS = {"mapping": "a mapping", "sequence": "a list"}


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
    if values.get("search") == "private_selection":
        _selection_defaults(raw, values, axes, source)
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


SELECTION_GRID_FIELDS = {
    "training.lr": "selection.lr",
    "privacy.max_grad_norm": "selection.max_grad_norm",
    "privacy.expected_batch_size": "selection.expected_batch_size",
    "privacy.epochs": "selection.epochs",
}
"""Grid settings of the fields a private selection draws at random: their `SelectionSpec` paths."""


def _selection_defaults(raw: dict[str, Any], values: dict[str, Any], axes: dict[str, Any], source: str) -> None:
    """`search: private_selection`: grid settings of the drawn fields, Optuna and ASHA are refused with the reason;
    the section defaults; clips are drawn (`selection.max_grad_norm`)."""
    for grid_path, path in SELECTION_GRID_FIELDS.items():
        section, name = grid_path.split(".")
        if name in (raw.get(section) or {}):
            raise SpecError(
                f"{source}: `{grid_path}` is a grid setting; with `search: private_selection` each candidate draws it "
                f"from `{path}` instead (e.g. [low, high], or [value] to fix it)"
            )
    if raw.get("optuna") is not None:
        raise SpecError(
            f"{source}: `optuna:` cannot be used with `search: private_selection`: Optuna chooses each trial from "
            "earlier results, but the private-selection bound needs candidates drawn independently of the data; "
            "remove the `optuna:` section, or use `search: optuna`"
        )
    if raw.get("early_stopping") is not None:
        raise SpecError(
            f"{source}: `early_stopping:` (ASHA) cannot be used with `search: private_selection`: the bound needs "
            "every candidate to run its planned steps (where ASHA stops a trial depends on the data, and a stopped "
            "trial's count would reveal K); remove the `early_stopping:` section"
        )
    values.setdefault("selection", SelectionSpec())
    axes.setdefault("max_grad_norm", {})  # drawn: `selection.max_grad_norm`


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
    except (TypeError, ValueError, OverflowError):
        name = "dict" if origin is dict else getattr(kind, "__name__", kind)
        raise SpecError(f"{source}: `{where}` = {value!r} is not a valid {name}; {_KIND_FIXES[name]}") from None


def _refuse(value: Any) -> Any:
    raise TypeError(value)


def _text(value: Any) -> str:
    return _refuse(value) if isinstance(value, dict | list) else str(value)


_KIND_FIXES = {
    "dict": "give a mapping of names to paths, e.g. {imagenet: weights/{model}.safetensors}",
    "float": "give a number, e.g. 0.5 or 1e-5 (.inf is infinity)",
    "int": "give a whole number, e.g. 32",
    "bool": "write true or false",
    "str": "give one text value, not a list or mapping",
}


_SCALARS: dict[Any, Any] = {
    dict: lambda v: {str(k): _text(x) for k, x in v.items()} if isinstance(v, dict) else _refuse(v),
    float: lambda v: _refuse(v) if isinstance(v, bool) else float(v),
    int: lambda v: _refuse(v) if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) else int(v),
    bool: lambda v: v if isinstance(v, bool) else _refuse(v),
    str: _text,
}
"""Scalar conversions of `_coerce`; each raises TypeError or ValueError for a value that is not of its kind."""
